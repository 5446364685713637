"""Tiny models the tests build themselves (nothing is downloaded)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from agent.bundle.unpack import unpack_bundle
from agent.fleet.build import BuildOptions, build_bundle
from agent.runtime.base import OnnxRuntimeSettings
from agent.serving.slots import Candidate


def make_onnx(
    path: Path, *, inputs: int = 16, outputs: int = 8, seed: int = 1, scale: float = 1.0
) -> Path:
    """y = relu(x @ W + B), x: FP32[N, inputs], y: FP32[N, outputs]."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(
        (rng.standard_normal((inputs, outputs)) * scale).astype(np.float32), "W"
    )
    b = numpy_helper.from_array(rng.standard_normal((outputs,)).astype(np.float32), "B")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"]),
            helper.make_node("Add", ["h", "B"], ["h2"]),
            helper.make_node("Relu", ["h2"], ["y"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", inputs])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", outputs])],
        [w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def make_batch_of_one(path: Path) -> Path:
    """y = reshape(relu(x @ W + B), [1, 8]): right for one row, an error for more.

    Its self-test (one-row samples) passes; real traffic with batches fails.
    """
    rng = np.random.default_rng(9)
    w = numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.standard_normal((8,)).astype(np.float32), "B")
    shape = numpy_helper.from_array(np.array([1, 8], dtype=np.int64), "S")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"]),
            helper.make_node("Add", ["h", "B"], ["h2"]),
            helper.make_node("Relu", ["h2"], ["h3"]),
            helper.make_node("Reshape", ["h3", "S"], ["y"]),
        ],
        "one-row",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        [w, b, shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def make_two_inputs(
    path: Path, *, op: str = "Add", dims: tuple[str | int | None, str | int | None] = ("N", "N")
) -> Path:
    """z = x + y (``op="Add"``) or z = concat(x, y) on axis 1 (``op="Concat"``), x and y FP32
    [d, 4] with the leading dimensions ``dims``: named (the same name: one shared batch),
    unnamed (None) or fixed (an int)."""
    out: list[str | int | None] = [dims[0], 4 if op == "Add" else 8]
    attributes: dict[str, Any] = {"axis": 1} if op == "Concat" else {}
    graph = helper.make_graph(
        [helper.make_node(op, ["x", "y"], ["z"], **attributes)],
        "two-inputs",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [dims[0], 4]),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [dims[1], 4]),
        ],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, out)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def reference(path: Path, x: np.ndarray) -> np.ndarray:
    """The numpy answer for a model made by :func:`make_onnx`."""
    model = onnx.load(str(path))
    init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    y: np.ndarray = np.maximum(x @ init["W"] + init["B"], 0)
    return y


def _tflite_weights(inputs: int, outputs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """W (inputs, outputs) and B (outputs,), drawn exactly as :func:`make_onnx` draws them."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((inputs, outputs)).astype(np.float32)
    b = rng.standard_normal((outputs,)).astype(np.float32)
    return w, b


class _Flat:
    """What both TFLite models need of the ``tflite`` flatbuffer bindings: vectors, tensors, and
    the model around one operator in one subgraph."""

    def __init__(self) -> None:
        import flatbuffers
        import tflite

        self.tflite = tflite
        self.builder = flatbuffers.Builder(1024)

    def ints(self, start: object, values: list[int]) -> int:
        start(self.builder, len(values))  # type: ignore[operator]
        for v in reversed(values):
            self.builder.PrependInt32(v)
        return int(self.builder.EndVector())

    def tables(self, start: object, offsets: list[int]) -> int:
        start(self.builder, len(offsets))  # type: ignore[operator]
        for off in reversed(offsets):
            self.builder.PrependUOffsetTRelative(off)
        return int(self.builder.EndVector())

    def data(self, data: bytes) -> int:
        # Tensor data 16-byte aligned, as the TFLite converter writes it.
        b = self.builder
        b.StartVector(1, len(data), 16)
        b.head -= len(data)
        b.Bytes[b.head : b.head + len(data)] = data
        return int(b.EndVector())

    def buffer(self, data: int | None = None) -> int:
        t = self.tflite
        t.BufferStart(self.builder)
        if data is not None:
            t.BufferAddData(self.builder, data)
        return int(t.BufferEnd(self.builder))

    def tensor(self, name: str, shape: list[int], buffer: int, signature: list[int] | None) -> int:
        t, b = self.tflite, self.builder
        name_off = b.CreateString(name)
        shape_off = self.ints(t.TensorStartShapeVector, shape)
        sig_off = (
            None if signature is None else self.ints(t.TensorStartShapeSignatureVector, signature)
        )
        t.TensorStart(b)
        t.TensorAddShape(b, shape_off)
        if sig_off is not None:
            t.TensorAddShapeSignature(b, sig_off)
        t.TensorAddType(b, t.TensorType.FLOAT32)
        t.TensorAddBuffer(b, buffer)
        t.TensorAddName(b, name_off)
        return int(t.TensorEnd(b))

    def write(
        self,
        path: Path,
        *,
        code: int,
        options_type: int,
        options: int,
        tensors: list[int],
        op_io: tuple[list[int], list[int]],
        graph_io: tuple[list[int], list[int]],
        buffers: list[int],
        description: str,
    ) -> Path:
        """One operator (``code``, below 127 so both code fields hold it) in one subgraph."""
        t, b = self.tflite, self.builder
        op_inputs = self.ints(t.OperatorStartInputsVector, op_io[0])
        op_outputs = self.ints(t.OperatorStartOutputsVector, op_io[1])
        t.OperatorStart(b)
        t.OperatorAddOpcodeIndex(b, 0)
        t.OperatorAddInputs(b, op_inputs)
        t.OperatorAddOutputs(b, op_outputs)
        t.OperatorAddBuiltinOptionsType(b, options_type)
        t.OperatorAddBuiltinOptions(b, options)
        operator = t.OperatorEnd(b)

        tensors_off = self.tables(t.SubGraphStartTensorsVector, tensors)
        sg_inputs = self.ints(t.SubGraphStartInputsVector, graph_io[0])
        sg_outputs = self.ints(t.SubGraphStartOutputsVector, graph_io[1])
        operators_off = self.tables(t.SubGraphStartOperatorsVector, [operator])
        sg_name = b.CreateString("main")
        t.SubGraphStart(b)
        t.SubGraphAddTensors(b, tensors_off)
        t.SubGraphAddInputs(b, sg_inputs)
        t.SubGraphAddOutputs(b, sg_outputs)
        t.SubGraphAddOperators(b, operators_off)
        t.SubGraphAddName(b, sg_name)
        subgraph = t.SubGraphEnd(b)

        t.OperatorCodeStart(b)
        t.OperatorCodeAddDeprecatedBuiltinCode(b, code)
        t.OperatorCodeAddBuiltinCode(b, code)
        t.OperatorCodeAddVersion(b, 1)
        opcode = t.OperatorCodeEnd(b)

        opcodes_off = self.tables(t.ModelStartOperatorCodesVector, [opcode])
        subgraphs_off = self.tables(t.ModelStartSubgraphsVector, [subgraph])
        buffers_off = self.tables(t.ModelStartBuffersVector, buffers)
        description_off = b.CreateString(description)
        t.ModelStart(b)
        t.ModelAddVersion(b, 3)
        t.ModelAddOperatorCodes(b, opcodes_off)
        t.ModelAddSubgraphs(b, subgraphs_off)
        t.ModelAddDescription(b, description_off)
        t.ModelAddBuffers(b, buffers_off)
        model = t.ModelEnd(b)
        b.Finish(model, file_identifier=b"TFL3")
        Path(path).write_bytes(bytes(b.Output()))
        return Path(path)


def make_tflite(path: Path, *, inputs: int = 16, outputs: int = 8, seed: int = 1) -> Path:
    """y = relu(x @ W + B), x: FP32[1, inputs], y: FP32[1, outputs], as one FULLY_CONNECTED op.

    Built with the ``tflite`` flatbuffer bindings (no TensorFlow). W and B are the ones
    :func:`make_onnx` makes for the same seed, so :func:`reference` on that ONNX model is also
    this model's answer; :func:`reference_tflite` computes it from this file alone.
    """
    f = _Flat()
    t, b = f.tflite, f.builder
    w, bias = _tflite_weights(inputs, outputs, seed)
    # Buffers: 0 is the empty buffer every tensor without constant data points at.
    weights = f.data(np.ascontiguousarray(w.T).tobytes())
    biases = f.data(bias.tobytes())
    buffers = [f.buffer(), f.buffer(weights), f.buffer(biases)]
    # Tensors: 0 x, 1 W ([outputs, inputs], as FULLY_CONNECTED wants), 2 B, 3 y.
    tensors = [
        f.tensor("x", [1, inputs], 0, None),
        f.tensor("W", [outputs, inputs], 1, None),
        f.tensor("B", [outputs], 2, None),
        f.tensor("y", [1, outputs], 0, None),
    ]
    t.FullyConnectedOptionsStart(b)
    t.FullyConnectedOptionsAddFusedActivationFunction(b, t.ActivationFunctionType.RELU)
    options = t.FullyConnectedOptionsEnd(b)
    return f.write(
        path,
        code=t.BuiltinOperator.FULLY_CONNECTED,
        options_type=t.BuiltinOptions.FullyConnectedOptions,
        options=options,
        tensors=tensors,
        op_io=([0, 1, 2], [3]),
        graph_io=([0], [3]),
        buffers=buffers,
        description="tiny",
    )


def make_tflite_add(path: Path) -> Path:
    """z = x + y, x, y and z FP32 [1, 4] with the shape signature [-1, 4] (a dynamic batch that
    the file does not name), as one ADD op."""
    f = _Flat()
    t, b = f.tflite, f.builder
    buffers = [f.buffer()]
    tensors = [f.tensor(name, [1, 4], 0, [-1, 4]) for name in ("x", "y", "z")]
    t.AddOptionsStart(b)
    options = t.AddOptionsEnd(b)
    return f.write(
        path,
        code=t.BuiltinOperator.ADD,
        options_type=t.BuiltinOptions.AddOptions,
        options=options,
        tensors=tensors,
        op_io=([0, 1], [2]),
        graph_io=([0, 1], [2]),
        buffers=buffers,
        description="add",
    )


def reference_tflite(path: Path, x: np.ndarray) -> np.ndarray:
    """The numpy answer for a model made by :func:`make_tflite`, read back from the file."""
    import tflite

    model = tflite.Model.GetRootAsModel(Path(path).read_bytes(), 0)
    graph = model.Subgraphs(0)
    consts = {}
    for i in range(graph.TensorsLength()):
        t = graph.Tensors(i)
        data = model.Buffers(t.Buffer()).DataAsNumpy()
        if t.Buffer() and not isinstance(data, int):
            shape = tuple(int(d) for d in t.ShapeAsNumpy())
            consts[t.Name().decode()] = np.frombuffer(data.tobytes(), "<f4").reshape(shape)
    y: np.ndarray = np.maximum(x @ consts["W"].T + consts["B"], 0)
    return y


def slot_candidate(
    model: Path, workdir: Path, *, version: str, name: str = "tiny", intra_op_threads: int = 0
) -> Candidate:
    """Build ``model`` into a bundle (with self-test samples), unpack it as a device does, and
    describe it for the slot layer (ONNX Runtime on the CPU)."""
    built = build_bundle(
        [model], workdir / f"{name}-{version}.emb", BuildOptions(name=name, version=version)
    )
    dest = workdir / f"unpacked-{name}-{version}"
    manifest = unpack_bundle(
        built.path, dest, manifest_sha256=hashlib.sha256(built.manifest.to_bytes()).hexdigest()
    )
    return Candidate(
        name=name,
        version=version,
        release=manifest.release,
        bundle_sha256=built.sha256,
        directory=dest,
        manifest=manifest,
        variant=manifest.variants[0],
        backend="onnxruntime",
        settings=OnnxRuntimeSettings(providers=["cpu"], intra_op_threads=intra_op_threads),
    )
