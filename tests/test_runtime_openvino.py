"""OpenVINO: the explicit precision hint, the compiled-blob cache, threads, ONNX through OpenVINO.

Real OpenVINO on the CPU device (the only device here) with an IR converted from a tiny ONNX model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openvino as ov
import pytest

from agent.errors import FormatError, ToolError
from agent.fleet._models import convert_openvino, inspect_model
from agent.runtime.base import OpenVinoSettings, get_backend
from agent.runtime.openvino import compile_config, model_tensors
from agent.testing.models import make_onnx, reference
from tests.test_runtime_backends import lay_out


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_onnx(tmp_path_factory.mktemp("ov") / "tiny.onnx")


@pytest.fixture(scope="module")
def ir(onnx_model: Path) -> Path:
    (onnx_model.parent / "ir").mkdir()
    return convert_openvino(inspect_model(onnx_model), onnx_model.parent / "ir" / "tiny.xml")


def test_the_precision_hint_is_always_explicit() -> None:
    """Without it the CPU plugin computes in bf16 on CPUs with AVX512-BF16 or AMX."""
    for device in ("AUTO", "CPU", "GPU", "NPU", "AUTO:GPU,CPU"):
        assert compile_config(OpenVinoSettings(device=device)) == {
            "INFERENCE_PRECISION_HINT": "f32"
        }
    config = compile_config(OpenVinoSettings(precision="f16", cache_dir=Path("/c"), threads=3))
    assert config == {
        "INFERENCE_PRECISION_HINT": "f16",
        "CACHE_DIR": "/c",
        "INFERENCE_NUM_THREADS": 3,
    }


def test_cpu_runs_in_f32_and_matches_the_reference(ir: Path, onnx_model: Path) -> None:
    model = get_backend("openvino").load_file(ir, OpenVinoSettings(device="CPU", threads=1))
    compiled = model._compiled  # type: ignore[attr-defined]
    assert compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32
    assert compiled.get_property("INFERENCE_NUM_THREADS") == 1
    assert model.runtime.endswith(" CPU f32")
    x = np.random.default_rng(5).standard_normal((4, 16)).astype(np.float32) * 4
    # 1e-5: far inside what bf16 (8 mantissa bits) could reach on these values.
    np.testing.assert_allclose(model.infer({"x": x})["y"], reference(onnx_model, x), atol=1e-5)


def test_auto_device_reports_where_it_runs(ir: Path) -> None:
    model = get_backend("openvino").load_file(ir, OpenVinoSettings())
    assert " AUTO:CPU f32" in model.runtime


def test_the_cache_dir_keeps_the_compiled_blob(ir: Path, onnx_model: Path, tmp_path: Path) -> None:
    cache = tmp_path / "ov-cache"
    settings = OpenVinoSettings(device="CPU", cache_dir=cache)
    get_backend("openvino").load_file(ir, settings).close()
    blobs = list(cache.glob("*.blob"))
    assert len(blobs) == 1
    stamp = blobs[0].stat().st_mtime_ns
    again = get_backend("openvino").load_file(ir, settings)  # imported from the blob
    assert [b.stat().st_mtime_ns for b in cache.glob("*.blob")] == [stamp]
    x = np.ones((1, 16), np.float32)
    np.testing.assert_allclose(again.infer({"x": x})["y"], reference(onnx_model, x), atol=1e-5)


def test_openvino_runs_an_onnx_variant(onnx_model: Path, tmp_path: Path) -> None:
    """A policy may send ONNX variants to OpenVINO (``backends = {onnx = "openvino"}``)."""
    variant = lay_out(onnx_model, tmp_path, "onnx-fp32")
    model = get_backend("openvino").load(tmp_path, variant, OpenVinoSettings(device="CPU"))
    x = np.random.default_rng(2).standard_normal((2, 16)).astype(np.float32)
    np.testing.assert_allclose(model.infer({"x": x})["y"], reference(onnx_model, x), atol=1e-5)


def test_model_tensors_and_refusals(ir: Path, tmp_path: Path) -> None:
    inputs, outputs = model_tensors(ir)
    assert [(t.name, t.datatype, t.shape) for t in inputs] == [("x", "FP32", [-1, 16])]
    assert [(t.name, t.datatype, t.shape) for t in outputs] == [("y", "FP32", [-1, 8])]
    lonely = tmp_path / "lonely.xml"
    lonely.write_bytes(ir.read_bytes())
    with pytest.raises(FormatError, match=r"the OpenVINO weights lonely\.bin are missing"):
        get_backend("openvino").load_file(lonely, OpenVinoSettings())


def test_an_unknown_device_is_a_tool_error(ir: Path) -> None:
    with pytest.raises(ToolError, match="OpenVINO cannot compile the model for QPU"):
        get_backend("openvino").load_file(ir, OpenVinoSettings(device="QPU"))
