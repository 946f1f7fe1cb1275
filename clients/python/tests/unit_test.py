"""kvmi_client and kvmictl without a daemon: parsing, filters, policy files, formatting, exit
codes of local failures. Runs from clients/python's parent with the generated stubs on the path
(tests/run_python_test.sh)."""

import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import unittest

import grpc

HERE = os.path.dirname(os.path.abspath(__file__))
CLIENT_DIR = os.path.dirname(HERE)
KVMICTL = os.path.join(CLIENT_DIR, "kvmictl")
sys.path.insert(0, CLIENT_DIR)

import kvmi_client as kc  # noqa: E402


def load_kvmictl():
    loader = importlib.machinery.SourceFileLoader("kvmictl", KVMICTL)
    spec = importlib.util.spec_from_loader("kvmictl", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


ctl = load_kvmictl()


def run_ctl(*args, stdin=None):
    return subprocess.run([KVMICTL] + list(args), input=stdin, capture_output=True, text=True,
                          timeout=30)


class ParsingTest(unittest.TestCase):
    def test_ranges_are_inclusive_and_accept_sizes(self):
        self.assertEqual(kc.parse_range("0x1000-0x1fff"), (0x1000, 0x1fff))
        self.assertEqual(kc.parse_range("0x1000+0x1000"), (0x1000, 0x1fff))
        self.assertEqual(kc.parse_range("4096"), (4096, 4096))
        with self.assertRaisesRegex(ValueError, "above its last"):
            kc.parse_range("0x2000-0x1000")
        with self.assertRaisesRegex(ValueError, "not a number"):
            kc.parse_range("0xzz-0x1")
        with self.assertRaisesRegex(ValueError, "positive"):
            kc.parse_range("0x1000+0")

    def test_event_types_by_name_or_number(self):
        self.assertEqual(kc.event_type("cr"), kc.policy_pb.EVENT_CR)
        self.assertEqual(kc.event_type("EVENT_PF"), kc.policy_pb.EVENT_PF)
        self.assertEqual(kc.event_type("create-vcpu"), kc.policy_pb.EVENT_CREATE_VCPU)
        self.assertEqual(kc.event_type("3"), kc.policy_pb.EVENT_MSR)
        with self.assertRaisesRegex(ValueError, "one of: UNHOOK, CR"):
            kc.event_type("syscall")
        self.assertEqual(kc.event_type_name(kc.policy_pb.EVENT_MSR), "MSR")
        self.assertEqual(kc.action_name(kc.policy_pb.ACTION_KEEP_OLD), "KEEP_OLD")
        self.assertEqual(kc.state_name(kc.pb.VM_STATE_HOOKED), "HOOKED")
        self.assertEqual(kc.event_type_name(99), "99")  # newer server, older stubs

    def test_event_filter_fields(self):
        f = kc.event_filter(vms=["a"], events=["msr", "cr"], vcpus=[1], crs=["0x4"],
                            msrs=["0xc0000082"], gpa="0x200000-0x20ffff", access="w")
        self.assertEqual(list(f.vms), ["a"])
        self.assertEqual(list(f.events), [kc.policy_pb.EVENT_MSR, kc.policy_pb.EVENT_CR])
        self.assertEqual(list(f.crs), [4])
        self.assertEqual(list(f.msrs), [0xC0000082])
        self.assertTrue(f.HasField("gpa_first") and f.HasField("gpa_last"))
        self.assertEqual((f.gpa_first, f.gpa_last), (0x200000, 0x20FFFF))
        empty = kc.event_filter()
        self.assertFalse(empty.HasField("gpa_first"))

    def test_policy_from_text_json_and_wrapped_request(self):
        text = 'name: "k" protect_pages { gpa_first: 0x1000 gpa_last: 0x1fff allowed: "rx" }'
        p = kc.parse_policy(text)
        self.assertEqual((p.name, p.protect_pages.gpa_last, p.protect_pages.allowed),
                         ("k", 0x1FFF, "rx"))
        wrapped = kc.parse_policy("policy { %s }" % text)
        self.assertEqual(wrapped, p)
        as_json = kc.parse_policy(json.dumps({"name": "k", "protectPages": {
            "gpaFirst": "4096", "gpaLast": "8191", "allowed": "rx"}}))
        self.assertEqual(as_json, p)
        self.assertEqual(kc.parse_policy(json.dumps({"policy": {"name": "m", "lockMsr": {
            "msr": 376}}})).lock_msr.msr, 0x178)
        with self.assertRaisesRegex(ValueError, "no_such_field"):
            kc.parse_policy('name: "x" no_such_field: 1')
        with self.assertRaises(ValueError):
            kc.parse_policy('{"name": "x", "mode": "MODE_SIDEWAYS"}')

    def test_protect_pages_policy_selects_by_uuid_or_name(self):
        p = kc.protect_pages_policy("p", 0x1000, 0x1FFF, "rx",
                                    vms=["71152709-d279-479e-b9e5-e41c6d4758bf", "web-*"],
                                    monitor=True)
        self.assertEqual(list(p.guests.uuids), ["71152709-d279-479e-b9e5-e41c6d4758bf"])
        self.assertEqual(list(p.guests.names), ["web-*"])
        self.assertEqual(p.mode, kc.policy_pb.MODE_MONITOR)
        self.assertEqual(p.WhichOneof("rule"), "protect_pages")


class ErrorTest(unittest.TestCase):
    def test_rpc_errors_keep_code_and_message(self):
        class FakeRpcError(grpc.RpcError):
            def code(self):
                return grpc.StatusCode.NOT_FOUND

            def details(self):
                return "no guest 'x'"
        e = kc._wrap(FakeRpcError())
        self.assertIsInstance(e, kc.NotFound)
        self.assertEqual(e.code, grpc.StatusCode.NOT_FOUND)
        self.assertEqual(str(e), "NOT_FOUND: no guest 'x'")

    def test_drop_modes(self):
        class FakeCall:
            def __init__(self, messages):
                self.messages = iter(messages)

            def __next__(self):
                return next(self.messages)

            def cancel(self):
                pass

            def cancelled(self):
                return False

        def messages():
            event = kc.pb.EventMessage()
            event.event.id = 7
            notice = kc.pb.EventMessage()
            notice.dropped.dropped = 3
            notice.dropped.dropped_total = 5
            return [event, notice, event]

        items = list(kc.EventStream(FakeCall(messages()), "yield"))
        self.assertEqual(items[1], kc.Dropped(3, 5))
        ignored = kc.EventStream(FakeCall(messages()), "ignore")
        self.assertEqual([i.id for i in ignored], [7, 7])
        self.assertEqual(ignored.dropped_total, 5)
        raising = kc.EventStream(FakeCall(messages()), "raise")
        next(raising)
        with self.assertRaises(kc.EventsDropped) as cm:
            next(raising)
        self.assertEqual((cm.exception.dropped, cm.exception.dropped_total), (3, 5))


class TlsOptionsTest(unittest.TestCase):
    """Client(ca=, cert=, key=): checked before any connection."""

    def test_unix_target_takes_no_certificates(self):
        with self.assertRaisesRegex(ValueError, "peer credentials"):
            kc.Client("unix:/run/kvmid/api.sock", ca=b"pem")
        with self.assertRaisesRegex(ValueError, "peer credentials"):
            kc.Client("/run/kvmid/api.sock", cert=b"c", key=b"k")

    def test_cert_and_key_go_together(self):
        with self.assertRaisesRegex(ValueError, "cert and key"):
            kc.Client("127.0.0.1:1", ca=b"pem", cert=b"c")

    def test_unreadable_file_is_named(self):
        with self.assertRaisesRegex(ValueError, "ca: cannot read /nonexistent/ca.pem"):
            kc.Client("127.0.0.1:1", ca="/nonexistent/ca.pem")

    def test_tls_and_plaintext_channels(self):
        with tempfile.NamedTemporaryFile(dir="/tmp") as ca:
            ca.write(b"-----BEGIN CERTIFICATE-----\n")
            ca.flush()
            client = kc.Client("127.0.0.1:1", ca=ca.name)
            self.assertTrue(client.tls)
            client.close()
        client = kc.Client("127.0.0.1:1")
        self.assertFalse(client.tls)
        client.close()

    def test_kvmictl_refuses_certificates_for_the_unix_socket(self):
        r = run_ctl("--target", "unix:/nonexistent/api.sock", "--cert", "c.pem", "--key", "k.pem",
                    "vms")
        self.assertEqual(r.returncode, 2)
        self.assertIn("--cert/--key apply to a HOST:PORT target", r.stderr)


class KvmictlTest(unittest.TestCase):
    def test_event_flags_build_the_filter(self):
        args = ctl.make_parser().parse_args(
            ["events", "--vm", "a,b", "--vm", "c", "--type", "cr", "--cr", "0,4", "--msr",
             "0x176", "--gpa", "0x1000+0x1000", "--access", "w", "--not-type", "pf"])
        allow = ctl.build_filter(ctl._flatten(args.vm), ctl._flatten(args.type),
                                 ctl._flatten(args.vcpu), ctl._flatten(args.cr),
                                 ctl._flatten(args.msr), args.gpa, args.access)
        self.assertEqual(list(allow.vms), ["a", "b", "c"])
        self.assertEqual(list(allow.crs), [0, 4])
        self.assertEqual((allow.gpa_first, allow.gpa_last), (0x1000, 0x1FFF))
        self.assertEqual(allow.access, "w")
        self.assertEqual(list(ctl._flatten(args.deny_type)), [kc.policy_pb.EVENT_PF])
        self.assertIsNone(ctl.build_filter([], [], [], [], [], None, None))

    def test_formatting(self):
        self.assertEqual(ctl.table([["a", 1]], ["NAME", "N"]), "NAME  N\na     1")
        dump = ctl.hexdump(b"ABC\x00" * 5, 0x1000)
        self.assertIn("0000000000001000  41 42 43 00", dump)
        self.assertIn("|ABC.ABC.ABC.ABC.|", dump)
        e = kc.pb.Event(vm_name="vm", vcpu=1, type=kc.policy_pb.EVENT_MSR,
                        action=kc.policy_pb.ACTION_KEEP_OLD, kept_old_value=True,
                        decided_by="policy:lstar")
        e.msr.msr = 0xC0000082
        row = ctl.event_row(e)
        self.assertIn("msr 0xc0000082", row)
        self.assertIn("KEEP_OLD (old value kept)", row)
        self.assertTrue(row.startswith("- "), row)  # no time: an older kvmid
        e.time.FromJsonString("2026-12-05T08:11:50.123456789Z")
        e.node = "hv-7"
        row = ctl.event_row(e)
        self.assertTrue(row.startswith("2026-12-05T08:11:50.123456Z "), row)
        self.assertTrue(row.endswith(" hv-7"), row)
        as_json = json.loads(ctl.to_json(e))
        self.assertEqual(as_json["time"], "2026-12-05T08:11:50.123456789Z")
        self.assertEqual(as_json["node"], "hv-7")
        # Event.latency is a Duration: printed in microseconds, canonical JSON in seconds.
        e.latency.FromNanoseconds(15250)
        self.assertIn(" 15us ", ctl.event_row(e))
        self.assertEqual(kc.event_latency_us(e), 15)
        self.assertEqual(json.loads(ctl.to_json(e))["latency"], "0.000015250s")

    def test_vm_start_time_is_a_timestamp(self):
        vm = kc.pb.VM(name="web-1")
        self.assertIsNone(kc.vm_start_time(vm))  # QEMU sent none
        vm.start_time.FromSeconds(1700000000)
        self.assertEqual(kc.vm_start_time(vm).isoformat(), "2023-11-14T22:13:20+00:00")
        as_json = json.loads(ctl.to_json(vm))  # proto field names or lowerCamel: either
        self.assertEqual(as_json.get("startTime", as_json.get("start_time")),
                         "2023-11-14T22:13:20Z")

    def test_translation_lines_and_paging_modes(self):
        self.assertEqual(kc.paging_mode("4level"), kc.pb.PAGING_MODE_4LEVEL)
        self.assertEqual(kc.paging_mode("PAGING_MODE_PAE"), kc.pb.PAGING_MODE_PAE)
        self.assertEqual(kc.paging_mode(5), kc.pb.PAGING_MODE_5LEVEL)
        self.assertEqual(kc.paging_mode_name(kc.pb.PAGING_MODE_32BIT), "32bit")
        for bad in ("6level", 0, 99):
            with self.assertRaises(ValueError):
                kc.paging_mode(bad)
        t = kc.pb.TranslateAddressResponse(
            present=True, gpa=0x5123, page_size=2 << 20, writable=True, user=False,
            executable=False, level=2, level_name="PDE", mode=kc.pb.PAGING_MODE_4LEVEL,
            cr3=0x1000, cached=True)
        self.assertEqual(ctl.translation_line(0xffff888000005123, t),
                         "0xffff888000005123 -> 0x5123  2 MiB page, rw- kernel, PDE  "
                         "(4level paging, cr3 0x1000, cached)")
        t = kc.pb.TranslateAddressResponse(present=False, level=4, level_name="PML4E", entry=0,
                                           mode=kc.pb.PAGING_MODE_5LEVEL, cr3=0x2000)
        self.assertEqual(ctl.translation_line(0x1000, t),
                         "0x1000 not mapped: not present at PML4E 0x0  (5level paging, cr3 0x2000)")
        t.reserved_bits = True
        self.assertIn("reserved bits set in PML4E", ctl.translation_line(0x1000, t))
        args = ctl.make_parser().parse_args(["translate", "vm", "0x1000", "--cr3", "0x5000",
                                             "--mode", "pae"])
        self.assertEqual((args.gva, args.cr3, args.mode), (0x1000, 0x5000, kc.pb.PAGING_MODE_PAE))
        r = run_ctl("translate", "vm", "0x1000", "--cr3", "1", "--mode", "7level")
        self.assertEqual(r.returncode, 2)
        self.assertIn("unknown paging mode", r.stderr)

    def test_help_and_usage_errors(self):
        r = run_ctl("--help")
        self.assertEqual(r.returncode, 0)
        for command in ("vms", "vm", "events", "policies", "apply", "delete"):
            self.assertIn(command, r.stdout)
        r = run_ctl("events", "--help")
        self.assertEqual(r.returncode, 0)
        self.assertIn("--gpa RANGE", r.stdout)
        r = run_ctl("events", "--type", "syscall")
        self.assertEqual(r.returncode, 2)
        self.assertIn("unknown event type 'syscall'", r.stderr)
        r = run_ctl("events", "--access", "q")
        self.assertEqual(r.returncode, 2)
        self.assertIn("not made of r, w, x", r.stderr)
        self.assertEqual(run_ctl().returncode, 2)

    def test_bad_policy_files_exit_1_before_any_call(self):
        r = run_ctl("--target", "unix:/nonexistent/api.sock", "apply", "/nonexistent.textproto")
        self.assertEqual(r.returncode, 1)
        self.assertIn("cannot read /nonexistent.textproto", r.stderr)
        r = run_ctl("--target", "unix:/nonexistent/api.sock", "apply", "-",
                    stdin='name: "x" protect_pages { bogus: 1 }')
        self.assertEqual(r.returncode, 1)
        self.assertIn("is not a Policy", r.stderr)
        r = run_ctl("--target", "unix:/nonexistent/api.sock", "apply", "-",
                    stdin='lock_msr { msr: 0x176 }')
        self.assertEqual(r.returncode, 1)
        self.assertIn("has no name", r.stderr)

    def test_unreachable_daemon_exits_2_with_a_hint(self):
        with tempfile.TemporaryDirectory(dir="/tmp") as d:
            r = run_ctl("--target", "unix:%s/api.sock" % d, "vms")
        self.assertEqual(r.returncode, 2)
        self.assertIn("cannot connect to kvmid", r.stderr)
        self.assertIn("hint:", r.stderr)


class BulkMemoryTest(unittest.TestCase):
    def test_sizes_take_units_and_refuse_zero(self):
        self.assertEqual(ctl._size("4096"), 4096)
        self.assertEqual(ctl._size("0x1000"), 4096)
        self.assertEqual(ctl._size("64K"), 64 << 10)
        self.assertEqual(ctl._size("16m"), 16 << 20)
        self.assertEqual(ctl._size("1G"), 1 << 30)
        with self.assertRaisesRegex(ValueError, "above 0"):
            ctl._size("0")

    def test_dump_arguments(self):
        args = ctl.make_parser().parse_args(["dump", "vm", "--out", "f", "--size", "2M"])
        self.assertEqual((args.gpa, args.size, args.chunk), (0, 2 << 20, kc.STREAM_CHUNK_BYTES))
        self.assertIsNone(args.progress)  # decided by whether stderr is a terminal
        r = run_ctl("dump", "vm")
        self.assertEqual(r.returncode, 2)
        self.assertIn("--out", r.stderr)

    def test_progress_bar_and_zero_fill(self):
        import io
        out = io.StringIO()
        bar = ctl.Progress(out)
        bar(1 << 20, 4 << 20, final=True)
        self.assertIn("25.0%", out.getvalue())
        self.assertIn("1/4 MiB", out.getvalue())
        zeros = io.BytesIO()
        kc._write_zeros(zeros, (1 << 20) + 5)
        self.assertEqual(zeros.getvalue(), bytes((1 << 20) + 5))

    def test_write_stream_needs_a_size_for_pieces(self):
        with kc.Client("unix:/nonexistent/kvmid.sock", connect_timeout=0.1) as client:
            with self.assertRaisesRegex(ValueError, "size"):
                client.write_physical_stream("vm", 0, iter([b"x"]))


if __name__ == "__main__":
    unittest.main()
