"""LiteRT (``ai_edge_litert``), or ``tflite_runtime`` where LiteRT has no wheel.

XNNPACK is LiteRT's default CPU delegate (op resolver AUTO); ``xnnpack = false`` selects the
builtin kernels without default delegates. Inputs with a dynamic dimension (-1 in the model's
shape signature) are resized to each request's shape.

An Interpreter is not thread-safe (set_tensor, invoke and get_tensor share its buffers):
``infer`` holds one lock from the first set_tensor to the last get_tensor.

Dimension names: a shape signature says -1 and nothing more, so LiteRT cannot say which inputs
share a dynamic dimension. Inputs resized to sizes the graph cannot take fail in
``allocate_tensors`` ("Given shapes, [2,4] and [3,4], are not broadcastable"); where the inputs
differ in size on such an axis that is taken to be the request's mistake (see
:meth:`agent.runtime.base.RuntimeModel.infer`), and the next request resizes and allocates again.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agent.bundle.manifest import TensorSpec
from agent.errors import FormatError, ToolError
from agent.runtime.base import (
    BackendBase,
    LiteRtSettings,
    LoadedModel,
    RuntimeModel,
    _Settings,
    kserve_datatype,
)


def _interpreter_module() -> tuple[Any, str]:
    for name, label in (
        ("ai_edge_litert.interpreter", "litert"),
        ("tflite_runtime.interpreter", "tflite-runtime"),
    ):
        try:
            return importlib.import_module(name), label
        except ImportError:
            continue
    raise BACKEND.missing()


def _spec(detail: dict[str, Any], path: Path) -> TensorSpec:
    datatype = kserve_datatype(detail["dtype"])
    if datatype is None:
        raise FormatError(
            f"{path}: tensor {detail['name']!r} has unsupported type {detail['dtype']}"
        )
    signature = detail.get("shape_signature")
    shape = signature if signature is not None and len(signature) else detail["shape"]
    return TensorSpec(name=detail["name"], datatype=datatype, shape=[int(d) for d in shape])  # type: ignore[arg-type]


def _delegated(interpreter: Any, asked: bool) -> bool:
    """Whether a delegate (XNNPACK) took over nodes: its DELEGATE node is in the execution plan.
    Older tflite_runtime builds lack the listing; there, what the settings asked for."""
    try:
        return any(op["op_name"] == "DELEGATE" for op in interpreter._get_ops_details())
    except Exception:  # AttributeError on old builds, RuntimeError from the C++ side
        return asked


class LiteRtModel(RuntimeModel):
    def __init__(self, path: Path, interpreter: Any, runtime: str) -> None:
        self._interpreter = interpreter
        self._lock = threading.Lock()
        ins = interpreter.get_input_details()
        outs = interpreter.get_output_details()
        self._in_index = {d["name"]: d["index"] for d in ins}
        self._out_index = {d["name"]: d["index"] for d in outs}
        self._shapes = {d["name"]: tuple(int(x) for x in d["shape"]) for d in ins}
        super().__init__(
            path, [_spec(d, path) for d in ins], [_spec(d, path) for d in outs], runtime
        )

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Called on the serving threads; the lock serializes them (see the module docstring).
        with self._lock:
            it = self._interpreter
            changed = [n for n, v in feeds.items() if v.shape != self._shapes.get(n)]
            if changed:
                try:
                    for name in changed:
                        it.resize_tensor_input(self._in_index[name], feeds[name].shape, strict=True)
                        self._shapes[name] = feeds[name].shape
                    it.allocate_tensors()
                except Exception:
                    # Nothing is allocated for the recorded shapes: resize for the next request.
                    self._shapes = {}
                    raise
            for name, value in feeds.items():
                it.set_tensor(self._in_index[name], value)
            it.invoke()
            # get_tensor copies: the arrays stay valid after the lock is released.
            return {name: it.get_tensor(index) for name, index in self._out_index.items()}

    def _release(self) -> None:
        with self._lock:
            self._interpreter = None


class LiteRtBackend(BackendBase):
    key = "litert"
    formats = ("tflite",)
    modules = ("ai_edge_litert", "tflite_runtime")
    distributions = ("ai-edge-litert", "tflite-runtime")
    settings_type = LiteRtSettings
    install_hint = "install edge-model-agent[tflite] (or tflite-runtime) to run TFLite models"

    def load_file(
        self, path: Path, settings: _Settings, *, inputs: Sequence[TensorSpec] | None = None
    ) -> LoadedModel:
        s: LiteRtSettings = self._settings(settings)
        module, label = _interpreter_module()
        kwargs: dict[str, Any] = {"model_path": str(path)}
        if s.threads:
            kwargs["num_threads"] = s.threads
        # OpResolverType and the experimental_op_resolver_type argument came together (TF 2.6);
        # older tflite_runtime builds apply no delegate by default.
        resolver = getattr(module, "OpResolverType", None)
        if resolver is not None:
            kwargs["experimental_op_resolver_type"] = (
                resolver.AUTO if s.xnnpack else resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES
            )
        try:
            interpreter = module.Interpreter(**kwargs)
            interpreter.allocate_tensors()  # XNNPACK is applied here
        except ValueError as exc:  # "not a valid Flatbuffer buffer", "Could not open"
            raise FormatError(f"{path}: {label} refused the model: {exc}") from None
        except Exception as exc:  # RuntimeError from unsupported ops or delegates
            raise ToolError(f"{path}: {label} cannot load the model: {exc}") from None
        threads = f"{s.threads} threads" if s.threads else "default threads"
        kernels = "xnnpack" if _delegated(interpreter, s.xnnpack) else "builtin"
        runtime = f"{label} {self.version() or ''} {kernels} {threads}"
        return LiteRtModel(path, interpreter, " ".join(runtime.split()))


BACKEND = LiteRtBackend()
