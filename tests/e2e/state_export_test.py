"""Persistent state and event export, with the real kvmid binary, kvmi-sim guests and the Python
client (docs/OPERATING.md):
  - a policy applied through the API survives SIGKILL and restart: listed, and enforced on the
    guests that reconnect;
  - a corrupt state file stops start-up with an error naming it; --state_recover=quarantine gets
    past it, keeping the bad file aside;
  - the JSON-lines export with a tiny size rotates and stays within max_files * max_bytes while
    a fleet runs, every line a JSON object with the time and node."""

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import unittest

import kvmi_client as kc
from tests.test_support import stop_process, wait_for

KVMID = "daemon/kvmid"
KVMI_SIM = "kernel/sim/kvmi-sim"
LSTAR = 0xC0000082
POLICY = ('name: "e2e-lstar" description: "applied through the API" mode: MODE_ENFORCE '
          'lock_msr { msr: 0xC0000082 }')


class Node:
    """One kvmid (restartable) and one kvmi-sim fleet that reconnects to it, in a short /tmp
    directory (UNIX socket paths are limited to 108 bytes)."""

    def __init__(self, test):
        self.test = test
        self.dir = tempfile.mkdtemp(prefix="kvmid-st-", dir="/tmp")
        self.kvmi = os.path.join(self.dir, "kvmi.sock")
        self.api = os.path.join(self.dir, "api.sock")
        self.cookie = os.path.join(self.dir, "cookie")
        self.state = os.path.join(self.dir, "state")
        self.state_file = os.path.join(self.state, "policies.txtpb")
        with open(self.cookie, "w") as f:
            f.write("state-cookie")
        self.kvmid = None
        self.sim = None
        self.runs = 0
        test.addCleanup(shutil.rmtree, self.dir, True)  # runs after stop (cleanups are LIFO)
        test.addCleanup(self.stop)

    def start_kvmid(self, *extra, expect_up=True):
        self.runs += 1
        self.log_path = os.path.join(self.dir, "kvmid-%d.log" % self.runs)
        self.log = open(self.log_path, "w+")
        self.kvmid = subprocess.Popen(
            [KVMID, "--kvmi_socket=" + self.kvmi, "--api_socket=" + self.api,
             "--cookie_file=" + self.cookie, "--state_dir=" + self.state, "--log_events=none",
             *extra], stdout=self.log, stderr=subprocess.STDOUT)
        if expect_up:
            wait_for(lambda: self.kvmid.poll() is not None or self.api_ready(), 15,
                     "kvmid's API")
            self.test.assertIsNone(self.kvmid.poll(), self.log_text())
        return self.kvmid

    def api_ready(self):
        if not os.path.exists(self.api):
            return False
        try:
            with kc.Client("unix:" + self.api, timeout=2) as c:
                c.list_vms()
            return True
        except kc.KvmiError:
            return False

    def log_text(self):
        self.log.flush()
        with open(self.log_path) as f:
            return f.read()

    def client(self):
        c = kc.Client("unix:" + self.api, timeout=10)
        self.test.addCleanup(c.close)
        return c

    def start_sim(self, vms=2, vcpus=2, rate=100):
        self.sim_log = open(os.path.join(self.dir, "sim.log"), "w")
        self.sim = subprocess.Popen(
            [KVMI_SIM, "--connect=unix:" + self.kvmi, "--cookie_file=" + self.cookie,
             "--vms=%d" % vms, "--vcpus=%d" % vcpus, "--scenario=mixed", "--rate=%d" % rate,
             "--duration=0", "--reconnect=0.2"], stdout=self.sim_log, stderr=subprocess.STDOUT)

    def hooked(self, client, n):
        wait_for(lambda: len([v for v in client.list_vms()
                              if kc.state_name(v.state) == "HOOKED"]) >= n, 20,
                 "%d guests hooked" % n)

    def stop(self):
        stop_process(self.sim)
        stop_process(self.kvmid)


def take(stream, n, timeout=15.0):
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


def lstar_events(client, n):
    return take(client.events(allow=kc.event_filter(events=["msr"], msrs=[LSTAR])), n)


class PoliciesSurviveSigkill(unittest.TestCase):
    def test_policy_survives_sigkill_and_restart(self):
        node = Node(self)
        node.start_kvmid()
        node.start_sim(vms=2)
        client = node.client()
        node.hooked(client, 2)
        self.assertFalse(client.apply_policy(POLICY).replaced)
        # Persisted before the call returned: the file holds it now.
        with open(node.state_file) as f:
            self.assertIn('name: "e2e-lstar"', f.read())
        for e in lstar_events(client, 2):
            self.assertEqual(e.decided_by, "policy:e2e-lstar")
        client.close()

        node.kvmid.send_signal(signal.SIGKILL)
        node.kvmid.wait(timeout=10)
        node.start_kvmid()  # the same state_dir; the guests reconnect on their own
        client = node.client()
        self.assertIn("restored 1 API policy from " + node.state_file, node.log_text())
        policies = {p.policy.name: p.policy for p in client.policies()}
        self.assertIn("e2e-lstar", policies)
        self.assertEqual(policies["e2e-lstar"].description, "applied through the API")
        node.hooked(client, 2)
        # Enforced on the reconnected guests: their LSTAR writes are kept out.
        events = lstar_events(client, 4)
        for e in events:
            self.assertEqual(e.decided_by, "policy:e2e-lstar")
            self.assertEqual(e.action, kc.policy_pb.ACTION_KEEP_OLD)
            self.assertTrue(e.kept_old_value)
            self.assertTrue(e.vm_name.startswith("sim-vm-"), e.vm_name)

        # A delete is persisted too: after another SIGKILL the policy stays gone.
        client.delete_policy("e2e-lstar")
        client.close()
        node.kvmid.send_signal(signal.SIGKILL)
        node.kvmid.wait(timeout=10)
        node.start_kvmid()
        client = node.client()
        self.assertNotIn("e2e-lstar", [p.policy.name for p in client.policies()])


class CorruptStateFile(unittest.TestCase):
    def make_state(self, node):
        node.start_kvmid()
        client = node.client()
        client.apply_policy(POLICY)
        client.close()
        node.kvmid.send_signal(signal.SIGKILL)
        node.kvmid.wait(timeout=10)

    def test_corrupt_file_stops_startup_and_quarantine_recovers(self):
        node = Node(self)
        self.make_state(node)
        with open(node.state_file) as f:
            content = f.read()
        # A damaged byte in the policy (same length): the checksum catches it.
        damaged = content.replace("0xC0000082", "0xC0000083").replace("3221225602", "3221225603")
        self.assertNotEqual(damaged, content)
        with open(node.state_file, "w") as f:
            f.write(damaged)

        for stale in (node.api, node.kvmi):  # left by the SIGKILLed kvmid
            os.unlink(stale)
        kvmid = node.start_kvmid(expect_up=False)
        self.assertEqual(kvmid.wait(timeout=15), 2)
        text = node.log_text()
        self.assertIn("state file " + node.state_file, text)
        self.assertIn("checksum mismatch", text)
        self.assertIn("--state_recover=quarantine", text)
        self.assertFalse(os.path.exists(node.api), "no API listener opened")
        self.assertFalse(os.path.exists(node.kvmi), "no guest listener opened")
        with open(node.state_file) as f:
            self.assertEqual(f.read(), damaged, "the bad file is left as it was")

        node.start_kvmid("--state_recover=quarantine")
        text = node.log_text()
        self.assertRegex(text, r"moved it to .*policies\.txtpb\.corrupt-\d{8}T")
        aside = glob.glob(node.state_file + ".corrupt-*")
        self.assertEqual(len(aside), 1)
        with open(aside[0]) as f:
            self.assertEqual(f.read(), damaged, "kept for inspection")
        client = node.client()
        self.assertEqual([p.policy.name for p in client.policies()], [])
        # And state works again from there.
        client.apply_policy(POLICY)
        self.assertTrue(os.path.exists(node.state_file))

    def test_truncated_file_is_refused_too(self):
        node = Node(self)
        self.make_state(node)
        with open(node.state_file, "r+") as f:
            f.truncate(os.path.getsize(node.state_file) // 2)
        kvmid = node.start_kvmid(expect_up=False)
        self.assertEqual(kvmid.wait(timeout=15), 2)
        self.assertIn("torn or edited", node.log_text())

    def test_bad_recovery_flag_is_refused(self):
        node = Node(self)
        kvmid = node.start_kvmid("--state_recover=reset", expect_up=False)
        self.assertEqual(kvmid.wait(timeout=15), 2)
        self.assertIn("--state_recover must be fail or quarantine", node.log_text())


class ExportRotation(unittest.TestCase):
    MAX_BYTES, MAX_FILES = 4096, 3

    def files(self, path):
        sizes = {}
        for name in glob.glob(path + "*"):
            try:
                sizes[name] = os.path.getsize(name)
            except FileNotFoundError:  # rotated away between the listing and the stat
                pass
        return sizes

    def test_export_rotates_within_its_bound_while_a_fleet_runs(self):
        node = Node(self)
        export_dir = os.path.join(node.dir, "export")
        os.mkdir(export_dir)
        path = os.path.join(export_dir, "events.jsonl")
        node.start_kvmid("--baseline=enforce", "--export_file=" + path,
                         "--export_max_bytes=%d" % self.MAX_BYTES,
                         "--export_max_files=%d" % self.MAX_FILES, "--node_name=export-node")
        node.start_sim(vms=4, vcpus=2, rate=200)
        client = node.client()
        node.hooked(client, 4)
        bound = self.MAX_BYTES * self.MAX_FILES
        seen = set()
        samples = 0
        start = time.monotonic()
        deadline = start + 30
        # Sample while it runs: the bound holds at every moment, and files keep rotating.
        while time.monotonic() < deadline:
            sizes = self.files(path)
            samples += 1
            self.assertLessEqual(len(sizes), self.MAX_FILES, sizes)
            self.assertLessEqual(sum(sizes.values()), bound, sizes)
            for size in sizes.values():
                self.assertLessEqual(size, self.MAX_BYTES)
            seen.update(sizes)
            if path + ".%d" % (self.MAX_FILES - 1) in seen and time.monotonic() > start + 3:
                break
            time.sleep(0.01)
        self.assertIn(path + ".%d" % (self.MAX_FILES - 1), seen, "rotated at least twice")
        self.assertNotIn(path + ".%d" % self.MAX_FILES, seen, "never more than max_files")

        node.stop()
        self.assertEqual(node.kvmid.returncode, 0)
        sizes = self.files(path)
        self.assertLessEqual(sum(sizes.values()), bound)
        records = []
        for name in sorted(sizes):
            with open(name) as f:
                for line in f:
                    self.assertTrue(line.endswith("\n"))
                    records.append(json.loads(line))
        types = {r["type"] for r in records}
        self.assertIn("event", types)
        for r in records:
            self.assertEqual(r["node"], "export-node")
            self.assertRegex(r["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z$")
        events = [r for r in records if r["type"] == "event"]
        self.assertTrue(any(r["decided_by"].startswith("policy:") for r in events))
        for r in events:
            self.assertIn(r["event"], ("CR", "MSR", "PF", "BREAKPOINT", "TRAP", "DESCRIPTOR",
                                       "XSETBV", "SINGLESTEP", "HYPERCALL", "PAUSE_VCPU",
                                       "CREATE_VCPU", "UNHOOK"))
            self.assertTrue(r["vm_name"].startswith("sim-vm-"), r)
        # The guests' last state changes (unhooked at SIGTERM) are in the newest file.
        with open(path) as f:
            last = [json.loads(l) for l in f]
        self.assertIn("guest", {r["type"] for r in last})
        text = node.log_text()
        match = re.search(r"export: (\d+) records written, (\d+) dropped", text)
        self.assertIsNotNone(match, text[-2000:])
        self.assertGreater(int(match.group(1)), len(records), "older records were rotated away")


if __name__ == "__main__":
    unittest.main()
