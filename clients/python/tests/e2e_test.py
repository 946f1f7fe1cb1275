"""End to end: the real kvmid and kvmi-sim guests (Bazel data deps), every RPC kvmid serves,
called from Python through kvmi_client and through kvmictl, and both examples.

Outside Bazel: KVMID_BIN=... KVMI_SIM_BIN=... /usr/bin/python3 tests/junit_runner.py
tests/e2e_test.py (from clients/python after gen_protos.sh); the defaults are the runfiles
paths, then bazel-out/k8-opt/bin.
"""

import contextlib
import datetime
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
CLIENT_DIR = os.path.dirname(HERE)
REPO = os.path.dirname(os.path.dirname(CLIENT_DIR))  # the runfiles root under Bazel
KVMICTL = os.path.join(CLIENT_DIR, "kvmictl")
EXAMPLES = os.path.join(CLIENT_DIR, "examples")
CONFIG = os.path.join(HERE, "testdata", "kvmid_test.textproto")
sys.path.insert(0, CLIENT_DIR)

import grpc  # noqa: E402

import kvmi_client as kc  # noqa: E402
from tests.test_support import stop_process, wait_for  # noqa: E402

VMS, VCPUS = 3, 2
DATA = (0x200000, 0x20FFFF)  # watched by the config's data-watch policy; the sims write there
LSTAR = 0xC0000082


def binary(env, relative):
    for path in (os.environ.get(env), os.path.join(REPO, relative),
                 os.path.join(REPO, "bazel-out/k8-opt/bin", relative)):
        if path and os.access(path, os.X_OK):
            return path
    raise unittest.SkipTest("no %s binary (set %s)" % (relative, env))


def take(stream, n, timeout=10.0):
    """The first n events of a stream (drop notices skipped), or fail after `timeout`."""
    timer = threading.Timer(timeout, stream.cancel)
    timer.daemon = True
    timer.start()
    events = []
    try:
        for item in stream:
            if isinstance(item, kc.Dropped):
                continue
            events.append(item)
            if len(events) >= n:
                break
    finally:
        timer.cancel()
        stream.cancel()
    if len(events) < n:
        raise AssertionError("got %d of %d events in %gs" % (len(events), n, timeout))
    return events


class Fleet:
    """kvmid + kvmi-sim in a short /tmp directory (UNIX socket paths are limited to 108 bytes,
    Bazel's TEST_TMPDIR is longer than that)."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="kvmipy-", dir="/tmp")
        self.api = os.path.join(self.dir, "api.sock")
        self.target = "unix:" + self.api
        self.procs = []
        kvmi_sock = os.path.join(self.dir, "kvmi.sock")
        cookie = os.path.join(self.dir, "cookie")
        with open(cookie, "w") as f:
            f.write("e2e-cookie")
        logs = os.environ.get("TEST_UNDECLARED_OUTPUTS_DIR", self.dir)
        self.kvmid_log = open(os.path.join(logs, "kvmid.log"), "w")
        self.sim_log = open(os.path.join(logs, "kvmi-sim.log"), "w")
        self.kvmid = self._start([
            binary("KVMID_BIN", "daemon/kvmid"), "--config=" + CONFIG,
            "--kvmi_socket=" + kvmi_sock, "--cookie_file=" + cookie, "--api_socket=" + self.api,
            "--state_dir=" + os.path.join(self.dir, "state"), "--node_name=e2e-node",
            "--log_events=none"], self.kvmid_log)
        wait_for(lambda: os.path.exists(kvmi_sock) and os.path.exists(self.api), 10,
                 "kvmid's sockets")
        self.sim = self._start([
            binary("KVMI_SIM_BIN", "kernel/sim/kvmi-sim"), "--connect=unix:" + kvmi_sock,
            "--cookie_file=" + cookie, "--vms=%d" % VMS, "--vcpus=%d" % VCPUS,
            "--scenario=mixed", "--rate=100", "--duration=0"], self.sim_log)

    def _start(self, argv, log):
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def stop(self):
        for proc in reversed(self.procs):  # guests first, then the daemon
            stop_process(proc)
        self.kvmid_log.close()
        self.sim_log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class E2ETest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.fleet = Fleet()
        try:
            cls.client = kc.Client(cls.fleet.target, timeout=10)

            policies = {"policy:lstar-locked", "policy:data-watch"}

            def hooked():
                # Hooked, and armed by the configured policies (leases follow the hook).
                vms = cls.client.list_vms()
                ready = [v for v in vms if v.state == kc.pb.VM_STATE_HOOKED
                         and policies <= {lease.owner for lease in v.leases}]
                return len(ready) == VMS and vms
            cls.vms = sorted(wait_for(hooked, 20, "%d hooked guests" % VMS), key=lambda v: v.name)
        except BaseException:
            cls.fleet.stop()
            raise

    @classmethod
    def tearDownClass(cls):
        cls.client.close()
        cls.fleet.stop()

    def ctl(self, *args, stdin=None, timeout=30):
        env = dict(os.environ, KVMID_TARGET=self.fleet.target)
        return subprocess.run([KVMICTL] + list(args), input=stdin, capture_output=True,
                              text=True, timeout=timeout, env=env)

    def assertCtlOk(self, result):
        self.assertEqual(result.returncode, 0, "kvmictl failed: %s" % result.stderr)
        return result.stdout

    def assertCtlFails(self, result, code, *texts):
        self.assertEqual(result.returncode, code, "stdout: %s\nstderr: %s"
                         % (result.stdout, result.stderr))
        for text in texts:
            self.assertIn(text, result.stderr)

    def name(self, i):
        return self.vms[i].name

    @contextlib.contextmanager
    def watching(self, vm, event, seconds=30):
        """StreamEvents for one guest's events of one type (kvmid's record, after the verdict),
        cancelled after `seconds` at most."""
        watch = self.client.events(allow=kc.event_filter(vms=[vm], events=[event]))
        timer = threading.Timer(seconds, watch.cancel)
        timer.daemon = True
        timer.start()
        try:
            yield watch
        finally:
            timer.cancel()
            watch.cancel()

    def assertDecided(self, watch, ids, decided_by, action="CONTINUE"):
        """kvmid's record of every event in `ids`, read from `watch`, names who decided it and
        the action applied."""
        seen = set()
        for item in watch:
            if isinstance(item, kc.Dropped) or item.id not in ids:
                continue
            self.assertEqual((item.decided_by, kc.action_name(item.action)), (decided_by, action))
            seen.add(item.id)
            if seen == ids:
                break
        self.assertEqual(seen, ids)

    # ---- guests -------------------------------------------------------------------------------

    def test_list_vms_shows_identity_state_and_leases(self):
        self.assertEqual([v.name for v in self.vms],
                         ["sim-vm-%04d" % i for i in range(VMS)])
        for vm in self.vms:
            self.assertEqual(vm.vcpu_count, VCPUS)
            self.assertEqual(vm.transport, "unix")
            self.assertEqual(len(vm.uuid), 36)
            self.assertIn("KVMI_GET_REGISTERS", vm.allowed_commands)
            owners = {lease.owner for lease in vm.leases}
            self.assertTrue({"policy:lstar-locked", "policy:data-watch"} <= owners, owners)
        self.assertEqual(dict(self.vms[0].labels), {"tier": "prod"})

    def test_get_vm_by_name_and_uuid_and_errors(self):
        by_name = self.client.get_vm(self.name(1))
        by_uuid = self.client.get_vm(by_name.uuid)
        self.assertEqual(by_uuid.name, self.name(1))
        self.assertEqual(by_uuid.state, kc.pb.VM_STATE_HOOKED)
        with self.assertRaises(kc.NotFound) as cm:
            self.client.get_vm("no-such-vm")
        self.assertEqual(cm.exception.code, grpc.StatusCode.NOT_FOUND)
        self.assertIn("no-such-vm", cm.exception.message)
        with self.assertRaises(kc.InvalidArgument) as cm:
            self.client.get_vm("")
        self.assertTrue(cm.exception.message.startswith("vm:"), cm.exception.message)

    # ---- events -------------------------------------------------------------------------------

    def test_stream_filters_by_vm_type_and_msr(self):
        vm = self.name(1)
        events = take(self.client.events(
            allow=kc.event_filter(vms=[vm], events=["msr"], msrs=[LSTAR])), 3)
        now = time.time()
        for e in events:
            self.assertEqual((e.vm_name, e.type, e.msr.msr), (vm, kc.policy_pb.EVENT_TYPE_MSR, LSTAR))
            # Stamped on arrival with the wall clock, and with the node.
            self.assertEqual(e.node, "e2e-node")
            self.assertTrue(e.HasField("time"))
            self.assertLess(abs(e.time.ToNanoseconds() / 1e9 - now), 30)
            self.assertEqual(e.action, kc.policy_pb.ACTION_KEEP_OLD)
            self.assertTrue(e.kept_old_value)
            self.assertEqual(e.decided_by, "policy:lstar-locked")
        self.assertEqual(len({e.id for e in events}), 3)

    def test_stream_pf_range_access_and_deny(self):
        first, last = DATA[0], DATA[0] + 0x7FFF
        events = take(self.client.events(
            allow=kc.event_filter(events=["pf", "msr"], gpa=(first, last), access="w"),
            deny=kc.event_filter(vms=[self.name(0)])), 4)
        for e in events:
            self.assertEqual(e.type, kc.policy_pb.EVENT_TYPE_PF)  # gpa/access only match PF events
            self.assertTrue(first <= e.pf.gpa <= last, hex(e.pf.gpa))
            self.assertEqual(e.pf.access, "w")
            self.assertNotEqual(e.vm_name, self.name(0))
            self.assertIn("data-watch", e.monitor_hits)

    def test_stream_with_registers(self):
        events = take(self.client.events(allow=kc.event_filter(events=["cr"], crs=[0]),
                                         registers=True), 2)
        for e in events:
            self.assertEqual(e.cr.cr, 0)
            self.assertTrue(e.HasField("registers"))
            self.assertNotEqual(e.registers.rip, 0)
            self.assertNotEqual(e.registers.cr4, 0)
        without = take(self.client.events(allow=kc.event_filter(events=["cr"])), 1)
        self.assertFalse(without[0].HasField("registers"))

    def test_stream_rejects_bad_filters_naming_the_field(self):
        cases = [
            ({"allow": kc.event_filter(gpa=(0x2000, 0x1000))}, "allow[0].gpa_first"),
            ({"deny": kc.event_filter(access="q")}, "deny[0].access"),
            ({"allow": [kc.event_filter(), kc.event_filter(vcpus=[70000])]}, "allow[1].vcpus"),
            ({"allow": [kc.event_filter()] * 17}, "allow"),
            ({"max_queue": 100000}, "max_queue"),
            ({"heartbeat": 0.001}, "heartbeat_interval"),
            ({"fields": ["vm_name", "colour"]}, "field_mask.paths[1]"),
        ]
        for kwargs, field in cases:
            with self.subTest(field=field):
                with self.assertRaises(kc.InvalidArgument) as cm:
                    next(iter(self.client.events(**kwargs)))
                self.assertTrue(cm.exception.message.startswith(field + ":"),
                                cm.exception.message)

    def test_stream_any_allow_filter_and_deny_wins(self):
        # CR0 writes of every guest, or LSTAR writes; but nothing from guest 0.
        events = take(self.client.stream_events(
            allow=[kc.event_filter(events=["cr"], crs=[0]),
                   kc.event_filter(events=["msr"], msrs=[LSTAR])],
            deny=[kc.event_filter(vms=[self.name(0)])]), 12)
        kinds = set()
        for e in events:
            self.assertNotEqual(e.vm_name, self.name(0))
            if e.type == kc.policy_pb.EVENT_TYPE_CR:
                self.assertEqual(e.cr.cr, 0)
            else:
                self.assertEqual((e.type, e.msr.msr), (kc.policy_pb.EVENT_TYPE_MSR, LSTAR))
            kinds.add(e.type)
        self.assertEqual(kinds, {kc.policy_pb.EVENT_TYPE_CR, kc.policy_pb.EVENT_TYPE_MSR})

    def test_stream_naming_an_unknown_guest_is_not_found_at_once(self):
        with self.assertRaises(kc.NotFound) as cm:
            next(iter(self.client.events(allow=kc.event_filter(vms=["no-such-vm"]))))
        self.assertIn("no guest 'no-such-vm'", cm.exception.message)
        with self.assertRaises(kc.NotFound):
            next(iter(self.client.events(deny=[kc.event_filter(vms=["no-such-vm"])])))

    def test_a_quiet_stream_sends_heartbeats(self):
        # CR2 writes are never trapped: nothing passes this filter.
        stream = self.client.events(allow=kc.event_filter(events=["cr"], crs=[2]),
                                    heartbeat=0.2, heartbeats=True)
        beats = take(stream, 3)
        for beat in beats:
            self.assertIsInstance(beat, kc.Heartbeat)
            self.assertLess(abs(beat.time.replace(tzinfo=datetime.timezone.utc).timestamp()
                                - time.time()), 30)
        # The guests keep running: the stream has looked at newer events each time.
        self.assertGreater(beats[-1].last_event_id, beats[0].last_event_id)
        # Skipped by default, but recorded.
        quiet = self.client.events(allow=kc.event_filter(events=["cr"], crs=[2]), heartbeat=0.2)
        timer = threading.Timer(1.0, quiet.cancel)
        timer.start()
        with quiet:
            self.assertEqual(list(quiet), [])
        timer.join()
        self.assertIsNotNone(quiet.last_heartbeat)

    def test_stream_field_mask_and_labels(self):
        vm = self.name(0)
        events = take(self.client.events(allow=kc.event_filter(vms=[vm], events=["cr"]),
                                         fields=["vm_name", "vm_labels", "type"]), 2)
        for e in events:
            self.assertEqual((e.vm_name, e.type), (vm, kc.policy_pb.EVENT_TYPE_CR))
            self.assertEqual(dict(e.vm_labels), {"tier": "prod"})
            self.assertNotEqual(e.id, 0)  # always sent
            self.assertFalse(e.HasField("cr"))
            self.assertFalse(e.HasField("time"))
            self.assertEqual((e.node, e.decided_by, e.vm_uuid), ("", "", ""))

    def test_slow_reader_gets_drop_notices(self):
        stream = self.client.events(max_queue=2)
        time.sleep(2.0)  # the guests keep running; kvmid counts what this stream misses
        notices = []
        deadline = time.monotonic() + 15
        with stream:
            for item in stream:
                if isinstance(item, kc.Dropped):
                    notices.append(item)
                    if len(notices) >= 2:
                        break
                if time.monotonic() > deadline:
                    break
        self.assertTrue(notices, "no DropNotice for a 2-event queue read late")
        self.assertGreater(notices[0].dropped, 0)
        self.assertEqual(stream.dropped_total, notices[-1].dropped_total)
        self.assertGreaterEqual(notices[-1].dropped_total, sum(n.dropped for n in notices))

        raising = self.client.events(max_queue=2, drops="raise")
        time.sleep(1.0)
        with self.assertRaises(kc.EventsDropped) as cm:
            with raising:
                for _ in raising:
                    pass
        self.assertGreater(cm.exception.dropped, 0)

    # ---- policies -----------------------------------------------------------------------------

    def test_policies_apply_list_replace_delete(self):
        name = "py-e2e-watch"
        policy = {"name": name, "description": "e2e", "mode": "MODE_MONITOR",
                  "action": "ACTION_CONTINUE", "guests": {"names": [self.name(2)]},
                  "protectPages": {"gpaFirst": str(DATA[0]), "gpaLast": str(DATA[1]),
                                   "allowed": "r"}}
        created = self.client.apply_policy(policy)
        self.assertFalse(created.replaced)
        self.assertTrue(created.etag)
        try:
            def hits():
                for s in self.client.policies():
                    if s.policy.name == name and s.counters.hits > 0:
                        return s
            status = wait_for(hits, 10, "hits on " + name)
            self.assertEqual(status.policy.protect_pages.allowed, "r")
            self.assertEqual(status.counters.enforced, 0)  # monitor mode never decides
            self.assertEqual(list(status.policy.guests.names), [self.name(2)])
            lease = "policy:" + name
            self.assertIn(lease, {l.owner for l in self.client.get_vm(self.name(2)).leases})
            self.assertNotIn(lease, {l.owner for l in self.client.get_vm(self.name(1)).leases})
            self.assertEqual(status.etag, created.etag)
            self.assertEqual(status.origin, kc.pb.POLICY_ORIGIN_API)
            smaller = kc.parse_policy(
                'name: "%s" mode: MODE_MONITOR action: ACTION_CONTINUE '
                'protect_pages { gpa_first: 0x200000 gpa_last: 0x200fff allowed: "r" }' % name)
            # Creating it again is refused; replacing needs the current etag.
            with self.assertRaises(kc.AlreadyExists) as cm:
                self.client.apply_policy(smaller)
            self.assertIn(created.etag, cm.exception.message)
            replaced = self.client.apply_policy(smaller, etag=created.etag)
            self.assertTrue(replaced.replaced)
            self.assertNotEqual(replaced.etag, created.etag)
            with self.assertRaises(kc.FailedPrecondition) as cm:
                self.client.apply_policy(smaller, etag=created.etag)  # stale now
            self.assertIn(replaced.etag, cm.exception.message)
            with self.assertRaises(kc.FailedPrecondition):
                self.client.delete_policy(name, etag=created.etag)
        finally:
            self.client.delete_policy(name)
        self.assertNotIn(name, [s.policy.name for s in self.client.policies()])
        with self.assertRaises(kc.NotFound) as cm:
            self.client.delete_policy(name)
        self.assertIn(name, cm.exception.message)
        with self.assertRaises(kc.InvalidArgument) as cm:
            self.client.delete_policy("")
        self.assertTrue(cm.exception.message.startswith("name:"), cm.exception.message)

    def test_policies_follow_the_pages_past_4_mib(self):
        # 80 policies of ~60 KB (under limits.max_policy_bytes): ~4.8 MB in all, more than one
        # response may carry. They match CR4 writes of a guest that does not exist.
        names = ["py-page-%03d" % (80 - i) for i in range(80)]  # list order, not name order
        bulk = ["nobody-%05d-padding-padding" % i for i in range(2000)]
        try:
            for name in names:
                self.client.apply_policy({
                    "name": name, "description": "p" * 4000, "mode": "MODE_MONITOR",
                    "guests": {"names": bulk},
                    "forbidCrBitsClear": {"cr": 4, "bits": str(1 << 20)}})
            statuses = [s for s in self.client.policies() if s.policy.name.startswith("py-page-")]
            self.assertEqual([s.policy.name for s in statuses], names)
            self.assertEqual(len(statuses[0].policy.guests.names), len(bulk))
            total = sum(s.ByteSize() for s in statuses)
            self.assertGreater(total, 4 << 20)
            # Small pages too; a forged token is refused naming the field.
            small = [s.policy.name for s in self.client.iter_policies(page_size=7)
                     if s.policy.name.startswith("py-page-")]
            self.assertEqual(small, names)
            with self.assertRaises(kc.InvalidArgument) as cm:
                self.client._unary("ListPolicies", kc.pb.ListPoliciesRequest(page_token="forged"))
            self.assertIn("page_token", cm.exception.message)
        finally:
            for name in names:
                try:
                    self.client.delete_policy(name)
                except kc.NotFound:
                    pass

    def test_configured_policies_are_protected_and_mode_is_required(self):
        lstar = [s for s in self.client.list_policies() if s.policy.name == "lstar-locked"][0]
        self.assertEqual(lstar.origin, kc.pb.POLICY_ORIGIN_CONFIG)
        weaker = kc.parse_policy('name: "lstar-locked" mode: MODE_MONITOR '
                                 'lock_msr { msr: 0xc0000082 }')
        for kwargs in ({}, {"allow_replace": True}, {"etag": lstar.etag}):
            with self.assertRaises(kc.KvmiError) as cm:
                self.client.apply_policy(weaker, **kwargs)
            self.assertIn("lstar-locked", cm.exception.message)
        with self.assertRaises(kc.FailedPrecondition) as cm:
            self.client.delete_policy("lstar-locked")
        self.assertIn("override_config", cm.exception.message)
        after = [s for s in self.client.list_policies() if s.policy.name == "lstar-locked"][0]
        self.assertEqual((after.etag, after.policy.mode), (lstar.etag, kc.policy_pb.MODE_ENFORCE))
        no_mode = kc.parse_policy('name: "py-no-mode" lock_msr { msr: 0x176 }')
        with self.assertRaises(kc.InvalidArgument) as cm:
            self.client.apply_policy(no_mode)
        self.assertIn("policy.mode", cm.exception.message)

    def test_list_vms_follows_the_pages(self):
        every = self.client.list_vms()
        self.assertGreaterEqual(len(every), 2)
        self.assertEqual([vm.uuid for vm in every], sorted(vm.uuid for vm in every))
        self.assertEqual([vm.uuid for vm in self.client.list_vms(page_size=1)],
                         [vm.uuid for vm in every])
        with self.assertRaises(kc.InvalidArgument) as cm:
            self.client._unary("ListVMs", kc.pb.ListVMsRequest(page_token="forged"))
        self.assertIn("page_token", cm.exception.message)

    def test_apply_rejects_bad_policies_naming_the_field(self):
        bad = kc.protect_pages_policy("py-bad", 0x1000, 0x1FFF, allowed="q")
        with self.assertRaises(kc.InvalidArgument) as cm:
            self.client.apply_policy(bad)
        self.assertIn("policy.protect_pages.allowed", cm.exception.message)
        self.assertNotIn("py-bad", [s.policy.name for s in self.client.policies()])

    def test_configured_policies_count_hits(self):
        def counters():
            return {s.policy.name: s.counters for s in self.client.policies()}
        before = counters()["lstar-locked"]
        wait_for(lambda: counters()["lstar-locked"].enforced > before.enforced, 10,
                 "lstar-locked to enforce again")
        self.assertEqual(set(counters()) >= {"cr0-wp", "lstar-locked", "sysenter-eip-locked",
                                             "data-watch"}, True)

    # ---- control ------------------------------------------------------------------------------

    def test_registers_memory_and_pause(self):
        vm = self.name(0)
        regs = self.client.get_registers(vm, 1, msrs=[LSTAR])
        self.assertEqual(regs.mode, 8)
        self.assertNotEqual(regs.registers.rip, 0)
        self.assertEqual([m.index for m in regs.msrs], [LSTAR])
        with self.assertRaises(kc.InvalidArgument) as cm:
            self.client.get_registers(vm, VCPUS + 5)
        self.assertIn("vcpu", cm.exception.message)
        data = self.client.read_physical(vm, DATA[0], 5000)
        self.assertEqual(len(data), 5000)
        with self.assertRaises(kc.InvalidArgument) as cm:
            self.client.read_physical(vm, DATA[0], 0)
        self.assertIn("size", cm.exception.message)
        with self.assertRaises(kc.NotFound):
            self.client.read_physical("no-such-vm", DATA[0], 16)
        scratch = 0x300000  # outside the sims' working sets
        self.client.write_physical(vm, scratch, b"kvmid-python")
        self.assertEqual(self.client.read_physical(vm, scratch, 12), b"kvmid-python")
        self.assertEqual(self.client.pause(vm, 1), [1])
        self.assertEqual(self.client.resume(vm), [1])
        with self.assertRaises(kc.FailedPrecondition):
            self.client.resume(vm, 1)

    def test_translate_through_tables_written_into_the_guest(self):
        vm = self.name(0)
        # 4-level tables by hand in free guest RAM: gva 0x7f0000401000 -> gpa 0x305000 (user,
        # read-only, NX), and a 2 MiB page at gva 0x40000000 -> gpa 0x400000 (writable).
        base = 0x340000  # outside the sims' working sets (and the scratch page above)
        pml4, pdpt, pd, pt = base, base + 0x1000, base + 0x2000, base + 0x3000
        q = lambda v: struct.pack("<Q", v)
        zero = bytes(4096)
        for table in (pml4, pdpt, pd, pt):
            self.client.write_physical(vm, table, zero)
        gva = 0x7f0000401000
        self.client.write_physical(vm, pml4 + 8 * ((gva >> 39) & 511), q(pdpt | 7))
        self.client.write_physical(vm, pdpt + 8 * ((gva >> 30) & 511), q(pd | 7))
        self.client.write_physical(vm, pd + 8 * ((gva >> 21) & 511), q(pt | 7))
        self.client.write_physical(vm, pt + 8 * ((gva >> 12) & 511), q(0x305000 | 5 | 1 << 63))
        self.client.write_physical(vm, pml4, q(pdpt | 7))  # gva 0x40000000: PML4[0], PDPT[1]
        self.client.write_physical(vm, pdpt + 8 * 1, q(pd | 7))
        self.client.write_physical(vm, pd, q(0x400000 | 0x83))
        t = self.client.translate(vm, gva + 0x123, cr3=pml4, mode="4level")
        self.assertTrue(t.present)
        self.assertEqual((t.gpa, t.page_size, t.level_name), (0x305123, 4096, "PTE"))
        self.assertEqual((t.writable, t.user, t.executable), (False, True, False))
        t = self.client.translate(vm, 0x40000000 + 0x1234, cr3=pml4)
        self.assertEqual((t.gpa, t.page_size, t.writable, t.user), (0x401234, 2 << 20, True, False))
        t = self.client.translate(vm, 0x40000000 + 0x1234, cr3=pml4)
        self.assertTrue(t.cached)
        # kvmid's own write to the PD drops the cached answer.
        self.client.write_physical(vm, pd, q(0x600000 | 0x83))
        t = self.client.translate(vm, 0x40000000 + 0x1234, cr3=pml4)
        self.assertEqual((t.gpa, t.cached), (0x601234, False))
        t = self.client.translate(vm, 0x100000000000, cr3=pml4, no_cache=True)  # PML4[32]: empty
        self.assertFalse(t.present)
        self.assertEqual((t.level, t.level_name), (4, "PML4E"))
        # Through a vCPU: the sims' CR3s point at empty tables, so nothing is mapped there.
        t = self.client.translate(vm, 0x1000, vcpu=0)
        self.assertFalse(t.present)
        self.assertEqual(t.mode, kc.pb.PAGING_MODE_4LEVEL)
        with self.assertRaises(kc.InvalidArgument) as cm:
            self.client.translate(vm, 0x0000800000000000, cr3=pml4)
        self.assertIn("not canonical", cm.exception.message)
        # ReadVirtual across the mapped page and the unmapped one after it.
        self.client.write_physical(vm, 0x305000, b"virtual!")
        r = self.client.read_virtual(vm, gva + 4096 - 8, 16, cr3=pml4)
        self.assertEqual(len(r.data), 16)
        self.assertEqual(r.data[8:], bytes(8))  # the page that is not present: zeros
        self.assertFalse(r.complete)
        self.assertEqual([(p.read, p.size) for p in r.pages], [(True, 8), (False, 8)])
        self.assertIn("not present at PTE", r.pages[1].why)
        r = self.client.read_virtual(vm, gva, 8, cr3=pml4)
        self.assertEqual((r.data, r.complete), (b"virtual!", True))
        out = self.ctl("read", vm, hex(gva), "8", "--virtual", "--cr3", hex(pml4), "--raw")
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(out.stdout, "virtual!")
        out = self.ctl("read", vm, hex(gva + 4096), "8", "--virtual", "--cr3", hex(pml4))
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn("not present at PTE", out.stderr)
        out = self.assertCtlOk(self.ctl("translate", vm, hex(gva), "--cr3", hex(pml4)))
        self.assertIn("0x7f0000401000 -> 0x305000  4 KiB page, r-- user, PTE", out)
        out = self.assertCtlOk(self.ctl("translate", vm, "0x1000", "--vcpu", "1"))
        self.assertIn("not present at PML4E", out)
        self.assertCtlFails(self.ctl("translate", vm, "0x1000"), 3, "--vcpu N or --cr3")

        # ReadVirtualStream: the same two pages, in 4 KiB chunks; the missing page is named.
        chunks = list(self.client.read_virtual_stream(vm, gva, 8192, cr3=pml4, chunk_bytes=4096))
        self.assertEqual([(c.gva, c.size, c.complete) for c in chunks],
                         [(gva, 4096, True), (gva + 4096, 4096, False)])
        self.assertEqual(chunks[0].data[:8], b"virtual!")
        self.assertEqual(chunks[1].data, bytes(4096))
        self.assertEqual([(p.gva, p.size) for p in chunks[1].unread], [(gva + 4096, 4096)])
        self.assertIn("not present at PTE", chunks[1].unread[0].why)
        with self.assertRaises(kc.InvalidArgument):
            list(self.client.read_virtual_stream(vm, gva, 8192, cr3=pml4, chunk_bytes=100))
        # WriteVirtual: the page is read-only (R/W clear): written anyway, and reported so...
        w = self.client.write_virtual(vm, gva + 8, b"written", cr3=pml4)
        self.assertEqual((w.written, w.bytes_written), (True, 7))
        self.assertEqual([(p.written, p.writable, p.gpa) for p in w.pages],
                         [(True, False, 0x305008)])
        self.assertEqual(self.client.read_physical(vm, 0x305008, 7), b"written")
        # ... unless require_writable: nothing written.
        with self.assertRaises(kc.VirtualWriteFailed) as cm:
            self.client.write_virtual(vm, gva + 8, b"refused", cr3=pml4, require_writable=True)
        self.assertEqual(cm.exception.response.pages[0].why, "read-only")
        self.assertEqual(self.client.read_physical(vm, 0x305008, 7), b"written")
        # A range that reaches the page that is not present: nothing written, that page named.
        with self.assertRaises(kc.VirtualWriteFailed) as cm:
            self.client.write_virtual(vm, gva + 4092, b"12345678", cr3=pml4)
        pages = cm.exception.response.pages
        self.assertEqual(cm.exception.response.bytes_written, 0)
        self.assertEqual([(p.gva, p.written) for p in pages], [(gva + 4092, False),
                                                               (gva + 4096, False)])
        self.assertIn("not present at PTE", pages[1].why)
        self.assertNotEqual(self.client.read_physical(vm, 0x305ffc, 4), b"1234")
        # kvmictl write --virtual (hex), read back through kvmictl read --virtual (streamed).
        out = self.assertCtlOk(self.ctl("write", vm, hex(gva), "--hex", "6b 76 6d 69 64",
                                        "--virtual", "--cr3", hex(pml4)))
        self.assertIn("wrote 5 bytes", out)
        out = self.ctl("read", vm, hex(gva), "5", "--virtual", "--cr3", hex(pml4), "--raw")
        self.assertEqual((out.returncode, out.stdout), (0, "kvmid"), out.stderr)
        self.assertCtlFails(self.ctl("write", vm, hex(gva + 4096), "--hex", "00", "--virtual",
                                     "--cr3", hex(pml4)), 1, "not present at PTE",
                            "nothing written")
        self.assertCtlFails(self.ctl("write", vm, hex(gva), "--virtual", "--cr3", hex(pml4)), 3,
                            "--hex BYTES or --file")

    def test_attach_handler_reads_virtual_memory_inline(self):
        vm = self.name(1)
        with self.client.attach("py-vread", vms=[vm], events=["pf"], deadline_ms=3000,
                                fallback="continue") as handler:
            event = handler.next_event(timeout=10)
            self.assertIsNotNone(event, "no PF event reached the handler")
            # In the event's address space (its vCPU's CR3: the sims' tables are empty), read
            # while the vCPU waits: every page reported, none read.
            r = handler.read_virtual(event, 0x1000, 4100)
            self.assertEqual(len(r.data), 4100)
            self.assertFalse(r.complete)
            self.assertEqual([p.size for p in r.pages], [4096, 4])
            self.assertIn("not present at PML4E", r.pages[0].why)
            self.assertEqual(r.mode, kc.pb.PAGING_MODE_4LEVEL)
            with self.assertRaises(kc.CommandFailed) as cm:
                handler.read_virtual(event, 0x0000800000000000, 16)  # not canonical
            self.assertEqual(cm.exception.code, grpc.StatusCode.INVALID_ARGUMENT)
            handler.answer(event, "continue")

    def test_cpuid_xsave_mtrr_and_exception_injection(self):
        vm = self.name(0)
        leaf0 = self.client.get_cpuid(vm, 0, 0)
        vendor = b"".join(r.to_bytes(4, "little") for r in (leaf0.ebx, leaf0.edx, leaf0.ecx))
        self.assertEqual(vendor, b"GenuineIntel")
        self.assertEqual(len(self.client.get_xsave(vm, 1)), 4096)
        self.assertIn(self.client.get_mtrr_type(vm, 0, DATA[0]), (0, 1, 4, 5, 6))
        self.client.inject_exception(vm, 1, 3)  # #BP
        with self.assertRaises(kc.InvalidArgument) as cm:
            self.client.inject_exception(vm, 1, 40)
        self.assertIn("vector", cm.exception.message)
        with self.assertRaises(kc.InvalidArgument):
            self.client.get_xsave(vm, VCPUS)
        with self.assertRaises(kc.NotFound):
            self.client.get_cpuid("no-such-vm", 0, 0)

    def test_page_access_get_set_and_restore(self):
        vm = self.name(1)
        pages = {0x310000: "r", 0x311000: "rx"}
        errors, rolled_back = self.client.set_page_access(vm, pages)
        self.assertEqual(errors, {0x310000: "", 0x311000: ""})
        self.assertFalse(rolled_back)
        self.assertEqual(self.client.get_page_access(vm, [0x310000, 0x311000, 0x312000]),
                         {0x310000: "r", 0x311000: "rx", 0x312000: "rwx"})
        api = [l for l in self.client.get_vm(vm).leases if l.owner == "api"]
        self.assertEqual(api[0].restricted_pages, 2)
        self.client.set_page_access(vm, {0x310000: "rwx", 0x311000: "rwx"})
        self.assertEqual(self.client.get_page_access(vm, [0x310000, 0x311000]),
                         {0x310000: "rwx", 0x311000: "rwx"})
        with self.assertRaises(kc.InvalidArgument) as cm:
            self.client.set_page_access(vm, {0x310000: "q"})
        self.assertIn("pages[0].access", cm.exception.message)
        with self.assertRaises(kc.InvalidArgument):
            self.client.get_page_access(vm, [])

    def test_control_events_on_one_vcpu_and_on_all(self):
        vm = self.name(2)
        response = self.client.control_events(vm, events=["breakpoint"], vcpu=1)
        self.assertEqual([(v.vcpu, list(v.events)) for v in response.lease.vcpu_only],
                         [(1, [kc.policy_pb.EVENT_TYPE_BREAKPOINT])])
        self.assertEqual(list(response.arm_errors), [])
        response = self.client.control_events(vm, events=["cr"], crs=[3])
        self.assertIn(kc.policy_pb.EVENT_TYPE_CR, response.lease.vcpu_events)
        api = [l for l in self.client.get_vm(vm).leases if l.owner == "api"][0]
        self.assertEqual(list(api.crs), [3])
        self.assertEqual(len(api.vcpu_only), 1)
        response = self.client.control_events(vm, events=["breakpoint", "cr"], crs=[3],
                                              enable=False)
        self.assertEqual(len(response.lease.vcpu_only), 0)
        self.assertEqual(list(response.lease.vcpu_events), [])
        self.assertNotIn("api", [l.owner for l in self.client.get_vm(vm).leases])
        with self.assertRaises(kc.InvalidArgument) as cm:
            self.client.control_events(vm, events=["unhook"], vcpu=0)
        self.assertIn("VM event", cm.exception.message)
        with self.assertRaises(kc.InvalidArgument) as cm:
            self.client.control_events(vm, crs=[8])
        self.assertIn("crs[0]", cm.exception.message)
        with self.assertRaises(kc.InvalidArgument):
            self.client.control_events(vm, events=["msr"], vcpu=VCPUS)

    def test_set_registers_only_while_an_event_waits(self):
        vm = self.name(0)
        with self.assertRaises(kc.FailedPrecondition) as cm:
            self.client.set_registers(vm, 0, {"rax": 1})
        self.assertIn("no event pending", cm.exception.message)
        # A paused vCPU waits for its verdict, held with its pause event.
        first = self.client.pause(vm, 0, with_event_ids=True)
        self.assertEqual(list(first), [0])
        self.assertGreater(first[0], 0)
        try:
            regs = self.client.get_registers(vm, 0).registers
            # Bound to an event this vCPU does not wait with: refused, nothing set.
            with self.assertRaises(kc.FailedPrecondition) as cm:
                self.client.set_registers(vm, 0, {"rax": 1}, event_id=first[0] + 1)
            self.assertIn("does not wait for event %d (it waits for event %d)"
                          % (first[0] + 1, first[0]), cm.exception.message)
            self.assertEqual(self.client.get_registers(vm, 0).registers.rax, regs.rax)
            self.client.set_registers(vm, 0, {"rip": regs.rip, "rax": 0x6b766d6964,
                                              "rsp": regs.rsp, "rflags": regs.rflags},
                                      event_id=first[0])
        finally:
            self.assertEqual(self.client.resume(vm, 0), [0])
        # Paused again: a call meant for the first pause never reaches the second.
        second = self.client.pause(vm, 0, with_event_ids=True)
        try:
            self.assertNotEqual(second[0], first[0])
            with self.assertRaises(kc.FailedPrecondition) as cm:
                self.client.set_registers(vm, 0, {"rax": 1}, event_id=first[0])
            self.assertIn("(it waits for event %d)" % second[0], cm.exception.message)
        finally:
            self.assertEqual(self.client.resume(vm, 0), [0])
        with self.assertRaises(kc.InvalidArgument):
            self.client.set_registers(vm, VCPUS, {"rax": 1})

    def test_sub_page_protection_control_and_write_bitmaps(self):
        vm = self.name(1)
        # Before CONTROL_SPP the host refuses bitmap commands; the KVMI error comes by name.
        with self.assertRaises(kc.KvmiError) as cm:
            self.client.get_page_write_bitmap(vm, [DATA[0]])
        self.assertEqual(cm.exception.code, grpc.StatusCode.UNIMPLEMENTED)
        self.assertIn("KVM_EOPNOTSUPP", cm.exception.message)
        self.client.control_spp(vm)
        page = 0x330000  # outside the sims' working set
        self.assertEqual(self.client.get_page_write_bitmap(vm, [page]), {page: 0})
        self.client.set_page_write_bitmap(vm, {page: 0x0000FFFF})
        self.assertEqual(self.client.get_page_write_bitmap(vm, [page, page + 0x1000]),
                         {page: 0x0000FFFF, page + 0x1000: 0})
        self.client.set_page_write_bitmap(vm, {page: 0xFFFFFFFF})  # fully writable again
        with self.assertRaises(kc.InvalidArgument) as cm:
            self.client.get_page_write_bitmap(vm, [])
        self.assertIn("gpas", cm.exception.message)
        with self.assertRaises(kc.InvalidArgument) as cm:
            self.client.set_page_write_bitmap(vm, {0x1000 * i: 0 for i in range(256)})
        self.assertIn("pages", cm.exception.message)
        with self.assertRaises(kc.NotFound):
            self.client.control_spp("no-such-vm")

    def test_unhook_is_watched_and_the_guest_comes_back_rearmed(self):
        vm = self.vms[2]
        watch = self.client.watch_vms()
        timer = threading.Timer(20, watch.cancel)
        timer.daemon = True
        timer.start()
        try:
            existing = []
            for change in watch:
                existing.append(change.vm.name)
                if len(existing) == VMS:
                    break
            self.assertEqual(sorted(existing), [v.name for v in self.vms])
            self.client.unhook(vm.name)
            states = []
            for change in watch:
                if change.vm.name != vm.name:
                    continue
                states.append(kc.state_name(change.vm.state))
                if states[-1] == "HOOKED" and "GONE" in states:
                    break
            self.assertIn("GONE", states)
            self.assertEqual(states[-1], "HOOKED")
        finally:
            timer.cancel()
            watch.cancel()
        again = self.client.get_vm(vm.uuid)
        self.assertEqual(again.connections, vm.connections + 1)
        self.assertIn("policy:lstar-locked", [l.owner for l in again.leases])
        with self.assertRaises(kc.NotFound):
            self.client.unhook("no-such-vm")

    def test_attach_answers_pf_and_the_guest_sees_the_effect(self):
        vm = self.name(1)
        with self.client.attach("py-pf", vms=[vm], events=["pf"], deadline_ms=3000,
                                fallback="continue") as handler:
            self.assertTrue(handler.owner.startswith("client:py-pf#"))
            regs = handler.command(get_registers=kc.pb.GetRegistersRequest(vm=vm, vcpu=0))
            self.assertEqual(regs.mode, 8)
            retried = None   # (vcpu, gpa, value before) of the write answered RETRY
            deadline = time.monotonic() + 20
            outcome = None
            while time.monotonic() < deadline and outcome is None:
                event = handler.next_event(timeout=5)
                self.assertIsNotNone(event, "no PF event reached the handler")
                self.assertEqual(event.type, kc.policy_pb.EVENT_TYPE_PF)
                gpa = event.pf.gpa
                is_write = "w" in event.pf.access
                if retried is None and is_write:
                    before = handler.command(read_physical=kc.pb.ReadPhysicalRequest(
                        vm=vm, gpa=gpa, size=8)).data
                    retried = (event.vcpu, gpa, before)
                    handler.answer(event, "retry")
                elif retried is not None and (event.vcpu, gpa) == retried[:2]:
                    # RETRY re-executed the write: it faults again, and memory is unchanged.
                    now = handler.command(read_physical=kc.pb.ReadPhysicalRequest(
                        vm=vm, gpa=gpa, size=8)).data
                    self.assertEqual(now, retried[2])
                    handler.answer(event, "continue")
                    outcome = "continued"
                else:
                    handler.answer(event, "continue")
            self.assertEqual(outcome, "continued", "the retried write never came back")
            # CONTINUE performed the (random 8-byte) write.
            wait_for(lambda: self.client.read_physical(vm, retried[1], 8) != retried[2], 5,
                     "the continued write to land")
            with self.assertRaises(kc.CommandFailed) as cm:
                handler.command(read_physical=kc.pb.ReadPhysicalRequest(vm="no-such-vm", size=1))
            self.assertEqual(cm.exception.code, grpc.StatusCode.NOT_FOUND)
            handler.answer(123456789, "continue")  # never sent: reported back, not applied
            wait_for(lambda: handler.errors, 5, "the VerdictError")
            self.assertIn("not pending", handler.errors[0].message)
        with self.assertRaises(kc.InvalidArgument):
            self.client.attach("bad id!", events=["pf"])

    def test_attach_in_batches_every_verdict_counts(self):
        # A handler that asks for batches (Claim.max_batch) against the real kvmid: its claim is
        # taken, every event reaches it once whether it came alone or in a batch, and each of its
        # verdicts, alone or merged with others that queued meanwhile, is applied: a stream
        # watching the guest sees every answered event decided by the handler. (Whether batches
        # form depends on timing; daemon/api's attach and attach_outbox tests and the unit tests
        # pin the batching itself.)
        vm = self.name(1)
        with self.watching(vm, "pf") as watch, self.client.attach(
                "py-batch", vms=[vm], events=["pf"], deadline_ms=3000, fallback="continue",
                max_batch=32) as handler:
            answered = set()
            while len(answered) < 20:
                event = handler.next_event(timeout=5)
                self.assertIsNotNone(event, "no PF event reached the handler")
                self.assertNotIn(event.id, answered, "an event came twice")
                answered.add(event.id)
                handler.answer(event, "continue")
            self.assertDecided(watch, answered, "handler:py-batch")
            self.assertEqual(list(handler.errors), [])

    def test_a_killed_handler_releases_its_lease_and_the_guest_falls_back(self):
        vm = self.name(0)
        script = (
            "import sys, time; sys.path.insert(0, %r)\n"
            "import kvmi_client as kc\n"
            "c = kc.Client(%r)\n"
            "h = c.attach('doomed', vms=[%r], events=['pf'], deadline_ms=1000)\n"
            "h.command(set_page_access=kc.pb.SetPageAccessRequest(vm=%r, pages=["
            "kc.pb.PageRights(gpa=0x320000, access='r')]))\n"
            "print('ready', h.owner, flush=True)\n"
            "time.sleep(60)\n" % (CLIENT_DIR, self.fleet.target, vm, vm))
        proc = subprocess.Popen(["/usr/bin/python3", "-c", script], stdout=subprocess.PIPE,
                                text=True)
        try:
            line = proc.stdout.readline().split()
            self.assertEqual(line[0], "ready", line)
            owner = line[1]
            self.assertIn(owner, [l.owner for l in self.client.get_vm(vm).leases])
            self.assertEqual(self.client.get_page_access(vm, [0x320000]), {0x320000: "r"})
            fallbacks = self.client.get_vm(vm).fallbacks
            time.sleep(1.5)  # the data-watch PFs it claimed wait on it, unanswered
        finally:
            proc.kill()
            proc.wait()
        wait_for(lambda: owner not in [l.owner for l in self.client.get_vm(vm).leases], 5,
                 "the killed handler's lease to go")
        self.assertEqual(self.client.get_page_access(vm, [0x320000]), {0x320000: "rwx"})
        # Its PF events were answered by the fallback (not left waiting), and the guest runs on.
        self.assertGreater(self.client.get_vm(vm).fallbacks, fallbacks)
        before = self.client.get_vm(vm).events
        wait_for(lambda: self.client.get_vm(vm).events > before + 10, 10, "more events")

    # ---- kvmictl ------------------------------------------------------------------------------

    def test_kvmictl_guests(self):
        out = self.assertCtlOk(self.ctl("vms"))
        self.assertTrue(out.startswith("NAME"))
        for vm in self.vms:
            self.assertIn(vm.name, out)
            self.assertIn(vm.uuid, out)
        self.assertIn("HOOKED", out)
        lines = self.assertCtlOk(self.ctl("vms", "--json")).splitlines()
        self.assertEqual(sorted(json.loads(l)["name"] for l in lines),
                         [vm.name for vm in self.vms])
        out = self.assertCtlOk(self.ctl("vm", self.name(0)))
        self.assertIn("state:         HOOKED", out)
        self.assertIn("policy:lstar-locked", out)
        self.assertIn("tier=prod", out)
        self.assertCtlFails(self.ctl("vm", "no-such-vm"), 1, "NOT_FOUND", "no-such-vm")
        self.assertCtlFails(self.ctl("vm", ""), 1, "INVALID_ARGUMENT", "vm:")

    def test_kvmictl_events(self):
        vm = self.name(2)
        out = self.assertCtlOk(self.ctl("events", "--vm", vm, "--type", "msr", "--msr",
                                        "0xc0000082,0x176", "--count", "3", "--json"))
        lines = [json.loads(l) for l in out.splitlines()]
        events = [l["event"] for l in lines if "event" in l]
        self.assertEqual(len(events), 3, out)
        for e in events:
            self.assertEqual((e["vmName"], e["type"]), (vm, "EVENT_TYPE_MSR"))
            self.assertFalse([k for k in e if "_" in k], e)  # lowerCamel, as buf curl prints
            self.assertEqual(e["node"], "e2e-node")
            self.assertRegex(e["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
            self.assertIn(e["msr"]["msr"], (LSTAR, 0x176))
        out = self.assertCtlOk(self.ctl("events", "--type", "pf", "--gpa", "0x200000-0x20ffff",
                                        "--access", "w", "--count", "2"))
        rows = out.splitlines()
        self.assertTrue(rows[0].startswith("TIME"), out)
        self.assertTrue(rows[0].endswith("NODE"), out)
        for row in [r for r in rows[1:] if " PF " in r]:
            self.assertRegex(row, r"^\d{4}-\d\d-\d\dT\S+Z .* e2e-node$")
        self.assertEqual(len([r for r in rows[1:] if " PF " in r and " w gpa 0x20" in r]), 2, out)
        out = self.assertCtlOk(self.ctl("events", "--type", "cr", "--cr", "0", "--count", "1",
                                        "--registers"))
        self.assertIn("cr4    0x", out)
        # --duration ends a stream that matches nothing (CR2 writes are never trapped), and the
        # quiet stream's heartbeats bring the hint that it is alive.
        start = time.monotonic()
        result = self.ctl("events", "--type", "cr", "--cr", "2", "--duration", "1.5",
                          "--heartbeat", "0.2", "--hint-after", "0.8")
        self.assertCtlOk(result)
        self.assertLess(time.monotonic() - start, 10)
        self.assertIn("heartbeats say the stream is alive", result.stderr)
        # A guest kvmid does not know is an error at once, not silence.
        self.assertCtlFails(self.ctl("events", "--vm", "no-such-vm", "--duration", "5"), 1,
                            "NOT_FOUND", "no guest 'no-such-vm'")
        # Several allow filters, a deny filter.
        out = self.assertCtlOk(self.ctl("events", "--allow", "type=msr;msr=0xc0000082",
                                        "--allow", "type=cr;cr=0", "--deny",
                                        "vm=" + self.name(0), "--count", "6"))
        rows = [r for r in out.splitlines()[1:] if r.strip()]
        self.assertEqual(len(rows), 6, out)
        for row in rows:
            self.assertNotIn(self.name(0), row)
            self.assertTrue(" MSR " in row or " CR " in row, row)
        self.assertCtlFails(self.ctl("events", "--max-queue", "100000"), 1, "INVALID_ARGUMENT",
                            "max_queue")
        out = self.assertCtlOk(self.ctl("events", "--max-queue", "1", "--count", "1"))
        self.assertIn("ID", out)

    def test_kvmictl_attach_answers_events_as_a_handler(self):
        # kvmictl attach claims PF events of one guest and answers each; kvmid's own record of
        # the same events (StreamEvents, after the verdict) says the handler decided them.
        vm = self.name(2)
        with self.watching(vm, "pf") as watch:
            out = self.assertCtlOk(self.ctl("attach", "ctl-handler", "--vm", vm, "--type", "pf",
                                            "--verdict", "continue", "--deadline-ms", "3000",
                                            "--count", "5", "--json"))
            lines = [json.loads(l) for l in out.splitlines()]
            events = [l["event"] for l in lines if "event" in l]
            verdicts = [l["verdict"] for l in lines if "verdict" in l]
            self.assertEqual(len(events), 5, out)
            self.assertEqual([v["eventId"] for v in verdicts], [e["id"] for e in events])
            for e in events:
                self.assertEqual((e["vmName"], e["type"]), (vm, "EVENT_TYPE_PF"))
            self.assertEqual({v["action"] for v in verdicts}, {"ACTION_CONTINUE"})
            self.assertDecided(watch, {int(e["id"]) for e in events}, "handler:ctl-handler")
        # The table, as 'events' prints decided events.
        out = self.assertCtlOk(self.ctl("attach", "ctl-handler", "--vm", vm, "--type", "pf",
                                        "--count", "2"))
        lines = out.splitlines()
        self.assertTrue(lines[0].startswith("TIME"), out)
        rows = [l for l in lines[1:] if l.strip()]
        self.assertEqual(len(rows), 2, out)
        for row in rows:
            self.assertIn(" PF ", row)
            self.assertIn(" CONTINUE ", row)
            self.assertIn(" handler:ctl-handler ", row)
        # Nothing to answer: --duration ends it.
        start = time.monotonic()
        self.assertCtlOk(self.ctl("attach", "idle", "--vm", vm, "--type", "breakpoint",
                                  "--duration", "1", "--hint-after", "0"))
        self.assertLess(time.monotonic() - start, 10)

    def test_kvmictl_event_table_columns_and_verdicts(self):
        # LSTAR writes are kept at their old value: the longest verdict text. Every column of
        # every row starts where its header does (sizes from the data, never spilling).
        out = self.assertCtlOk(self.ctl("events", "--vm", self.name(0), "--type", "msr",
                                        "--msr", hex(LSTAR), "--count", "3"))
        lines = out.splitlines()
        headers = [l for l in lines if l.startswith("TIME")]
        self.assertTrue(headers, out)
        header = headers[-1]
        rows = lines[lines.index(header) + 1:]
        self.assertTrue(rows, out)
        verdict, decided = header.index("VERDICT"), header.index("DECIDED BY")
        for row in rows:
            self.assertEqual(row[verdict:decided].rstrip(), "KEEP_OLD (old value kept)", out)
            self.assertTrue(row[verdict:decided].endswith("  "), out)
            self.assertTrue(row[decided:].startswith("policy:lstar-locked "), out)
            self.assertRegex(row, r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z  ")

    def test_kvmictl_says_when_a_stream_is_silent(self):
        # A filter that matches a guest but nothing it does (MSR 0x10 is not intercepted).
        r = self.ctl("events", "--vm", self.name(0), "--type", "msr", "--msr", "0x10",
                     "--duration", "2.5", "--hint-after", "1")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout, "")
        self.assertEqual(r.stderr.count("kvmictl: no events for 1 s (still listening)"), 1,
                         r.stderr)
        self.assertIn("does the filter match no guest", r.stderr)
        r = self.ctl("events", "--vm", self.name(0), "--type", "msr", "--msr", "0x10",
                     "--duration", "1.5", "--hint-after", "0")
        self.assertEqual((r.returncode, r.stderr), (0, ""))

    def test_kvmictl_exit_status_by_kind_of_failure(self):
        self.assertCtlFails(self.ctl("vm", "no-such-vm"), 1, "NOT_FOUND")
        self.assertCtlFails(self.ctl("--timeout", "0", "vms"), 3, "--timeout")
        self.assertCtlFails(self.ctl("events", "--count", "-5"), 3, "--count")
        self.assertCtlFails(self.ctl("--target", "unix:/nonexistent/api.sock", "vms"), 4,
                            "cannot connect")
        self.assertCtlFails(self.ctl("apply", "/nonexistent/p.textproto"), 5, "cannot read")

    def test_kvmictl_completion_names_from_kvmid(self):
        self.assertEqual(sorted(self.assertCtlOk(self.ctl("__names", "vms")).split()),
                         [vm.name for vm in self.vms])
        self.assertIn("lstar-locked", self.assertCtlOk(self.ctl("__names", "policies")).split())
        script = self.assertCtlOk(self.ctl("completion", "bash"))
        driver = (script + '\nCOMP_LINE="$1"; COMP_POINT=${#1}; _kvmictl; '
                  'printf "%s\\n" "${COMPREPLY[@]}"\n')
        r = subprocess.run(["bash", "-c", driver, "bash", "%s regs sim-vm-000" % KVMICTL],
                           capture_output=True, text=True, timeout=30,
                           env=dict(os.environ, KVMID_TARGET=self.fleet.target))
        self.assertEqual(sorted(r.stdout.split()), [vm.name for vm in self.vms], r.stderr)

    def test_kvmictl_policies_apply_delete(self):
        with tempfile.TemporaryDirectory(dir="/tmp") as d:
            text = os.path.join(d, "p.textproto")
            with open(text, "w") as f:
                f.write('# a comment\nname: "ctl-msr"\nmode: MODE_ENFORCE\n'
                        'lock_msr { msr: 0x176 }\nguests { names: ["%s"] }\n' % self.name(1))
            as_json = os.path.join(d, "p.json")
            with open(as_json, "w") as f:
                json.dump({"name": "ctl-cr4", "forbidCrBitsClear": {"cr": 4, "bits": "1048576"},
                           "mode": "MODE_MONITOR"}, f)
            bad = os.path.join(d, "bad.json")
            with open(bad, "w") as f:
                json.dump({"name": "ctl-bad", "forbidCrBitsClear": {"cr": 7, "bits": "1"}}, f)
            try:
                out = self.assertCtlOk(self.ctl("apply", text))
                self.assertIn("policy ctl-msr created", out)
                etag = re.search(r"\(etag (\S+)\)", out).group(1)
                # Applying it again: it exists (exit 1); --etag or --replace replace it.
                self.assertCtlFails(self.ctl("apply", text), 1, "ALREADY_EXISTS", etag)
                out = self.assertCtlOk(self.ctl("apply", text, "--etag", etag))
                self.assertIn("policy ctl-msr replaced", out)
                self.assertCtlFails(self.ctl("apply", text, "--etag", etag), 1,
                                    "FAILED_PRECONDITION")
                self.assertIn("policy ctl-msr replaced",
                              self.assertCtlOk(self.ctl("apply", text, "--replace")))
                self.assertIn("policy ctl-cr4 created",
                              self.assertCtlOk(self.ctl("apply", as_json)))
                out = self.assertCtlOk(self.ctl("policies", "--page-size", "2"))
                self.assertRegex(out, r"ctl-msr\s+ENFORCE\s+lock_msr\s+default\s+api\s")
                self.assertRegex(out, r"ctl-cr4\s+MONITOR\s+forbid_cr_bits_clear")
                self.assertRegex(
                    out, r"lstar-locked\s+ENFORCE\s+lock_msr\s+default\s+config\s+\S+\s+[1-9]")
                # The configuration's baseline is not replaced or deleted by accident.
                lstar = os.path.join(d, "lstar.textproto")
                with open(lstar, "w") as f:
                    f.write('name: "lstar-locked" mode: MODE_MONITOR lock_msr { msr: 0xc0000082 }')
                self.assertCtlFails(self.ctl("apply", lstar, "--replace"), 1,
                                    "FAILED_PRECONDITION", "override_config")
                self.assertCtlFails(self.ctl("delete", "lstar-locked"), 1, "FAILED_PRECONDITION")
                listed = [json.loads(l) for l in
                          self.assertCtlOk(self.ctl("policies", "--json")).splitlines()]
                self.assertIn("ctl-msr", [p["policy"]["name"] for p in listed])
                self.assertCtlFails(self.ctl("apply", bad), 1, "INVALID_ARGUMENT",
                                    "policy.forbid_cr_bits_clear")
            finally:
                self.ctl("delete", "ctl-cr4")
                self.assertIn("deleted", self.assertCtlOk(self.ctl("delete", "ctl-msr")))
        self.assertCtlFails(self.ctl("delete", "ctl-msr"), 1, "NOT_FOUND", "ctl-msr")
        self.assertNotIn("ctl-msr", self.assertCtlOk(self.ctl("policies")))

    def test_kvmictl_control(self):
        vm = self.name(1)
        out = self.assertCtlOk(self.ctl("regs", vm, "0", "--msr", "0xc0000082"))
        self.assertRegex(out, r"rip\s+0xffff")
        self.assertIn("msr 0xc0000082", out)
        self.assertCtlFails(self.ctl("regs", vm, "9"), 1, "INVALID_ARGUMENT", "vcpu")
        self.assertCtlFails(self.ctl("regs", "no-such-vm", "0"), 1, "NOT_FOUND")
        out = self.assertCtlOk(self.ctl("read", vm, "0x200000", "40"))
        self.assertEqual(len(out.splitlines()), 3)
        self.assertTrue(out.startswith("0000000000200000  "), out)
        out = self.assertCtlOk(self.ctl("pause", vm))
        self.assertIn("paused vCPU 0, 1", out)
        self.assertRegex(out, r"pause events: vCPU 0: [1-9]\d*, vCPU 1: [1-9]\d*")
        self.assertIn("resumed vCPU 0, 1", self.assertCtlOk(self.ctl("resume", vm)))
        self.assertCtlFails(self.ctl("resume", vm, "--vcpu", "0"), 1, "FAILED_PRECONDITION")

    def test_kvmictl_watch_arm_disarm(self):
        out = self.assertCtlOk(self.ctl("watch", "--count", str(VMS)))
        self.assertEqual(len(out.splitlines()), VMS, out)
        for vm in self.vms:
            self.assertRegex(out, r"now\s+%s\s+%s\s+HOOKED" % (vm.name, vm.uuid))
        vm = self.name(0)
        out = self.assertCtlOk(self.ctl("arm", vm, "--event", "cr,msr", "--cr", "4",
                                        "--msr", "0x175", "--vcpu", "1"))
        self.assertIn("armed on vCPU 1", out)
        self.assertIn("vCPU 1 only: events cr,msr, crs 4, msrs 0x175", out)
        out = self.assertCtlOk(self.ctl("disarm", vm, "--event", "cr,msr", "--cr", "4",
                                        "--msr", "0x175"))
        self.assertIn("disarmed on every vCPU", out)
        self.assertNotIn("vCPU 1 only", out)
        self.assertCtlFails(self.ctl("arm", vm, "--cr", "5"), 1, "INVALID_ARGUMENT", "crs[0]")
        self.assertCtlFails(self.ctl("arm", vm, "--event", "nonsense"), 3, "unknown event type")
        self.assertCtlFails(self.ctl("unhook", "no-such-vm"), 1, "NOT_FOUND")

    def test_kvmictl_protect(self):
        out = self.assertCtlOk(self.ctl("protect", self.name(2), "0x204000+0x2000", "--allow",
                                        "r", "--monitor", "--name", "ctl-protect"))
        self.assertIn("0x204000-0x205fff", out)
        try:
            status = [s for s in self.client.policies() if s.policy.name == "ctl-protect"][0]
            self.assertEqual(status.policy.mode, kc.policy_pb.MODE_MONITOR)
            self.assertEqual((status.policy.protect_pages.gpa_first,
                              status.policy.protect_pages.gpa_last), (0x204000, 0x205FFF))
        finally:
            self.client.delete_policy("ctl-protect")
        self.assertCtlFails(self.ctl("protect", self.name(2), "0x204000", "--allow", "z"), 3,
                            "not made of r, w, x")

    # ---- examples -----------------------------------------------------------------------------

    def example(self, script, *args):
        env = dict(os.environ, KVMID_TARGET=self.fleet.target)
        return subprocess.run(["/usr/bin/python3", os.path.join(EXAMPLES, script)] + list(args),
                              capture_output=True, text=True, timeout=30, env=env)

    def test_example_trace_cr3(self):
        r = self.example("trace_cr3.py", "--duration", "2", "--vm", self.name(0), "--vm",
                         self.name(1), "--policy-name", "e2e-cr3")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertRegex(r.stdout, r"%s\s+vCPU 0\s+cr3 0x" % self.name(0))
        summary = r.stdout[r.stdout.index("CR3 writes per vCPU"):]
        vcpus = [l for l in summary.splitlines() if l.startswith("sim-vm-")]
        self.assertEqual(sorted({l.split()[0] for l in vcpus}), [self.name(0), self.name(1)])
        self.assertRegex(r.stdout, r"total: [1-9]\d* CR3 writes")
        self.assertNotIn("e2e-cr3", [s.policy.name for s in self.client.policies()])

    def test_example_lock_kernel_text(self):
        r = self.example("lock_kernel_text.py", self.name(1), "--gpa", "0x200000-0x20ffff",
                         "--monitor", "--duration", "2", "--name", "e2e-lock", "--remove")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("applied e2e-lock", r.stdout)
        self.assertRegex(r.stdout, r"VIOLATION %s vCPU \d rip 0x[0-9a-f]+ w gpa 0x20" %
                         self.name(1))
        self.assertRegex(r.stdout, r"policy e2e-lock: [1-9]\d* hits")
        self.assertRegex(r.stdout, r"total: [1-9]\d* violations")
        self.assertNotIn("e2e-lock", [s.policy.name for s in self.client.policies()])
        r = self.example("lock_kernel_text.py", "no-such-vm", "--duration", "1")
        self.assertEqual(r.returncode, 1)
        self.assertIn("NOT_FOUND", r.stderr)


if __name__ == "__main__":
    unittest.main()
