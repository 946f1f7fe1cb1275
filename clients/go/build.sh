#!/usr/bin/env bash
# Builds the Go module of kvmid's API client (github.com/kvmid/kvmid/clients/go: the kvmi/v1
# stubs, the kvmimem helpers, the kvmi-client example), offline, with Debian's Go packages, in
# module mode (GOFLAGS=-mod=mod, GOPROXY=off). Stubs are generated from proto/kvmi/v1 at every
# build (never committed).
#
#   bash clients/go/build.sh OUT_DIR      # -> OUT_DIR/kvmi-client, OUT_DIR/src (the module)
#
# Needs (scripts/setup.sh installs them): golang-go golang-google-grpc-dev
# golang-google-protobuf-dev golang-github-golang-protobuf-1-5-dev protoc-gen-go
# protoc-gen-go-grpc protobuf-compiler. Writes only under OUT_DIR (the module copy, and the Go
# build cache unless GOCACHE is set), so it works in a Bazel sandbox with OUT_DIR in $TEST_TMPDIR.
#
# No network: every module of the dependency graph is replaced (a `replace` line in the copy's
# go.mod) by Debian's copy under /usr/share/gocode/src when Debian ships it, else by an empty
# stand-in module: those are modules that only appear in the graph (test or optional
# dependencies of gRPC and genproto: envoy, glog, oauth2, ...), whose packages nothing imports;
# if one were imported the build would fail naming the package.
set -euo pipefail

if [ $# -ne 1 ]; then
  echo "usage: $0 OUT_DIR" >&2
  exit 2
fi
# The repository root (or a Bazel runfiles tree): two levels up, without resolving symlinks.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
mkdir -p "$1"
out="$(cd "$1" && pwd)"
gocode="${KVMI_GOCODE:-/usr/share/gocode/src}"

for tool in go protoc protoc-gen-go protoc-gen-go-grpc; do
  if ! command -v "$tool" >/dev/null; then
    echo "build.sh: '$tool' not found; run scripts/setup.sh (as root)" >&2
    exit 1
  fi
done
if [ ! -d "$gocode/google.golang.org/grpc" ]; then
  echo "build.sh: gRPC-Go sources missing (golang-google-grpc-dev); run scripts/setup.sh" >&2
  exit 1
fi

mod="$out/src"
rm -rf "$mod" "$out/stand-ins"
mkdir -p "$mod/kvmi-client" "$mod/kvmimem" "$out/stand-ins"
cp -L "$here/go.mod" "$mod/go.mod"
chmod u+w "$mod/go.mod"
module="$(sed -n 's/^module //p' "$mod/go.mod")"
cp -L "$here/kvmi-client/"*.go "$mod/kvmi-client/"
cp -L "$here/kvmimem/"*.go "$mod/kvmimem/"

# go_package = "$module/kvmi/v1": with module=$module the stubs land at $mod/kvmi/v1.
protoc -I"$root" --go_out="$mod" --go_opt=module="$module" \
  --go-grpc_out="$mod" --go-grpc_opt=module="$module" \
  "$root/proto/kvmi/v1/policy.proto" "$root/proto/kvmi/v1/introspection.proto"

export GO111MODULE=on GOFLAGS=-mod=mod GOPROXY=off GOSUMDB=off GONOSUMDB='*' GOTOOLCHAIN=local
export CGO_ENABLED=0 GOWORK=off
export GOCACHE="${GOCACHE:-$out/.gocache}"
export GOMODCACHE="$out/.gomodcache"
export HOME="${HOME:-$out}"
[ -w "$HOME" ] || export HOME="$out"
cd "$mod"

# Resolve the graph: each module Go cannot look up (GOPROXY=off) gets its replacement, until
# none is missing. Bounded: the graph is finite and each round replaces at least one module.
replaced=" "
for _ in $(seq 1 64); do
  if log="$(go list -m all 2>&1)"; then
    break
  fi
  # "go: M@V: module lookup disabled by GOPROXY=off", or indented under "X requires".
  missing="$(printf '%s\n' "$log" |
    sed -n 's/^[[:space:]]*\(go: \)\{0,1\}\([^@ ]*\)@[^: ]*: .*GOPROXY=off.*/\2/p' | sort -u)"
  if [ -z "$missing" ]; then
    echo "build.sh: cannot resolve the module graph offline:" >&2
    printf '%s\n' "$log" >&2
    exit 1
  fi
  for m in $missing; do
    case "$replaced" in *" $m "*)
      echo "build.sh: $m is still missing after its replacement:" >&2
      printf '%s\n' "$log" >&2
      exit 1 ;;
    esac
    replaced="$replaced$m "
    if [ -f "$gocode/$m/go.mod" ]; then
      echo "replace $m => $gocode/$m" >>go.mod
    else
      stand_in="$out/stand-ins/$m"
      mkdir -p "$stand_in"
      echo "module $m" >"$stand_in/go.mod"
      echo "replace $m => $stand_in" >>go.mod
    fi
  done
done

go vet ./...  # type-checks every package of the module (the stubs, kvmimem, the example)
go build -o "$out/kvmi-client" ./kvmi-client
echo "built $out/kvmi-client (module $module; $(grep -c '^replace' go.mod) modules from Debian or stand-ins)"
