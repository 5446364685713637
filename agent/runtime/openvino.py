"""OpenVINO: device AUTO, CPU, GPU or NPU, with an explicit precision hint.

``INFERENCE_PRECISION_HINT`` is always set (default f32): without it, the CPU plugin computes in
bf16 on CPUs with AVX512-BF16 or AMX, and the results drift from the reference by about 1e-2,
enough to fail the bundle's self-test. ``CACHE_DIR`` keeps compiled blobs so a restart skips the
compilation (a GPU compile takes seconds to minutes).

One compiled model, and a pool of infer requests: each ``infer`` takes an idle request (or makes
one) under a lock, runs it on the calling thread without the lock, and puts it back. An
InferRequest is not safe for two threads at once; the CompiledModel is.

Dimension names: OpenVINO cannot say which inputs share a dynamic dimension. ``read_model``
keeps no ONNX ``dim_param`` names and an IR stores only ``?``; ``Dimension.get_symbol()`` is None
on every input of a model read from either (checked with OpenVINO 2026.4, ONNX frontend and IR).
So no dimension is named here, and a request whose inputs differ in size on a dynamic axis that
the runtime then refuses ("Eltwise shape infer input shapes dim index: 0 mismatch") is taken to
be the request's mistake (see :meth:`agent.runtime.base.RuntimeModel.infer`).
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agent.bundle.manifest import TensorSpec
from agent.errors import FormatError, ToolError
from agent.runtime.base import BackendBase, LoadedModel, OpenVinoSettings, RuntimeModel, _Settings

# OpenVINO element type names -> KServe datatypes.
OV_DATATYPES: Mapping[str, str] = {
    "f32": "FP32", "f16": "FP16", "f64": "FP64", "bf16": "BF16", "i8": "INT8", "u8": "UINT8",
    "i16": "INT16", "u16": "UINT16", "i32": "INT32", "u32": "UINT32", "i64": "INT64",
    "u64": "UINT64", "boolean": "BOOL", "string": "BYTES",
}  # fmt: skip


def _ov() -> Any:
    try:
        return importlib.import_module("openvino")
    except ImportError:
        raise BACKEND.missing() from None


def _spec(port: Any, path: Path) -> TensorSpec:
    try:
        name = port.get_any_name()
    except RuntimeError:
        raise FormatError(f"{path}: a tensor of the model has no name") from None
    datatype = OV_DATATYPES.get(port.get_element_type().get_type_name())
    if datatype is None:
        raise FormatError(f"{path}: tensor {name!r} has an unsupported type")
    shape = [d.get_length() if d.is_static else -1 for d in port.get_partial_shape()]
    return TensorSpec(name=name, datatype=datatype, shape=shape)  # type: ignore[arg-type]


def model_tensors(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Read a model (IR ``.xml`` with its ``.bin``, or ``.onnx``) and list its inputs and outputs.

    ToolError when OpenVINO is missing, FormatError when it cannot read the model.
    """
    ov = _ov()
    try:
        model = ov.Core().read_model(str(path))
    except Exception as exc:  # OpenVINO raises RuntimeError subclasses
        raise FormatError(f"{path}: not a readable OpenVINO model: {exc}") from None
    return [_spec(p, path) for p in model.inputs], [_spec(p, path) for p in model.outputs]


def compile_config(settings: OpenVinoSettings) -> dict[str, Any]:
    """The properties passed to ``compile_model``; the precision hint is never left out."""
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": settings.precision}
    if settings.cache_dir is not None:
        config["CACHE_DIR"] = str(settings.cache_dir)
    if settings.threads:
        config["INFERENCE_NUM_THREADS"] = settings.threads
    return config


class OpenVinoModel(RuntimeModel):
    def __init__(self, path: Path, compiled: Any, runtime: str) -> None:
        self._compiled = compiled
        self._ports = [(_spec(p, path).name, p) for p in compiled.outputs]
        self._idle: list[Any] = []
        self._lock = threading.Lock()
        self.requests_made = 0  # the most requests that ever ran at once
        inputs = [_spec(p, path) for p in compiled.inputs]
        outputs = [_spec(p, path) for p in compiled.outputs]
        super().__init__(path, inputs, outputs, runtime)

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Called on the serving threads. The lock guards only the pool, never a running request.
        with self._lock:
            request = self._idle.pop() if self._idle else None
        if request is None:
            request = self._compiled.create_infer_request()
            with self._lock:
                self.requests_made += 1
        try:
            # share_outputs=False: the results are copies, valid after the request is reused.
            result = request.infer(feeds, share_inputs=False, share_outputs=False)
            return {name: np.asarray(result[port]) for name, port in self._ports}
        finally:
            with self._lock:
                self._idle.append(request)

    def _release(self) -> None:
        with self._lock:
            self._idle.clear()
        self._compiled = None


class OpenVinoBackend(BackendBase):
    key = "openvino"
    formats = ("openvino-ir", "onnx")
    modules = ("openvino",)
    distributions = ("openvino",)
    settings_type = OpenVinoSettings
    install_hint = "install edge-model-agent[openvino] to run OpenVINO models"

    def load_file(
        self, path: Path, settings: _Settings, *, inputs: Sequence[TensorSpec] | None = None
    ) -> LoadedModel:
        s: OpenVinoSettings = self._settings(settings)
        ov = _ov()
        if path.suffix.lower() == ".xml" and not path.with_suffix(".bin").is_file():
            raise FormatError(
                f"{path}: the OpenVINO weights {path.with_suffix('.bin').name} are missing"
            )
        core = ov.Core()
        try:
            # From the path, not a read Model: with CACHE_DIR set, a cached blob is imported
            # without reading the IR again.
            compiled = core.compile_model(str(path), s.device, compile_config(s))
        except Exception as exc:  # OpenVINO raises RuntimeError for every failure
            model_tensors(path)  # FormatError when the file itself is unreadable
            raise ToolError(
                f"{path}: OpenVINO cannot compile the model for {s.device}: {exc}"
            ) from None
        try:
            devices = ",".join(compiled.get_property("EXECUTION_DEVICES"))
        except RuntimeError:
            devices = s.device
        where = devices if devices == s.device else f"{s.device}:{devices}"
        version = ov.__version__.split("-")[0]
        return OpenVinoModel(path, compiled, f"openvino {version} {where} {s.precision}")


BACKEND = OpenVinoBackend()
