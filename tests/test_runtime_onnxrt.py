"""ONNX Runtime: provider order and options, threads, and what ``runtime`` reports.

This machine has the CPU build of ONNX Runtime and no GPU, so the TensorRT and CUDA paths cannot
run here. Those tests fake exactly two things: ``onnxruntime.get_available_providers`` (to list
the GPU providers a box with onnxruntime-gpu has) and ``onnxruntime.InferenceSession`` (a
recorder that checks what the backend asks for, then runs a real CPU session and reports the
providers a GPU box would). The model, the session and every inference are real.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnxruntime as ort
import pytest

from agent.bundle.manifest import TensorSpec
from agent.errors import ToolError
from agent.runtime import onnxrt
from agent.runtime.base import OnnxRuntimeSettings, get_backend
from agent.testing.models import make_onnx, reference
from tests.test_runtime_backends import lay_out

TRT, CUDA, CPU = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
GPU_BOX = [TRT, CUDA, CPU]  # what onnxruntime-gpu lists on an NVIDIA box
REAL_SESSION = ort.InferenceSession
X = [TensorSpec(name="x", datatype="FP32", shape=[-1, 16])]


def test_provider_plan_for_a_gpu_box(tmp_path: Path) -> None:
    names, options = onnxrt.plan_providers(
        OnnxRuntimeSettings(), GPU_BOX, cache_dir=tmp_path / "trt", inputs=X
    )
    assert names == [TRT, CUDA, CPU]
    engines = str(tmp_path / "trt")
    assert options == [
        {
            "trt_fp16_enable": "True",
            "trt_engine_cache_enable": "True",
            "trt_engine_cache_path": engines,
            "trt_timing_cache_enable": "True",
            "trt_timing_cache_path": engines,
            # One engine for batches 1..8: a new batch size never rebuilds it.
            "trt_profile_min_shapes": "x:1x16",
            "trt_profile_opt_shapes": "x:1x16",
            "trt_profile_max_shapes": "x:8x16",
        },
        {},
        {},
    ]


def test_provider_plan_follows_the_settings_and_the_box(tmp_path: Path) -> None:
    plan = onnxrt.plan_providers
    # Order from the settings, not from the box.
    names, _ = plan(
        OnnxRuntimeSettings(providers=["cuda", "tensorrt", "cpu"]), GPU_BOX, cache_dir=tmp_path
    )
    assert names == [CUDA, TRT, CPU]
    # Providers the box lacks are dropped: the CPU wheel has only the CPU provider.
    names, options = plan(
        OnnxRuntimeSettings(), ["AzureExecutionProvider", CPU], cache_dir=tmp_path
    )
    assert (names, options) == ([CPU], [{}])
    # FP16 off; fixed shapes need no profile; a second dynamic dimension gets none either.
    _, options = plan(
        OnnxRuntimeSettings(tensorrt_fp16=False, tensorrt_max_batch=32),
        GPU_BOX,
        cache_dir=tmp_path,
        inputs=[TensorSpec(name="x", datatype="FP32", shape=[1, 16])],
    )
    assert options[0]["trt_fp16_enable"] == "False"
    assert "trt_profile_min_shapes" not in options[0]
    _, options = plan(
        OnnxRuntimeSettings(),
        GPU_BOX,
        cache_dir=tmp_path,
        inputs=[TensorSpec(name="x", datatype="FP32", shape=[-1, -1])],
    )
    assert "trt_profile_min_shapes" not in options[0]
    _, options = plan(
        OnnxRuntimeSettings(tensorrt_max_batch=4),
        GPU_BOX,
        cache_dir=tmp_path,
        inputs=[*X, TensorSpec(name="m", datatype="INT64", shape=[-1, 3, 2])],
    )
    assert options[0]["trt_profile_max_shapes"] == "x:4x16,m:4x3x2"
    with pytest.raises(
        ToolError, match="none of the ONNX Runtime providers tensorrt, cuda is available here"
    ):
        plan(OnnxRuntimeSettings(providers=["tensorrt", "cuda"]), [CPU], cache_dir=tmp_path)
    # Listing one twice asks for it once.
    names, _ = plan(OnnxRuntimeSettings(providers=["cpu", "cpu"]), [CPU], cache_dir=tmp_path)
    assert names == [CPU]


class FakeGpuSession:
    """Stands in for InferenceSession on a GPU box (no GPU can exist here): records the
    arguments, runs a real CPU session, and reports ``started`` as the providers in use."""

    calls: ClassVar[list[dict[str, Any]]] = []
    started: ClassVar[list[str] | None] = None

    def __init__(
        self,
        path: str,
        sess_options: Any = None,
        providers: Any = None,
        provider_options: Any = None,
    ) -> None:
        type(self).calls.append(
            {"providers": providers, "provider_options": provider_options, "options": sess_options}
        )
        self._real = REAL_SESSION(path, sess_options=sess_options, providers=[CPU])
        self._started = type(self).started or list(providers)

    def get_providers(self) -> list[str]:
        return self._started

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


@pytest.fixture
def gpu_box(monkeypatch: pytest.MonkeyPatch) -> type[FakeGpuSession]:
    monkeypatch.setattr(ort, "get_available_providers", lambda: list(GPU_BOX))
    monkeypatch.setattr(ort, "InferenceSession", FakeGpuSession)
    monkeypatch.setattr(FakeGpuSession, "calls", [])
    monkeypatch.setattr(FakeGpuSession, "started", None)
    return FakeGpuSession


def test_tensorrt_first_with_fp16_and_an_engine_cache(
    gpu_box: type[FakeGpuSession], tmp_path: Path
) -> None:
    model_path = make_onnx(tmp_path / "tiny.onnx")
    variant = lay_out(model_path, tmp_path / "bundle", "onnx-fp32")
    cache = tmp_path / "state" / "cache" / "tensorrt"
    settings = OnnxRuntimeSettings(cache_dir=cache, intra_op_threads=2, inter_op_threads=1)
    model = get_backend("onnxruntime").load(tmp_path / "bundle", variant, settings)
    (call,) = gpu_box.calls
    assert call["providers"] == [TRT, CUDA, CPU]
    trt = call["provider_options"][0]
    assert trt["trt_fp16_enable"] == "True"
    assert trt["trt_engine_cache_enable"] == "True"
    assert trt["trt_engine_cache_path"] == str(cache)
    assert trt["trt_timing_cache_enable"] == "True"
    assert trt["trt_profile_max_shapes"] == "x:8x16"
    assert cache.is_dir()  # TensorRT writes engines there; it must exist first
    assert call["options"].intra_op_num_threads == 2
    assert call["options"].inter_op_num_threads == 1
    assert model.runtime == f"onnxruntime {ort.__version__} TensorrtExecutionProvider"
    x = np.random.default_rng(1).standard_normal((2, 16)).astype(np.float32)
    np.testing.assert_allclose(model.infer({"x": x})["y"], reference(model_path, x), atol=1e-5)


def test_runtime_names_the_provider_really_used(
    gpu_box: type[FakeGpuSession], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """ONNX Runtime falls back by itself when TensorRT cannot start (no libnvinfer)."""
    gpu_box.started = [CUDA, CPU]
    model_path = make_onnx(tmp_path / "tiny.onnx")
    with caplog.at_level(logging.WARNING, "agent.runtime.onnxrt"):
        model = get_backend("onnxruntime").load_file(
            model_path, OnnxRuntimeSettings(cache_dir=tmp_path)
        )
    assert model.runtime.endswith(" CUDAExecutionProvider")
    assert (
        "TensorrtExecutionProvider did not start; running on CUDAExecutionProvider" in caplog.text
    )


def test_cuda_only_settings_on_a_gpu_box(gpu_box: type[FakeGpuSession], tmp_path: Path) -> None:
    model_path = make_onnx(tmp_path / "tiny.onnx")
    get_backend("onnxruntime").load_file(model_path, OnnxRuntimeSettings(providers=["cuda", "cpu"]))
    (call,) = gpu_box.calls
    assert call["providers"] == [CUDA, CPU]
    assert call["provider_options"] == [{}, {}]


def test_on_this_cpu_box_the_default_order_ends_on_the_cpu(tmp_path: Path) -> None:
    """Real session: TensorRT and CUDA are asked for by default and skipped here."""
    model_path = make_onnx(tmp_path / "tiny.onnx")
    settings = OnnxRuntimeSettings(intra_op_threads=1, cache_dir=tmp_path / "trt")
    model = get_backend("onnxruntime").load_file(model_path, settings)
    assert model.runtime == f"onnxruntime {ort.__version__} CPUExecutionProvider"
    session = model._session  # type: ignore[attr-defined]
    assert session.get_providers() == [CPU]
    assert session.get_session_options().intra_op_num_threads == 1
    assert not (tmp_path / "trt").exists()  # no TensorRT, no engine cache


def test_default_engine_cache_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CACHE_DIRECTORY", f"{tmp_path}/cache:{tmp_path}/other")
    assert onnxrt.default_cache_dir() == tmp_path / "cache" / "tensorrt"
    monkeypatch.delenv("CACHE_DIRECTORY")
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "state"))
    assert onnxrt.default_cache_dir() == tmp_path / "state" / "cache" / "tensorrt"
    monkeypatch.delenv("STATE_DIRECTORY")
    assert onnxrt.default_cache_dir().parts[-2:] == ("edge-agent", "tensorrt")


def test_a_runtime_failure_while_loading_is_a_tool_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A session that fails for reasons other than the file (here: an EP that will not start)."""

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("CUDA failure 100: no CUDA-capable device is detected")

    monkeypatch.setattr(ort, "InferenceSession", broken)
    with pytest.raises(ToolError, match="ONNX Runtime cannot load the model: CUDA failure 100"):
        get_backend("onnxruntime").load_file(make_onnx(tmp_path / "m.onnx"), OnnxRuntimeSettings())
