"""The Kubernetes sidecar example (deploy/kubernetes/sidecar.yaml) played with `podman kube play`.

Two images are built offline with buildah from scratch: kvmid (deploy/container/build-image.sh,
from //daemon:kvmid) and the analysis container (deploy/container/build-analysis-image.sh, the
static Go example client built by clients/go/build.sh). The pod spec is the checked-in one; the
test only points its images at the tags it built and its "guests" hostPath at a temporary
directory. Simulated guests connect from the host to the KVMI socket in that hostPath; the
analysis container, a real gRPC client of kvmid over the UNIX socket in the pod's shared emptyDir,
must list both guests (ListVMs) and print 5 events (StreamEvents), then exit 0, while kvmid keeps
running. `podman kube down` then stops kvmid with SIGTERM.

podman's pod needs an infra ("pause") container; podman 4 builds localhost/podman-pause from the
local catatonit when no infra image is configured, so nothing is pulled. If the test made that
image, it removes it again.
"""

import os
import shutil
import subprocess
import sys
import unittest

import yaml

import deploy_support as ds

VMS = 2
POD = "kvmid-sidecar"


class SidecarTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.work = ds.short_tmpdir("kvd-pod.")
        cls.podman = ds.Podman(cls.work)
        # Skipped per test (setUp), not per class: junit_runner counts a run of 0 tests as a
        # failure, and each skipped case shows up in the counts with the reason.
        why = cls.podman.why_not()
        if why:
            why = "podman cannot run here: " + why
        elif shutil.which("catatonit",
                          path=cls.podman.env["PATH"] + ":/usr/libexec/podman") is None:
            why = "catatonit not installed (podman builds its pause image from it)"
        cls.skip_why = why
        if why:
            shutil.rmtree(cls.work, ignore_errors=True)
            return
        version = cls.podman.podman("version", "--format", "{{.Client.Version}}").stdout.strip()
        cls.pause_images = [i for i in cls.podman.podman(
            "images", "--format", "{{.Repository}}:{{.Tag}}").stdout.split()
            if i.startswith("localhost/podman-pause:")]
        cls.podman_version = version
        cls.kvmid_tag = "localhost/kvmid-deploy-test:pod-%d" % os.getpid()
        cls.analysis_tag = "localhost/kvmi-analysis-deploy-test:pod-%d" % os.getpid()
        cls.sims = []
        cls.played = None
        cls.addClassCleanup(cls._cleanup)
        # A pod of this name left by an interrupted run would make `kube play` fail.
        cls.podman.podman("pod", "rm", "--force", "--ignore", POD, check=False, timeout=90)
        for script, binary, tag in (
                ("deploy/container/build-image.sh", "daemon/kvmid", cls.kvmid_tag),
                ("deploy/container/build-analysis-image.sh", "tests/deploy/kvmi-client",
                 cls.analysis_tag)):
            out = cls.podman.script(ds.path(script), ds.path(binary), tag)
            print(out.stdout, file=sys.stderr)

    def setUp(self):
        if self.skip_why:
            self.skipTest(self.skip_why)

    @classmethod
    def _cleanup(cls):
        for sim in cls.sims:
            if sim.poll() is None:
                sim.kill()
                sim.wait()
        if cls.played:
            cls.podman.podman("kube", "down", cls.played, check=False, timeout=90)
        cls.podman.podman("pod", "rm", "--force", "--ignore", POD, check=False, timeout=90)
        cls.podman.remove_image(cls.kvmid_tag)
        cls.podman.remove_image(cls.analysis_tag)
        for image in cls.podman.podman("images", "--format", "{{.Repository}}:{{.Tag}}",
                                       check=False).stdout.split():
            if image.startswith("localhost/podman-pause:") and image not in cls.pause_images:
                cls.podman.remove_image(image)
        shutil.rmtree(cls.work, ignore_errors=True)

    def spec(self, guests_dir):
        """The checked-in pod spec with the test's image tags and guests hostPath."""
        with open(ds.path("deploy/kubernetes/sidecar.yaml")) as f:
            pod = yaml.safe_load(f)
        self.assertEqual(pod["kind"], "Pod")
        images = {"kvmid": self.kvmid_tag, "analysis": self.analysis_tag}
        self.assertEqual(sorted(c["name"] for c in pod["spec"]["containers"]), sorted(images))
        for c in pod["spec"]["containers"]:
            c["image"] = images[c["name"]]
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        self.assertIn("emptyDir", volumes["api"], "the API socket is shared through an emptyDir")
        volumes["guests"]["hostPath"]["path"] = guests_dir
        path = os.path.join(self.work, "sidecar.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(pod, f)
        return path

    def test_sidecar_pod_kvmid_and_analysis_talk_over_the_shared_socket(self):
        guests = os.path.join(self.work, "guests")
        os.makedirs(guests)
        spec = self.spec(guests)
        SidecarTest.played = spec
        self.podman.podman("kube", "play", "--network=none", spec, timeout=180)

        kvmid = POD + "-kvmid"
        analysis = POD + "-analysis"
        kvmi = os.path.join(guests, "kvmi.sock")
        try:
            ds.wait_for(lambda: ds.connectable(kvmi), 30, "kvmid's KVMI socket in the hostPath")
        except AssertionError:
            print(self.podman.logs(kvmid), file=sys.stderr)
            raise
        sim = subprocess.Popen(
            [ds.path("kernel/sim/kvmi-sim"), "--connect=unix:" + kvmi, "--vms=%d" % VMS,
             "--vcpus=2", "--scenario=mixed", "--rate=50", "--duration=120", "--log_level=warn"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.sims.append(sim)

        def analysis_exited():
            state = self.podman.state(analysis)
            return state if state and state["Status"] in ("exited", "stopped") else None

        try:
            state = ds.wait_for(analysis_exited, 90, "the analysis container to finish",
                                interval=0.3)
        finally:
            logs = self.podman.logs(analysis)
            print("---- analysis container\n" + logs, file=sys.stderr)
        self.assertEqual(state["ExitCode"], 0)
        self.assertIn("vms: %d (%d hooked)" % (VMS, VMS), logs)
        for i in range(VMS):
            self.assertRegex(logs, r"vm [0-9a-f-]{36} name=sim-vm-%04d state=VM_STATE_HOOKED" % i)
        self.assertIn("done: 5 events", logs)
        self.assertEqual(logs.count("\nevent id="), 5, "5 events expected")

        # kvmid, in its own container of the same pod, still runs and serves guests.
        self.assertEqual(self.podman.state(kvmid)["Status"], "running")
        kvmid_logs = self.podman.logs(kvmid)
        self.assertEqual(kvmid_logs.count("hooked: KVMI"), VMS, kvmid_logs[-3000:])

        # kube down: SIGTERM to kvmid, which restores both guests and exits 0.
        self.podman.podman("pod", "stop", "--time", "20", POD, timeout=90)
        state = self.podman.state(kvmid)
        self.assertEqual(state["ExitCode"], 0, self.podman.logs(kvmid)[-3000:])
        sim.kill()  # it would reconnect, as QEMU does, until its --duration
        sim.wait()
        self.podman.podman("kube", "down", spec, timeout=90)
        SidecarTest.played = None
        self.assertEqual(self.podman.podman("pod", "exists", POD, check=False).returncode, 1,
                         "pod left behind")


if __name__ == "__main__":
    unittest.main()
