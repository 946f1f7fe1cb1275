#!/bin/bash
# Development certificates for kvmid's mutual-TLS API, with openssl only (EC P-256, SHA-256):
#
#   scripts/dev-certs.sh [OUTDIR [NODE_NAME]]      # default: ./dev-certs, $(hostname)
#
#   OUTDIR/ca.pem, ca.key                 a development CA (10 years); give kvmid ca.pem as
#                                         --api_tls_client_ca, clients as their --ca
#   OUTDIR/server.pem, server.key         kvmid's certificate: SANs localhost, 127.0.0.1, ::1 and
#                                         NODE_NAME (--api_tls_cert / --api_tls_key)
#   OUTDIR/<role>.pem, <role>.key         a client certificate per role (viewer, responder,
#                                         operator, admin) whose identity is the SPIFFE ID
#                                         spiffe://$KVMID_TRUST_DOMAIN/role/<role>
#
# KVMID_TRUST_DOMAIN (default kvmid.dev), KVMID_CERT_DAYS (default 365). Keys are written 0600.
# An existing CA in OUTDIR is reused (new leaves, same trust). For production, issue the same
# shapes from your PKI (cert-manager, SPIRE): docs/SECURITY.md.
set -euo pipefail
out="${1:-dev-certs}"
node="${2:-$(hostname)}"
domain="${KVMID_TRUST_DOMAIN:-kvmid.dev}"
days="${KVMID_CERT_DAYS:-365}"
command -v openssl >/dev/null || { echo "dev-certs: openssl is required" >&2; exit 1; }
mkdir -p "$out"
umask 077
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

newkey() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

if [ ! -f "$out/ca.pem" ] || [ ! -f "$out/ca.key" ]; then
  newkey "$out/ca.key"
  openssl req -x509 -new -key "$out/ca.key" -sha256 -days 3650 -subj "/O=kvmid dev/CN=kvmid dev CA" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" -out "$out/ca.pem"
fi

# leaf NAME SUBJECT EXTENDED_KEY_USAGE SUBJECT_ALT_NAME
leaf() {
  local name="$1" subject="$2" eku="$3" san="$4"
  newkey "$out/$name.key"
  openssl req -new -key "$out/$name.key" -subj "$subject" -out "$tmp/$name.csr"
  printf '%s\n' "basicConstraints=critical,CA:FALSE" \
    "keyUsage=critical,digitalSignature,keyEncipherment" "extendedKeyUsage=$eku" \
    "subjectAltName=$san" >"$tmp/$name.ext"
  openssl x509 -req -in "$tmp/$name.csr" -CA "$out/ca.pem" -CAkey "$out/ca.key" \
    -set_serial "0x$(openssl rand -hex 12)" -days "$days" -sha256 -extfile "$tmp/$name.ext" \
    -out "$out/$name.pem" 2>/dev/null
  echo "$out/$name.pem: $san"
}

leaf server "/O=kvmid dev/CN=$node" serverAuth "DNS:localhost,IP:127.0.0.1,IP:::1,DNS:$node"
for role in viewer responder operator admin; do
  leaf "$role" "/O=kvmid dev/CN=kvmid-$role" clientAuth "URI:spiffe://$domain/role/$role"
done
chmod 0644 "$out"/*.pem
echo "CA: $out/ca.pem (trust domain $domain)"
