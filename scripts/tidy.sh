#!/usr/bin/env bash
# clang-tidy (.clang-tidy's checks; every finding is an error) over every C++ source of
# //daemon, //kernel and //common, tests included, or over the FILEs given (paths from the
# project root). Builds the targets first (clang-tidy needs their generated .pb.h headers), then
# writes the compile database from `bazel aquery` (scripts/compile_commands.py) to a temporary
# directory. Exit status 0 when clang-tidy found nothing. Clang's thread-safety analysis
# (.clang-tidy's ExtraArgs: -Wthread-safety, ABSL_GUARDED_BY & co. on kvmid::Mutex) runs inside
# the same pass.
# --self-check runs the same clang-tidy over tests/tidy/planted_thread_safety.cc (no build) and
# exits 0 only if it reports the planted unlocked write: the analysis is live.
#   usage: scripts/tidy.sh [FILE...] | scripts/tidy.sh --self-check
set -euo pipefail
cd "$(dirname "$0")/.."
tidy=(clang-tidy --quiet --config-file=.clang-tidy)
if [ "${1:-}" = "--self-check" ]; then
  planted=tests/tidy/planted_thread_safety.cc
  out="$("${tidy[@]}" "$planted" -- -std=c++17 -I. 2>&1 || true)"
  printf '%s\n' "$out"
  expected="error: writing variable 'count_' requires holding mutex 'mu_' exclusively [clang-diagnostic-thread-safety-analysis"
  if grep -F "$planted:" <<<"$out" | grep -qF "$expected"; then
    echo "tidy self-check: the thread-safety analysis reported the planted unlocked write"
    exit 0
  fi
  echo "tidy self-check: error: no thread-safety finding for the planted unlocked write in $planted"
  exit 1
fi
targets=(//daemon/... //kernel/... //common/...)
flags=(--color=no)
[ -t 1 ] || flags+=(--curses=no --show_progress_rate_limit=30)
db="$(mktemp -d /tmp/kvmid-tidy.XXXXXX)"
trap 'rm -rf "$db"' EXIT
# Quiet when the build works; its output when it does not.
if ! bazel build "${flags[@]}" "${targets[@]}" >"$db/build.log" 2>&1; then
  cat "$db/build.log"
  exit 1
fi
python3 scripts/compile_commands.py "$db/compile_commands.json" "${targets[@]}"
root="$(bazel info execution_root 2>/dev/null)"
if [ "$#" -gt 0 ]; then
  # Paths from the project root (an absolute one loses the project's prefix).
  for file in "$@"; do printf '%s\n' "${file#"$PWD"/}"; done
else
  python3 -c 'import json, sys
for entry in json.load(open(sys.argv[1])):
    print(entry["file"])' "$db/compile_commands.json"
fi | sed "s|^|$root/|" |
  xargs -r -P "$(nproc)" -n 4 "${tidy[@]}" -p "$db"
