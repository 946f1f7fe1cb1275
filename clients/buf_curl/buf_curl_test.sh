#!/usr/bin/env bash
# kvmid's API through a generic gRPC tool, as users call it: `buf curl` (npm @bufbuild/buf,
# installed by scripts/setup.sh under /opt/kvmid-tools; grpcurl is not packaged here) with the
# gRPC protocol over HTTP/2 prior knowledge, schemas from server reflection. Starts a real kvmid
# (README demo policies) and simulated guests; checks listing, unary and server-streaming calls
# over TCP loopback with mutual TLS (--cacert/--cert/--key, development certificates) and over the
# unix socket (--unix-socket). One JUnit testcase per check.
#
#   bazel test //clients/buf_curl:buf_curl_test
#   bash clients/buf_curl/buf_curl_test.sh   # outside Bazel: KVMID_BIN / KVMI_SIM_BIN, BUF
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
HARNESS_SUITE=buf_curl
# shellcheck source=../testing/harness.sh
source "$here/../testing/harness.sh"
if ! harness_init; then fail setup "harness_init failed"; finish; fi

BUF="${BUF:-/opt/kvmid-tools/node_modules/.bin/buf}"
BUF_VERSION=1.75.0  # pinned in scripts/setup.sh
HEALTH_PROTO=/usr/share/grpc-proto/grpc/health/v1/health.proto
export BUF_CACHE_DIR="$work/buf-cache"
jc() { python3 "$here/json_check.py" "$@"; }

buf_installed() { "$BUF" --version && [ "$("$BUF" --version)" = "$BUF_VERSION" ]; }
check buf_installed buf_installed
if ! [ -x "$BUF" ]; then finish; fi

write_demo_config "$work/demo.textproto"
if ! start_kvmid k --config="$work/demo.textproto"; then
  fail kvmid_start "kvmid did not start" "$work/k/kvmid.log"
  finish
fi
start_sim k 2

tcp="https://127.0.0.1:$k_port"
tls=(--cacert "$certs/ca.pem" --cert "$certs/admin.pem" --key "$certs/admin.key")
# The same calls over each transport: "tcp" or "unix".
call() {  # transport, buf curl args...
  local transport="$1"
  shift
  if [ "$transport" = unix ]; then
    "$BUF" curl --protocol grpc --http2-prior-knowledge --unix-socket "$k_api" "$@"
  else
    "$BUF" curl --protocol grpc "${tls[@]}" "$@"
  fi
}
base() { if [ "$1" = unix ]; then echo http://localhost; else echo "$tcp"; fi; }

# Ready: both guests hooked (polled through the API itself, 20 s deadline).
guests_hooked() { call tcp "$tcp/kvmi.v1.Introspection/ListVMs" | jc list_vms 2; }
if ! wait_until 20 guests_hooked; then
  fail guests_hooked "2 guests not hooked within 20 s" "$work/k/sim.log"
  finish
fi

for t in tcp unix; do
  list_services() {
    call "$1" --list-services "$(base "$1")" >"$work/svc.$1" || return 1
    cat "$work/svc.$1"
    grep -qx kvmi.v1.Introspection "$work/svc.$1" && grep -qx grpc.health.v1.Health "$work/svc.$1" &&
      grep -q '^grpc.reflection.v1\(alpha\)\?.ServerReflection$' "$work/svc.$1"
  }
  check "list_services_$t" list_services "$t"

  list_vms() {
    call "$1" "$(base "$1")/kvmi.v1.Introspection/ListVMs" >"$work/vms.$1" || return 1
    cat "$work/vms.$1"
    jc list_vms 2 <"$work/vms.$1"
  }
  check "list_vms_$t" list_vms "$t"

  # GetVM by name must give the guest ListVMs named, and NOT_FOUND (exit 5 << 3) for a stranger.
  get_vm() {
    local uuid rc=0
    uuid="$(jc uuid sim-vm-0001 <"$work/vms.$1")" || return 1
    call "$1" -d '{"vm": "sim-vm-0001"}' "$(base "$1")/kvmi.v1.Introspection/GetVM" >"$work/vm.$1" || return 1
    jc get_vm sim-vm-0001 "$uuid" <"$work/vm.$1" || return 1
    call "$1" -d "{\"vm\": \"$uuid\"}" "$(base "$1")/kvmi.v1.Introspection/GetVM" | jc get_vm sim-vm-0001 "$uuid" || return 1
    call "$1" -d '{"vm": "no-such-guest"}' "$(base "$1")/kvmi.v1.Introspection/GetVM" >"$work/nf.$1" 2>&1 || rc=$?
    cat "$work/nf.$1"
    [ "$rc" -eq 40 ] && grep -q '"not_found"' "$work/nf.$1"
  }
  check "get_vm_$t" get_vm "$t"

  # Server streaming, bounded by buf's --timeout (ends with DEADLINE_EXCEEDED, exit 4 << 3):
  # only LSTAR writes (MSR 0xc0000082 = 3221225602), each refused by the lstar-locked policy.
  stream_events() {
    local rc=0 started elapsed
    started=$(date +%s%N)
    call "$1" --timeout 4s -d '{"allow": [{"events": ["EVENT_TYPE_MSR"], "msrs": [3221225602]}]}' \
      "$(base "$1")/kvmi.v1.Introspection/StreamEvents" >"$work/ev.$1" 2>"$work/ev_err.$1" || rc=$?
    elapsed=$((($(date +%s%N) - started) / 1000000))
    head -n 40 "$work/ev.$1"
    cat "$work/ev_err.$1"
    # The stream ends at the client's 4 s deadline. Both sides watch it: when kvmid's deadline
    # timer fires first it resets the stream (RST_STREAM CANCEL) and buf, unlike grpc-go, reports
    # that as "canceled" (exit 8) instead of "deadline_exceeded" (exit 32). Either is the deadline
    # only if the stream did last the 4 s.
    { [ "$rc" -eq 32 ] && grep -q deadline_exceeded "$work/ev_err.$1"; } ||
      { [ "$rc" -eq 8 ] && grep -q '"canceled"' "$work/ev_err.$1" && [ "$elapsed" -ge 3900 ]; } ||
      [ "$rc" -eq 0 ] || { echo "exit $rc after $elapsed ms"; return 1; }
    jc events EVENT_TYPE_MSR 3221225602 policy:lstar-locked <"$work/ev.$1" &&
      grep -q '"keptOldValue": true' "$work/ev.$1"
  }
  check "stream_events_$t" stream_events "$t"
done

# kvmid's reflection cannot describe grpc.health.v1.Health (its descriptor is not in the server's
# pool), so the full method listing and health calls take that one schema from grpc-proto.
list_methods() {
  call tcp --reflect --schema "$HEALTH_PROTO" --list-methods "$tcp" >"$work/methods" || return 1
  cat "$work/methods"
  local m
  for m in ListVMs GetVM StreamEvents ApplyPolicy ListPolicies DeletePolicy; do
    grep -qx "kvmi.v1.Introspection/$m" "$work/methods" || { echo "no $m"; return 1; }
  done
  grep -qx grpc.health.v1.Health/Check "$work/methods"
}
check list_methods_tcp list_methods

health() {
  call tcp --reflect --schema "$HEALTH_PROTO" "$tcp/grpc.health.v1.Health/Check" >"$work/health" || return 1
  cat "$work/health"
  grep -q '"status": "SERVING"' "$work/health"
}
check health_check_tcp health

list_policies() {
  call unix http://localhost/kvmi.v1.Introspection/ListPolicies >"$work/pol" || return 1
  jc policies cr0-wp cr4-smep-smap lstar-locked sysenter-eip-locked data-watch <"$work/pol"
}
check list_policies_unix list_policies

finish
