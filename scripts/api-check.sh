#!/usr/bin/env bash
# Checks kvmid's public API (proto/kvmi/v1) with buf, offline, against the rules in buf.yaml:
#   lint      `buf lint`: STANDARD + COMMENTS, the exceptions listed in buf.yaml
#   breaking  `buf breaking` against the committed v1 baseline (proto/baseline/kvmi-v1.binpb),
#             FILE rules: wire, JSON and generated-code compatibility
#   and proves both can fail: on a scratch copy of the API, a message without a comment and an
#   enum value without its prefix must fail lint; a deleted field and a renamed enum value must
#   fail breaking.
#
# Usage: scripts/api-check.sh [--junit FILE]     run the four checks (exit 1 if any failed)
#        scripts/api-check.sh --update-baseline  rebuild the baseline from proto/ as it is now
#                                                (after an intended change, before v1 freezes)
# BUF overrides the buf binary (default: the one scripts/setup.sh installs).
set -uo pipefail
cd "$(dirname "$0")/.."

BASELINE=proto/baseline/kvmi-v1.binpb
BUF="${BUF:-/opt/kvmid-tools/node_modules/.bin/buf}"
if [ ! -x "$BUF" ]; then
  BUF="$(command -v buf || true)"
fi
if [ -z "$BUF" ]; then
  echo "api-check: buf not found (run scripts/setup.sh, or set BUF)" >&2
  exit 2
fi

if [ "${1:-}" = "--update-baseline" ]; then
  mkdir -p "$(dirname "$BASELINE")"
  "$BUF" build --exclude-source-info -o "$BASELINE" || exit 1
  echo "api-check: wrote $BASELINE ($(stat -c %s "$BASELINE") bytes); commit it"
  exit 0
fi

junit=""
if [ "${1:-}" = "--junit" ]; then
  junit="${2:?--junit needs a file}"
fi

work="$(mktemp -d /tmp/kvmid-api-check.XXXXXX)"
trap 'rm -rf "$work"' EXIT
cases=()   # "name|outcome|message"
failed=0

record() {  # name, rc (0 = passed), message when failed
  if [ "$2" -eq 0 ]; then
    echo "api-check: $1 passed"
    cases+=("$1|passed|")
  else
    echo "api-check: $1 FAILED: $3"
    cases+=("$1|failed|$3")
    failed=1
  fi
}

# 1. lint
"$BUF" lint >"$work/lint.out" 2>&1
rc=$?
cat "$work/lint.out"
record lint "$rc" "buf lint reported $(wc -l <"$work/lint.out") problem(s) (see above)"

# 2. breaking against the baseline
if [ ! -f "$BASELINE" ]; then
  record breaking 1 "no baseline $BASELINE (scripts/api-check.sh --update-baseline)"
else
  "$BUF" breaking --against "$BASELINE" >"$work/breaking.out" 2>&1
  rc=$?
  cat "$work/breaking.out"
  record breaking "$rc" "buf breaking reported changes against $BASELINE (see above)"
fi

# A scratch copy of the module (buf.yaml + proto/) for the self-tests.
scratch() {
  rm -rf "$work/copy"
  mkdir -p "$work/copy"
  cp buf.yaml "$work/copy/"
  cp -r proto "$work/copy/"
}

# 3. lint must catch a violation: an undocumented message and an unprefixed enum value.
scratch
cat >>"$work/copy/proto/kvmi/v1/introspection.proto" <<'EOF'

message ApiCheckUndocumented {
  string field = 1;
}
EOF
cat >>"$work/copy/proto/kvmi/v1/policy.proto" <<'EOF'

// An enum for api-check.
enum ApiCheckKind {
  // Unset.
  API_CHECK_KIND_UNSPECIFIED = 0;
  // A value without the enum's prefix.
  UNPREFIXED = 1;
}
EOF
(cd "$work/copy" && "$BUF" lint) >"$work/lint-bad.out" 2>&1
rc=$?
if [ "$rc" -ne 0 ] && grep -q 'Message "ApiCheckUndocumented" should have a non-empty comment' \
  "$work/lint-bad.out" && grep -q 'Enum value name "UNPREFIXED" should be prefixed' \
  "$work/lint-bad.out"; then
  record lint_catches_violations 0 ""
else
  cat "$work/lint-bad.out"
  record lint_catches_violations 1 "buf lint (exit $rc) missed a planted violation"
fi

# 4. breaking must catch a deleted field and a renamed enum value.
if [ -f "$BASELINE" ]; then
  scratch
  sed -i -E '/^message VM \{/,/^\}/{/^  string transport = 4;/d}' \
    "$work/copy/proto/kvmi/v1/introspection.proto"
  sed -i -E 's/^(  ACTION_CRASH)( = 3;)/\1ED\2/' "$work/copy/proto/kvmi/v1/policy.proto"
  (cd "$work/copy" && "$BUF" breaking --against "$OLDPWD/$BASELINE") >"$work/breaking-bad.out" 2>&1
  rc=$?
  if [ "$rc" -ne 0 ] &&
    grep -q 'field "4" with name "transport" on message "VM" was deleted' \
      "$work/breaking-bad.out" &&
    grep -q 'changed name from "ACTION_CRASH" to "ACTION_CRASHED"' "$work/breaking-bad.out"; then
    record breaking_catches_changes 0 ""
  else
    cat "$work/breaking-bad.out"
    record breaking_catches_changes 1 "buf breaking (exit $rc) missed a planted breaking change"
  fi
else
  record breaking_catches_changes 1 "no baseline $BASELINE"
fi

if [ -n "$junit" ]; then
  {
    echo '<?xml version="1.0" encoding="UTF-8"?>'
    echo "<testsuites><testsuite name=\"api\" tests=\"${#cases[@]}\">"
    for c in "${cases[@]}"; do
      IFS='|' read -r name outcome message <<<"$c"
      if [ "$outcome" = passed ]; then
        echo "<testcase classname=\"api\" name=\"$name\"/>"
      else
        message="${message//&/&amp;}"
        message="${message//</&lt;}"
        message="${message//\"/&quot;}"
        echo "<testcase classname=\"api\" name=\"$name\"><failure message=\"$message\"/></testcase>"
      fi
    done
    echo '</testsuite></testsuites>'
  } >"$junit"
fi
exit "$failed"
