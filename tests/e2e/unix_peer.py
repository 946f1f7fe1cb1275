"""API calls from another UNIX uid, for the end-to-end tests of kvmid's peer-credential identity.

As a library (the tests, running as root): `Peer(workdir).run(uid, gid, target, calls)` copies
the repository's Python client (clients/python from the runfiles) and this file into `workdir`
(world-readable: the runfiles tree under /root is not), then runs this file as a child under
`setpriv --reuid --regid --clear-groups` so that kvmid sees the child's uid/gid through
SO_PEERCRED, and returns one result per call.

As a script (the child): reads the calls as JSON from argv[1], makes each one with
kvmi_client.Client on the target and prints, as JSON, {"uid":..., "gid":..., "results": [...]}
with one {"ok": value} or {"code": "PERMISSION_DENIED", "message": "..."} per call."""

import json
import os
import shutil
import subprocess
import sys

SETPRIV = "/usr/bin/setpriv"
RUNFILES_CLIENT = "clients/python"


class Peer:
    def __init__(self, workdir):
        self.workdir = workdir
        self.py = os.path.join(workdir, "peer-py")
        if not os.path.isdir(self.py):
            os.makedirs(self.py)
            shutil.copy(os.path.join(RUNFILES_CLIENT, "kvmi_client.py"), self.py)
            shutil.copytree(os.path.join(RUNFILES_CLIENT, "kvmi"), os.path.join(self.py, "kvmi"))
            shutil.copy(os.path.abspath(__file__), os.path.join(self.py, "unix_peer.py"))
            for root, dirs, files in os.walk(self.py):
                for name in dirs + files:
                    os.chmod(os.path.join(root, name), 0o755)
            os.chmod(self.py, 0o755)
        os.chmod(workdir, 0o755)

    def unavailable_reason(self):
        """None when a child can run as uid 65534 here, else why not (e.g. a user namespace
        with only uid 0 mapped)."""
        if not os.path.exists(SETPRIV):
            return "%s is not installed" % SETPRIV
        r = subprocess.run([SETPRIV, "--reuid=65534", "--regid=65534", "--clear-groups", "id",
                            "-u"], capture_output=True, text=True, cwd=self.workdir)
        if r.returncode != 0 or r.stdout.strip() != "65534":
            return "setpriv cannot switch to uid 65534 here (%s)" % (r.stderr.strip() or r.stdout)
        return None

    def run(self, uid, gid, target, calls, timeout=60):
        """Makes `calls` (lists: [method, args...], see _call) as uid:gid; returns the results."""
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": self.py, "PYTHONDONTWRITEBYTECODE": "1",
               "HOME": "/nonexistent"}
        r = subprocess.run(
            [SETPRIV, "--reuid=%d" % uid, "--regid=%d" % gid, "--clear-groups", "/usr/bin/python3",
             os.path.join(self.py, "unix_peer.py"), json.dumps({"target": target,
                                                                  "calls": calls})],
            capture_output=True, text=True, cwd=self.workdir, env=env, timeout=timeout)
        if r.returncode != 0:
            raise AssertionError("peer as uid %d failed (%d): %s" % (uid, r.returncode, r.stderr))
        out = json.loads(r.stdout)
        if (out["uid"], out["gid"]) != (uid, gid):
            raise AssertionError("peer ran as %s, not %d:%d" % (out, uid, gid))
        return out["results"]


# ---- the child ----------------------------------------------------------------------------------

def _call(kc, client, method, *args):
    if method == "list_vms":
        return sorted(vm.name for vm in client.list_vms())
    if method == "get_vm":
        return client.get_vm(args[0]).name
    if method == "read_physical":
        return client.read_physical(args[0], args[1], args[2]).hex()
    if method == "write_physical":
        client.write_physical(args[0], args[1], bytes.fromhex(args[2]))
        return None
    if method == "get_registers":
        client.get_registers(args[0], args[1])
        return None
    if method == "pause":
        client.pause(args[0], args[1])
        return None
    if method == "resume":
        client.resume(args[0], args[1])
        return None
    if method == "policies":
        return sorted(p.policy.name for p in client.policies())
    if method == "apply_policy":
        client.apply_policy(kc.protect_pages_policy(args[0], 0x1000, 0x1fff))
        return None
    if method == "delete_policy":
        client.delete_policy(args[0])
        return None
    if method == "unhook":
        client.unhook(args[0])
        return None
    if method == "watch_vms":
        # The guests the stream shows within a bounded window (`args[0]` seconds): the
        # KIND_EXISTING snapshot comes first, so the window only has to cover it.
        import grpc
        seen = set()
        client._connect()
        call = client._stub.WatchVMs(kc.pb.WatchVMsRequest(), timeout=args[0])
        try:
            for change in call:
                seen.add(change.vm.name)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise kc._wrap(e) from None
        return sorted(seen)
    if method == "stream_events":
        # The guests whose events the stream delivers within `args[0]` seconds.
        import grpc
        seen = set()
        client._connect()
        call = client._stub.StreamEvents(kc.pb.StreamEventsRequest(), timeout=args[0])
        try:
            for message in call:
                if message.HasField("event"):
                    seen.add(message.event.vm_name)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise kc._wrap(e) from None
        return sorted(seen)
    raise ValueError("unknown call " + method)


def main():
    import grpc
    import kvmi_client as kc
    request = json.loads(sys.argv[1])
    results = []
    with kc.Client(request["target"], connect_timeout=10) as client:
        for call in request["calls"]:
            try:
                results.append({"ok": _call(kc, client, *call)})
            except kc.KvmiError as e:
                results.append({"code": e.code.name, "message": e.message})
            except grpc.RpcError as e:
                results.append({"code": e.code().name, "message": e.details() or ""})
    print(json.dumps({"uid": os.getuid(), "gid": os.getgid(), "results": results}))


if __name__ == "__main__":
    main()
