"""Fleet convergence: 100, 300 and 1,000 simulated devices each fetch a new 1 MiB bundle.

Everything runs on 127.0.0.1: a mosquitto this script starts on a free port (the packet,
inflight and queue settings of config/broker/mosquitto.conf, but a longer queue per client:
see BROKER_QUEUE; its file limit raised), two
``edge-fleet serve`` processes sharing the block requests through the MQTT 5 shared
subscription, and ``edge-fleet simulate`` processes of ``--per-process`` devices each (the
agent's protocol code, only the runtime simulated: agent/fleet/simulator.py). Progress goes to
stderr; the last line of stdout is one JSON object:

  converge_s_N  N fresh devices in one group, online and idle; one group document naming the
                bundle is published (retained, QoS 1); until every device's retained reported
                state says the bundle is active, as this script's own subscriber receives it
  converge_s    the same for the largest N (``devices``); goal: 1,000 devices in <= 60 s
  single_s      the baseline per device: one simulated device alone, the same measurement
  raw_s_N       the baseline for the broker: the same bytes (N x the bundle, in messages of
                the bundle's block size, QoS 1) from two plain paho publisher processes to N
                plain paho clients in the same number of processes as the simulators, each on
                its own topic: what the broker and the MQTT clients cost without the protocol
                (no requests, hashes, disk, verification or reports)
  raw_ratio_N   raw_s_N / converge_s_N (1.0: the protocol costs nothing beyond moving bytes)
  N_phases      where the time goes, from every device's own events (median and max, seconds):
                ``desired`` publish to the pending event (delivery and verification),
                ``download`` downloading to verifying (block list and blocks, each checked
                and written), ``verify`` verifying to loading (the archive checked),
                ``load`` loading to active (simulated: ``--load-s``), ``report`` active to the
                reported state arriving here
  *_cpu_s       CPU seconds each side spent during the measurement (servers, broker,
                simulators, this script's subscriber)
  rollout_s     on a fresh fleet of the largest N, on 1.0.0 from its group: ``edge-fleet rollout
                start`` of 2.0.0 in four waves (1, 10%, 50%, 100%; no failure allowed), from
                starting the command to its exit (planning, every gate, all devices active);
                rollout_ratio_vs_converge: against converge_s (one group document to as many
                devices, no gates: the baseline)
  halted_after_canary  then 3.0.0, whose load fails on a fifth of the devices (by id hash),
                in waves of 5% and 100% with at most 5% failures: true when the command exits 4
                (halted) with the second wave never published; canary_* say how many failed

Scenarios: :func:`running_stack` starts the broker, the servers and the subscriber once;
:func:`simulated_fleet` starts fresh simulated devices (new ids, a new group) for one
scenario and stops them after it; a scenario is a function of the stack and the fleet that
returns its figures (:func:`converge`; a rollout scenario would run ``edge-fleet rollout ...``
as a process and read the same :class:`Watch`), called from :func:`run`. Every wait is
bounded; every process is stopped on the way out, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import paho.mqtt
import paho.mqtt.client as mqtt
from _common import cpu_s, fs_type, say, shipped_broker_lines
from paho.mqtt.reasoncodes import ReasonCode

from agent.bundle.manifest import DEFAULT_BLOCK_SIZE
from agent.fleet.build import BuildOptions, build_bundle
from agent.fleet.keys import KeyStore, load_signer
from agent.fleet.sign import sign_bundle
from agent.testing.broker import HOST, Broker, common_config, mosquitto_binary, run_broker
from agent.testing.fleet import deployment
from agent.testing.models import make_onnx
from agent.transport.messages import Event, Online, Phase, Reported
from agent.transport.multiplex import Multiplexer
from agent.transport.session import MqttSettings, connect, new_client
from agent.transport.topics import Topics
from agent.trust.keys import Signer
from agent.trust.metadata import BundleDescriptor

MiB = 1 << 20
TOPICS = Topics()
WAIT_S = 60.0  # a process starting, a fleet connecting, a process stopping
EDGE_FLEET = str(Path(sys.executable).parent / "edge-fleet")
# The broker settings of the shipped config that bound queues, packets and messages in flight.
BROKER_KEYS = ("max_queued_bytes", "max_packet_size", "max_inflight_messages", "set_tcp_nodelay")
# ... but not its max_queued_messages 1000: that bounds the queue of a client that is online
# too, beyond its messages in flight, and a subscriber that follows every device (this
# script's, as edge-fleet status --watch or a rollout controller) is sent several messages
# per device within a second when a fleet of 1,000 moves at once. Past 1000 mosquitto drops
# them ("Outgoing messages are being dropped"; broker_dropped_lines counts those lines).
BROKER_QUEUE = "max_queued_messages 100000"
RAW_TOPIC = "bench/raw"
SHM = Path("/dev/shm")


# -- bundles and keys ---------------------------------------------------------------------------
@dataclass(frozen=True)
class SignedBundle:
    name: str
    path: Path
    envelope: bytes
    descriptor: BundleDescriptor


def make_bundle(
    directory: Path, keys: KeyStore, signer: Signer, name: str, mib: float, version: str = "1.0.0"
) -> SignedBundle:
    """A bundle of one ONNX model whose weights take ``mib`` MiB, signed, in ``directory``."""
    columns = max(1, round(mib * MiB / (8192 * 4)))
    seed = 7 + int(version.split(".")[0])  # other weights: other bytes for every version
    with tempfile.TemporaryDirectory(prefix="bench-model-") as tmp:
        model = make_onnx(Path(tmp) / f"{name}.onnx", inputs=8192, outputs=columns, seed=seed)
        result = build_bundle(
            [model],
            directory / f"{name}-{version}.emb",
            BuildOptions(name=name, version=version, samples="none", block_size=DEFAULT_BLOCK_SIZE),
        )
    now = datetime.now(timezone.utc)
    out, _ = sign_bundle(result.path, [signer], now=now)
    envelope = out.read_bytes()
    descriptor = keys.state(now).verify_descriptor(envelope, now).descriptor
    return SignedBundle(name, result.path, envelope, descriptor)


# -- processes ----------------------------------------------------------------------------------
# Every process this script started: whatever an interrupted clean-up leaves is killed at exit.
CHILDREN: list[subprocess.Popen[Any]] = []


def spawn(
    command: Sequence[str], log: Path, *, stdout: int = subprocess.DEVNULL, stdin: int | None = None
) -> subprocess.Popen[str]:
    """A child in a session of its own (Ctrl-C reaches this script, which stops it in order);
    its stderr goes to ``log``, its stdout nowhere unless piped (the last line of this script's
    stdout is the result)."""
    with open(log, "ab") as err:
        proc = subprocess.Popen(
            list(command), stdin=stdin, stdout=stdout, stderr=err, text=True, start_new_session=True
        )
    CHILDREN.append(proc)
    return proc


def kill_children() -> None:
    for proc in CHILDREN:
        if proc.poll() is None:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)


def stop(proc: subprocess.Popen[str], *, timeout: float = 20.0) -> str:
    """SIGTERM, then SIGKILL after ``timeout``; what it printed on stdout."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    out = ""
    if proc.stdout is not None:
        with contextlib.suppress(OSError, ValueError):
            out = proc.stdout.read()
        proc.stdout.close()
    if proc.stdin is not None:
        with contextlib.suppress(OSError):
            proc.stdin.close()
    return out


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """One line of ``proc``'s stdout within ``timeout`` seconds."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise RuntimeError(f"process {proc.pid} said nothing in {timeout:.0f} s")
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"process {proc.pid} exited with {proc.wait(WAIT_S)}")
    return line.strip()


def cpu(pids: Sequence[int]) -> float:
    return sum(cpu_s(pid) for pid in pids)


def raise_file_limit() -> int:
    """This process's open-file limit to its hard limit; mosquitto and the simulators inherit
    it (a broker holds a descriptor per client)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 1 << 16 if hard == resource.RLIM_INFINITY else hard
    if soft != want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return want


# -- the fleet side's view -----------------------------------------------------------------------
@dataclass
class DeviceState:
    online: bool = False
    reported: Reported | None = None
    events: list[Event] = field(default_factory=list)
    done_at: float | None = None  # time.time() when the awaited report arrived


class Watch:
    """Every device's online, reported and events, from one paho client on its own thread."""

    def __init__(self, port: int) -> None:
        self._lock = threading.Lock()
        self.devices: dict[str, DeviceState] = {}
        self._goal: Callable[[Reported], bool] | None = None
        self._ready = threading.Event()
        settings = MqttSettings(host=HOST, port=port, tls=False)
        self.client = new_client(settings, f"bench-watch-{os.getpid()}", persistent=False)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_: self._ready.set()
        self.client.on_message = self._on_message
        connect(self.client, settings, persistent=False)
        self.client.loop_start()
        if not self._ready.wait(WAIT_S):
            self.close()
            raise RuntimeError("the bench's subscriber could not subscribe")

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Any
    ) -> None:
        client.subscribe(
            [(TOPICS.all_devices_filter(c), 1) for c in ("online", "reported", "events")]
        )

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        ref = TOPICS.parse(message.topic)
        payload = bytes(message.payload)
        with self._lock:
            state = self.devices.setdefault(ref.id, DeviceState())
            if not payload:
                return
            if ref.channel == "online":
                state.online = Online.from_bytes(payload).state == "online"
            elif ref.channel == "events":
                state.events.append(Event.from_bytes(payload))
            elif ref.channel == "reported":
                state.reported = Reported.from_bytes(payload)
                goal = self._goal
                if state.done_at is None and goal is not None and goal(state.reported):
                    state.done_at = time.time()  # (the arrival is the time: wait() only polls)

    def expect(self, goal: Callable[[Reported], bool]) -> None:
        """From now on, note when each device's report first satisfies ``goal``."""
        with self._lock:
            self._goal = goal
            for state in self.devices.values():
                state.done_at = None

    def wait(
        self, ids: Sequence[str], check: Callable[[DeviceState], bool], timeout: float, what: str
    ) -> None:
        """Until ``check`` holds for every device of ``ids``, looked at every 50 ms."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                missing = [d for d in ids if not check(self.devices.get(d) or DeviceState())]
                if not missing:
                    return
                if time.monotonic() > deadline:
                    sample = {d: self._describe(d) for d in missing[:5]}
                    raise RuntimeError(
                        f"{len(missing)} of {len(ids)} devices not {what} in {timeout:.0f} s: {sample}"
                    )
            time.sleep(0.05)

    def _describe(self, device: str) -> str:
        state = self.devices.get(device)
        if state is None or state.reported is None:
            return "no report"
        r = state.reported
        models = {
            n: f"{m.phase.value} {m.error.code if m.error else ''}".strip()
            for n, m in r.models.items()
        }
        return f"{models} {r.error.code if r.error else ''}".strip()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# -- the stack every scenario runs on -------------------------------------------------------------
@dataclass
class Stack:
    directory: Path
    logs: Path
    broker: Broker
    servers: list[subprocess.Popen[str]]
    keys: KeyStore
    signer: Signer
    served: Path
    watch: Watch
    broker_lines: list[str]
    sim_state: Path  # where the simulated devices keep their downloads

    @property
    def server_pids(self) -> list[int]:
        return [p.pid for p in self.servers]


def broker_config(workdir: Path, lines: Sequence[str]) -> Callable[[int], list[str]]:
    """agent.testing.broker's mosquitto.conf without per-message logging (``log_type all`` writes a
    line per PUBLISH), with subscriptions logged (to see the servers subscribe)."""

    def build(port: int) -> list[str]:
        common = [line for line in common_config(workdir, port) if line != "log_type all"]
        levels = ("error", "warning", "notice", "information", "subscribe")
        return [*common, *(f"log_type {t}" for t in levels), "allow_anonymous true", *lines]

    return build


@contextlib.contextmanager
def running_stack(
    directory: Path,
    servers: int,
    extra_broker: Sequence[str],
    bundles: Callable[[KeyStore, Signer, Path], None],
    sim_state: Path,
) -> Iterator[Stack]:
    """Keys and the bundles (``bundles`` writes them into the served directory, so the servers
    index them as they start), then the broker, the bundle servers and the subscriber, started
    in order and stopped in reverse."""
    logs = directory / "logs"
    logs.mkdir(exist_ok=True)
    keys = KeyStore.init(directory / "keys", now=datetime.now(timezone.utc))
    signer = load_signer(keys.release_key_paths()[0])
    served = directory / "served"
    served.mkdir(exist_ok=True)
    bundles(keys, signer, served)
    lines = [*shipped_broker_lines(BROKER_KEYS), BROKER_QUEUE, *extra_broker]
    workdir = directory / "mosquitto"
    workdir.mkdir(exist_ok=True)
    procs: list[subprocess.Popen[str]] = []
    with run_broker(workdir, broker_config(workdir, lines)) as broker:
        CHILDREN.append(broker.process)
        try:
            for i in range(servers):
                procs.append(
                    spawn(
                        [
                            EDGE_FLEET,
                            "serve",
                            "--bundles",
                            str(served),
                            "--no-tls",
                            "--broker",
                            f"{HOST}:{broker.port}",
                            "--client-id",
                            f"bench-serve-{i}",
                        ],
                        logs / f"serve-{i}.log",
                    )
                )
            wait_subscribed(broker, [f"bench-serve-{i}" for i in range(servers)], procs)
            watch = Watch(broker.port)
            try:
                yield Stack(
                    directory, logs, broker, procs, keys, signer, served, watch, lines, sim_state
                )
            finally:
                watch.close()
        finally:
            for proc in procs:
                stop(proc)


def wait_subscribed(
    broker: Broker, client_ids: Sequence[str], procs: Sequence[subprocess.Popen[str]]
) -> None:
    """Until the broker's log shows each server's shared subscription."""
    deadline = time.monotonic() + WAIT_S
    while True:
        text = broker.log()
        if all(f"{c} 1 $share/" in text for c in client_ids):
            return
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"edge-fleet serve exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the bundle servers did not subscribe in {WAIT_S:.0f} s")
        time.sleep(0.1)


# -- simulated fleets ------------------------------------------------------------------------------
@dataclass
class SimFleet:
    name: str  # the id prefix and the group
    ids: list[str]
    procs: list[subprocess.Popen[str]]
    stats: list[dict[str, Any]] = field(default_factory=list)

    @property
    def group(self) -> str:
        return self.name

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]


def processes(stack: Stack, fleet: SimFleet) -> dict[str, list[int]]:
    """The processes of each side, for their CPU seconds."""
    return {
        "server": stack.server_pids,
        "broker": [stack.broker.process.pid],
        "sim": fleet.pids,
        "bench": [os.getpid()],
    }


def processes_for(devices: int, per_process: int) -> list[tuple[int, int]]:
    """(first index, count) of each process: as even as it goes."""
    n = max(1, math.ceil(devices / per_process))
    base, extra = divmod(devices, n)
    out, first = [], 0
    for i in range(n):
        count = base + (1 if i < extra else 0)
        out.append((first, count))
        first += count
    return out


@contextlib.contextmanager
def simulated_fleet(
    stack: Stack,
    devices: int,
    *,
    name: str,
    per_process: int,
    load_s: float,
    extra: Sequence[str] = (),
) -> Iterator[SimFleet]:
    """``devices`` fresh simulated devices (ids ``name-NNNNN``, group ``name``), online and idle;
    stopped, with their counts collected, on exit."""
    procs: list[subprocess.Popen[str]] = []
    ids: list[str] = []
    fleet = SimFleet(name, ids, procs)
    try:
        for first, count in processes_for(devices, per_process):
            procs.append(
                spawn(
                    [
                        EDGE_FLEET,
                        "simulate",
                        "--no-tls",
                        "--broker",
                        f"{HOST}:{stack.broker.port}",
                        "--trust",
                        str(stack.keys.root),
                        "--devices",
                        str(count),
                        "--first",
                        str(first),
                        "--id-prefix",
                        name,
                        "--group",
                        name,
                        "--load-s",
                        str(load_s),
                        "--state-dir",
                        str(stack.sim_state / f"{name}-{first}"),
                        "--json",
                        *extra,
                    ],
                    stack.logs / f"simulate-{name}-{first}.log",
                    stdout=subprocess.PIPE,
                )
            )
            ids.extend(f"{name}-{i:05d}" for i in range(first, first + count))
        stack.watch.wait(ids, lambda s: s.online, WAIT_S, "online")
        yield fleet
    finally:
        for proc in procs:
            out = stop(proc).strip().splitlines()
            if out:
                with contextlib.suppress(ValueError):
                    fleet.stats.append(json.loads(out[-1]))


# -- scenarios -------------------------------------------------------------------------------------
def _quantiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {"median": round(statistics.median(values), 3), "max": round(max(values), 3)}


def phase_times(stack: Stack, ids: Sequence[str], published: float) -> dict[str, dict[str, float]]:
    """Per phase, over the devices: how long each took, from the devices' own event times."""
    spans: dict[str, list[float]] = {
        k: [] for k in ("desired", "download", "verify", "load", "report")
    }
    for device in ids:
        state = stack.watch.devices[device]
        at = {e.phase: e.at.timestamp() for e in state.events if e.kind == "phase" and e.phase}
        if Phase.PENDING in at:
            spans["desired"].append(at[Phase.PENDING] - published)
        if Phase.DOWNLOADING in at and Phase.VERIFYING in at:
            spans["download"].append(at[Phase.VERIFYING] - at[Phase.DOWNLOADING])
        if Phase.VERIFYING in at and Phase.LOADING in at:
            spans["verify"].append(at[Phase.LOADING] - at[Phase.VERIFYING])
        if Phase.LOADING in at and Phase.ACTIVE in at:
            spans["load"].append(at[Phase.ACTIVE] - at[Phase.LOADING])
        if Phase.ACTIVE in at and state.done_at is not None:
            spans["report"].append(state.done_at - at[Phase.ACTIVE])
    return {k: _quantiles(v) for k, v in spans.items()}


def converge(stack: Stack, fleet: SimFleet, bundle: SignedBundle, timeout: float) -> dict[str, Any]:
    """Publish one group document naming ``bundle``; until every device reports it active."""
    sha = bundle.descriptor.bundle_sha256

    def goal(r: Reported) -> bool:
        m = r.models.get(bundle.name)
        return m is not None and m.phase == Phase.ACTIVE and m.bundle_sha256 == sha

    for device in fleet.ids:  # events of this scenario only
        stack.watch.devices[device].events.clear()
    stack.watch.expect(goal)
    document = deployment({bundle.name: bundle.envelope}, stack.signer, group=fleet.group)
    sides = processes(stack, fleet)
    before = {k: cpu(v) for k, v in sides.items()}
    published = time.time()
    info = stack.watch.client.publish(
        TOPICS.group_desired(fleet.group), document, qos=1, retain=True
    )
    info.wait_for_publish(WAIT_S)
    if not info.is_published():
        raise RuntimeError("the broker did not take the group document")
    stack.watch.wait(fleet.ids, lambda s: s.done_at is not None, timeout, f"active on {sha[:16]}")
    done = max(stack.watch.devices[d].done_at or 0.0 for d in fleet.ids)
    used = {f"{k}_cpu_s": round(cpu(v) - before[k], 2) for k, v in sides.items()}
    ends = sorted((stack.watch.devices[d].done_at or 0.0) - published for d in fleet.ids)
    return {
        "converge_s": round(done - published, 3),
        "first_active_s": round(ends[0], 3),
        "median_active_s": round(ends[len(ends) // 2], 3),
        "phases": phase_times(stack, fleet.ids, published),
        **used,
    }


def rollout_cli(stack: Stack, name: str, *args: str) -> list[str]:
    return [
        EDGE_FLEET, "rollout", name, *args,
        "--key", str(stack.keys.release_key_paths()[0]), "--trust", str(stack.keys.root),
        "--no-tls", "--broker", f"{HOST}:{stack.broker.port}", "--json",
    ]  # fmt: skip


def run_rollout(
    stack: Stack, fleet: SimFleet, rollout_id: str, bundle: SignedBundle, args: Sequence[str],
    timeout: float,
) -> dict[str, Any]:  # fmt: skip
    """``edge-fleet rollout start`` of ``bundle`` over the fleet's group, as a process; its
    exit status, wall time, summary and the CPU each side spent."""
    argv = rollout_cli(
        stack, "start", str(bundle.path), "--group", fleet.group, "--id", rollout_id,
        "--bundles", str(stack.served), *args,
    )  # fmt: skip
    sides = processes(stack, fleet)
    before = {k: cpu(v) for k, v in sides.items()}
    # Of the children, only the controller ends in between: what terminated children used.
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.monotonic()
    proc = spawn(argv, stack.logs / f"rollout-{rollout_id}.log", stdout=subprocess.PIPE)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        stop(proc)
        raise RuntimeError(f"rollout {rollout_id} did not end in {timeout:.0f} s") from None
    wall = time.monotonic() - began
    out = stop(proc).strip().splitlines()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    controller = (after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime)
    summary = json.loads(out[-1]) if out else {}
    return {
        "exit": proc.returncode,
        "s": round(wall, 3),
        "summary": summary,
        "controller_cpu_s": round(controller, 2),
        **{f"{k}_cpu_s": round(cpu(v) - before[k], 2) for k, v in sides.items()},
    }


def rollouts(
    stack: Stack, args: argparse.Namespace, made: Sequence[SignedBundle]
) -> dict[str, Any]:
    """On a fresh fleet of the largest size, on 1.0.0 from its group: 2.0.0 in four waves
    (1, 10%, 50%, 100%), then 3.0.0, whose load fails on a fifth of the devices (chosen by id
    hash), in waves of 5% and 100% with at most 5% failures: it must halt after the canaries."""
    v1, v2, v3 = made
    n = max(args.devices)
    extra = ["--fail-load", v3.descriptor.version, "--fail-fraction", "0.2"]
    with simulated_fleet(
        stack, n, name=f"r{n}", per_process=args.per_process, load_s=args.load_s, extra=extra
    ) as fleet:
        say(f"rollouts: {n} devices on 1.0.0 first")
        converge(stack, fleet, v1, args.timeout)
        say("rollout of 2.0.0 in four waves")
        four = run_rollout(
            stack, fleet, "bench-four", v2,
            ["--waves", "1,10%,50%,100%", "--wave-timeout", "120s", "--max-failures", "0"],
            args.timeout * 4,
        )  # fmt: skip
        say(f"  exit {four['exit']} in {four['s']} s")
        say("rollout of 3.0.0, a fifth of the devices failing it")
        bad = run_rollout(
            stack, fleet, "bench-canary", v3,
            ["--waves", "5%,100%", "--wave-timeout", "120s", "--max-failures", "5%"],
            args.timeout,
        )  # fmt: skip
        say(f"  exit {bad['exit']} in {bad['s']} s: {bad['summary'].get('reason')}")
    waves = bad["summary"].get("waves", [])
    canary = waves[0]["devices"] if waves else 0
    failed = len(bad["summary"].get("failures", []))
    return {
        "rollout_s": four["s"],
        "rollout_exit": four["exit"],
        "rollout_waves": [w["devices"] for w in four["summary"].get("waves", [])],
        "rollout_status": four["summary"].get("status"),
        "rollout_published_desired": four["summary"].get("devices"),
        "rollout_cpu_s": {
            k: four[f"{k}_cpu_s"] for k in ("server", "broker", "sim", "bench", "controller")
        },
        "halted_after_canary": bad["exit"] == 4
        and bad["summary"].get("status") == "halted"
        and all(w["phases"] == {"waiting": w["devices"]} for w in waves[1:]),
        "canary_devices": canary,
        "canary_failed": failed,
        "canary_s": bad["s"],
        "canary_reason": bad["summary"].get("reason"),
    }


# -- the raw baseline ------------------------------------------------------------------------------
def raw(
    stack: Stack, devices: int, per_process: int, bundle: SignedBundle, timeout: float
) -> dict[str, Any]:
    """The bundle's bytes to ``devices`` plain clients, from two plain publishers (see top)."""
    d = bundle.descriptor
    messages, size = d.block_count, d.block_size
    port = str(stack.broker.port)
    sinks: list[subprocess.Popen[str]] = []
    sources: list[subprocess.Popen[str]] = []
    common = ["--port", port, "--messages", str(messages), "--size", str(size)]
    try:
        for first, count in processes_for(devices, per_process):
            sinks.append(
                spawn(
                    bench_command(
                        "--role", "raw-sink", "--first", str(first), "--count", str(count), *common
                    ),
                    stack.logs / "raw-sink.log",
                    stdout=subprocess.PIPE,
                )
            )
        for i in range(len(stack.servers)):
            sources.append(
                spawn(
                    bench_command(
                        "--role",
                        "raw-source",
                        "--index",
                        str(i),
                        "--of",
                        str(len(stack.servers)),
                        "--count",
                        str(devices),
                        *common,
                    ),
                    stack.logs / "raw-source.log",
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                )
            )
        for proc in (*sinks, *sources):
            if read_line(proc, WAIT_S) != "ready":
                raise RuntimeError("a raw client did not start")
        sides = {
            "raw_broker": [stack.broker.process.pid],
            "raw_clients": [p.pid for p in (*sinks, *sources)],
        }
        before = {k: cpu(v) for k, v in sides.items()}
        go = time.monotonic()
        for proc in sources:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        ends = []
        for proc in sinks:
            word, _, when = read_line(proc, timeout).partition(" ")
            if word != "done":
                raise RuntimeError(f"a raw sink said {word!r}")
            ends.append(float(when))
        used = {f"{k}_cpu_s": round(cpu(v) - before[k], 2) for k, v in sides.items()}
        return {"raw_s": round(max(ends) - go, 3), **used}
    finally:
        for proc in (*sources, *sinks):
            stop(proc)


def bench_command(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *args]


def raw_sink_role(args: argparse.Namespace) -> int:
    """``count`` plain clients on one thread (agent.transport.multiplex), each subscribed to its
    own topic: ``ready`` once all are, then ``done <monotonic time>`` once each has
    ``messages`` messages of ``size`` bytes."""
    settings = MqttSettings(host=HOST, port=args.port, tls=False)
    mux = Multiplexer()
    subscribed: set[int] = set()
    got = [0] * args.count
    left = [args.count]
    last = [0.0]

    def make(k: int) -> mqtt.Client:
        index = args.first + k
        client = new_client(settings, f"bench-raw-{index:05d}", persistent=False)
        client.on_connect = lambda c, *_: c.subscribe(f"{RAW_TOPIC}/{index}", 1)
        client.on_subscribe = lambda *_: subscribed.add(k)

        def on_message(c: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
            if len(message.payload) != args.size:
                raise RuntimeError(f"a message of {len(message.payload)} bytes")
            got[k] += 1
            if got[k] == args.messages:
                left[0] -= 1
                last[0] = time.monotonic()

        client.on_message = on_message
        mux.attach(client)
        return client

    clients = [make(k) for k in range(args.count)]
    for i, client in enumerate(clients):
        connect(client, settings, persistent=False)
        if i % 25 == 24:
            mux.poll(0.0)
    deadline = time.monotonic() + WAIT_S
    while len(subscribed) < args.count:
        if time.monotonic() > deadline:
            print(f"only {len(subscribed)} subscribed", flush=True)
            return 1
        mux.poll(0.2)
    print("ready", flush=True)
    deadline = time.monotonic() + args.timeout
    while left[0] and time.monotonic() < deadline:
        mux.poll(0.2)
    print(f"done {last[0]}" if not left[0] else f"incomplete {left[0]}", flush=True)
    for client in clients:
        client.disconnect()
    for _ in range(10):
        mux.poll(0.05)
    return 0


def raw_source_role(args: argparse.Namespace) -> int:
    """Publish ``messages`` messages of ``size`` bytes to each device topic ``i`` with
    ``i % of == index``, QoS 1, at most as far ahead of the PUBACKs as a bundle server gets."""
    settings = MqttSettings(host=HOST, port=args.port, tls=False)
    client = new_client(settings, f"bench-raw-source-{args.index}", persistent=False)
    connected = threading.Event()
    client.on_connect = lambda *_: connected.set()
    connect(client, settings, persistent=False)
    client.loop_start()
    try:
        if not connected.wait(WAIT_S):
            return 1
        print("ready", flush=True)
        sys.stdin.readline()
        payload = os.urandom(args.size)
        infos: list[mqtt.MQTTMessageInfo] = []
        for i in range(args.index, args.count, args.of):  # a device's blocks at once, as a
            for _ in range(args.messages):  # bundle server answers a request of a window
                infos.append(client.publish(f"{RAW_TOPIC}/{i}", payload, qos=1))
                if len(infos) > 256:
                    infos[-256].wait_for_publish(WAIT_S)
        for info in infos[-256:]:
            info.wait_for_publish(WAIT_S)
        print("done", flush=True)
    finally:
        client.disconnect()
        client.loop_stop()
    return 0


# -- the run -----------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict[str, Any]:
    began = time.monotonic()
    limit = raise_file_limit()
    result: dict[str, Any] = {}
    sizes = sorted(set(args.devices))
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        directory = Path(tmp)
        made: list[SignedBundle] = []

        def bundles(keys: KeyStore, signer: Signer, served: Path) -> None:
            for version in ("1.0.0", "2.0.0", "3.0.0"):  # converge; roll out; a bad canary
                made.append(
                    make_bundle(served, keys, signer, "bench-fleet", args.bundle_mib, version)
                )

        with (
            tempfile.TemporaryDirectory(prefix="bench-fleet-", dir=args.sim_state) as sim_state,
            running_stack(
                directory, args.servers, args.broker_option, bundles, Path(sim_state)
            ) as stack,
        ):
            say(f"mosquitto on {HOST}:{stack.broker.port}, {args.servers} bundle servers")
            bundle = made[0]  # (2.0.0 and 3.0.0: the rollouts)
            bundle_mib = bundle.descriptor.bundle_size / MiB
            say(
                f"bundle {bundle.descriptor.bundle_size / MiB:.2f} MiB, {bundle.descriptor.block_count} blocks"
            )

            def scenario(n: int, name: str) -> dict[str, Any]:
                with simulated_fleet(
                    stack, n, name=name, per_process=args.per_process, load_s=args.load_s
                ) as fleet:
                    say(f"{n} devices online in {len(fleet.procs)} process(es); publishing")
                    out = converge(stack, fleet, bundle, args.timeout)
                stats = fleet.stats
                out["transfers"] = sum(s.get("transfers", 0) for s in stats)
                out["fetched_mib"] = round(sum(s.get("fetched_bytes", 0) for s in stats) / MiB, 2)
                out["reconnects"] = sum(s.get("connects", 0) for s in stats) - n
                say(f"  {n} devices: {out['converge_s']} s")
                return out

            single = scenario(1, "one")
            result["single_s"] = single["converge_s"]
            result["single_phases"] = single["phases"]
            for n in sizes:
                out = scenario(n, f"f{n}")
                result[f"converge_s_{n}"] = out.pop("converge_s")
                result[f"mib_s_{n}"] = round(n * bundle_mib / result[f"converge_s_{n}"], 1)
                result[f"{n}_detail"] = out
                if not args.skip_raw:
                    say(f"raw: {n} clients get the same bytes")
                    base = raw(stack, n, args.per_process, bundle, args.timeout)
                    result[f"raw_s_{n}"] = base["raw_s"]
                    result[f"raw_ratio_{n}"] = round(base["raw_s"] / result[f"converge_s_{n}"], 3)
                    result[f"{n}_detail"].update({k: v for k, v in base.items() if k != "raw_s"})
                    say(f"  raw {base['raw_s']} s")
            if not args.skip_rollout:
                result.update(rollouts(stack, args, made))
                # Against one group document to as many devices, measured above.
                base = result[f"converge_s_{max(sizes)}"]
                result["rollout_ratio_vs_converge"] = round(result["rollout_s"] / base, 2)
            top = sizes[-1]
            detail = result[f"{top}_detail"]
            sides = ("server", "broker", "sim", "bench")
            spent = sum(detail[f"{k}_cpu_s"] for k in sides) or 1.0
            phases = detail["phases"]
            result.update(
                {
                    "devices": top,
                    "converge_s": result[f"converge_s_{top}"],
                    "published_desired": 1,
                    "server_cpu_s": detail["server_cpu_s"],
                    "broker_cpu_s": detail["broker_cpu_s"],
                    "sim_cpu_s": detail["sim_cpu_s"],
                    "bench_cpu_s": detail["bench_cpu_s"],
                    "cpu_share": {k: round(detail[f"{k}_cpu_s"] / spent, 2) for k in sides},
                    "download_median_s": phases["download"].get("median"),
                    "rest_median_s": round(
                        sum(phases[k].get("median", 0.0) for k in phases if k != "download"), 3
                    ),
                    "speedup_vs_serial": round(
                        result["single_s"] * top / result[f"converge_s_{top}"], 1
                    ),
                    "goal_s": 60.0,
                }
            )
            # mosquitto: "Outgoing messages are being dropped for client ..." (a full queue).
            result["broker_dropped_lines"] = stack.broker.log().count("being dropped")
            result["broker_lines"] = stack.broker_lines
            if args.keep_logs is not None:
                args.keep_logs.mkdir(parents=True, exist_ok=True)
                for path in [*stack.logs.glob("*.log"), directory / "mosquitto" / "mosquitto.log"]:
                    if path.exists():
                        (args.keep_logs / path.name).write_bytes(path.read_bytes())
    result.update(
        {
            "method": (
                "fresh simulated devices (edge-fleet simulate, the agent's protocol code, runtime "
                f"simulated with --load-s {args.load_s}) in one group, online and idle; one retained "
                "group document (published_desired: documents published per measurement) until "
                "each device's retained reported state says the bundle is active, as received by "
                "this script; CPU seconds per side over that interval"
            ),
            "raw_method": (
                "the same bytes in messages of one block each, QoS 1, from as many plain paho "
                "publisher processes as bundle servers to as many plain paho clients, on a topic "
                "each, in as many processes as the simulators; go to the last message received"
            ),
            "speedup_method": (
                "single_s x devices / converge_s: how many times faster than one device after "
                "another; mib_s_N: N x the bundle over converge_s_N"
            ),
            "phases_method": (
                "per device, from its own events: desired = publish to pending, download = "
                "downloading to verifying, verify = verifying to loading, load = loading to "
                "active, report = active to its reported state arriving here; rest_median_s: "
                "the medians of all but download, summed"
            ),
            "bundle_mib": round(bundle.descriptor.bundle_size / MiB, 3),
            "block_size": bundle.descriptor.block_size,
            "servers": args.servers,
            "per_process": args.per_process,
            "load_s": args.load_s,
            "sim_state_fs": fs_type(Path(args.sim_state or tempfile.gettempdir())),
            "open_files_limit": limit,
            "mosquitto": mosquitto_version(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "paho": paho.mqtt.__version__,
            "total_s": round(time.monotonic() - began, 1),
        }
    )
    return result


def mosquitto_version() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError, IndexError):
        out = subprocess.run(
            [mosquitto_binary(), "-h"], capture_output=True, text=True, timeout=5, check=False
        ).stdout
        return out.splitlines()[0].removeprefix("mosquitto version ").strip()
    return "unknown"


def parse_args() -> argparse.Namespace:
    doc = __doc__ or ""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--devices", type=int, nargs="+", default=[100, 300, 1000])
    p.add_argument("--per-process", type=int, default=250, help="simulated devices per process")
    p.add_argument("--servers", type=int, default=2, help="edge-fleet serve processes")
    p.add_argument("--bundle-mib", type=float, default=1.0)
    p.add_argument("--load-s", type=float, default=0.1, help="simulated load time")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds for one convergence")
    p.add_argument("--skip-raw", action="store_true", help="no raw broker baseline")
    p.add_argument("--skip-rollout", action="store_true", help="no rollout scenarios")
    p.add_argument("--quick", action="store_true", help="10 and 30 devices: a smoke run")
    p.add_argument(
        "--broker-option",
        action="append",
        default=[],
        metavar="LINE",
        help="one more mosquitto.conf line",
    )
    p.add_argument(
        "--sim-state",
        type=Path,
        default=SHM if SHM.is_dir() else None,
        metavar="DIR",
        help="where the simulated devices write their downloads (default /dev/shm: a fleet has "
        "a disk per device, this machine one for all)",
    )
    p.add_argument("--keep-logs", type=Path, help="copy the processes' logs into DIR")
    # Internal: the raw baseline's roles, run as processes of their own.
    p.add_argument("--role", choices=["main", "raw-sink", "raw-source"], default="main")
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--of", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--messages", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.devices, args.per_process = [10, 30], 20
    return args


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM as Ctrl-C: the context managers stop every process, in order."""
    raise KeyboardInterrupt


def main() -> int:
    args = parse_args()
    if args.role == "raw-sink":
        return raw_sink_role(args)
    if args.role == "raw-source":
        return raw_source_role(args)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        result = run(args)
    finally:
        kill_children()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
