"""LiteRT: XNNPACK on and off, threads, dynamic batch, the lock, and the tflite-runtime fallback.

Real LiteRT on TFLite models written with the ``tflite`` flatbuffer package (no TensorFlow).
"""

from __future__ import annotations

import sys
import threading
import types
from pathlib import Path
from typing import Any

import flatbuffers
import numpy as np
import pytest
import tflite
from ai_edge_litert import interpreter as litert_interpreter

from agent.runtime.base import LiteRtSettings, get_backend
from agent.testing.models import _tflite_weights, make_onnx, make_tflite, reference
from tests.test_runtime_backends import lay_out


def make_dynamic_tflite(path: Path, *, inputs: int = 16, outputs: int = 8, seed: int = 1) -> Path:
    """:func:`tests.models.make_tflite` with a dynamic batch: shape [1, n], signature [-1, n]."""
    w, b = _tflite_weights(inputs, outputs, seed)
    fb = flatbuffers.Builder(1024)

    def ints(start: Any, values: list[int]) -> int:
        start(fb, len(values))
        for v in reversed(values):
            fb.PrependInt32(v)
        return fb.EndVector()

    def offsets(start: Any, values: list[int]) -> int:
        start(fb, len(values))
        for v in reversed(values):
            fb.PrependUOffsetTRelative(v)
        return fb.EndVector()

    def data(raw: bytes) -> int:
        fb.StartVector(1, len(raw), 16)
        fb.head -= len(raw)
        fb.Bytes[fb.head : fb.head + len(raw)] = raw
        return fb.EndVector()

    buffers = []
    for raw in (None, np.ascontiguousarray(w.T).tobytes(), b.tobytes()):
        vec = data(raw) if raw is not None else None
        tflite.BufferStart(fb)
        if vec is not None:
            tflite.BufferAddData(fb, vec)
        buffers.append(tflite.BufferEnd(fb))
    tensors = []
    for name, shape, signature, buffer in (
        ("x", [1, inputs], [-1, inputs], 0),
        ("W", [outputs, inputs], None, 1),
        ("B", [outputs], None, 2),
        ("y", [1, outputs], [-1, outputs], 0),
    ):
        name_off = fb.CreateString(name)
        shape_off = ints(tflite.TensorStartShapeVector, shape)
        sig_off = ints(tflite.TensorStartShapeSignatureVector, signature) if signature else None
        tflite.TensorStart(fb)
        tflite.TensorAddShape(fb, shape_off)
        if sig_off is not None:
            tflite.TensorAddShapeSignature(fb, sig_off)
        tflite.TensorAddType(fb, tflite.TensorType.FLOAT32)
        tflite.TensorAddBuffer(fb, buffer)
        tflite.TensorAddName(fb, name_off)
        tensors.append(tflite.TensorEnd(fb))
    tflite.FullyConnectedOptionsStart(fb)
    tflite.FullyConnectedOptionsAddFusedActivationFunction(fb, tflite.ActivationFunctionType.RELU)
    fc_options = tflite.FullyConnectedOptionsEnd(fb)
    op_in = ints(tflite.OperatorStartInputsVector, [0, 1, 2])
    op_out = ints(tflite.OperatorStartOutputsVector, [3])
    tflite.OperatorStart(fb)
    tflite.OperatorAddOpcodeIndex(fb, 0)
    tflite.OperatorAddInputs(fb, op_in)
    tflite.OperatorAddOutputs(fb, op_out)
    tflite.OperatorAddBuiltinOptionsType(fb, tflite.BuiltinOptions.FullyConnectedOptions)
    tflite.OperatorAddBuiltinOptions(fb, fc_options)
    operator = tflite.OperatorEnd(fb)
    tensors_off = offsets(tflite.SubGraphStartTensorsVector, tensors)
    sg_in = ints(tflite.SubGraphStartInputsVector, [0])
    sg_out = ints(tflite.SubGraphStartOutputsVector, [3])
    ops_off = offsets(tflite.SubGraphStartOperatorsVector, [operator])
    tflite.SubGraphStart(fb)
    tflite.SubGraphAddTensors(fb, tensors_off)
    tflite.SubGraphAddInputs(fb, sg_in)
    tflite.SubGraphAddOutputs(fb, sg_out)
    tflite.SubGraphAddOperators(fb, ops_off)
    subgraph = tflite.SubGraphEnd(fb)
    tflite.OperatorCodeStart(fb)
    tflite.OperatorCodeAddDeprecatedBuiltinCode(fb, tflite.BuiltinOperator.FULLY_CONNECTED)
    tflite.OperatorCodeAddBuiltinCode(fb, tflite.BuiltinOperator.FULLY_CONNECTED)
    tflite.OperatorCodeAddVersion(fb, 1)
    opcode = tflite.OperatorCodeEnd(fb)
    opcodes_off = offsets(tflite.ModelStartOperatorCodesVector, [opcode])
    subgraphs_off = offsets(tflite.ModelStartSubgraphsVector, [subgraph])
    buffers_off = offsets(tflite.ModelStartBuffersVector, buffers)
    tflite.ModelStart(fb)
    tflite.ModelAddVersion(fb, 3)
    tflite.ModelAddOperatorCodes(fb, opcodes_off)
    tflite.ModelAddSubgraphs(fb, subgraphs_off)
    tflite.ModelAddBuffers(fb, buffers_off)
    fb.Finish(tflite.ModelEnd(fb), file_identifier=b"TFL3")
    path.write_bytes(bytes(fb.Output()))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("litert")
    return {
        "static": make_tflite(d / "tiny.tflite"),
        "dynamic": make_dynamic_tflite(d / "dynamic.tflite"),
        "onnx": make_onnx(d / "tiny.onnx"),
    }


def test_xnnpack_on_and_off(models: dict[str, Path]) -> None:
    backend = get_backend("litert")
    x = np.random.default_rng(4).standard_normal((1, 16)).astype(np.float32)
    want = reference(models["onnx"], x)
    on = backend.load_file(models["static"], LiteRtSettings(xnnpack=True))
    off = backend.load_file(models["static"], LiteRtSettings(xnnpack=False))
    # What ``runtime`` says is read from the interpreter's execution plan (a DELEGATE node).
    assert " xnnpack " in on.runtime
    assert " builtin " in off.runtime
    for model in (on, off):
        np.testing.assert_allclose(model.infer({"x": x})["y"], want, atol=1e-5)


def test_threads_and_op_resolver_reach_the_interpreter(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[dict[str, Any]] = []
    real = litert_interpreter.Interpreter

    class Recording(real):  # type: ignore[misc, valid-type]
        def __init__(self, **kwargs: Any) -> None:
            seen.append(kwargs)
            super().__init__(**kwargs)

    monkeypatch.setattr(litert_interpreter, "Interpreter", Recording)
    model = get_backend("litert").load_file(
        models["static"], LiteRtSettings(threads=2, xnnpack=False)
    )
    resolver = litert_interpreter.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    assert seen == [
        {
            "model_path": str(models["static"]),
            "num_threads": 2,
            "experimental_op_resolver_type": resolver,
        }
    ]
    assert model.runtime.endswith(" builtin 2 threads")
    get_backend("litert").load_file(models["static"], LiteRtSettings())
    assert "num_threads" not in seen[1]  # 0: LiteRT's own choice
    assert seen[1]["experimental_op_resolver_type"] == litert_interpreter.OpResolverType.AUTO


def test_dynamic_batch_is_resized_per_request(models: dict[str, Path], tmp_path: Path) -> None:
    variant = lay_out(models["dynamic"], tmp_path, "tflite-fp32")
    assert variant.inputs[0].shape == [-1, 16]
    model = get_backend("litert").load(tmp_path, variant, LiteRtSettings())
    assert model.inputs[0].shape == [-1, 16]
    rng = np.random.default_rng(9)
    for n in (1, 3, 5, 1, 2):
        x = rng.standard_normal((n, 16)).astype(np.float32)
        y = model.infer({"x": x})["y"]
        assert y.shape == (n, 8)
        np.testing.assert_allclose(y, reference(models["onnx"], x), atol=1e-5)


def test_concurrent_requests_of_different_batch_sizes(models: dict[str, Path]) -> None:
    """Resizing and running share the interpreter's buffers: the lock keeps each request whole."""
    model = get_backend("litert").load_file(models["dynamic"], LiteRtSettings())
    failures: list[BaseException] = []

    def worker(n: int) -> None:
        rng = np.random.default_rng(n)
        try:
            for _ in range(30):
                x = rng.standard_normal((n, 16)).astype(np.float32)
                np.testing.assert_allclose(
                    model.infer({"x": x})["y"], reference(models["onnx"], x), atol=1e-5
                )
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in (1, 2, 3, 4, 5, 6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


def test_falls_back_to_tflite_runtime(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A box where LiteRT has no wheel. tflite-runtime cannot be installed beside numpy 2 here,
    so a stand-in module named ``tflite_runtime.interpreter`` offers LiteRT's Interpreter under
    the old name; the backend must find it once ai_edge_litert fails to import."""
    fake = types.ModuleType("tflite_runtime.interpreter")
    fake.Interpreter = litert_interpreter.Interpreter  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    monkeypatch.setitem(sys.modules, "tflite_runtime", types.ModuleType("tflite_runtime"))
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", fake)
    model = get_backend("litert").load_file(models["static"], LiteRtSettings())
    assert model.runtime.startswith("tflite-runtime ")
    x = np.ones((1, 16), np.float32)
    np.testing.assert_allclose(model.infer({"x": x})["y"], reference(models["onnx"], x), atol=1e-5)
