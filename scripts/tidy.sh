#!/usr/bin/env bash
# clang-tidy (.clang-tidy's checks; every finding is an error) over every C++ source of
# //daemon, //kernel and //common, tests included, or over the FILEs given (paths from the
# project root). Builds the targets first (clang-tidy needs their generated .pb.h headers), then
# writes the compile database from `bazel aquery` (scripts/compile_commands.py) to a temporary
# directory. Exit status 0 when clang-tidy found nothing.
#   usage: scripts/tidy.sh [FILE...]
set -euo pipefail
cd "$(dirname "$0")/.."
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
  xargs -r -P "$(nproc)" -n 4 clang-tidy --quiet --config-file=.clang-tidy -p "$db"
