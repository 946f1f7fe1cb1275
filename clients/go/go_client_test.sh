#!/usr/bin/env bash
# End-to-end test of the Go example client (clients/go/kvmi-client): builds it offline with
# clients/go/build.sh, then runs it against a real kvmid and simulated guests (kvmi-sim) over the
# unix socket and TCP loopback (mutual TLS). One JUnit testcase per check, in $XML_OUTPUT_FILE.
#
#   bazel test //clients/go:go_client_test
#   bash clients/go/go_client_test.sh     # outside Bazel: KVMID_BIN / KVMI_SIM_BIN (default bazel-bin)
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
HARNESS_SUITE=go_client
# shellcheck source=../testing/harness.sh
source "$here/../testing/harness.sh"
if ! harness_init; then fail setup "harness_init failed"; finish; fi

goout="${TEST_TMPDIR:-$work}/go-out"
export GOCACHE="$goout/.gocache"
client="$goout/kvmi-client"

build() { bash "$here/build.sh" "$goout" && [ -x "$client" ]; }
check build build
if [ ! -x "$client" ]; then finish; fi

# kvmid "demo": the README's demo policies (CR0.WP, SMEP/SMAP, LSTAR, ... locked).
write_demo_config "$work/demo.textproto"
if start_kvmid demo --config="$work/demo.textproto"; then
  start_sim demo 2
else
  fail kvmid_demo_start "kvmid did not start" "$work/demo/kvmid.log"
  finish
fi

lines() { grep -c "$1" "$2" || true; }
# TCP is mutual TLS (the harness's development certificates).
tls=(--ca="$certs/ca.pem" --cert="$certs/operator.pem" --key="$certs/operator.key")

list_vms_unix() {
  "$client" --addr="unix://$demo_api" --list_only --wait_vms=2 --timeout=20s >"$work/list.txt" || return 1
  cat "$work/list.txt"
  grep -q '^vms: 2 (2 hooked)$' "$work/list.txt" &&
    grep -q '^vm [0-9a-f-]\{36\} name=sim-vm-0000 state=VM_STATE_HOOKED vcpus=2 ' "$work/list.txt" &&
    grep -q '^vm [0-9a-f-]\{36\} name=sim-vm-0001 state=VM_STATE_HOOKED vcpus=2 ' "$work/list.txt"
}
check list_vms_unix list_vms_unix

# ListPolicies is paged: one policy per page here, every configured policy listed in order.
list_policies_paged() {
  "$client" --addr="unix://$demo_api" --list_policies --policies_page_size=1 --timeout=20s \
    >"$work/pol.txt" || return 1
  cat "$work/pol.txt"
  local n
  n=$(grep -c '^policy ' "$work/pol.txt")
  [ "$n" -ge 2 ] && grep -q "^policies: $n in $n page(s)\$" "$work/pol.txt" &&
    grep -Eq '^policy cr0-wp mode=MODE_ENFORCE origin=POLICY_ORIGIN_CONFIG etag=[0-9a-f]+-[0-9a-f]{16} ' \
      "$work/pol.txt" &&
    "$client" --addr="unix://$demo_api" --list_policies --timeout=20s >"$work/pol1.txt" &&
    grep -q "^policies: $n in 1 page(s)\$" "$work/pol1.txt" &&
    diff <(grep '^policy ' "$work/pol.txt" | cut -d' ' -f2) <(grep '^policy ' "$work/pol1.txt" | cut -d' ' -f2)
}
check list_policies_paged list_policies_paged

# 12 CR/MSR events through a type filter, over TCP: only those types, with verdicts by the policies.
stream_filter_tcp() {
  "$client" --addr="127.0.0.1:$demo_port" "${tls[@]}" --events=MSR,CR --count=12 --timeout=30s >"$work/f.txt" || return 1
  cat "$work/f.txt"
  local ev
  ev=$(lines '^event id=' "$work/f.txt")
  [ "$ev" -eq 12 ] || { echo "expected 12 events, got $ev"; return 1; }
  [ "$(grep '^event id=' "$work/f.txt" | grep -cv ' type=EVENT_TYPE_\(MSR\|CR\) ')" -eq 0 ] ||
    { echo "an event outside the filter"; return 1; }
  grep -q '^done: 12 events$' "$work/f.txt" &&
    grep -Eq ' vm=sim-vm-000[01] vcpu=[01] type=EVENT_TYPE_(CR rip=0x[0-9a-f]+ cr[034]|MSR rip=0x[0-9a-f]+ msr=0x)' "$work/f.txt" &&
    grep -q '=> ACTION_KEEP_OLD (old value kept) by policy:' "$work/f.txt"
}
check stream_events_filter_tcp stream_filter_tcp

# A guest filter over the unix socket (unix:PATH form), with registers attached.
stream_vm_unix() {
  "$client" --addr="unix:$demo_api" --vms=sim-vm-0001 --registers --count=6 --timeout=30s >"$work/v.txt" || return 1
  cat "$work/v.txt"
  [ "$(lines '^event id=' "$work/v.txt")" -eq 6 ] &&
    [ "$(grep '^event id=' "$work/v.txt" | grep -cv ' vm=sim-vm-0001 ')" -eq 0 ] &&
    [ "$(grep '^event id=' "$work/v.txt" | grep -cv ' regs{rax=0x[0-9a-f]* rsp=0x[0-9a-f]* cr3=0x[1-9a-f]')" -eq 0 ]
}
check stream_events_vm_filter_unix stream_vm_unix

# Bulk memory through the module's kvmimem.Dump (ReadPhysicalStream): 4 MiB of a guest, a file of
# exactly that size, and every page accounted for (chunks of data or zero runs).
dump_memory() {
  "$client" --addr="unix:$demo_api" --dump_vm=sim-vm-0000 --dump_out="$work/go.mem" \
    --dump_size=4194304 --timeout=60s >"$work/dump.txt" || return 1
  cat "$work/dump.txt"
  grep -q '^dumped 4194304 bytes of sim-vm-0000 from gpa 0x0: .* MiB/s' "$work/dump.txt" &&
    [ "$(stat -c %s "$work/go.mem")" -eq 4194304 ] &&
    grep -q ' [0-9]* chunks, [0-9]* zero pages not sent$' "$work/dump.txt"
}
check dump_memory dump_memory

# Errors are reported with a non-zero exit: an unknown event type, a server that is not there.
bad_flags() {
  ! "$client" --addr="unix:$demo_api" --events=NOPE --timeout=5s &&
    ! "$client" --addr="unix:$work/nothing.sock" --timeout=3s
}
check errors_reported bad_flags

# kvmid "bare": no policies, so the handler decides. The client claims MSR events, arms LSTAR and
# SYSENTER_EIP, and answers KEEP_OLD for LSTAR writes, CONTINUE for the rest; an observer stream
# must see LSTAR writes decided by the handler with the old value kept.
if start_kvmid bare --deadline_ms=2000 --fallback=continue; then
  start_sim bare 2
  attach_keep_old() {
    "$client" --addr="unix:$bare_api" --wait_vms=2 --list_only --timeout=20s || return 1
    "$client" --addr="unix:$bare_api" --events=MSR --msrs=0xc0000082 --count=2 --timeout=40s \
      >"$work/obs.txt" 2>&1 &
    local observer=$!
    # The observer prints its "streaming" line once its RPC is under way (deadline 10 s).
    wait_until 10 grep -q '^streaming events' "$work/obs.txt"
    local rc=0
    "$client" --addr="127.0.0.1:$bare_port" "${tls[@]}" --attach --handler_id=go-test --events=MSR \
      --arm_msrs=0xc0000082,0x176 --count=16 --timeout=40s >"$work/att.txt" 2>&1 || rc=$?
    wait "$observer"
    echo "== attach"; cat "$work/att.txt"; echo "== observer"; cat "$work/obs.txt"
    if [ "$rc" -eq 3 ]; then echo "kvmid does not implement Attach"; return 77; fi
    [ "$rc" -eq 0 ] || return 1
    grep -q '^claimed: owner=client:go-test' "$work/att.txt" &&
      grep -q '^verdict ACTION_KEEP_OLD for event id=[0-9]* vm=sim-vm-000[01] .* type=EVENT_TYPE_MSR .* msr=0xc0000082 .*(LSTAR write refused)$' "$work/att.txt" &&
      grep -q '^verdict ACTION_CONTINUE for event id=[0-9]* .* msr=0x176 ' "$work/att.txt" &&
      grep -q '^done: 16 verdicts$' "$work/att.txt" &&
      # The bytes at RIP, read inline before each verdict (the sims' CR3s map nothing: every
      # byte unread, and why).
      [ "$(grep -c '^verdict .* code=[0-9a-f?]\{32\}' "$work/att.txt")" -eq 16 ] &&
      grep -q ' code=?\{32\} \[not read: 0x[0-9a-f]*: not present at PML4E\]' "$work/att.txt" &&
      grep -q '^event id=[0-9]* .* msr=0xc0000082 .* => ACTION_KEEP_OLD (old value kept) by handler:go-test$' "$work/obs.txt"
  }
  check attach_keep_old_lstar attach_keep_old

else
  fail attach_keep_old_lstar "kvmid (no policies) did not start" "$work/bare/kvmid.log"
fi

# A handler asking for batches (Claim.max_batch): kvmid "batch" (no policies) with 2 guests of 8
# vCPUs writing MSRs as fast as they are answered, so that several wait at once and kvmid sends
# them together; the client answers each batch with one VerdictBatch. Every event it printed
# must have its verdict applied (no error, the count reached), and batches must have come.
if start_kvmid batch --deadline_ms=2000 --fallback=continue; then
  start_sim batch 2 --vcpus=8 --scenario=syscalls --rate=0
  attach_batched() {
    "$client" --addr="unix:$batch_api" --wait_vms=2 --list_only --timeout=20s || return 1
    local rc=0
    "$client" --addr="unix:$batch_api" --attach --handler_id=go-batch --events=MSR \
      --arm_msrs=0xc0000082,0x176 --max_batch=16 --rip_bytes=false --count=400 --timeout=40s \
      >"$work/batch.txt" 2>&1 || rc=$?
    local verdicts done_n batches batched
    verdicts=$(grep -c '^verdict ACTION_' "$work/batch.txt")
    done_n=$(sed -n 's/^done: \([0-9]*\) verdicts$/\1/p' "$work/batch.txt")
    batches=$(grep -c '^batch: ' "$work/batch.txt")
    batched=$(awk '/^batch: [0-9]+ events$/ {n += $2} END {print n + 0}' "$work/batch.txt")
    grep -v '^verdict ACTION_' "$work/batch.txt" | head -n 20
    echo "rc=$rc verdicts=$verdicts done=$done_n batches=$batches events in batches=$batched"
    [ "$rc" -eq 0 ] || return 1
    grep -q '^claimed: owner=client:go-batch' "$work/batch.txt" &&
      [ -n "$done_n" ] && [ "$done_n" -ge 400 ] && [ "$verdicts" -eq "$done_n" ] &&
      [ "$batches" -ge 1 ] && [ "$batched" -ge $((2 * batches)) ] &&
      grep -q '^verdict ACTION_KEEP_OLD for event id=[0-9]* .* msr=0xc0000082 .*(LSTAR write refused)$' "$work/batch.txt" &&
      ! grep -q '^verdict error' "$work/batch.txt"
  }
  check attach_batched_verdicts attach_batched
else
  fail attach_batched_verdicts "kvmid (batch) did not start" "$work/batch/kvmid.log"
fi

finish
