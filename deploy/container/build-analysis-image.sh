#!/usr/bin/env bash
# Builds the sidecar example's analysis image offline with buildah: FROM scratch plus one static
# binary, the Go example client of kvmid's API (clients/go: `bash clients/go/build.sh OUT`,
# CGO_ENABLED=0). deploy/kubernetes/sidecar.yaml runs it next to kvmid.
#
#   bash deploy/container/build-analysis-image.sh OUT/kvmi-client IMAGE_NAME
set -euo pipefail

if [ $# -ne 2 ]; then
  echo "usage: $0 STATIC_CLIENT_BINARY IMAGE_NAME" >&2
  exit 2
fi
bin="$1"
image="$2"
[ -x "$bin" ] || { echo "build-analysis-image.sh: $bin is not an executable" >&2; exit 1; }
if ldd "$bin" >/dev/null 2>&1; then
  echo "build-analysis-image.sh: $bin is dynamically linked; a scratch image needs a static binary" >&2
  exit 1
fi
command -v buildah >/dev/null || { echo "build-analysis-image.sh: buildah not found" >&2; exit 1; }

ctr="$(buildah from scratch)"
trap '[ -n "$ctr" ] && buildah rm "$ctr" >/dev/null 2>&1' EXIT
buildah copy --quiet --chmod 0755 "$ctr" "$bin" /usr/bin/kvmi-client >/dev/null
buildah config \
  --entrypoint '["/usr/bin/kvmi-client"]' \
  --cmd '["--addr=unix:///run/kvmid/api.sock", "--list_only"]' \
  --workingdir / \
  --label org.opencontainers.image.title=kvmi-analysis \
  --label org.opencontainers.image.description="example analysis sidecar: a client of kvmid's gRPC API" \
  "$ctr"
buildah commit --quiet --rm "$ctr" "$image" >/dev/null
ctr=""
echo "built $image: $(buildah images --format '{{.Size}}' "$image" | head -n 1)"
