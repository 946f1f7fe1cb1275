# Shell harness for the client tests (sourced): JUnit XML with one testcase per check, and a real
# kvmid + kvmi-sim fleet started per test, polled for readiness with deadlines (no bare sleeps).
#
#   source clients/testing/harness.sh
#   harness_init                       # finds the binaries, makes a short /tmp work dir, traps EXIT,
#                                      # development certificates in $certs (scripts/dev-certs.sh)
#   start_kvmid NAME [kvmid flags...]  # -> ${NAME}_api (unix socket path), ${NAME}_port (TCP, mTLS
#                                      # with $certs/server.pem; clients use $certs/{ca,admin}.pem)
#   start_sim NAME VMS                 # simulated guests connecting to kvmid NAME
#   check "name" cmd args...           # a testcase: passes when the command exits 0
#   skip "name" "why"; fail "name" "why"
#   finish                             # writes $XML_OUTPUT_FILE, prints "N passed, N failed", exits
#
# Outside Bazel: KVMID_BIN and KVMI_SIM_BIN name the binaries (default: bazel-bin/...).

_cases=()   # XML fragments
_passed=0
_failed=0
_skipped=0
_pids=()

_xml_escape() {
  python3 -c 'import sys, html; sys.stdout.write(html.escape(sys.stdin.read(), quote=True))'
}

_record() {  # status name seconds message output-file
  local status="$1" name="$2" secs="$3" msg="$4" out="${5:-}"
  local frag="<testcase classname=\"${HARNESS_SUITE}\" name=\"$(printf %s "$name" | _xml_escape)\" time=\"$secs\">"
  case "$status" in
    pass) _passed=$((_passed + 1)); echo "PASS $name (${secs}s)" ;;
    skip)
      _skipped=$((_skipped + 1)); echo "SKIP $name: $msg"
      frag+="<skipped message=\"$(printf %s "$msg" | _xml_escape)\"/>" ;;
    fail)
      _failed=$((_failed + 1)); echo "FAIL $name: $msg"
      local body=""
      if [ -n "$out" ] && [ -f "$out" ]; then
        echo "---- output of $name (last 40 lines)"; tail -n 40 "$out"; echo "----"
        body="$(tail -c 8000 "$out" | _xml_escape)"
      fi
      frag+="<failure message=\"$(printf %s "$msg" | _xml_escape)\">${body}</failure>" ;;
  esac
  frag+="</testcase>"
  _cases+=("$frag")
}

# check NAME CMD...: runs CMD (a shell function or program); its output goes to $work/NAME.out.
check() {
  local name="$1"
  shift
  local _out="$work/${name//[^A-Za-z0-9_.-]/_}.out"
  local start=$SECONDS rc=0
  "$@" >"$_out" 2>&1 || rc=$?
  if [ "$rc" -eq 0 ]; then
    _record pass "$name" $((SECONDS - start)) ""
  elif [ "$rc" -eq 77 ]; then
    _record skip "$name" $((SECONDS - start)) "$(tail -n 1 "$_out")"
  else
    _record fail "$name" $((SECONDS - start)) "exit $rc: $(tail -n 1 "$_out")" "$_out"
  fi
}
skip() { _record skip "$1" 0 "$2"; }
fail() { _record fail "$1" 0 "$2" "${3:-}"; }

finish() {
  local total=$((_passed + _failed + _skipped))
  local xml="${XML_OUTPUT_FILE:-$work/test.xml}"
  {
    echo '<?xml version="1.0" encoding="UTF-8"?>'
    echo "<testsuites><testsuite name=\"${HARNESS_SUITE}\" tests=\"$total\" failures=\"$_failed\" errors=\"0\" skipped=\"$_skipped\">"
    printf '%s\n' "${_cases[@]}"
    echo "</testsuite></testsuites>"
  } >"$xml"
  local line="$_passed passed, $_failed failed"
  [ "$_skipped" -gt 0 ] && line+=", $_skipped skipped"
  echo "$line"
  [ "$_failed" -eq 0 ] && [ "$_passed" -gt 0 ] && exit 0
  exit 1
}

_cleanup() {
  local pid i
  # Newest first: the guests, then kvmid (SIGTERM: it restores the guests and exits).
  for ((i = ${#_pids[@]} - 1; i >= 0; i--)); do kill -TERM "${_pids[$i]}" 2>/dev/null; done
  for pid in "${_pids[@]}"; do wait "$pid" 2>/dev/null; done
  if [ -n "${work:-}" ] && [ "${HARNESS_KEEP:-0}" != 1 ]; then rm -rf "$work"; fi
}

# wait_until SECONDS CMD...: polls CMD every 0.1 s until it succeeds; fails at the deadline.
wait_until() {
  local deadline=$((SECONDS + $1))
  shift
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -ge "$deadline" ] && return 1
    sleep 0.1
  done
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

harness_init() {
  HARNESS_SUITE="${HARNESS_SUITE:-clients}"
  if [ -n "${TEST_SRCDIR:-}" ]; then
    root="$TEST_SRCDIR/${TEST_WORKSPACE:-kvmid}"
    KVMID_BIN="$root/daemon/kvmid"
    KVMI_SIM_BIN="$root/kernel/sim/kvmi-sim"
    DEV_CERTS="$root/scripts/dev-certs.sh"
    # Go, buf and friends want a writable HOME and cache; the sandbox gives us $TEST_TMPDIR.
    export HOME="$TEST_TMPDIR/home" XDG_CACHE_HOME="$TEST_TMPDIR/cache"
    mkdir -p "$HOME" "$XDG_CACHE_HOME"
  else
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
    KVMID_BIN="${KVMID_BIN:-$root/bazel-bin/daemon/kvmid}"
    KVMI_SIM_BIN="${KVMI_SIM_BIN:-$root/bazel-bin/kernel/sim/kvmi-sim}"
    DEV_CERTS="$root/scripts/dev-certs.sh"
  fi
  # Unix socket paths are limited to 107 bytes; $TEST_TMPDIR is longer.
  work="$(mktemp -d /tmp/kvc.XXXXXX)"
  trap _cleanup EXIT
  head -c 32 /dev/urandom | base64 | tr -d '\n' >"$work/cookie"
  # The TCP API is mutual TLS: a development CA, kvmid's certificate, a client per role.
  certs="$work/certs"
  bash "$DEV_CERTS" "$certs" localhost >/dev/null || { echo "harness: $DEV_CERTS failed"; return 1; }
  for bin in "$KVMID_BIN" "$KVMI_SIM_BIN"; do
    [ -x "$bin" ] || { echo "harness: $bin missing"; return 1; }
  done
}

# start_kvmid NAME [flags...]: kvmid with its KVMI socket, API on a unix socket and on TCP
# loopback with mutual TLS ($certs); returns once both API listeners accept connections
# (deadline 20 s).
start_kvmid() {
  local name="$1"
  shift
  local dir="$work/$name" port="" try
  mkdir -p "$dir"
  for try in 1 2 3; do
    port="$(free_port)"
    # The development certificates' roles are bound (authz) by every configuration used here.
    local config_flag=()
    case " $* " in
      *" --config="*) ;;
      *) _dev_authz >"$dir/authz.textproto"; config_flag=(--config="$dir/authz.textproto") ;;
    esac
    "$KVMID_BIN" "${config_flag[@]}" --kvmi_socket="$dir/kvmi.sock" --cookie_file="$work/cookie" \
      --api_socket="$dir/api.sock" --api_tcp="127.0.0.1:$port" --api_tls_cert="$certs/server.pem" \
      --api_tls_key="$certs/server.key" --api_tls_client_ca="$certs/ca.pem" --log_events=none \
      --state_dir="$dir/state" --metrics_address= "$@" \
      >"$dir/kvmid.log" 2>&1 &
    local pid=$!
    _pids+=("$pid")
    local deadline=$((SECONDS + 20)) up=0
    while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do
      if _kvmid_ready "$dir" "$port" 2>/dev/null; then up=1; break; fi
      sleep 0.1
    done
    if [ "$up" = 1 ]; then
      printf -v "${name}_api" %s "$dir/api.sock"
      printf -v "${name}_port" %s "$port"
      printf -v "${name}_kvmi" %s "$dir/kvmi.sock"
      return 0
    fi
    kill "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    echo "harness: kvmid $name did not come up (try $try):"
    tail -n 5 "$dir/kvmid.log"
    # A lost race for the port: try another; anything else fails the same way again.
    grep -q "cannot listen\|cannot serve" "$dir/kvmid.log" || return 1
  done
  return 1
}

_kvmid_ready() {  # dir port: both sockets exist and the API accepts on unix and TCP
  [ -S "$1/kvmi.sock" ] && [ -S "$1/api.sock" ] || return 1
  python3 - "$1/api.sock" "$2" <<'PY'
import socket, sys
for family, addr in ((socket.AF_UNIX, sys.argv[1]), (socket.AF_INET, ("127.0.0.1", int(sys.argv[2])))):
    s = socket.socket(family)
    s.settimeout(1)
    s.connect(addr)
    s.close()
PY
}

# start_sim NAME VMS [flags...]: simulated guests (2 vCPUs, mixed workload) for kvmid NAME.
start_sim() {
  local name="$1" vms="$2"
  shift 2
  local dir="$work/$name"
  "$KVMI_SIM_BIN" --connect="unix:$dir/kvmi.sock" --cookie_file="$work/cookie" --vms="$vms" \
    --vcpus=2 --scenario=mixed --rate=50 --duration=300 --log_level=warn "$@" \
    >"$dir/sim.log" 2>&1 &
  _pids+=("$!")
}

# The authz bindings of the development certificates (scripts/dev-certs.sh): each role's
# principal gets that role on every guest.
_dev_authz() {
  local role
  echo "authz {"
  for role in viewer responder operator admin; do
    echo "  bindings { principal: \"spiffe://${KVMID_TRUST_DOMAIN:-kvmid.dev}/role/$role\" role: \"$role\" }"
  done
  echo "}"
}

# write_demo_config FILE: the policies of daemon/config/examples/demo.textproto (that file is not
# exported to other Bazel packages): CR0.WP, SMEP/SMAP, LSTAR, SYSENTER_EIP locked in enforce
# mode; the simulated guests' data pages watched in monitor mode.
write_demo_config() {
  cat >"$1" <<'CFG'
verdicts { default_deadline_ms: 500 default_fallback: ACTION_CONTINUE }
policies { name: "cr0-wp" forbid_cr_bits_clear { cr: 0 bits: 0x10000 } mode: MODE_ENFORCE }
policies { name: "cr4-smep-smap" forbid_cr_bits_clear { cr: 4 bits: 0x300000 } mode: MODE_ENFORCE }
policies { name: "lstar-locked" lock_msr { msr: 0xc0000082 } mode: MODE_ENFORCE }
policies { name: "sysenter-eip-locked" lock_msr { msr: 0x176 } mode: MODE_ENFORCE }
policies {
  name: "data-watch"
  protect_pages { gpa_first: 0x200000 gpa_last: 0x20ffff allowed: "r" }
  action: ACTION_CONTINUE
  mode: MODE_MONITOR
}
CFG
  _dev_authz >>"$1"
}
