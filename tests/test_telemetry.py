"""Telemetry: the collectors, the on-disk store-and-forward queue, and forwarding over a real broker.

Fakes, only for what cannot exist on this machine: a Jetson's sysfs tree (written under tmp_path)
and the ``pynvml`` module (no NVIDIA GPU or driver here). Everything else is real: psutil on this
machine, SQLite files, a ``kill -9`` of a real process, mosquitto stopped and started again.
"""

from __future__ import annotations

import contextlib
import math
import queue
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.serving.metrics import ApiMetrics
from agent.telemetry import (
    Forwarder,
    InferenceCollector,
    ModelStats,
    StoreQueue,
    acked_publish,
    bounded,
    collect_inference,
    collect_system,
    snapshot_from_metrics,
)
from agent.telemetry.collect import MAX_METRICS, histogram_quantile
from agent.testing.broker import Broker
from agent.testing.wait import wait_until
from agent.transport.session import InboxItem, MqttSettings, Session

REPO = Path(__file__).resolve().parent.parent
WAIT = 60.0  # seconds; the bound of every wait in these tests (a passing run waits less)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- collect_system -------------------------------------------------------------------------------


def test_collect_system_reads_this_machine(tmp_path: Path) -> None:
    collect_system(tmp_path)  # the CPU percentages count from the previous call
    busy = time.monotonic() + 0.05
    while time.monotonic() < busy:
        pass
    metrics = collect_system(tmp_path)

    expected = {
        "cpu.percent",
        "cpu.load1",
        "cpu.load5",
        "cpu.load15",
        "mem.used_mb",
        "mem.available_mb",
        "mem.percent",
        "proc.rss_mb",
        "proc.cpu_percent",
        "proc.threads",
        "disk.state_free_mb",
        "disk.state_used_mb",
        "disk.state_percent",
    }
    assert expected <= set(metrics)
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
    assert all(len(name) <= 128 for name in metrics)
    assert len(metrics) <= MAX_METRICS
    assert metrics["proc.rss_mb"] > 1
    assert metrics["proc.threads"] >= 1
    assert 0 <= metrics["mem.percent"] <= 100
    assert metrics["mem.available_mb"] > 0
    assert metrics["disk.state_free_mb"] > 0
    assert 0 <= metrics["cpu.percent"] <= 100


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_jetson_gpu_load_and_thermal_zones_from_sysfs(tmp_path: Path) -> None:
    # FAKE: a Jetson's sysfs tree, written by hand (no Jetson here); the layout and units are
    # the kernel's: GPU load in per mille, zone temperatures in millidegrees Celsius.
    sysfs = tmp_path / "sys"
    write(sysfs / "devices/gpu.0/load", "537\n")
    zones = sysfs / "class/thermal"
    for i, (kind, temp) in enumerate(
        [
            ("CPU-therm", "45500"),
            ("GPU-therm", "41000"),
            ("cpu-thermal", "47000"),  # the same sensor under another name: the max wins
            ("PMIC-Die", "-256000"),  # a disabled zone's sentinel: left out
            ("AO-therm", "garbage"),
        ]
    ):
        write(zones / f"thermal_zone{i}/type", kind + "\n")
        write(zones / f"thermal_zone{i}/temp", temp + "\n")

    metrics = collect_system(tmp_path, sysfs=sysfs)

    assert metrics["jetson.gpu_util_pct"] == pytest.approx(53.7)
    assert metrics["temp.cpu_c"] == pytest.approx(47.0)
    assert metrics["temp.gpu_c"] == pytest.approx(41.0)
    assert not any(name.startswith(("temp.pmic", "temp.ao")) for name in metrics)


def test_jetson_orin_gpu_load_path(tmp_path: Path) -> None:
    # FAKE sysfs, as on an Orin (ga10b under platform devices).
    sysfs = tmp_path / "sys"
    write(sysfs / "devices/platform/17000000.ga10b/load", "1000")
    assert collect_system(tmp_path, sysfs=sysfs)["jetson.gpu_util_pct"] == 100.0


class FakeNvml:
    """FAKE ``pynvml`` (no NVIDIA GPU or driver on this machine): two GPUs, the second
    without a temperature sensor, with the calls and return shapes of nvidia-ml-py."""

    NVML_TEMPERATURE_GPU = 0

    class NVMLError(Exception):
        pass

    class _Util:
        def __init__(self, gpu: int) -> None:
            self.gpu = gpu
            self.memory = 0

    class _Memory:
        def __init__(self, used: int, total: int) -> None:
            self.used, self.total, self.free = used, total, total - used

    def __init__(self, init_fails: bool = False) -> None:
        self.init_fails = init_fails
        self.shutdowns = 0

    def nvmlInit(self) -> None:
        if self.init_fails:
            raise self.NVMLError("Driver Not Loaded")

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> Any:
        return self._Util([87, 3][handle])

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        return self._Memory(used=(handle + 1) * 1024**3, total=16 * 1024**3)

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        if handle == 1:
            raise self.NVMLError("Not Supported")
        return 66


def test_nvml_gpus_through_a_fake_pynvml(tmp_path: Path) -> None:
    nvml = FakeNvml()
    metrics = collect_system(tmp_path, sysfs=tmp_path / "nosys", nvml=nvml)

    assert metrics["gpu0.util_pct"] == 87.0
    assert metrics["gpu0.mem_used_mb"] == 1024.0
    assert metrics["gpu0.mem_total_mb"] == 16384.0
    assert metrics["gpu0.temp_c"] == 66.0
    assert metrics["gpu1.util_pct"] == 3.0
    assert metrics["gpu1.mem_used_mb"] == 2048.0
    assert "gpu1.temp_c" not in metrics  # that sensor failed; the rest of the GPU is reported
    assert nvml.shutdowns == 1


def test_nvml_without_a_driver_reports_no_gpu(tmp_path: Path) -> None:
    metrics = collect_system(tmp_path, nvml=FakeNvml(init_fails=True))
    assert not any(name.startswith("gpu") for name in metrics)
    assert "mem.used_mb" in metrics


# -- inference ----------------------------------------------------------------------------------


def test_collect_inference_rates_and_percentiles() -> None:
    before = {"tiny": ModelStats(requests=100, errors=1)}
    now = {
        "tiny": ModelStats(requests=300, errors=11, latencies_s=[i / 1000 for i in range(1, 101)]),
        "det/v2 big": ModelStats(requests=5, errors=0),
    }
    metrics = collect_inference(now, before, elapsed_s=10.0)

    assert metrics["model.tiny.rps"] == 20.0
    assert metrics["model.tiny.errors_per_s"] == 1.0
    assert metrics["model.tiny.requests"] == 300.0
    assert metrics["model.tiny.errors"] == 11.0
    assert metrics["model.tiny.p50_ms"] == pytest.approx(51.0)
    assert metrics["model.tiny.p99_ms"] == pytest.approx(100.0)
    assert metrics["model.det_v2_big.rps"] == 0.5  # new since the last reading
    assert "model.det_v2_big.p50_ms" not in metrics  # no latencies, no percentile
    # A restarted serving layer (counts went down) is not a negative rate.
    reset = collect_inference({"tiny": ModelStats(3, 0)}, now, elapsed_s=1.0)
    assert reset["model.tiny.rps"] == 3.0
    assert "model.tiny.rps" not in collect_inference(now)  # no previous reading: no rate


def test_histogram_quantile_interpolates() -> None:
    buckets = [(0.01, 50), (0.1, 100), (math.inf, 100)]
    assert histogram_quantile(buckets, 0.5) == pytest.approx(0.01)
    assert histogram_quantile(buckets, 0.75) == pytest.approx(0.055)
    assert histogram_quantile([(0.01, 0), (math.inf, 4)], 0.99) == 0.01
    assert histogram_quantile([(math.inf, 0)], 0.5) is None


def test_inference_metrics_from_the_api_metrics() -> None:
    api = ApiMetrics()
    clock = Clock()
    collector = InferenceCollector(lambda: snapshot_from_metrics(api), clock=clock)
    for _ in range(10):
        api.record_request("tiny", "success", seconds=0.004)
    first = collector.collect()
    assert first["model.tiny.requests"] == 10.0
    assert "model.tiny.rps" not in first

    for _ in range(18):
        api.record_request("tiny", "success", seconds=0.2)
    api.record_request("tiny", "error", reason="runtime", seconds=0.3)
    api.record_request("tiny", "rejected", reason="queue_full")
    api.record_request("nosuch", "not_found")  # counted under "nosuch" by the API's caller
    clock.now += 10.0
    second = collector.collect()

    assert second["model.tiny.requests"] == 30.0
    assert second["model.tiny.errors"] == 2.0
    assert second["model.tiny.rps"] == 2.0
    assert second["model.tiny.errors_per_s"] == 0.2
    # Percentiles of this interval only (the fast first ten are not in it): 0.1 < 0.2 <= 0.25 s.
    assert 100.0 < second["model.tiny.p50_ms"] <= 250.0
    assert 250.0 < second["model.tiny.p99_ms"] <= 500.0
    assert second["model.nosuch.errors"] == 1.0


def test_bounded_keeps_what_a_telemetry_message_allows() -> None:
    system = {"cpu.percent": 1.0, "x" * 129: 2.0, "bad": math.nan}
    models = {f"model.m{i:03}.rps": float(i) for i in range(300)}
    merged = bounded(system, models)
    assert len(merged) == MAX_METRICS
    assert merged["cpu.percent"] == 1.0
    assert "bad" not in merged
    assert all(len(name) <= 128 for name in merged)
    assert "model.m000.rps" in merged
    assert "model.m299.rps" not in merged


# -- the queue ----------------------------------------------------------------------------------


def rows(path: Path) -> list[int]:
    """What another connection sees committed in the file (ids in order)."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        return [int(i) for (i,) in db.execute("SELECT id FROM items ORDER BY id")]


def payloads(items: list[Any]) -> list[bytes]:
    return [i.payload for i in items]


def test_queue_keeps_order_across_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite"
    with StoreQueue(path, batch_items=7) as q:
        for i in range(20):
            q.put("t/a" if i % 2 else "t/b", b"%d" % i)
        first = q.peek(5)
        q.ack(first[-1].id)
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"

    with StoreQueue(path, batch_items=7) as q:
        assert len(q) == 15
        items = q.peek(100)
        assert payloads(items) == [b"%d" % i for i in range(5, 20)]
        assert [i.topic for i in items[:2]] == ["t/a", "t/b"]
        q.put("t/a", b"20")
        assert q.peek(100)[-1].payload == b"20"
        assert q.peek(100)[-1].id > items[-1].id


def test_queue_count_bound_drops_the_oldest_and_counts(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite"
    with StoreQueue(path, max_items=10, batch_items=4) as q:
        for i in range(25):
            q.put("t", b"%d" % i)
        assert len(q) == 10
        assert q.dropped == 15
        assert payloads(q.peek(100)) == [b"%d" % i for i in range(15, 25)]
    with StoreQueue(path, max_items=10, batch_items=4) as q:
        assert q.dropped == 15  # persisted
        assert payloads(q.peek(100)) == [b"%d" % i for i in range(15, 25)]


def test_queue_byte_bound_drops_the_oldest(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite"
    # Each item is 1 (topic) + 99 bytes: 1000 bytes hold 10.
    with StoreQueue(path, max_bytes=1000, batch_items=3) as q:
        for i in range(14):
            q.put("t", bytes([i]) * 99)
        assert q.size_bytes <= 1000
        assert [i.payload[0] for i in q.peek(100)] == list(range(4, 14))
        assert q.dropped == 4
        q.put("t", b"x" * 2000)  # alone over the bound: dropped, the rest kept
        assert q.dropped == 5
        assert len(q) == 10
    with StoreQueue(path, max_bytes=1000) as q:
        assert q.size_bytes == 1000
        assert q.dropped == 5


def test_queue_batches_its_writes(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite"
    clock = Clock()
    q = StoreQueue(path, batch_items=10, batch_seconds=30.0, clock=clock)
    try:
        for i in range(25):
            q.put("t", b"%d" % i)
        assert q.commits == 2  # two full batches, one transaction each
        assert len(rows(path)) == 20  # the last 5 are in memory only
        assert len(q) == 25

        q.tick()
        assert q.commits == 2  # not due yet
        clock.now += 30.0
        q.tick()
        assert q.commits == 3
        assert len(rows(path)) == 25

        # Acknowledgements are written with the next batch (one transaction, when due).
        q.ack(q.peek(100)[-1].id)
        assert q.commits == 3
        assert len(rows(path)) == 25
        clock.now += 30.0
        q.tick()
        assert q.commits == 4
        assert rows(path) == []

        # Sent and acknowledged before its batch was due: never written at all.
        q.put("t", b"quick")
        (item,) = q.peek(100)
        assert item.payload == b"quick"
        q.ack(item.id)
        assert len(q) == 0
        clock.now += 30.0
        q.tick()
        q.flush()
        assert q.commits == 4  # nothing pending: no transaction
    finally:
        q.close()
    assert q.commits == 4
    assert rows(path) == []


KILLED = """
import os, signal, sys
sys.path.insert(0, {repo!r})
from agent.telemetry.queue import StoreQueue
q = StoreQueue({path!r}, batch_items=10, batch_seconds=3600)
for i in range(25):
    q.put("t", b"%d" % i)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_queue_loses_at_most_the_unwritten_batch_to_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite"
    script = textwrap.dedent(KILLED.format(repo=str(REPO), path=str(path)))
    proc = subprocess.run([sys.executable, "-c", script], timeout=WAIT, check=False)
    assert proc.returncode == -signal.SIGKILL

    with StoreQueue(path) as q:
        # The two written batches survive in order; the 5 in memory were lost.
        assert payloads(q.peek(100)) == [b"%d" % i for i in range(20)]


# -- forwarding ---------------------------------------------------------------------------------


def test_forwarder_sends_in_order_and_stops_at_a_failure(tmp_path: Path) -> None:
    sent: list[bytes] = []
    up = True
    fail_at = {b"3"}

    def publish(topic: str, payload: bytes) -> bool:
        if payload in fail_at:
            return False
        sent.append(payload)
        return True

    with StoreQueue(tmp_path / "q.sqlite", batch_items=4) as q:
        forwarder = Forwarder(q, publish, lambda: up, batch=2)
        for i in range(6):
            q.put("t", b"%d" % i)
        assert forwarder.drain() == 3
        assert sent == [b"0", b"1", b"2"]
        assert payloads(q.peek(1)) == [b"3"]  # kept, tried again next time

        up = False
        fail_at.clear()
        assert forwarder.drain() == 0
        assert len(q) == 3
        up = True
        assert forwarder.drain(limit=2) == 2
        assert forwarder.drain() == 1
        assert sent == [b"%d" % i for i in range(6)]
        assert len(q) == 0


class Subscriber:
    """A plain paho client that subscribes again on every connect; ``ready`` once it holds."""

    def __init__(self, broker: Broker, topic: str) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.ready = threading.Event()
        self._lock = threading.Lock()
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="telemetry-subscriber")
        client.reconnect_delay_set(1, 1)
        client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, 1)
        client.on_subscribe = lambda c, u, mid, rcs, p: self.ready.set()
        client.on_disconnect = lambda c, u, f, rc, p: self.ready.clear()
        client.on_message = self._on_message
        client.connect(broker.host, broker.port, keepalive=5)
        client.loop_start()
        self.client = client

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((message.topic, bytes(message.payload)))

    def received(self) -> list[tuple[str, bytes]]:
        with self._lock:
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_forwarder_holds_telemetry_through_a_broker_outage(broker: Broker, tmp_path: Path) -> None:
    topic = "ema/v1/devices/box-1/telemetry"
    inbox: queue.SimpleQueue[InboxItem] = queue.SimpleQueue()
    settings = MqttSettings(
        host=broker.host,
        port=broker.port,
        tls=False,
        backoff_initial_s=0.05,
        backoff_max_s=0.2,
        keepalive_s=5,
        connect_timeout_s=2.0,
    )
    session = Session(settings, "box-1", inbox)
    subscriber = Subscriber(broker, topic)
    q = StoreQueue(tmp_path / "q.sqlite", max_items=40, batch_items=8)
    # The forwarder's gate is the session's connection; the test also waits for its own
    # subscriber to hold its subscription again, so that what is sent has someone to reach.
    forwarder = Forwarder(
        q,
        acked_publish(session.publish, timeout=5.0),
        lambda: session.connected.is_set() and subscriber.ready.is_set(),
    )
    session.start()
    try:
        wait_until(
            lambda: session.connected.is_set() and subscriber.ready.is_set(),
            WAIT,
            message="connect",
        )
        for i in range(5):
            q.put(topic, b"before-%d" % i)
            forwarder.drain()
        wait_until(lambda: len(subscriber.received()) == 5, WAIT, message="the first five")

        broker.stop()
        wait_until(
            lambda: not session.connected.is_set(), WAIT, message="the session to see the outage"
        )
        for i in range(50):  # 10 over the bound of 40: the oldest 10 go
            q.put(topic, b"during-%d" % i)
            assert forwarder.drain() == 0
        assert len(q) == 40
        assert q.dropped == 10

        broker.start()
        wait_until(
            lambda: session.connected.is_set() and subscriber.ready.is_set(),
            WAIT,
            message="reconnect",
        )
        deadline = time.monotonic() + WAIT
        while len(q) and time.monotonic() < deadline:
            forwarder.drain()
        assert len(q) == 0
        expected = [b"before-%d" % i for i in range(5)] + [b"during-%d" % i for i in range(10, 50)]
        wait_until(lambda: len(subscriber.received()) >= len(expected), WAIT, message="the backlog")
        assert [p for _, p in subscriber.received()] == expected
        assert {t for t, _ in subscriber.received()} == {topic}
    finally:
        session.stop()
        subscriber.close()
        q.close()


def test_every_metric_collected_is_in_the_documented_table(tmp_path: Path) -> None:
    """docs/protocol.md lists agent.transport.messages.METRICS: each name collected here (this
    machine, a FAKE Jetson sysfs, the FAKE pynvml, two models) is one of its entries, and every
    entry but the hardware this machine lacks was seen."""
    from agent.transport.messages import METRICS, metric_pattern

    sysfs = tmp_path / "sys"
    write(sysfs / "devices/gpu.0/load", "537\n")
    write(sysfs / "class/thermal/thermal_zone0/type", "CPU-therm\n")
    write(sysfs / "class/thermal/thermal_zone0/temp", "45500\n")
    names = set(collect_system(tmp_path, sysfs=sysfs, nvml=FakeNvml()))
    latencies = [i / 1000 for i in range(1, 101)]
    before = {"tiny": ModelStats(requests=1, errors=0)}
    now = {"tiny": ModelStats(requests=9, errors=1, latencies_s=latencies)}
    names |= set(collect_inference(now, before, elapsed_s=1.0))
    patterns = {entry: metric_pattern(entry) for entry, _, _ in METRICS}
    unknown = sorted(n for n in names if not any(p.match(n) for p in patterns.values()))
    assert unknown == []
    unseen = sorted(e for e, p in patterns.items() if not any(p.match(n) for n in names))
    assert unseen == []
