"""What every inference backend provides, and how backends are configured and found.

A backend (one module each under ``agent.runtime``, imported only when used) turns a bundle
variant on disk into a :class:`LoadedModel`. The registry maps a backend key to the module
that implements it; nothing in core code names a backend otherwise.

    backend = get_backend("onnxruntime")           # imports agent.runtime.onnxrt lazily
    model = backend.load(variant_dir, variant, settings)
    model.warm_up()
    outputs = model.infer({"x": array})
    model.close()

Threads: ``infer`` may be called from several threads at once (the serving layer bounds how
many); ``load``, ``warm_up`` and ``close`` are called from one worker thread, never while the
same model serves.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Literal, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from agent.bundle.manifest import TensorSpec, Variant
from agent.errors import ConfigError

# KServe v2 datatypes <-> numpy.
DATATYPES: Mapping[str, np.dtype[np.generic]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OnnxRuntimeSettings(_Settings):
    kind: Literal["onnxruntime"] = "onnxruntime"
    # Execution providers in order of preference; those not available on the box are skipped.
    providers: list[Literal["tensorrt", "cuda", "openvino", "cpu"]] = ["tensorrt", "cuda", "cpu"]
    tensorrt_fp16: bool = True
    cache_dir: Path | None = None  # TensorRT engine and timing cache (default: the state dir)
    intra_op_threads: Annotated[int, Field(ge=0)] = 0  # 0: the runtime's choice
    inter_op_threads: Annotated[int, Field(ge=0)] = 0


class OpenVinoSettings(_Settings):
    kind: Literal["openvino"] = "openvino"
    device: str = "AUTO"  # AUTO, CPU, GPU, NPU, or e.g. "AUTO:GPU,CPU"
    precision: Literal["f32", "f16", "bf16"] = "f32"  # INFERENCE_PRECISION_HINT, never implicit
    cache_dir: Path | None = None
    threads: Annotated[int, Field(ge=0)] = 0


class LiteRtSettings(_Settings):
    kind: Literal["litert"] = "litert"
    threads: Annotated[int, Field(ge=0)] = 0
    xnnpack: bool = True


BackendSettings = Annotated[
    OnnxRuntimeSettings | OpenVinoSettings | LiteRtSettings, Field(discriminator="kind")
]


class LoadedModel(Protocol):
    """A model ready to run. ``inputs``/``outputs`` use KServe datatypes, -1 for dynamic dims."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    runtime: str  # what runs it, for people: "onnxruntime 1.20 CPUExecutionProvider"

    def warm_up(self, progress: Callable[[float], None] | None = None) -> None: ...

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


class Backend(Protocol):
    key: str  # "onnxruntime", "openvino", "litert"
    formats: tuple[str, ...]  # the variant formats it runs: "onnx", "openvino-ir", "tflite"

    def available(self) -> bool:
        """True when its Python package imports on this box (cheap; cached)."""
        ...

    def load(self, variant_dir: Path, variant: Variant, settings: _Settings) -> LoadedModel:
        """Load ``variant`` from the unpacked bundle directory ``variant_dir``.

        Raises ToolError when the runtime is missing, BadContentError for a model it refuses.
        """
        ...


# key -> module implementing ``BACKEND``; imported on first use only.
REGISTRY: Mapping[str, str] = {
    "onnxruntime": "agent.runtime.onnxrt",
    "openvino": "agent.runtime.openvino",
    "litert": "agent.runtime.litert",
}


def get_backend(key: str) -> Backend:
    try:
        module = importlib.import_module(REGISTRY[key])
    except KeyError:
        raise ConfigError(f"no backend {key!r}; known: {', '.join(REGISTRY)}") from None
    backend: Backend = module.BACKEND
    return backend
