#!/usr/bin/env bash
# README command (2): installs what is missing, then runs every test and prints, as its last line,
# `N passed, N failed` (`, N skipped` when some were). Steps, each counted in test cases:
#   unit  bazel test //...                               (gtest cases; fuzz targets replay corpus)
#   asan  bazel test --config=asan //...                  (the same cases under ASan + UBSan;
#         tests tagged no-asan, e.g. tests/deploy's containers, are left out)
#   tsan  bazel test --config=tsan, tests tagged "tsan"   (threading tests opt in with the tag)
#   tidy  scripts/tidy.sh: clang-tidy (.clang-tidy) over every source of //daemon, //kernel,
#         //common, tests included, with clang's thread-safety analysis (-Wthread-safety, from
#         .clang-tidy's ExtraArgs) in the same pass (1 case, failed by any finding)
#   tsa   scripts/tidy.sh --self-check: that analysis reports a planted unlocked write (1 case)
#   fuzz  scripts/fuzz.sh: each libFuzzer target for KVMID_FUZZ_SECONDS (30) s; 1 case per target
#   format  clang-format --dry-run --Werror on every tracked .cc/.h (1 case)
#   api   scripts/api-check.sh: buf lint, buf breaking against proto/baseline/kvmi-v1.binpb, and
#         two self-tests proving each fails on a planted violation (4 cases; runs first, offline)
# Exit status is non-zero if any case failed or any step could not run. Works as root (no sudo
# needed) or as a user with sudo; needs no standard input.
set -uo pipefail
cd "$(dirname "$0")/.."

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

work="$(mktemp -d /tmp/kvmid-test.XXXXXX)"
counts=()
# Bazel's progress display is for terminals; CI logs get plain lines.
flags=(--color=no)
[ -t 1 ] || flags+=(--curses=no --show_progress_rate_limit=30)

# A step that is one check (format, tidy, tsa): runs COMMAND... with its output in
# $work/LABEL.log, prints the log's lines that match PATTERN when it fails, and counts one case
# CASE of suite LABEL, failed with MESSAGE (plain text: no quotes or markup) when COMMAND is not 0.
one_check_step() {  # LABEL CASE PATTERN MESSAGE COMMAND...
  local label="$1" case_name="$2" pattern="$3" message="$4"
  shift 4
  echo "== $label: $*"
  local start=$SECONDS log="$work/$label.log"
  "$@" >"$log" 2>&1
  local rc=$?
  echo "== $label: exit $rc after $((SECONDS - start)) s"
  if [ "$rc" -ne 0 ]; then
    # The matching lines; a failure that matches nothing (a crash, a missing tool) shows its end.
    if grep -qE "$pattern" "$log"; then
      grep -E "$pattern" "$log" | sort -u | head -n 40
    else
      tail -n 20 "$log"
    fi
  fi
  {
    echo '<?xml version="1.0" encoding="UTF-8"?>'
    echo "<testsuites><testsuite name=\"$label\" tests=\"1\">"
    if [ "$rc" -eq 0 ]; then
      echo "<testcase classname=\"$label\" name=\"$case_name\"/>"
    else
      echo "<testcase classname=\"$label\" name=\"$case_name\"><failure message=\"$message\"/></testcase>"
    fi
    echo '</testsuite></testsuites>'
  } >"$work/$label.xml"
  counts+=(--label "$label" --junit "$work/$label.xml")
}

# Every tracked .cc/.h through clang-format --dry-run --Werror; prints "FILE: needs clang-format"
# for each file it would change (clang-format's own output: $work/format.out).
format_check() {
  local out="$work/format.out"
  if git rev-parse --git-dir >/dev/null 2>&1; then
    git ls-files -z '*.cc' '*.h'
  else
    find . -path ./bazel-\* -prune -o \( -name '*.cc' -o -name '*.h' \) -print0
  fi | xargs -0 clang-format --dry-run --Werror >"$out" 2>&1
  local rc=$?
  grep -oE "^[^: ]+\.(cc|h)" "$out" | sort -u | sed 's/$/: needs clang-format/'
  return "$rc"
}

summary() {
  python3 scripts/count_results.py "${counts[@]}"
}

echo "== setup"
if ! as_root bash scripts/setup.sh </dev/null; then
  echo "setup failed: cannot install the packages the build needs"
  echo "0 passed, 1 failed"
  exit 1
fi

# bazel test exit codes: 0 all passed, 3 some test failed (counted from the XML), 4 no tests
# matched (fine for an opt-in tag); anything else means the step itself broke.
run_bazel_test() {  # label, bazel args...
  local label="$1"
  shift
  echo "== $label: bazel test $*"
  local start=$SECONDS
  bazel test "${flags[@]}" --keep_going --build_event_json_file="$work/$label.json" "$@"
  local rc=$?
  echo "== $label: exit $rc after $((SECONDS - start)) s"
  counts+=(--label "$label")
  case "$rc" in
    0 | 3) counts+=(--bep "$work/$label.json") ;;
    4) ;;
    *) counts+=(--bep "$work/$label.json" --failed-step "bazel test exited $rc") ;;
  esac
}

# The public API (proto/kvmi/v1): lint-clean, and no breaking change against the v1 baseline.
echo "== api: scripts/api-check.sh"
bash scripts/api-check.sh --junit "$work/api.xml"
api_rc=$?
echo "== api: exit $api_rc"
counts+=(--label api)
if [ -s "$work/api.xml" ]; then
  counts+=(--junit "$work/api.xml")
else
  counts+=(--failed-step "scripts/api-check.sh exited $api_rc without results")
fi

# Every C++ file as clang-format (.clang-format: Google style, 100 columns) leaves it: one case,
# failed by any file it would change (each is named).
one_check_step format clang_format "needs clang-format" \
  "clang-format would change these files (clang-format -i FILE)" format_check

run_bazel_test unit //...
# The sanitizer steps build only the tests they run and what those need (--build_tests_only):
# the unit step has already built every target, and without it Bazel would compile all of //...
# (benches, tools, tests the tag filter leaves out) once more per sanitizer. Measured on a cold
# clone (2026-12-06): the tsan step compiled 1,069 actions for its 28 tests.
run_bazel_test asan --config=asan --build_tests_only --test_tag_filters=-no-asan //...
run_bazel_test tsan --config=tsan --build_tests_only --test_tag_filters=tsan //...

# clang-tidy over the project's C++ (scripts/tidy.sh; .clang-tidy: bugprone, performance and a
# few modernize checks, and clang's thread-safety analysis over ABSL_GUARDED_BY & co. of
# daemon/base/mutex.h; every finding an error): one case, failed by any finding. The analysis
# runs in clang-tidy's parse rather than in a separate clang build of //daemon/... (the former
# tsa step; `bazel build --config=tsa //daemon/...` still does it by hand), which saved CI a
# whole compile of the daemon.
one_check_step tidy clang_tidy "(warning|error):" \
  "clang-tidy reported findings (see the log above; scripts/tidy.sh FILE to check one)" \
  bash scripts/tidy.sh

# The thread-safety analysis above is live: it reports the planted unlocked write of
# tests/tidy/planted_thread_safety.cc (one case).
one_check_step tsa thread_safety_analysis_is_live "tidy self-check" \
  "clang-tidy did not report the planted unlocked write (scripts/tidy.sh --self-check)" \
  bash scripts/tidy.sh --self-check

echo "== fuzz"
fuzz_start=$SECONDS
KVMID_FUZZ_RESULTS="$work/fuzz" KVMID_FUZZ_OUT="$work/fuzz-out" bash scripts/fuzz.sh
echo "== fuzz: $((SECONDS - fuzz_start)) s"
counts+=(--label fuzz)
found=0
for xml in "$work"/fuzz/*.xml; do
  [ -e "$xml" ] || continue
  counts+=(--junit "$xml")
  found=1
done
[ "$found" -eq 1 ] || counts+=(--failed-step "fuzz run produced no results")

echo "== results (logs: bazel-testlogs*/, $work)"
summary
