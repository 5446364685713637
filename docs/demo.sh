#!/usr/bin/env bash
# The fleet manager's path, end to end: keys, build, sign, verify -- tampered and replayed
# bundles refused, each with its reason -- then over MQTT: a TLS broker with the shipped ACL, a
# bundle server, a device agent; a deployment pulled in blocks and active, a rogue one refused.
# Everything runs on loopback. Run with `make demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
FLEET=.venv/bin/edge-fleet
OUT=demo-out
rm -rf "$OUT" && mkdir -p "$OUT"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
show() { printf '$ %s\n' "$*"; "$@"; }
refused() {  # run a command that must fail; print its one-line reason
  printf '$ %s\n' "$*"
  if "$@" 2>"$OUT/err"; then echo "!! accepted, but it must be refused" >&2; exit 1; fi
  cat "$OUT/err"
}

step "A model to ship: a tiny ONNX classifier, generated here"
$PY - "$OUT" <<'PYEOF'
import sys
from pathlib import Path
sys.path.insert(0, ".")
from tests.models import make_onnx
out = Path(sys.argv[1])
make_onnx(out / "classifier-v1.onnx", inputs=64, outputs=10, seed=1)
make_onnx(out / "classifier-v2.onnx", inputs=64, outputs=10, seed=2)
print("wrote", out / "classifier-v1.onnx", "and", out / "classifier-v2.onnx")
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
$PY -c "from agent.trust.keys import Signer; open('$OUT/rogue.pem','wb').write(Signer.generate().to_pem())"
cp "$OUT/classifier-1.1.0.emb" "$OUT/rogue.emb"
show $FLEET bundle sign "$OUT/rogue.emb" --key "$OUT/rogue.pem"
refused $FLEET bundle verify "$OUT/rogue.emb" --trust "$OUT/keys/root.json"

step "Rollback: a device at release 1001000 is offered 1.0.0 (release 1000000)"
refused $FLEET bundle verify "$OUT/classifier-1.0.0.emb" --trust "$OUT/keys/root.json" --min-release 1001000

step "Freeze: the signature (valid 90 days) checked 120 days from now"
refused $FLEET bundle verify "$OUT/classifier-1.1.0.emb" --trust "$OUT/keys/root.json" --at "$(date -u -d '+120 days' +%FT%TZ)"

step "Release key rotated: the old key is revoked, its signatures no longer count"
show $FLEET keys rotate "$OUT/keys" --release
refused $FLEET bundle verify "$OUT/classifier-1.1.0.emb" --trust "$OUT/keys/root.json"
show $FLEET bundle sign "$OUT/classifier-1.1.0.emb" --key "$(ls -t "$OUT"/keys/private/release-*.pem | head -1)" -o "$OUT/classifier-1.1.0.emb.dsse"
show $FLEET bundle verify "$OUT/classifier-1.1.0.emb" --trust "$OUT/keys/root.json"

NEW_KEY=$(ls -t "$OUT"/keys/private/release-*.pem | head -1)

step "Over MQTT: a broker with TLS client certificates and the shipped ACL, on loopback"
show bash config/broker/make-certs.sh "$OUT/certs" cam-01 --fleet fleet >/dev/null
PORT=$($PY -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
mkdir -p "$OUT/broker"
cp config/broker/acl "$OUT/broker/acl"
cat > "$OUT/broker/mosquitto.conf" <<CONF
$( [ "$(id -u)" = 0 ] && echo "user root" || echo "user $(id -un)" )
per_listener_settings false
persistence false
log_dest file $PWD/$OUT/broker/mosquitto.log
listener $PORT 127.0.0.1
cafile $PWD/$OUT/certs/ca.crt
certfile $PWD/$OUT/certs/broker.crt
keyfile $PWD/$OUT/certs/broker.key
require_certificate true
use_identity_as_username true
allow_anonymous false
acl_file $PWD/$OUT/broker/acl
CONF
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null || true; wait 2>/dev/null || true' EXIT
$(command -v mosquitto || echo /usr/sbin/mosquitto) -c "$OUT/broker/mosquitto.conf" 2>"$OUT/broker/stderr" & PIDS+=($!)
export EDGE_FLEET_BROKER=127.0.0.1:$PORT EDGE_FLEET_CA=$OUT/certs/ca.crt
export EDGE_FLEET_CERT=$OUT/certs/fleet.crt EDGE_FLEET_CERT_KEY=$OUT/certs/fleet.key
echo "mosquitto on 127.0.0.1:$PORT; the fleet tools use the 'fleet' certificate (EDGE_FLEET_*)"

step "What this box would run: its hardware, and the variant chosen for it"
show .venv/bin/edge-agent hardware --bundle "$OUT/classifier-1.1.0.emb"
API_PORT=$($PY -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")

step "A bundle server, and the device cam-01 (edge-agent run), trusting root.json + keyring.json"
mkdir -p "$OUT/served"
.venv/bin/edge-fleet serve --bundles "$OUT/served" 2>"$OUT/serve.log" & PIDS+=($!)
cat > "$OUT/agent.toml" <<TOML
device_id = "cam-01"
groups = ["lobby"]
state_dir = "$PWD/$OUT/cam-01"
status_socket = "$PWD/$OUT/status.sock"
[mqtt]
host = "127.0.0.1"
port = $PORT
ca_file = "$PWD/$OUT/certs/ca.crt"
cert_file = "$PWD/$OUT/certs/cam-01.crt"
key_file = "$PWD/$OUT/certs/cam-01.key"
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

step "Deploy classifier 1.1.0 to cam-01 and follow it (the device pulls the bundle in blocks)"
show $FLEET deploy "$OUT/classifier-1.1.0.emb" --device cam-01 --key "$NEW_KEY" --bundles "$OUT/served" --wait 120
show $FLEET status

step "The technician on the box asks the agent"
show .venv/bin/edge-agent status --socket "$OUT/status.sock"

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

step "A deployment signed by the rogue key: published, refused by the device, nothing changes"
show $FLEET deploy "$OUT/rogue.emb" --device cam-01 --key "$OUT/rogue.pem" --bundles "$OUT/served" -o "$OUT/rogue-deployment.json" --no-publish
show mosquitto_pub -h 127.0.0.1 -p "$PORT" --cafile "$OUT/certs/ca.crt" --cert "$OUT/certs/fleet.crt" \
  --key "$OUT/certs/fleet.key" -V mqttv5 -q 1 -r -t ema/v1/devices/cam-01/desired -f "$OUT/rogue-deployment.json"
for _ in $(seq 50); do
  $FLEET status --json | grep -q untrusted-key && break
  sleep 0.2
done
show $FLEET status

step "What the device logged"
grep -E "accepted|now serves|active|rejected" "$OUT/agent.log" | sed 's/^/  /'

printf '\n\033[1mdemo done:\033[0m the genuine bundle verified, reached cam-01 over MQTT and answered on its local API; tampered, rogue, rolled-back, expired and revoked ones were refused.\n'
