#!/usr/bin/env bash
# Generates the Python modules of kvmid's API (kvmi/v1/*_pb2.py, *_pb2_grpc.py) with Debian's
# protoc and grpc_python_plugin, for Debian's python3-grpcio / python3-protobuf.
#   clients/python/gen_protos.sh [OUT_DIR]   (default: clients/python, next to kvmictl)
# The Bazel genrule //clients/python:kvmi_py_proto runs it too; generated files are never
# committed (.gitignore), so the stubs always match the .proto files they came from.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="${KVMI_PROTO_ROOT:-$(cd "$here/../.." && pwd)}"  # holds proto/kvmi/v1/*.proto
out="${1:-$here}"
plugin="${GRPC_PYTHON_PLUGIN:-$(command -v grpc_python_plugin || echo /usr/bin/grpc_python_plugin)}"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# The protos import each other as "proto/kvmi/v1/...", so protoc runs from the repository root
# and names the modules proto.kvmi.v1.*; the client package is kvmi.v1, hence the rewrite below.
(cd "$root" && protoc -I. --python_out="$tmp" --grpc_python_out="$tmp" \
  --plugin=protoc-gen-grpc_python="$plugin" \
  proto/kvmi/v1/policy.proto proto/kvmi/v1/introspection.proto)
mkdir -p "$out/kvmi/v1"
for f in "$tmp"/proto/kvmi/v1/*.py; do
  sed -e 's/^from proto\.kvmi\.v1 import /from kvmi.v1 import /' "$f" \
    >"$out/kvmi/v1/$(basename "$f")"
done
