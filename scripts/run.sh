#!/usr/bin/env bash
# README command (1): installs what is missing, builds, and runs the main job on its embedded
# default: kvmid (daemon/config/examples/demo.textproto: CR0.WP / SMEP / LSTAR / SYSENTER_EIP
# locked, a data region watched) and a fleet of simulated guests (kvmi-sim) that connect to it
# through QEMU's handshake and run a mixed workload. kvmid prints the live events it decides
# (rate-limited) and a stats line every 5 s; both print a summary at the end.
#
#   KVMID_DEMO_SECONDS=60 KVMID_DEMO_VMS=20 KVMID_DEMO_VCPUS=2 bash scripts/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${KVMID_DEMO_SECONDS:-30}"
vms="${KVMID_DEMO_VMS:-8}"
vcpus="${KVMID_DEMO_VCPUS:-2}"
rate="${KVMID_DEMO_RATE:-20}"

if [ "$(id -u)" -eq 0 ]; then
  bash scripts/setup.sh </dev/null
else
  sudo bash scripts/setup.sh </dev/null
fi
bazel build --color=no --noshow_progress -c opt //daemon:kvmid //kernel/sim:kvmi-sim
bin="$(bazel info -c opt bazel-bin 2>/dev/null)"

work="$(mktemp -d /tmp/kvmid-demo.XXXXXX)"
head -c 32 /dev/urandom | base64 | tr -d "\n" >"$work/cookie"
cleanup() {
  [ -n "${kvmid_pid:-}" ] && kill "$kvmid_pid" 2>/dev/null && wait "$kvmid_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

echo "== kvmid: $vms simulated guests x $vcpus vCPUs for ${seconds}s (socket $work/kvmi.sock)"
"$bin/daemon/kvmid" --config=daemon/config/examples/demo.textproto \
  --kvmi_socket="$work/kvmi.sock" --cookie_file="$work/cookie" --api_socket="$work/api.sock" \
  --log_events=all --log_events_per_second=8 &
kvmid_pid=$!
for _ in $(seq 100); do [ -S "$work/kvmi.sock" ] && break; sleep 0.05; done

"$bin/kernel/sim/kvmi-sim" --connect="unix:$work/kvmi.sock" --cookie_file="$work/cookie" \
  --vms="$vms" --vcpus="$vcpus" --scenario=mixed --rate="$rate" --duration="$seconds" \
  --log_level=warn
echo "== stopping kvmid (SIGTERM: restore every guest, exit 0)"
kill -TERM "$kvmid_pid"
wait "$kvmid_pid"
kvmid_pid=""
