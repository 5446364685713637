"""Block transfer over a loopback mosquitto, against plain paho at the same message size.

Everything runs on 127.0.0.1: a mosquitto this script starts on a free port with its own config
(the throughput settings of config/broker/mosquitto.conf, plus ``--broker-option`` lines), a
bundle server (``agent.fleet.server.serve``) in its own process, and devices. Progress goes to
stderr; the last line of stdout is one JSON object:

  agent_s       one device, a real ``edge-agent run`` process, pulls the bundle: from its
                ``downloading`` event to its ``loading`` event (the events' own timestamps), i.e.
                block list and every block fetched, each checked against its signed hash and
                written, then the archive's structure checked against the signed manifest
  raw_s         the same bytes in messages of one block each, a paho publisher (QoS 1, its own
                process) to a paho subscriber through the same broker (best of two runs)
  ratio         raw_s / agent_s (goal >= 0.7)
  refetched_bytes_after_kill
                an ``edge-agent run`` killed (SIGKILL) half way and started again: bytes of
                blocks that were verified and written before the kill and were fetched again
                (goal <= window * block_size)
  devices_N_mib_s
                N devices (in-process Transfers, one MQTT session each, one driving thread)
                pull one smaller bundle at once from the same server; total bytes over the wall
                time from the first start to the last structure check

The bundle server runs with a per-device rate limit far above what loopback can carry
(``server_rate_bytes_s``), so it never throttles. ``*_cpu_s`` are the CPU seconds each process
spent during a measurement. ``--profile DIR`` runs only the single-device pull and its baseline,
with the device and the server under cProfile (the main loops and the MQTT network threads);
the summaries go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import logging
import os
import platform
import pstats
import queue
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import paho.mqtt
import paho.mqtt.client as mqtt
from _common import cpu_s, fs_type, say, shipped_broker_lines
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from agent.bundle.manifest import DEFAULT_BLOCK_SIZE
from agent.bundle.verify import check_bundle
from agent.config import load_config
from agent.daemon import DeviceAgent
from agent.device.transfer import Transfer
from agent.errors import EdgeAgentError
from agent.fleet.build import BuildOptions, build_bundle
from agent.fleet.keys import KeyStore, load_signer
from agent.fleet.server import serve
from agent.fleet.sign import sign_bundle
from agent.testing.broker import HOST, Broker, plain_broker
from agent.testing.fleet import (
    TOPICS,
    agent_config,
    deployment,
    mqtt_settings,
    write_agent_toml,
)
from agent.testing.models import make_onnx
from agent.transport.fetch import TransferSettings
from agent.transport.messages import (
    BlockRequest,
    Event,
    Online,
    Phase,
    decode_block_reply,
)
from agent.transport.session import Connection, InboxItem, Incoming, MqttSettings, Session
from agent.trust.keys import Signer
from agent.trust.metadata import BundleDescriptor

MiB = 1 << 20
WAIT_S = 30.0  # connecting, subscribing, a process starting or stopping
SERVER_RATE = float(1 << 40)  # bytes/s per device: far above loopback, so never the limit
BROKER_EXTRA = (
    # Stock mosquitto drops QoS 1 messages beyond 1000 queued per client; the raw publisher has
    # no window and may get that far ahead of its subscriber. Devices never queue more than
    # their window.
    "max_queued_messages 1000000",
)
# Lines of the shipped broker config that shape throughput; the bench's broker uses them too.
SHIPPED_TUNING = (
    "max_inflight_messages",
    "max_inflight_bytes",
    "max_packet_size",
    "set_tcp_nodelay",
)
RAW_TOPIC = "bench/raw"
PROBE_DEVICE = "bench-probe"


# -- bundles ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SignedBundle:
    name: str
    path: Path
    envelope: bytes
    descriptor: BundleDescriptor

    @property
    def size(self) -> int:
        return self.descriptor.bundle_size

    @property
    def count(self) -> int:
        return self.descriptor.block_count

    def block_length(self, index: int) -> int:
        bs = self.descriptor.block_size
        return min(bs, self.size - index * bs)


@dataclass
class Fleet:
    keys: KeyStore
    signer: Signer
    served: Path

    def bundle(self, name: str, size_mib: float, block_size: int, seed: int) -> SignedBundle:
        """A bundle of one ONNX model whose weights take ``size_mib`` MiB, signed."""
        columns = max(1, round(size_mib * MiB / (8192 * 4)))
        with tempfile.TemporaryDirectory(prefix="bench-model-") as tmp:
            model = make_onnx(Path(tmp) / f"{name}.onnx", inputs=8192, outputs=columns, seed=seed)
            result = build_bundle(
                [model],
                self.served / f"{name}.emb",
                BuildOptions(name=name, version="1.0.0", samples="none", block_size=block_size),
            )
        now = datetime.now(timezone.utc)
        out, _ = sign_bundle(result.path, [self.signer], now=now)
        envelope = out.read_bytes()
        verified = self.keys.state(now).verify_descriptor(envelope, now)
        return SignedBundle(name, result.path, envelope, verified.descriptor)


def make_fleet(directory: Path) -> Fleet:
    store = KeyStore.init(directory / "keys", now=datetime.now(timezone.utc))
    served = directory / "served"
    served.mkdir()
    return Fleet(store, load_signer(store.release_key_paths()[0]), served)


# -- the bench's own MQTT clients ----------------------------------------------------------------
class Client:
    """A plain paho client on its own loop thread; ``handler`` runs on that thread."""

    def __init__(
        self,
        port: int,
        client_id: str,
        subscriptions: Sequence[str] = (),
        handler: Callable[[str, bytes], None] | None = None,
    ) -> None:
        self._subscriptions = list(subscriptions)
        self._handler = handler
        self.ready = threading.Event()
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        self._client.max_queued_messages_set(0)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._client.connect(HOST, port, keepalive=30)
        self._client.loop_start()
        if not self.ready.wait(WAIT_S):
            self.close()
            raise RuntimeError(f"{client_id} could not connect and subscribe")

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Any,
    ) -> None:
        if reason_code.is_failure:
            return
        if self._subscriptions:
            client.subscribe([(t, 1) for t in self._subscriptions])
        else:
            self.ready.set()

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Any,
    ) -> None:
        if not any(rc.is_failure for rc in reason_codes):
            self.ready.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if self._handler is not None:
            self._handler(message.topic, bytes(message.payload))

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(WAIT_S)
        if not info.is_published():
            raise RuntimeError(f"no PUBACK for {topic}")

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


class EventLog:
    """Every device's events, as they arrive."""

    def __init__(self, port: int) -> None:
        self._lock = threading.Condition()
        self.events: list[Event] = []
        self.online: set[str] = set()
        self.client = Client(
            port,
            f"bench-events-{os.getpid()}",
            [TOPICS.all_devices_filter("events"), TOPICS.all_devices_filter("online")],
            self._on,
        )

    def _on(self, topic: str, payload: bytes) -> None:
        ref = TOPICS.parse(topic)
        with self._lock:
            if ref.channel == "online":
                if payload and Online.from_bytes(payload).state == "online":
                    self.online.add(ref.id)
                else:
                    self.online.discard(ref.id)
            else:
                self.events.append(Event.from_bytes(payload))
            self._lock.notify_all()

    def wait_online(self, device: str, *, timeout: float) -> None:
        with self._lock:
            if not self._lock.wait_for(lambda: device in self.online, timeout):
                raise RuntimeError(f"{device} did not come online in {timeout} s")

    def mark(self) -> int:
        with self._lock:
            return len(self.events)

    def wait_phase(
        self, device: str, phases: Sequence[Phase], *, since: int = 0, timeout: float
    ) -> Event:
        """The first ``phase`` event of ``device`` in ``phases`` (or failed) after ``since``."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                for event in self.events[since:]:
                    if event.device_id != device or event.kind != "phase":
                        continue
                    if event.phase == Phase.FAILED:
                        raise RuntimeError(f"{device} failed: {event.error}")
                    if event.phase in phases:
                        return event
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"{device}: no {[p.value for p in phases]} in {timeout} s")
                self._lock.wait(min(left, 0.5))

    def close(self) -> None:
        self.client.close()


# -- processes ----------------------------------------------------------------------------------
def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise RuntimeError(f"process {proc.pid} said nothing in {timeout} s")
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"process {proc.pid} exited with {proc.wait(WAIT_S)}")
    return line.strip()


def stop_process(proc: subprocess.Popen[Any], *, kill: bool = False) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(WAIT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(WAIT_S)


class CpuMeter:
    """CPU seconds that named processes spend between :meth:`start` and :meth:`stop`."""

    def __init__(self, **pids: int) -> None:
        self.pids = pids
        self.used: dict[str, float] = {}
        self._start: dict[str, float] = {}
        self._wall = 0.0

    def _sample(self) -> dict[str, float]:
        found = {name: cpu_s(pid) for name, pid in self.pids.items()}
        for name, pid in self.pids.items():  # a process's main thread has the process's id
            found[f"{name}_main_thread"] = cpu_s(pid, pid)
        return found

    def start(self) -> None:
        self._start = self._sample()
        self._wall = time.monotonic()

    def stop(self) -> dict[str, float]:
        now = self._sample()
        self.used = {name: round(now[name] - self._start[name], 2) for name in now}
        self.used["wall"] = round(time.monotonic() - self._wall, 2)
        return self.used


def bench_command(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *args]


@dataclass
class Server:
    proc: subprocess.Popen[str]
    stats: dict[str, int] = field(default_factory=dict)


@contextlib.contextmanager
def bundle_server(
    broker: Broker,
    served: Path,
    probe: SignedBundle,
    logs: Path,
    profile: Path | None,
) -> Iterator[Server]:
    """``serve`` in its own process; yields once it answers a request; stats after it stops."""
    command = bench_command(
        "--role", "server", "--port", str(broker.port), "--bundles", str(served)
    )
    if profile is not None:
        command += ["--profile", str(profile)]
    with open(logs / "server.log", "ab") as err:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, text=True)
    server = Server(proc)
    try:
        _probe(broker, probe)
        yield server
    finally:
        stop_process(proc)
        assert proc.stdout is not None
        out = proc.stdout.read().strip().splitlines()
        proc.stdout.close()
        if out:
            server.stats = json.loads(out[-1])


def _probe(broker: Broker, bundle: SignedBundle) -> None:
    """Ask for block-list page 0 until the server answers (it has subscribed then)."""
    answered = threading.Event()
    client = Client(
        broker.port,
        f"bench-probe-{os.getpid()}",
        [TOPICS.device(PROBE_DEVICE).blocks],
        lambda topic, payload: answered.set(),
    )
    request = BlockRequest(
        device_id=PROBE_DEVICE,
        bundle_sha256=bundle.descriptor.bundle_sha256,
        kind="block-list",
        indexes=[0],
    ).to_bytes()
    try:
        deadline = time.monotonic() + WAIT_S
        while not answered.is_set():
            if time.monotonic() > deadline:
                raise RuntimeError("the bundle server never answered")
            client.publish(
                TOPICS.bundle_request(bundle.descriptor.bundle_sha256, PROBE_DEVICE), request
            )
            answered.wait(0.5)
    finally:
        client.close()


def spawn_device(config_file: Path, log_file: Path, profile: Path | None) -> subprocess.Popen[str]:
    """``edge-agent run`` as a process of its own; with ``profile``, the same (load the config,
    run a DeviceAgent until SIGTERM) from this script, under cProfile."""
    if profile is None:
        command = [str(Path(sys.executable).parent / "edge-agent"), "run", "--config"]
        command.append(str(config_file))
    else:
        command = bench_command("--role", "device", "--config", str(config_file))
        command += ["--profile", str(profile)]
    with open(log_file, "ab") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, text=True)


# -- roles run as processes of their own -----------------------------------------------------------
def profile_sessions(directory: Path, tag: str) -> None:
    """Run every Session's network thread under a profiler of its own (dumped when it ends)."""
    original = Session._run

    def run(self: Session) -> None:
        profiler = cProfile.Profile()
        profiler.enable()
        try:
            original(self)
        finally:
            profiler.disable()
            profiler.dump_stats(str(directory / f"{tag}-mqtt-thread.prof"))

    Session._run = run  # type: ignore[method-assign]


def server_role(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    settings = MqttSettings(
        host=HOST, port=args.port, tls=False, backoff_initial_s=0.2, backoff_max_s=1.0
    )

    def run() -> dict[str, int]:
        server = serve(
            args.bundles,
            settings,
            topics=TOPICS,
            client_id=f"bench-server-{os.getpid()}",
            rate_bytes_s=SERVER_RATE,
            stop=stop,
        )
        return vars(server.stats)

    if args.profile is not None:
        profile_sessions(args.profile, "server")
        profiler = cProfile.Profile()
        stats = profiler.runcall(run)
        profiler.dump_stats(str(args.profile / "server-main-thread.prof"))
    else:
        stats = run()
    print(json.dumps(stats), flush=True)
    return 0


def device_role(args: argparse.Namespace) -> int:
    """What ``edge-agent run`` does, under cProfile."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = load_config(args.config)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if args.profile is not None:
        profile_sessions(args.profile, "device")
    device = DeviceAgent(config)
    if args.profile is None:
        device.run(stop)
        return 0
    profiler = cProfile.Profile()
    profiler.runcall(device.run, stop)
    profiler.dump_stats(str(args.profile / "device-main-thread.prof"))
    return 0


def publisher_role(args: argparse.Namespace) -> int:
    """Plain paho, QoS 1: say ``ready``, wait for a line, publish, say ``done`` once all are acked."""
    connected = threading.Event()
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{os.getpid()}", protocol=mqtt.MQTTv5
    )
    client.max_inflight_messages_set(20)  # as the agent's sessions
    client.max_queued_messages_set(0)
    client.on_connect = lambda *_: connected.set()
    client.connect(HOST, args.port, keepalive=30)
    client.loop_start()
    try:
        if not connected.wait(WAIT_S):
            return 1
        print("ready", flush=True)
        sys.stdin.readline()
        payload = os.urandom(args.size)
        infos = [client.publish(RAW_TOPIC, payload, qos=1) for _ in range(args.count)]
        deadline = time.monotonic() + args.timeout
        for info in infos:
            info.wait_for_publish(max(0.0, deadline - time.monotonic()))
        print("done" if all(i.is_published() for i in infos) else "incomplete", flush=True)
    finally:
        client.disconnect()
        client.loop_stop()
    return 0


# -- measurements ---------------------------------------------------------------------------------
def raw_run(
    broker: Broker, count: int, size: int, logs: Path, timeout: float
) -> tuple[float, dict[str, float]]:
    """Seconds for ``count`` messages of ``size`` bytes, QoS 1, publisher process to subscriber."""
    got = [0]
    last = [0.0]
    done = threading.Event()

    def on(topic: str, payload: bytes) -> None:
        if len(payload) != size:
            raise RuntimeError(f"a message of {len(payload)} bytes")
        got[0] += 1
        if got[0] == count:
            last[0] = time.perf_counter()
            done.set()

    subscriber = Client(broker.port, f"bench-sub-{os.getpid()}", [RAW_TOPIC], on)
    command = bench_command("--role", "publisher", "--port", str(broker.port))
    command += ["--count", str(count), "--size", str(size), "--timeout", str(timeout)]
    with open(logs / "publisher.log", "ab") as err:
        pub = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True
        )
    try:
        if read_line(pub, WAIT_S) != "ready":
            raise RuntimeError("the publisher did not start")
        assert pub.stdin is not None
        meter = CpuMeter(publisher=pub.pid, subscriber=os.getpid(), broker=broker.process.pid)
        meter.start()
        start = time.perf_counter()
        pub.stdin.write("go\n")
        pub.stdin.flush()
        if not done.wait(timeout):
            raise RuntimeError(f"the subscriber got {got[0]} of {count} messages")
        cpu = meter.stop()
        if read_line(pub, WAIT_S) != "done":
            raise RuntimeError("the publisher did not get every PUBACK")
        return last[0] - start, cpu
    finally:
        stop_process(pub)
        for stream in (pub.stdin, pub.stdout):
            if stream is not None:
                stream.close()
        subscriber.close()


def device_toml(
    directory: Path, fleet: Fleet, broker: Broker, device: str, window: int
) -> tuple[Path, Path]:
    """agent.toml for ``device`` (state in its own directory); returns (config, state dir)."""
    state = directory / device
    config = agent_config(
        state,
        fleet.keys.root,
        broker,
        device,
        transfer=TransferSettings(window=window, request_timeout_s=10.0, stall_timeout_s=60.0),
    ).model_copy(update={"report_interval_s": 1.0})  # the shipped default
    return write_agent_toml(config, directory / f"{device}.toml"), state


def deploy(events: EventLog, fleet: Fleet, bundle: SignedBundle, device: str) -> None:
    payload = deployment({bundle.name: bundle.envelope}, fleet.signer, device=device)
    events.client.publish(TOPICS.device(device).desired, payload, retain=True)


def since(a: Event, b: Event) -> float:
    return (b.at - a.at).total_seconds()


def single_run(
    broker: Broker,
    events: EventLog,
    fleet: Fleet,
    bundle: SignedBundle,
    directory: Path,
    window: int,
    timeout: float,
    profile: Path | None,
    server_pid: int,
) -> tuple[dict[str, float], dict[str, float]]:
    device = "bench-dev-single" if profile is None else "bench-dev-profiled"
    config_file, _ = device_toml(directory, fleet, broker, device, window)
    proc = spawn_device(config_file, directory / f"{device}.log", profile)
    meter = CpuMeter(device=proc.pid, server=server_pid, broker=broker.process.pid)
    try:
        events.wait_online(device, timeout=WAIT_S)
        mark = events.mark()
        meter.start()
        deploy(events, fleet, bundle, device)
        start = events.wait_phase(device, [Phase.DOWNLOADING], since=mark, timeout=WAIT_S)
        verifying = events.wait_phase(device, [Phase.VERIFYING], since=mark, timeout=timeout)
        loading = events.wait_phase(device, [Phase.LOADING], since=mark, timeout=WAIT_S)
        meter.stop()
        events.wait_phase(device, [Phase.ACTIVE], since=mark, timeout=WAIT_S)
    finally:
        stop_process(proc)
    times = {
        "agent_s": since(start, loading),
        "agent_blocks_s": since(start, verifying),
        "agent_verify_s": since(verifying, loading),
    }
    return times, meter.used


def _same_blocks(part: Path, bundle: SignedBundle) -> set[int]:
    """Indexes whose bytes in ``part`` are the bundle's (written, so checked, before a kill)."""
    same = set()
    bs = bundle.descriptor.block_size
    with open(part, "rb") as mine, open(bundle.path, "rb") as theirs:
        for i in range(bundle.count):
            n = bundle.block_length(i)
            mine.seek(i * bs)
            theirs.seek(i * bs)
            if mine.read(n) == theirs.read(n):
                same.add(i)
    return same


def _bits(bitmap: bytes, count: int) -> set[int]:
    if len(bitmap) * 8 < count:  # not written yet
        return set()
    return {i for i in range(count) if bitmap[i >> 3] & (1 << (i & 7))}


def kill_run(
    broker: Broker,
    events: EventLog,
    fleet: Fleet,
    bundle: SignedBundle,
    directory: Path,
    window: int,
    timeout: float,
) -> dict[str, float | int]:
    """Kill -9 an ``edge-agent run`` half way, start it again, count what was fetched twice."""
    device = "bench-dev-kill"
    config_file, state = device_toml(directory, fleet, broker, device, window)
    download = state / "downloads" / bundle.descriptor.bundle_sha256
    frames: Counter[int] = Counter()
    lock = threading.Lock()

    def on(topic: str, payload: bytes) -> None:
        header, _ = decode_block_reply(payload)
        if header.kind == "block":
            with lock:
                frames[header.index] += 1

    observer = Client(
        broker.port, f"bench-observer-{os.getpid()}", [TOPICS.device(device).blocks], on
    )
    log_file = directory / f"{device}.log"
    try:
        proc = spawn_device(config_file, log_file, None)
        try:
            mark = events.mark()
            deploy(events, fleet, bundle, device)
            events.wait_phase(device, [Phase.DOWNLOADING], since=mark, timeout=WAIT_S)
            deadline = time.monotonic() + timeout
            have = 0
            while have < bundle.count // 2:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"{device} never got half way ({have} blocks)")
                with contextlib.suppress(FileNotFoundError):
                    have = len(_bits((download / "bitmap").read_bytes(), bundle.count))
                time.sleep(0.002)
            proc.send_signal(signal.SIGKILL)
            proc.wait(WAIT_S)
        finally:
            stop_process(proc, kill=True)
        bitmap = _bits((download / "bitmap").read_bytes(), bundle.count)
        written = _same_blocks(download / "bundle.part", bundle)
        time.sleep(0.5)  # let the observer take in what was on its way
        with lock:
            before = Counter(frames)
        verified = {i for i in written if before[i] > 0}
        say(
            f"  killed at {len(bitmap)} blocks in the bitmap, {len(verified)} verified on disk, "
            f"{sum(before.values())} frames sent; starting it again"
        )
        mark = events.mark()
        proc = spawn_device(config_file, log_file, None)
        try:
            start = events.wait_phase(device, [Phase.DOWNLOADING], since=mark, timeout=WAIT_S)
            loading = events.wait_phase(device, [Phase.LOADING], since=mark, timeout=timeout)
            events.wait_phase(device, [Phase.ACTIVE], since=mark, timeout=WAIT_S)
        finally:
            stop_process(proc)
        time.sleep(0.2)
        with lock:
            after = Counter(frames)
    finally:
        observer.close()
    refetched = [i for i in verified if after[i] > before[i]]
    again = sum((after[i] - before[i]) * bundle.block_length(i) for i in refetched)
    sent = sum(after[i] * bundle.block_length(i) for i in after)
    return {
        "refetched_bytes_after_kill": again,
        "kill_refetched_blocks": len(refetched),
        "kill_refetched_bitmap_blocks": len(bitmap.intersection(refetched)),
        "kill_verified_blocks": len(verified),
        "kill_bitmap_blocks": len(bitmap),
        "kill_unrecorded_blocks": len(verified - bitmap),
        "kill_missing_blocks": sum(1 for i in range(bundle.count) if after[i] == 0),
        "kill_extra_bytes_total": sent - bundle.size,
        "kill_resume_s": round(since(start, loading), 3),
    }


@dataclass
class _Device:
    id: str
    session: Session
    transfer: Transfer
    done_at: float | None = None


def many_run(
    broker: Broker, bundle: SignedBundle, count: int, directory: Path, window: int, timeout: float
) -> dict[str, float]:
    """``count`` Transfers at once, each with its own session, driven as DeviceAgent drives one."""
    inbox: queue.SimpleQueue[InboxItem] = queue.SimpleQueue()
    settings = mqtt_settings(broker)
    transfer_settings = TransferSettings(window=window, stall_timeout_s=60.0)
    devices: dict[str, _Device] = {}
    for k in range(count):
        device = f"bench-many-{k:03d}"
        session = Session(
            settings, device, inbox, subscriptions=[TOPICS.device(device).blocks], persistent=False
        )
        transfer = Transfer(
            bundle.descriptor,
            directory / device / "downloads" / bundle.descriptor.bundle_sha256,
            device_id=device,
            topics=TOPICS,
            publish=session.publish,
            settings=transfer_settings,
        )
        devices[device] = _Device(device, session, transfer)
    try:
        for d in devices.values():
            d.session.start()
        for d in devices.values():
            if not d.session.connected.wait(WAIT_S):
                raise RuntimeError(f"{d.id} could not connect")
        start = time.monotonic()
        for d in devices.values():
            d.transfer.start(start)
        deadline = start + timeout
        busy = set(devices)

        def after(d: _Device, now: float) -> None:
            t = d.transfer
            if t.state == "failed":
                raise RuntimeError(f"{d.id}: {t.error}")
            if t.state != "done" or d.done_at is not None:
                return
            check_bundle(t.part_path, bundle.descriptor, bytes_checked=True)
            d.done_at = time.monotonic()
            busy.discard(d.id)

        while busy:
            now = time.monotonic()
            if now > deadline:
                raise RuntimeError(f"{len(busy)} device(s) not done after {timeout} s")
            try:
                item: InboxItem | None = inbox.get(timeout=0.2)
            except queue.Empty:
                item = None
            while item is not None:
                if isinstance(item, Incoming):
                    d = devices[TOPICS.parse(item.topic).id]
                    header, data = decode_block_reply(item.payload)
                    try:
                        d.transfer.on_reply(header, data, time.monotonic())
                    except EdgeAgentError as exc:
                        d.transfer.fail(exc)
                    after(d, time.monotonic())
                elif isinstance(item, Connection) and item.up:
                    for d in devices.values():
                        d.transfer.resend(time.monotonic())
                try:
                    item = inbox.get_nowait()
                except queue.Empty:
                    item = None
            now = time.monotonic()
            for name in list(busy):
                devices[name].transfer.tick(now)
                after(devices[name], now)
    finally:
        for d in devices.values():
            d.transfer.close()
            d.session.stop()
    ends = sorted(d.done_at - start for d in devices.values() if d.done_at is not None)
    wall = ends[-1]
    return {
        "devices_wall_s": round(wall, 3),
        "devices_first_done_s": round(ends[0], 3),
        "devices_median_done_s": round(ends[len(ends) // 2], 3),
        "devices_mib_s": count * bundle.size / MiB / wall,
    }


# -- reporting ------------------------------------------------------------------------------------
def profile_summary(directory: Path, top: int) -> dict[str, list[str]]:
    summary: dict[str, list[str]] = {}
    for path in sorted(directory.glob("*.prof")):
        stats = pstats.Stats(str(path), stream=sys.stderr)
        print(f"\n===== {path.stem} (by own time) =====", file=sys.stderr)
        stats.sort_stats("tottime").print_stats(top)
        rows = sorted(
            stats.stats.items(),  # type: ignore[attr-defined]
            key=lambda kv: -kv[1][2],
        )[:top]
        summary[path.stem] = [
            f"{Path(f).name}:{line}({fn}) {v[2]:.3f}s" for (f, line, fn), v in rows
        ]
    return summary


def mosquitto_version() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["mosquitto", "-h"], capture_output=True, text=True, timeout=5, check=False
        ).stdout
        return out.splitlines()[0].removeprefix("mosquitto version ").strip()
    return "unknown"


def parse_args() -> argparse.Namespace:
    doc = __doc__ or ""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--size-mib", type=float, default=100, help="the single-device bundle")
    p.add_argument("--devices", type=int, default=20, help="devices pulling at once")
    p.add_argument("--devices-mib", type=float, default=20, help="their bundle")
    p.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE)
    p.add_argument("--window", type=int, default=TransferSettings().window)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds for any one transfer")
    p.add_argument(
        "--broker-option",
        action="append",
        default=[],
        metavar="LINE",
        help="one more line for mosquitto.conf (repeatable), e.g. 'max_inflight_messages 100'",
    )
    p.add_argument("--skip-kill", action="store_true")
    p.add_argument("--skip-devices", action="store_true")
    p.add_argument("--quick", action="store_true", help="8 MiB, 4 devices of 2 MiB: a smoke run")
    p.add_argument("--profile", type=Path, help="profile one device and the server into DIR")
    p.add_argument("--keep-logs", type=Path, help="copy the processes' logs into DIR")
    p.add_argument("--top", type=int, default=25, help="rows of each profile summary")
    # Internal: the roles this script runs as processes of its own.
    p.add_argument("--role", choices=["main", "server", "publisher", "device"], default="main")
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--bundles", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.size_mib, args.devices, args.devices_mib = 8, 4, 2
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {}
    began = time.monotonic()
    profile: Path | None = args.profile.resolve() if args.profile else None
    if profile is not None:
        profile.mkdir(parents=True, exist_ok=True)
        for old in profile.glob("*.prof"):
            old.unlink()
    with tempfile.TemporaryDirectory(prefix="bench-transfer-") as tmp:
        directory = Path(tmp)
        logs = directory / "logs"
        logs.mkdir()
        fleet = make_fleet(directory)
        say(f"building a {args.size_mib:g} MiB bundle")
        t = time.monotonic()
        big = fleet.bundle("bench-big", args.size_mib, args.block_size, seed=1)
        small = None
        if not args.skip_devices and profile is None:
            say(f"building a {args.devices_mib:g} MiB bundle")
            small = fleet.bundle("bench-small", args.devices_mib, args.block_size, seed=2)
        result["build_s"] = round(time.monotonic() - t, 3)
        count, size = big.count, big.descriptor.block_size
        broker_lines = [*shipped_broker_lines(SHIPPED_TUNING), *BROKER_EXTRA, *args.broker_option]
        with (
            plain_broker(directory, extra=broker_lines) as broker,
            bundle_server(broker, fleet.served, big, logs, profile) as server,
        ):
            say(f"mosquitto on {broker.host}:{broker.port}; bundle server up")
            events = EventLog(broker.port)
            try:
                raw = []
                say(f"raw: {count} messages of {size} bytes, QoS 1")
                seconds, raw_cpu = raw_run(broker, count, size, logs, args.timeout)
                raw.append(seconds)
                say(f"  {raw[-1]:.3f} s ({big.size / MiB / raw[-1]:.1f} MiB/s)")
                say(f"agent: one device pulls {big.size / MiB:.1f} MiB, window {args.window}")
                single, agent_cpu = single_run(
                    broker,
                    events,
                    fleet,
                    big,
                    directory,
                    args.window,
                    args.timeout,
                    profile,
                    server.proc.pid,
                )
                say(f"  {single['agent_s']:.3f} s ({big.size / MiB / single['agent_s']:.1f} MiB/s)")
                seconds, raw_cpu_again = raw_run(broker, count, size, logs, args.timeout)
                raw.append(seconds)
                say(f"raw again: {raw[-1]:.3f} s")
                result["raw_s"] = round(min(raw), 3)
                result["agent_s"] = round(single["agent_s"], 3)
                result["ratio"] = round(min(raw) / single["agent_s"], 3)
                result["raw_runs_s"] = [round(r, 3) for r in raw]
                result["agent_blocks_s"] = round(single["agent_blocks_s"], 3)
                result["agent_verify_s"] = round(single["agent_verify_s"], 3)
                result["agent_mib_s"] = round(big.size / MiB / single["agent_s"], 1)
                result["raw_mib_s"] = round(big.size / MiB / min(raw), 1)
                result["agent_cpu_s"] = agent_cpu
                result["raw_cpu_s"] = raw_cpu if raw[0] <= raw[1] else raw_cpu_again
                if not args.skip_kill and profile is None:
                    say("kill -9 half way, then resume")
                    kill = kill_run(
                        broker,
                        events,
                        fleet,
                        big,
                        directory,
                        args.window,
                        args.timeout,
                    )
                    say(
                        f"  refetched {kill['refetched_bytes_after_kill']} verified bytes; "
                        f"resumed in {kill['kill_resume_s']} s"
                    )
                    result.update(kill)
                if small is not None:
                    say(f"{args.devices} devices pull {small.size / MiB:.1f} MiB at once")
                    many = many_run(
                        broker, small, args.devices, directory, args.window, args.timeout
                    )
                    key = f"devices_{args.devices}_mib_s"
                    result[key] = round(many.pop("devices_mib_s"), 1)
                    say(f"  {result[key]} MiB/s in all, {many['devices_wall_s']} s")
                    result["devices"] = args.devices
                    result["devices_bundle_mib"] = round(small.size / MiB, 2)
                    result.update(many)
            finally:
                events.close()
        result["server_stats"] = server.stats
        if args.keep_logs is not None:
            args.keep_logs.mkdir(parents=True, exist_ok=True)
            for path in [*logs.glob("*.log"), *directory.glob("*.log")]:
                (args.keep_logs / path.name).write_bytes(path.read_bytes())
            broker_log = directory / "mosquitto-plain" / "mosquitto.log"
            if broker_log.exists():
                (args.keep_logs / "mosquitto.log").write_bytes(broker_log.read_bytes())
        result["tmp_fs"] = fs_type(directory)
    result.update(
        {
            "method": (
                "agent_s: an edge-agent run process (DeviceAgent driving Transfer) deployed the "
                "bundle; its downloading event to its loading event, by the events' timestamps "
                "(block list and blocks fetched, checked and written, then the archive structure "
                "checked); bundle server: agent.fleet.server.serve in its own process"
            ),
            "raw_method": (
                "paho publisher process, QoS 1, max inflight 20, one message per block, to a paho "
                "subscriber in this process; go signal to last message received; best of 2"
            ),
            "kill_method": (
                "SIGKILL once the bitmap on disk holds half the blocks; verified = blocks whose "
                "bytes in bundle.part match the bundle and whose reply was seen, both at the "
                "kill; refetched = replies for those blocks after the restart (an observer "
                "client counts frames per index on the device's blocks topic)"
            ),
            "devices_method": (
                "in-process Transfers, one Session (client id) each, all driven by one thread "
                "as DeviceAgent drives one, each checked with check_bundle as DeviceAgent does"
            ),
            "bundle_mib": round(big.size / MiB, 2),
            "bundle_sha256": big.descriptor.bundle_sha256,
            "block_size": big.descriptor.block_size,
            "blocks": big.count,
            "window": args.window,
            "server_rate_bytes_s": SERVER_RATE,
            "broker_extra": broker_lines,
            "mosquitto": mosquitto_version(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "paho": paho.mqtt.__version__,
            "profiled": profile is not None,
            "total_s": round(time.monotonic() - began, 1),
        }
    )
    if profile is not None:
        result["profile_top"] = profile_summary(profile, args.top)
    return result


def main() -> int:
    args = parse_args()
    if args.role == "server":
        return server_role(args)
    if args.role == "publisher":
        return publisher_role(args)
    if args.role == "device":
        return device_role(args)
    result = run(args)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
