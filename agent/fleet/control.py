"""The fleet side of the control plane: publish desired documents, read devices' state.

Used by ``edge-fleet deploy`` and ``edge-fleet status``. Everything comes from retained topics
(``devices/+/reported``, ``devices/+/online``), so a status is complete as soon as the broker has
sent the retained messages; ``watch`` then follows live updates.
"""

from __future__ import annotations

import contextlib
import queue
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

from agent.errors import BadContentError, BrokerError, ConfigError
from agent.transport.messages import Event, Online, Phase, Reported
from agent.transport.session import Connection, InboxItem, Incoming, MqttSettings, Session
from agent.transport.topics import Topics

FINAL = {Phase.ACTIVE, Phase.FAILED, Phase.ROLLED_BACK}


@contextlib.contextmanager
def fleet_session(
    settings: MqttSettings,
    client_id: str,
    *,
    subscriptions: list[str] | tuple[str, ...] = (),
    timeout: float = 10.0,
) -> Iterator[tuple[Session, queue.SimpleQueue[InboxItem]]]:
    """A connected, non-persistent session for one command; BrokerError if none in ``timeout``."""
    inbox: queue.SimpleQueue[InboxItem] = queue.SimpleQueue()
    session = Session(
        settings, client_id, inbox, subscriptions=list(subscriptions), persistent=False
    )
    session.start()
    try:
        if not session.connected.wait(timeout):
            raise BrokerError(
                f"cannot connect to {settings.host}:{settings.port} within {timeout:.0f} s "
                "(check --broker and the TLS files; the broker log says why it refused)"
            )
        yield session, inbox
    finally:
        session.stop()


def publish_retained(session: Session, topic: str, payload: bytes, timeout: float = 10.0) -> None:
    """Publish a retained QoS 1 message and wait for the broker to take it."""
    info = session.publish(topic, payload, retain=True)
    try:
        info.wait_for_publish(timeout)
    except (RuntimeError, ValueError) as exc:
        raise BrokerError(f"could not publish to {topic}: {exc}") from None
    if not info.is_published():
        raise BrokerError(f"the broker did not acknowledge {topic} within {timeout:.0f} s")
    refused = session.refused.get(info.mid)
    if refused is not None:
        raise BrokerError(f"the broker refused {topic}: {refused} (does the ACL allow it?)")


@dataclass
class DeviceView:
    device_id: str
    online: bool | None = None
    online_message: Online | None = None
    reported: Reported | None = None
    last_event: Event | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def agent_version(self) -> str | None:
        """The agent's version, from its reported state or, before it reported, its online
        message (the will, which says offline, carries none)."""
        if self.reported is not None:
            return self.reported.agent_version
        return self.online_message.agent_version if self.online_message else None

    @property
    def last_seen(self) -> datetime | None:
        """The newest time the device put on what it sent: its reported state, when it came
        online, its last event (the device's clock, not the time the broker got it)."""
        times = [
            self.reported.at if self.reported else None,
            self.online_message.since if self.online_message else None,
            self.last_event.at if self.last_event else None,
        ]
        return max((t for t in times if t is not None), default=None)


class FleetView:
    """Devices' state from the retained topics, updated message by message."""

    def __init__(self, topics: Topics) -> None:
        self.topics = topics
        self.devices: dict[str, DeviceView] = {}

    @property
    def subscriptions(self) -> list[str]:
        return [
            self.topics.all_devices_filter("reported"),
            self.topics.all_devices_filter("online"),
            self.topics.all_devices_filter("events"),
        ]

    def update(self, item: Incoming) -> str | None:
        """Take one message; return the device id it changed (None if none)."""
        try:
            ref = self.topics.parse(item.topic)
        except BadContentError:
            return None
        if ref.kind != "device":
            return None
        view = self.devices.setdefault(ref.id, DeviceView(ref.id))
        try:
            if ref.channel == "online":
                view.online_message = Online.from_bytes(item.payload) if item.payload else None
                view.online = view.online_message.state == "online" if view.online_message else None
            elif ref.channel == "reported":
                view.reported = Reported.from_bytes(item.payload) if item.payload else None
            elif ref.channel == "events":
                view.last_event = Event.from_bytes(item.payload)
            else:
                return None
        except BadContentError as exc:
            view.problems.append(f"{ref.channel}: {exc}")
            del view.problems[:-3]
        return ref.id

    def rows(self) -> list[dict[str, object]]:
        out: list[dict[str, object]] = []
        for device_id, view in sorted(self.devices.items()):
            r = view.reported
            models = r.models if r else {}
            base: dict[str, object] = {
                "device": device_id,
                "online": view.online,
                "last_seen": view.last_seen,
                "agent": view.agent_version,
                "deployment": r.deployment_id if r else None,
                "error": r.error.code if r and r.error else None,
            }
            if not models:
                none = ("model", "version", "variant", "runtime", "phase", "progress")
                out.append({**base, **dict.fromkeys(none)})
            for name, m in sorted(models.items()):
                out.append(
                    {
                        **base,
                        "model": name,
                        "version": m.version,
                        "variant": m.variant,
                        "runtime": m.runtime,
                        "phase": m.phase.value,
                        "progress": m.progress,
                        # A refused document (the newest news) first, then the model's own.
                        "error": "; ".join(
                            str(e) for e in (base["error"], m.error.code if m.error else None) if e
                        )
                        or None,
                    }
                )
        return out

    def as_json(self) -> dict[str, object]:
        return {
            device_id: {
                "online": view.online,
                "agent_version": view.agent_version,
                "last_seen": None if view.last_seen is None else view.last_seen.isoformat(),
                "reported": None
                if view.reported is None
                else view.reported.model_dump(mode="json"),
            }
            for device_id, view in sorted(self.devices.items())
        }


class Updatable(Protocol):
    def update(self, item: Incoming) -> object: ...


def collect(
    session_inbox: queue.SimpleQueue[InboxItem],
    view: Updatable,
    *,
    quiet: float = 0.5,
    timeout: float = 5.0,
) -> None:
    """Take messages until no retained one came for ``quiet`` seconds (at most ``timeout``)."""
    deadline = time.monotonic() + timeout
    last = time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - last < quiet:
        try:
            item = session_inbox.get(timeout=0.05)
        except queue.Empty:
            continue
        if isinstance(item, Incoming):
            view.update(item)
            if item.retain:  # live traffic (telemetry, events) never goes quiet
                last = time.monotonic()
        elif isinstance(item, Connection) and not item.up:
            raise BrokerError("lost the connection to the broker")


def bar(percent: float | None, width: int = 20) -> str:
    if percent is None:
        return ""
    filled = round(width * max(0.0, min(100.0, percent)) / 100)
    return "[" + "#" * filled + "." * (width - filled) + f"] {percent:5.1f}%"


def age(seconds: float) -> str:
    """A short age: ``12s``, ``5m``, ``3h``, ``2d`` (a clock ahead of ours reads ``0s``)."""
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def short_runtime(runtime: str) -> str:
    """The runtime as the table shows it: its name and where it runs, without the version or
    the settings (``onnxruntime 1.20.1 CUDAExecutionProvider`` -> ``onnxruntime CUDA``)."""
    name, *rest = runtime.split()
    where = next((t for t in rest if not t[:1].isdigit()), None)
    return name if where is None else f"{name} {where.removesuffix('ExecutionProvider')}"


def render_table(view: FleetView, now: datetime | None = None) -> str:
    """The fleet as a table: one row per device and model, short enough for 80-100 columns
    (the full runtime and every time stamp are in ``--json``)."""
    now = now or datetime.now(timezone.utc)
    headers = [
        "DEVICE",
        "ONLINE",
        "SEEN",
        "AGENT",
        "MODEL",
        "VERSION",
        "VARIANT",
        "RUNTIME",
        "PHASE",
        "ERROR",
    ]
    rows = []
    for row in view.rows():
        online = {True: "yes", False: "no", None: "?"}[row["online"]]  # type: ignore[index]
        seen = row["last_seen"]
        phase = str(row["phase"] or "-")
        progress = row["progress"]
        if progress is not None and row["phase"] not in {p.value for p in FINAL}:
            phase += f" {progress:.0f}%"
        rows.append(
            [
                str(row["device"]),
                online,
                age((now - seen).total_seconds()) if isinstance(seen, datetime) else "-",
                str(row["agent"] or "-"),
                str(row["model"] or "-"),
                str(row["version"] or "-"),
                str(row["variant"] or "-"),
                short_runtime(str(row["runtime"])) if row["runtime"] else "-",
                phase,
                str(row["error"] or ""),
            ]
        )
    if not rows:
        return "no device has reported yet"
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def check_settings(settings: MqttSettings) -> None:
    for name in ("ca_file", "cert_file", "key_file"):
        path = getattr(settings, name)
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"{name.replace('_', ' ')} {path} does not exist")
