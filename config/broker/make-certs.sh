#!/usr/bin/env bash
# Make a TEST certificate authority and the certificates for an Edge Model Agent MQTT fleet.
#
#   config/broker/make-certs.sh OUTDIR [DEVICE_ID...] [--server NAME]... [--operator NAME]...
#                               [--fleet NAME] [--revoke NAME]...
#
# Writes into OUTDIR (created if missing, made 0755: the mosquitto user reads the broker's files):
#   ca.crt ca.crl             the test CA (ECDSA P-256, self-signed) and its revocation list
#   operator-ca.crt .crl      a second CA, for operators only (the broker's listener 8884)
#   broker.crt broker.key     the broker: CN=localhost, subjectAltName DNS:localhost,IP:127.0.0.1
#   <id>.crt <id>.key         one client certificate per device id, CN = the device id
#   <server>.crt .key         one per bundle server (--server NAME, repeatable), from ca.crt
#   <operator>.crt .key       one per operator (--operator NAME, repeatable), from operator-ca.crt
#   <fleet>.crt <fleet>.key   the all-in-one fleet identity of earlier setups (CN "fleet" unless
#                             --fleet NAME), from ca.crt
#   private/                  the CAs' private keys and databases: keep them off the broker
# The broker needs ca.crt ca.crl operator-ca.crt operator-ca.crl broker.crt broker.key; run as
# root, broker.key is made readable by the group `mosquitto` (0640), which Debian's mosquitto
# runs as.
#
# --revoke NAME revokes OUTDIR/NAME.crt (a device, server or operator) and writes the CRLs anew;
# restart mosquitto so that it loads them. Every run writes the CRLs anew (their nextUpdate is
# CRL_DAYS ahead: a broker with an expired CRL refuses every client).
#
# The broker runs with `use_identity_as_username true`, so the certificate CN *is* the MQTT
# username that the ACL's %u patterns bind topics to: whoever holds <id>.key speaks as <id>.
#
# Rerunning into the same OUTDIR keeps the existing CAs and every existing certificate and only
# makes what is missing (e.g. new device ids), so it is safe to run twice.
#
# This is for tests and demos. For production use your own PKI: keep the CA key offline, give
# devices keys generated on the device (CSR), and revoke / rotate with a CRL (mosquitto `crlfile`).
set -euo pipefail

DAYS="${DAYS:-825}"     # validity of leaf certificates
CA_DAYS="${CA_DAYS:-1825}"
CRL_DAYS="${CRL_DAYS:-30}"
ID_RE='^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$'   # same rule as agent/transport/topics.py

usage() {
    echo "usage: $0 OUTDIR [DEVICE_ID...] [--server NAME]... [--operator NAME]... [--fleet NAME] [--revoke NAME]..." >&2
    echo "  names: 1-64 of [A-Za-z0-9._-], starting with a letter or digit" >&2
    exit 2
}

outdir=""
fleet="fleet"
devices=()
servers=()
operators=()
revoke=()
while [ "$#" -gt 0 ]; do
    case "$1" in
        --fleet | --server | --operator | --revoke)
            [ "$#" -ge 2 ] || usage
            case "$1" in
                --fleet) fleet="$2" ;;
                --server) servers+=("$2") ;;
                --operator) operators+=("$2") ;;
                --revoke) revoke+=("$2") ;;
            esac
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
[ -n "$outdir" ] || usage
[ "$((${#devices[@]} + ${#servers[@]} + ${#operators[@]} + ${#revoke[@]}))" -gt 0 ] || usage

names=("$fleet" "${devices[@]}" "${servers[@]}" "${operators[@]}")
for name in "${names[@]}" "${revoke[@]}"; do
    if ! [[ "$name" =~ $ID_RE ]]; then
        echo "invalid identity name: '$name'" >&2
        usage
    fi
    case "$name" in
        ca | broker | operator-ca | private)
            echo "identity name '$name' clashes with the CA/broker files" >&2
            exit 2
            ;;
    esac
done
# One name, one role: a device named like a server or operator would get that identity's rights
# in the ACL, and on the broker's listener 8883 its client id.
dup="$(printf '%s\n' "${names[@]}" | sort | uniq -d | head -1)"
if [ -n "$dup" ]; then
    echo "identity name '$dup' is given twice (device, server, operator and fleet names must differ)" >&2
    exit 2
fi

command -v openssl >/dev/null || { echo "openssl not found" >&2; exit 1; }
umask 077
mkdir -p "$outdir"
chmod 755 "$outdir"  # certificates and CRLs are public; each key file has its own mode
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

newkey() {  # newkey FILE: an ECDSA P-256 private key, mode 0600
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null
    chmod 600 "$1"
}

serial() { echo "0x$(openssl rand -hex 16)"; }

# --- the CAs ----------------------------------------------------------------------------------
mkdir -p "$outdir/private"
chmod 700 "$outdir/private"

make_ca() {  # make_ca NAME CN KEY: OUTDIR/NAME.crt, its key at KEY, its database in private/NAME/
    local name="$1" cn="$2" key="$3"
    mkdir -p "$outdir/private/$name"
    [ -f "$outdir/private/$name/index.txt" ] || : >"$outdir/private/$name/index.txt"
    [ -f "$outdir/private/$name/crlnumber" ] || echo 01 >"$outdir/private/$name/crlnumber"
    cat >"$outdir/private/$name/ca.cnf" <<CONF
[ca]
default_ca = this_ca
[this_ca]
database = $outdir/private/$name/index.txt
crlnumber = $outdir/private/$name/crlnumber
certificate = $outdir/$name.crt
private_key = $key
default_md = sha256
default_crl_days = $CRL_DAYS
crl_extensions = crl_ext
[crl_ext]
authorityKeyIdentifier = keyid
CONF
    if [ -f "$outdir/$name.crt" ] && [ -f "$key" ]; then
        echo "keeping existing CA $outdir/$name.crt"
        return
    fi
    newkey "$key"
    cat >"$tmp/$name.ext" <<CONF
[req]
distinguished_name = dn
prompt = no
[dn]
CN = $cn
[v3_ca]
basicConstraints = critical, CA:true, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
CONF
    openssl req -new -x509 -sha256 -days "$CA_DAYS" -key "$key" \
        -config "$tmp/$name.ext" -extensions v3_ca -set_serial "$(serial)" -out "$outdir/$name.crt"
    chmod 644 "$outdir/$name.crt"
    echo "made CA $outdir/$name.crt"
}

gencrl() {  # gencrl NAME: OUTDIR/NAME.crl from the CA's database
    openssl ca -config "$outdir/private/$1/ca.cnf" -gencrl -out "$outdir/$1.crl" 2>/dev/null
    chmod 644 "$outdir/$1.crl"
}

# Earlier versions wrote the CA key beside the certificates: keep using it where it is.
ca_key="$outdir/private/ca.key"
[ -f "$outdir/ca.key" ] && ca_key="$outdir/ca.key"
make_ca ca "Edge Model Agent test CA" "$ca_key"
make_ca operator-ca "Edge Model Agent test operator CA" "$outdir/private/operator-ca.key"

# --- leaf certificates ------------------------------------------------------------------------
issue() {  # issue NAME CN EKU [SAN [CA]]
    local name="$1" cn="$2" eku="$3" san="${4:-}" ca="${5:-ca}" key
    key="$ca_key"
    [ "$ca" = ca ] || key="$outdir/private/$ca.key"
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
        -CA "$outdir/$ca.crt" -CAkey "$key" -set_serial "$(serial)" \
        -extfile "$tmp/$name.ext" -out "$outdir/$name.crt" 2>/dev/null
    chmod 644 "$outdir/$name.crt"
    echo "made $outdir/$name.crt (CN=$cn)"
}

issue broker localhost serverAuth "DNS:localhost,IP:127.0.0.1"
# The broker key is read by the mosquitto user (Debian's mosquitto drops root to it).
if getent group mosquitto >/dev/null && chgrp mosquitto "$outdir/broker.key" 2>/dev/null; then
    chmod 640 "$outdir/broker.key"
fi
issue "$fleet" "$fleet" clientAuth
for name in "${devices[@]}" "${servers[@]}"; do
    issue "$name" "$name" clientAuth
done
for name in "${operators[@]}"; do
    issue "$name" "$name" clientAuth "" operator-ca
done

# --- revocation -------------------------------------------------------------------------------
for name in "${revoke[@]}"; do
    crt="$outdir/$name.crt"
    [ -f "$crt" ] || { echo "no certificate $crt to revoke" >&2; exit 2; }
    ca=ca
    if openssl verify -CAfile "$outdir/operator-ca.crt" "$crt" >/dev/null 2>&1; then
        ca=operator-ca
    fi
    serial_hex="$(openssl x509 -in "$crt" -noout -serial | cut -d= -f2)"
    if grep -q "^R.*[[:space:]]$serial_hex[[:space:]]" "$outdir/private/$ca/index.txt"; then
        echo "$crt is revoked already"
    else
        openssl ca -config "$outdir/private/$ca/ca.cnf" -revoke "$crt" 2>/dev/null
        echo "revoked $crt (serial $serial_hex)"
    fi
done
gencrl ca
gencrl operator-ca
