"""``edge-agent serve --bundle FILE --trust ...`` as a process: verify, load, answer; refuse a fake."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import tritonclient.http as triton

from tests.conftest import Keys
from tests.models import reference

AGENT = str(Path(sys.executable).parent / "edge-agent")


def test_serve_a_verified_bundle(keys: Keys, signed, onnx_model: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bundle, _ = signed("1.0.0")
    proc = subprocess.Popen(
        [
            AGENT,
            "serve",
            "--bundle",
            str(bundle),
            "--trust",
            str(keys.dir / "root.json"),
            "--port",
            "0",
            "--socket",
            str(tmp_path / "api.sock"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        for _ in range(20):  # the banner: what was verified, why this variant, where it listens
            lines.append(proc.stdout.readline())
            if lines[-1].startswith("serving on http://") or not lines[-1]:
                break
        url = lines[-1]
        assert url.startswith("serving on http://"), lines
        address = url.split("http://", 1)[1].split("/", 1)[0]
        assert lines[0].startswith(f"verified {bundle}: tiny 1.0.0, variant ")
        client = triton.InferenceServerClient(address)
        assert client.is_model_ready("tiny")
        meta = client.get_model_metadata("tiny")
        assert meta["versions"] == ["1.0.0"]
        x = np.random.default_rng(5).standard_normal((2, 16)).astype(np.float32)
        tensor = triton.InferInput("x", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=True)
        y = client.infer("tiny", [tensor]).as_numpy("y")
        np.testing.assert_allclose(y, reference(onnx_model, x), rtol=1e-5, atol=1e-5)
        assert (tmp_path / "api.sock").exists()
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err


def test_a_tampered_bundle_is_refused(keys: Keys, signed, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bundle, _ = signed("1.0.0")
    data = bytearray(bundle.read_bytes())
    data[len(data) // 2] ^= 0x01
    bundle.write_bytes(bytes(data))
    done = subprocess.run(
        [AGENT, "serve", "--bundle", str(bundle), "--trust", str(keys.dir), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert "rejected (digest-mismatch)" in done.stderr
