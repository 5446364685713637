"""What every inference backend provides, and how backends are configured and found.

A backend (one module each under ``agent.runtime``, imported only when used) turns a bundle
variant on disk into a :class:`LoadedModel`. The registry maps a backend key to the module
that implements it; nothing in core code names a backend otherwise. A backend module imports
its runtime package (``onnxruntime``, ``openvino``, ``ai_edge_litert``) only inside ``load``, so
``get_backend(key).available()`` answers on a box where that runtime is not installed.

    backend = get_backend("onnxruntime")           # imports agent.runtime.onnxrt lazily
    model = backend.load(variant_dir, variant, settings)
    model.warm_up()
    outputs = model.infer({"x": array})
    model.close()

Threads: ``infer`` may be called from several threads at once (the serving layer bounds how
many); ``load``, ``warm_up`` and ``close`` are called from one worker thread, never while the
same model serves.

Errors, mapped here at the adapter edge from each runtime's own exception types:

- ``load``: ToolError when the runtime is not installed or cannot load the model on this box;
  FormatError (a BadContentError) when the model file is malformed or its tensors disagree with
  the manifest.
- ``infer``: FormatError for inputs that do not match the model's metadata (unknown or missing
  name, wrong datatype), InputShapeError (a FormatError) for shapes that do not (wrong rank or
  size, inputs that disagree on a dimension the model names for both, shapes the runtime
  refused where the request itself is ambiguous, see :meth:`RuntimeModel.infer`); ToolError
  when the runtime fails on input its metadata admits: that is the model's failure.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import logging
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from agent._lazy import lazy_module
from agent.bundle.manifest import TensorSpec, Variant
from agent.errors import (
    ConfigError,
    EdgeAgentError,
    FormatError,
    InputShapeError,
    StorageError,
    ToolError,
)

if TYPE_CHECKING:
    import numpy as np
else:
    np = lazy_module("numpy")  # imported on first use: an idle daemon does without

log = logging.getLogger("agent.runtime")

# KServe v2 datatypes <-> numpy.
_NUMPY_NAMES = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
}


class _Datatypes(Mapping[str, "np.dtype[np.generic]"]):
    """KServe datatype -> numpy dtype; names are known without numpy, dtypes on first use."""

    def __init__(self) -> None:
        self._dtypes: dict[str, np.dtype[np.generic]] | None = None

    def _all(self) -> dict[str, np.dtype[np.generic]]:
        if self._dtypes is None:
            self._dtypes = {k: np.dtype(v) for k, v in _NUMPY_NAMES.items()}
        return self._dtypes

    def __getitem__(self, key: str) -> np.dtype[np.generic]:
        return self._all()[key]

    def __contains__(self, key: object) -> bool:
        return key in _NUMPY_NAMES

    def __iter__(self) -> Iterator[str]:
        return iter(_NUMPY_NAMES)

    def __len__(self) -> int:
        return len(_NUMPY_NAMES)


DATATYPES: Mapping[str, np.dtype[np.generic]] = _Datatypes()


@functools.cache
def _by_dtype() -> dict[np.dtype[np.generic], str]:
    return {v: k for k, v in DATATYPES.items()}


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OnnxRuntimeSettings(_Settings):
    kind: Literal["onnxruntime"] = "onnxruntime"
    # Execution providers in order of preference; those not available on the box are skipped.
    providers: list[Literal["tensorrt", "cuda", "openvino", "cpu"]] = ["tensorrt", "cuda", "cpu"]
    tensorrt_fp16: bool = True
    # TensorRT builds one engine per input-shape range. With a leading dynamic (batch) dimension
    # the engine covers batches 1..tensorrt_max_batch, so a new batch size never rebuilds it.
    tensorrt_max_batch: Annotated[int, Field(ge=1, le=4096)] = 8
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


AnySettings = OnnxRuntimeSettings | OpenVinoSettings | LiteRtSettings
BackendSettings = Annotated[AnySettings, Field(discriminator="kind")]

# key -> the settings class that configures it (defaults: ``SETTINGS[key]()``).
SETTINGS: Mapping[str, type[AnySettings]] = {
    "onnxruntime": OnnxRuntimeSettings,
    "openvino": OpenVinoSettings,
    "litert": LiteRtSettings,
}


def default_settings(key: str) -> AnySettings:
    try:
        return SETTINGS[key]()
    except KeyError:
        raise ConfigError(f"no backend {key!r}; known: {', '.join(REGISTRY)}") from None


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

    def version(self) -> str | None:
        """The installed runtime's version, None when it is missing (cheap; nothing imported)."""
        ...

    def load(self, variant_dir: Path, variant: Variant, settings: _Settings) -> LoadedModel:
        """Load ``variant`` from the unpacked bundle directory ``variant_dir``.

        The model's tensors must agree with the manifest's; the loaded model validates inputs
        against both. Raises ToolError when the runtime is missing or fails, FormatError (a
        BadContentError) for a model it refuses.
        """
        ...

    def load_file(
        self, path: Path, settings: _Settings, *, inputs: Sequence[TensorSpec] | None = None
    ) -> LoadedModel:
        """Load a model file directly (no manifest); ``inputs`` are shape hints, if known."""
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


# -- tensors ------------------------------------------------------------------------------------
def kserve_datatype(dtype: Any) -> str | None:
    """The KServe datatype of a numpy dtype (or type), None when it has none."""
    try:
        return _by_dtype().get(np.dtype(dtype))
    except TypeError:
        return None


def describe(spec: TensorSpec) -> str:
    return f"{spec.datatype}{spec.shape}"


# Per input, per axis: the name the model file gives a dynamic dimension ("N", "batch"), None
# where it gives none or the dimension is fixed. Axes with the same name must have the same size
# in a request, across inputs and within one (ONNX's dim_param: "the same symbolic dimension").
DimNames = Mapping[str, Sequence[str | None]]


def check_inputs(
    specs: Sequence[TensorSpec],
    inputs: Mapping[str, np.ndarray],
    dim_names: DimNames | None = None,
) -> dict[str, np.ndarray]:
    """Check ``inputs`` against the model's input metadata; the arrays, C-contiguous, in order.

    Exact datatypes (nothing is cast), exact rank, every fixed dimension equal; -1 is any size,
    but axes that ``dim_names`` names alike must agree (InputShapeError naming both).
    """
    want = {s.name: s for s in specs}
    unknown = [name for name in inputs if name not in want]
    if unknown:
        raise FormatError(
            f"unknown input {', '.join(repr(n) for n in unknown)}; "
            f"the model's inputs are {', '.join(repr(s.name) for s in specs)}"
        )
    feeds: dict[str, np.ndarray] = {}
    for spec in specs:
        if spec.name not in inputs:
            raise FormatError(f"missing input {spec.name!r} ({describe(spec)})")
        value = inputs[spec.name]
        if not isinstance(value, np.ndarray):
            raise FormatError(f"input {spec.name!r} is a {type(value).__name__}, not an array")
        dtype = DATATYPES.get(spec.datatype)
        got = kserve_datatype(value.dtype) or str(value.dtype)
        if dtype is None or value.dtype != dtype:
            raise FormatError(f"input {spec.name!r} is {got}; the model takes {spec.datatype}")
        shape = list(value.shape)
        if len(shape) != len(spec.shape) or any(
            w != -1 and g != w for g, w in zip(shape, spec.shape, strict=False)
        ):
            raise InputShapeError(
                f"input {spec.name!r} has shape {shape}; the model takes {spec.shape} (-1: any size)"
            )
        feeds[spec.name] = np.ascontiguousarray(value)
    if dim_names:
        _check_shared_dims(specs, feeds, dim_names)
    return feeds


def _check_shared_dims(
    specs: Sequence[TensorSpec], feeds: Mapping[str, np.ndarray], dim_names: DimNames
) -> None:
    first: dict[str, tuple[str, int, int]] = {}  # dimension name -> (input, axis, size)
    for spec in specs:
        names = dim_names.get(spec.name, ())
        for axis, size in enumerate(feeds[spec.name].shape):
            dim = names[axis] if axis < len(names) else None
            if dim is None:
                continue
            where, at, seen = first.setdefault(dim, (spec.name, axis, size))
            if seen == size:
                continue
            if where == spec.name:
                raise InputShapeError(
                    f"input {where!r} has {seen} at axis {at} and {size} at axis {axis}; the "
                    f"model names both dimension {dim!r}, so they must be equal"
                )
            raise InputShapeError(
                f"inputs {where!r} and {spec.name!r} disagree on dimension {dim!r}, which the "
                f"model shares between them: {where!r} has {seen} (axis {at}), {spec.name!r} "
                f"has {size} (axis {axis})"
            )


def unnamed_disagreement(
    specs: Sequence[TensorSpec], feeds: Mapping[str, np.ndarray], dim_names: DimNames
) -> str | None:
    """Where two inputs differ in size at the same axis on dynamic dimensions the model does not
    name: the runtime cannot say whether it needs them equal. A description, or None."""
    by_axis: dict[int, list[tuple[str, int]]] = {}
    for spec in specs:
        names = dim_names.get(spec.name, ())
        shape = feeds[spec.name].shape
        for axis, want in enumerate(spec.shape):
            if want == -1 and (axis >= len(names) or names[axis] is None):
                by_axis.setdefault(axis, []).append((spec.name, int(shape[axis])))
    for axis, sizes in sorted(by_axis.items()):
        if len({size for _, size in sizes}) > 1:
            listed = ", ".join(f"{name!r} has {size}" for name, size in sizes)
            return f"at axis {axis}, {listed}"
    return None


def _runtime_message(exc: BaseException, limit: int = 400) -> str:
    """A runtime's message on one line, for a client: without OpenVINO's "Exception from
    <source file>" lines, and cut short (some runtimes print whole graphs)."""
    lines = [line.strip() for line in str(exc).splitlines()]
    kept = [line for line in lines if line and not line.startswith("Exception from ")]
    text = " ".join(kept) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def warm_up_feeds(specs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    """Zeros of the right datatype for each input, dynamic dimensions set to 1."""
    return {
        s.name: np.zeros([d if d >= 0 else 1 for d in s.shape], dtype=DATATYPES[s.datatype])
        for s in specs
    }


def merge_with_manifest(
    what: str, runtime: Sequence[TensorSpec], manifest: Sequence[TensorSpec]
) -> list[TensorSpec]:
    """The runtime's tensors, checked against the manifest's; where one is dynamic, the other's
    fixed size wins (the signed manifest may promise more than the model file says)."""
    by_name = {t.name: t for t in runtime}
    if set(by_name) != {t.name for t in manifest}:
        raise FormatError(
            f"the model's {what}s {sorted(by_name)} differ from the manifest's "
            f"{sorted(t.name for t in manifest)}"
        )
    merged = []
    for declared in manifest:
        actual = by_name[declared.name]
        if actual.datatype != declared.datatype or len(actual.shape) != len(declared.shape):
            raise FormatError(
                f"{what} {declared.name!r} is {describe(actual)} in the model and "
                f"{describe(declared)} in the manifest"
            )
        shape = []
        for a, d in zip(actual.shape, declared.shape, strict=True):
            if a != -1 and d != -1 and a != d:
                raise FormatError(
                    f"{what} {declared.name!r} is {describe(actual)} in the model and "
                    f"{describe(declared)} in the manifest"
                )
            shape.append(a if a != -1 else d)
        merged.append(TensorSpec(name=declared.name, datatype=declared.datatype, shape=shape))
    return merged


# -- shared skeletons ---------------------------------------------------------------------------
class RuntimeModel(ABC):
    """What the backends share: input checks, warm-up, error mapping, the closed state.

    Subclasses implement ``_run`` (safe to call from several threads at once) and ``_release``.
    """

    WARM_UP_RUNS: ClassVar[int] = 3

    def __init__(
        self,
        path: Path,
        inputs: list[TensorSpec],
        outputs: list[TensorSpec],
        runtime: str,
        *,
        dim_names: DimNames | None = None,
    ) -> None:
        self.path = path
        self.inputs = inputs
        self.outputs = outputs
        self.runtime = runtime
        # What the runtime says about which dynamic dimensions are one and the same (see
        # DimNames); empty where it cannot say.
        self.dim_names: dict[str, list[str | None]] = {
            k: list(v) for k, v in (dim_names or {}).items()
        }
        # Only names that stand at more than one axis constrain a request (checked per request).
        counts = Counter(n for axes in self.dim_names.values() for n in axes if n is not None)
        self._shared_dims: DimNames | None = (
            {
                k: [n if n is not None and counts[n] > 1 else None for n in axes]
                for k, axes in self.dim_names.items()
            }
            if any(c > 1 for c in counts.values())
            else None
        )
        self._closed = False
        for spec in inputs:
            if spec.datatype not in DATATYPES:
                raise FormatError(
                    f"{path}: input {spec.name!r} is {spec.datatype}, which the inference API "
                    "does not carry"
                )

    def restrict(self, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> None:
        """Adopt the manifest-checked metadata (see :func:`merge_with_manifest`)."""
        self.inputs, self.outputs = inputs, outputs

    def warm_up(self, progress: Callable[[float], None] | None = None) -> None:
        """Run zeros through the model a few times; the first run may build kernels or engines
        (TensorRT: minutes). ``progress`` gets 0.0 .. 1.0 on the calling (worker) thread."""
        feeds = warm_up_feeds(self.inputs)
        if progress:
            progress(0.0)
        for i in range(self.WARM_UP_RUNS):
            self.infer(feeds)
            if progress:
                progress((i + 1) / self.WARM_UP_RUNS)

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Check ``inputs``, run them, map the runtime's exceptions (see the module docstring).

        A runtime failure on inputs that fit every shape the model declares is the model's
        (ToolError), with one exception: where inputs differ in size at the same axis on
        dynamic dimensions the runtime does not name (OpenVINO and LiteRT never name them;
        ONNX files may leave them unnamed), the model may well need them equal, and nothing
        tells the request's mistake from the model's. That failure is taken to be the request's
        (InputShapeError): a client sending mismatched batches must not fail a good release's
        probation, while a model that fails on consistent input still does.
        """
        if self._closed:
            raise ToolError(f"{self.path.name}: the model is closed")
        feeds = check_inputs(self.inputs, inputs, self._shared_dims)
        try:
            return self._run(feeds)
        except EdgeAgentError:
            raise
        except Exception as exc:  # each runtime raises its own exception types
            clash = unnamed_disagreement(self.inputs, feeds, self.dim_names)
            if clash is not None:
                raise InputShapeError(
                    f"{self.path.name}: the runtime refused inputs that differ in size where "
                    f"the model may need them equal ({clash}): {_runtime_message(exc)}"
                ) from None
            raise ToolError(f"{self.path.name}: {self.runtime}: inference failed: {exc}") from None

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._release()

    @abstractmethod
    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    @abstractmethod
    def _release(self) -> None: ...


class BackendBase(ABC):
    """What the backends share: availability, version, and ``load`` on top of ``load_file``."""

    key: str
    formats: tuple[str, ...]
    modules: tuple[str, ...]  # importable runtime packages, any one suffices
    distributions: tuple[str, ...]  # their pip names, for the version
    settings_type: type[AnySettings]
    install_hint: str

    def __init__(self) -> None:
        self._available: bool | None = None

    def available(self) -> bool:
        if self._available is None:
            self._available = any(importlib.util.find_spec(m) is not None for m in self.modules)
        return self._available

    def version(self) -> str | None:
        for dist in self.distributions:
            try:
                return importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                continue
        return None

    def missing(self) -> ToolError:
        return ToolError(f"{self.key} is not installed; {self.install_hint}")

    def _settings(self, settings: _Settings) -> Any:
        if not isinstance(settings, self.settings_type):
            raise ConfigError(
                f"backend {self.key} takes {self.settings_type.__name__}, "
                f"not {type(settings).__name__}"
            )
        return settings

    def load(self, variant_dir: Path, variant: Variant, settings: _Settings) -> LoadedModel:
        if variant.format not in self.formats:
            raise ConfigError(
                f"backend {self.key} runs {', '.join(self.formats)} models, not {variant.format}"
            )
        root = Path(variant_dir)
        path = root / variant.entrypoint
        if not path.is_file():
            raise StorageError(f"{path}: the variant's entry file is missing")
        model = self.load_file(path, settings, inputs=variant.inputs)
        assert isinstance(model, RuntimeModel)
        try:
            model.restrict(
                merge_with_manifest("input", model.inputs, variant.inputs),
                merge_with_manifest("output", model.outputs, variant.outputs),
            )
        except FormatError as exc:
            model.close()
            raise FormatError(f"variant {variant.id}: {exc}") from None
        log.info("loaded %s (%s) with %s", variant.id, variant.format, model.runtime)
        return model

    @abstractmethod
    def load_file(
        self, path: Path, settings: _Settings, *, inputs: Sequence[TensorSpec] | None = None
    ) -> LoadedModel: ...
