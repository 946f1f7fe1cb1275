#!/usr/bin/env bash
# Bazel test entry point of tests/deploy: runs a Python test file with Debian's interpreter (it
# has python3-grpcio / python3-protobuf) through the JUnit runner, so that every test method is
# counted by scripts/test.sh.
set -euo pipefail
cd "${TEST_SRCDIR:?}/${TEST_WORKSPACE:?}"
export PYTHONPATH="$PWD/tests/deploy:$PWD/clients/python${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
exec /usr/bin/python3 clients/python/tests/junit_runner.py "tests/deploy/$1"
