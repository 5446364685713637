"""Tiny models the tests build themselves (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def make_onnx(path: Path, *, inputs: int = 16, outputs: int = 8, seed: int = 1, scale: float = 1.0) -> Path:
    """y = relu(x @ W + B), x: FP32[N, inputs], y: FP32[N, outputs]."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array((rng.standard_normal((inputs, outputs)) * scale).astype(np.float32), "W")
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


def reference(path: Path, x: np.ndarray) -> np.ndarray:
    """The numpy answer for a model made by :func:`make_onnx`."""
    model = onnx.load(str(path))
    init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return np.maximum(x @ init["W"] + init["B"], 0)
