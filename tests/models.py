"""Tiny models the tests build themselves (nothing is downloaded)."""

from __future__ import annotations

import hashlib
from pathlib import Path

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
    graph = helper.make_graph(
        [helper.make_node(op, ["x", "y"], ["z"], **({"axis": 1} if op == "Concat" else {}))],
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
    return np.maximum(x @ init["W"] + init["B"], 0)


def _tflite_weights(inputs: int, outputs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """W (inputs, outputs) and B (outputs,), drawn exactly as :func:`make_onnx` draws them."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((inputs, outputs)).astype(np.float32)
    b = rng.standard_normal((outputs,)).astype(np.float32)
    return w, b


def make_tflite(path: Path, *, inputs: int = 16, outputs: int = 8, seed: int = 1) -> Path:
    """y = relu(x @ W + B), x: FP32[1, inputs], y: FP32[1, outputs], as one FULLY_CONNECTED op.

    Built with the ``tflite`` flatbuffer bindings (no TensorFlow). W and B are the ones
    :func:`make_onnx` makes for the same seed, so :func:`reference` on that ONNX model is also
    this model's answer; :func:`reference_tflite` computes it from this file alone.
    """
    import flatbuffers
    import tflite

    w, b = _tflite_weights(inputs, outputs, seed)
    builder = flatbuffers.Builder(1024)

    def data_vector(data: bytes) -> int:
        # Tensor data 16-byte aligned, as the TFLite converter writes it.
        builder.StartVector(1, len(data), 16)
        builder.head -= len(data)
        builder.Bytes[builder.head : builder.head + len(data)] = data
        return builder.EndVector()

    def int_vector(start: object, values: list[int]) -> int:
        start(builder, len(values))  # type: ignore[operator]
        for v in reversed(values):
            builder.PrependInt32(v)
        return builder.EndVector()

    # Buffers: 0 is the empty buffer every tensor without constant data points at.
    buffer_data = [None, data_vector(np.ascontiguousarray(w.T).tobytes()), data_vector(b.tobytes())]
    buffers = []
    for data in buffer_data:
        tflite.BufferStart(builder)
        if data is not None:
            tflite.BufferAddData(builder, data)
        buffers.append(tflite.BufferEnd(builder))

    # Tensors: 0 x, 1 W ([outputs, inputs], as FULLY_CONNECTED wants), 2 B, 3 y.
    tensor_defs = [
        ("x", [1, inputs], 0),
        ("W", [outputs, inputs], 1),
        ("B", [outputs], 2),
        ("y", [1, outputs], 0),
    ]
    tensors = []
    for name, shape, buffer in tensor_defs:
        name_off = builder.CreateString(name)
        shape_off = int_vector(tflite.TensorStartShapeVector, shape)
        tflite.TensorStart(builder)
        tflite.TensorAddShape(builder, shape_off)
        tflite.TensorAddType(builder, tflite.TensorType.FLOAT32)
        tflite.TensorAddBuffer(builder, buffer)
        tflite.TensorAddName(builder, name_off)
        tensors.append(tflite.TensorEnd(builder))

    tflite.FullyConnectedOptionsStart(builder)
    tflite.FullyConnectedOptionsAddFusedActivationFunction(
        builder, tflite.ActivationFunctionType.RELU
    )
    options = tflite.FullyConnectedOptionsEnd(builder)
    op_inputs = int_vector(tflite.OperatorStartInputsVector, [0, 1, 2])
    op_outputs = int_vector(tflite.OperatorStartOutputsVector, [3])
    tflite.OperatorStart(builder)
    tflite.OperatorAddOpcodeIndex(builder, 0)
    tflite.OperatorAddInputs(builder, op_inputs)
    tflite.OperatorAddOutputs(builder, op_outputs)
    tflite.OperatorAddBuiltinOptionsType(builder, tflite.BuiltinOptions.FullyConnectedOptions)
    tflite.OperatorAddBuiltinOptions(builder, options)
    operator = tflite.OperatorEnd(builder)

    def table_vector(start: object, offsets: list[int]) -> int:
        start(builder, len(offsets))  # type: ignore[operator]
        for off in reversed(offsets):
            builder.PrependUOffsetTRelative(off)
        return builder.EndVector()

    tensors_off = table_vector(tflite.SubGraphStartTensorsVector, tensors)
    sg_inputs = int_vector(tflite.SubGraphStartInputsVector, [0])
    sg_outputs = int_vector(tflite.SubGraphStartOutputsVector, [3])
    operators_off = table_vector(tflite.SubGraphStartOperatorsVector, [operator])
    sg_name = builder.CreateString("main")
    tflite.SubGraphStart(builder)
    tflite.SubGraphAddTensors(builder, tensors_off)
    tflite.SubGraphAddInputs(builder, sg_inputs)
    tflite.SubGraphAddOutputs(builder, sg_outputs)
    tflite.SubGraphAddOperators(builder, operators_off)
    tflite.SubGraphAddName(builder, sg_name)
    subgraph = tflite.SubGraphEnd(builder)

    fc = tflite.BuiltinOperator.FULLY_CONNECTED  # 9: below 127, so both code fields hold it
    tflite.OperatorCodeStart(builder)
    tflite.OperatorCodeAddDeprecatedBuiltinCode(builder, fc)
    tflite.OperatorCodeAddBuiltinCode(builder, fc)
    tflite.OperatorCodeAddVersion(builder, 1)
    opcode = tflite.OperatorCodeEnd(builder)

    opcodes_off = table_vector(tflite.ModelStartOperatorCodesVector, [opcode])
    subgraphs_off = table_vector(tflite.ModelStartSubgraphsVector, [subgraph])
    buffers_off = table_vector(tflite.ModelStartBuffersVector, buffers)
    description = builder.CreateString("tiny")
    tflite.ModelStart(builder)
    tflite.ModelAddVersion(builder, 3)
    tflite.ModelAddOperatorCodes(builder, opcodes_off)
    tflite.ModelAddSubgraphs(builder, subgraphs_off)
    tflite.ModelAddDescription(builder, description)
    tflite.ModelAddBuffers(builder, buffers_off)
    model = tflite.ModelEnd(builder)
    builder.Finish(model, file_identifier=b"TFL3")
    Path(path).write_bytes(bytes(builder.Output()))
    return Path(path)


def make_tflite_add(path: Path) -> Path:
    """z = x + y, x, y and z FP32 [1, 4] with the shape signature [-1, 4] (a dynamic batch that
    the file does not name), as one ADD op."""
    import flatbuffers
    import tflite

    builder = flatbuffers.Builder(1024)

    def int_vector(start: object, values: list[int]) -> int:
        start(builder, len(values))  # type: ignore[operator]
        for v in reversed(values):
            builder.PrependInt32(v)
        return builder.EndVector()

    def table_vector(start: object, offsets: list[int]) -> int:
        start(builder, len(offsets))  # type: ignore[operator]
        for off in reversed(offsets):
            builder.PrependUOffsetTRelative(off)
        return builder.EndVector()

    tflite.BufferStart(builder)
    empty = tflite.BufferEnd(builder)
    tensors = []
    for name in ("x", "y", "z"):
        name_off = builder.CreateString(name)
        shape_off = int_vector(tflite.TensorStartShapeVector, [1, 4])
        signature_off = int_vector(tflite.TensorStartShapeSignatureVector, [-1, 4])
        tflite.TensorStart(builder)
        tflite.TensorAddShape(builder, shape_off)
        tflite.TensorAddShapeSignature(builder, signature_off)
        tflite.TensorAddType(builder, tflite.TensorType.FLOAT32)
        tflite.TensorAddBuffer(builder, 0)
        tflite.TensorAddName(builder, name_off)
        tensors.append(tflite.TensorEnd(builder))

    tflite.AddOptionsStart(builder)
    options = tflite.AddOptionsEnd(builder)
    op_inputs = int_vector(tflite.OperatorStartInputsVector, [0, 1])
    op_outputs = int_vector(tflite.OperatorStartOutputsVector, [2])
    tflite.OperatorStart(builder)
    tflite.OperatorAddOpcodeIndex(builder, 0)
    tflite.OperatorAddInputs(builder, op_inputs)
    tflite.OperatorAddOutputs(builder, op_outputs)
    tflite.OperatorAddBuiltinOptionsType(builder, tflite.BuiltinOptions.AddOptions)
    tflite.OperatorAddBuiltinOptions(builder, options)
    operator = tflite.OperatorEnd(builder)

    tensors_off = table_vector(tflite.SubGraphStartTensorsVector, tensors)
    sg_inputs = int_vector(tflite.SubGraphStartInputsVector, [0, 1])
    sg_outputs = int_vector(tflite.SubGraphStartOutputsVector, [2])
    operators_off = table_vector(tflite.SubGraphStartOperatorsVector, [operator])
    sg_name = builder.CreateString("main")
    tflite.SubGraphStart(builder)
    tflite.SubGraphAddTensors(builder, tensors_off)
    tflite.SubGraphAddInputs(builder, sg_inputs)
    tflite.SubGraphAddOutputs(builder, sg_outputs)
    tflite.SubGraphAddOperators(builder, operators_off)
    tflite.SubGraphAddName(builder, sg_name)
    subgraph = tflite.SubGraphEnd(builder)

    tflite.OperatorCodeStart(builder)
    tflite.OperatorCodeAddDeprecatedBuiltinCode(builder, tflite.BuiltinOperator.ADD)
    tflite.OperatorCodeAddBuiltinCode(builder, tflite.BuiltinOperator.ADD)
    tflite.OperatorCodeAddVersion(builder, 1)
    opcode = tflite.OperatorCodeEnd(builder)

    opcodes_off = table_vector(tflite.ModelStartOperatorCodesVector, [opcode])
    subgraphs_off = table_vector(tflite.ModelStartSubgraphsVector, [subgraph])
    buffers_off = table_vector(tflite.ModelStartBuffersVector, [empty])
    description = builder.CreateString("add")
    tflite.ModelStart(builder)
    tflite.ModelAddVersion(builder, 3)
    tflite.ModelAddOperatorCodes(builder, opcodes_off)
    tflite.ModelAddSubgraphs(builder, subgraphs_off)
    tflite.ModelAddDescription(builder, description)
    tflite.ModelAddBuffers(builder, buffers_off)
    model = tflite.ModelEnd(builder)
    builder.Finish(model, file_identifier=b"TFL3")
    Path(path).write_bytes(bytes(builder.Output()))
    return Path(path)


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
    return np.maximum(x @ consts["W"].T + consts["B"], 0)


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
        bundle_sha256=built.sha256,
        directory=dest,
        manifest=manifest,
        variant=manifest.variants[0],
        backend="onnxruntime",
        settings=OnnxRuntimeSettings(providers=["cpu"], intra_op_threads=intra_op_threads),
    )
