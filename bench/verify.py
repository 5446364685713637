"""Full verification of a 256 MiB bundle against plain SHA-256 of the same bytes.

Prints one JSON object as its last line:
  verify_mb_s           descriptor signature + size + SHA-256 + block-hash list + manifest/index checks
  sha256_mb_s           hashlib.sha256 over the same file, same run (the baseline)
  ratio                 verify_mb_s / sha256_mb_s (goal >= 0.9)
  ed25519_verify_per_s  single Ed25519 signature verifications per second
Each figure is the best of several runs, with the file in the page cache for both.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent._strictjson import dump_model
from agent.bundle.archive import Source, write_archive
from agent.bundle.manifest import MANIFEST_NAME, FileEntry, Manifest, TensorSpec, Variant
from agent.fleet.sign import describe_bundle
from agent.trust.envelope import sign_envelope
from agent.trust.keys import Signer, verify_ed25519
from agent.trust.metadata import (
    DESCRIPTOR_TYPE,
    KEYRING_TYPE,
    ROOT_TYPE,
    KeyringMetadata,
    PublicKey,
    ReleaseKey,
    RootMetadata,
)
from agent.trust.verifier import TrustedState
from agent.verify import verify_bundle

MiB = 1 << 20


def make_bundle(directory: Path, size_mib: int, block_size: int) -> tuple[Path, Manifest]:
    weights = directory / "weights.bin"
    with open(weights, "wb") as f:
        for _ in range(size_mib):
            f.write(os.urandom(MiB))
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    spec = TensorSpec(name="x", datatype="FP32", shape=[1, 16])
    entry = FileEntry(
        path="variants/onnx-fp32/model.onnx", size=weights.stat().st_size, sha256=digest
    )
    manifest = Manifest(
        name="bench",
        version="1.0.0",
        release=1,
        block_size=block_size,
        variants=[
            Variant(
                id="onnx-fp32",
                format="onnx",
                precision="fp32",
                entrypoint=entry.path,
                files=[entry],
                inputs=[spec],
                outputs=[spec],
            )
        ],
    )
    data = manifest.to_bytes()
    bundle = directory / "bench.emb"
    with open(bundle, "wb") as out:
        write_archive(
            out,
            [
                Source(MANIFEST_NAME, len(data), lambda: io.BytesIO(data)),
                Source(entry.path, entry.size, lambda: open(weights, "rb")),  # noqa: SIM115
            ],
            block_size,
        )
    weights.unlink()
    return bundle, manifest


def trust(bundle: Path, manifest: Manifest, now: datetime) -> tuple[TrustedState, bytes]:
    root_key, release = Signer.generate(), Signer.generate()
    later = now + timedelta(days=30)
    root = RootMetadata(
        version=1,
        expires=later,
        keys={root_key.keyid: PublicKey(public=root_key.public_raw.hex())},
        threshold=1,
    )
    keyring = KeyringMetadata(
        version=1,
        expires=later,
        release_keys={
            release.keyid: ReleaseKey(
                key=PublicKey(public=release.public_raw.hex()), expires=later, models=["*"]
            )
        },
    )
    state = TrustedState.from_root(
        sign_envelope(ROOT_TYPE, dump_model(root), [root_key]).to_bytes()
    )
    state = state.update_keyring(
        sign_envelope(KEYRING_TYPE, dump_model(keyring), [root_key]).to_bytes(), now
    )
    descriptor = describe_bundle(bundle, now=now, days=30)
    return state, sign_envelope(DESCRIPTOR_TYPE, dump_model(descriptor), [release]).to_bytes()


def plain_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


def best(fn: object, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--block-size", type=int, default=64 * 1024)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    now = datetime.now(timezone.utc)
    with tempfile.TemporaryDirectory(prefix="bench-verify-") as tmp:
        bundle, manifest = make_bundle(Path(tmp), args.size_mib, args.block_size)
        state, envelope = trust(bundle, manifest, now)
        size_mb = bundle.stat().st_size / 1e6
        plain_sha256(bundle)  # warm the page cache
        t_sha, t_verify = float("inf"), float("inf")
        for _ in range(args.repeat):  # interleaved, so drift hits both alike
            t_sha = min(t_sha, best(lambda: plain_sha256(bundle), 1))
            t_verify = min(t_verify, best(lambda: verify_bundle(bundle, envelope, state, now), 1))
        release = Signer.generate()
        message = b"x" * 512
        sig = release.sign(message)
        n = 2000
        t_ed = best(lambda: [verify_ed25519(release.public_raw, sig, message) for _ in range(n)], 3)
    result = {
        "bundle_mib": args.size_mib,
        "block_size": args.block_size,
        "cpus": os.cpu_count(),
        "verify_mb_s": round(size_mb / t_verify, 1),
        "sha256_mb_s": round(size_mb / t_sha, 1),
        "ratio": round(t_sha / t_verify, 3),
        "ed25519_verify_per_s": round(n / t_ed),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
