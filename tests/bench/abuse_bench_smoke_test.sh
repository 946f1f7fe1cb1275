#!/bin/bash
# The abuse benchmark runs end to end in a tiny configuration (two rounds) and prints its tables.
# Nothing about the figures is asserted (a benchmark, not a timed test): only that the tables are
# complete and that every window measured events.
set -euo pipefail
out=$(tests/bench/abuse_bench --kvmid=daemon/kvmid --guests=2 --streams=20 --silent_streams=4 \
  --channels=2 --silent_channels=2 --seconds=1 --rounds=2 --policy_names=4 \
  --policy_description_bytes=4096 --flood_interval_ms=5 --flood_hold_seconds=2 \
  --hook_interval_seconds=0.2 --thread_cpu)
echo "$out"
for row in "mean of the quiet windows on both sides, median of 2 rounds" "control: guest events/s" \
  "kvmid RSS peak" "kvmid threads" "connect -> hooked" "at the end" "round 1: idle streams" \
  "round 2: idle streams" "streams refused" "policy flood" "silent Attach" "KVMI flood" \
  "round 2, CPU per second by thread kind" "| kvmid kvmid-io-# |"; do
  if ! grep -qF -- "$row" <<<"$out"; then
    echo "FAIL: no '$row' in the output" >&2
    exit 1
  fi
done
# Every window measured events: the fleet hooked and ran before, during and after each abuse
# (a round's row: | round | quiet before | abuse | quiet after | ...).
rows=$(grep -cE '^\| [12] \| [1-9][0-9]* \| [1-9][0-9]* \| [1-9][0-9]* \|' <<<"$out" || true)
if [[ "$rows" != 2 ]]; then
  echo "FAIL: $rows of 2 rounds with events in every window" >&2
  exit 1
fi
# The flood child ran in both rounds (it serves one "go" per round).
floods=$(grep -cE 'KVMI flood \(uid [0-9]+, [^)]*\): [1-9][0-9]* connected' <<<"$out" || true)
if [[ "$floods" != 2 ]]; then
  echo "FAIL: the KVMI flood connected in $floods of 2 rounds" >&2
  exit 1
fi
echo PASS
