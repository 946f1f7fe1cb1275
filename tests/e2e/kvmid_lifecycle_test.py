"""kvmid as a node service, with the real binaries: one instance per socket directory (a second
one is refused and touches nothing; a killed one's stale sockets are replaced), SIGHUP
reloads the configuration without dropping a guest (an invalid one is refused, the old one
stays; so is one whose configured policies plus the API's would pass limits.max_policies), and
SIGTERM with open streams ends them at once (UNAVAILABLE "kvmid is shutting down") and exits
quickly instead of waiting a grace period for streams that never end."""

import json
import os
import signal
import subprocess
import tempfile
import time
import unittest

import kvmi_client as kc
from tests.test_support import stop_process, wait_for

KVMID = "daemon/kvmid"
KVMI_SIM = "kernel/sim/kvmi-sim"
VMS = 2


class Node:
    """A socket directory with a kvmid (log in a file) and simulated guests."""

    def __init__(self, test):
        self.test = test
        self.dir = tempfile.mkdtemp(prefix="kvmid-life-", dir="/tmp")
        self.kvmi = os.path.join(self.dir, "kvmi.sock")
        self.api = os.path.join(self.dir, "api.sock")
        self.procs = []
        test.addCleanup(self.close)

    def flags(self):
        return ["--kvmi_socket=" + self.kvmi, "--api_socket=" + self.api, "--log_events=none",
                "--state_dir=" + os.path.join(self.dir, "state"), "--metrics_address="]

    def start_kvmid(self, *extra, log_name="kvmid.log"):
        log = open(os.path.join(self.dir, log_name), "w+")
        proc = subprocess.Popen([KVMID, *self.flags(), *extra], stdout=log,
                                stderr=subprocess.STDOUT)
        proc.log = log
        self.procs.append(proc)
        wait_for(lambda: os.path.exists(self.api) and os.path.exists(self.kvmi), 10,
                 "kvmid's sockets")
        return proc

    def start_guests(self):
        sim = subprocess.Popen(
            [KVMI_SIM, "--connect=unix:" + self.kvmi, "--vms=%d" % VMS, "--vcpus=2",
             "--scenario=mixed", "--rate=20", "--duration=120", "--reconnect=0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(sim)
        return sim

    def client(self):
        return kc.Client("unix:" + self.api, timeout=10)

    def hooked(self, client):
        try:
            return [vm for vm in client.list_vms() if vm.state == kc.pb.VM_STATE_HOOKED]
        except kc.KvmiError:
            return []

    def wait_hooked(self, client, count=VMS):
        return wait_for(lambda: len(self.hooked(client)) == count and self.hooked(client), 20,
                        "%d hooked guests" % count)

    @staticmethod
    def log_text(proc):
        proc.log.flush()
        proc.log.seek(0)
        return proc.log.read()

    def close(self):
        for proc in reversed(self.procs):
            stop_process(proc)


class SingleInstance(unittest.TestCase):
    def test_a_second_kvmid_is_refused_and_the_first_keeps_serving(self):
        node = Node(self)
        first = node.start_kvmid()
        node.start_guests()
        client = node.client()
        node.wait_hooked(client)
        sockets = {path: os.stat(path).st_ino for path in (node.kvmi, node.api)}

        second = subprocess.run([KVMID, *node.flags()], capture_output=True, text=True,
                                timeout=20)
        self.assertNotEqual(second.returncode, 0)
        self.assertIn("pid %d" % first.pid, second.stderr)
        self.assertIn("kvmid.lock", second.stderr)
        # Nothing of the first one's was touched: same socket files, same guests, still served.
        for path, inode in sockets.items():
            self.assertEqual(os.stat(path).st_ino, inode, path)
        self.assertIsNone(first.poll())
        vms = node.wait_hooked(client)
        self.assertEqual(sorted(vm.connections for vm in vms), [1] * VMS)
        self.assertEqual(len(client.policies()), 0)
        client.apply_policy(kc.protect_pages_policy("after-refusal", 0x1000, 0x1fff))
        self.assertEqual([p.policy.name for p in client.policies()], ["after-refusal"])
        stop_process(first)
        self.assertEqual(first.returncode, 0)

    def test_the_stale_sockets_of_a_killed_kvmid_are_replaced(self):
        node = Node(self)
        killed = node.start_kvmid(log_name="killed.log")
        killed.kill()
        killed.wait()
        self.assertTrue(os.path.exists(node.kvmi), "SIGKILL leaves the socket file behind")
        fresh = node.start_kvmid()
        # (Inode numbers are reused at once, so the proof is a live listener, not a new inode.)
        wait_for(lambda: "kvmid listening on" in node.log_text(fresh), 10, "the fresh listener")
        self.assertIsNone(fresh.poll())
        node.start_guests()
        node.wait_hooked(node.client())
        stop_process(fresh)
        self.assertEqual(fresh.returncode, 0)


CONFIG_A = """
guest_labels { name: "sim-vm-0000" labels { key: "tier" value: "dev" } }
verdicts { default_deadline_ms: 300 }
policies { name: "cfg-sysenter" lock_msr { msr: 0x176 } mode: MODE_ENFORCE }
"""

CONFIG_B = """
guest_labels { name: "sim-vm-0000" labels { key: "tier" value: "prod" } }
verdicts { default_deadline_ms: 500 default_fallback: ACTION_CONTINUE }
policies { name: "cfg-wp" forbid_cr_bits_clear { cr: 0 bits: 0x10000 } mode: MODE_ENFORCE }
"""

CONFIG_BAD = """
policies { name: "cfg-broken" protect_pages { gpa_first: 0 gpa_last: 4095 allowed: "rq" } mode: MODE_ENFORCE }
"""


class SighupReload(unittest.TestCase):
    def write_config(self, path, text):
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.rename(path + ".tmp", path)

    def test_policies_change_without_dropping_a_guest_and_a_bad_config_is_refused(self):
        node = Node(self)
        config = os.path.join(node.dir, "kvmid.textproto")
        self.write_config(config, CONFIG_A)
        kvmid = node.start_kvmid("--config=" + config)
        node.start_guests()
        client = node.client()
        node.wait_hooked(client)
        client.apply_policy(kc.protect_pages_policy("api-data", 0x2000, 0x2fff, allowed="r"))

        def names():
            return sorted(p.policy.name for p in client.policies())

        self.assertEqual(names(), ["api-data", "cfg-sysenter"])
        self.write_config(config, CONFIG_B)
        kvmid.send_signal(signal.SIGHUP)
        wait_for(lambda: names() == ["api-data", "cfg-wp"], 10, "the reloaded policies")
        wait_for(lambda: "configuration reloaded" in node.log_text(kvmid), 10, "the reload log")
        self.assertIsNone(kvmid.poll(), "SIGHUP does not stop kvmid")
        vms = node.wait_hooked(client)
        self.assertEqual(sorted(vm.connections for vm in vms), [1] * VMS, "no guest reconnected")
        self.assertNotIn("session closed", node.log_text(kvmid))

        # An API override of a configured policy needs override_config and lasts until the
        # next reload, which puts the file's version back (docs/OPERATING.md).
        monitor_wp = ('name: "cfg-wp" mode: MODE_MONITOR '
                      'forbid_cr_bits_clear { cr: 0 bits: 0x10000 }')
        with self.assertRaises(kc.FailedPrecondition):
            client.apply_policy(monitor_wp, allow_replace=True)
        self.assertTrue(client.apply_policy(monitor_wp, allow_replace=True,
                                            override_config=True).overrode_config)

        def wp():
            return [p for p in client.list_policies() if p.policy.name == "cfg-wp"][0]
        self.assertEqual((wp().origin, wp().policy.mode),
                         (kc.pb.POLICY_ORIGIN_API_OVERRIDE, kc.policy_pb.MODE_MONITOR))
        kvmid.send_signal(signal.SIGHUP)
        wait_for(lambda: wp().origin == kc.pb.POLICY_ORIGIN_CONFIG, 10, "the file's cfg-wp")
        self.assertEqual(wp().policy.mode, kc.policy_pb.MODE_ENFORCE)
        wait_for(lambda: "API override of configured policy cfg-wp" in node.log_text(kvmid), 10,
                 "the override's end in the log")

        self.write_config(config, CONFIG_BAD)
        kvmid.send_signal(signal.SIGHUP)
        wait_for(lambda: "new configuration refused" in node.log_text(kvmid), 10,
                 "the refusal log")
        text = node.log_text(kvmid)
        self.assertIn("policies[0] (cfg-broken)", text)
        self.assertIsNone(kvmid.poll())
        self.assertEqual(names(), ["api-data", "cfg-wp"])
        node.wait_hooked(client)

        stop_process(kvmid)
        self.assertEqual(kvmid.returncode, 0)
        self.assertNotIn("session closed: peer", node.log_text(kvmid))


def write_atomically(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.rename(path + ".tmp", path)


CONFIG_TWO_MAX = """
limits { max_policies: 2 }
policies { name: "cfg-sysenter" lock_msr { msr: 0x176 } mode: MODE_ENFORCE }
"""

CONFIG_TWO_MAX_MORE = CONFIG_TWO_MAX + """
policies { name: "cfg-wp" forbid_cr_bits_clear { cr: 0 bits: 0x10000 } mode: MODE_ENFORCE }
"""


class ReloadPolicyCount(unittest.TestCase):
    def test_a_reload_past_max_policies_is_refused_and_the_old_config_stays(self):
        node = Node(self)
        config = os.path.join(node.dir, "kvmid.textproto")
        write_atomically(config, CONFIG_TWO_MAX)
        kvmid = node.start_kvmid("--config=" + config)
        client = node.client()
        wait_for(lambda: len(client.policies()) == 1, 10, "the configured policy")
        client.apply_policy(kc.protect_pages_policy("api-data", 0x2000, 0x2fff, allowed="r"))
        # 2 configured + 1 from the API = 3 > max_policies 2: refused, named, nothing changes.
        write_atomically(config, CONFIG_TWO_MAX_MORE)
        kvmid.send_signal(signal.SIGHUP)
        wait_for(lambda: "new configuration refused" in node.log_text(kvmid), 10,
                 "the refusal log")
        text = node.log_text(kvmid)
        self.assertIn("limits.max_policies", text)
        self.assertIn("3 policies", text)
        self.assertEqual(sorted(p.policy.name for p in client.policies()),
                         ["api-data", "cfg-sysenter"])
        self.assertIsNone(kvmid.poll())
        stop_process(kvmid)
        self.assertEqual(kvmid.returncode, 0)


class ShutdownWithOpenStreams(unittest.TestCase):
    STREAMS = 100

    def test_sigterm_ends_open_streams_at_once_and_exits_quickly(self):
        node = Node(self)
        config = os.path.join(node.dir, "kvmid.textproto")
        with open(config, "w") as f:
            f.write("limits { streams_per_identity: %d }\n" % (self.STREAMS + 10))
        kvmid = node.start_kvmid("--config=" + config)
        node.start_guests()
        clients = [node.client() for _ in range(4)]
        for client in clients:
            self.addCleanup(client.close)
        node.wait_hooked(clients[0])
        # WatchVMs answers at once with the current guests, so each stream is known to be open
        # (StreamEvents and Attach are ended by the same mechanism: //daemon/api:server_test).
        streams = []
        for i in range(self.STREAMS):
            stream = clients[i % len(clients)].watch_vms()
            next(stream)
            streams.append(stream)
        started = time.monotonic()
        kvmid.send_signal(signal.SIGTERM)
        kvmid.wait(timeout=30)
        took = time.monotonic() - started
        self.assertEqual(kvmid.returncode, 0)
        codes = {}
        for stream in streams:
            try:
                for _ in stream:
                    pass
                codes["ended without a status"] = codes.get("ended without a status", 0) + 1
            except Exception as e:  # grpc.RpcError
                key = "%s: %s" % (e.code().name, e.details())
                codes[key] = codes.get(key, 0) + 1
        self.assertEqual(codes, {"UNAVAILABLE: kvmid is shutting down": self.STREAMS})
        # The guests unhook within a few hundred ms; the streams no longer hold the API's grace.
        self.assertLess(took, 3.0, node.log_text(kvmid))
        self.assertIn("%d open streams ended" % self.STREAMS, node.log_text(kvmid))


class JsonLogs(unittest.TestCase):
    def test_every_line_is_json_and_guest_lines_carry_uuid_and_name(self):
        node = Node(self)
        kvmid = node.start_kvmid("--log_format=json")
        node.start_guests()
        node.wait_hooked(node.client())
        stop_process(kvmid)
        self.assertEqual(kvmid.returncode, 0)
        lines = [json.loads(line) for line in node.log_text(kvmid).splitlines() if line]
        self.assertTrue(lines)
        for line in lines:
            self.assertEqual(set(line) - {"vm_name", "vm_uuid"}, {"time", "level", "msg"}, line)
        about_guests = [line for line in lines if "vm_uuid" in line]
        names = {line["vm_name"] for line in about_guests}
        self.assertEqual(names, {"sim-vm-%04d" % i for i in range(VMS)})
        for line in about_guests:
            self.assertRegex(line["vm_uuid"], r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-"
                             r"[0-9a-f]{4}-[0-9a-f]{12}$")
            self.assertIn(line["vm_uuid"], line["msg"])
        self.assertTrue(any("hooked" in line["msg"] for line in about_guests))


if __name__ == "__main__":
    unittest.main()
