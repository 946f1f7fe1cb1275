#!/bin/bash
# The abuse benchmark runs end to end in a tiny configuration and prints its table. Nothing about
# the figures is asserted (a benchmark, not a timed test): only that the table is complete.
set -euo pipefail
out=$(tests/bench/abuse_bench --kvmid=daemon/kvmid --guests=2 --streams=20 --silent_streams=4 \
  --channels=2 --silent_channels=2 --seconds=1 --policy_names=4 --policy_description_bytes=4096 \
  --flood_interval_ms=5 --flood_hold_seconds=2 --hook_interval_seconds=0.2)
echo "$out"
for row in "guest events/s" "ratio abuse / quiet" "mean of both quiet windows" "kvmid RSS peak" \
  "kvmid threads" \
  "connect -> hooked" "after the abuse" "streams refused" "policy flood" "silent Attach" \
  "KVMI flood"; do
  if ! grep -qF "$row" <<<"$out"; then
    echo "FAIL: no '$row' in the output" >&2
    exit 1
  fi
done
# Every window measured events: the fleet hooked and ran before, during and after the abuse.
if ! grep -E '^\| guest events/s[^|]*\| [1-9][0-9]* \| [1-9][0-9]* \| [1-9][0-9]* \|' <<<"$out" \
  >/dev/null; then
  echo "FAIL: a window without events" >&2
  exit 1
fi
echo PASS
