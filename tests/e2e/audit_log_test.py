"""The audit log (--audit_log=PATH) end to end: the real kvmid, kvmi-sim guests, the Python client
as root and as uid 65534 (setpriv, unix_peer.py).

- a WritePhysical, an ApplyPolicy, a DeletePolicy and denied calls each write one JSON line,
  checked field by field (time in RFC 3339 with nanoseconds, identity, peer, rpc, guest UUID and
  name, argument summary, code, message, duration_ns); the bytes written are nowhere in the file;
- read-only calls as root write nothing;
- logrotate: the file renamed and SIGHUP, new records go to a new file at PATH, the old one keeps
  what it had;
- a failing sink (PATH a symlink to /dev/full: every write(2) is ENOSPC): mutating calls fail
  with UNAVAILABLE saying why and do not happen, reads still work;
- refusals by a limit (RESOURCE_EXHAUSTED) are audited for every RPC, a read-only stream too
  (WatchVMs past limits.streams_per_identity), with the limit's name, once per identity and
  limit per second: a flood of oversized ApplyPolicy calls writes a bounded number of lines
  whose "suppressed" counts add up to every refusal;
- a UNIX caller's peer is the API socket's path and its SO_PEERCRED pid/uid/gid."""

import base64
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import unittest

import kvmi_client as kc
from tests.test_support import stop_process, wait_for

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # unix_peer.py beside this
from unix_peer import Peer  # noqa: E402

KVMID = "daemon/kvmid"
KVMI_SIM = "kernel/sim/kvmi-sim"
VMS = ["sim-vm-0000", "sim-vm-0001"]
GPA = 0x5000
SECRET = b"AUDIT-SECRET-7f3a9c"
RFC3339_NS = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\.(\d{9})Z$")
FIELDS = {"time", "identity", "peer", "rpc", "guest", "args", "code", "message", "duration_ns"}


def parse_time(text):
    """RFC 3339 with exactly nine fractional digits, UTC -> seconds since the epoch (float)."""
    m = RFC3339_NS.match(text)
    if not m:
        raise AssertionError("not RFC 3339 with nanoseconds: %r" % text)
    whole = datetime.datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S").replace(
        tzinfo=datetime.timezone.utc)
    return whole.timestamp() + int(m.group(2)) / 1e9


class Node:
    """kvmid with --audit_log and two kvmi-sim guests; the API socket is 0666 so that uid 65534
    can connect and be refused by kvmid itself."""

    def __init__(self, test, audit_path=None, config=None):
        self.dir = tempfile.mkdtemp(prefix="kvmid-audit-", dir="/tmp")
        os.chmod(self.dir, 0o755)
        self.api = os.path.join(self.dir, "api.sock")
        self.audit = audit_path or os.path.join(self.dir, "audit.log")
        self.procs = []
        test.addCleanup(self.close)
        self.log = open(os.path.join(self.dir, "kvmid.log"), "w+")
        extra = []
        if config is not None:
            path = os.path.join(self.dir, "kvmid.textproto")
            with open(path, "w") as f:
                f.write(config)
            extra.append("--config=" + path)
        self.kvmid = subprocess.Popen(
            [KVMID, "--kvmi_socket=%s/kvmi.sock" % self.dir, "--api_socket=" + self.api,
             "--api_socket_mode=0666", "--audit_log=" + self.audit, "--log_events=none",
             "--metrics_address=", "--state_dir=%s/state" % self.dir] + extra,
            stdout=self.log, stderr=subprocess.STDOUT)
        self.procs.append(self.kvmid)
        wait_for(lambda: os.path.exists(self.api) or self.kvmid.poll() is not None, 20,
                 "kvmid's API socket")
        test.assertIsNone(self.kvmid.poll(), self.log_text())
        self.procs.append(subprocess.Popen(
            [KVMI_SIM, "--connect=unix:%s/kvmi.sock" % self.dir, "--vms=%d" % len(VMS),
             "--vcpus=1", "--scenario=mixed", "--rate=5", "--duration=120", "--reconnect=0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        self.root = kc.Client("unix:" + self.api, timeout=10)
        test.addCleanup(self.root.close)
        wait_for(lambda: sorted(vm.name for vm in self.root.list_vms()
                                if vm.state == kc.pb.VM_STATE_HOOKED) == VMS, 20,
                 "two hooked guests")
        self.uuid = {vm.name: vm.uuid for vm in self.root.list_vms()}

    def log_text(self):
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def close(self):
        for proc in reversed(self.procs):
            stop_process(proc)
        self.log.close()


def read_lines(path):
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    return [json.loads(line) for line in data.decode("utf-8").splitlines()]


class AuditLogRecords(unittest.TestCase):
    def setUp(self):
        self.node = Node(self)

    def next_lines(self, count, path=None):
        """Waits for `count` more lines than self.seen; returns them."""
        path = path or self.node.audit
        lines = wait_for(lambda: (lambda all_: all_[self.seen:] if len(all_) >= self.seen + count
                                  else None)(read_lines(path)), 10,
                         "%d more audit lines in %s" % (count, path))
        self.assertEqual(len(lines), count, lines)
        self.seen += count
        return lines

    def assertRecord(self, line, rpc, code, identity, guest=None, started=None, finished=None):
        self.assertEqual(set(line), FIELDS, line)
        self.assertEqual(line["rpc"], rpc)
        self.assertEqual(line["code"], code, line)
        t = parse_time(line["time"])
        if started is not None:
            # The record's time is when the call started (1 s of slack for clock granularity).
            self.assertGreaterEqual(t, started - 1, line)
            self.assertLessEqual(t, finished + 1, line)
        self.assertIsInstance(line["duration_ns"], int)
        self.assertGreaterEqual(line["duration_ns"], 0)
        if started is not None:
            self.assertLessEqual(line["duration_ns"], (finished - started + 1) * 1e9)
        for key, value in identity.items():
            self.assertEqual(line["identity"].get(key), value, line["identity"])
        # A UNIX caller's peer: the API socket's path and the connection's SO_PEERCRED (not
        # gRPC's "fd:N" for the descriptor kvmid hands it).
        m = re.match(r"^unix:(\S+) pid=(\d+) uid=(\d+) gid=(\d+)$", line["peer"])
        self.assertIsNotNone(m, line["peer"])
        self.assertEqual(m.group(1), self.node.api)
        self.assertEqual(int(m.group(3)), line["identity"]["uid"])
        self.assertEqual(int(m.group(4)), line["identity"]["gid"])
        if "pid" in line["identity"]:
            self.assertEqual(int(m.group(2)), line["identity"]["pid"])
        if guest is None:
            self.assertEqual(line["guest"], {"uuid": "", "name": ""})
        else:
            self.assertEqual(line["guest"], {"uuid": self.node.uuid[guest], "name": guest})
        self.assertIsInstance(line["args"], dict)
        self.assertIsInstance(line["message"], str)
        if code == "OK":
            self.assertEqual(line["message"], "")

    ROOT = {"kind": "unix", "uid": 0, "gid": 0}

    def test_write_and_policy_changes_are_audited_reads_are_not(self):
        node = self.node
        self.seen = len(read_lines(node.audit))
        vm = VMS[0]
        uuid = node.uuid[vm]

        started = time.time()
        node.root.write_physical(uuid, GPA, SECRET)
        finished = time.time()
        (line,) = self.next_lines(1)
        self.assertRecord(line, "WritePhysical", "OK", self.ROOT, vm, started, finished)
        if "pid" in line["identity"]:
            self.assertEqual(line["identity"]["pid"], os.getpid())  # this process connected
        self.assertEqual(line["peer"], "unix:%s pid=%d uid=0 gid=0" % (node.api, os.getpid()))
        self.assertEqual(line["args"]["gpa"], "0x%x" % GPA)
        self.assertEqual(line["args"]["size"], len(SECRET))
        self.assertEqual(line["args"].get("vm"), uuid)

        policy = kc.protect_pages_policy("audited", 0x1000, 0x1fff, allowed="r")
        started = time.time()
        node.root.apply_policy(policy)
        node.root.delete_policy("audited")
        finished = time.time()
        applied, deleted = self.next_lines(2)
        self.assertRecord(applied, "ApplyPolicy", "OK", self.ROOT, None, started, finished)
        self.assertEqual(applied["args"]["policy"], "audited")
        self.assertEqual(applied["args"]["rule"], "protect_pages")
        self.assertRecord(deleted, "DeletePolicy", "OK", self.ROOT, None, started, finished)
        self.assertEqual(deleted["args"], {"policy": "audited", "etag_given": False,
                                           "override_config": False})
        self.assertNotIn("overrode_config", applied["args"])  # its own name: no override
        self.assertLessEqual(parse_time(applied["time"]), parse_time(deleted["time"]))

        # A failed mutating call is audited with its code.
        with self.assertRaises(kc.NotFound):
            node.root.delete_policy("no-such-policy")
        (missing,) = self.next_lines(1)
        self.assertRecord(missing, "DeletePolicy", "NOT_FOUND", self.ROOT)
        self.assertIn("no-such-policy", missing["message"])

        # Read-only calls as root: no line. The NOT_FOUND DeletePolicy after them is the marker:
        # it must be the very next line.
        node.root.list_vms()
        node.root.get_vm(vm)
        self.assertEqual(node.root.read_physical(vm, GPA, len(SECRET)), SECRET)
        node.root.get_registers(vm, 0)
        node.root.policies()
        with self.assertRaises(kc.NotFound):
            node.root.delete_policy("marker")
        (marker,) = self.next_lines(1)
        self.assertEqual((marker["rpc"], marker["args"]),
                         ("DeletePolicy", {"policy": "marker", "etag_given": False,
                                           "override_config": False}))

        # Never the bytes written, in any encoding.
        with open(node.audit, "rb") as f:
            raw = f.read()
        for form in (SECRET, SECRET.hex().encode(), SECRET.hex().upper().encode(),
                     base64.b64encode(SECRET), base64.b64encode(SECRET[1:])[:16]):
            self.assertNotIn(form, raw)
        self.assertEqual(os.stat(node.audit).st_mode & 0o777, 0o600)

    def test_denied_calls_of_another_uid(self):
        node = self.node
        peer = Peer(node.dir)
        reason = peer.unavailable_reason()
        if reason:
            self.skipTest(reason)
        self.seen = len(read_lines(node.audit))
        vm = VMS[1]
        started = time.time()
        write, listed = peer.run(65534, 65534, "unix:" + node.api,
                                 [["write_physical", vm, GPA, SECRET.hex()], ["list_vms"]])
        finished = time.time()
        self.assertEqual(write.get("code"), "PERMISSION_DENIED", write)
        self.assertEqual(listed.get("code"), "PERMISSION_DENIED", listed)
        denied_write, denied_list = self.next_lines(2)
        nobody = {"kind": "unix", "uid": 65534, "gid": 65534}
        self.assertRecord(denied_write, "WritePhysical", "PERMISSION_DENIED", nobody, vm,
                          started, finished)
        self.assertEqual(denied_write["message"], write["message"])
        for needle in ("WritePhysical", vm, '"admin"', "uid=65534"):
            self.assertIn(needle, denied_write["message"])
        self.assertEqual(denied_write["args"]["gpa"], "0x%x" % GPA)
        self.assertEqual(denied_write["args"]["size"], len(SECRET))
        # A denied read is audited too (every denied call).
        self.assertRecord(denied_list, "ListVMs", "PERMISSION_DENIED", nobody, None,
                          started, finished)
        with open(node.audit, "rb") as f:
            self.assertNotIn(SECRET.hex().encode(), f.read())
        self.assertNotEqual(node.root.read_physical(vm, GPA, len(SECRET)), SECRET)

    def test_sighup_reopens_the_file_for_logrotate(self):
        node = self.node
        self.seen = len(read_lines(node.audit))
        node.root.write_physical(VMS[0], GPA, b"before")
        self.next_lines(1)
        before = read_lines(node.audit)
        self.assertEqual(before[-1]["rpc"], "WritePhysical")
        rotated = node.audit + ".1"
        os.rename(node.audit, rotated)  # what logrotate does (without copytruncate)
        node.kvmid.send_signal(signal.SIGHUP)
        wait_for(lambda: os.path.exists(node.audit), 10, "the audit log reopened at its path")
        node.root.write_physical(VMS[1], GPA, b"after")
        self.seen = 0
        (after,) = self.next_lines(1)
        self.assertRecord(after, "WritePhysical", "OK", self.ROOT, VMS[1])
        self.assertEqual(after["args"]["size"], len(b"after"))
        self.assertEqual(read_lines(rotated), before, "the rotated file kept its lines, only")
        self.assertEqual(os.stat(node.audit).st_mode & 0o777, 0o600)
        self.assertIsNone(node.kvmid.poll())


class LimitRefusals(unittest.TestCase):
    """Refusals by a limit, audited once per identity and limit per second."""

    STREAMS = 2

    def setUp(self):
        self.node = Node(self, config="limits { streams_per_identity: %d }\n" % self.STREAMS)
        self.seen = len(read_lines(self.node.audit))

    def refusals(self, rpc):
        return [line for line in read_lines(self.node.audit)[self.seen:]
                if line["rpc"] == rpc and line["code"] == "RESOURCE_EXHAUSTED"]

    def test_a_refused_stream_is_audited_with_its_limit(self):
        node = self.node
        streams = [node.root.watch_vms() for _ in range(self.STREAMS)]
        for stream in streams:
            next(stream)  # open: the current guests come first
        started = time.time()
        refused = node.root.watch_vms()
        with self.assertRaises(Exception) as caught:
            next(refused)
        finished = time.time()
        self.assertIn("streams_per_identity", str(caught.exception))
        for stream in streams:
            stream.cancel()
        (line,) = wait_for(lambda: self.refusals("WatchVMs") or None, 10,
                           "the WatchVMs refusal's audit line")
        self.assertEqual(set(line), FIELDS, line)
        self.assertEqual(line["identity"]["kind"], "unix")
        self.assertEqual(line["identity"]["uid"], 0)
        self.assertEqual(line["peer"], "unix:%s pid=%d uid=0 gid=0" % (node.api, os.getpid()))
        self.assertEqual(line["guest"], {"uuid": "", "name": ""})
        self.assertEqual(line["args"], {"limit": "streams_per_identity", "suppressed": 0})
        self.assertIn("limits.streams_per_identity", line["message"])
        t = parse_time(line["time"])
        self.assertGreaterEqual(t, started - 1)
        self.assertLessEqual(t, finished + 1)

    def test_an_attach_claim_over_the_deadline_limit_is_audited(self):
        started = time.time()
        with self.assertRaises(kc.KvmiError) as caught:
            handler = self.node.root.attach("greedy", deadline_ms=60000)
            handler.next_event(timeout=10)  # the refusal ends the stream
        self.assertIn("limits.max_attach_deadline_ms", str(caught.exception))
        (line,) = wait_for(lambda: self.refusals("Attach") or None, 10,
                           "the Attach claim refusal's audit line")
        self.assertEqual(set(line), FIELDS, line)
        self.assertEqual(line["identity"]["uid"], 0)
        self.assertEqual(line["args"], {"limit": "max_attach_deadline_ms", "suppressed": 0})
        self.assertIn("60000 ms", line["message"])
        self.assertGreaterEqual(parse_time(line["time"]), started - 1)

    def test_a_refusal_flood_is_rate_limited_and_every_refusal_is_counted(self):
        node = self.node
        policy = kc.protect_pages_policy("wordy", 0x1000, 0x1fff)
        policy.description = "d" * 5000  # over max_policy_description_bytes (4096)
        calls = 0
        start = time.time()
        last_call = 0.0
        while time.time() - start < 3.0:
            call_start = time.time()
            with self.assertRaises(kc.KvmiError) as caught:
                node.root.apply_policy(policy)
            last_call = time.time() - call_start
            self.assertIn("limits.max_policy_description_bytes", caught.exception.message)
            calls += 1
        elapsed = time.time() - start
        # The tarpit (daemon/api/tarpit.h): a caller refused again and again waits longer for each
        # refusal, up to 500 ms, so one client's loop cannot flood kvmid with refused calls.
        self.assertGreaterEqual(last_call, 0.45, "the tarpit's delay after repeated refusals")
        # One more in a later second: it is written, with what was left out since.
        flood_end = int(time.time())
        wait_for(lambda: int(time.time()) > flood_end, 3, "the next second")
        with self.assertRaises(kc.KvmiError):
            node.root.apply_policy(policy)
        calls += 1
        lines = wait_for(lambda: (lambda r: r if r and parse_time(r[-1]["time"]) > flood_end
                                  else None)(self.refusals("ApplyPolicy")),
                         10, "the last refusal's line")
        # More refusals than the lines allowed for the flood: some were suppressed.
        self.assertGreater(calls, int(elapsed) + 4, "a flood of refusals")
        # At most one line per second of the flood, plus the last one.
        self.assertLessEqual(len(lines), int(elapsed) + 3, lines)
        for line in lines:
            self.assertEqual(line["identity"]["uid"], 0)
            self.assertEqual(line["args"]["policy"], "wordy")
            self.assertEqual(line["args"]["limit"], "max_policy_description_bytes")
            self.assertIn("5000 bytes", line["message"])
        self.assertEqual(sum(1 + line["args"]["suppressed"] for line in lines), calls)
        self.assertEqual(node.root.policies(), [])


class FailingAuditSink(unittest.TestCase):
    def test_mutating_calls_fail_unavailable_reads_still_work(self):
        # /dev/full: open(2) succeeds, every write(2) fails with ENOSPC (a disk that filled up).
        d = tempfile.mkdtemp(prefix="kvmid-full-", dir="/tmp")
        path = os.path.join(d, "audit.log")
        os.symlink("/dev/full", path)
        node = Node(self, audit_path=path)
        vm = VMS[0]
        # The sink's failure is not known before its first write: this first call runs, and is
        # answered UNAVAILABLE ("done, but the audit log failed"). From here on it is known.
        try:
            node.root.write_physical(vm, GPA, b"baseline")
        except kc.Unavailable as e:
            self.assertIn("No space left on device", e.message)
        errors = []
        for call in (lambda: node.root.write_physical(vm, GPA, b"FORBIDDEN"),
                     lambda: node.root.apply_policy(
                         kc.protect_pages_policy("unaudited", 0x1000, 0x1fff)),
                     lambda: node.root.pause(vm, 0)):
            with self.assertRaises(kc.Unavailable) as caught:
                call()
            errors.append(caught.exception.message)
        for message in errors:
            self.assertIn("audit log", message)
            self.assertIn(path, message)
            self.assertIn("No space left on device", message)
        # Refused, not done: the memory and the policies are as they were.
        self.assertNotEqual(node.root.read_physical(vm, GPA, 9), b"FORBIDDEN")
        self.assertEqual(node.root.policies(), [])
        # Reads still work.
        self.assertEqual(sorted(vm.name for vm in node.root.list_vms()), VMS)
        node.root.get_vm(vm)
        node.root.get_registers(vm, 0)
        self.assertIsNone(node.kvmid.poll())


if __name__ == "__main__":
    unittest.main()
