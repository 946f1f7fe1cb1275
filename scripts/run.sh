#!/usr/bin/env bash
# README command (1): installs what is missing, builds, and runs the main job on its embedded
# default: kvmid (daemon/config/examples/demo.textproto: CR0.WP / SMEP / LSTAR / SYSENTER_EIP
# locked, a data region watched) with a fleet of simulated guests (kvmi-sim) that connect to it
# through QEMU's handshake and run a mixed workload; the live event stream is shown through
# kvmid's gRPC API with kvmictl, then kvmid is stopped (SIGTERM: guests restored) and both print
# a summary.
#
#   KVMID_DEMO_SECONDS=60 KVMID_DEMO_VMS=20 KVMID_DEMO_VCPUS=2 bash scripts/run.sh
#
# KVMID_DEMO_GUEST=kvm runs the same job on real virtualization instead (docs/KVM.md): kvmid with
# daemon/config/examples/kvm_rootkit.textproto (kernel text and IDT write-protected, LSTAR locked;
# KVMID_DEMO_MODE=monitor: kvm_rootkit_monitor.textproto, only reported) and kvmi-vmm booting the
# repository's guest kernel on /dev/kvm in rootkit mode; its console shows whether the attacks
# took effect.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${KVMID_DEMO_SECONDS:-30}"
vms="${KVMID_DEMO_VMS:-8}"
vcpus="${KVMID_DEMO_VCPUS:-2}"
rate="${KVMID_DEMO_RATE:-20}"
guest="${KVMID_DEMO_GUEST:-sim}"
mode="${KVMID_DEMO_MODE:-enforce}"
case "$guest" in sim | kvm) ;; *) echo "KVMID_DEMO_GUEST must be sim or kvm" >&2; exit 2 ;; esac
case "$mode" in enforce | monitor) ;; *) echo "KVMID_DEMO_MODE must be enforce or monitor" >&2; exit 2 ;; esac

if [ "$(id -u)" -eq 0 ]; then
  bash scripts/setup.sh </dev/null
else
  sudo bash scripts/setup.sh </dev/null
fi
bazel build --color=no --noshow_progress -c opt //daemon:kvmid //kernel/sim:kvmi-sim \
  //kernel/kvm:kvmi-vmm
bin="$(bazel info -c opt bazel-bin 2>/dev/null)"
bash clients/python/gen_protos.sh  # kvmictl's stubs (git-ignored)
kvmictl() { /usr/bin/python3 clients/python/kvmictl --target "unix:$work/api.sock" "$@"; }

work="$(mktemp -d /tmp/kvmid-demo.XXXXXX)"
head -c 32 /dev/urandom | base64 | tr -d "\n" >"$work/cookie"
cleanup() {
  [ -n "${sim_pid:-}" ] && kill "$sim_pid" 2>/dev/null && wait "$sim_pid" 2>/dev/null
  [ -n "${kvmid_pid:-}" ] && kill "$kvmid_pid" 2>/dev/null && wait "$kvmid_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

if [ "$guest" = kvm ]; then
  config=daemon/config/examples/kvm_rootkit.textproto
  [ "$mode" = monitor ] && config=daemon/config/examples/kvm_rootkit_monitor.textproto
  echo "== kvmid ($config) and kvmi-vmm: the repository's guest on /dev/kvm, rootkit mode, ${seconds}s"
  "$bin/daemon/kvmid" --config="$config" --kvmi_socket="$work/kvmi.sock" \
    --api_socket="$work/api.sock" --cookie_file="$work/cookie" --log_events=all \
    --state_dir="$work/state" \
    >"$work/kvmid.log" 2>&1 &
  kvmid_pid=$!
  for _ in $(seq 200); do [ -S "$work/api.sock" ] && break; sleep 0.05; done
  "$bin/kernel/kvm/kvmi-vmm" --connect="unix:$work/kvmi.sock" --cookie_file="$work/cookie" \
    --name=kvm-guest --guest_args="rootkit period_ms=500" --duration="$((seconds + 3))" \
    >"$work/guest.log" 2>"$work/vmm.log" &
  sim_pid=$!
  for _ in $(seq 200); do grep -q ': hooked: KVMI' "$work/kvmid.log" && break; sleep 0.05; done
  echo "== kvmictl vms"
  kvmictl vms
  echo "== kvmictl policies"
  kvmictl policies
  echo "== kvmictl events (live, ${seconds}s)"
  kvmictl events --duration "$seconds" | awk 'NR <= 40'
  echo "== the guest's console (its own view of the attacks)"
  grep -E "layout|rootkit|round" "$work/guest.log" | tail -n 12
  echo "== kvmictl policies (hit counters after the run)"
  kvmictl policies
  kill -TERM "$kvmid_pid"
  wait "$kvmid_pid"
  kvmid_pid=""
  wait "$sim_pid" || true
  sim_pid=""
  echo "== kvmi-vmm summary"
  cat "$work/vmm.log"
  exit 0
fi

echo "== kvmid: $vms simulated guests x $vcpus vCPUs for ${seconds}s"
"$bin/daemon/kvmid" --config=daemon/config/examples/demo.textproto \
  --kvmi_socket="$work/kvmi.sock" --api_socket="$work/api.sock" --cookie_file="$work/cookie" \
  --state_dir="$work/state" --log_events=none >"$work/kvmid.log" 2>&1 &
kvmid_pid=$!
for _ in $(seq 200); do [ -S "$work/api.sock" ] && break; sleep 0.05; done

"$bin/kernel/sim/kvmi-sim" --connect="unix:$work/kvmi.sock" --cookie_file="$work/cookie" \
  --vms="$vms" --vcpus="$vcpus" --scenario=mixed --rate="$rate" --duration="$((seconds + 3))" \
  --log_level=warn >"$work/sim.log" 2>&1 &
sim_pid=$!
for _ in $(seq 200); do
  [ "$(grep -c ': hooked: KVMI' "$work/kvmid.log" || true)" -ge "$vms" ] && break
  sleep 0.05
done

echo "== kvmictl vms"
kvmictl vms
echo "== kvmictl policies"
kvmictl policies
echo "== kvmictl events (live, ${seconds}s; blocked writes show the old value kept)"
kvmictl events --duration "$seconds" | awk 'NR <= 40 || /KEEP_OLD/ && ++kept <= 20'
echo "== kvmictl policies (hit counters after the run)"
kvmictl policies
metrics_url="$(grep -o 'metrics on http://[^ ]*/metrics' "$work/kvmid.log" | head -n 1 | cut -d' ' -f3)"
if [ -n "$metrics_url" ]; then
  echo "== Prometheus metrics: $metrics_url (health: ${metrics_url%/metrics}/healthz, /readyz)"
  curl -s "$metrics_url" | grep -E '^kvmid_(events_total|guests|handshakes_total)' | sort -t' ' -k2 -nr |
    awk 'NR <= 12'
else
  echo "== Prometheus metrics: not served ($(grep -m1 -o 'running without metrics' "$work/kvmid.log" ||
    echo 'see kvmid.log'))"
fi

echo "== stopping kvmid (SIGTERM: restore every guest, exit 0)"
kill -TERM "$kvmid_pid"
wait "$kvmid_pid"
kvmid_pid=""
grep -E "unhooking|summary" "$work/kvmid.log" | tail -n 4
wait "$sim_pid" || true
sim_pid=""
echo "== kvmi-sim summary"
cat "$work/sim.log"
