#!/usr/bin/env bash
# Bazel test entry point: runs a Python test file with Debian's interpreter (the only one that
# sees python3-grpcio / python3-protobuf; a pyenv python3 earlier on PATH would not).
set -euo pipefail
cd "${TEST_SRCDIR:?}/${TEST_WORKSPACE:?}"
export PYTHONPATH="$PWD/clients/python${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
exec /usr/bin/python3 "clients/python/tests/junit_runner.py" "clients/python/$1"
