"""Authorization of UNIX-socket callers by their peer credentials, with the real kvmid binary,
kvmi-sim guests and the Python client running as another uid (setpriv, see unix_peer.py):

- by default (no `authz` section) root is admin on every guest and uid 65534 is refused with
  PERMISSION_DENIED naming the RPC, the guest and the missing role; with unix_root_is_admin
  false, root has only what its uid binding gives it;
- a uid binding scoped to guests by name shows the caller only those guests (ListVMs; WatchVMs
  and StreamEvents, with CR3 events from every guest), lets it make its role's calls on them,
  and refuses it on the other guests and for calls of a higher role;
- the binding changed in the config file and SIGHUP: the new rules apply to the next call,
  without a restart, and no guest reconnects.

The API socket is created 0666 here (--api_socket_mode) so that uid 65534 reaches kvmid at all:
the default 0660 root:root would stop it at connect(2), and these tests are about what kvmid's
own authorization decides for a caller that can connect (the socket's mode under umask 000 is
tls_e2e_test.py's SocketModeUnderUmask000)."""

import os
import signal
import subprocess
import sys
import tempfile
import unittest

import kvmi_client as kc
from tests.test_support import stop_process, wait_for

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # unix_peer.py beside this
from unix_peer import Peer  # noqa: E402

KVMID = "daemon/kvmid"
KVMI_SIM = "kernel/sim/kvmi-sim"
NOBODY = 65534
VMS = ["sim-vm-0000", "sim-vm-0001", "sim-vm-0002"]
GPA = 0x3000


def binding(role, *names):
    guests = "".join(' names: "%s"' % n for n in names)
    return 'bindings { uid: %d role: "%s" guests {%s } }' % (NOBODY, role, guests)


class Node:
    """kvmid (API socket 0666, config file) with three kvmi-sim guests."""

    def __init__(self, test, config=None, peer=True, scenario="mixed", rate=5):
        self.test = test
        self.dir = tempfile.mkdtemp(prefix="kvmid-peer-", dir="/tmp")
        os.chmod(self.dir, 0o755)  # uid 65534 must reach api.sock inside
        if peer:
            # In a user namespace that maps only uid 0 (Bazel's linux-sandbox: hence the target's
            # "no-sandbox" tag) no process can become uid 65534.
            self.peer = Peer(self.dir)
            reason = self.peer.unavailable_reason()
            if reason:
                test.skipTest(reason)
        self.api = os.path.join(self.dir, "api.sock")
        self.config = os.path.join(self.dir, "kvmid.textproto")
        self.procs = []
        test.addCleanup(self.close)
        args = ["--kvmi_socket=%s/kvmi.sock" % self.dir, "--api_socket=" + self.api,
                "--api_socket_mode=0666", "--log_events=none", "--metrics_address=",
                "--state_dir=%s/state" % self.dir]
        if config is not None:
            self.write_config(config)
            args.append("--config=" + self.config)
        self.log = open(os.path.join(self.dir, "kvmid.log"), "w+")
        self.kvmid = subprocess.Popen([KVMID, *args], stdout=self.log, stderr=subprocess.STDOUT)
        self.procs.append(self.kvmid)
        wait_for(lambda: os.path.exists(self.api) or self.kvmid.poll() is not None, 20,
                 "kvmid's API socket")
        test.assertIsNone(self.kvmid.poll(), self.log_text())
        self.procs.append(subprocess.Popen(
            [KVMI_SIM, "--connect=unix:%s/kvmi.sock" % self.dir, "--vms=%d" % len(VMS),
             "--vcpus=1", "--scenario=" + scenario, "--rate=%d" % rate, "--duration=120",
             "--reconnect=0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        self.root = kc.Client("unix:" + self.api, timeout=10)
        test.addCleanup(self.root.close)
        # From kvmid's log, which does not depend on what root may list.
        wait_for(lambda: all(self.hook_line(vm) for vm in VMS), 20, "three hooked guests")

    def write_config(self, text):
        with open(self.config + ".tmp", "w") as f:
            f.write(text)
        os.rename(self.config + ".tmp", self.config)

    def hook_line(self, vm):
        """kvmid's log line saying `vm` was hooked ("" if none yet)."""
        return next((l for l in self.log_text().splitlines() if "vm %s " % vm in l
                     and ": hooked:" in l), "")

    def hooked(self):
        return sorted(vm.name for vm in self.root.list_vms()
                      if vm.state == kc.pb.VM_STATE_HOOKED)

    def log_text(self):
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def as_nobody(self, *calls):
        return self.peer.run(NOBODY, NOBODY, "unix:" + self.api, [list(c) for c in calls])

    def close(self):
        for proc in reversed(self.procs):
            stop_process(proc)
        self.log.close()


class UnixPeerAuthz(unittest.TestCase):
    def assertDenied(self, result, *needles):
        self.assertEqual(result.get("code"), "PERMISSION_DENIED", result)
        for needle in needles:
            self.assertIn(needle, result["message"])

    def assertOk(self, result, value=None):
        self.assertIn("ok", result, result)
        if value is not None:
            self.assertEqual(result["ok"], value)

    def test_root_is_admin_on_every_guest_by_default(self):
        node = Node(self, peer=False)
        root = node.root
        self.assertEqual(sorted(vm.name for vm in root.list_vms()), VMS)
        for vm in VMS:
            root.write_physical(vm, GPA, b"root-was-here")
            self.assertEqual(root.read_physical(vm, GPA, 13), b"root-was-here")
        root.apply_policy(kc.protect_pages_policy("root-policy", 0x1000, 0x1fff))
        self.assertEqual([p.policy.name for p in root.policies()], ["root-policy"])
        root.delete_policy("root-policy")
        root.pause(VMS[0], 0)
        root.resume(VMS[0], 0)

    def test_root_bound_like_any_caller_when_configured(self):
        node = Node(self, 'authz { unix_root_is_admin: false bindings { uid: 0 role: "viewer" '
                          'guests { names: "%s" } } }\n' % VMS[0], peer=False)
        self.assertEqual([vm.name for vm in node.root.list_vms()], [VMS[0]])
        with self.assertRaises(kc.KvmiError) as caught:
            node.root.write_physical(VMS[0], GPA, b"root")
        self.assertEqual(caught.exception.code.name, "PERMISSION_DENIED")
        for needle in ("WritePhysical", VMS[0], '"admin"', "uid=0", '"viewer"'):
            self.assertIn(needle, caught.exception.message)

    def test_other_uid_without_binding_is_refused_everything(self):
        node = Node(self)
        lst, get, read, write, pol, apply = node.as_nobody(
            ["list_vms"], ["get_vm", VMS[0]], ["read_physical", VMS[1], GPA, 8],
            ["write_physical", VMS[2], GPA, "4e4f424f4459"], ["policies"],
            ["apply_policy", "nobody-policy"])
        self.assertDenied(lst, "ListVMs", "viewer", "uid=65534")
        self.assertDenied(get, "GetVM", VMS[0], '"viewer"', "uid=65534")
        self.assertDenied(read, "ReadPhysical", VMS[1], '"operator"')
        self.assertDenied(write, "WritePhysical", VMS[2], '"admin"')
        self.assertDenied(pol, "ListPolicies")
        self.assertDenied(apply, "ApplyPolicy", '"admin"')
        # Nothing happened: no policy, the memory is not "NOBODY".
        self.assertEqual(node.root.policies(), [])
        self.assertNotEqual(node.root.read_physical(VMS[2], GPA, 6), b"NOBODY")

    def test_uid_binding_scoped_to_guests_by_name(self):
        node = Node(self, "authz { %s }\n" % binding("operator", VMS[0], VMS[1]))
        inside, outside = VMS[0], VMS[2]
        node.root.write_physical(inside, GPA, b"in-scope")
        r = node.as_nobody(
            ["list_vms"], ["list_vms"], ["get_vm", inside], ["get_vm", outside],
            ["read_physical", inside, GPA, 8], ["read_physical", outside, GPA, 8],
            ["get_registers", inside, 0], ["get_registers", outside, 0],
            ["pause", inside, 0], ["resume", inside, 0], ["pause", outside, 0],
            ["write_physical", inside, GPA, "4e4f424f4459"], ["apply_policy", "nobody-policy"],
            ["unhook", inside], ["policies"])
        self.assertOk(r[0], VMS[:2])  # ListVMs: only the guests in scope
        self.assertOk(r[1], VMS[:2])
        self.assertOk(r[2], inside)
        self.assertDenied(r[3], "GetVM", outside, '"viewer"', "uid=65534")
        self.assertOk(r[4], b"in-scope".hex())
        self.assertDenied(r[5], "ReadPhysical", outside, '"operator"')
        self.assertOk(r[6])
        self.assertDenied(r[7], "GetRegisters", outside, '"operator"')
        self.assertOk(r[8])
        self.assertOk(r[9])
        self.assertDenied(r[10], "PauseVCPU", outside, '"operator"')
        # Above its role, even in scope.
        self.assertDenied(r[11], "WritePhysical", inside, '"admin"', '"operator"')
        self.assertDenied(r[12], "ApplyPolicy", '"admin"')
        self.assertDenied(r[13], "UnhookVM", inside, '"admin"')
        self.assertOk(r[14], [])
        self.assertEqual(node.root.read_physical(inside, GPA, 8), b"in-scope")
        self.assertEqual(node.hooked(), VMS, "UnhookVM was refused: every guest still hooked")

    def test_streams_show_only_guests_in_scope(self):
        # Every guest writes CR3 50 times a second and root turns CR3 events on for each: every
        # guest produces events; the viewer's streams must carry only its guest's.
        node = Node(self, "authz { %s }\n" % binding("viewer", VMS[1]),
                    scenario="process-switch", rate=50)
        for vm in VMS:
            node.root.control_events(vm, events=["CR"], crs=[3])
        wait_for(lambda: all(vm.events > 10 for vm in node.root.list_vms()), 20,
                 "events from every guest")
        watched, streamed = node.as_nobody(["watch_vms", 2.0], ["stream_events", 3.0])
        with self.subTest("WatchVMs"):  # the KIND_EXISTING snapshot: the guest in scope only
            self.assertOk(watched, [VMS[1]])
        with self.subTest("StreamEvents"):  # only the guest in scope's events
            self.assertOk(streamed, [VMS[1]])

    def test_sighup_applies_a_changed_binding_without_dropping_a_guest(self):
        node = Node(self, "authz { %s }\n" % binding("viewer", VMS[0]))
        self.assertOk(node.as_nobody(["list_vms"])[0], [VMS[0]])
        connections = {vm.name: vm.connections for vm in node.root.list_vms()}

        # Another guest, a higher role: operator on sim-vm-0002 by label, viewer on -0000 kept.
        node.write_config(
            'guest_labels { name: "%s" labels { key: "team" value: "blue" } }\n'
            'authz { %s bindings { uid: %d role: "operator" guests { labels { key: "team" '
            'value: "blue" } } } }\n' % (VMS[2], binding("viewer", VMS[0]), NOBODY))
        node.kvmid.send_signal(signal.SIGHUP)
        wait_for(lambda: node.as_nobody(["list_vms"])[0].get("ok") == [VMS[0], VMS[2]], 20,
                 "the reloaded binding")
        r = node.as_nobody(["read_physical", VMS[2], GPA, 4], ["read_physical", VMS[0], GPA, 4],
                           ["get_vm", VMS[1]])
        self.assertOk(r[0])
        self.assertDenied(r[1], "ReadPhysical", VMS[0], '"operator"', '"viewer"')
        self.assertDenied(r[2], "GetVM", VMS[1])

        # The binding removed: refused again, still without a restart.
        node.write_config("authz { }\n")
        node.kvmid.send_signal(signal.SIGHUP)
        wait_for(lambda: node.as_nobody(["list_vms"])[0].get("code") == "PERMISSION_DENIED", 20,
                 "the binding's removal")
        self.assertIsNone(node.kvmid.poll(), "SIGHUP does not stop kvmid")
        self.assertEqual(node.hooked(), VMS)
        self.assertEqual({vm.name: vm.connections for vm in node.root.list_vms()}, connections,
                         "no guest reconnected")
        self.assertNotIn("session closed", node.log_text())
        # Root stays admin (unix_root_is_admin defaults to true with an authz section).
        node.root.write_physical(VMS[1], GPA, b"still-root")


if __name__ == "__main__":
    unittest.main()
