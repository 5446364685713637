"""A TFLite model built in the test (flatbuffers, no TensorFlow), run under LiteRT and bundled."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

from agent.bundle.reader import read_index
from agent.errors import FormatError
from agent.fleet._models import inspect_model
from agent.fleet.build import BuildOptions, build_bundle
from agent.testing.models import make_onnx, make_tflite, reference, reference_tflite

SEED = 1


@pytest.fixture
def tflite_model(tmp_path: Path) -> Path:
    return make_tflite(tmp_path / "tiny.tflite", seed=SEED)


def test_model_runs_under_litert_and_matches_numpy(tflite_model: Path, tmp_path: Path) -> None:
    interpreter = Interpreter(model_path=str(tflite_model))
    interpreter.allocate_tensors()
    (inp,) = interpreter.get_input_details()
    (out,) = interpreter.get_output_details()
    assert (inp["name"], list(inp["shape"]), inp["dtype"]) == ("x", [1, 16], np.float32)
    assert (out["name"], list(out["shape"]), out["dtype"]) == ("y", [1, 8], np.float32)

    onnx_model = make_onnx(tmp_path / "tiny.onnx", seed=SEED)
    rng = np.random.default_rng(7)
    for _ in range(4):
        x = rng.standard_normal((1, 16)).astype(np.float32)
        interpreter.set_tensor(inp["index"], x)
        interpreter.invoke()
        y = interpreter.get_tensor(out["index"])
        np.testing.assert_allclose(y, reference_tflite(tflite_model, x), rtol=1e-5, atol=1e-5)
        # Same seed, same weights: the ONNX model's numpy answer is this model's answer too.
        np.testing.assert_allclose(y, reference(onnx_model, x), rtol=1e-5, atol=1e-5)
    # The RELU is really there: some outputs are clipped to zero, some are not.
    assert (y == 0).any()
    assert (y > 0).any()


def test_inspect_reports_the_tensors_and_precision(tflite_model: Path) -> None:
    model = inspect_model(tflite_model)
    assert model.format == "tflite"
    assert model.files == (tflite_model,)
    assert [(t.name, t.datatype, t.shape) for t in model.inputs] == [("x", "FP32", [1, 16])]
    assert [(t.name, t.datatype, t.shape) for t in model.outputs] == [("y", "FP32", [1, 8])]
    assert model.precision == "fp32"


def test_bundle_with_onnx_and_tflite_variants(tflite_model: Path, tmp_path: Path) -> None:
    onnx_model = make_onnx(tmp_path / "tiny.onnx", seed=SEED)
    out = tmp_path / "tiny.emb"
    result = build_bundle(
        [onnx_model, tflite_model], out, BuildOptions(name="tiny", version="1.0.0")
    )
    manifest = result.manifest
    assert [v.id for v in manifest.variants] == ["onnx-fp32", "tflite-fp32"]
    variant = manifest.variant("tflite-fp32")
    assert (variant.format, variant.precision) == ("tflite", "fp32")
    assert variant.accuracy is not None
    assert variant.accuracy.reference == "onnx-fp32"
    assert variant.accuracy.samples > 0
    assert variant.accuracy.max_abs_error < 1e-4
    assert manifest.variant("onnx-fp32").accuracy is None
    with open(out, "rb") as f:
        index = read_index(f)
    assert [v.id for v in index.manifest.variants] == ["onnx-fp32", "tflite-fp32"]
    assert variant.entrypoint == "variants/tflite-fp32/tiny.tflite"
    assert index.members[variant.entrypoint].size == tflite_model.stat().st_size


def test_corrupt_tflite_is_a_format_error(tmp_path: Path) -> None:
    path = tmp_path / "garbage.tflite"
    path.write_bytes(np.random.default_rng(0).bytes(1024))
    with pytest.raises(FormatError, match="not a readable TFLite model"):
        inspect_model(path)
