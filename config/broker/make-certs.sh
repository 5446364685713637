#!/usr/bin/env bash
# Make a TEST certificate authority and the certificates for an Edge Model Agent MQTT fleet.
#
#   config/broker/make-certs.sh OUTDIR DEVICE_ID... [--fleet NAME]
#
# Writes into OUTDIR (created if missing):
#   ca.crt ca.key             the test CA (ECDSA P-256, self-signed)
#   broker.crt broker.key     the broker: CN=localhost, subjectAltName DNS:localhost,IP:127.0.0.1
#   <id>.crt <id>.key         one client certificate per device id, CN = the device id
#   <fleet>.crt <fleet>.key   the fleet-side identity (CN "fleet" unless --fleet NAME)
#
# The broker runs with `use_identity_as_username true`, so the certificate CN *is* the MQTT
# username that the ACL's %u patterns bind topics to: whoever holds <id>.key speaks as <id>.
#
# Rerunning into the same OUTDIR keeps the existing CA and every existing certificate and only
# makes what is missing (e.g. new device ids), so it is safe to run twice.
#
# This is for tests and demos. For production use your own PKI: keep the CA key offline, give
# devices keys generated on the device (CSR), and revoke / rotate with a CRL (mosquitto `crlfile`).
set -euo pipefail

DAYS="${DAYS:-825}"     # validity of leaf certificates
CA_DAYS="${CA_DAYS:-1825}"
ID_RE='^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$'   # same rule as agent/transport/topics.py

usage() {
    echo "usage: $0 OUTDIR DEVICE_ID... [--fleet NAME]" >&2
    echo "  device ids and the fleet name: 1-64 of [A-Za-z0-9._-], starting with a letter or digit" >&2
    exit 2
}

outdir=""
fleet="fleet"
devices=()
while [ "$#" -gt 0 ]; do
    case "$1" in
        --fleet)
            [ "$#" -ge 2 ] || usage
            fleet="$2"
            shift 2
            ;;
        --fleet=*)
            fleet="${1#--fleet=}"
            shift
            ;;
        -h | --help) usage ;;
        -*) echo "unknown option: $1" >&2; usage ;;
        *)
            if [ -z "$outdir" ]; then outdir="$1"; else devices+=("$1"); fi
            shift
            ;;
    esac
done
[ -n "$outdir" ] && [ "${#devices[@]}" -gt 0 ] || usage

for name in "$fleet" "${devices[@]}"; do
    if ! [[ "$name" =~ $ID_RE ]]; then
        echo "invalid identity name: '$name'" >&2
        usage
    fi
    case "$name" in
        ca | broker) echo "identity name '$name' clashes with the CA/broker files" >&2; exit 2 ;;
    esac
done
for dev in "${devices[@]}"; do
    if [ "$dev" = "$fleet" ]; then
        echo "device id '$dev' is the fleet identity: a device with that certificate would get the fleet's rights" >&2
        exit 2
    fi
done

command -v openssl >/dev/null || { echo "openssl not found" >&2; exit 1; }
umask 077
mkdir -p "$outdir"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

newkey() {  # newkey FILE: an ECDSA P-256 private key, mode 0600
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null
    chmod 600 "$1"
}

serial() { echo "0x$(openssl rand -hex 16)"; }

# --- the CA -----------------------------------------------------------------------------------
if [ -f "$outdir/ca.crt" ] && [ -f "$outdir/ca.key" ]; then
    echo "keeping existing CA $outdir/ca.crt"
else
    newkey "$outdir/ca.key"
    cat >"$tmp/ca.ext" <<CONF
[req]
distinguished_name = dn
prompt = no
[dn]
CN = Edge Model Agent test CA
[v3_ca]
basicConstraints = critical, CA:true, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
CONF
    openssl req -new -x509 -sha256 -days "$CA_DAYS" -key "$outdir/ca.key" \
        -config "$tmp/ca.ext" -extensions v3_ca -set_serial "$(serial)" -out "$outdir/ca.crt"
    chmod 644 "$outdir/ca.crt"
    echo "made CA $outdir/ca.crt"
fi

# --- leaf certificates ------------------------------------------------------------------------
issue() {  # issue NAME CN EKU [SAN]
    local name="$1" cn="$2" eku="$3" san="${4:-}"
    if [ -f "$outdir/$name.crt" ] && [ -f "$outdir/$name.key" ]; then
        echo "keeping existing $outdir/$name.crt"
        return
    fi
    newkey "$outdir/$name.key"
    {
        echo "basicConstraints = critical, CA:false"
        echo "keyUsage = critical, digitalSignature"
        echo "extendedKeyUsage = $eku"
        echo "subjectKeyIdentifier = hash"
        echo "authorityKeyIdentifier = keyid"
        [ -z "$san" ] || echo "subjectAltName = $san"
    } >"$tmp/$name.ext"
    openssl req -new -sha256 -key "$outdir/$name.key" -subj "/CN=$cn" -out "$tmp/$name.csr"
    openssl x509 -req -sha256 -days "$DAYS" -in "$tmp/$name.csr" \
        -CA "$outdir/ca.crt" -CAkey "$outdir/ca.key" -set_serial "$(serial)" \
        -extfile "$tmp/$name.ext" -out "$outdir/$name.crt" 2>/dev/null
    chmod 644 "$outdir/$name.crt"
    echo "made $outdir/$name.crt (CN=$cn)"
}

issue broker localhost serverAuth "DNS:localhost,IP:127.0.0.1"
issue "$fleet" "$fleet" clientAuth
for dev in "${devices[@]}"; do
    issue "$dev" "$dev" clientAuth
done
