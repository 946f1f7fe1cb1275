#!/usr/bin/env bash
# Builds the Go example client of kvmid's API, offline, with Debian's Go packages (GOPATH mode:
# module mode would need the unreachable Go proxy). Stubs are generated from proto/kvmi/v1 at
# every build (never committed).
#
#   bash clients/go/build.sh OUT_DIR      # -> OUT_DIR/kvmi-client
#
# Needs (scripts/setup.sh installs them): golang-go golang-google-grpc-dev
# golang-google-protobuf-dev golang-github-golang-protobuf-1-5-dev protoc-gen-go
# protoc-gen-go-grpc protobuf-compiler. Writes only under OUT_DIR (GOPATH workspace, and the Go
# build cache unless GOCACHE is set), so it works in a Bazel sandbox with OUT_DIR in $TEST_TMPDIR.
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

for tool in go protoc protoc-gen-go protoc-gen-go-grpc; do
  if ! command -v "$tool" >/dev/null; then
    echo "build.sh: '$tool' not found; run scripts/setup.sh (as root)" >&2
    exit 1
  fi
done
if [ ! -d /usr/share/gocode/src/google.golang.org/grpc ]; then
  echo "build.sh: gRPC-Go sources missing (golang-google-grpc-dev); run scripts/setup.sh" >&2
  exit 1
fi

ws="$out/gopath"
pkg="$ws/src/kvmid/clients/go"
rm -rf "$ws"
mkdir -p "$pkg/kvmi-client"

# go_package = "kvmid/clients/go/kvmi/v1": with the default paths=import the stubs land at
# $ws/src/kvmid/clients/go/kvmi/v1, where GOPATH mode finds them.
protoc -I"$root" --go_out="$ws/src" --go-grpc_out="$ws/src" \
  "$root/proto/kvmi/v1/policy.proto" "$root/proto/kvmi/v1/introspection.proto"
cp -L "$here/kvmi-client/"*.go "$pkg/kvmi-client/"

export GO111MODULE=off
export GOPATH="$ws:/usr/share/gocode"
export GOPROXY=off GOFLAGS= CGO_ENABLED=0
export GOCACHE="${GOCACHE:-$out/.gocache}"
export HOME="${HOME:-$out}"
[ -w "$HOME" ] || export HOME="$out"

cd "$pkg/kvmi-client"
go vet .
go build -o "$out/kvmi-client" .
echo "built $out/kvmi-client"
