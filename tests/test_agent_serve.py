"""``edge-agent serve --bundle FILE --trust ...`` as a process: verify, load, answer; refuse a fake;
take the API settings from flags and from an agent.toml."""

from __future__ import annotations

import contextlib
import http.client
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from agent.testing.models import reference
from tests.conftest import Keys

AGENT = str(Path(sys.executable).parent / "edge-agent")
TOKEN = "serve-token-0123456789"


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


@contextlib.contextmanager
def serving(*args: str) -> Iterator[tuple[str, list[str]]]:
    """Run ``edge-agent serve ARGS``; yields its address (host:port) and banner lines."""
    proc = subprocess.Popen(
        [AGENT, "serve", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        for _ in range(20):
            lines.append(proc.stdout.readline())
            if lines[-1].startswith("serving on http://") or not lines[-1]:
                break
        assert lines[-1].startswith("serving on http://"), (lines, proc.stderr)
        yield lines[-1].split("http://", 1)[1].split("/", 1)[0], lines
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err


def _get(address: str, path: str, token: str | None = None) -> tuple[int, str]:
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def _capacity(address: str, token: str) -> float:
    status, text = _get(address, "/metrics", token)
    assert status == 200
    (line,) = [x for x in text.splitlines() if x.startswith("edge_agent_inference_queue_capacity ")]
    return float(line.split()[1])


def test_serve_takes_the_api_settings_as_flags(keys: Keys, signed, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bundle, _ = signed("1.0.0")
    flags = ["--token", TOKEN, "--workers", "3", "--max-queue", "5", "--max-batch-size", "4"]
    trust = str(keys.dir / "root.json")
    with serving("--bundle", str(bundle), "--trust", trust, "--port", "0", *flags) as (address, _):
        assert _get(address, "/v2/models/tiny")[0] == 401
        assert _capacity(address, TOKEN) == 3 + 5
        auth = {"Authorization": f"Bearer {TOKEN}"}
        client = triton.InferenceServerClient(address)
        assert client.get_model_config("tiny", headers=auth)["max_batch_size"] == 4
        tensor = triton.InferInput("x", [5, 16], "FP32")
        tensor.set_data_from_numpy(np.zeros((5, 16), np.float32))
        with pytest.raises(InferenceServerException) as info:
            client.infer("tiny", [tensor], headers=auth)
        assert info.value.status() == "400"
        assert "at most 4" in info.value.message()


def test_serve_reads_api_and_runtime_from_a_config_file_and_flags_win(  # type: ignore[no-untyped-def]
    keys: Keys, signed, tmp_path: Path
) -> None:
    """The daemon's agent.toml: [api] and [runtime] are read (here: a token, the queue, and
    ONNX variants on OpenVINO), the other tables are not; a flag overrides the file."""
    bundle, _ = signed("1.0.0")
    config = tmp_path / "agent.toml"
    config.write_text(
        'device_id = "cam-01"\n'
        "[mqtt]\n"
        'host = "broker.invalid"\n'
        "[api]\n"
        f'token = "{TOKEN}"\n'
        "port = 0\n"
        "workers = 3\n"
        "max_queue = 5\n"
        "[runtime.policy]\n"
        'backends = { onnx = "openvino" }\n'
    )
    args = ["--bundle", str(bundle), "--trust", str(keys.dir), "--config", str(config)]
    with serving(*args, "--max-queue", "1") as (address, lines):
        assert " on openvino " in lines[0], lines
        assert _get(address, "/v2/models/tiny")[0] == 401
        assert _capacity(address, TOKEN) == 3 + 1  # workers from the file, the queue from the flag
        status, _ = _get(address, "/v2/models/tiny", TOKEN)
        assert status == 200


@pytest.mark.parametrize(
    ("toml", "flags", "words"),
    [
        ("[api]\nworkers = 0\n", [], "agent.toml: api.workers: Input should be greater than or equal to 1"),
        ("[api]\nbogus = 1\n", [], "agent.toml: api.bogus: Extra inputs are not permitted"),
        ("[runtime.openvino]\nprecision = \"f8\"\n", [], "agent.toml: runtime.openvino.precision"),
        ("api = 3\n", [], "agent.toml: api is not a table"),
        ("[api\n", [], "agent.toml is not valid TOML"),
        ("", ["--workers", "0"], "--workers: Input should be greater than or equal to 1"),
        ("", ["--token", "short"], "--token: Value should have at least 16 items"),
        ("", ["--socket", "api.sock"], "--socket: must be an absolute path"),
    ],
)  # fmt: skip
def test_serve_refuses_bad_settings_before_anything_runs(
    tmp_path: Path, toml: str, flags: list[str], words: str
) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(toml)
    done = subprocess.run(
        [AGENT, "serve", "--bundle", "none.emb", "--trust", ".", "--config", str(config), *flags],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert words in done.stderr
