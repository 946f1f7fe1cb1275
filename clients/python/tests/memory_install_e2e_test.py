"""End to end, with the real kvmid and kvmi-sim guests: bulk memory (ReadPhysicalStream and
WritePhysicalStream through kvmi_client, `kvmictl dump` and `kvmictl read`) and the installable
client (`pip install` into a fresh venv, offline, and its `kvmictl` console script against the
same kvmid), and kvmictl's exit status 2 when the grpc module is missing.

Outside Bazel: KVMID_BIN=... KVMI_SIM_BIN=... /usr/bin/python3 tests/junit_runner.py
tests/memory_install_e2e_test.py (from clients/python after gen_protos.sh).
"""

import os
import shutil
import subprocess
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
CLIENT_DIR = os.path.dirname(HERE)
REPO = os.path.dirname(os.path.dirname(CLIENT_DIR))  # the runfiles root under Bazel
KVMICTL = os.path.join(CLIENT_DIR, "kvmictl")
sys.path.insert(0, CLIENT_DIR)

import kvmi_client as kc  # noqa: E402
from tests.e2e_test import VMS, Fleet  # noqa: E402
from tests.test_support import wait_for  # noqa: E402

GUEST_MIB = 256  # kvmi-sim's default guest RAM
TEXT = (0x3000000, 0x10000)  # a region the test fills (setUpClass) and nothing else writes
VM = "sim-vm-0000"
SYSTEM_PYTHON = "/usr/bin/python3"  # the one that sees Debian's python3-grpcio


class MemoryAndInstallTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.fleet = Fleet()
        try:
            cls.client = kc.Client(cls.fleet.target, timeout=10)

            def hooked():
                vms = cls.client.list_vms()
                return len([v for v in vms if v.state == kc.pb.VM_STATE_HOOKED]) == VMS
            wait_for(hooked, 20, "%d hooked guests" % VMS)
            cls.client.write_physical(VM, TEXT[0], bytes((i * 7 + 1) & 0xFF or 1
                                                         for i in range(TEXT[1])))
        except BaseException:
            cls.fleet.stop()
            raise
        cls.tmp = tempfile.mkdtemp(prefix="kvmimem-", dir=os.environ.get("TEST_TMPDIR"))

    @classmethod
    def tearDownClass(cls):
        cls.client.close()
        cls.fleet.stop()
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def ctl(self, *args, executable=None, timeout=300):
        argv = [executable] if executable else [SYSTEM_PYTHON, KVMICTL]
        env = dict(os.environ, KVMID_TARGET=self.fleet.target)
        if executable:  # an installed kvmictl uses its own modules, not the checkout's
            env.pop("PYTHONPATH", None)
        return subprocess.run(argv + list(args), capture_output=True, text=True, timeout=timeout,
                              env=env)

    # ---- the streams through kvmi_client ------------------------------------------------------

    def test_stream_reads_what_unary_reads(self):
        gpa, size = TEXT
        unary = self.client.read_physical(VM, gpa, size)
        chunks = list(self.client.read_physical_stream(VM, gpa, size, chunk_bytes=4096))
        self.assertEqual(len(chunks), size // 4096)
        self.assertEqual(b"".join(c.data for c in chunks), unary)
        self.assertTrue(all(unary), "the region the test filled")

    def test_write_stream_then_read_back(self):
        gpa = 0x1000000 + 123  # unaligned, several MiB: many messages and page pieces
        data = bytes((i * 13 + 7) & 0xFF for i in range(3 * 1024 * 1024 + 5))
        written = self.client.write_physical_stream(VM, gpa, data, chunk_bytes=1 << 20)
        self.assertEqual(written, len(data))
        self.assertEqual(self.client.read_physical_bytes(VM, gpa, len(data)), data)
        # Pieces from an iterable, with their total given.
        pieces = [b"\xAA" * 5000, b"\xBB" * 3]
        self.assertEqual(self.client.write_physical_stream(VM, gpa, iter(pieces), size=5003), 5003)
        self.assertEqual(self.client.read_physical_bytes(VM, gpa, 5003), b"".join(pieces))

    def test_stream_errors_name_the_field_or_the_gpa(self):
        end = GUEST_MIB << 20
        with self.assertRaises(kc.KvmiError) as beyond:
            list(self.client.read_physical_stream(VM, end - 4096, 8192, chunk_bytes=4096))
        self.assertIn("at gpa 0x%x" % end, beyond.exception.message)
        with self.assertRaises(kc.InvalidArgument) as wraps:
            list(self.client.read_physical_stream(VM, (1 << 64) - 4096, 8192))
        self.assertIn("size", wraps.exception.message)
        with self.assertRaises(kc.InvalidArgument) as chunk:
            list(self.client.read_physical_stream(VM, 0, 4096, chunk_bytes=4 << 20))
        self.assertIn("chunk_bytes", chunk.exception.message)
        with self.assertRaises(kc.InvalidArgument) as short:
            self.client.write_physical_stream(VM, 0x1000000, iter([b"ab"]), size=10)
        self.assertIn("carried 2 of 10", short.exception.message)
        # continue_on_error: the unreadable chunk comes as an error chunk, the stream goes on.
        chunks = list(self.client.read_physical_stream(VM, end - 4096, 8192, chunk_bytes=4096,
                                                       continue_on_error=True))
        self.assertEqual([(c.gpa, bool(c.error)) for c in chunks], [(end - 4096, False),
                                                                    (end, True)])

    # ---- kvmictl dump / read -------------------------------------------------------------------

    def test_kvmictl_dump_whole_guest_sparse_with_summary(self):
        out = os.path.join(self.tmp, "whole.mem")
        result = self.ctl("dump", VM, "--out", out, "--progress")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(os.path.getsize(out), GUEST_MIB << 20)  # up to the end of its memory
        self.assertIn("MiB/s", result.stdout)
        self.assertIn("%d pages" % ((GUEST_MIB << 20) // 4096), result.stdout)
        self.assertIn("zero pages not sent", result.stdout)
        self.assertIn("memory ends at gpa 0x%x" % (GUEST_MIB << 20), result.stdout)
        self.assertIn("100.0%", result.stderr)  # the progress bar's last state
        self.assertIn("MiB/s", result.stderr)  # the progress bar, asked for with --progress
        # A sparse file: the zero pages were not written.
        self.assertLess(os.stat(out).st_blocks * 512, GUEST_MIB << 20)
        gpa, size = TEXT
        with open(out, "rb") as f:
            f.seek(gpa)
            self.assertEqual(f.read(size), self.client.read_physical(VM, gpa, size))
            f.seek((GUEST_MIB << 20) - 4096)
            self.assertEqual(f.read(), self.client.read_physical(VM, (GUEST_MIB << 20) - 4096,
                                                                 4096))

    def test_kvmictl_dump_range_without_progress_on_a_pipe(self):
        out = os.path.join(self.tmp, "range.mem")
        gpa, size = TEXT
        result = self.ctl("dump", VM, "--out", out, "--gpa", hex(gpa), "--size", "64K",
                          "--no-skip-zero")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stderr, "")  # not a terminal, no --progress: no bar
        with open(out, "rb") as f:
            self.assertEqual(f.read(), self.client.read_physical(VM, gpa, size))
        self.assertIn("0 zero pages not sent", result.stdout)
        bad = self.ctl("dump", VM, "--out", out, "--size", "0")
        self.assertEqual(bad.returncode, 3)  # usage error
        self.assertIn("--size", bad.stderr)

    def test_kvmictl_read_beyond_one_unary_call(self):
        result = self.ctl("read", VM, hex(TEXT[0]), str(2 << 20))  # 2 MiB: through the stream
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(len(result.stdout.splitlines()), (2 << 20) // 16)
        self.assertTrue(result.stdout.startswith("%016x  " % TEXT[0]))

    # ---- the installable client ----------------------------------------------------------------

    def test_pip_install_into_a_fresh_venv_gives_a_working_kvmictl(self):
        source = os.path.join(self.tmp, "client-src")  # a writable copy (runfiles are links)
        shutil.copytree(CLIENT_DIR, source, symlinks=False,
                        ignore=shutil.ignore_patterns("*_pb2*.py", "__pycache__", "tests"))
        venv = os.path.join(self.tmp, "venv")
        subprocess.run([SYSTEM_PYTHON, "-m", "venv", "--system-site-packages", venv], check=True,
                       timeout=120)
        env = dict(os.environ, KVMI_PROTO_ROOT=REPO, PIP_NO_CACHE_DIR="1",
                   PIP_DISABLE_PIP_VERSION_CHECK="1")
        pip = subprocess.run([os.path.join(venv, "bin", "pip"), "install", "--no-index",
                              "--no-build-isolation", source], capture_output=True, text=True,
                             timeout=600, env=env)
        self.assertEqual(pip.returncode, 0, pip.stdout + pip.stderr)
        kvmictl = os.path.join(venv, "bin", "kvmictl")
        self.assertTrue(os.access(kvmictl, os.X_OK), "no console script")
        helped = self.ctl("--help", executable=kvmictl)
        self.assertEqual(helped.returncode, 0, helped.stderr)
        self.assertIn("dump", helped.stdout)
        listed = self.ctl("vms", executable=kvmictl)
        self.assertEqual(listed.returncode, 0, listed.stderr)
        self.assertIn(VM, listed.stdout)
        out = os.path.join(self.tmp, "venv.mem")
        dumped = self.ctl("dump", VM, "--out", out, "--size", "4M", executable=kvmictl)
        self.assertEqual(dumped.returncode, 0, dumped.stderr)
        self.assertEqual(os.path.getsize(out), 4 << 20)
        # The console script exits as the checkout's kvmictl does (the same table).
        for argv, status in ((["vm", "no-such-vm"], 1), (["--timeout", "0", "vms"], 3),
                             (["events", "--count", "-5"], 3),
                             (["--target", "unix:/nonexistent/api.sock", "vms"], 4),
                             (["apply", "/nonexistent/p.textproto"], 5)):
            r = self.ctl(*argv, executable=kvmictl)
            self.assertEqual(r.returncode, status, (argv, r.stderr))
        completion = self.ctl("completion", "bash", executable=kvmictl)
        self.assertEqual(completion.returncode, 0, completion.stderr)
        self.assertIn("complete -o default -F _kvmictl kvmictl", completion.stdout)
        # The installed modules are the venv's, not the checkout's.
        where = subprocess.run([os.path.join(venv, "bin", "python"), "-c",
                                "import kvmi_client, kvmi.v1.introspection_pb2 as p; "
                                "print(kvmi_client.__file__); print(p.__file__)"],
                               capture_output=True, text=True, timeout=60, cwd=self.tmp,
                               env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
        self.assertEqual(where.returncode, 0, where.stderr)
        for line in where.stdout.splitlines():
            self.assertTrue(line.startswith(venv), line)

    def test_kvmictl_without_grpc_exits_2_with_a_hint(self):
        # -S: no site-packages, so no grpc (a pyenv python3 without Debian's packages looks so).
        result = subprocess.run([SYSTEM_PYTHON, "-S", KVMICTL, "vms"], capture_output=True,
                                text=True, timeout=60)
        self.assertEqual(result.returncode, 2)
        self.assertIn("grpc", result.stderr)
        self.assertIn("python3-grpcio", result.stderr)


if __name__ == "__main__":
    unittest.main()
