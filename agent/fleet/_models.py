"""Model files at build time: read their tensor metadata and run them on sample inputs.

Each runtime is imported only when a model of its format is seen, so building ONNX bundles needs
neither OpenVINO nor LiteRT. Runs here are reference runs on the build host's CPU, in full
precision (OpenVINO is told f32 explicitly: on CPUs with AMX it would otherwise compute in bf16).
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

NUMPY_DTYPES: Mapping[str, str] = {
    "BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32",
    "UINT64": "uint64", "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64",
    "FP16": "float16", "FP32": "float32", "FP64": "float64",
}  # fmt: skip

_ONNX_TYPES = {
    1: "FP32", 2: "UINT8", 3: "INT8", 4: "UINT16", 5: "INT16", 6: "INT32", 7: "INT64",
    8: "BYTES", 9: "BOOL", 10: "FP16", 11: "FP64", 12: "UINT32", 13: "UINT64", 16: "BF16",
}  # fmt: skip
_OV_TYPES = {
    "f32": "FP32", "f16": "FP16", "f64": "FP64", "bf16": "BF16", "i8": "INT8", "u8": "UINT8",
    "i16": "INT16", "u16": "UINT16", "i32": "INT32", "u32": "UINT32", "i64": "INT64",
    "u64": "UINT64", "boolean": "BOOL", "string": "BYTES",
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
    ov = _need("openvino", "openvino")
    weights = path.with_suffix(".bin")
    if not weights.is_file():
        raise FormatError(f"{path}: the OpenVINO weights {weights.name} are missing")
    try:
        model = ov.Core().read_model(str(path), str(weights))
    except Exception as exc:  # OpenVINO raises RuntimeError subclasses
        raise FormatError(f"{path}: not a readable OpenVINO IR: {exc}") from None

    def spec(port: Any) -> TensorSpec:
        dtype = _OV_TYPES.get(port.get_element_type().get_type_name())
        if dtype is None:
            raise FormatError(f"{path}: tensor {port.get_any_name()!r} has an unsupported type")
        shape = [d.get_length() if d.is_static else -1 for d in port.get_partial_shape()]
        return TensorSpec(name=port.get_any_name(), datatype=dtype, shape=shape)  # type: ignore[arg-type]

    inputs = tuple(spec(p) for p in model.inputs)
    outputs = tuple(spec(p) for p in model.outputs)
    types = {t.datatype for t in inputs + outputs}
    precision = "fp16" if "FP16" in types else "fp32"
    return ModelFile("openvino-ir", path, (path, weights), precision, inputs, outputs)


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
class Runner:
    """Runs one model on the CPU; ``__call__`` maps input name -> array to output name -> array."""

    def __init__(self, model: ModelFile) -> None:
        self.model = model
        try:
            self._run = {"onnx": _onnx, "openvino-ir": _openvino, "tflite": _tflite}[model.format](
                model
            )
        except ToolError:
            raise
        except Exception as exc:  # runtimes raise their own exception types
            raise ToolError(f"{model.path}: the runtime cannot load the model: {exc}") from None

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            out = self._run(feeds)
        except Exception as exc:  # runtimes raise their own exception types
            raise ToolError(f"{self.model.path}: inference failed: {exc}") from None
        return {name: np.asarray(v) for name, v in out.items()}


def _onnx(model: ModelFile) -> Any:
    ort = _need("onnxruntime", "cpu")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(model.path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]

    def run(feeds: Mapping[str, np.ndarray]) -> dict[str, Any]:
        return dict(zip(names, session.run(names, dict(feeds)), strict=True))

    return run


def _openvino(model: ModelFile) -> Any:
    ov = _need("openvino", "openvino")
    core = ov.Core()
    compiled = core.compile_model(str(model.path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})

    def run(feeds: Mapping[str, np.ndarray]) -> dict[str, Any]:
        result = compiled(dict(feeds))
        return {port.get_any_name(): result[port] for port in compiled.outputs}

    return run


def _tflite(model: ModelFile) -> Any:
    try:
        interpreter_mod = importlib.import_module("ai_edge_litert.interpreter")
    except ImportError:
        interpreter_mod = _need("tflite_runtime.interpreter", "tflite")
    interpreter = interpreter_mod.Interpreter(model_path=str(model.path))
    interpreter.allocate_tensors()
    ins = {d["name"]: d["index"] for d in interpreter.get_input_details()}
    outs = {d["name"]: d["index"] for d in interpreter.get_output_details()}

    def run(feeds: Mapping[str, np.ndarray]) -> dict[str, Any]:
        for name, value in feeds.items():
            if tuple(value.shape) != tuple(interpreter.get_tensor(ins[name]).shape):
                interpreter.resize_tensor_input(ins[name], value.shape)
                interpreter.allocate_tensors()
            interpreter.set_tensor(ins[name], value)
        interpreter.invoke()
        return {name: interpreter.get_tensor(index).copy() for name, index in outs.items()}

    return run


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
