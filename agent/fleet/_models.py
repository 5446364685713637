"""Model files at build time: read their tensor metadata and run them on sample inputs.

Runs go through the device's own backends (``agent.runtime``), so a bundle's reference outputs
come from the same code that serves it. Each runtime is imported only when a model of its format
is seen, so building ONNX bundles needs neither OpenVINO nor LiteRT. Runs here are reference
runs on the build host's CPU, in full precision (OpenVINO is told f32 explicitly: on CPUs with
AMX or AVX512-BF16 it would otherwise compute in bf16).
"""

from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.bundle.manifest import TensorSpec
from agent.errors import FormatError, ToolError
from agent.runtime.base import (
    DATATYPES,
    AnySettings,
    LiteRtSettings,
    LoadedModel,
    OnnxRuntimeSettings,
    OpenVinoSettings,
    get_backend,
)

# KServe datatype -> numpy dtype name.
NUMPY_DTYPES: Mapping[str, str] = {k: v.name for k, v in DATATYPES.items()}

_ONNX_TYPES = {
    1: "FP32", 2: "UINT8", 3: "INT8", 4: "UINT16", 5: "INT16", 6: "INT32", 7: "INT64",
    8: "BYTES", 9: "BOOL", 10: "FP16", 11: "FP64", 12: "UINT32", 13: "UINT64", 16: "BF16",
}  # fmt: skip
_TFLITE_TYPES = {
    0: "FP32", 1: "FP16", 2: "INT32", 3: "UINT8", 4: "INT64", 5: "BYTES", 6: "BOOL", 7: "INT16",
    9: "INT8", 10: "FP64", 12: "UINT64", 15: "UINT32", 16: "UINT16",
}  # fmt: skip
_QUANT_OPS = {
    "QuantizeLinear",
    "DynamicQuantizeLinear",
    "MatMulInteger",
    "ConvInteger",
    "QLinearConv",
    "QLinearMatMul",
}
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$")


def _need(module: str, extra: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ToolError(
            f"{module} is not installed; install edge-model-agent[{extra}] to handle this model"
        ) from None


@dataclass(frozen=True)
class ModelFile:
    """A model as given on the command line: its format, files and tensors."""

    format: str  # "onnx" | "openvino-ir" | "tflite"
    path: Path  # the entry file
    files: tuple[Path, ...]  # the entry file and the files it needs (weights, external data)
    precision: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


def member_name(path: Path, fallback: str) -> str:
    return path.name if _SAFE_NAME.fullmatch(path.name) else fallback


def inspect_model(path: Path) -> ModelFile:
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: no such model file")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return _inspect_onnx(path)
    if suffix == ".xml":
        return _inspect_openvino(path)
    if suffix == ".tflite":
        return _inspect_tflite(path)
    raise FormatError(f"{path}: unknown model format (expected .onnx, .xml with .bin, or .tflite)")


def _inspect_onnx(path: Path) -> ModelFile:
    onnx = _need("onnx", "build")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises protobuf DecodeError and others
        raise FormatError(f"{path}: not a readable ONNX model: {exc}") from None
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    extra: list[Path] = []
    for init in graph.initializer:
        if init.data_location == 1:  # EXTERNAL
            location = next((e.value for e in init.external_data if e.key == "location"), "")
            ext = (path.parent / location).resolve()
            if not location or path.parent.resolve() not in ext.parents or not ext.is_file():
                raise FormatError(
                    f"{path}: external data {location!r} is not a file beside the model"
                )
            if ext not in extra:
                extra.append(ext)

    def spec(value: Any) -> TensorSpec:
        t = value.type.tensor_type
        dtype = _ONNX_TYPES.get(t.elem_type)
        if dtype is None:
            raise FormatError(f"{path}: tensor {value.name!r} has unsupported type {t.elem_type}")
        shape = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        return TensorSpec(name=value.name, datatype=dtype, shape=shape)  # type: ignore[arg-type]

    inputs = tuple(spec(v) for v in graph.input if v.name not in initializers)
    outputs = tuple(spec(v) for v in graph.output)
    ops = {n.op_type for n in graph.node}
    if ops & _QUANT_OPS:
        precision = "int8"
    elif any(t.datatype == "FP16" for t in inputs + outputs):
        precision = "fp16"
    else:
        precision = "fp32"
    return ModelFile("onnx", path, (path, *extra), precision, inputs, outputs)


def _inspect_openvino(path: Path) -> ModelFile:
    from agent.runtime.openvino import model_tensors

    weights = path.with_suffix(".bin")
    if not weights.is_file():
        raise FormatError(f"{path}: the OpenVINO weights {weights.name} are missing")
    inputs, outputs = model_tensors(path)
    types = {t.datatype for t in inputs + outputs}
    precision = "fp16" if "FP16" in types else "fp32"
    return ModelFile("openvino-ir", path, (path, weights), precision, tuple(inputs), tuple(outputs))


def _inspect_tflite(path: Path) -> ModelFile:
    tflite = _need("tflite", "build")
    buf = path.read_bytes()
    try:
        model = tflite.Model.GetRootAsModel(buf, 0)
        graph = model.Subgraphs(0)

        def spec(index: int) -> TensorSpec:
            t = graph.Tensors(index)
            dtype = _TFLITE_TYPES.get(t.Type())
            if dtype is None:
                raise FormatError(f"{path}: tensor {t.Name()!r} has an unsupported type")
            shape = (
                [int(d) for d in t.ShapeSignatureAsNumpy()]
                if t.ShapeSignatureLength()
                else [int(d) for d in t.ShapeAsNumpy()]
            )
            return TensorSpec(name=t.Name().decode(), datatype=dtype, shape=shape)  # type: ignore[arg-type]

        inputs = tuple(spec(graph.Inputs(i)) for i in range(graph.InputsLength()))
        outputs = tuple(spec(graph.Outputs(i)) for i in range(graph.OutputsLength()))
    except FormatError:
        raise
    except Exception as exc:  # flatbuffers raises struct.error, IndexError, ...
        raise FormatError(f"{path}: not a readable TFLite model: {exc}") from None
    types = {t.datatype for t in inputs + outputs}
    precision = "int8" if types & {"INT8", "UINT8"} else "fp16" if "FP16" in types else "fp32"
    return ModelFile("tflite", path, (path,), precision, inputs, outputs)


# -- reference runs -----------------------------------------------------------------------------
# Each format's backend, told to run on the CPU in full precision.
_REFERENCE: Mapping[str, tuple[str, AnySettings]] = {
    "onnx": ("onnxruntime", OnnxRuntimeSettings(providers=["cpu"])),
    "openvino-ir": ("openvino", OpenVinoSettings(device="CPU", precision="f32")),
    "tflite": ("litert", LiteRtSettings()),
}


class Runner:
    """Runs one model on the CPU; ``__call__`` maps input name -> array to output name -> array.

    Inputs are checked against the model's tensors (FormatError names the mismatch).
    """

    def __init__(self, model: ModelFile) -> None:
        self.model = model
        key, settings = _REFERENCE[model.format]
        self._loaded: LoadedModel = get_backend(key).load_file(model.path, settings)

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._loaded.infer(feeds)

    def close(self) -> None:
        self._loaded.close()


def quantize_int8(model: ModelFile, out: Path) -> Path:
    """ONNX Runtime dynamic quantization: int8 weights, activations quantized at run time."""
    quant = _need("onnxruntime.quantization", "cpu")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs advice on the root logger
    try:
        quant.quantize_dynamic(str(model.path), str(out), weight_type=quant.QuantType.QInt8)
    except Exception as exc:  # the quantizer raises many types
        raise ToolError(f"{model.path}: int8 quantization failed: {exc}") from None
    finally:
        root.setLevel(level)
    return out


def convert_openvino(model: ModelFile, out_xml: Path) -> Path:
    """Convert an ONNX model to OpenVINO IR, weights kept in fp32."""
    ov = _need("openvino", "openvino")
    try:
        converted = ov.convert_model(str(model.path))
        ov.save_model(converted, str(out_xml), compress_to_fp16=False)
    except Exception as exc:  # the converter raises many types
        raise ToolError(f"{model.path}: OpenVINO conversion failed: {exc}") from None
    return out_xml
