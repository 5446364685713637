"""Block transfer against a real mosquitto: stock limits, outages, restarts, bad blocks, reuse.

Plain loopback listeners (the ACL and TLS are tests/test_broker_acl.py's and test_control.py's
subject); mosquitto's stock queue limits are written into the config so the point is explicit.
What the device asks for is recorded where it is published (the device session's ``publish``),
so "no verified block is fetched twice" is checked against the device's own bitmap.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from agent.fleet.server import BlockServer, BundleCatalog
from agent.testing.broker import Broker
from agent.testing.fleet import (
    TOPICS,
    WAIT,
    active,
    agent,
    agent_config,
    agent_process,
    bundle_server,
    deployment,
    downloading_past,
    failed,
    mqtt_settings,
    watcher,
    write_agent_toml,
)
from agent.testing.models import make_onnx
from agent.transport.fetch import TransferSettings
from agent.transport.messages import BlockRequest, decode_block_reply
from agent.transport.session import InboxItem, Incoming, Session
from tests.conftest import Keys, broker_fixture

STOCK_LIMITS = ["max_queued_messages 1000", "max_inflight_messages 20"]
BLOCK = 4096


broker = broker_fixture(extra=STOCK_LIMITS)


@pytest.fixture
def big_model(tmp_path: Path) -> Path:
    """About 1 MiB of weights: some 260 blocks of 4 KiB."""
    return make_onnx(tmp_path / "big.onnx", inputs=512, outputs=512, seed=7)


@pytest.fixture
def bundles(tmp_path: Path) -> Path:
    d = tmp_path / "served"
    d.mkdir()
    return d


class Requests:
    """Every block index the device asked for, with the time it asked."""

    def __init__(self) -> None:
        self.log: list[tuple[float, str, int]] = []
        self._lock = threading.Lock()

    def wrap(self, publish: Callable[..., object]) -> Callable[..., object]:
        def recording(topic: str, payload: bytes, **kw: object) -> object:
            if "/request/" in topic:
                request = BlockRequest.from_bytes(payload)
                now = time.monotonic()
                with self._lock:
                    self.log += [(now, request.kind, i) for i in request.indexes]
            return publish(topic, payload, **kw)

        return recording

    def blocks(self, since: float = float("-inf")) -> list[int]:
        with self._lock:
            return [i for t, kind, i in self.log if kind == "blocks" and t >= since]


def _bitmap(path: Path) -> set[int]:
    data = path.read_bytes()
    return {i for i in range(len(data) * 8) if data[i >> 3] & (1 << (i & 7))}


def test_transfer_completes_with_stock_broker_limits(
    tmp_path: Path, broker: Broker, keys: Keys, signed, big_model: Path, bundles: Path
) -> None:
    path, envelope = signed("1.0.0", models=[big_model], block_size=BLOCK, samples="none")
    shutil.copyfile(path, bundles / path.name)
    blocks = -(-path.stat().st_size // BLOCK)
    config = agent_config(
        tmp_path / "cam-01",
        keys.dir,
        broker,
        "cam-01",
        transfer=TransferSettings(window=16, request_timeout_s=5.0, stall_timeout_s=30.0),
    )
    requests = Requests()
    with watcher(broker) as fleet, bundle_server(broker, bundles) as served, agent(config) as dev:
        dev.session.publish = requests.wrap(dev.session.publish)  # type: ignore[method-assign]
        fleet.publish(
            TOPICS.device("cam-01").desired,
            deployment({"tiny": envelope}, keys.release, device="cam-01"),
        )
        fleet.wait("cam-01", active("tiny", "1.0.0"), what="tiny 1.0.0 active")
    stored = tmp_path / "cam-01" / "bundles"
    [bundle] = stored.glob("*.emb")
    assert bundle.read_bytes() == path.read_bytes()
    asked = requests.blocks()
    assert sorted(asked) == list(range(blocks)), "every block asked for exactly once"
    assert served[0].stats.blocks == blocks
    assert not (tmp_path / "cam-01" / "downloads" / bundle.stem).exists(), "download cleaned up"


def test_two_servers_on_mqtt_311_both_answer_and_the_device_keeps_one_copy(
    tmp_path: Path, broker: Broker, keys: Keys, signed, big_model: Path, bundles: Path
) -> None:
    """MQTT 3.1.1 has no shared subscription: each bundle server subscribes to the plain filter
    and answers every request. The device writes the first copy of a block and drops the rest."""
    path, envelope = signed("1.0.0", models=[big_model], block_size=BLOCK, samples="none")
    shutil.copyfile(path, bundles / path.name)
    blocks = -(-path.stat().st_size // BLOCK)
    config = agent_config(tmp_path / "cam-01", keys.dir, broker, "cam-01", protocol="3.1.1")
    requests = Requests()
    with (
        watcher(broker, protocol="3.1.1") as fleet,
        bundle_server(broker, bundles, protocol="3.1.1", name="a") as a,
        bundle_server(broker, bundles, protocol="3.1.1", name="b") as b,
        agent(config) as dev,
    ):
        dev.session.publish = requests.wrap(dev.session.publish)  # type: ignore[method-assign]
        fleet.publish(
            TOPICS.device("cam-01").desired,
            deployment({"tiny": envelope}, keys.release, device="cam-01"),
        )
        fleet.wait("cam-01", active("tiny", "1.0.0"), what="tiny 1.0.0 active")
    [bundle] = (tmp_path / "cam-01" / "bundles").glob("*.emb")
    assert bundle.read_bytes() == path.read_bytes()
    assert sorted(requests.blocks()) == list(range(blocks)), "every block asked for once"
    assert a[0].stats.blocks == blocks
    assert b[0].stats.blocks == blocks


def test_transfer_resumes_after_a_broker_restart_without_refetching(
    tmp_path: Path, broker: Broker, keys: Keys, signed, big_model: Path, bundles: Path
) -> None:
    path, envelope = signed("1.0.0", models=[big_model], block_size=BLOCK, samples="none")
    shutil.copyfile(path, bundles / path.name)
    blocks = -(-path.stat().st_size // BLOCK)
    config = agent_config(tmp_path / "cam-01", keys.dir, broker, "cam-01")
    requests = Requests()
    # 256 KiB/s per device: the 1 MiB bundle takes some 4 s, time enough to cut the broker.
    with (
        watcher(broker) as fleet,
        bundle_server(broker, bundles, rate_bytes_s=256 << 10),
        agent(config) as dev,
    ):
        dev.session.publish = requests.wrap(dev.session.publish)  # type: ignore[method-assign]
        fleet.publish(
            TOPICS.device("cam-01").desired,
            deployment({"tiny": envelope}, keys.release, device="cam-01"),
        )
        fleet.wait("cam-01", downloading_past("tiny", 25), what="a quarter downloaded")
        broker.stop()
        cut = time.monotonic()
        transfer = dev.rollouts["tiny"].transfer
        assert transfer is not None
        verified = {i for i in range(blocks) if transfer._has(i)}
        assert 0 < len(verified) < blocks
        time.sleep(1.0)
        broker.start()
        fleet.wait("cam-01", active("tiny", "1.0.0"), what="tiny active after the outage")
    again = set(requests.blocks(since=cut)) & verified
    assert not again, f"verified blocks fetched again: {sorted(again)[:10]}"
    assert set(requests.blocks()) == set(range(blocks))


def test_agent_killed_mid_transfer_resumes_from_its_bitmap(
    tmp_path: Path, broker: Broker, keys: Keys, signed, big_model: Path, bundles: Path
) -> None:
    path, envelope = signed("1.0.0", models=[big_model], block_size=BLOCK, samples="none")
    shutil.copyfile(path, bundles / path.name)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    blocks = -(-path.stat().st_size // BLOCK)
    config = agent_config(tmp_path / "cam-01", keys.dir, broker, "cam-01")
    toml = write_agent_toml(config, tmp_path / "agent.toml")
    log = tmp_path / "agent.log"
    with (
        block_replies(broker, "cam-01") as replies,
        watcher(broker) as fleet,
        bundle_server(broker, bundles, rate_bytes_s=256 << 10),
    ):
        fleet.publish(
            TOPICS.device("cam-01").desired,
            deployment({"tiny": envelope}, keys.release, device="cam-01"),
        )
        with agent_process(toml, log) as proc:
            fleet.wait("cam-01", downloading_past("tiny", 40), what="40% downloaded")
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            killed = time.monotonic()
        persisted = _bitmap(tmp_path / "cam-01" / "downloads" / sha / "bitmap")
        assert 0 < len(persisted) < blocks
        with agent_process(toml, log):
            fleet.wait("cam-01", active("tiny", "1.0.0"), what="active after the restart")
        # The will said offline when the process died without a DISCONNECT.
        assert any(
            m.topic.endswith("/online") and json.loads(m.payload)["state"] == "offline"
            for m in fleet.raw
        ), "no offline will"
    before = {i for t, i in replies if t < killed}
    after = [i for t, i in replies if t >= killed]
    assert not set(after) & persisted, "a block in the saved bitmap was fetched again"
    refetched = set(after) & before
    assert len(refetched) <= 2 * config.transfer.window, (len(refetched), log.read_text()[-2000:])
    stored = next((tmp_path / "cam-01" / "bundles").glob("*.emb"))
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == sha


@contextmanager
def block_replies(broker: Broker, device: str) -> Iterator[list[tuple[float, int]]]:
    """Every block reply sent to ``device``, with the time it passed the broker."""
    replies: list[tuple[float, int]] = []
    inbox: queue.SimpleQueue[InboxItem] = queue.SimpleQueue()
    observer = Session(
        mqtt_settings(broker),
        f"observer-{device}",
        inbox,
        subscriptions=[TOPICS.device(device).blocks],
        persistent=False,
    )
    stop = threading.Event()

    def drain() -> None:
        while not stop.is_set():
            try:
                item = inbox.get(timeout=0.1)
            except queue.Empty:
                continue
            if isinstance(item, Incoming):
                header, _ = decode_block_reply(item.payload)
                if header.kind == "block":
                    replies.append((time.monotonic(), header.index))

    observer.start()
    thread = threading.Thread(target=drain, daemon=True)
    thread.start()
    try:
        assert observer.connected.wait(WAIT)
        yield replies
    finally:
        observer.stop()
        stop.set()
        thread.join(5)


@contextmanager
def corrupting_server(broker: Broker, bundles: Path, bad_index: int) -> Iterator[list[int]]:
    """A bundle server whose first answer for ``bad_index`` has one byte flipped."""
    inbox: queue.SimpleQueue[InboxItem] = queue.SimpleQueue()
    session = Session(
        mqtt_settings(broker),
        "flipper",
        inbox,
        subscriptions=[TOPICS.bundle_requests_filter()],
        persistent=False,
    )
    flipped: list[int] = []

    def publish(topic: str, payload: bytes) -> None:
        header, _ = decode_block_reply(payload)
        if header.kind == "block" and header.index == bad_index and not flipped:
            flipped.append(header.index)
            payload = payload[:-1] + bytes([payload[-1] ^ 0x01])
        session.publish(topic, payload)

    catalog = BundleCatalog(bundles)
    catalog.scan()
    server = BlockServer(catalog, TOPICS, publish)
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            server.tick()
            try:
                item = inbox.get(timeout=0.1)
            except queue.Empty:
                continue
            if isinstance(item, Incoming):
                server.handle(item.topic, item.payload)

    session.start()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        assert session.connected.wait(WAIT)
        yield flipped
    finally:
        stop.set()
        thread.join(5)
        session.stop()
        server.close()


def test_block_with_a_flipped_byte_is_rejected_and_fetched_again(
    tmp_path: Path, broker: Broker, keys: Keys, signed, big_model: Path, bundles: Path
) -> None:
    path, envelope = signed("1.0.0", models=[big_model], block_size=BLOCK, samples="none")
    shutil.copyfile(path, bundles / path.name)
    config = agent_config(tmp_path / "cam-01", keys.dir, broker, "cam-01")
    requests = Requests()
    with (
        watcher(broker) as fleet,
        corrupting_server(broker, bundles, bad_index=5) as flipped,
        agent(config) as dev,
    ):
        dev.session.publish = requests.wrap(dev.session.publish)  # type: ignore[method-assign]
        fleet.publish(
            TOPICS.device("cam-01").desired,
            deployment({"tiny": envelope}, keys.release, device="cam-01"),
        )
        fleet.wait("cam-01", active("tiny", "1.0.0"), what="active despite the bad block")
    assert flipped == [5]
    assert requests.blocks().count(5) == 2, "block 5 was asked for again"
    stored = next((tmp_path / "cam-01" / "bundles").glob("*.emb"))
    assert stored.read_bytes() == path.read_bytes()


def test_blocks_held_from_an_earlier_bundle_are_not_fetched(
    tmp_path: Path, broker: Broker, keys: Keys, signed, big_model: Path, bundles: Path
) -> None:
    first, env1 = signed("1.0.0", models=[big_model], block_size=BLOCK, samples="none")
    second, env2 = signed("1.1.0", models=[big_model], block_size=BLOCK, samples="none")
    for p in (first, second):
        shutil.copyfile(p, bundles / p.name)
    blocks = -(-second.stat().st_size // BLOCK)
    config = agent_config(tmp_path / "cam-01", keys.dir, broker, "cam-01")
    requests = Requests()
    desired = TOPICS.device("cam-01").desired
    with watcher(broker) as fleet, bundle_server(broker, bundles), agent(config) as dev:
        dev.session.publish = requests.wrap(dev.session.publish)  # type: ignore[method-assign]
        fleet.publish(
            desired, deployment({"tiny": env1}, keys.release, device="cam-01", sequence=1)
        )
        fleet.wait("cam-01", active("tiny", "1.0.0"))
        mark = time.monotonic()
        fleet.publish(
            desired, deployment({"tiny": env2}, keys.release, device="cam-01", sequence=2)
        )
        fleet.wait("cam-01", active("tiny", "1.1.0"))
    fetched = requests.blocks(since=mark)
    # Only the manifest and headers changed; the model's blocks came from the first bundle.
    assert 0 < len(fetched) <= 4, fetched
    assert len(fetched) < blocks
    stored = (
        tmp_path / "cam-01" / "bundles" / f"{hashlib.sha256(second.read_bytes()).hexdigest()}.emb"
    )
    assert stored.read_bytes() == second.read_bytes()


def test_not_enough_disk_fails_before_the_first_block(
    tmp_path: Path, broker: Broker, keys: Keys, signed, bundles: Path
) -> None:
    path, envelope = signed("1.0.0", block_size=BLOCK)
    shutil.copyfile(path, bundles / path.name)
    free_mb = shutil.disk_usage(tmp_path).free >> 20
    config = agent_config(
        tmp_path / "cam-01",
        keys.dir,
        broker,
        "cam-01",
        transfer=TransferSettings(reserve_mb=free_mb + 1024),
    )
    requests = Requests()
    with watcher(broker) as fleet, bundle_server(broker, bundles), agent(config) as dev:
        dev.session.publish = requests.wrap(dev.session.publish)  # type: ignore[method-assign]
        fleet.publish(
            TOPICS.device("cam-01").desired,
            deployment({"tiny": envelope}, keys.release, device="cam-01"),
        )
        reported = fleet.wait("cam-01", failed("tiny"), what="failed")
    error = reported.models["tiny"].error
    assert error is not None
    assert error.code == "disk-full"
    assert "MiB free" in error.message
    assert requests.blocks() == [], "no block requested"
    assert not list((tmp_path / "cam-01").rglob("bundle.part"))


@pytest.mark.parametrize(
    ("serve_it", "code"), [(False, "transfer-timeout"), (True, "bundle-unavailable")]
)
def test_no_answer_fails_with_a_clear_error_after_a_bounded_time(
    tmp_path: Path, broker: Broker, keys: Keys, signed, bundles: Path, serve_it: bool, code: str
) -> None:
    """No server at all, or a server without the bundle: a reported error, not a hang."""
    _, envelope = signed("1.0.0", block_size=BLOCK)
    config = agent_config(
        tmp_path / "cam-01",
        keys.dir,
        broker,
        "cam-01",
        transfer=TransferSettings(request_timeout_s=0.5, stall_timeout_s=2.0),
    )
    with watcher(broker) as fleet, agent(config):
        ctx = bundle_server(broker, bundles) if serve_it else _nothing()
        with ctx:
            fleet.publish(
                TOPICS.device("cam-01").desired,
                deployment({"tiny": envelope}, keys.release, device="cam-01"),
            )
            reported = fleet.wait("cam-01", failed("tiny"), timeout=15, what="failed")
    error = reported.models["tiny"].error
    assert error is not None
    assert error.code == code
    assert reported.models["tiny"].version is None, "nothing was installed"


@contextmanager
def _nothing() -> Iterator[None]:
    yield None


def test_backoff_is_jittered_exponential_and_bounded() -> None:
    import random

    from agent.transport.session import backoff_delay

    rng = random.Random(1)
    for attempt in range(12):
        ceiling = min(8.0, 0.5 * 2**attempt)
        delays = [backoff_delay(attempt, 0.5, 8.0, rng) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 40, "jittered, not in step"
    assert os.cpu_count()


def test_largest_block_size_transfers(
    tmp_path: Path, broker: Broker, keys: Keys, signed, big_model: Path, bundles: Path
) -> None:
    """1 MiB blocks (the largest a descriptor may sign) fit the device's reply limit."""
    path, envelope = signed("1.0.0", models=[big_model], block_size=1 << 20, samples="none")
    shutil.copyfile(path, bundles / path.name)
    config = agent_config(tmp_path / "cam-01", keys.dir, broker, "cam-01")
    with watcher(broker) as fleet, bundle_server(broker, bundles) as served, agent(config):
        fleet.publish(
            TOPICS.device("cam-01").desired,
            deployment({"tiny": envelope}, keys.release, device="cam-01"),
        )
        fleet.wait("cam-01", active("tiny", "1.0.0"))
    assert served[0].stats.blocks == -(-path.stat().st_size // (1 << 20))
