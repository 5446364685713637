"""What the dashboard knows of the fleet, built from the broker's messages alone.

:class:`FleetModel` takes every message the dashboard's session receives (retained reported
state, online, desired documents and rollouts; live events and telemetry) on the session's
thread, and hands the web server JSON-ready views of it on the server's thread. Each change
bumps a version number: a page that was sent version ``v`` asks for the changes since ``v``
and gets only the devices that changed (and the rollouts, when any changed).

Nothing here holds a secret: reported state, events and telemetry are what devices publish,
and rollouts are what the broker holds; the fleet's keys and the broker's credentials never
reach this module.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from typing import Any

from agent.errors import BadContentError
from agent.fleet.control import FINAL, DeviceView
from agent.fleet.dashboard.history import History
from agent.fleet.plan import Knowledge
from agent.fleet.rollout import lease_free, summary
from agent.transport.messages import (
    ROLLOUT_FINAL,
    ErrorInfo,
    Event,
    HardwareProfile,
    Reported,
    RolloutPlan,
    RolloutState,
    Telemetry,
)
from agent.transport.session import Connection, InboxItem
from agent.transport.topics import Topics

EVENTS_PER_DEVICE = 100  # a device's page lists this many of its newest events
RECENT_EVENTS = 200  # the fleet's newest events, across devices
# The telemetry a device row shows beside its models (the newest reading).
ROW_METRICS = ("cpu.percent", "mem.percent", "proc.rss_mb")


def hardware_class(hw: HardwareProfile | None) -> str:
    """``Jetson``, ``NVIDIA GPU``, ``Intel`` or ``CPU`` (``?`` before the device reported)."""
    if hw is None:
        return "?"
    if "jetson" in hw.accelerators:
        return "Jetson"
    if "nvidia-gpu" in hw.accelerators:
        return "NVIDIA GPU"
    if {"intel-gpu", "intel-npu"} & set(hw.accelerators) or "intel" in hw.details.get(
        "cpu", ""
    ).lower():
        return "Intel"
    return "CPU"


def _iso(when: datetime | None) -> str | None:
    return None if when is None else when.astimezone(timezone.utc).isoformat()


def _error(e: ErrorInfo | None) -> dict[str, str] | None:
    return None if e is None else {"code": e.code, "message": e.message}


def event_json(ev: Event) -> dict[str, Any]:
    return {
        "device": ev.device_id,
        "seq": ev.seq,
        "at": _iso(ev.at),
        "kind": ev.kind,
        "model": ev.model,
        "deployment": ev.deployment_id,
        "phase": ev.phase.value if ev.phase else None,
        "topic": ev.topic,
        "error": _error(ev.error),
        "count": ev.count,
    }


def allowed_actions(state: RolloutState | None, live_owner: bool) -> list[str]:
    """What an operator may ask of a rollout in ``state`` (the CLI refuses the rest)."""
    if state is None:
        return []
    st = state.status
    out = []
    if st == "running":
        out.append("pause")
    if st in ("paused", "halted") or (st in ("running", "rolling-back") and not live_owner):
        out.append("resume")
    if st not in ROLLOUT_FINAL and st != "rolling-back":
        out.append("abort")
    if state.published > 0 and st != "rolled-back" and not (st == "rolling-back" and live_owner):
        out.append("rollback")
    return out


class FleetModel:
    """The fleet as the dashboard shows it; thread-safe (see the module docstring)."""

    def __init__(
        self,
        topics: Topics,
        *,
        history: History | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.topics = topics
        self.knowledge = Knowledge(topics)
        self.history = history or History(clock=clock)
        self.clock = clock
        self._lock = threading.RLock()
        self.version = 0
        self._device_version: dict[str, int] = {}
        self._rollouts_version = 0
        self._events: dict[str, deque[Event]] = {}
        self._recent: deque[Event] = deque(maxlen=RECENT_EVENTS)
        self._latest: dict[str, dict[str, float]] = {}  # device -> newest telemetry
        self._telemetry_at: dict[str, datetime] = {}  # device -> when it sent that
        self._heard: dict[str, datetime] = {}  # device -> when a live message of it came
        self.connected: bool | None = None  # None: not connected yet
        self.connection_note = "connecting to the broker"
        self.messages = 0

    @property
    def subscriptions(self) -> list[str]:
        return self.knowledge.subscriptions

    # -- taking messages (the session's thread) --------------------------------------------
    def take(self, item: InboxItem) -> None:
        with self._lock:
            self.version += 1
            if isinstance(item, Connection):
                self.connected = item.up
                self.connection_note = "connected" if item.up else f"lost: {item.reason}"
                self._rollouts_version = self.version
                return
            self.messages += 1
            try:
                ref = self.topics.parse(item.topic)
            except BadContentError:
                return
            views = self.knowledge.view.devices
            before = views[ref.id].last_event if ref.id in views else None
            self.knowledge.update(item)  # FleetView parses reports, online and events
            if ref.kind == "rollout":
                self._rollouts_version = self.version
                return
            if ref.kind != "device":
                return
            self._device_version[ref.id] = self.version
            if not item.retain:  # live: heard now, whatever the device's clock says
                self._heard[ref.id] = datetime.now(timezone.utc)
            # A device's report moves the rollouts it is in along.
            if ref.channel in ("reported", "events") and self.knowledge.plans:
                self._rollouts_version = self.version
            if ref.channel == "events":
                ev = views[ref.id].last_event if ref.id in views else None
                if ev is not None and ev is not before:  # else refused: a problem of the view
                    self._events.setdefault(ref.id, deque(maxlen=EVENTS_PER_DEVICE)).append(ev)
                    self._recent.append(ev)
                return
            try:
                if ref.channel == "telemetry":
                    t = Telemetry.from_bytes(item.payload)
                    # JSON has no infinity; a reading of 1e400 is one, and means nothing.
                    metrics = {k: v for k, v in t.metrics.items() if math.isfinite(v)}
                    self._latest[ref.id] = metrics
                    self._telemetry_at[ref.id] = t.at
                    self.history.add(ref.id, metrics)
            except BadContentError as exc:
                view = self.knowledge.view.devices.setdefault(ref.id, DeviceView(ref.id))
                view.problems.append(f"{ref.channel}: {exc}")
                del view.problems[:-3]

    # -- views (the web server's thread) ---------------------------------------------------
    def device_row(self, device: str) -> dict[str, Any] | None:
        with self._lock:
            view = self.knowledge.view.devices.get(device)
            if view is None:
                return None
            return self._row(view)

    def _row(self, view: DeviceView) -> dict[str, Any]:
        r: Reported | None = view.reported
        latest = self._latest.get(view.device_id, {})
        models = []
        for name, m in sorted((r.models if r else {}).items()):
            models.append(
                {
                    "name": name,
                    "version": m.version,
                    "release": m.release,
                    "variant": m.variant,
                    "runtime": m.runtime,
                    "phase": m.phase.value,
                    "final": m.phase in FINAL,
                    "progress": m.progress,
                    "error": _error(m.error),
                    "fallback": m.fallback.version if m.fallback else None,
                    **{
                        k: latest.get(f"model.{name}.{k}")
                        for k in ("rps", "p50_ms", "p99_ms", "errors_per_s")
                    },
                }
            )
        return {
            "id": view.device_id,
            "online": view.online,
            "last_seen": _iso(self._last_seen(view)),
            "agent": view.agent_version,
            "groups": list(r.groups) if r else [],
            "hardware": hardware_class(r.hardware if r else None),
            "arch": r.hardware.arch if r and r.hardware else None,
            "deployment": r.deployment_id if r else None,
            "error": _error(r.error) if r else None,
            "models": models,
            "telemetry": {k: latest[k] for k in ROW_METRICS if k in latest},
            "problems": list(view.problems),
            "version": self._device_version.get(view.device_id, 0),
        }

    def _last_seen(self, view: DeviceView) -> datetime | None:
        """When the device was last heard of: a live message's arrival (the fleet's clock),
        else the newest time it put on what it sent (telemetry too), never later than now."""
        now = datetime.now(timezone.utc)
        stamped = [t for t in (view.last_seen, self._telemetry_at.get(view.device_id)) if t]
        times = [min(t, now) for t in stamped]
        heard = self._heard.get(view.device_id)
        if heard is not None:
            times.append(heard)
        return max(times, default=None)

    def device_detail(self, device: str) -> dict[str, Any] | None:
        """A device's page: its row, the hardware it reported, its events (newest first) and
        its charted telemetry."""
        with self._lock:
            view = self.knowledge.view.devices.get(device)
            if view is None:
                return None
            r = view.reported
            events = [event_json(ev) for ev in reversed(self._events.get(device, ()))]
            trust = r.trust.model_dump(mode="json") if r and r.trust else None
            row = self._row(view)
            hw = r.hardware.model_dump(mode="json") if r and r.hardware else None
        return {
            **row,
            "hardware_profile": hw,
            "trust": trust,
            "reported_at": _iso(r.at) if r else None,
            "events": events,
            "window_s": self.history.window_s,
            "series": {
                name: [[round(t, 3), v] for t, v in points]
                for name, points in self.history.series(device).items()
            },
        }

    def rollouts(self) -> list[dict[str, Any]]:
        """Every rollout on the broker, newest first: its summary (waves with counts, the
        failures with their codes), its gate and what may be asked of it now."""
        with self._lock:
            k = self.knowledge
            out = []
            now = datetime.now(timezone.utc)
            for rid in sorted(k.plans, key=lambda r: k.plans[r].created, reverse=True):
                plan: RolloutPlan = k.plans[rid]
                state = k.states.get(rid)
                if state is None:
                    out.append({"rollout": rid, "status": "?", "actions": []})
                    continue
                info = summary(plan, state, k)
                live = not lease_free(state, now)
                info["gate"] = plan.gate.model_dump(mode="json")
                info["created"] = _iso(plan.created)
                info["created_by"] = plan.created_by
                info["driven"] = live
                info["actions"] = allowed_actions(state, live)
                out.append(info)
            return out

    def latest(self, device: str) -> dict[str, float]:
        """The newest telemetry of ``device`` (every metric it sent)."""
        with self._lock:
            return dict(self._latest.get(device, {}))

    def recent_events(self, limit: int = 50) -> list[dict[str, Any]]:
        with self._lock:
            return [event_json(ev) for ev in list(self._recent)[::-1][:limit]]

    def counts(self) -> dict[str, int]:
        with self._lock:
            devices = self.knowledge.view.devices.values()
            rows = [(v.online, v.reported) for v in devices]
        failing = sum(
            1
            for _, r in rows
            if r is not None and (r.error or any(m.error for m in r.models.values()))
        )
        busy = sum(
            1
            for _, r in rows
            if r is not None and any(m.phase not in FINAL for m in r.models.values())
        )
        return {
            "devices": len(rows),
            "online": sum(1 for o, _ in rows if o),
            "offline": sum(1 for o, _ in rows if o is False),
            "failing": failing,
            "updating": busy,
        }

    def snapshot(self) -> dict[str, Any]:
        """Everything the fleet page shows, at one version."""
        with self._lock:
            version = self.version
            rows = [self._row(v) for _, v in sorted(self.knowledge.view.devices.items())]
            return {
                "version": version,
                "now": _iso(datetime.now(timezone.utc)),
                "broker": {"connected": self.connected, "note": self.connection_note},
                "counts": self.counts(),
                "devices": rows,
                "rollouts": self.rollouts(),
                "events": self.recent_events(),
            }

    def changes(self, since: int) -> dict[str, Any] | None:
        """What changed after version ``since`` (None: nothing): the devices that did, the
        rollouts if any did, and the newest events."""
        with self._lock:
            if self.version <= since:
                return None
            changed = [d for d, v in self._device_version.items() if v > since]
            views = self.knowledge.view.devices
            out: dict[str, Any] = {
                "version": self.version,
                "now": _iso(datetime.now(timezone.utc)),
                "broker": {"connected": self.connected, "note": self.connection_note},
                "counts": self.counts(),
                "devices": [self._row(views[d]) for d in sorted(changed) if d in views],
            }
            if self._rollouts_version > since:
                out["rollouts"] = self.rollouts()
            if changed:
                out["events"] = self.recent_events()
            return out

    def known(self) -> Iterable[str]:
        with self._lock:
            return list(self.knowledge.view.devices)
