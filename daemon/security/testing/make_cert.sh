#!/bin/bash
# Test certificates with openssl only (EC P-256), for the TLS unit and end-to-end tests.
#
#   make_cert.sh ca   DIR NAME                               -> DIR/NAME.pem, DIR/NAME.key
#   make_cert.sh leaf DIR NAME CA CN SAN [server|client] [expired] [SERIAL_HEX]
#       CA: DIR/CA.pem + DIR/CA.key; CN: subject CN ("" = none); SAN: subjectAltName value such
#       as "URI:spiffe://kvmid.test/role/admin" or "DNS:localhost,IP:127.0.0.1" ("" = none);
#       expired: valid from 2020-01-01 to 2020-01-02.
set -euo pipefail
kind="$1" dir="$2" name="$3"
shift 3
mkdir -p "$dir"
if [ "$kind" = ca ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -sha256 -days 3650 \
    -subj "/CN=$name" -keyout "$dir/$name.key" -out "$dir/$name.pem" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    2>/dev/null
  exit 0
fi
[ "$kind" = leaf ] || { echo "usage: $0 ca|leaf ..." >&2; exit 2; }
ca="$1" cn="$2" san="$3" usage="${4:-client}" expired="${5:-}" serial="${6:-}"
subject="/"
[ -n "$cn" ] && subject="/CN=$cn"
[ -z "$cn" ] && subject="/O=kvmid-test"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "$subject" \
  -keyout "$dir/$name.key" -out "$work/req.csr" 2>/dev/null
eku=clientAuth
[ "$usage" = server ] && eku=serverAuth
{
  echo "basicConstraints=critical,CA:FALSE"
  echo "keyUsage=critical,digitalSignature,keyEncipherment"
  echo "extendedKeyUsage=$eku"
  [ -n "$san" ] && echo "subjectAltName=$san"
} >"$work/ext.cnf"
[ -n "$serial" ] || serial="$(openssl rand -hex 8)"
if [ "$expired" = expired ]; then
  # `openssl x509 -days` cannot go back in time; `openssl ca` takes explicit dates.
  mkdir -p "$work/new"
  : >"$work/index.txt"
  echo "$serial" >"$work/serial"
  cat >"$work/ca.cnf" <<CNF
[ca]
default_ca = d
[d]
database = $work/index.txt
new_certs_dir = $work/new
serial = $work/serial
default_md = sha256
policy = p
unique_subject = no
[p]
commonName = optional
organizationName = optional
CNF
  openssl ca -batch -config "$work/ca.cnf" -cert "$dir/$ca.pem" -keyfile "$dir/$ca.key" \
    -in "$work/req.csr" -out "$dir/$name.pem" -notext -extfile "$work/ext.cnf" \
    -startdate 20200101000000Z -enddate 20200102000000Z 2>/dev/null
else
  openssl x509 -req -in "$work/req.csr" -CA "$dir/$ca.pem" -CAkey "$dir/$ca.key" \
    -set_serial "0x$serial" -days 30 -sha256 -extfile "$work/ext.cnf" -out "$dir/$name.pem" \
    2>/dev/null
fi
