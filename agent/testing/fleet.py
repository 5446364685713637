"""A small fleet for tests: keys, bundles, a real mosquitto, bundle servers and device agents.

Devices run as :class:`~agent.daemon.DeviceAgent` on a thread of the test process (``agent``)
or as a real ``edge-agent run`` process (``agent_process``, for kill -9 and restarts). The fleet
side watches the retained topics with its own MQTT session (``Watcher``). Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from agent.config import AgentConfig, TrustSettings
from agent.daemon import DeviceAgent
from agent.fleet.control import FleetView
from agent.fleet.deploy import make_deployment
from agent.fleet.server import BlockServer, serve
from agent.fleet.simulator import Simulator
from agent.fleet.simulator_settings import make_settings
from agent.serving import loadtest
from agent.serving.api import ApiSettings
from agent.serving.slots import SlotSettings
from agent.testing.broker import Endpoint
from agent.testing.models import make_onnx
from agent.testing.wait import wait_until
from agent.transport.fetch import TransferSettings
from agent.transport.messages import Event, Phase, Reported
from agent.transport.session import InboxItem, Incoming, MqttSettings, Session
from agent.transport.topics import Topics
from agent.trust.keys import Signer
from agent.trust.metadata import DeploymentTarget
from agent.verify import load_trust

REPO = Path(__file__).resolve().parents[2]
# The bound of every condition wait in the fleet tests. A passing run returns as soon as its
# condition holds, so only a failing run (or a box under heavy load) ever waits this long.
WAIT = 60.0
TOPICS = Topics()


def mqtt_settings(
    broker: Endpoint,
    identity: str | None = None,
    protocol: str = "5",
    failover: Sequence[Endpoint] = (),
) -> MqttSettings:
    """Settings for ``broker``: TLS with ``identity``'s certificate when the broker has certs;
    ``failover``: other nodes of its cluster."""
    common: dict[str, Any] = {
        "host": broker.host,
        "port": broker.port,
        "failover": [f"{b.host}:{b.port}" for b in failover],
        "protocol": protocol,
        "backoff_initial_s": 0.2,
        "backoff_max_s": 1.0,
        "keepalive_s": 5,
    }
    if broker.certs is None:
        return MqttSettings(tls=False, **common)
    assert identity is not None
    return MqttSettings(
        tls=True,
        ca_file=broker.certs / "ca.crt",
        cert_file=broker.certs / f"{identity}.crt",
        key_file=broker.certs / f"{identity}.key",
        **common,
    )


def agent_config(
    state: Path,
    keys_dir: Path,
    broker: Endpoint,
    device_id: str,
    *,
    groups: tuple[str, ...] = (),
    protocol: str = "5",
    transfer: TransferSettings | None = None,
    failover: Sequence[Endpoint] = (),
) -> AgentConfig:
    return AgentConfig(
        device_id=device_id,
        groups=list(groups),
        state_dir=state,
        mqtt=mqtt_settings(broker, device_id, protocol, failover),
        trust=TrustSettings(root=keys_dir / "root.json", keyring=keys_dir / "keyring.json"),
        transfer=transfer
        or TransferSettings(window=8, request_timeout_s=2.0, stall_timeout_s=30.0),
        report_interval_s=0.1,
        serving=SlotSettings(probation_s=0.2, probation_min_requests=1, max_p99_ratio=None),
        api=ApiSettings(port=None, unix_socket=None),
        status_socket=None,
    )


def deployment(
    descriptors: dict[str, bytes],
    signer: Signer,
    *,
    device: str | None = None,
    group: str | None = None,
    sequence: int | None = None,
    now: datetime | None = None,
    days: int = 30,
) -> bytes:
    target = (
        DeploymentTarget(kind="device", id=device)
        if device
        else DeploymentTarget(kind="group", id=group or "")
    )
    return make_deployment(
        descriptors,
        target=target,
        signers=[signer],
        now=now or datetime.now(timezone.utc),
        sequence=sequence,
        days=days,
    )


def hand_back(signer: Signer, device: str, *, sequence: int) -> bytes:
    """A device document that hands ``device`` back to its groups."""
    return make_deployment(
        {},
        target=DeploymentTarget(kind="device", id=device),
        signers=[signer],
        now=datetime.now(timezone.utc),
        sequence=sequence,
        follow_groups=True,
    )


@dataclass
class Watcher:
    """The fleet's view: reported, online and events of every device, from a real session."""

    session: Session
    inbox: queue.SimpleQueue[InboxItem]
    view: FleetView = field(default_factory=lambda: FleetView(TOPICS))
    events: list[Event] = field(default_factory=list)
    raw: list[Incoming] = field(default_factory=list)

    def _drain(self, timeout: float) -> None:
        try:
            item = self.inbox.get(timeout=timeout)
        except queue.Empty:
            return
        while True:
            if isinstance(item, Incoming):
                self.raw.append(item)
                self.view.update(item)
                if item.topic.endswith("/events") and item.payload:
                    self.events.append(Event.from_bytes(item.payload))
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return

    def wait(
        self,
        device: str,
        predicate: Callable[[Reported], bool],
        timeout: float = WAIT,
        what: str = "",
    ) -> Reported:

        def reached() -> Reported | None:
            self._drain(0.05)
            view = self.view.devices.get(device)
            if view is not None and view.reported is not None and predicate(view.reported):
                return view.reported
            return None

        def last() -> str:
            view = self.view.devices.get(device)
            last = view.reported.model_dump(mode="json") if view and view.reported else None
            return f"{device}: {what or 'condition'} not reached; last reported {last}"

        return wait_until(reached, timeout, interval=0, message=last)

    def wait_event(
        self, predicate: Callable[[Event], bool], timeout: float = WAIT, what: str = ""
    ) -> Event:

        def found() -> Event | None:
            event = next((e for e in self.events if predicate(e)), None)
            if event is None:
                self._drain(0.05)
            return event

        return wait_until(
            found,
            timeout,
            interval=0,
            message=lambda: (
                f"no event {what}; got {[e.model_dump(mode='json') for e in self.events]}"
            ),
        )

    def online(self, device: str, timeout: float = WAIT) -> bool | None:
        self._drain(0.2)
        view = self.view.devices.get(device)
        return None if view is None else view.online

    def publish(self, topic: str, payload: bytes, retain: bool = True) -> None:
        info = self.session.publish(topic, payload, retain=retain)
        info.wait_for_publish(5)
        assert info.is_published(), f"no PUBACK for {topic}"
        assert info.mid not in self.session.refused, self.session.refused[info.mid]


@contextmanager
def watcher(
    broker: Endpoint,
    identity: str = "fleet",
    protocol: str = "5",
    also: Sequence[str] = (),
    name: str = "watcher",
) -> Iterator[Watcher]:
    """The fleet's view; ``also``: more topic filters whose messages go to ``raw`` too (block
    requests, say); ``name`` tells two watchers of one test apart (a broker lets one client id
    in at once)."""
    inbox: queue.SimpleQueue[InboxItem] = queue.SimpleQueue()
    view = FleetView(TOPICS)
    session = Session(
        mqtt_settings(broker, identity, protocol),
        f"{name}-{os.getpid()}-{threading.get_ident()}",
        inbox,
        subscriptions=[*view.subscriptions, *also],
        persistent=False,
    )
    session.start()
    try:
        assert session.connected.wait(WAIT), f"the watcher could not connect\n{broker.log()}"
        yield Watcher(session, inbox, view)
    finally:
        session.stop()


@contextmanager
def bundle_server(
    broker: Endpoint,
    bundles: Path,
    *,
    identity: str = "fleet",
    protocol: str = "5",
    rate_bytes_s: float = 256 << 20,
    name: str = "server",
    max_packet_bytes: int | None = None,
) -> Iterator[list[BlockServer]]:
    """Run ``serve`` on a thread; yields a list that holds the server once it has stopped.

    The per-device burst is a quarter second at ``rate_bytes_s``, so a low rate paces a
    transfer from its first block. ``max_packet_bytes`` is ``--max-packet-bytes``.
    """
    stop = threading.Event()
    done: list[BlockServer] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            done.append(
                serve(
                    bundles,
                    mqtt_settings(broker, identity, protocol),
                    topics=TOPICS,
                    client_id=f"{name}-{os.getpid()}",
                    rate_bytes_s=rate_bytes_s,
                    burst_bytes=rate_bytes_s / 4,
                    max_packet_bytes=max_packet_bytes,
                    stop=stop,
                )
            )
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    try:
        yield done
    finally:
        stop.set()
        thread.join(10)
        assert not errors, errors


@contextmanager
def agent(config: AgentConfig) -> Iterator[DeviceAgent]:
    """A DeviceAgent on a thread of this process; stopped (cleanly) on exit."""
    device = DeviceAgent(config)
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            device.run(stop)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, name=f"agent-{config.device_id}", daemon=True)
    thread.start()
    try:
        yield device
    finally:
        stop.set()
        thread.join(10)
        assert not thread.is_alive(), "the agent did not stop"
        assert not errors, errors


def write_agent_toml(config: AgentConfig, path: Path) -> Path:
    """agent.toml for ``edge-agent run`` (only what the tests set)."""
    m, t = config.mqtt, config.transfer

    def q(value: object) -> str:
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = [
        f"device_id = {q(config.device_id)}",
        f"groups = [{', '.join(q(g) for g in config.groups)}]",
        f"state_dir = {q(config.state_dir)}",
        f"report_interval_s = {config.report_interval_s}",
        f"status_socket = {q(config.status_socket or '')}",
        "[mqtt]",
        f"host = {q(m.host)}",
        f"port = {m.port}",
        f"protocol = {q(m.protocol)}",
        f"tls = {'true' if m.tls else 'false'}",
        f"keepalive_s = {m.keepalive_s}",
        f"backoff_initial_s = {m.backoff_initial_s}",
        f"backoff_max_s = {m.backoff_max_s}",
        f"failover = [{', '.join(q(e) for e in m.failover)}]",
    ]
    for name in ("ca_file", "cert_file", "key_file"):
        if getattr(m, name) is not None:
            lines.append(f"{name} = {q(getattr(m, name))}")
    lines += ["[trust]", f"root = {q(config.trust.root)}"]
    if config.trust.keyring is not None:
        lines.append(f"keyring = {q(config.trust.keyring)}")
    lines += [
        "[transfer]",
        f"window = {t.window}",
        f"request_timeout_s = {t.request_timeout_s}",
        f"stall_timeout_s = {t.stall_timeout_s}",
        "[serving]",
        f"probation_s = {config.serving.probation_s}",
        f"probation_min_requests = {config.serving.probation_min_requests}",
        "max_p99_ratio = false" if config.serving.max_p99_ratio is None else "",
        "[api]",
    ]
    api = config.api
    lines.append(f"port = {api.port}" if api.port is not None else "port = false")
    lines.append(f"unix_socket = {q(api.unix_socket)}" if api.unix_socket else 'unix_socket = ""')
    lines += ["[telemetry]", f"interval_s = {config.telemetry.interval_s}"]
    path.write_text("\n".join(lines) + "\n")
    return path


@contextmanager
def agent_process(
    config_file: Path, log: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """``edge-agent run --config FILE`` as a real process; killed (SIGKILL) on exit if alive.
    ``env`` adds to this process's environment."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "edge-agent"),
                "run",
                "--config",
                str(config_file),
                "-v",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={**os.environ, **(env or {})},
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)


class UnixHTTPConnection(loadtest.UnixHTTPConnection):
    """HTTP to the agent's API on its Unix socket, within the tests' wait."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, WAIT)


def infer_unix(sock: Path, x: np.ndarray, model: str = "tiny") -> tuple[int, dict[str, Any]]:
    """POST ``x`` (FP32, as input ``x``) to ``model`` on the agent's Unix socket, in JSON:
    the status and the decoded answer."""
    body = {
        "inputs": [
            {"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
        ]
    }
    conn = UnixHTTPConnection(sock)
    try:
        conn.request(
            "POST",
            f"/v2/models/{model}/infer",
            json.dumps(body),
            {"Content-Type": "application/json"},
        )
        reply = conn.getresponse()
        doc = json.loads(reply.read())
    finally:
        conn.close()
    return reply.status, doc


# -- what the tests wait for ----------------------------------------------------------------------
def active(model: str, version: str) -> Callable[[Reported], bool]:
    """``model`` runs ``version`` and its deployment is done."""

    def check(r: Reported) -> bool:
        m = r.models.get(model)
        return m is not None and m.phase == Phase.ACTIVE and m.version == version

    return check


def failed(model: str, code: str | None = None) -> Callable[[Reported], bool]:
    """``model``'s deployment failed (with the reason ``code``, when given)."""

    def check(r: Reported) -> bool:
        m = r.models.get(model)
        if m is None or m.phase != Phase.FAILED:
            return False
        return code is None or (m.error is not None and m.error.code == code)

    return check


def downloading_past(model: str, percent: float) -> Callable[[Reported], bool]:
    def check(r: Reported) -> bool:
        m = r.models.get(model)
        return m is not None and m.progress is not None and m.progress >= percent

    return check


@dataclass(frozen=True)
class TwoVersions:
    """tiny 1.0.0 and 2.0.0, with different weights, signed and in a bundle server's directory."""

    served: Path
    models: dict[str, Path]  # "1.0.0" / "2.0.0" -> its ONNX model
    bundles: dict[str, Path]
    envelopes: dict[str, bytes]


def two_versions(tmp_path: Path, signed: Callable[..., tuple[Path, bytes]]) -> TwoVersions:
    served = tmp_path / "served"
    served.mkdir()
    models, bundles, envelopes = {}, {}, {}
    for version, seed in (("1.0.0", 1), ("2.0.0", 2)):
        models[version] = make_onnx(tmp_path / f"m{seed}.onnx", seed=seed)
        bundles[version], envelopes[version] = signed(
            version, models=[models[version]], block_size=4096
        )
        shutil.copyfile(bundles[version], served / bundles[version].name)
    return TwoVersions(served, models, bundles, envelopes)


def serve_copy(signed_bundle: tuple[Path, bytes], bundles: Path) -> bytes:
    """Put a signed bundle in a bundle server's directory; return its descriptor envelope."""
    path, envelope = signed_bundle
    shutil.copyfile(path, bundles / path.name)
    return envelope


@contextmanager
def simulated(
    broker: Endpoint, keys: Any, state: Path, group: str = "site-a", **fields: Any
) -> Iterator[Simulator]:
    """Simulated devices (agent.fleet.simulator) in ``group``, on a thread of their own,
    stopped (offline said) on exit. ``fields``: the simulator's settings (devices, failures,
    metrics, ...)."""
    settings = make_settings({"groups": [group], "load_s": 0.05, **fields})
    sim = Simulator(
        settings,
        mqtt_settings(broker),
        load_trust(keys.dir, datetime.now(timezone.utc)),
        topics=TOPICS,
        state_dir=state,
    )
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            sim.run(stop)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, name="simulator", daemon=True)
    thread.start()
    try:
        yield sim
    finally:
        stop.set()
        thread.join(15)
        assert not thread.is_alive(), "the simulator did not stop"
        assert not errors, errors
