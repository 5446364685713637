"""ONNX Runtime: TensorRT (FP16, engine and timing cache on disk), CUDA, OpenVINO, CPU providers.

The providers asked for in the settings are filtered by ``onnxruntime.get_available_providers()``
(the CPU wheel has only the CPU provider; ``onnxruntime-gpu`` adds CUDA and TensorRT). ONNX
Runtime falls back on its own when a listed provider fails to start (no libnvinfer, no GPU), so
``runtime`` names the provider the session really uses, ``session.get_providers()[0]``.

``InferenceSession.run`` is safe to call from several threads at once; nothing here locks.

Dimension names: ``session.get_inputs()`` gives each symbolic dimension as its ``dim_param``
string ("N"), a fixed one as an int, an unnamed one as None. Inputs that name a dimension alike
must agree on its size, which ONNX Runtime itself does not check before running (a mismatch
fails inside a kernel, "Attempting to broadcast an axis by a dimension other than 1"); the
shared check in :func:`agent.runtime.base.check_inputs` refuses it first.
"""

from __future__ import annotations

import importlib
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agent.bundle.manifest import TensorSpec
from agent.errors import FormatError, InputShapeError, ToolError
from agent.runtime.base import (
    BackendBase,
    LoadedModel,
    OnnxRuntimeSettings,
    RuntimeModel,
    _Settings,
)

log = logging.getLogger("agent.runtime.onnxrt")

PROVIDERS: Mapping[str, str] = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "cpu": "CPUExecutionProvider",
}

# ONNX Runtime's NodeArg.type strings -> KServe datatypes.
ORT_DATATYPES: Mapping[str, str] = {
    "tensor(float)": "FP32", "tensor(float16)": "FP16", "tensor(double)": "FP64",
    "tensor(bfloat16)": "BF16", "tensor(int8)": "INT8", "tensor(int16)": "INT16",
    "tensor(int32)": "INT32", "tensor(int64)": "INT64", "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16", "tensor(uint32)": "UINT32", "tensor(uint64)": "UINT64",
    "tensor(bool)": "BOOL", "tensor(string)": "BYTES",
}  # fmt: skip


def default_cache_dir() -> Path:
    """Where TensorRT engines go when the settings name no directory: systemd's CacheDirectory=,
    else the StateDirectory=, else a directory under the system temp dir."""
    for var, sub in (("CACHE_DIRECTORY", "tensorrt"), ("STATE_DIRECTORY", "cache/tensorrt")):
        value = os.environ.get(var)
        if value:
            return Path(value.split(":")[0]) / sub
    return Path(tempfile.gettempdir()) / "edge-agent" / "tensorrt"


def _batch_profile(inputs: Sequence[TensorSpec], batch: int) -> str | None:
    """``x:1x16,mask:1x16`` with the leading dimension set to ``batch``; None unless every input
    is fixed apart from a dynamic leading (batch) dimension."""
    parts = []
    for spec in inputs:
        if not spec.shape or any(d < 0 for d in spec.shape[1:]):
            return None
        dims = [batch if spec.shape[0] < 0 else spec.shape[0], *spec.shape[1:]]
        parts.append(f"{spec.name}:{'x'.join(str(d) for d in dims)}")
    return ",".join(parts)


def plan_providers(
    settings: OnnxRuntimeSettings,
    available: Sequence[str],
    *,
    cache_dir: Path,
    inputs: Sequence[TensorSpec] | None = None,
) -> tuple[list[str], list[dict[str, str]]]:
    """The providers to ask for, in the settings' order, with their options.

    Providers missing from ``available`` are dropped; ToolError when none is left.
    """
    names: list[str] = []
    options: list[dict[str, str]] = []
    for key in settings.providers:
        name = PROVIDERS[key]
        if name not in available or name in names:
            continue
        opts: dict[str, str] = {}
        if key == "tensorrt":
            engines = str(cache_dir)
            opts = {
                "trt_fp16_enable": str(settings.tensorrt_fp16),
                "trt_engine_cache_enable": "True",
                "trt_engine_cache_path": engines,
                "trt_timing_cache_enable": "True",
                "trt_timing_cache_path": engines,
            }
            profile_min = _batch_profile(inputs or [], 1)
            profile_max = _batch_profile(inputs or [], settings.tensorrt_max_batch)
            if inputs and profile_min and profile_max and profile_min != profile_max:
                opts |= {
                    "trt_profile_min_shapes": profile_min,
                    "trt_profile_opt_shapes": profile_min,
                    "trt_profile_max_shapes": profile_max,
                }
        names.append(name)
        options.append(opts)
    if not names:
        raise ToolError(
            f"none of the ONNX Runtime providers {', '.join(settings.providers)} is available "
            f"here (available: {', '.join(available) or 'none'})"
        )
    return names, options


def _dim_names(arg: Any) -> list[str | None]:
    return [d if isinstance(d, str) and d else None for d in (arg.shape or [])]


def _spec(arg: Any, path: Path) -> TensorSpec:
    datatype = ORT_DATATYPES.get(arg.type)
    if datatype is None:
        raise FormatError(f"{path}: tensor {arg.name!r} has unsupported type {arg.type}")
    shape = [d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or [])]
    return TensorSpec(name=arg.name, datatype=datatype, shape=shape)  # type: ignore[arg-type]


class OnnxModel(RuntimeModel):
    def __init__(self, path: Path, session: Any, version: str) -> None:
        self._session = session
        self._outputs = [o.name for o in session.get_outputs()]
        inputs = [_spec(a, path) for a in session.get_inputs()]
        outputs = [_spec(a, path) for a in session.get_outputs()]
        super().__init__(
            path,
            inputs,
            outputs,
            f"onnxruntime {version} {session.get_providers()[0]}",
            dim_names={a.name: _dim_names(a) for a in session.get_inputs()},
        )

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Called on the serving threads; InferenceSession.run is thread-safe.
        try:
            values = self._session.run(self._outputs, feeds)
        except Exception as exc:  # onnxruntime's pybind exception types
            # INVALID_ARGUMENT: the runtime's own check of the feeds against the model's
            # inputs ("Got invalid dimensions for input"), before any kernel ran.
            if type(exc).__name__ == "InvalidArgument":
                raise InputShapeError(
                    f"{self.path.name}: the runtime refused the input: {exc}"
                ) from None
            raise
        return dict(zip(self._outputs, values, strict=True))

    def _release(self) -> None:
        self._session = None


class OnnxRuntimeBackend(BackendBase):
    key = "onnxruntime"
    formats = ("onnx",)
    modules = ("onnxruntime",)
    distributions = ("onnxruntime", "onnxruntime-gpu")
    settings_type = OnnxRuntimeSettings
    install_hint = "install edge-model-agent[cpu] (or [cuda] on NVIDIA boxes) to run ONNX models"

    def load_file(
        self, path: Path, settings: _Settings, *, inputs: Sequence[TensorSpec] | None = None
    ) -> LoadedModel:
        s: OnnxRuntimeSettings = self._settings(settings)
        try:
            ort = importlib.import_module("onnxruntime")
        except ImportError:
            raise self.missing() from None
        cache_dir = s.cache_dir or default_cache_dir()
        names, options = plan_providers(
            s, ort.get_available_providers(), cache_dir=cache_dir, inputs=inputs
        )
        if "TensorrtExecutionProvider" in names:
            try:
                cache_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ToolError(f"cannot create the TensorRT cache {cache_dir}: {exc}") from None
        so = ort.SessionOptions()
        so.log_severity_level = 3  # errors only; warnings about fallbacks are logged below
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if s.intra_op_threads:
            so.intra_op_num_threads = s.intra_op_threads
        if s.inter_op_threads:
            so.inter_op_num_threads = s.inter_op_threads
        try:
            session = ort.InferenceSession(
                str(path), sess_options=so, providers=names, provider_options=options
            )
        except Exception as exc:  # onnxruntime's pybind exception types
            if type(exc).__name__ in ("InvalidProtobuf", "InvalidGraph", "NoSuchFile"):
                raise FormatError(f"{path}: ONNX Runtime refused the model: {exc}") from None
            raise ToolError(f"{path}: ONNX Runtime cannot load the model: {exc}") from None
        used = session.get_providers()
        if used and used[0] != names[0]:
            log.warning("%s: %s did not start; running on %s", path.name, names[0], used[0])
        return OnnxModel(path, session, ort.__version__)


BACKEND = OnnxRuntimeBackend()
