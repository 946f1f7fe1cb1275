#!/usr/bin/env bash
# Builds kvmid's OCI image offline with buildah: FROM scratch, then kvmid, exactly the shared
# libraries it loads (ldd) and a minimal /etc. Nothing is pulled from a registry.
#
#   bash deploy/container/build-image.sh KVMID_BINARY IMAGE_NAME     # e.g. localhost/kvmid:0.1
#
# The image runs kvmid as its entrypoint with the in-container defaults below; arguments given to
# `podman run IMAGE ...` (or a pod's `args:`) replace them. Its layout:
#   /usr/sbin/kvmid, /lib/..., /lib64/ld-linux-x86-64.so.2   the binary and its libraries
#   /etc/passwd, /etc/group, /etc/nsswitch.conf               root and nobody only
#   /run/kvmid  (mount the host's or the pod's socket directory here)
#   /etc/kvmid  (config, cookie; mount read-only), /var/lib/kvmid (state, later)
# Needs: buildah, ldd (libc-bin); run as root (or inside `buildah unshare`).
set -euo pipefail

if [ $# -ne 2 ]; then
  echo "usage: $0 KVMID_BINARY IMAGE_NAME" >&2
  exit 2
fi
bin="$1"
image="$2"
[ -x "$bin" ] || { echo "build-image.sh: $bin is not an executable" >&2; exit 1; }
command -v buildah >/dev/null || { echo "build-image.sh: buildah not found (apt-get install buildah)" >&2; exit 1; }

stage="$(mktemp -d "${TMPDIR:-/tmp}/kvmid-image.XXXXXX")"
ctr=""
cleanup() {
  [ -n "$ctr" ] && buildah rm "$ctr" >/dev/null 2>&1
  rm -rf "$stage"
}
trap cleanup EXIT

# The root file system, assembled in $stage first (one layer, one `buildah copy`).
root="$stage/root"
mkdir -p "$root/usr/sbin" "$root/etc/kvmid" "$root/run/kvmid" "$root/var/lib/kvmid" "$root/tmp"
chmod 1777 "$root/tmp"
cp -L "$bin" "$root/usr/sbin/kvmid"
chmod 0755 "$root/usr/sbin/kvmid"

# Every library the dynamic loader resolves, at the path it resolved it to (symlinks followed:
# the file is copied under its soname path), and the loader itself at the path in PT_INTERP.
libs="$(ldd "$bin" | awk '
  /=> \// { print $3; next }                 # libfoo.so.1 => /lib/x86_64-linux-gnu/libfoo.so.1 (0x...)
  /^[[:space:]]*\// { print $1 }             # /lib64/ld-linux-x86-64.so.2 (0x...)
')"
if ldd "$bin" | grep -q "not found"; then
  echo "build-image.sh: unresolved libraries:" >&2
  ldd "$bin" | grep "not found" >&2
  exit 1
fi
n=0
for lib in $libs; do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
  n=$((n + 1))
done
# glibc resolves names through NSS; since glibc 2.34 the "files" backend is built in, so
# /etc/nsswitch.conf + passwd/group suffice for getgrnam (kvmi socket_group) without libnss_*.
cat >"$root/etc/passwd" <<'ETC'
root:x:0:0:root:/root:/usr/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
ETC
cat >"$root/etc/group" <<'ETC'
root:x:0:
nogroup:x:65534:
ETC
cat >"$root/etc/nsswitch.conf" <<'ETC'
passwd: files
group: files
hosts: files
ETC
printf '127.0.0.1 localhost\n::1 localhost\n' >"$root/etc/hosts"

ctr="$(buildah from scratch)"
buildah copy --quiet "$ctr" "$root" / >/dev/null
version="${KVMID_IMAGE_VERSION:-dev}"   # the OCI version label; set it for releases
buildah config \
  --entrypoint '["/usr/sbin/kvmid"]' \
  --cmd '["--kvmi_socket=/run/kvmid/kvmi.sock", "--api_socket=/run/kvmid/api.sock"]' \
  --workingdir / \
  --stop-signal SIGTERM \
  --label org.opencontainers.image.title=kvmid \
  --label org.opencontainers.image.description="KVM introspection (KVMI v6) daemon with a gRPC API" \
  --label org.opencontainers.image.version="$version" \
  --label org.opencontainers.image.created="$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
  "$ctr"
buildah commit --quiet --rm "$ctr" "$image" >/dev/null
ctr=""
size="$(buildah images --format '{{.Size}}' "$image" | head -n 1)"
echo "built $image: kvmid + $n libraries, $size"
