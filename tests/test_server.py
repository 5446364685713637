"""The bundle server's request handling, on a real bundle, with a clock the test moves.

No broker here: replies are collected from the ``publish`` callable the server is given (the
MQTT path is tests/test_transfer.py's).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.errors import ConfigError
from agent.fleet.server import BACKLOG_PER_DEVICE, BlockServer, BundleCatalog, packet_limit, serve
from agent.testing.fleet import TOPICS
from agent.testing.models import make_onnx
from agent.transport.messages import BlockReplyHeader, BlockRequest, decode_block_reply
from agent.transport.session import MqttSettings, publish_packet_size

BLOCK = 4096


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def served(tmp_path: Path, build) -> tuple[Path, str]:  # type: ignore[no-untyped-def]
    model = make_onnx(tmp_path / "m.onnx", inputs=256, outputs=128)
    path = build("1.0.0", models=[model], block_size=BLOCK, samples="none").path
    d = tmp_path / "served"
    d.mkdir()
    shutil.copyfile(path, d / path.name)
    (d / "notes.txt").write_text("not a bundle")
    return d, hashlib.sha256(path.read_bytes()).hexdigest()


Sent = list[tuple[str, BlockReplyHeader, bytes]]


def _server(
    directory: Path,
    clock: Clock,
    rate: float = 1 << 30,
    limit: Callable[[], int | None] = lambda: None,
    packets: list[int] | None = None,
) -> tuple[BlockServer, Sent]:
    """A server whose frames are decoded into the list returned; ``packets`` gets the size of
    each frame's PUBLISH packet on the wire (MQTT 5)."""
    out: Sent = []

    def publish(topic: str, payload: bytes) -> None:
        if packets is not None:
            packets.append(publish_packet_size(topic, len(payload)))
        header, data = decode_block_reply(payload)
        out.append((topic, header, data))

    catalog = BundleCatalog(directory, clock=clock)
    catalog.scan()
    server = BlockServer(
        catalog,
        TOPICS,
        publish,
        rate_bytes_s=rate,
        burst_bytes=8 * BLOCK,
        max_packet_bytes=limit,
        clock=clock,
    )
    return server, out


def _request(
    sha: str, indexes: list[int], device: str = "cam-01", kind: str = "blocks"
) -> tuple[str, bytes]:
    body = BlockRequest(device_id=device, bundle_sha256=sha, kind=kind, indexes=indexes)  # type: ignore[arg-type]
    return TOPICS.bundle_request(sha, device), body.to_bytes()


def test_blocks_and_block_list_pages_are_answered_on_the_askers_topic(
    served: tuple[Path, str],
) -> None:
    directory, sha = served
    server, out = _server(directory, Clock())
    assert len(server.catalog) == 1, "the text file is skipped"
    server.handle(*_request(sha, [0, 2, 2]))
    server.handle(*_request(sha, [0], kind="block-list"))
    bundle = next(p for p in directory.iterdir() if p.suffix == ".emb").read_bytes()
    assert [(h.kind, h.index) for _, h, _ in out] == [("block", 0), ("block", 2), ("block-list", 0)]
    assert {t for t, _, _ in out} == {TOPICS.device("cam-01").blocks}
    assert out[1][2] == bundle[2 * BLOCK : 3 * BLOCK]
    page = out[2][2]
    assert len(page) == 32 * -(-len(bundle) // BLOCK)
    assert page[:32] == hashlib.sha256(bundle[:BLOCK]).digest()


@pytest.mark.parametrize(
    ("indexes", "kind", "code"),
    [([10_000], "blocks", "bad-index"), ([1], "block-list", "bad-index")],
)
def test_out_of_range_requests_get_an_error_frame(
    served: tuple[Path, str], indexes: list[int], kind: str, code: str
) -> None:
    directory, sha = served
    server, out = _server(directory, Clock())
    server.handle(*_request(sha, indexes, kind=kind))
    [(_, header, data)] = out
    assert header.kind == "error"
    assert header.error is not None
    assert header.error.code == code
    assert data == b""


def test_unknown_bundle_gets_an_error_frame(served: tuple[Path, str]) -> None:
    directory, _ = served
    server, out = _server(directory, Clock())
    server.handle(*_request("ab" * 32, [0]))
    [(_, header, _)] = out
    assert header.error is not None
    assert header.error.code == "unknown-bundle"


def test_the_report_counts_each_bundle_asked_for_since_the_last_one(
    served: tuple[Path, str], caplog: pytest.LogCaptureFixture
) -> None:
    """Requests, distinct devices, blocks, pages, bytes and refusals per bundle; an unknown
    bundle is named and warned of once per interval; the next report starts from nothing."""
    directory, sha = served
    name = next(p.name for p in directory.iterdir() if p.suffix == ".emb")
    clock = Clock()
    server, out = _server(directory, clock, rate=4 * BLOCK)
    caplog.set_level(logging.DEBUG, logger="agent.fleet.server")
    server.handle(*_request(sha, [0], kind="block-list"))
    server.handle(*_request(sha, [0, 1, 2]))
    server.handle(*_request(sha, [3, 4, 5, 6, 7, 8]))  # beyond the burst of 8: deferred
    server.handle(*_request(sha, [1], device="cam-02"))
    unknown = "ab" * 32
    server.handle(*_request(unknown, [0]))
    server.handle(*_request(unknown, [0], device="cam-02"))
    sent = sum(len(d) for _, h, d in out if h.kind in ("block", "block-list"))
    assert server.tallies[sha].bytes == sent
    assert server.report(30.0) == [
        f"{name}: 4 request(s) from 2 device(s) in 30 s: 4 block(s), 1 page(s), "
        f"{sent / 1024:.1f} KiB",
        f"unknown bundle {unknown[:16]}: 2 request(s) from 2 device(s) in 30 s: 0 block(s), "
        "0 page(s), 0 B, 2 refused",
    ]

    def warnings() -> list[str]:
        return [m for r in caplog.records if (m := r.getMessage()).startswith("no bundle")]

    assert warnings() == [f"no bundle {unknown[:16]} in {directory} (asked for by cam-01)"]
    asked = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert asked[:2] == [
        f"cam-01 asks for {name}: block-list, 1 index(es)",
        f"cam-01 asks for {name}: blocks, 3 index(es)",
    ]
    assert len(asked) == 6
    # The deferred request is answered after the report: its blocks count in the next one.
    clock.now += 10
    server.tick()
    assert server.report(30.0) == [
        f"{name}: 0 request(s) from 0 device(s) in 30 s: 6 block(s), 0 page(s), 24.0 KiB"
    ]
    assert server.report(30.0) == []
    server.handle(*_request(unknown, [0]))
    assert len(warnings()) == 2, "warned again in a new interval"


def test_a_bundle_added_while_serving_is_found(
    served: tuple[Path, str], tmp_path: Path, build
) -> None:  # type: ignore[no-untyped-def]
    directory, _ = served
    clock = Clock()
    server, out = _server(directory, clock)
    later = build("2.0.0", block_size=BLOCK).path
    shutil.copyfile(later, directory / later.name)
    sha = hashlib.sha256(later.read_bytes()).hexdigest()
    clock.now += 3  # the directory is looked at again at most every 2 s
    server.handle(*_request(sha, [0]))
    assert [h.kind for _, h, _ in out] == ["block"]


@pytest.mark.parametrize(
    "payload",
    [b"{", b"[]", b'{"type":"block-request"}', b"x" * 10_000],
)
def test_malformed_requests_are_dropped(served: tuple[Path, str], payload: bytes) -> None:
    directory, sha = served
    server, out = _server(directory, Clock())
    server.handle(TOPICS.bundle_request(sha, "cam-01"), payload)
    assert out == []
    assert server.stats.refused == 1


def test_a_request_on_another_bundles_topic_is_dropped(served: tuple[Path, str]) -> None:
    directory, sha = served
    server, out = _server(directory, Clock())
    _, body = _request(sha, [0])
    server.handle(TOPICS.bundle_request("cd" * 32, "cam-01"), body)
    assert out == []


def test_per_device_rate_limit_defers_then_refuses(served: tuple[Path, str]) -> None:
    """Burst 8 blocks at 4 blocks/s: the ninth waits; a full backlog is told rate-limited."""
    directory, sha = served
    clock = Clock()
    server, out = _server(directory, clock, rate=4 * BLOCK)
    server.handle(*_request(sha, list(range(8))))
    assert len(out) == 8, "the burst goes at once"
    server.handle(*_request(sha, [8]))
    assert len(out) == 8, "beyond the burst: deferred"
    for i in range(BACKLOG_PER_DEVICE - 1):
        server.handle(*_request(sha, [9 + i]))
    server.handle(*_request(sha, [20]))  # the backlog is full
    refused = [h for _, h, _ in out if h.kind == "error"]
    assert len(refused) == 1
    assert refused[0].error is not None
    assert refused[0].error.code == "rate-limited"
    # Another device has its own bucket.
    server.handle(*_request(sha, [0], device="cam-02"))
    assert out[-1][0] == TOPICS.device("cam-02").blocks
    # Time passes: the waiting requests are answered in order, at the rate.
    wait = server.tick()
    assert wait is not None
    assert wait == pytest.approx(0.25)
    clock.now += 0.25
    server.tick()
    assert [h.index for _, h, _ in out if h.kind == "block"][-1] == 8
    clock.now += 10
    assert server.tick() is None
    answered = [h.index for t, h, _ in out if h.kind == "block" and t.endswith("cam-01/blocks")]
    assert answered == [*range(8), 8, *range(9, 9 + BACKLOG_PER_DEVICE - 1)]


def test_a_request_naming_another_device_is_dropped(served: tuple[Path, str]) -> None:
    """The topic names the asker (the broker's ACL binds it to its certificate): a body that
    names another device would have blocks sent to it, and is dropped."""
    directory, sha = served
    server, out = _server(directory, Clock())
    _, body = _request(sha, [0], device="cam-02")
    server.handle(TOPICS.bundle_request(sha, "cam-01"), body)
    assert out == []
    assert server.stats.refused == 1


def test_the_rate_limiter_remembers_a_bounded_number_of_devices(
    served: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import agent.fleet.server as server_module

    monkeypatch.setattr(server_module, "MAX_BUCKETS", 50)
    directory, sha = served
    server, out = _server(directory, Clock(), rate=4 * BLOCK)
    for n in range(200):
        server.handle(*_request(sha, [0], device=f"cam-{n}"))
    assert len(server._buckets) <= 50
    assert len([h for _, h, _ in out if h.kind == "block"]) == 200, (
        "each new device has a full burst"
    )


# -- the broker's packet limit ---------------------------------------------------------------------
def _packet_of_block(directory: Path, sha: str, index: int, kind: str = "blocks") -> int:
    """The size of the PUBLISH that answers one index, measured without a limit."""
    packets: list[int] = []
    server, _ = _server(directory, Clock(), packets=packets)
    server.handle(*_request(sha, [index], kind=kind))
    [size] = packets
    return size


def test_a_block_over_the_packet_limit_is_refused_with_block_too_large(
    served: tuple[Path, str],
) -> None:
    directory, sha = served
    packets: list[int] = []
    server, out = _server(directory, Clock(), limit=lambda: 2048, packets=packets)
    server.handle(*_request(sha, [0, 1, 2]))
    [(topic, header, data)] = out  # one answer for the request, no block
    assert topic == TOPICS.device("cam-01").blocks
    assert header.kind == "error"
    assert header.error is not None
    assert header.error.code == "block-too-large"
    assert f"block of {BLOCK} bytes" in header.error.message
    assert "limit of 2048 bytes" in header.error.message
    assert data == b""
    assert max(packets) <= 2048
    assert (server.stats.blocks, server.stats.bytes, server.stats.refused) == (0, 0, 1)


def test_a_reply_exactly_at_the_limit_goes_out_and_one_byte_less_refuses_it(
    served: tuple[Path, str],
) -> None:
    directory, sha = served
    exact = _packet_of_block(directory, sha, 3)
    assert exact > BLOCK, "the packet counts the header and topic too"
    packets: list[int] = []
    server, out = _server(directory, Clock(), limit=lambda: exact, packets=packets)
    server.handle(*_request(sha, [3]))
    assert [(h.kind, h.index) for _, h, _ in out] == [("block", 3)]
    assert packets == [exact]
    server, out = _server(directory, Clock(), limit=lambda: exact - 1)
    server.handle(*_request(sha, [3]))
    assert [h.error.code for _, h, _ in out if h.error] == ["block-too-large"]


@pytest.fixture
def many_blocks(tmp_path: Path, build) -> tuple[Path, str]:  # type: ignore[no-untyped-def]
    """A bundle of some 260 blocks of 4 KiB: its block-list page (8 KiB) is twice a block."""
    model = make_onnx(tmp_path / "big.onnx", inputs=512, outputs=512, seed=7)
    path = build("1.0.0", models=[model], block_size=BLOCK, samples="none").path
    d = tmp_path / "many"
    d.mkdir()
    shutil.copyfile(path, d / path.name)
    return d, hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_block_list_page_over_the_limit_is_refused_too(many_blocks: tuple[Path, str]) -> None:
    directory, sha = many_blocks
    page = _packet_of_block(directory, sha, 0, kind="block-list")
    block = _packet_of_block(directory, sha, 0)
    assert block < page
    packets: list[int] = []
    server, out = _server(directory, Clock(), limit=lambda: block, packets=packets)
    server.handle(*_request(sha, [0], kind="block-list"))
    server.handle(*_request(sha, [0, 1]))
    [refusal, *blocks] = [h for _, h, _ in out]
    assert refusal.error is not None
    assert refusal.error.code == "block-too-large"
    assert "block-list page" in refusal.error.message
    assert [(h.kind, h.index) for h in blocks] == [("block", 0), ("block", 1)]
    assert max(packets) <= block


def test_a_deferred_request_meets_the_limit_of_when_it_is_answered(
    served: tuple[Path, str],
) -> None:
    """The broker may allow less after a reconnect than when the request came in."""
    directory, sha = served
    clock = Clock()
    limit: list[int | None] = [None]
    packets: list[int] = []
    server, out = _server(directory, clock, rate=4 * BLOCK, limit=lambda: limit[0], packets=packets)
    server.handle(*_request(sha, list(range(8))))  # the burst
    server.handle(*_request(sha, [8]))  # waits for the bucket
    assert len(out) == 8
    limit[0] = 1024
    clock.now += 10
    server.tick()
    [last] = [h for _, h, _ in out[8:]]
    assert last.error is not None
    assert last.error.code == "block-too-large"
    assert max(packets[8:]) <= 1024


def test_nothing_goes_out_when_not_even_the_error_frame_fits(served: tuple[Path, str]) -> None:
    directory, sha = served
    server, out = _server(directory, Clock(), limit=lambda: 100)
    server.handle(*_request(sha, [0]))
    assert out == []
    assert server.stats.refused == 1


def test_the_smaller_of_the_announced_and_the_configured_limit_applies() -> None:
    assert packet_limit(None, None) is None
    assert packet_limit(131_072, None) == 131_072
    assert packet_limit(None, 65_536) == 65_536
    assert packet_limit(131_072, 65_536) == 65_536
    assert packet_limit(65_536, 131_072) == 65_536


def test_a_configured_limit_too_small_for_any_reply_is_refused(tmp_path: Path) -> None:
    import threading

    with pytest.raises(ConfigError, match="below 1024"):
        serve(
            tmp_path,
            MqttSettings(host="127.0.0.1", port=9, tls=False),
            topics=TOPICS,
            client_id="never-connects",
            rate_bytes_s=0,
            stop=threading.Event(),
            max_packet_bytes=512,
        )
