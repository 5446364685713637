"""A bundle whose blocks do not fit the broker's packet limit fails on its own device, fast and
with its reason, and nothing else notices.

First the device's side without a broker (frames handed to a :class:`Transfer`), then a real
mosquitto with ``max_packet_size 131072`` (MQTT 5: it says so in the CONNACK; 3.1.1: the bundle
server is told with ``max_packet_bytes``), real bundle servers and real device agents.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from agent.bundle.blocks import digest_file
from agent.device.transfer import Transfer
from agent.errors import BlockTooLargeError, TransferError
from agent.testing.broker import Broker
from agent.testing.fleet import (
    TOPICS,
    active,
    agent,
    agent_config,
    bundle_server,
    deployment,
    failed,
    watcher,
)
from agent.testing.models import make_onnx
from agent.transport.fetch import TransferSettings
from agent.transport.messages import BlockReplyHeader, BlockRequest, ErrorInfo
from agent.trust.envelope import parse_envelope
from agent.trust.metadata import BundleDescriptor
from tests.conftest import Keys, broker_fixture

LIMIT = 131_072
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


# -- end to end ------------------------------------------------------------------------------------
broker = broker_fixture(
    extra=[f"max_packet_size {LIMIT}", "max_queued_messages 1000", "max_inflight_messages 20"]
)


def _bundles(tmp_path: Path, signed) -> tuple[Path, bytes, bytes]:  # type: ignore[no-untyped-def]
    """A served directory with a bundle of 1 MiB blocks and one of 64 KiB blocks."""
    served = tmp_path / "served"
    served.mkdir()
    big = make_onnx(tmp_path / "big.onnx", inputs=512, outputs=512, seed=7)  # some 1 MiB
    other = make_onnx(tmp_path / "other.onnx", inputs=512, outputs=256, seed=8)
    huge_blocks, huge_env = signed("1.0.0", models=[big], block_size=1 << 20, samples="none")
    normal, normal_env = signed("2.0.0", models=[other], block_size=64 << 10, samples="none")
    for path in (huge_blocks, normal):
        shutil.copyfile(path, served / path.name)
    return served, huge_env, normal_env


def _check_no_oversized_packet(broker: Broker) -> None:
    log = broker.log()
    assert "due to oversize packet" not in log, log[-2000:]


def _deploy_both(
    tmp_path: Path, broker: Broker, keys: Keys, envelopes: tuple[bytes, bytes], protocol: str
) -> tuple[str, str]:
    """cam-01 deploys the 1 MiB-block bundle, cam-02 the other, at once; return their errors."""
    huge_env, normal_env = envelopes
    settings = TransferSettings(window=8, request_timeout_s=2.0, stall_timeout_s=120.0)
    configs = [
        agent_config(tmp_path / d, keys.dir, broker, d, protocol=protocol, transfer=settings)
        for d in ("cam-01", "cam-02")
    ]
    with (
        watcher(broker, protocol=protocol) as fleet,
        agent(configs[0]),
        agent(configs[1]),
    ):
        fleet.publish(
            TOPICS.device("cam-01").desired,
            deployment({"tiny": huge_env}, keys.release, device="cam-01"),
        )
        fleet.publish(
            TOPICS.device("cam-02").desired,
            deployment({"tiny": normal_env}, keys.release, device="cam-02"),
        )
        # The stall timeout is 120 s: a failure within the wait is the server's answer.
        reported = fleet.wait("cam-01", failed("tiny"), what="cam-01 failed")
        fleet.wait("cam-02", active("tiny", "2.0.0"), what="cam-02 active beside it")
    error = reported.models["tiny"].error
    assert error is not None
    return error.code, error.message


def test_a_bundle_too_large_for_the_broker_fails_alone_mqtt5(
    tmp_path: Path, broker: Broker, keys: Keys, signed
) -> None:  # type: ignore[no-untyped-def]
    """Two servers share the load; neither is dropped by the broker, the other device converges."""
    served, huge_env, normal_env = _bundles(tmp_path, signed)
    with (
        bundle_server(broker, served, name="server-a") as a,
        bundle_server(broker, served, name="server-b") as b,
    ):
        code, message = _deploy_both(tmp_path, broker, keys, (huge_env, normal_env), "5")
    assert code == "block-too-large", message
    assert f"block of {1 << 20} bytes" in message, message
    assert f"limit of {LIMIT} bytes" in message, message
    servers = [*a, *b]
    assert [s.stats.connects for s in servers] == [1, 1], "a server was dropped and reconnected"
    assert sum(s.stats.refused for s in servers) >= 1
    assert sum(s.stats.blocks for s in servers) > 0
    _check_no_oversized_packet(broker)


def test_a_bundle_too_large_for_the_broker_fails_alone_mqtt311(
    tmp_path: Path, broker: Broker, keys: Keys, signed
) -> None:  # type: ignore[no-untyped-def]
    """MQTT 3.1.1 announces no limit: the server keeps to the one it is given."""
    served, huge_env, normal_env = _bundles(tmp_path, signed)
    with bundle_server(broker, served, protocol="3.1.1", max_packet_bytes=LIMIT) as done:
        code, message = _deploy_both(tmp_path, broker, keys, (huge_env, normal_env), "3.1.1")
    assert code == "block-too-large", message
    assert str(LIMIT) in message, message
    [server] = done
    assert server.stats.connects == 1
    _check_no_oversized_packet(broker)
