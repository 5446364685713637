"""A bundle whose blocks do not fit the broker's packet limit fails on its own device, fast and
with its reason.

The device's side without a broker: frames handed to a :class:`Transfer`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.bundle.blocks import digest_file
from agent.errors import BlockTooLargeError, TransferError
from agent.transport.messages import BlockReplyHeader, BlockRequest, ErrorInfo
from agent.transport.transfer import Transfer, TransferSettings
from agent.trust.envelope import parse_envelope
from agent.trust.metadata import BundleDescriptor
from tests.fleet import TOPICS
from tests.models import make_onnx

BLOCK = 4096
TOO_LARGE = "block-too-large"


# -- the device's side, frames in hand ------------------------------------------------------------
class Device:
    """A transfer with its requests recorded, and replies made from the bundle's bytes."""

    def __init__(self, tmp_path: Path, signed) -> None:  # type: ignore[no-untyped-def]
        model = make_onnx(tmp_path / "m.onnx", inputs=128, outputs=128)
        path, envelope = signed("1.0.0", models=[model], block_size=BLOCK, samples="none")
        self.data = path.read_bytes()
        self.descriptor = BundleDescriptor.model_validate_json(parse_envelope(envelope).payload)
        with open(path, "rb") as f:
            self.block_list = digest_file(f, BLOCK).block_list
        self.asked: list[BlockRequest] = []
        self.transfer = Transfer(
            self.descriptor,
            tmp_path / "download",
            device_id="cam-01",
            topics=TOPICS,
            publish=lambda topic, payload: self.asked.append(BlockRequest.from_bytes(payload)),
            settings=TransferSettings(window=8, request_timeout_s=1.0),
        )

    def header(self, kind: str, index: int, error: str | None = None) -> BlockReplyHeader:
        return BlockReplyHeader(
            bundle_sha256=self.descriptor.bundle_sha256,
            kind=kind,  # type: ignore[arg-type]
            index=index,
            total=0 if error else self.transfer.count if kind == "block" else self.transfer.pages,
            error=None if error is None else ErrorInfo(code=error, message="as the server said"),
        )

    def page(self, now: float) -> None:
        self.transfer.on_reply(self.header("block-list", 0), self.block_list, now)

    def block(self, index: int, now: float) -> None:
        self.transfer.on_reply(
            self.header("block", index), self.data[index * BLOCK : (index + 1) * BLOCK], now
        )

    def refuse(self, index: int, now: float, code: str = TOO_LARGE) -> None:
        self.transfer.on_reply(self.header("error", index, code), b"", now)


@pytest.fixture
def device(tmp_path: Path, signed) -> Device:  # type: ignore[no-untyped-def]
    return Device(tmp_path, signed)


def test_one_block_too_large_answer_fails_the_transfer_at_once(device: Device) -> None:
    t = device.transfer
    t.start(0.0)
    device.page(0.1)
    assert t.state == "blocks"
    asked = len(device.asked)
    device.refuse(0, 0.2)
    assert t.state == "failed"
    assert isinstance(t.error, BlockTooLargeError)
    assert isinstance(t.error, TransferError), "tried again after retry_after_s, as others"
    assert t.error.code == "block-too-large"
    assert "as the server said" in str(t.error)
    t.tick(5.0)
    assert len(device.asked) == asked, "nothing more is asked for"


def test_a_block_list_page_too_large_fails_it_too(device: Device) -> None:
    t = device.transfer
    t.start(0.0)
    device.refuse(0, 0.1)
    assert t.state == "failed"
    assert isinstance(t.error, BlockTooLargeError)


def test_other_error_frames_do_not_fail_it(device: Device) -> None:
    t = device.transfer
    t.start(0.0)
    device.page(0.1)
    device.refuse(0, 0.2, code="rate-limited")
    assert t.state == "blocks"
    assert t.last_error_reply == "rate-limited: as the server said"


def test_a_refusal_of_what_already_came_through_is_one_servers_fault(device: Device) -> None:
    """A full block arrived, so the broker carries blocks this size: a server that refuses one
    has a lower limit than its peers. The blocks are asked for again and the transfer ends."""
    t = device.transfer
    t.start(0.0)
    device.page(0.1)
    [first] = device.asked[1:]
    device.block(first.indexes[0], 0.2)
    device.refuse(first.indexes[1], 0.3)
    assert t.state == "blocks"
    assert t.last_error_reply is not None
    assert t.last_error_reply.startswith("block-too-large")
    now = 0.3
    while t.state == "blocks" and now < 60:
        now += 1.0
        t.tick(now)  # asks again for what timed out
        for request in [r for r in device.asked if r.kind == "blocks"]:
            for i in request.indexes:
                if not t._has(i):
                    device.block(i, now)
        device.asked.clear()
    assert t.state == "done"
    assert (t.dir / "bundle.part").read_bytes() == device.data
