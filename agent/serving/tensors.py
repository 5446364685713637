"""Inference requests and responses of the Open Inference Protocol (KServe v2), JSON and binary.

A request body is one JSON object, optionally followed by raw tensor bytes (the *binary tensor
data* extension): the ``Inference-Header-Content-Length`` header then says how long the JSON
part is, and each input sent as binary carries ``parameters.binary_data_size``; the raw parts
follow the JSON in the order of the inputs. Outputs asked for with ``parameters.binary_data:
true`` (or, for outputs not listed, the request parameter ``binary_data_output: true``) come
back the same way: JSON first, its length in ``Inference-Header-Content-Length``, then the raw
bytes in the order of the JSON's outputs.

Raw bytes are little-endian, row-major; BOOL is one byte per element; a BYTES element is a
4-byte little-endian length followed by that many bytes. JSON ``data`` is flat (row-major) or
nested to the tensor's shape.

Every check against the model's metadata happens here: a request that gets past
:func:`decode_request` has exactly the model's inputs, each with the model's datatype and a
shape that fits (-1 in the metadata matches any size), no batch over ``max_batch_size`` (the
leading dimension of an input whose leading dimension the model leaves dynamic), and JSON data
that the datatype can hold. Problems raise :class:`~agent.errors.FormatError` or
:class:`~agent.errors.InputShapeError` (the API answers 400) or
:class:`~agent.errors.SizeLimitError` (413). Which dynamic dimensions two inputs share is the
runtime's to say; :meth:`agent.runtime.base.RuntimeModel.infer` checks that.

Non-finite numbers: JSON has none (RFC 8259: "Numeric values that cannot be represented in the
grammar below (such as Infinity and NaN) are not permitted"). Requests with the tokens ``NaN``
or ``Infinity``, or with numbers beyond the datatype's range (``1e39`` for FP32, ``1e6`` for
FP16), are refused; an answer never holds them either: a JSON output with a NaN or an infinity
is refused with a message to ask for that output as binary data (``binary_data: true``), which
carries every IEEE value exactly. Binary inputs are taken as they come, NaN included.

Threads: pure functions, called on the API's worker threads.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from agent._lazy import lazy_module
from agent._strictjson import describe_validation_error, loads
from agent.errors import FormatError, InputShapeError, SizeLimitError
from agent.runtime.base import DATATYPES, kserve_datatype
from agent.serving.source import ServedModel, TensorSpec

if TYPE_CHECKING:
    import numpy as np
else:
    np = lazy_module("numpy")  # imported on first use: an idle daemon does without

_KNOWN_DATATYPES = (*DATATYPES, "BYTES", "BF16")
_MAX_DIMS = 16

# Scalar types a JSON ``data`` array may hold for each kind of tensor.
_JSON_KINDS = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


Parameters = dict[str, bool | int | float | str]
Dim = Annotated[int, Field(ge=0)]


class _InputTensor(_Strict):
    name: str
    shape: list[Dim] = Field(max_length=_MAX_DIMS)
    datatype: str
    parameters: Parameters = {}
    data: Any = None


class _OutputRequest(_Strict):
    name: str
    parameters: Parameters = {}


class _InferHeader(_Strict):
    id: str | None = None
    parameters: Parameters = {}
    inputs: list[_InputTensor] = Field(min_length=1)
    outputs: list[_OutputRequest] | None = None


@dataclass(frozen=True)
class InferRequest:
    """A request checked against the model: its inputs as arrays and what to send back."""

    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: list[tuple[str, bool]]  # (name, as binary), in the order to answer


@dataclass(frozen=True)
class EncodedResponse:
    body: bytes
    header_length: int | None  # the JSON part's length when binary outputs follow it


def decompress(body: bytes | bytearray, encoding: str | None, max_bytes: int) -> bytes | bytearray:
    """Undo ``Content-Encoding`` (gzip or deflate), refusing output beyond ``max_bytes``."""
    if encoding in (None, "", "identity"):
        return body
    if encoding == "gzip":
        wbits = 16 + zlib.MAX_WBITS
    elif encoding == "deflate":
        wbits = zlib.MAX_WBITS
    else:
        raise FormatError(f"Content-Encoding {encoding!r} is not supported (gzip, deflate)")
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, max_bytes + 1)
    except zlib.error as exc:
        raise FormatError(f"the body is not valid {encoding} data: {exc}") from None
    if len(out) > max_bytes:
        raise SizeLimitError(f"the decompressed body is over the limit of {max_bytes} bytes")
    if not inflater.eof or inflater.unused_data:
        raise FormatError(f"the body is not one complete {encoding} stream")
    return out


def decode_request(
    body: bytes | bytearray,
    header_length: int | None,
    model: ServedModel,
    *,
    max_batch_size: int | None = None,
) -> InferRequest:
    """Parse and check one inference request for ``model``; batches over ``max_batch_size``
    are refused (None: no limit but the model's shapes)."""
    view = memoryview(body)
    if header_length is None:
        json_part, binary = view, view[len(view) :]
    else:
        if not 0 <= header_length <= len(view):
            raise FormatError(
                f"Inference-Header-Content-Length {header_length} does not fit the body of "
                f"{len(view)} bytes"
            )
        json_part, binary = view[:header_length], view[header_length:]
    header = _parse_header(bytes(json_part))

    specs = {t.name: t for t in model.inputs}
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for tensor in header.inputs:
        spec = specs.get(tensor.name)
        if spec is None:
            raise FormatError(
                f"unknown input {tensor.name!r}; the model's inputs are {_names(model.inputs)}"
            )
        if tensor.name in inputs:
            raise FormatError(f"input {tensor.name!r} is given twice")
        _check_spec(tensor, spec)
        if max_batch_size is not None:
            _check_batch(tensor, spec, model, max_batch_size)
        size = tensor.parameters.get("binary_data_size")
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise FormatError(
                    f"input {tensor.name!r}: binary_data_size must be an integer >= 0"
                )
            if tensor.data is not None:
                raise FormatError(f"input {tensor.name!r} has both data and binary_data_size")
            if header_length is None:
                raise FormatError(
                    f"input {tensor.name!r} has binary_data_size but the request has no "
                    "Inference-Header-Content-Length header"
                )
            if offset + size > len(binary):
                raise FormatError(
                    f"input {tensor.name!r}: binary_data_size {size} runs past the end of the "
                    f"body ({len(binary) - offset} bytes left)"
                )
            inputs[tensor.name] = _from_binary(tensor, binary[offset : offset + size])
            offset += size
        else:
            if tensor.data is None:
                raise FormatError(f"input {tensor.name!r} has neither data nor binary_data_size")
            inputs[tensor.name] = _from_json(tensor)
    if offset != len(binary):
        raise FormatError(
            f"the body has {len(binary)} bytes of binary tensor data but the inputs' "
            f"binary_data_size add up to {offset}"
        )
    missing = [name for name in specs if name not in inputs]
    if missing:
        raise FormatError(f"missing input {', '.join(repr(n) for n in missing)}")

    binary_default = header.parameters.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise FormatError("parameter binary_data_output must be true or false")
    known = [t.name for t in model.outputs]
    outputs: list[tuple[str, bool]] = []
    if header.outputs is None:
        outputs = [(name, binary_default) for name in known]
    else:
        for out in header.outputs:
            if out.name not in known:
                raise FormatError(f"unknown output {out.name!r}; the model's outputs are {known}")
            if any(out.name == name for name, _ in outputs):
                raise FormatError(f"output {out.name!r} is asked for twice")
            if out.parameters.get("classification", 0):
                raise FormatError("the classification extension is not supported")
            as_binary = out.parameters.get("binary_data", binary_default)
            if not isinstance(as_binary, bool):
                raise FormatError(f"output {out.name!r}: binary_data must be true or false")
            outputs.append((out.name, as_binary))
    return InferRequest(id=header.id, inputs=inputs, outputs=outputs)


def _parse_header(data: bytes) -> _InferHeader:
    try:
        obj = loads(data, what="the inference request", max_bytes=len(data))
    except FormatError as exc:
        if str(exc).endswith(("NaN is not valid JSON", "Infinity is not valid JSON")):
            raise FormatError(
                f"{exc}: JSON numbers are finite; send NaN and infinities as binary tensor data"
            ) from None
        raise
    if not isinstance(obj, dict):
        raise FormatError("the inference request must be a JSON object")
    try:
        return _InferHeader.model_validate(obj)
    except pydantic.ValidationError as exc:
        raise FormatError(
            f"the inference request is invalid: {describe_validation_error(exc)}"
        ) from None


def _names(specs: Sequence[TensorSpec]) -> list[str]:
    return [t.name for t in specs]


def _check_spec(tensor: _InputTensor, spec: TensorSpec) -> None:
    if tensor.datatype not in _KNOWN_DATATYPES:
        raise FormatError(f"input {tensor.name!r}: unknown datatype {tensor.datatype!r}")
    if tensor.datatype != spec.datatype:
        raise FormatError(
            f"input {tensor.name!r} has datatype {tensor.datatype}; the model takes {spec.datatype}"
        )
    if tensor.datatype == "BF16":
        raise FormatError(f"input {tensor.name!r}: datatype BF16 is not supported by this server")
    fits = len(tensor.shape) == len(spec.shape) and all(
        want in (-1, got) for got, want in zip(tensor.shape, spec.shape, strict=True)
    )
    if not fits:
        raise InputShapeError(
            f"input {tensor.name!r} has shape {tensor.shape}; the model takes {spec.shape} "
            "(-1: any size)"
        )


def _check_batch(tensor: _InputTensor, spec: TensorSpec, model: ServedModel, limit: int) -> None:
    """A leading dimension the model leaves dynamic is the batch: at most ``limit``. (A fixed
    one is the model's own limit, and the shape check holds the request to it.)"""
    if spec.shape and spec.shape[0] == -1 and tensor.shape[0] > limit:
        raise InputShapeError(
            f"input {tensor.name!r} has a batch of {tensor.shape[0]} (its leading dimension); "
            f"model {model.name!r} takes at most {limit} here (max_batch_size)"
        )


def _from_binary(tensor: _InputTensor, raw: memoryview) -> np.ndarray:
    count = math.prod(tensor.shape)
    if tensor.datatype == "BYTES":
        return _bytes_from_binary(tensor, raw, count)
    dtype = DATATYPES[tensor.datatype].newbyteorder("<")
    if len(raw) != count * dtype.itemsize:
        raise FormatError(
            f"input {tensor.name!r}: {len(raw)} bytes of binary data, but shape {tensor.shape} "
            f"of {tensor.datatype} needs {count * dtype.itemsize}"
        )
    array = np.frombuffer(raw, dtype=dtype).reshape(tensor.shape)
    if not array.flags.aligned or not array.flags.writeable:
        array = array.copy()
    if tensor.datatype == "BOOL" and array.view(np.uint8).max(initial=0) > 1:
        raise FormatError(f"input {tensor.name!r}: BOOL bytes must be 0 or 1")
    return array.astype(DATATYPES[tensor.datatype], copy=False)


def _bytes_from_binary(tensor: _InputTensor, raw: memoryview, count: int) -> np.ndarray:
    items: list[bytes] = []
    pos = 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise FormatError(f"input {tensor.name!r}: a BYTES element length is cut short")
        (n,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + n > len(raw):
            raise FormatError(f"input {tensor.name!r}: a BYTES element runs past its data")
        items.append(bytes(raw[pos : pos + n]))
        pos += n
        if len(items) > count:
            break
    if len(items) != count:
        raise FormatError(
            f"input {tensor.name!r}: shape {tensor.shape} needs {count} BYTES elements, the "
            f"binary data holds {len(items)}{' or more' if len(items) > count else ''}"
        )
    array = np.empty(count, dtype=np.object_)
    array[:] = items
    return array.reshape(tensor.shape)


def _from_json(tensor: _InputTensor) -> np.ndarray:
    count = math.prod(tensor.shape)
    data = tensor.data
    if not isinstance(data, list):
        data = [data]  # a lone scalar for a one-element tensor
    if tensor.datatype == "BYTES":
        return _bytes_from_json(tensor, data, count)
    try:
        array = np.array(data)
    except (ValueError, TypeError):
        raise FormatError(
            f"input {tensor.name!r}: data is not a flat or evenly nested array of numbers"
        ) from None
    if array.size != count or (array.ndim > 1 and list(array.shape) != tensor.shape):
        nested = f" nested as {list(array.shape)}" if array.ndim > 1 else ""
        raise FormatError(
            f"input {tensor.name!r}: data holds {array.size} elements{nested}; shape "
            f"{tensor.shape} needs {count}"
        )
    target = DATATYPES[tensor.datatype]
    if array.size and array.dtype.kind not in _JSON_KINDS[target.kind]:
        want = {"b": "true or false", "i": "integers", "u": "integers", "f": "numbers"}
        raise FormatError(
            f"input {tensor.name!r} is {tensor.datatype}: data must hold {want[target.kind]} only"
        )
    if array.size and target.kind in "iu":
        info = np.iinfo(target.type)  # type: ignore[type-var]
        if int(array.min()) < info.min or int(array.max()) > info.max:
            raise FormatError(
                f"input {tensor.name!r}: a value is out of range for {tensor.datatype}"
            )
    if array.size and target.kind == "f":
        # A JSON number beyond float64 (1e400) parses as an infinity; one beyond the target
        # type (1e39 for FP32) becomes one in the cast. Neither is the number that was sent.
        with np.errstate(over="ignore", invalid="ignore"):
            cast = array.astype(target)
        if not np.isfinite(cast).all():
            largest = float(np.finfo(target.type).max)  # type: ignore[type-var]
            raise FormatError(
                f"input {tensor.name!r}: a value is out of range for {tensor.datatype} "
                f"(at most {largest:g} in magnitude)"
            )
        return cast.reshape(tensor.shape)
    return array.astype(target).reshape(tensor.shape)


def _bytes_from_json(tensor: _InputTensor, data: list[Any], count: int) -> np.ndarray:
    flat: list[bytes] = []

    def walk(node: Any, depth: int) -> None:
        if isinstance(node, list):
            if depth >= _MAX_DIMS:
                raise FormatError(f"input {tensor.name!r}: data is nested too deeply")
            for item in node:
                walk(item, depth + 1)
        elif isinstance(node, str):
            flat.append(node.encode("utf-8"))
        else:
            raise FormatError(f"input {tensor.name!r} is BYTES: data must hold strings only")

    walk(data, 0)
    if len(flat) != count:
        raise FormatError(
            f"input {tensor.name!r}: data holds {len(flat)} elements; shape {tensor.shape} "
            f"needs {count}"
        )
    array = np.empty(count, dtype=np.object_)
    array[:] = flat
    return array.reshape(tensor.shape)


# -- responses ---------------------------------------------------------------------------------


def datatype_of(array: np.ndarray) -> str:
    """The KServe datatype of an output array (raises TypeError for one it cannot carry)."""
    if array.dtype.kind in "OSU":
        return "BYTES"
    name = kserve_datatype(array.dtype.newbyteorder("="))
    if name is None:
        raise TypeError(f"the model returned an array of {array.dtype}, which KServe cannot carry")
    return name


def _bytes_elements(array: np.ndarray) -> list[bytes]:
    out = []
    for item in array.reshape(-1).tolist():
        if isinstance(item, bytes):
            out.append(item)
        elif isinstance(item, str):
            out.append(item.encode("utf-8"))
        else:
            raise TypeError(f"a BYTES output holds a {type(item).__name__}")
    return out


def encode_response(
    *,
    model_name: str,
    model_version: str,
    request: InferRequest,
    results: Mapping[str, np.ndarray],
) -> EncodedResponse:
    """The response to ``request`` from the model's ``results``.

    Raises KeyError or TypeError when the model did not return what its metadata promises
    (the model's failure, not the client's).
    """
    outputs: list[dict[str, Any]] = []
    raw_parts: list[bytes] = []
    for name, binary in request.outputs:
        array = np.asarray(results[name])
        datatype = datatype_of(array)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            if datatype == "BYTES":
                raw = b"".join(struct.pack("<I", len(b)) + b for b in _bytes_elements(array))
            else:
                raw = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            raw_parts.append(raw)
        elif datatype == "BYTES":
            try:
                entry["data"] = [b.decode("utf-8") for b in _bytes_elements(array)]
            except UnicodeDecodeError:
                raise FormatError(
                    f"output {name!r} is not UTF-8 text; ask for it with binary_data: true"
                ) from None
        else:
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                raise FormatError(
                    f"output {name!r} holds NaN or an infinity, which JSON cannot carry; ask "
                    "for it with binary_data: true"
                )
            entry["data"] = array.reshape(-1).tolist()
        outputs.append(entry)
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request.id is not None:
        doc["id"] = request.id
    doc["outputs"] = outputs
    header = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()
    if not raw_parts:
        return EncodedResponse(header, None)
    return EncodedResponse(header + b"".join(raw_parts), len(header))
