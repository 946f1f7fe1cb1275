"""Build steps pyproject.toml cannot express: the API stubs are generated from the .proto files
(never committed), and kvmictl (a script in the checkout) is installed as the module kvmi_ctl
behind the `kvmictl` console script."""

import os
import shutil
import subprocess

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
STUBS = ("introspection_pb2.py", "introspection_pb2_grpc.py", "policy_pb2.py", "policy_pb2_grpc.py")


def proto_root():
    root = os.environ.get("KVMI_PROTO_ROOT") or os.path.normpath(os.path.join(HERE, "..", ".."))
    return root if os.path.isfile(os.path.join(root, "proto/kvmi/v1/introspection.proto")) else None


class BuildPyWithStubs(build_py):
    def run(self):
        super().run()
        root = proto_root()
        if root:
            subprocess.check_call(["bash", os.path.join(HERE, "gen_protos.sh"), self.build_lib],
                                  env=dict(os.environ, KVMI_PROTO_ROOT=root))
        else:  # a copy of the client without the repository: stubs generated beforehand
            for name in STUBS:
                source = os.path.join(HERE, "kvmi", "v1", name)
                if not os.path.isfile(source):
                    raise SystemExit("kvmi-client: %s is missing and proto/kvmi/v1 is not found "
                                     "(set KVMI_PROTO_ROOT to the kvmid checkout)" % source)
                shutil.copyfile(source, os.path.join(self.build_lib, "kvmi", "v1", name))
        shutil.copyfile(os.path.join(HERE, "kvmictl"), os.path.join(self.build_lib, "kvmi_ctl.py"))


setup(cmdclass={"build_py": BuildPyWithStubs})
