"""Helpers of the deployment tests (tests/deploy): binaries in the runfiles, podman set up for
these machines, skips with a reason where podman cannot run, and cleanup of what a test made.

podman on these machines (cgroup v1 inside a sandbox) needs runc, the cgroupfs manager and no
default ulimits: `containers_conf()` writes that containers.conf and the tests point
CONTAINERS_CONF at it. Nothing is ever pulled: images are built from scratch with buildah, and
`podman kube play` builds its pause image from the local catatonit.
"""

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time

CONTAINERS_CONF = """\
[containers]
default_ulimits = []

[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
events_logger = "file"
"""


def root():
    """The repository (or runfiles) root."""
    srcdir = os.environ.get("TEST_SRCDIR")
    if srcdir:
        return os.path.join(srcdir, os.environ.get("TEST_WORKSPACE", "kvmid"))
    return os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def path(rel):
    """A file of the repository; binaries from bazel-bin when run outside Bazel."""
    p = os.path.join(root(), rel)
    if not os.path.exists(p) and not os.environ.get("TEST_SRCDIR"):
        p = os.path.join(root(), "bazel-bin", rel)
    return p


def short_tmpdir(prefix):
    """A fresh directory with a short path (UNIX socket paths are limited to 107 bytes)."""
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


def run(args, timeout=120, check=True, env=None, **kwargs):
    """Runs a command, output captured as text; AssertionError with its output when it fails."""
    proc = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout, env=env, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError("%s exited %d:\n%s" % (" ".join(args), proc.returncode,
                                                      proc.stdout[-4000:]))
    return proc


def wait_for(predicate, timeout, what, interval=0.05):
    """Polls `predicate` until it is truthy (returned) or `timeout` s pass (AssertionError)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError("timed out after %gs waiting for %s" % (timeout, what))
        time.sleep(interval)


def connectable(sock_path):
    """True when a UNIX stream socket at `sock_path` accepts a connection."""
    if not os.path.exists(sock_path):
        return False
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1)
    try:
        s.connect(sock_path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def grpc_health(target, service=""):
    """grpc.health.v1.Health/Check through Debian's python3-grpcio without generated stubs:
    HealthCheckRequest{service} and HealthCheckResponse{status} are one field each. Returns the
    status number (1 = SERVING)."""
    import grpc
    request = b""
    if service:
        data = service.encode()
        request = b"\x0a" + bytes([len(data)]) + data
    with grpc.insecure_channel(target) as channel:
        check = channel.unary_unary("/grpc.health.v1.Health/Check",
                                    request_serializer=lambda b: b,
                                    response_deserializer=lambda b: b)
        reply = check(request, timeout=10)
    if reply == b"":
        return 0  # UNKNOWN (the default value is not on the wire)
    if len(reply) != 2 or reply[0] != 0x08:
        raise AssertionError("unexpected HealthCheckResponse bytes %r" % reply)
    return reply[1]


class Podman:
    """podman and buildah with this machine's containers.conf; `why_not()` says why they cannot
    run here (the tests skip with that reason)."""

    def __init__(self, workdir):
        self.conf = os.path.join(workdir, "containers.conf")
        with open(self.conf, "w") as f:
            f.write(CONTAINERS_CONF)
        self.env = dict(os.environ, CONTAINERS_CONF=self.conf)
        # Bazel's test environment has a minimal PATH; podman finds runc, conmon, catatonit here.
        self.env["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        self.env.setdefault("HOME", workdir)
        self.env["TMPDIR"] = "/var/tmp"  # image layers are staged here; $TEST_TMPDIR may be small

    def why_not(self):
        if os.geteuid() != 0:
            return "needs root (podman with the host's /var/lib/containers)"
        for tool in ("podman", "buildah", "runc"):
            if shutil.which(tool, path=self.env["PATH"]) is None:
                return "%s not installed (scripts/setup.sh installs podman buildah runc catatonit)" % tool
        try:
            info = self.podman("info", "--format", "json", timeout=60, check=False)
        except subprocess.TimeoutExpired:
            return "podman info timed out"
        if info.returncode != 0:
            return "podman cannot run here: " + info.stdout.strip()[-300:]
        return None

    def podman(self, *args, timeout=120, check=True):
        return run(["podman"] + list(args), timeout=timeout, check=check, env=self.env)

    def buildah(self, *args, timeout=120, check=True):
        return run(["buildah"] + list(args), timeout=timeout, check=check, env=self.env)

    def script(self, script, *args, timeout=300):
        return run(["bash", script] + list(args), timeout=timeout, env=self.env)

    def image_exists(self, name):
        return self.podman("image", "exists", name, check=False).returncode == 0

    def image_size(self, name):
        out = self.podman("image", "inspect", "--format", "{{.Size}}", name).stdout.strip()
        return int(out)

    def inspect(self, container):
        out = self.podman("container", "inspect", container, check=False)
        if out.returncode != 0:
            return None
        return json.loads(out.stdout)[0]

    def state(self, container):
        info = self.inspect(container)
        return info["State"] if info else None

    def logs(self, container):
        return self.podman("logs", container, check=False).stdout

    def remove_container(self, name):
        self.podman("rm", "--force", "--time", "10", "--volumes", name, check=False, timeout=60)

    def remove_image(self, name):
        if self.image_exists(name):
            self.podman("rmi", "--force", name, check=False, timeout=60)
