#!/usr/bin/env bash
# Installs every Debian 12 package that the build, the tests, the fuzzers and the clients need.
# Idempotent; run as root on a fresh machine. Skips apt when everything is already present
# (so repeated runs are fast and work without network).
set -euo pipefail

PACKAGES=(
  # Build: Bazel 4.2.3 and the system libraries it wraps through pkg-config.
  bazel-bootstrap pkg-config g++ clang lld libclang-rt-14-dev
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler grpc-proto
  libabsl-dev libspdlog-dev libfmt-dev libgtest-dev libgmock-dev libbenchmark-dev libssl-dev
  # Metrics: prometheus-cpp (its exposer embeds civetweb, whose header serves /healthz, /readyz).
  prometheus-cpp-dev libcivetweb-dev
  # Formatting / lint.
  clang-format clang-tidy
  # Python client; pip, setuptools, wheel and venv install it offline (pyproject.toml).
  python3 python3-grpcio python3-protobuf python3-pip python3-setuptools python3-wheel python3-venv
  # A real Prometheus server (and promtool) for the metrics end-to-end test.
  prometheus
  # The demo (scripts/run.sh) reads a few series from /metrics.
  curl
  # Certificates for the TLS tests and scripts/dev-certs.sh.
  openssl
  # Go client (clients/go: a Go module built offline in module mode against these; stubs generated
  # at build time).
  golang-go golang-google-grpc-dev golang-google-protobuf-dev golang-github-golang-protobuf-1-5-dev
  protoc-gen-go protoc-gen-go-grpc
  # Deployment tests (tests/deploy): the OCI image built offline and run, the sidecar pod played,
  # the systemd unit verified and its sandbox checked against a trace of kvmid.
  podman buildah runc catatonit python3-yaml strace
)

# buf (its `buf curl` is the grpcurl of clients/buf_curl and the README): from npm, which ships
# the binary. Pinned; installed under /opt/kvmid-tools. Node.js/npm come from Debian when absent.
BUF_VERSION=1.75.0
BUF_PREFIX=/opt/kvmid-tools
command -v npm >/dev/null || PACKAGES+=(nodejs npm)

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  echo "setup: all ${#PACKAGES[@]} packages present"
fi

if [ "$("$BUF_PREFIX/node_modules/.bin/buf" --version 2>/dev/null)" != "$BUF_VERSION" ]; then
  echo "setup: installing @bufbuild/buf@$BUF_VERSION under $BUF_PREFIX"
  npm install --prefix "$BUF_PREFIX" --no-audit --no-fund --loglevel=error "@bufbuild/buf@$BUF_VERSION"
  "$BUF_PREFIX/node_modules/.bin/buf" --version
else
  echo "setup: buf $BUF_VERSION present"
fi
