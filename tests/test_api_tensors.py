"""Request decoding and response encoding (agent.serving.tensors) for what the end-to-end tests
do not reach with a real model: BYTES and BOOL tensors, nested JSON data, scalars, FP16."""

from __future__ import annotations

import json
import re
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from agent.bundle.manifest import TensorSpec
from agent.errors import FormatError, InputShapeError, SizeLimitError
from agent.serving.tensors import InferRequest, decode_request, decompress, encode_response


@dataclass
class Spec:
    """Metadata only: decode_request never runs the model."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec] = field(
        default_factory=lambda: [TensorSpec(name="out", datatype="FP32", shape=[-1])]
    )
    name: str = "m"
    version: str = "1.0.0"
    platform: str = "onnxruntime_onnx"

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise AssertionError("not called")


def spec(name: str, datatype: str, shape: list[int]) -> Spec:
    return Spec([TensorSpec(name=name, datatype=datatype, shape=shape)])  # type: ignore[arg-type]


def binary_body(doc: dict[str, Any], *raw: bytes) -> tuple[bytes, int]:
    head = json.dumps(doc).encode()
    return head + b"".join(raw), len(head)


def bytes_wire(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def test_bytes_tensors_binary_and_json() -> None:
    model = spec("s", "BYTES", [-1])
    items = [b"hello", b"", b"\xff\x00raw"]
    body, n = binary_body(
        {
            "inputs": [
                {
                    "name": "s",
                    "shape": [3],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(bytes_wire(items))},
                }
            ]
        },
        bytes_wire(items),
    )
    request = decode_request(body, n, model)
    assert request.inputs["s"].tolist() == items

    doc = {"inputs": [{"name": "s", "shape": [1, 2], "datatype": "BYTES", "data": [["a", "é"]]}]}
    model = spec("s", "BYTES", [1, 2])
    assert decode_request(json.dumps(doc).encode(), None, model).inputs["s"].tolist() == [
        [b"a", "é".encode()]
    ]

    short = bytes_wire(items)[:-2]
    body, n = binary_body(
        {
            "inputs": [
                {
                    "name": "s",
                    "shape": [3],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(short)},
                }
            ]
        },
        short,
    )
    with pytest.raises(FormatError, match="runs past its data"):
        decode_request(body, n, spec("s", "BYTES", [-1]))
    doc = {"inputs": [{"name": "s", "shape": [2], "datatype": "BYTES", "data": ["a", 1]}]}
    with pytest.raises(FormatError, match="strings only"):
        decode_request(json.dumps(doc).encode(), None, spec("s", "BYTES", [-1]))


def test_bool_fp16_nested_and_scalar_inputs() -> None:
    body, n = binary_body(
        {
            "inputs": [
                {
                    "name": "b",
                    "shape": [3],
                    "datatype": "BOOL",
                    "parameters": {"binary_data_size": 3},
                }
            ]
        },
        b"\x01\x00\x01",
    )
    assert decode_request(body, n, spec("b", "BOOL", [3])).inputs["b"].tolist() == [
        True,
        False,
        True,
    ]
    body, n = binary_body(
        {
            "inputs": [
                {
                    "name": "b",
                    "shape": [1],
                    "datatype": "BOOL",
                    "parameters": {"binary_data_size": 1},
                }
            ]
        },
        b"\x07",
    )
    with pytest.raises(FormatError, match="0 or 1"):
        decode_request(body, n, spec("b", "BOOL", [1]))
    doc = {"inputs": [{"name": "b", "shape": [2], "datatype": "BOOL", "data": [1, 0]}]}
    with pytest.raises(FormatError, match="true or false only"):
        decode_request(json.dumps(doc).encode(), None, spec("b", "BOOL", [2]))

    doc = {
        "inputs": [{"name": "h", "shape": [2, 2], "datatype": "FP16", "data": [[1, 2.5], [3, -4]]}]
    }
    array = decode_request(json.dumps(doc).encode(), None, spec("h", "FP16", [2, -1])).inputs["h"]
    assert array.dtype == np.float16
    assert array.tolist() == [[1.0, 2.5], [3.0, -4.0]]
    doc["inputs"][0]["data"] = [[1, 2.5, 3, -4]]  # four elements, nested the wrong way
    with pytest.raises(FormatError, match=r"nested as \[1, 4\]"):
        decode_request(json.dumps(doc).encode(), None, spec("h", "FP16", [2, -1]))

    doc = {"inputs": [{"name": "k", "shape": [], "datatype": "INT64", "data": 5}]}
    assert (
        decode_request(json.dumps(doc).encode(), None, spec("k", "INT64", [])).inputs["k"].shape
        == ()
    )

    doc = {"inputs": [{"name": "u", "shape": [2], "datatype": "UINT8", "data": [0, 256]}]}
    with pytest.raises(FormatError, match="out of range for UINT8"):
        decode_request(json.dumps(doc).encode(), None, spec("u", "UINT8", [2]))
    doc = {"inputs": [{"name": "u", "shape": [1], "datatype": "UINT8", "data": [-1]}]}
    with pytest.raises(FormatError, match="out of range for UINT8"):
        decode_request(json.dumps(doc).encode(), None, spec("u", "UINT8", [1]))


def test_binary_inputs_are_writable_and_aligned() -> None:
    x = np.arange(6, dtype=np.float64)
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": [6],
                    "datatype": "FP64",
                    "parameters": {"binary_data_size": 48},
                }
            ]
        }
    ).encode()
    head += b" " * (1 - len(head) % 2)  # an odd offset for the raw part
    for body in (head + x.tobytes(), bytearray(head + x.tobytes())):
        array = decode_request(body, len(head), spec("x", "FP64", [-1])).inputs["x"]
        assert array.flags.aligned
        assert array.flags.writeable
        np.testing.assert_array_equal(array, x)


def test_outputs_binary_json_and_model_mistakes() -> None:
    request = InferRequest(id="r", inputs={}, outputs=[("t", True), ("n", False), ("u", False)])
    results = {
        "t": np.array([b"ab", b"\xff"], dtype=np.object_),
        "n": np.array([[1, 2]], dtype=np.int16),
        "u": np.array(["x"], dtype=np.object_),
    }
    encoded = encode_response(model_name="m", model_version="2", request=request, results=results)
    assert encoded.header_length is not None
    doc = json.loads(encoded.body[: encoded.header_length])
    assert doc["id"] == "r"
    assert doc["outputs"] == [
        {"name": "t", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": 11}},
        {"name": "n", "datatype": "INT16", "shape": [1, 2], "data": [1, 2]},
        {"name": "u", "datatype": "BYTES", "shape": [1], "data": ["x"]},
    ]
    assert encoded.body[encoded.header_length :] == bytes_wire([b"ab", b"\xff"])

    as_json = InferRequest(id=None, inputs={}, outputs=[("t", False)])
    with pytest.raises(FormatError, match="binary_data: true"):
        encode_response(model_name="m", model_version="2", request=as_json, results=results)
    with pytest.raises(KeyError):
        encode_response(
            model_name="m",
            model_version="2",
            request=InferRequest(id=None, inputs={}, outputs=[("missing", False)]),
            results=results,
        )
    with pytest.raises(TypeError, match="complex"):
        encode_response(
            model_name="m",
            model_version="2",
            request=InferRequest(id=None, inputs={}, outputs=[("c", True)]),
            results={"c": np.zeros(2, np.complex64)},
        )


def test_decompress_is_bounded() -> None:
    data = b"x" * 10_000
    assert decompress(zlib.compress(data), "deflate", 10_000) == data
    with pytest.raises(SizeLimitError):
        decompress(zlib.compress(data), "deflate", 9_999)
    with pytest.raises(FormatError, match="one complete"):
        decompress(zlib.compress(data)[:-3], "deflate", 10_000)
    assert decompress(b"as is", None, 5) == b"as is"


def _json_body(datatype: str, shape: list[int], data: str) -> bytes:
    return (
        f'{{"inputs": [{{"name": "v", "shape": {shape}, "datatype": "{datatype}", '
        f'"data": {data}}}]}}'
    ).encode()


@pytest.mark.parametrize(
    ("datatype", "data", "words"),
    [
        ("FP16", "[1.0, 1e6]", "out of range for FP16 (at most 65504 in magnitude)"),
        ("FP16", "[70000, 1]", "out of range for FP16"),
        ("FP32", "[-1e39, 0]", "out of range for FP32"),
        ("FP64", "[1e400, 0]", "out of range for FP64"),
        ("FP64", "[NaN, 0]", "NaN is not valid JSON: JSON numbers are finite"),
        ("FP32", "[Infinity, 0]", "Infinity is not valid JSON"),
    ],
)
def test_json_numbers_must_fit_the_datatype(datatype: str, data: str, words: str) -> None:
    with pytest.raises(FormatError, match=re.escape(words)):
        decode_request(_json_body(datatype, [2], data), None, spec("v", datatype, [2]))


def test_json_numbers_at_the_datatype_limits_are_taken() -> None:
    array = decode_request(_json_body("FP16", [2], "[65504, -65504]"), None, spec("v", "FP16", [2]))
    assert array.inputs["v"].tolist() == [65504.0, -65504.0]
    array = decode_request(
        _json_body("FP32", [2], "[3.4028234e38, 1e-50]"), None, spec("v", "FP32", [2])
    )
    assert np.isfinite(array.inputs["v"]).all()
    assert array.inputs["v"][1] == 0.0  # below the smallest FP32: rounds to zero, no overflow


def test_max_batch_size_caps_only_a_dynamic_leading_dimension() -> None:
    dynamic = spec("v", "FP32", [-1, -1])
    body = _json_body("FP32", [1, 6], "[0, 1, 2, 3, 4, 5]")
    assert decode_request(body, None, dynamic, max_batch_size=2).inputs["v"].shape == (1, 6)
    body = _json_body("FP32", [3, 2], "[0, 1, 2, 3, 4, 5]")
    with pytest.raises(InputShapeError, match=r"has a batch of 3 .* takes at most 2 here"):
        decode_request(body, None, dynamic, max_batch_size=2)
    assert decode_request(body, None, dynamic).inputs["v"].shape == (3, 2)  # no limit given
    fixed = spec("v", "FP32", [3, 2])  # the model's own batch: the shape holds it
    assert decode_request(body, None, fixed, max_batch_size=2).inputs["v"].shape == (3, 2)


def test_json_outputs_never_hold_nan_or_infinity() -> None:
    for value in (np.nan, np.inf, -np.inf):
        for dtype in (np.float16, np.float32, np.float64):
            results = {"out": np.array([1.0, value], dtype)}
            request = InferRequest(id=None, inputs={}, outputs=[("out", False)])
            with pytest.raises(FormatError, match="output 'out' holds NaN or an infinity"):
                encode_response(model_name="m", model_version="1", request=request, results=results)
            binary = InferRequest(id=None, inputs={}, outputs=[("out", True)])
            encoded = encode_response(
                model_name="m", model_version="1", request=binary, results=results
            )
            assert encoded.header_length is not None
            raw = np.frombuffer(
                encoded.body[encoded.header_length :], np.dtype(dtype).newbyteorder("<")
            )
            np.testing.assert_array_equal(raw, results["out"])
