"""Message schemas, the block-reply frame, and the generated protocol document."""

from __future__ import annotations

import contextlib
import json
from datetime import datetime, timezone
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import BadContentError, FormatError, SizeLimitError
from agent.transport.messages import (
    MAX_BLOCK_REPLY_BYTES,
    MAX_WINDOW,
    MESSAGES,
    BlockReplyHeader,
    BlockRequest,
    ErrorInfo,
    Event,
    ModelStatus,
    Online,
    Phase,
    Reported,
    decode_block_reply,
    encode_block_reply,
)
from agent.transport.protocol_doc import render

AT = datetime(2026, 11, 24, 12, 0, tzinfo=timezone.utc)
SHA = "ab" * 32
ROOT = Path(__file__).resolve().parents[1]


def test_reported_round_trip() -> None:
    reported = Reported(
        device_id="cam-01",
        agent_version="0.1.0",
        at=AT,
        deployment_id="dep-1",
        sequence=7,
        models={
            "detector": ModelStatus(phase=Phase.DOWNLOADING, progress=42.5),
            "classifier": ModelStatus(
                phase=Phase.ROLLED_BACK,
                version="1.0.0",
                error=ErrorInfo(code="self-test", message="output y differs by 0.3"),
            ),
        },
    )
    data = reported.to_bytes()
    assert json.loads(data)["models"]["classifier"]["phase"] == "rolled-back"
    assert Reported.from_bytes(data) == reported


@pytest.mark.parametrize(
    ("model", "doc", "match"),
    [
        (Online, {"state": "asleep"}, "state"),
        (Online, {"state": "online", "extra": 1}, "extra"),
        (Event, {"device_id": "cam-01", "seq": "1", "at": AT.isoformat(), "kind": "phase"}, "seq"),
        (
            Event,
            {"device_id": "cam/01", "seq": 1, "at": AT.isoformat(), "kind": "phase"},
            "device_id",
        ),
        (
            BlockRequest,
            {"device_id": "a", "bundle_sha256": SHA, "kind": "blocks", "indexes": []},
            "indexes",
        ),
        (
            BlockRequest,
            {"device_id": "a", "bundle_sha256": SHA, "kind": "blocks", "indexes": [-1]},
            "indexes",
        ),
        (
            BlockRequest,
            {
                "device_id": "a",
                "bundle_sha256": SHA,
                "kind": "blocks",
                "indexes": list(range(MAX_WINDOW + 1)),
            },
            "indexes",
        ),
        (
            BlockRequest,
            {"device_id": "a", "bundle_sha256": "AB" * 32, "kind": "blocks", "indexes": [0]},
            "bundle_sha256",
        ),
        (Reported, {"device_id": "a", "agent_version": "1", "at": "yesterday"}, "at"),
    ],
)
def test_bad_messages_are_format_errors(model, doc: dict[str, object], match: str) -> None:
    with pytest.raises(FormatError, match=match):
        model.from_bytes(json.dumps(doc).encode())


def test_message_size_is_capped() -> None:
    with pytest.raises(SizeLimitError):
        Online.from_bytes(b'{"state": "online"}' + b" " * 300_000)


def test_block_reply_frame_round_trip() -> None:
    header = BlockReplyHeader(bundle_sha256=SHA, kind="block", index=3, total=10)
    data = bytes(range(256)) * 256
    frame = encode_block_reply(header, data)
    assert frame[:4] == b"EMB1"
    assert decode_block_reply(frame) == (header, data)
    error = BlockReplyHeader(
        bundle_sha256=SHA,
        kind="error",
        index=0,
        total=0,
        error=ErrorInfo(code="unknown-bundle", message="no such bundle"),
    )
    assert decode_block_reply(encode_block_reply(error)) == (error, b"")


@pytest.mark.parametrize(
    ("frame", "exc"),
    [
        (b"", FormatError),
        (b"EMB", FormatError),
        (b"XXXX\x00\x02{}", FormatError),
        (b"EMB1\x00\xff{}", FormatError),
        (b"EMB1\x00\x02{}", FormatError),
        (b"EMB1\x00\x04null", FormatError),
        (b"EMB1" + b"\x00\x00" + bytes(MAX_BLOCK_REPLY_BYTES + 1), SizeLimitError),
    ],
)
def test_malformed_block_replies(frame: bytes, exc: type[Exception]) -> None:
    with pytest.raises(exc):
        decode_block_reply(frame)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=1024), st.sampled_from(sorted(MESSAGES)))
def test_any_bytes_are_parsed_or_refused_with_a_project_error(data: bytes, name: str) -> None:
    for parse in (MESSAGES[name].from_bytes, decode_block_reply):
        with contextlib.suppress(BadContentError):
            parse(data)


def test_protocol_document_is_current() -> None:
    """docs/protocol.md is generated; run `make docs` after changing a model or a topic."""
    assert (ROOT / "docs" / "protocol.md").read_text() == render()
