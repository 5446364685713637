#!/usr/bin/env bash
# The fleet manager's path, end to end: keys, build, sign, verify -- tampered and replayed
# bundles refused, each with its reason -- then over MQTT: a broker (mosquitto with TLS and the
# shipped ACL; without mosquitto, an embedded Python broker), a bundle server and a device agent;
# 1.0.0 deployed and asked over the local API, 1.1.0 swapped in under a stream of requests with
# none failed, a broken 1.2.0 rolled back on its own, a rogue deployment refused.
# Everything runs on loopback. Run with `make demo` (DEMO_BROKER=embedded forces the fallback).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
FLEET=.venv/bin/edge-fleet
OUT=demo-out
rm -rf "$OUT" && mkdir -p "$OUT"
START=$SECONDS

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
show() { printf '$ %s\n' "$*"; "$@"; }
refused() {  # run a command that must fail; print its one-line reason
  printf '$ %s\n' "$*"
  if "$@" 2>"$OUT/err"; then echo "!! accepted, but it must be refused" >&2; exit 1; fi
  cat "$OUT/err"
}

step "Models to ship: a tiny ONNX classifier in two versions, and a broken third, generated here"
$PY - "$OUT" <<'PYEOF'
import sys
from pathlib import Path
sys.path.insert(0, ".")
import onnx
from onnx import helper
from agent.testing.models import make_onnx
out = Path(sys.argv[1])
make_onnx(out / "classifier-v1.onnx", inputs=64, outputs=10, seed=1)
make_onnx(out / "classifier-v2.onnx", inputs=64, outputs=10, seed=2)
# v3 is broken the way real models are: it reshapes to a batch of one, so its self-test (one
# sample at a time) passes and every request with a larger batch fails.
m = onnx.load(str(make_onnx(out / "classifier-v3.onnx", inputs=64, outputs=10, seed=3)))
g = m.graph
g.node[-1].output[0] = "r"
g.initializer.append(onnx.numpy_helper.from_array(__import__("numpy").array([1, 10]), "shape"))
g.node.append(helper.make_node("Reshape", ["r", "shape"], ["y"]))
onnx.checker.check_model(m)
onnx.save(m, str(out / "classifier-v3.onnx"))
print("wrote classifier-v1.onnx, classifier-v2.onnx and classifier-v3.onnx in", out)
PYEOF

step "Keys: 3 root keys (any 2 sign), one release key, a signed keyring"
show $FLEET keys init "$OUT/keys" --root-keys 3 --threshold 2
RELEASE_KEY=$(ls "$OUT"/keys/private/release-*.pem)

step "Build: ONNX fp32, an int8 variant, an OpenVINO variant, self-test samples"
show $FLEET bundle build --name classifier --version 1.1.0 --quantize int8 --openvino \
  -o "$OUT/classifier-1.1.0.emb" "$OUT/classifier-v2.onnx"
show $FLEET bundle build --name classifier --version 1.0.0 -o "$OUT/classifier-1.0.0.emb" "$OUT/classifier-v1.onnx"

step "Sign with the release key"
show $FLEET bundle sign "$OUT/classifier-1.1.0.emb" --key "$RELEASE_KEY"
show $FLEET bundle sign "$OUT/classifier-1.0.0.emb" --key "$RELEASE_KEY"

step "Inspect and verify, as a device would"
show $FLEET bundle inspect "$OUT/classifier-1.1.0.emb"
show $FLEET bundle verify "$OUT/classifier-1.1.0.emb" --trust "$OUT/keys/root.json"

step "A tampered copy: one byte of the model changed"
cp "$OUT/classifier-1.1.0.emb" "$OUT/tampered.emb"
cp "$OUT/classifier-1.1.0.emb.dsse" "$OUT/tampered.emb.dsse"
$PY - "$OUT/tampered.emb" <<'PYEOF'
import sys
from agent.bundle.reader import read_index
path = sys.argv[1]
with open(path, "rb") as f:
    index = read_index(f)
name = next(n for n in index.members if n.endswith(".onnx"))
member = index.members[name]
with open(path, "r+b") as f:
    f.seek(member.offset + member.size // 2)
    byte = f.read(1)
    f.seek(-1, 1)
    f.write(bytes([byte[0] ^ 0x01]))
print(f"flipped one bit in {name} at byte {member.offset + member.size // 2}")
PYEOF
refused $FLEET bundle verify "$OUT/tampered.emb" --trust "$OUT/keys/root.json"

step "A bundle signed by a key the fleet does not trust"
$FLEET keys init "$OUT/rogue-keys" >/dev/null  # the attacker's own key directory
ROGUE_KEY=$(ls "$OUT"/rogue-keys/private/release-*.pem)
cp "$OUT/classifier-1.1.0.emb" "$OUT/rogue.emb"
show $FLEET bundle sign "$OUT/rogue.emb" --key "$ROGUE_KEY"
refused $FLEET bundle verify "$OUT/rogue.emb" --trust "$OUT/keys/root.json"

step "Rollback: a device at release 1001000 is offered 1.0.0 (release 1000000)"
refused $FLEET bundle verify "$OUT/classifier-1.0.0.emb" --trust "$OUT/keys/root.json" --min-release 1001000

step "Freeze: the signature (valid 90 days) checked 120 days from now"
refused $FLEET bundle verify "$OUT/classifier-1.1.0.emb" --trust "$OUT/keys/root.json" --at "$(date -u -d '+120 days' +%FT%TZ)"

step "Release key rotated: the old key is revoked, its signatures no longer count"
show $FLEET keys rotate "$OUT/keys" --release
refused $FLEET bundle verify "$OUT/classifier-1.1.0.emb" --trust "$OUT/keys/root.json"
NEW_KEY=$(ls -t "$OUT"/keys/private/release-*.pem | head -1)
show $FLEET bundle sign "$OUT/classifier-1.1.0.emb" --key "$NEW_KEY" -o "$OUT/classifier-1.1.0.emb.dsse"
show $FLEET bundle verify "$OUT/classifier-1.1.0.emb" --trust "$OUT/keys/root.json"
$FLEET bundle sign "$OUT/classifier-1.0.0.emb" --key "$NEW_KEY" -o "$OUT/classifier-1.0.0.emb.dsse" >/dev/null
$FLEET bundle build --name classifier --version 1.2.0 -o "$OUT/classifier-1.2.0.emb" "$OUT/classifier-v3.onnx" >/dev/null
$FLEET bundle sign "$OUT/classifier-1.2.0.emb" --key "$NEW_KEY" >/dev/null
echo "(1.0.0 signed again and the broken 1.2.0 built and signed, with the new key)"


free_port() { $PY -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }
PORT=$(free_port)
API_PORT=$(free_port)
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null || true; wait 2>/dev/null || true' EXIT
MOSQUITTO=$(command -v mosquitto || { [ -x /usr/sbin/mosquitto ] && echo /usr/sbin/mosquitto; } || true)
if [ -n "$MOSQUITTO" ] && [ "${DEMO_BROKER:-}" != embedded ]; then
  step "Over MQTT: mosquitto with the shipped config (TLS client certificates, the ACL), on loopback"
  show bash config/broker/make-certs.sh "$OUT/certs" cam-01 --server bundle-server-1 --operator operator >/dev/null
  OP_PORT=$(free_port)
  mkdir -p "$OUT/broker/conf.d" "$OUT/broker/store"
  cp config/broker/acl "$OUT/broker/acl"
  # The shipped fragment as it is, its ports and paths moved here; the main file as Debian's.
  sed -e "s|^listener 8883\$|listener $PORT 127.0.0.1|" -e "s|^listener 8884\$|listener $OP_PORT 127.0.0.1|" \
    -e "s|/etc/mosquitto/certs/|$PWD/$OUT/certs/|" -e "s|/etc/mosquitto/acl|$PWD/$OUT/broker/acl|" \
    config/broker/mosquitto.conf >"$OUT/broker/conf.d/ema.conf"
  cat > "$OUT/broker/mosquitto.conf" <<CONF
$( [ "$(id -u)" = 0 ] && echo "user root" || echo "user $(id -un)" )
pid_file $PWD/$OUT/broker/mosquitto.pid
persistence true
persistence_location $PWD/$OUT/broker/store/
log_dest file $PWD/$OUT/broker/mosquitto.log
include_dir $PWD/$OUT/broker/conf.d
CONF
  "$MOSQUITTO" -c "$OUT/broker/mosquitto.conf" 2>"$OUT/broker/stderr" & PIDS+=($!)
  export EDGE_FLEET_BROKER=127.0.0.1:$OP_PORT EDGE_FLEET_CA=$OUT/certs/ca.crt
  export EDGE_FLEET_CERT=$OUT/certs/operator.crt EDGE_FLEET_CERT_KEY=$OUT/certs/operator.key
  SERVE_ENV=(EDGE_FLEET_BROKER=127.0.0.1:$PORT EDGE_FLEET_CERT=$OUT/certs/bundle-server-1.crt
    EDGE_FLEET_CERT_KEY=$OUT/certs/bundle-server-1.key)
  echo "mosquitto on 127.0.0.1:$PORT (devices, bundle servers) and :$OP_PORT (operators);"
  echo "the fleet tools use the 'operator' certificate (EDGE_FLEET_*), the bundle server its own"
  BROKER_TOML="port = $PORT
ca_file = \"$PWD/$OUT/certs/ca.crt\"
cert_file = \"$PWD/$OUT/certs/cam-01.crt\"
key_file = \"$PWD/$OUT/certs/cam-01.key\""
else
  step "Over MQTT: no mosquitto here, so an embedded Python broker (MQTT 3.1.1, plain TCP, loopback)"
  $PY -m agent.testing.embedded_broker --port "$PORT" >"$OUT/broker.log" 2>&1 & PIDS+=($!)
  export EDGE_FLEET_BROKER=127.0.0.1:$PORT EDGE_FLEET_TLS=false EDGE_FLEET_MQTT=3.1.1
  SERVE_ENV=()
  BROKER_TOML="port = $PORT
protocol = \"3.1.1\"
tls = false"
fi
for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/"$PORT") 2>/dev/null && break; sleep 0.05; done

step "What this box would run: its hardware, and the variant chosen for it"
show .venv/bin/edge-agent hardware --bundle "$OUT/classifier-1.1.0.emb"

step "A bundle server, and the device cam-01 (edge-agent run, state in $OUT/cam-01)"
mkdir -p "$OUT/served"
env "${SERVE_ENV[@]}" .venv/bin/edge-fleet serve --bundles "$OUT/served" 2>"$OUT/serve.log" & PIDS+=($!)
cat > "$OUT/agent.toml" <<TOML
device_id = "cam-01"
groups = ["lobby"]
state_dir = "$PWD/$OUT/cam-01"
status_socket = "$PWD/$OUT/status.sock"
[mqtt]
host = "127.0.0.1"
$BROKER_TOML
[trust]
root = "$PWD/$OUT/keys/root.json"
keyring = "$PWD/$OUT/keys/keyring.json"
[serving]
probation_s = 3.0
[api]
port = $API_PORT
unix_socket = "$PWD/$OUT/api.sock"
TOML
cat "$OUT/agent.toml"
.venv/bin/edge-agent run --config "$OUT/agent.toml" 2>"$OUT/agent.log" & PIDS+=($!)

step "Deploy classifier 1.0.0 to cam-01 and follow it (the device pulls the bundle in blocks)"
show $FLEET deploy "$OUT/classifier-1.0.0.emb" --device cam-01 --key "$NEW_KEY" --bundles "$OUT/served" --wait 60

step "An application on the box asks the model (KServe v2 over loopback HTTP)"
show curl -s "http://127.0.0.1:$API_PORT/v2/models/classifier"
echo
X=$($PY -c "print(','.join(['0.5'] * 64))")
show curl -s "http://127.0.0.1:$API_PORT/v2/models/classifier/infer" \
  -d "{\"inputs\":[{\"name\":\"x\",\"datatype\":\"FP32\",\"shape\":[1,64],\"data\":[$X]}]}"
echo
step "A request with the wrong shape gets a 400 that says why"
show curl -s -w ' (HTTP %{http_code})' "http://127.0.0.1:$API_PORT/v2/models/classifier/infer" \
  -d '{"inputs":[{"name":"x","datatype":"FP32","shape":[1,3],"data":[1,2,3]}]}'
echo

stream() {  # $1: name; asks the model without pause until "$OUT/$1.stop" appears
  rm -f "$OUT/$1.stop"
  $PY docs/demo_client.py "$API_PORT" classifier "$OUT/$1.stop" >"$OUT/$1.json" & CLIENT=$!
  sleep 1
}
stop_stream() {  # $1: name; prints the client's summary
  touch "$OUT/$1.stop"
  wait "$CLIENT"
  $PY -c "import json,sys; s=json.load(open(sys.argv[1])); print(f\"  {s['requests']} requests: answered by {s['answered']}, failed: {s['failed']} {s['failures'] or ''}\"); [print('  e.g.', r) for r in s['first_failures'][:2]]" "$OUT/$1.json"
}
failed_requests() { $PY -c "import json,sys; print(json.load(open(sys.argv[1]))['failed'])" "$OUT/$1.json"; }

step "Deploy 1.1.0 while an application streams requests: the swap fails none of them"
stream swap
show $FLEET deploy "$OUT/classifier-1.1.0.emb" --device cam-01 --key "$NEW_KEY" --bundles "$OUT/served" --wait 60
stop_stream swap
SWAP_FAILED=$(failed_requests swap)
[ "$SWAP_FAILED" = 0 ] || { echo "!! $SWAP_FAILED requests failed during the swap" >&2; exit 1; }

step "Deploy a broken 1.2.0 (it fails batches above one): probation catches it, 1.1.0 comes back"
stream rollback
printf '$ %s\n' "$FLEET deploy $OUT/classifier-1.2.0.emb --device cam-01 ... --wait 60"
if $FLEET deploy "$OUT/classifier-1.2.0.emb" --device cam-01 --key "$NEW_KEY" --bundles "$OUT/served" --wait 60; then
  echo "!! the broken version was kept" >&2; exit 1
fi
sleep 1
stop_stream rollback
show $FLEET status
show curl -s "http://127.0.0.1:$API_PORT/v2/models/classifier/infer" \
  -d "{\"inputs\":[{\"name\":\"x\",\"datatype\":\"FP32\",\"shape\":[2,64],\"data\":[$X,$X]}]}"
echo
$FLEET status --json | grep -q '"rolled-back"' || { echo "!! no rolled-back state reported" >&2; exit 1; }

step "The technician on the box asks the agent"
show .venv/bin/edge-agent status --socket "$OUT/status.sock"

step "A rogue key: deploy refuses it; published with the attacker's own keys, the device refuses it"
refused $FLEET deploy "$OUT/rogue.emb" --device cam-01 --key "$ROGUE_KEY" --trust "$OUT/keys" --bundles "$OUT/served"
show $FLEET deploy "$OUT/rogue.emb" --device cam-01 --key "$ROGUE_KEY" --bundles "$OUT/served"
for _ in $(seq 50); do
  $FLEET status --json | grep -q untrusted-key && break
  sleep 0.2
done
show $FLEET status

step "What the device logged"
grep -E "accepted|now serves|is active|failed probation|rolled back|rejected|refused" "$OUT/agent.log" | sed 's/^/  /'

ROLLBACK_SUMMARY=$($PY -c "import json,sys; s=json.load(open(sys.argv[1])); print(s['answered'].get('1.2.0', 0), s['failed'])" "$OUT/rollback.json")
printf '\n\033[1mdemo done in %ss:\033[0m\n' "$((SECONDS - START))"
echo "  - tampered, rogue-signed, rolled-back, expired and revoked bundles refused offline, each with its reason"
echo "  - 1.0.0 deployed over MQTT ($( [ -n "$MOSQUITTO" ] && [ "${DEMO_BROKER:-}" != embedded ] && echo "mosquitto, TLS, ACL" || echo "embedded broker")) and answered on the local API"
echo "  - 1.1.0 swapped in under a stream of $($PY -c "import json; print(json.load(open('$OUT/swap.json'))['requests'])" ) requests: $SWAP_FAILED failed"
echo "  - broken 1.2.0: answered ${ROLLBACK_SUMMARY% *}, failed ${ROLLBACK_SUMMARY#* } in probation, rolled back to 1.1.0 automatically"
echo "  - a rogue-key deployment refused by the device (untrusted-key); cam-01 still serves 1.1.0"
