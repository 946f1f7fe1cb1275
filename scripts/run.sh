#!/usr/bin/env bash
# README command (1): installs what is missing, builds everything and runs the main job on its
# embedded default. Until kvmid exists the main job is the ABI summary (//kernel/abi:
# kvmi_abi_summary: ids, events and struct sizes from the codec's own tables); the issue that
# adds kvmid replaces the last step with kvmid and a fleet of simulated guests.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -eq 0 ]; then
  bash scripts/setup.sh </dev/null
else
  sudo bash scripts/setup.sh </dev/null
fi
bazel build --color=no //...
bazel run --color=no //kernel/abi:kvmi_abi_summary
