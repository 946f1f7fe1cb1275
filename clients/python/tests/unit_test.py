"""kvmi_client and kvmictl without a daemon: parsing, filters, policy files, formatting, exit
codes of local failures. Runs from clients/python's parent with the generated stubs on the path
(tests/run_python_test.sh)."""

import contextlib
import importlib.machinery
import importlib.util
import io
import json
import shutil
import signal
import os
import subprocess
import sys
import tempfile
import time
import unittest

import grpc

HERE = os.path.dirname(os.path.abspath(__file__))
CLIENT_DIR = os.path.dirname(HERE)
KVMICTL = os.path.join(CLIENT_DIR, "kvmictl")
sys.path.insert(0, CLIENT_DIR)

import kvmi_client as kc  # noqa: E402
from tests.test_support import wait_for  # noqa: E402


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


class FakeCall:
    """A gRPC streaming call that yields `messages`, then ends."""

    def __init__(self, messages):
        self.messages = iter(messages)

    def __next__(self):
        return next(self.messages)

    def cancel(self):
        pass

    def cancelled(self):
        return False

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
        self.assertEqual(kc.event_type("cr"), kc.policy_pb.EVENT_TYPE_CR)
        self.assertEqual(kc.event_type("EVENT_TYPE_PF"), kc.policy_pb.EVENT_TYPE_PF)
        self.assertEqual(kc.event_type("create-vcpu"), kc.policy_pb.EVENT_TYPE_CREATE_VCPU)
        self.assertEqual(kc.event_type("3"), kc.policy_pb.EVENT_TYPE_MSR)
        with self.assertRaisesRegex(ValueError, "one of: UNHOOK, CR"):
            kc.event_type("syscall")
        self.assertEqual(kc.event_type_name(kc.policy_pb.EVENT_TYPE_MSR), "MSR")
        self.assertEqual(kc.action_name(kc.policy_pb.ACTION_KEEP_OLD), "KEEP_OLD")
        self.assertEqual(kc.state_name(kc.pb.VM_STATE_HOOKED), "HOOKED")
        self.assertEqual(kc.event_type_name(99), "99")  # newer server, older stubs

    def test_event_filter_fields(self):
        f = kc.event_filter(vms=["a"], events=["msr", "cr"], vcpus=[1], crs=["0x4"],
                            msrs=["0xc0000082"], gpa="0x200000-0x20ffff", access="w")
        self.assertEqual(list(f.vms), ["a"])
        self.assertEqual(list(f.events), [kc.policy_pb.EVENT_TYPE_MSR, kc.policy_pb.EVENT_TYPE_CR])
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


class EventContextTest(unittest.TestCase):
    def test_context_bytes_on_the_event(self):
        event = kc.pb.Event(id=1)
        self.assertEqual(event.context.rip_bytes, b"")  # nothing asked
        event.context.rip.data = b"\x0f\x30"
        event.context.rip.complete = False
        event.context.rip.why = "gva 0x1002: not present at PTE"
        event.context.pf.data = b"\x01\x02\x03\x04"
        self.assertEqual(event.context.rip_bytes, b"\x0f\x30")
        self.assertEqual(event.context.rsp_bytes, b"")
        self.assertEqual(event.context.pf_bytes, b"\x01\x02\x03\x04")
        parsed = kc.pb.Event.FromString(event.SerializeToString())
        self.assertEqual(parsed.context.rip_bytes, b"\x0f\x30")
        self.assertFalse(parsed.context.rip.complete)

    def test_context_request_is_bounded(self):
        self.assertIsNone(kc.context_request())
        request = kc.context_request(rip_bytes=16, pf_bytes=kc.MAX_CONTEXT_BYTES)
        self.assertEqual((request.rip_bytes, request.rsp_bytes, request.pf_bytes), (16, 0, 256))
        with self.assertRaisesRegex(ValueError, "rsp_bytes: 257"):
            kc.context_request(rsp_bytes=257)


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
        def messages():
            event = kc.pb.StreamEventsResponse()
            event.event.id = 7
            notice = kc.pb.StreamEventsResponse()
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

        beat = kc.pb.StreamEventsResponse()
        beat.heartbeat.last_event_id = 6
        beat.heartbeat.time.FromSeconds(1700000000)
        skipping = kc.EventStream(FakeCall([beat, messages()[0], beat]), "yield")
        self.assertEqual([i.id for i in skipping], [7])  # heartbeats skipped by default...
        self.assertEqual(skipping.last_heartbeat.last_event_id, 6)  # ...but recorded
        yielding = list(kc.EventStream(FakeCall([beat, messages()[0]]), "yield", heartbeats=True))
        self.assertIsInstance(yielding[0], kc.Heartbeat)
        self.assertEqual(yielding[0].last_event_id, 6)
        self.assertEqual(yielding[0].time.year, 2023)
        self.assertEqual(yielding[1].id, 7)


class HandlerBatchTest(unittest.TestCase):
    """Attach batches: events that come as one AttachResponse.events are yielded one by one, and
    verdicts that queued meanwhile go out as one AttachRequest.verdicts, in order."""

    class Stub:
        def __init__(self, messages):
            self.messages = messages
            self.requests = None

        def Attach(self, requests):
            self.requests = requests
            return FakeCall(self.messages)

    def test_batched_events_one_by_one_and_queued_verdicts_in_one_message(self):
        claimed = kc.pb.AttachResponse()
        claimed.claimed.owner = "client:t#1"
        batch = kc.pb.AttachResponse()
        for event_id in (1, 2, 3):
            batch.events.events.add(id=event_id)
        single = kc.pb.AttachResponse()
        single.event.id = 4
        stub = self.Stub([claimed, batch, single])
        handler = kc.Handler(stub, kc.pb.Claim(handler_id="t", max_batch=8))
        self.assertEqual(next(stub.requests).claim.max_batch, 8)
        self.assertEqual([handler.next_event(timeout=5).id for _ in range(4)], [1, 2, 3, 4])
        for event_id in (1, 2, 3):
            handler.answer(event_id, "continue")
        sent = next(stub.requests)
        self.assertEqual(sent.WhichOneof("message"), "verdicts")
        self.assertEqual([v.event_id for v in sent.verdicts.verdicts], [1, 2, 3])
        handler.answer(4, "retry")
        sent = next(stub.requests)
        self.assertEqual(sent.WhichOneof("message"), "verdict")  # alone: a plain verdict
        self.assertEqual(sent.verdict.event_id, 4)
        # A command queued among verdicts keeps its place; the end of the stream ends it.
        handler.answer(5, "continue")
        handler.answer(6, "continue")
        handler._outgoing.put(kc.pb.AttachRequest(command=kc.pb.Command(id=77)))
        handler.answer(7, "continue")
        handler._outgoing.put(handler._DONE)
        sent = [next(stub.requests) for _ in range(3)]
        self.assertEqual([v.event_id for v in sent[0].verdicts.verdicts], [5, 6])
        self.assertEqual(sent[1].command.id, 77)
        self.assertEqual(sent[2].verdict.event_id, 7)
        with self.assertRaises(StopIteration):
            next(stub.requests)

    def test_without_max_batch_every_verdict_is_a_message_of_its_own(self):
        claimed = kc.pb.AttachResponse()
        claimed.claimed.owner = "client:t#2"
        stub = self.Stub([claimed])
        handler = kc.Handler(stub, kc.pb.Claim(handler_id="t"))
        next(stub.requests)  # the claim
        handler.answer(1, "continue")
        handler.answer(2, "continue")
        first, second = next(stub.requests), next(stub.requests)
        self.assertEqual((first.verdict.event_id, second.verdict.event_id), (1, 2))


class StreamRequestTest(unittest.TestCase):
    """What Client.events sends, with a stub that records the request."""

    class Stub:
        def __init__(self):
            self.requests = []

        def StreamEvents(self, request):
            self.requests.append(request)
            return iter(())

    def request(self, **kwargs):
        client = kc.Client("unix:/nonexistent")
        client._ready = True
        client._stub = self.Stub()
        client.events(**kwargs)
        return client._stub.requests[-1]

    def test_filters_heartbeat_and_fields(self):
        one = kc.event_filter(events=["cr"])
        r = self.request(allow=one)  # one filter: the convenience
        self.assertEqual(list(r.allow), [one])
        self.assertEqual(len(r.deny), 0)
        self.assertFalse(r.HasField("heartbeat_interval"))  # kvmid's default
        self.assertFalse(r.HasField("field_mask"))
        two = [kc.event_filter(events=["cr"]), kc.event_filter(vms=["a"])]
        r = self.request(allow=two, deny=[kc.event_filter(vcpus=[1])], heartbeat=0.25,
                         fields=["vm_name", "type"], resume_after=9)
        self.assertEqual(list(r.allow), two)
        self.assertEqual(list(r.deny[0].vcpus), [1])
        self.assertEqual(r.heartbeat_interval.ToNanoseconds(), 250000000)
        self.assertEqual(list(r.field_mask.paths), ["vm_name", "type"])
        self.assertEqual(r.resume_after, 9)
        r = self.request(heartbeat=0)
        self.assertTrue(r.HasField("heartbeat_interval"))  # explicitly none
        self.assertEqual(r.heartbeat_interval.ToNanoseconds(), 0)
        with self.assertRaises(TypeError):
            self.request(allow=["cr"])


class PagingTest(unittest.TestCase):
    """list_vms()/list_policies() follow next_page_token to the end (a stub plays kvmid)."""

    class PagedStub:
        def __init__(self, items, make_response, field):
            self.items, self.make_response, self.field = items, make_response, field
            self.requests = []

        def __call__(self, request, timeout=None):
            self.requests.append((request.page_size, request.page_token))
            start = int(request.page_token or 0)
            end = min(start + (request.page_size or 2), len(self.items))
            response = self.make_response()
            getattr(response, self.field).extend(self.items[start:end])
            if end < len(self.items):
                response.next_page_token = str(end)
            return response

    def client_with(self, **methods):
        client = kc.Client("unix:/nonexistent/kvmid.sock")
        client._ready = True  # no daemon: the stub answers

        class Stub:
            pass
        stub = Stub()
        for name, method in methods.items():
            setattr(stub, name, method)
        client._stub = stub
        return client

    def test_list_vms_and_list_policies_iterate_every_page(self):
        vms = [kc.pb.VM(name="vm-%d" % i, uuid="00000000-0000-0000-0000-%012d" % i)
               for i in range(5)]
        policies = [kc.pb.PolicyStatus(policy=kc.policy_pb.Policy(name="p%d" % i),
                                       etag="e%d" % i) for i in range(7)]
        list_vms = self.PagedStub(vms, kc.pb.ListVMsResponse, "vms")
        list_policies = self.PagedStub(policies, kc.pb.ListPoliciesResponse, "policies")
        client = self.client_with(ListVMs=list_vms, ListPolicies=list_policies)
        self.assertEqual([vm.name for vm in client.list_vms()], ["vm-%d" % i for i in range(5)])
        self.assertEqual(list_vms.requests, [(0, ""), (0, "2"), (0, "4")])
        self.assertEqual([s.etag for s in client.list_policies(page_size=3)],
                         ["e%d" % i for i in range(7)])
        self.assertEqual(list_policies.requests, [(3, ""), (3, "3"), (3, "6")])
        self.assertEqual(len(client.policies()), 7)

    def test_apply_and_delete_pass_etag_and_flags(self):
        seen = []

        def apply(request, timeout=None):
            seen.append(request)
            return kc.pb.ApplyPolicyResponse(replaced=bool(request.etag), etag="next")

        def delete(request, timeout=None):
            seen.append(request)
            return kc.pb.DeletePolicyResponse(overrode_config=request.override_config)
        client = self.client_with(ApplyPolicy=apply, DeletePolicy=delete)
        response = client.apply_policy('name: "x" mode: MODE_ENFORCE lock_msr { msr: 0x176 }',
                                       etag="e1", override_config=True)
        self.assertEqual((response.replaced, response.etag), (True, "next"))
        self.assertEqual((seen[0].etag, seen[0].allow_replace, seen[0].override_config),
                         ("e1", False, True))
        client.apply_policy({"name": "y", "mode": "MODE_MONITOR", "lockMsr": {"msr": 374}},
                            allow_replace=True)
        self.assertTrue(seen[1].allow_replace)
        self.assertTrue(client.delete_policy("x", etag="e2", override_config=True).overrode_config)
        self.assertEqual((seen[2].name, seen[2].etag), ("x", "e2"))

    def test_already_exists_has_its_own_error_class(self):
        class FakeRpcError(grpc.RpcError):
            def code(self):
                return grpc.StatusCode.ALREADY_EXISTS

            def details(self):
                return "policy 'x' exists (etag 1-2)"
        error = kc._wrap(FakeRpcError())
        self.assertIsInstance(error, kc.AlreadyExists)
        self.assertIn("etag 1-2", error.message)

    def test_kvmictl_page_size_is_checked(self):
        result = run_ctl("vms", "--page-size", "-1")
        self.assertEqual(result.returncode, 3)  # a usage error
        self.assertIn("page size", result.stderr)


class CloseTest(unittest.TestCase):
    """Client.close(): a Ctrl-C while grpcio closes the channel waits for the close."""

    class InterruptedChannel:
        def __init__(self):
            self.closed = False

        def close(self):
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of the close
            time.sleep(0.2)  # the handler runs here if nothing holds it
            self.closed = True

    def test_an_interrupt_during_close_comes_after_it(self):
        client = kc.Client("127.0.0.1:1")
        client._channel.close()
        client._channel = channel = self.InterruptedChannel()
        before = signal.getsignal(signal.SIGINT)
        with self.assertRaises(KeyboardInterrupt):
            client.close()
        self.assertTrue(channel.closed)  # the close finished before the KeyboardInterrupt
        self.assertIs(signal.getsignal(signal.SIGINT), before)

    def test_a_close_without_interrupt_keeps_the_handler(self):
        client = kc.Client("127.0.0.1:1")
        before = signal.getsignal(signal.SIGINT)
        client.close()
        self.assertIs(signal.getsignal(signal.SIGINT), before)


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
        self.assertEqual(r.returncode, 3)
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
        self.assertEqual(list(ctl._flatten(args.deny_type)), [kc.policy_pb.EVENT_TYPE_PF])
        self.assertIsNone(ctl.build_filter([], [], [], [], [], None, None))

    def test_event_flags_make_allow_and_deny_lists(self):
        args = ctl.make_parser().parse_args(
            ["events", "--type", "msr", "--allow", "type=cr;cr=0,4;vm=web-1",
             "--allow", "gpa=0x1000+0x1000;access=w", "--not-vm", "db", "--not-type", "pf",
             "--deny", "vcpu=3", "--heartbeat", "2.5", "--fields", "vm_name,type",
             "--fields", "cr"])
        allow, deny = ctl.event_filters(args)
        self.assertEqual(len(allow), 3)
        self.assertEqual(list(allow[0].events), [kc.policy_pb.EVENT_TYPE_MSR])
        self.assertEqual((list(allow[1].events), list(allow[1].crs), list(allow[1].vms)),
                         ([kc.policy_pb.EVENT_TYPE_CR], [0, 4], ["web-1"]))
        self.assertEqual((allow[2].gpa_first, allow[2].gpa_last, allow[2].access),
                         (0x1000, 0x1FFF, "w"))
        # --not-vm and --not-type leave out each on its own (two deny filters, not one AND).
        self.assertEqual([list(f.vms) for f in deny], [["db"], [], []])
        self.assertEqual(list(deny[1].events), [kc.policy_pb.EVENT_TYPE_PF])
        self.assertEqual(list(deny[2].vcpus), [3])
        self.assertEqual(args.heartbeat, 2.5)
        self.assertEqual(ctl._flatten(args.fields), ["vm_name", "type", "cr"])
        none_allow, none_deny = ctl.event_filters(ctl.make_parser().parse_args(["events"]))
        self.assertEqual((none_allow, none_deny), ([], []))

    def test_bad_filter_specs_are_refused(self):
        for spec, why in [("colour=red", "unknown key"), ("type", "KEY=VALUE"),
                          ("type=nope", "nope"), ("access=q", "r, w, x"), ("", "empty filter")]:
            with self.assertRaises(ValueError) as cm:
                ctl.parse_filter_spec(spec)
            self.assertIn(why, str(cm.exception).lower() if why.islower() else str(cm.exception))
        for bad in (["--heartbeat", "-1"], ["--heartbeat", "nan"], ["--allow", "cr=0;x=1"]):
            with self.assertRaises(SystemExit) as cm, open(os.devnull, "w") as devnull:
                old, sys.stderr = sys.stderr, devnull
                try:
                    ctl.make_parser().parse_args(["events"] + bad)
                finally:
                    sys.stderr = old
            self.assertEqual(cm.exception.code, 3)  # a usage error

    def test_formatting(self):
        self.assertEqual(ctl.table([["a", 1]], ["NAME", "N"]), "NAME  N\na     1")
        dump = ctl.hexdump(b"ABC\x00" * 5, 0x1000)
        self.assertIn("0000000000001000  41 42 43 00", dump)
        self.assertIn("|ABC.ABC.ABC.ABC.|", dump)
        e = kc.pb.Event(vm_name="vm", vcpu=1, type=kc.policy_pb.EVENT_TYPE_MSR,
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
        self.assertEqual(r.returncode, ctl.EXIT_USAGE)
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
        self.assertEqual(r.returncode, 3)
        self.assertIn("unknown event type 'syscall'", r.stderr)
        r = run_ctl("events", "--access", "q")
        self.assertEqual(r.returncode, 3)
        self.assertIn("not made of r, w, x", r.stderr)
        self.assertEqual(run_ctl().returncode, 3)

    def test_bad_policy_files_exit_5_before_any_call(self):
        r = run_ctl("--target", "unix:/nonexistent/api.sock", "apply", "/nonexistent.textproto")
        self.assertEqual(r.returncode, 5)
        self.assertIn("cannot read /nonexistent.textproto", r.stderr)
        r = run_ctl("--target", "unix:/nonexistent/api.sock", "apply", "-",
                    stdin='name: "x" protect_pages { bogus: 1 }')
        self.assertEqual(r.returncode, 5)
        self.assertIn("is not a Policy", r.stderr)
        r = run_ctl("--target", "unix:/nonexistent/api.sock", "apply", "-",
                    stdin='lock_msr { msr: 0x176 }')
        self.assertEqual(r.returncode, 5)
        self.assertIn("has no name", r.stderr)

    def test_unreachable_daemon_exits_4_with_a_hint(self):
        with tempfile.TemporaryDirectory(dir="/tmp") as d:
            r = run_ctl("--target", "unix:%s/api.sock" % d, "vms")
        self.assertEqual(r.returncode, 4)
        self.assertIn("cannot connect to kvmid", r.stderr)
        self.assertIn("hint:", r.stderr)


def ctl_main(*argv):
    """kvmictl's main() in this process: (exit status, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = ctl.main(list(argv))
        except SystemExit as e:
            status = e.code
    return status, err.getvalue()


class ExitStatusTest(unittest.TestCase):
    """One exit status per kind of failure, listed in --help."""

    def test_codes_are_distinct_and_listed_in_help(self):
        codes = [ctl.EXIT_OK, ctl.EXIT_REFUSED, ctl.EXIT_ENVIRONMENT, ctl.EXIT_USAGE,
                 ctl.EXIT_UNREACHABLE, ctl.EXIT_LOCAL, ctl.EXIT_INTERRUPTED]
        self.assertEqual(len(set(codes)), len(codes))
        self.assertEqual(ctl.EXIT_ENVIRONMENT, 2)  # issue 12: "client environment broken" = 2
        helped = run_ctl("--help")
        self.assertEqual(helped.returncode, 0)
        for code in codes:
            self.assertRegex(helped.stdout, r"(?m)^  %d +\S" % code)
        self.assertIn("python3-grpcio", helped.stdout)

    def test_bad_arguments_are_usage_errors_naming_the_option(self):
        target = ("--target", "unix:/nonexistent/api.sock")
        cases = [
            (["--timeout", "0", "vms"], "--timeout"),
            (["--timeout", "-1", "vms"], "--timeout"),
            (["--timeout", "nan", "vms"], "--timeout"),
            (["--timeout", "inf", "vms"], "--timeout"),
            (["--timeout", "soon", "vms"], "--timeout"),
            (["events", "--count", "-5"], "--count"),
            (["events", "--count", "0"], "--count"),
            (["events", "--duration", "0"], "--duration"),
            (["events", "--duration", "-3"], "--duration"),
            (["events", "--hint-after", "-1"], "--hint-after"),
            (["events", "--max-queue", "-1"], "--max-queue"),
            (["events", "--vcpu", "-1"], "--vcpu"),
            (["events", "--vcpu", "0,x"], "--vcpu"),
            (["events", "--vcpu", str(1 << 32)], "--vcpu"),
            (["events", "--msr", "-0x10"], "--msr"),
            (["events", "--msr", "0x100000000"], "--msr"),
            (["events", "--cr", "-4"], "--cr"),
            (["events", "--gpa", "0xzz"], "--gpa"),
            (["events", "--gpa", "0x2000-0x1000"], "--gpa"),
            (["events", "--gpa", "0x10000000000000"], "--gpa"),
            (["events", "--gpa", "-1"], "--gpa"),
            (["events", "--type", "syscall"], "--type"),
            (["events", "--not-type", "cr,bogus"], "--not-type"),
            (["events", "--access", "q"], "--access"),
            (["watch", "--count", "-5"], "--count"),
            (["watch", "--duration", "0"], "--duration"),
            (["regs", "vm", "-1"], "vcpu"),
            (["regs", "vm", "one"], "vcpu"),
            (["read", "vm", "-5"], "gpa"),
            (["read", "vm", "0x1000", "0"], "size"),
            (["read", "vm", "0x1000", "16", "--vcpu", "-2"], "--vcpu"),
            (["translate", "vm", "0x1", "--cr3", "-1"], "--cr3"),
            (["translate", "vm", str(1 << 64)], "gva"),
            (["translate", "vm", "0x1000"], "--vcpu N or --cr3"),
            (["translate", "vm", "0x1000", "--vcpu", "0", "--cr3", "0x1000"], "exclude"),
            (["pause", "vm", "--vcpu", "-1"], "--vcpu"),
            (["arm", "vm", "--event", "nonsense"], "--event"),
            (["arm", "vm", "--vcpu", "x"], "--vcpu"),
            (["protect", "vm", "0x1000-0x10000000000000"], "RANGE"),
            (["dump", "vm", "--out", "f", "--size", "0"], "--size"),
            (["dump", "vm", "--out", "f", "--gpa", "-1"], "--gpa"),
            (["completion", "fish"], "shell"),
            (["no-such-command"], "COMMAND"),
            ([], "COMMAND"),
        ]
        for argv, named in cases:
            with self.subTest(argv=argv):
                status, err = ctl_main(*(target + tuple(argv)))
                self.assertEqual(status, ctl.EXIT_USAGE, err)
                self.assertIn(named, err)

    def test_good_arguments_parse(self):
        args = ctl.make_parser().parse_args(
            ["--timeout", "0.5", "events", "--count", "3", "--duration", "1.5", "--vcpu", "0,3",
             "--msr", "0xc0000082", "--gpa", "0x1000+0x1000", "--hint-after", "0",
             "--max-queue", "0"])
        self.assertEqual((args.timeout, args.count, args.duration, args.hint_after),
                         (0.5, 3, 1.5, 0))
        self.assertEqual(ctl._flatten(args.vcpu), [0, 3])
        args = ctl.make_parser().parse_args(["translate", "vm", "0xffffffffffffffff",
                                             "--vcpu", "1"])
        self.assertEqual(args.gva, (1 << 64) - 1)

    def test_local_files_and_unreachable_kvmid(self):
        status, err = ctl_main("--target", "127.0.0.1:1", "--ca", "/nonexistent/ca.pem", "vms")
        self.assertEqual(status, ctl.EXIT_LOCAL, err)
        self.assertIn("cannot read /nonexistent/ca.pem", err)
        status, err = ctl_main("--target", "127.0.0.1:1", "--cert", "c.pem", "vms")
        self.assertEqual(status, ctl.EXIT_USAGE, err)
        # Unreachable (4): test_unreachable_daemon_exits_4_with_a_hint.

    def test_missing_stubs_are_a_broken_environment(self):
        # A copy of the client without its generated kvmi/v1 modules (gen_protos.sh not run).
        with tempfile.TemporaryDirectory(dir="/tmp") as d:
            shutil.copy(KVMICTL, d)
            shutil.copy(os.path.join(CLIENT_DIR, "kvmi_client.py"), d)
            os.makedirs(os.path.join(d, "kvmi", "v1"))
            for pkg in ("kvmi", "kvmi/v1"):
                open(os.path.join(d, pkg, "__init__.py"), "w").close()
            env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
            r = subprocess.run(["/usr/bin/python3", os.path.join(d, "kvmictl"), "vms"],
                               capture_output=True, text=True, timeout=30, env=env)
        self.assertEqual(r.returncode, 2, r.stderr)
        self.assertIn("gen_protos.sh", r.stderr)


def event(action=kc.policy_pb.ACTION_CONTINUE, kept=False, vm="vm", decided="default"):
    e = kc.pb.Event(id=7, vm_name=vm, vcpu=1, type=kc.policy_pb.EVENT_TYPE_MSR, action=action,
                    kept_old_value=kept, decided_by=decided, rip=0xffffffff81000034,
                    node="hv-1")
    e.latency.FromMicroseconds(12)
    e.msr.msr = 0xC0000082
    e.msr.old_value = 0xFFFFFFFF81001600
    e.msr.new_value = 0xFFFFFFFF81000600
    e.time.FromJsonString("2026-12-05T08:11:50.123456Z")
    return e


class OutputTest(unittest.TestCase):
    def columns(self, header, line):
        """The text of each column of `line`, cut where the header's titles start."""
        starts = [header.index(h) for h in ctl.EVENT_COLUMNS]
        return [line[a:b] for a, b in zip(starts, starts[1:] + [None])]

    def test_verdicts_do_not_spill_into_the_next_column(self):
        out = io.StringIO()
        rows = ctl.StreamTable(ctl.EVENT_COLUMNS, ctl.event_min_widths(), out=out)
        rows.row(ctl.event_cells(event()))  # the short verdict first: no widening after it
        rows.row(ctl.event_cells(event(kc.policy_pb.ACTION_KEEP_OLD, kept=True,
                                       decided="policy:sysenter-eip-locked")))
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), 3, lines)  # one header: the known widths were enough
        header = lines[0]
        self.assertIn("  KEEP_OLD (old value kept)  policy:", lines[2])
        verdict = self.columns(header, lines[2])[ctl.EVENT_COLUMNS.index("VERDICT")]
        self.assertEqual(verdict.rstrip(), "KEEP_OLD (old value kept)")
        self.assertTrue(verdict.endswith("  "), verdict)
        decided = self.columns(header, lines[2])[ctl.EVENT_COLUMNS.index("DECIDED BY")]
        self.assertTrue(decided.startswith("policy:sysenter-eip-locked"), decided)
        time_cell = self.columns(header, lines[1])[0]
        self.assertEqual(time_cell.rstrip(), "2026-12-05T08:11:50.123456Z")

    def test_columns_widen_from_the_data(self):
        out = io.StringIO()
        rows = ctl.StreamTable(ctl.EVENT_COLUMNS, ctl.event_min_widths(), out=out)
        rows.row(ctl.event_cells(event(vm="a")))
        long_vm = "a-guest-with-a-rather-long-name"
        rows.row(ctl.event_cells(event(vm=long_vm, decided="handler:" + "h" * 40)))
        rows.row(ctl.event_cells(event(vm="b")))
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), 5, lines)  # the header again when VM widened
        header = lines[2]
        self.assertTrue(header.startswith("TIME"), lines)
        for line in lines[3:]:
            cells = self.columns(header, line)
            vm = cells[ctl.EVENT_COLUMNS.index("VM")]
            self.assertTrue(vm.endswith("  "), vm)  # never runs into VCPU
            self.assertEqual(cells[ctl.EVENT_COLUMNS.index("VCPU")].strip(), "1")
            self.assertEqual(cells[-1], "hv-1")

    def test_finished_tables_are_sized_from_their_cells(self):
        self.assertEqual(ctl.table([["KEEP_OLD (old value kept)", 1]], ["VERDICT", "N"]),
                         "VERDICT                    N\nKEEP_OLD (old value kept)  1")

    def test_json_is_protobufs_canonical_mapping(self):
        e = event(kc.policy_pb.ACTION_KEEP_OLD, kept=True)
        as_json = json.loads(ctl.to_json(e))
        self.assertEqual(as_json["vmName"], "vm")
        self.assertEqual(as_json["keptOldValue"], True)
        self.assertEqual(as_json["type"], "EVENT_TYPE_MSR")
        self.assertEqual(as_json["id"], "7")  # 64-bit integers as strings
        self.assertEqual(as_json["time"], "2026-12-05T08:11:50.123456Z")
        self.assertEqual(as_json["msr"]["oldValue"], str(0xFFFFFFFF81001600))
        self.assertNotIn("vcpuOnly", as_json)  # default values left out, as buf curl does
        self.assertFalse([k for k in as_json if "_" in k], as_json)
        # The same as protobuf's own JSON printer, and it parses back.
        self.assertEqual(as_json, json.loads(kc.json_format.MessageToJson(e)))
        back = kc.json_format.Parse(ctl.to_json(e), kc.pb.Event())
        self.assertEqual(back, e)

    def test_times(self):
        self.assertEqual(ctl.format_time(0), "-")
        self.assertEqual(ctl.format_time(1764922310), "2025-12-05T08:11:50Z")
        ts = kc.pb.Event().time
        self.assertEqual(ctl.format_time(ts), "-")
        ts.FromJsonString("2026-12-05T08:11:50.5Z")
        self.assertEqual(ctl.format_time(ts), "2026-12-05T08:11:50.500000Z")

    def test_silence_hint_once_per_silence(self):
        out = io.StringIO()
        hint = ctl.SilenceHint(0.2, "quiet for %(seconds)g s", out=out)
        try:
            wait_for(lambda: "quiet for" in out.getvalue(), 10, "the hint")
            said = out.getvalue()
            self.assertEqual(said, "kvmictl: quiet for 0.2 s\n")
            hint.seen()  # an event: the next silence is said again
            wait_for(lambda: out.getvalue().count("quiet for") == 2, 10, "the second hint")
        finally:
            hint.stop()
        quiet = io.StringIO()
        ctl.SilenceHint(0, "never %(seconds)s", out=quiet).stop()
        self.assertEqual(quiet.getvalue(), "")


class CompletionTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        r = run_ctl("completion", "bash")
        assert r.returncode == 0, r.stderr
        cls.script = r.stdout

    def complete(self, line, env=None):
        """What bash completes at the end of `line` with the script sourced."""
        driver = (self.script + '\nCOMP_LINE="$1"; COMP_POINT=${#1}; _kvmictl; '
                  'printf "%s\\n" "${COMPREPLY[@]}"\n')
        r = subprocess.run(["bash", "-c", driver, "bash", line], capture_output=True,
                           text=True, timeout=30, env=env)
        self.assertEqual(r.returncode, 0, r.stderr)
        return [w for w in r.stdout.splitlines() if w]

    def test_script_is_valid_bash(self):
        r = subprocess.run(["bash", "-n"], input=self.script, capture_output=True, text=True,
                           timeout=30)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("complete -o default -F _kvmictl kvmictl", self.script)

    def test_commands_options_and_values(self):
        self.assertIn("events", self.complete("kvmictl "))
        self.assertIn("completion", self.complete("kvmictl "))
        self.assertNotIn("__names", self.complete("kvmictl "))
        self.assertEqual(self.complete("kvmictl ev"), ["events"])
        self.assertEqual(self.complete("kvmictl --target unix:/x --timeout 3 ev"), ["events"])
        self.assertIn("--timeout", self.complete("kvmictl --ti"))
        self.assertEqual(self.complete("kvmictl events --ty"), ["--type"])
        self.assertIn("--hint-after", self.complete("kvmictl events --"))
        self.assertIn("msr", self.complete("kvmictl events --type "))
        self.assertEqual(self.complete("kvmictl events --type msr,c"),
                         ["msr,cr", "msr,create_vcpu"])
        self.assertEqual(self.complete("kvmictl events --type=p"), ["pf", "pause_vcpu"])
        self.assertEqual(self.complete("kvmictl translate vm 0x1 --vcpu 0 --mode 4"), ["4level"])
        self.assertEqual(self.complete("kvmictl completion "), ["bash"])

    def test_guest_names_come_from_kvmid_and_nothing_without_it(self):
        env = dict(os.environ, KVMID_TARGET="unix:/nonexistent/api.sock")
        self.assertEqual(self.complete("%s read --vcpu 1 " % KVMICTL, env=env), [])
        status, err = ctl_main("--target", "unix:/nonexistent/api.sock", "--timeout", "1",
                               "__names", "vms")
        self.assertEqual((status, err), (0, ""))


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
        self.assertEqual(r.returncode, 3)
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



class VirtualMemoryTest(unittest.TestCase):
    def test_write_arguments_and_data(self):
        args = ctl.make_parser().parse_args(["write", "vm", "0x1000", "--hex", "0f 30",
                                             "--virtual", "--vcpu", "1"])
        self.assertEqual((args.gpa, args.virtual, args.vcpu), (0x1000, True, 1))
        self.assertEqual(ctl._write_data(args), b"\x0f\x30")
        args.hex = "0x0f0b"
        self.assertEqual(ctl._write_data(args), b"\x0f\x0b")
        for bad in ("0g", "abc", ""):
            args.hex = bad
            with self.assertRaises(ctl.UsageError):
                ctl._write_data(args)
        with tempfile.NamedTemporaryFile() as f:
            f.write(b"\x90\x90")
            f.flush()
            args = ctl.make_parser().parse_args(["write", "vm", "0", "--file", f.name])
            self.assertEqual(ctl._write_data(args), b"\x90\x90")
        r = run_ctl("--target", "unix:/nonexistent/api.sock", "write", "vm", "0")
        self.assertEqual(r.returncode, 3)  # a usage error: nothing sent
        self.assertIn("--hex BYTES or --file PATH", r.stderr)
        r = run_ctl("--target", "unix:/nonexistent/api.sock", "write", "vm", "0", "--hex", "00",
                    "--vcpu", "0")
        self.assertEqual(r.returncode, 3)
        self.assertIn("need --virtual", r.stderr)
        r = run_ctl("--target", "unix:/nonexistent/api.sock", "write", "vm", "0", "--hex", "00",
                    "--virtual", "--vcpu", "-1")
        self.assertEqual(r.returncode, 3)
        self.assertIn("--vcpu", r.stderr)

    def test_a_virtual_write_that_did_not_write_every_page_raises_with_the_pages(self):
        response = kc.pb.WriteVirtualResponse(written=False, bytes_written=0, pages=[
            kc.pb.VirtualWritePage(gva=0x1000, size=4096, gpa=0x5000, writable=True,
                                   why="not written: another page of the range stopped the write"),
            kc.pb.VirtualWritePage(gva=0x2000, size=16, why="not present at PTE")])
        with self.assertRaises(kc.VirtualWriteFailed) as cm:
            kc._check_virtual_write(response)
        self.assertIs(cm.exception.response, response)
        self.assertIn("2 of 2 pages not written", cm.exception.message)
        self.assertIn("gva 0x2000: not present at PTE", cm.exception.message)
        ok = kc.pb.WriteVirtualResponse(written=True, bytes_written=3)
        self.assertIs(kc._check_virtual_write(ok), ok)

    def test_handler_reads_in_the_events_address_space(self):
        sent = {}

        class FakeHandler(kc.Handler):
            def __init__(self):  # no stream: command() is recorded
                pass

            def command(self, timeout=10.0, **request):
                sent.update(request)
                return "result"

        event = kc.pb.Event(vm_uuid="u-1", vm_name="web", vcpu=3, rip=0xffffffff81000000)
        self.assertEqual(FakeHandler().read_virtual(event, event.rip, 16), "result")
        request = sent["read_virtual"]
        self.assertEqual((request.vm, request.vcpu, request.gva, request.size),
                         ("u-1", 3, 0xffffffff81000000, 16))
        self.assertEqual(request.WhichOneof("space"), "vcpu")


if __name__ == "__main__":
    unittest.main()
