"""The answers the project's ASGI apps write on uvicorn (the inference API, the fleet's
dashboard): a status, a body, its content type and headers, sent as one response."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


@dataclass
class Reply:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


def dumps(doc: object) -> str:
    """Compact JSON a client parses: a non-finite number, which JSON cannot hold, is an error
    here rather than a bare ``NaN`` or ``Infinity`` on the wire."""
    return json.dumps(doc, separators=(",", ":"), allow_nan=False)


def json_reply(status: int, doc: object, *headers: tuple[str, str]) -> Reply:
    return Reply(status, dumps(doc).encode(), headers=headers)


def error_reply(status: int, message: str, *headers: tuple[str, str]) -> Reply:
    return json_reply(status, {"error": message}, *headers)


def request_headers(scope: Scope) -> dict[str, str]:
    """The request's headers, names in lower case (a repeated one: the last)."""
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


def encode_headers(headers: Sequence[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]


async def send_reply(
    send: Send, reply: Reply, *, head: bool = False, extra: Sequence[tuple[str, str]] = ()
) -> None:
    """Send ``reply`` (no body for a HEAD request); ``extra`` headers follow its own."""
    headers = [
        (b"content-type", reply.content_type.encode()),
        (b"content-length", str(len(reply.body)).encode()),
    ]
    headers += encode_headers([*reply.headers, *extra])
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else reply.body})
