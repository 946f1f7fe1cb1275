"""The kvmid binary as an operator runs it: every bad flag or config value is refused at start
with a message naming it (exit 2), and SIGTERM restores the guests and exits 0."""

import os
import signal
import subprocess
import tempfile
import time
import unittest

KVMID = "daemon/kvmid"
KVMI_SIM = "kernel/sim/kvmi-sim"
KVMI_VMM = "kernel/kvm/kvmi-vmm"


def run_kvmid(*args, timeout=10):
    return subprocess.run([KVMID, *args], capture_output=True, text=True, timeout=timeout)


class BadValuesAreRefused(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="kvmid-bin-", dir="/tmp")
        self.sock = ["--kvmi_socket=%s/k.sock" % self.dir, "--api_socket=%s/a.sock" % self.dir]

    def assertRefused(self, args, *needles):
        result = run_kvmid(*self.sock, *args)
        self.assertEqual(result.returncode, 2, result.stderr)
        for needle in needles:
            self.assertIn(needle, result.stderr)

    def test_socket_mode(self):
        self.assertRefused(["--kvmi_socket_mode=999"], "--kvmi_socket_mode")

    def test_fallback(self):
        self.assertRefused(["--fallback=maybe"], "--fallback")

    def test_api_tcp(self):
        self.assertRefused(["--api_tcp=localhost"], "--api_tcp")
        self.assertRefused(["--api_tcp=127.0.0.1:99999"], "--api_tcp", "0..65535")

    def test_baseline(self):
        self.assertRefused(["--baseline=sometimes"], "--baseline")

    def test_protect(self):
        self.assertRefused(["--protect=ktext:0x2000-0x1000:rx"], "--protect", "FIRST <= LAST")

    def test_deadline(self):
        self.assertRefused(["--deadline_ms=0"], "--deadline_ms")

    def test_log_level(self):
        self.assertRefused(["--log_level=loud"], "--log_level")

    def test_missing_config(self):
        self.assertRefused(["--config=/nonexistent/kvmid.textproto"], "/nonexistent/kvmid.textproto")

    def test_bad_policy_in_config(self):
        path = os.path.join(self.dir, "bad.textproto")
        with open(path, "w") as f:
            f.write('policies { name: "ktext" protect_pages { gpa_first: 0 gpa_last: 4095 allowed: "rz" } mode: MODE_ENFORCE }\n')
        self.assertRefused(["--config=" + path], "policies[0] (ktext)", "protect_pages.allowed")

    def test_unknown_group(self):
        self.assertRefused(["--kvmi_socket_group=no-such-group-here"], "no-such-group-here")


class HelpAndVersion(unittest.TestCase):
    """Each binary's --help lists its own flags; --version prints the project's version."""

    def check(self, binary, name, own_flags):
        result = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=10)
        text = result.stdout + result.stderr
        self.assertNotIn("No flags matched", text)
        for flag in own_flags:
            self.assertIn("--" + flag, text, "%s --help lists --%s" % (name, flag))
        version = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
        self.assertEqual(version.returncode, 0, version.stderr)
        self.assertRegex(version.stdout, r"^%s \d+\.\d+\.\d+ \(KVMI v6\)" % name)

    def test_kvmid(self):
        self.check(KVMID, "kvmid", ["kvmi_socket", "config", "api_tcp", "baseline", "protect"])

    def test_kvmi_sim(self):
        self.check(KVMI_SIM, "kvmi-sim", ["connect", "vms", "vcpus", "scenario"])

    def test_kvmi_vmm(self):
        self.check(KVMI_VMM, "kvmi-vmm", ["connect", "guest_args"])


def wait_for_path(path, seconds=10):
    deadline = time.monotonic() + seconds
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.02)
    return os.path.exists(path)


class FlagsOverrideTheConfigFile(unittest.TestCase):
    """--flagfile and -single_dash flags override --config (they used to be silently ignored)."""

    def start(self, *args):
        proc = subprocess.Popen([KVMID, *args], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        self.addCleanup(lambda: (proc.poll() is None and proc.kill(), proc.wait()))
        return proc

    def test_flagfile_and_single_dash(self):
        d = tempfile.mkdtemp(prefix="kvmid-bin-", dir="/tmp")
        config = os.path.join(d, "kvmid.textproto")
        with open(config, "w") as f:
            f.write('listen { unix_socket: "%s/file.sock" api_socket: "%s/file-api.sock" }\n'
                    % (d, d))
        flagfile = os.path.join(d, "kvmid.flags")
        with open(flagfile, "w") as f:
            f.write("--kvmi_socket=%s/flagfile.sock\n" % d)
        proc = self.start("--config=" + config, "--flagfile=" + flagfile,
                          "-api_socket=%s/dash-api.sock" % d)
        self.assertTrue(wait_for_path("%s/dash-api.sock" % d), "the API is on the -flag's socket")
        self.assertTrue(os.path.exists("%s/flagfile.sock" % d), "kvmi socket from the flagfile")
        self.assertFalse(os.path.exists("%s/file.sock" % d))
        self.assertFalse(os.path.exists("%s/file-api.sock" % d))
        proc.send_signal(signal.SIGTERM)
        self.assertEqual(proc.wait(timeout=10), 0, proc.stderr.read())


class SigtermRestoresAndExitsZero(unittest.TestCase):
    def test_sigterm(self):
        d = tempfile.mkdtemp(prefix="kvmid-bin-", dir="/tmp")
        with open(os.path.join(d, "cookie"), "w") as f:
            f.write("secret")
        log = open(os.path.join(d, "kvmid.log"), "w+")
        kvmid = subprocess.Popen(
            [KVMID, "--kvmi_socket=%s/k.sock" % d, "--api_socket=%s/a.sock" % d,
             "--cookie_file=%s/cookie" % d, "--baseline=enforce", "--log_events=none"],
            stdout=log, stderr=subprocess.STDOUT)
        sim = None
        try:
            deadline = time.monotonic() + 10
            while not os.path.exists("%s/k.sock" % d) and time.monotonic() < deadline:
                time.sleep(0.02)
            sim = subprocess.Popen(
                [KVMI_SIM, "--connect=unix:%s/k.sock" % d, "--cookie_file=%s/cookie" % d,
                 "--vms=2", "--vcpus=2", "--scenario=mixed", "--rate=20", "--duration=30",
                 "--reconnect=0"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 20
            hooked = 0
            while hooked < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
                log.seek(0)
                hooked = log.read().count(": hooked: KVMI v1")
            self.assertEqual(hooked, 2, "both guests hooked")
            kvmid.send_signal(signal.SIGTERM)
            self.assertEqual(kvmid.wait(timeout=10), 0)
            log.seek(0)
            text = log.read()
            self.assertIn("restoring guests", text)
            self.assertEqual(text.count("unhooking: kvmid is shutting down"), 2, text[-2000:])
            self.assertFalse(os.path.exists("%s/k.sock" % d), "the socket is removed")
        finally:
            if kvmid.poll() is None:
                kvmid.kill()
            if sim is not None:
                sim.kill()
                sim.wait()


if __name__ == "__main__":
    unittest.main()
