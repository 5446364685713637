"""Strict JSON for signed and untrusted documents.

``json.loads`` quietly accepts duplicate keys (last one wins), ``NaN`` and UTF-16 input; a signed
document that two parsers read differently is an attack surface, so every document from outside
goes through :func:`loads` or :func:`parse_model`. Pydantic's errors are mapped to
:class:`~agent.errors.FormatError` here, at the edge.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

import pydantic

from agent.errors import FormatError, SizeLimitError

M = TypeVar("M", bound=pydantic.BaseModel)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise FormatError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _no_constants(name: str) -> Any:
    raise FormatError(f"{name} is not valid JSON")


def loads(data: bytes, *, what: str, max_bytes: int) -> Any:
    """Parse ``data`` as one UTF-8 JSON document, refusing anything ambiguous."""
    if len(data) > max_bytes:
        raise SizeLimitError(f"{what} is {len(data)} bytes; the limit is {max_bytes}")
    try:
        text = data.decode("utf-8")
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except FormatError as exc:
        raise FormatError(f"{what}: {exc}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FormatError(f"{what} is not valid JSON: {exc}") from None


def describe_validation_error(exc: pydantic.ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(p) for p in err["loc"]) or "(document)"
        parts.append(f"{loc}: {err['msg'].removeprefix('Value error, ')}")
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def parse_model(model: type[M], data: bytes, *, what: str, max_bytes: int) -> M:
    """Validate ``data`` as ``model``: strict types, no unknown fields, no duplicate keys."""
    obj = loads(data, what=what, max_bytes=max_bytes)
    if not isinstance(obj, dict):
        raise FormatError(f"{what} must be a JSON object")
    try:
        return model.model_validate_json(data, strict=True)
    except pydantic.ValidationError as exc:
        raise FormatError(f"{what} is invalid: {describe_validation_error(exc)}") from None


def canonical(obj: Any) -> bytes:
    """Deterministic JSON bytes: sorted keys, no spaces, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def dump_model(model: pydantic.BaseModel) -> bytes:
    return canonical(model.model_dump(mode="json"))
