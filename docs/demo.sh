#!/usr/bin/env bash
# The fleet manager's path, end to end: keys, build, sign, verify -- then tampered and
# replayed bundles refused, each with its reason. Run with `make demo`.
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

printf '\n\033[1mdemo done:\033[0m the genuine bundle verified; tampered, rogue, rolled-back, expired and revoked ones were refused.\n'
