#!/usr/bin/env bash
# Builds the libFuzzer targets with clang (--config=fuzz) and fuzzes each for a bounded time,
# starting from a copy of the checked-in seed corpus.
#   scripts/fuzz.sh [seconds per target]     default: $KVMID_FUZZ_SECONDS or 30
# Writes one JUnit test case per target to $KVMID_FUZZ_RESULTS (if set) for scripts/test.sh, and
# keeps logs, the grown corpus and any crash input under $KVMID_FUZZ_OUT (default: a /tmp dir).
set -uo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-${KVMID_FUZZ_SECONDS:-30}}"
out="${KVMID_FUZZ_OUT:-$(mktemp -d /tmp/kvmid-fuzz.XXXXXX)}"
results="${KVMID_FUZZ_RESULTS:-$out/results}"
mkdir -p "$out" "$results"
targets=(decoder handshake)

junit() {  # name, seconds, failure message ("" = passed)
  local name="$1" secs="$2" failure="$3"
  {
    echo '<?xml version="1.0" encoding="UTF-8"?>'
    echo "<testsuites><testsuite name=\"fuzz\" tests=\"1\">"
    echo "<testcase classname=\"fuzz\" name=\"${name}\" status=\"run\" time=\"${secs}\">"
    [ -n "$failure" ] && echo "<failure message=\"${failure}\"/>"
    echo "</testcase></testsuite></testsuites>"
  } >"$results/fuzz_${name}.xml"
}

# A build failure shows up below as "did not build" for the targets it affects.
bazel build --color=no --config=fuzz //tests/fuzz:decoder_fuzzer //tests/fuzz:handshake_fuzzer
bin="$(bazel info --config=fuzz bazel-bin 2>/dev/null)/tests/fuzz"

status=0
for target in "${targets[@]}"; do
  name="${target}_fuzzer"
  if [ ! -x "$bin/$name" ]; then
    echo "fuzz: $name did not build"
    junit "$name" 0 "did not build"
    status=1
    continue
  fi
  corpus="$out/$target-corpus"
  mkdir -p "$corpus"
  cp tests/fuzz/corpus/"$target"/* "$corpus"/
  start=$SECONDS
  "$bin/$name" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    -artifact_prefix="$out/$target-" "$corpus" >"$out/$target.log" 2>&1
  rc=$?
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$out/$target.log")
  if [ "$rc" -eq 0 ]; then
    echo "fuzz: $name clean, ${runs:-?} inputs in $((SECONDS - start)) s (log: $out/$target.log)"
    junit "$name" "$((SECONDS - start))" ""
  else
    echo "fuzz: $name FAILED (exit $rc); last lines of $out/$target.log:"
    tail -n 30 "$out/$target.log" | sed 's/^/  /'
    ls "$out/$target-"* 2>/dev/null | sed 's/^/  crash input: /'
    junit "$name" "$((SECONDS - start))" "exit $rc, see $out/$target.log"
    status=1
  fi
done
exit "$status"
