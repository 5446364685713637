"""What a device reports of itself: the retained reported state, the events, the status snapshot
of ``edge-agent status`` and the STATUS= line, all built on the loop's thread.

:class:`Reporter` keeps what goes out and when: whether the reported state changed since it was
last published (and when that was: at most once per ``report_interval_s``, at once after a phase
change), the event numbers reserved on disk, and the refusals per topic and code that are
counted into one ``rejected`` event a second. What it reports it reads from the loop's state
(:class:`LoopView`), which it never changes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal, Protocol

from agent import __version__
from agent.device.machine import ModelRollout, error_info
from agent.errors import BadContentError, EdgeAgentError
from agent.logs import log_fields
from agent.runtime.probe import HostProfile
from agent.state.store import EVENT_SEQ_BLOCK
from agent.transport.messages import (
    MAX_MESSAGE_BYTES,
    ErrorInfo,
    Event,
    HardwareProfile,
    ModelStatus,
    Phase,
    Reported,
    TrustStatus,
)

if TYPE_CHECKING:
    from agent.serving.server import ApiServer
    from agent.serving.slots import SlotManager
    from agent.state.store import StateStore
    from agent.transport.session import Session
    from agent.transport.topics import DeviceTopics
    from agent.trust.verifier import TrustedState, VerifiedDeployment

log = logging.getLogger("agent")

# At most one `rejected` event per topic, reason code and second; refusals beyond it are
# counted into the next one (Event.count), never dropped.
REJECT_EVENT_INTERVAL_S = 1.0
MAX_REPORTED_MODELS = 16  # Reported.models holds at most this many


def reported_hardware(profile: HostProfile) -> HardwareProfile:
    """The probe's findings in the reported state's terms."""
    details = {k[:64]: v[:1024] for k, v in list(profile.details().items())[:32]}
    return HardwareProfile(
        arch=profile.architecture[:32] or "unknown",
        cpu_count=max(1, profile.cpu_cores),
        memory_mb=profile.memory_total_mb,
        accelerators=profile.accelerators[:16],
        details=details,
    )


class LoopView(Protocol):
    """What reporting reads of the loop's state (agent.daemon.DeviceAgent's attributes)."""

    @property
    def rollouts(self) -> Mapping[str, ModelRollout]: ...
    @property
    def deployment(self) -> VerifiedDeployment | None: ...
    @property
    def documents(self) -> Mapping[str, VerifiedDeployment]: ...
    @property
    def trusted(self) -> TrustedState: ...
    @property
    def api(self) -> ApiServer | None: ...


@dataclass
class _Rejects:
    """Refusals on one topic with one code: when the last event went, and what came since."""

    sent: float
    count: int = 0
    error: ErrorInfo | None = None


@dataclass
class _Outbox:
    reported_dirty: bool = True
    last_reported: float = float("-inf")
    last_progress: dict[str, float] = field(default_factory=dict)
    event_seq: int = 0
    event_seq_end: int = 0  # reserved on disk up to here (StateStore.reserve_event_seq)
    rejects: dict[tuple[str, str], _Rejects] = field(default_factory=dict)


class Reporter:
    """The device's reports, from the loop's thread only. ``error`` is the device-level error
    the reported state carries (a refused document, a step of the loop that failed)."""

    def __init__(
        self,
        view: LoopView,
        *,
        device_id: str,
        groups: Sequence[str],
        hardware: HardwareProfile,
        topics: DeviceTopics,
        store: StateStore,
        session: Session,
        models: SlotManager,
        put_event: Callable[[str, bytes], None],
        tls: bool,
        report_interval_s: float,
        clock: Callable[[], datetime],
        monotonic: Callable[[], float],
    ) -> None:
        self._view = view
        self._device_id = device_id
        self._groups = list(groups)
        self.hardware = hardware
        self._me = topics
        self._store = store
        self._session = session
        self._models = models
        self._put_event = put_event
        self._tls = tls
        self.report_interval_s = report_interval_s  # set again on reload
        self._now = clock
        self._mono = monotonic
        self.error: ErrorInfo | None = None
        self.run_since: float | None = None  # monotonic time the loop began
        self.outbox = _Outbox()
        self._reserve_event_seq()

    # -- what changed ------------------------------------------------------------------------
    def changed(self) -> None:
        """The reported state changed: published at the next chance the interval allows."""
        self.outbox.reported_dirty = True

    def fault(self, info: ErrorInfo) -> None:
        self.error = info
        self.changed()

    def clear_error(self) -> None:
        self.error = None
        self.changed()

    def progress(self, name: str, progress: float) -> None:
        """A download moved on: reported again once it has moved a whole percent."""
        out = self.outbox
        if progress - out.last_progress.get(name, -1.0) >= 1.0:
            out.last_progress[name] = progress
            self.changed()

    def phase(self, rollout: ModelRollout) -> None:
        """``rollout`` entered its phase: logged, sent as an event, and reported at once."""
        phase = rollout.phase
        target = rollout.target.descriptor if rollout.target is not None else None
        shown = target or rollout.installed
        log.log(
            logging.WARNING if phase in (Phase.FAILED, Phase.ROLLED_BACK) else logging.INFO,
            "%s: %s",
            rollout.name,
            phase.value,
            extra=log_fields(
                model=rollout.name,
                version=shown.version if shown is not None else None,
                deployment_id=rollout.deployment_id,
                bundle_id=shown.bundle_sha256 if shown is not None else None,
                phase=phase,
            ),
        )
        self.changed()
        self.outbox.last_reported = float("-inf")  # phase changes go out at once
        self.event("phase", model=rollout.name, phase=phase, error=rollout.error)

    # -- events --------------------------------------------------------------------------------
    def reject(self, topic: str, exc: BadContentError, *, report: bool = True) -> None:
        log.warning("rejected a message on %s (%s): %s", topic, exc.code, exc)
        info = error_info(exc)
        if report:
            self.fault(info)
        now = self._mono()
        key = (topic, info.code)
        seen = self.outbox.rejects.get(key)
        if seen is None or (seen.count == 0 and now - seen.sent >= REJECT_EVENT_INTERVAL_S):
            self.outbox.rejects[key] = _Rejects(sent=now)
            self.event("rejected", topic=topic, error=info)
        else:  # within the interval: counted into the next event (see flush_rejects)
            seen.count += 1
            seen.error = info

    def flush_rejects(self, now: float) -> None:
        """Send what refusals came in since each topic's and code's last event, once its second
        is over; forget topics quiet for a minute."""
        for key, seen in list(self.outbox.rejects.items()):
            if now - seen.sent < REJECT_EVENT_INTERVAL_S:
                continue
            if seen.count:
                self.event("rejected", topic=key[0], error=seen.error, count=seen.count)
                self.outbox.rejects[key] = _Rejects(sent=now)
            elif now - seen.sent >= 60.0:
                del self.outbox.rejects[key]

    def event(
        self,
        kind: Literal["phase", "rejected", "info"],
        *,
        model: str | None = None,
        phase: Phase | None = None,
        topic: str | None = None,
        error: ErrorInfo | None = None,
        count: int = 1,
    ) -> None:
        out = self.outbox
        if out.event_seq >= out.event_seq_end:  # the numbers reserved on disk are used up
            self._reserve_event_seq()
        rollouts = self._view.rollouts
        event = Event(
            device_id=self._device_id,
            seq=out.event_seq,
            at=self._now(),
            kind=kind,
            model=model,
            deployment_id=(
                rollouts[model].deployment_id if model is not None and model in rollouts else None
            ),
            phase=phase,
            topic=topic[:256] if topic else None,
            error=error,
            count=count,
        )
        out.event_seq += 1
        self._put_event(self._me.events, event.to_bytes())

    def _reserve_event_seq(self) -> None:
        """More event numbers, reserved on disk so that they grow across restarts. A disk that
        refuses (full, read-only) costs only that: numbering goes on from the clock, far above
        what was reserved, and the reservation is tried again at the next block."""
        out = self.outbox
        try:
            out.event_seq, out.event_seq_end = self._store.reserve_event_seq(out.event_seq)
        except EdgeAgentError as exc:
            log.warning("event numbers not reserved on disk: %s", exc)
            out.event_seq = max(out.event_seq, time.time_ns() // 1000)
            out.event_seq_end = out.event_seq + EVENT_SEQ_BLOCK

    # -- the reported state ----------------------------------------------------------------------
    def reported(self) -> Reported:
        doc = self._view.deployment
        return Reported(
            device_id=self._device_id,
            agent_version=__version__,
            at=self._now(),
            hardware=self.hardware,
            groups=list(self._groups),
            deployment_id=doc.document.deployment_id if doc else None,
            sequence=doc.document.sequence if doc else None,
            models=self._reported_models(),
            error=self.error,
            trust=self._trust_status(),
        )

    def _trust_status(self) -> TrustStatus:
        trusted = self._view.trusted
        keyring = trusted.keyring
        return TrustStatus(
            root_version=trusted.root.version,
            keyring_version=keyring.version if keyring is not None else None,
            keyring_expires=keyring.expires if keyring is not None else None,
        )

    def _reported_models(self) -> dict[str, ModelStatus]:
        """Every model, those the deployment names first, at most as many as a report holds."""
        deployment = self._view.deployment
        rollouts = self._view.rollouts
        wanted = deployment.document.models if deployment else {}
        names = sorted(rollouts, key=lambda n: (n not in wanted, n))[:MAX_REPORTED_MODELS]
        return {n: rollouts[n].status(self._models.describe(n)) for n in sorted(names)}

    def due_in(self) -> float | None:
        """Seconds until something held back falls due (<= 0: now): the reported state that
        changed within its interval, a refusal counted into the next event, a quiet topic to
        forget. None: nothing is waiting."""
        out = self.outbox
        due: list[float] = []
        if out.reported_dirty:
            due.append(out.last_reported + self.report_interval_s)
        for seen in out.rejects.values():
            due.append(seen.sent + (REJECT_EVENT_INTERVAL_S if seen.count else 60.0))
        return min(due) - self._mono() if due else None

    def publish(self) -> None:
        """Publish the reported state (retained) if it changed and the interval allows."""
        now = self._mono()
        out = self.outbox
        if not out.reported_dirty:
            return
        if now - out.last_reported < self.report_interval_s:
            return
        payload = self.reported().to_bytes()
        if len(payload) > MAX_MESSAGE_BYTES:  # cannot happen with the models' caps
            log.error("reported state of %d bytes is too large", len(payload))
            return
        self._session.publish(self._me.reported, payload, retain=True)
        out.reported_dirty = False
        out.last_reported = now

    # -- on the box ------------------------------------------------------------------------------
    def status_line(self) -> str:
        """What the agent does, for STATUS=: "serving tiny 1.0.0; downloading detector 42%"."""
        parts: list[str] = []
        rollouts = self._view.rollouts
        for name in sorted(rollouts):
            rollout = rollouts[name]
            i = rollout.installed
            if rollout.phase == Phase.DOWNLOADING and rollout.transfer is not None:
                parts.append(f"downloading {name} {int(rollout.transfer.progress)}%")
            elif rollout.phase == Phase.ACTIVE and i is not None:
                parts.append(f"serving {name} {i.version}")
            else:
                parts.append(f"{name} {rollout.phase.value}")
        if not self._session.connected.is_set():
            parts.append("connecting to broker")
        return "; ".join(parts) or "no models"

    def status_snapshot(self, *, ready: bool = False) -> dict[str, Any]:
        """What ``edge-agent status`` shows (JSON-able)."""
        view = self._view
        doc = view.deployment
        source = next((s for s, d in view.documents.items() if d is doc), None)
        host, port = self._session.endpoint  # with failover nodes: the one connected to
        models: dict[str, Any] = {}
        for name in sorted(view.rollouts):
            rollout = view.rollouts[name]
            models[name] = rollout.status(self._models.describe(name)).model_dump(mode="json")
            models[name]["deployment_id"] = rollout.deployment_id
        api: list[str] = []
        server = view.api
        if server is not None and server.tcp_address is not None:
            api_host, api_port = server.tcp_address
            api.append(f"http://{api_host}:{api_port}")
        if server is not None and server.unix_socket is not None:
            api.append(f"unix:{server.unix_socket}")
        since = self.run_since
        return {
            "device_id": self._device_id,
            "agent_version": __version__,
            "at": self._now().isoformat(),
            "uptime_s": round(self._mono() - since, 3) if since is not None else 0.0,
            "ready": ready,
            "summary": self.status_line(),
            "broker": {
                "host": host,
                "port": port,
                "tls": self._tls,
                "connected": self._session.connected.is_set(),
                "connects": self._session.connects,
            },
            "deployment": (
                {
                    "id": doc.document.deployment_id,
                    "sequence": doc.document.sequence,
                    "source": source,
                }
                if doc is not None
                else None
            ),
            "error": self.error.model_dump(mode="json") if self.error else None,
            "models": models,
            "api": api,
        }
