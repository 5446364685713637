"""Rollouts: a new version over a target set in waves, each wave behind a gate.

``edge-fleet rollout start`` plans and then drives a rollout; ``pause``, ``resume``, ``abort`` and
``rollback`` act on one; ``status`` shows it. The parts:

* **Plan** (:func:`agent.fleet.plan.plan_rollout`, in :mod:`agent.fleet.plan`): the target set comes
  from the devices' retained ``reported`` and ``online`` topics (the group a device follows,
  narrowed by selectors on what it reports), ordered by a hash of the rollout id and the device id
  (so the canaries are a fair sample and the same on every replanning), cut into waves. For each
  device the plan keeps what its effective document named (the device's own, else its first
  group's): its document during the rollout names those models too, with the rolled-out ones
  replaced, so that no other model is removed; and what each rolled-out model ran before, where a
  rollback returns it.
* **State** (``rollouts/{id}/plan``, ``/state`` and ``/control``, all retained): on the broker
  rather than in a local file, so any controller on any machine can carry a rollout on after a
  crash, every operator sees it, and two operators' rollouts over the same devices are refused (the
  broker's order of the two plans decides which one stands). A device document is signed on the
  plan's terms, so a controller that publishes one again after a restart publishes the same bytes,
  which devices take as the document they already have.
* **Gate** (:func:`agent.fleet.gate.evaluate`, in :mod:`agent.fleet.gate`): a wave passes once every
  device of it is active, or the wave's timeout has passed (devices still on their way count as
  timed out), with failures -- failed, rolled back, refused, timed out, counted over every device
  published so far -- at most the threshold; then, with a soak time, the new version's error rate
  and p99 latency from the devices' telemetry against the old version's. A gate that fails halts the
  rollout at once.
* **Rollback** (:func:`agent.fleet.plan.rollback_terms`): every device the rollout published to gets
  a document that names what it ran before, each earlier bundle's descriptor re-issued with a
  release above every release the rollout reached: devices keep refusing older releases, and the
  bytes, so the blocks already on the boxes, are the same.

This module is the controller that drives a plan through its gates, and the commands on a
rollout (:func:`begin`, :func:`take_over`, :func:`pause_or_abort`, :func:`summary`).
"""

from __future__ import annotations

import os
import queue
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

from agent.errors import BrokerError, ConfigError, RolloutConflictError
from agent.fleet.control import publish_retained
from agent.fleet.gate import Follower, GateVerdict, evaluate, soak_verdict
from agent.fleet.plan import (
    Knowledge,
    descriptor_of,
    rollback_document,
    rollback_terms,
    rollback_want,
    rollout_document,
)
from agent.transport.messages import (
    HEARTBEAT_S,
    LEASE_S,
    MAX_ROLLOUT_DEVICES,
    NOT_RETURNED,
    ROLLOUT_FINAL,
    DeviceFailure,
    RollbackTerms,
    RolloutControl,
    RolloutPlan,
    RolloutState,
)
from agent.transport.session import Connection, InboxItem, Incoming, Session
from agent.transport.topics import Topics
from agent.trust.keys import Signer
from agent.trust.verifier import TrustedState

TICK_S = 0.2


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _releases(terms: RollbackTerms) -> str:
    return (
        ", ".join(sorted({str(descriptor_of(e).release) for e in terms.descriptors.values()}))
        or "-"
    )


# -- the controller ----------------------------------------------------------------------------
def owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"[:128]


def lease_free(state: RolloutState, now: datetime, me: str = "") -> bool:
    """No live controller drives the rollout: none owns it, its heartbeat is old, it is ``me``,
    or it ran on this host and its process is gone."""
    if state.owner is None or state.owner == me or state.heartbeat is None:
        return True
    if (now - state.heartbeat).total_seconds() > LEASE_S:
        return True
    host, _, pid = state.owner.rpartition(":")
    if host == socket.gethostname() and pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
    return False


Progress = Callable[[str], None]


class Controller:
    """Drives one rollout from its retained plan and state until it is done, halted, aborted,
    rolled back or stopped; one thread (the caller's), every wait bounded by a tick.

    Every step is written to the state topic before the next one starts, and every document it
    publishes is signed on terms the plan (or the rollback terms) fixes, so a controller that
    takes over after a crash does again at most what leaves the devices as they are.
    """

    def __init__(
        self,
        session: Session,
        inbox: queue.SimpleQueue[InboxItem],
        knowledge: Knowledge,
        plan: RolloutPlan,
        state: RolloutState,
        signers: Sequence[Signer],
        *,
        progress: Progress | None = None,
    ) -> None:
        self.session = session
        self.inbox = inbox
        self.k = knowledge
        self.topics = knowledge.topics
        self.plan = plan
        self.state = state
        self.signers = list(signers)
        self.me = owner_id()
        self.progress = progress or (lambda _line: None)
        terms = state.rollback.terms if state.rollback else plan.terms  # carrying a rollback on?
        self.follower = Follower(knowledge, terms.deployment_id, models=list(plan.models))
        self.follower.watching = set(plan.devices)
        self._wave_mono = time.monotonic()
        self._soak_mono = time.monotonic()
        self._beat = 0.0
        self._last_line = ""

    # -- state ------------------------------------------------------------------------------
    def save(self, **changes: Any) -> None:
        now = _now()
        self.state = self.state.model_copy(
            update={**changes, "owner": self.me, "heartbeat": now, "updated": now}
        )
        # Validated again (model_copy does not): a bad change fails here, before the broker.
        self.state = RolloutState.model_validate(self.state.model_dump())
        publish_retained(
            self.session, self.topics.rollout(self.plan.rollout_id, "state"), self.state.to_bytes()
        )
        self._beat = time.monotonic()

    def release(self) -> None:
        """Let another controller take over at once (a clean exit)."""
        now = _now()
        self.state = self.state.model_copy(
            update={"owner": None, "heartbeat": None, "updated": now}
        )
        publish_retained(
            self.session, self.topics.rollout(self.plan.rollout_id, "state"), self.state.to_bytes()
        )

    # -- the loop ----------------------------------------------------------------------------
    def run(
        self, stop: Callable[[], bool] = lambda: False, timeout: float | None = None
    ) -> RolloutState:
        deadline = time.monotonic() + timeout if timeout else float("inf")
        if self.state.wave_started is not None:  # carried on: the wave's clock goes on too
            self._wave_mono -= max(0.0, (_now() - self.state.wave_started).total_seconds())
        if self.state.soak_started is not None:
            self._soak_mono -= max(0.0, (_now() - self.state.soak_started).total_seconds())
        self.save()
        try:
            while not stop() and time.monotonic() < deadline:
                self._drain()
                if not self.step():
                    break
                if time.monotonic() - self._beat >= HEARTBEAT_S:
                    self.save()
        finally:
            self.release()
        return self.state

    def _drain(self) -> None:
        end = time.monotonic() + TICK_S
        while True:
            try:
                item = self.inbox.get(timeout=max(0.0, end - time.monotonic()))
            except queue.Empty:
                return
            if isinstance(item, Incoming):
                self.follower.update(item)
            elif isinstance(item, Connection) and not item.up:
                self.progress("connection to the broker lost; carrying on when it is back")

    def _control(self) -> None:
        c = self.k.controls.get(self.plan.rollout_id)
        if c is None or (self.state.control_at is not None and c.at <= self.state.control_at):
            return
        st = self.state.status
        if c.action == "abort" and st not in ROLLOUT_FINAL and st != "rolling-back":
            self.progress(f"aborted by {c.by or 'an operator'}")
            self.save(
                status="aborted", control_at=c.at, reason=f"aborted by {c.by or 'an operator'}"
            )
        elif c.action == "pause" and st == "running":
            self.progress(f"paused by {c.by or 'an operator'}")
            self.save(status="paused", control_at=c.at)
        elif c.action == "resume" and st in ("paused", "halted"):
            self.progress(f"resumed by {c.by or 'an operator'}")
            self.advance_if_halted(c.at)
        else:
            self.save(control_at=c.at)

    def advance_if_halted(self, at: datetime | None) -> None:
        """Carry the rollout on after a resume taken at ``at``: past the wave a gate halted
        (the operator looked at the halt and goes on), or from where it was paused."""
        if self.state.status == "halted":
            self._next_wave(control_at=at)
        else:
            self.save(status="running", control_at=at)

    def step(self) -> bool:
        """One tick; False once there is nothing left to drive."""
        self._control()
        st = self.state.status
        if st == "paused":
            return True
        if st == "running":
            self._run_wave()
            return self.state.status in ("running", "paused")
        if st == "rolling-back":
            self._run_rollback()
            return self.state.status == "rolling-back"
        return False

    # -- waves -------------------------------------------------------------------------------
    def _run_wave(self) -> None:
        s, plan = self.state, self.plan
        if s.published <= s.wave:
            self._publish_wave(s.wave)
            return
        verdict = evaluate(plan, s, self.follower, time.monotonic(), self._wave_mono)
        self._show(verdict)
        if verdict.passed is False:
            self.progress(f"halted in wave {s.wave + 1}: {verdict.reason}")
            self.save(
                status="halted",
                failures=verdict.failures[:MAX_ROLLOUT_DEVICES],
                reason=verdict.reason,
            )
            return
        if verdict.passed is None:
            return
        if plan.gate.soak_s > 0:
            if s.soak_started is None:
                self._soak_mono = time.monotonic()
                self.progress(f"wave {s.wave + 1} active; soaking for {plan.gate.soak_s:g} s")
                self.save(soak_started=_now(), failures=verdict.failures)
                return
            if time.monotonic() - self._soak_mono < plan.gate.soak_s:
                return
            ok, text = soak_verdict(plan, s, self.follower, self._soak_mono)
            if not ok:
                self.progress(f"halted after the soak of wave {s.wave + 1}: {text}")
                self.save(status="halted", failures=verdict.failures, reason=text)
                return
            self.progress(f"soak of wave {s.wave + 1} passed: {text}")
        self._next_wave(failures=verdict.failures)

    def _next_wave(self, **changes: Any) -> None:
        s = self.state
        if s.wave + 1 >= len(self.plan.waves):
            self.progress(
                f"done: {len(self.plan.devices)} devices in {len(self.plan.waves)} wave(s)"
            )
            self.save(status="done", reason=None, **changes)
            return
        self.save(
            status="running",
            wave=s.wave + 1,
            wave_started=None,
            soak_started=None,
            reason=None,
            **changes,
        )

    def _publish_wave(self, index: int) -> None:
        devices = self.plan.waves[index]
        self.progress(
            f"wave {index + 1}/{len(self.plan.waves)}: publishing to {len(devices)} device(s)"
        )
        self._publish_documents(
            devices, lambda d: rollout_document(self.plan, d, self.k, self.signers)
        )
        self._wave_mono = time.monotonic()
        self.save(published=index + 1, wave_started=_now())

    def _publish_documents(self, devices: Sequence[str], document: Callable[[str], bytes]) -> None:
        """Publish each device's document (QoS 1, retained); wait for the broker to take all."""
        pending = []
        for device in devices:
            info = self.session.publish(
                self.topics.device(device).desired, document(device), retain=True
            )
            pending.append((device, info))
        deadline = time.monotonic() + 30 + len(devices) * 0.05
        for device, info in pending:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            if not info.is_published():
                raise BrokerError(f"the broker did not take the document for {device}")
            refused = self.session.refused.get(info.mid)
            if refused is not None:
                raise BrokerError(f"the broker refused the document for {device}: {refused} (ACL?)")

    def _show(self, verdict: GateVerdict) -> None:
        counts = ", ".join(f"{n} {p}" for p, n in sorted(verdict.counts.items()))
        line = f"wave {self.state.wave + 1}/{len(self.plan.waves)}: {counts}"
        if line != self._last_line:
            self.progress(line)
            self._last_line = line

    # -- rollback ----------------------------------------------------------------------------
    def start_rollback(self, trust: TrustedState, days: int = 30) -> None:
        if self.state.rollback is None:
            terms = rollback_terms(
                self.plan, self.state, self.k, trust, self.signers, now=_now(), days=days
            )
            self.progress(
                f"rolling back {len(terms.devices)} device(s) to what they ran before "
                f"(release {_releases(terms)})"
            )
            self.save(
                status="rolling-back",
                rollback=terms,
                reason=None,
                failures=[],
                published=self.state.published,
            )
        elif self.state.status != "rolling-back":
            self.save(status="rolling-back")
        assert self.state.rollback is not None
        self.follower = Follower(
            self.k, self.state.rollback.terms.deployment_id, models=list(self.plan.models)
        )
        self.follower.watching = set(self.plan.devices)

    def _run_rollback(self) -> None:
        rb = self.state.rollback
        assert rb is not None
        if not rb.published:
            self._publish_documents(
                rb.devices, lambda d: rollback_document(self.plan, rb, d, self.k, self.signers)
            )
            self._wave_mono = time.monotonic()
            self.save(rollback=rb.model_copy(update={"published": True}), wave_started=_now())
            return
        failures: list[DeviceFailure] = []
        counts: dict[str, int] = {}
        waiting = 0
        timed_out = time.monotonic() - self._wave_mono >= self.plan.gate.wave_timeout_s
        for device in rb.devices:
            o = self.follower.outcome(device, rollback_want(self.plan, device))
            counts[o.phase] = counts.get(o.phase, 0) + 1
            if o.final and not o.ok:
                failures.append(o.failure(device, 0))
            elif not o.final:
                if timed_out:
                    failures.append(
                        DeviceFailure(
                            device=device,
                            wave=0,
                            code=NOT_RETURNED,
                            message=f"not back within {self.plan.gate.wave_timeout_s:g} s ({o.phase})",
                        )
                    )
                else:
                    waiting += 1
        line = "rollback: " + ", ".join(f"{n} {p}" for p, n in sorted(counts.items()))
        if line != self._last_line:
            self.progress(line)
            self._last_line = line
        if waiting:
            return
        reason = None
        if failures:
            reason = f"{len(failures)} of {len(rb.devices)} devices did not return: " + ", ".join(
                f"{f.device}: {f.code}" for f in failures[:5]
            )
        self.progress("rolled back" + (f"; {reason}" if reason else ""))
        self.save(status="rolled-back", failures=failures, reason=reason)


# -- commands ----------------------------------------------------------------------------------
EXIT_CODES = {"done": 0, "rolled-back": 0, "halted": 4, "aborted": 5}
# Where no controller drives a rollout on by itself: finished, or halted by a gate.
STOPPED: frozenset[str] = ROLLOUT_FINAL | {"halted"}
EXIT_UNFINISHED = 6  # running, paused or rolling back


def exit_code(state: RolloutState) -> int:
    """0 done (or rolled back), 4 halted by a gate, 5 aborted, 6 not finished yet."""
    return EXIT_CODES.get(state.status, EXIT_UNFINISHED)


def _wait(
    cond: Callable[[], bool], inbox: queue.SimpleQueue[InboxItem], k: Knowledge, timeout: float
) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() >= deadline:
            return False
        try:
            item = inbox.get(timeout=0.05)
        except queue.Empty:
            continue
        if isinstance(item, Incoming):
            k.update(item)
    return True


def begin(
    session: Session,
    inbox: queue.SimpleQueue[InboxItem],
    knowledge: Knowledge,
    plan: RolloutPlan,
) -> RolloutState:
    """Publish a new rollout's plan and first state, unless it would drive devices another
    unfinished rollout drives: refused before, or -- when two start at once -- after, once the
    broker's order of the two plans is known (the earlier one stands)."""
    rid = plan.rollout_id
    if rid in knowledge.plans:
        raise ConfigError(f"rollout {rid} exists: see 'rollout status {rid}', or give another --id")
    _refuse_overlap(knowledge, plan)
    heard = len(knowledge.plan_order)
    publish_retained(session, knowledge.topics.rollout(rid, "plan"), plan.to_bytes())
    now = _now()
    state = RolloutState(
        rollout_id=rid, status="running", owner=owner_id(), heartbeat=now, updated=now
    )
    publish_retained(session, knowledge.topics.rollout(rid, "state"), state.to_bytes())
    if not _wait(lambda: rid in knowledge.plan_order[heard:], inbox, knowledge, 10.0):
        raise BrokerError(f"the broker did not send the plan of {rid} back within 10 s")
    before = knowledge.plan_order[heard : knowledge.plan_order.index(rid, heard)]
    rivals = {r: knowledge.plans[r] for r in before if r in knowledge.plans}
    clash = {r: sorted(set(p.devices) & set(plan.devices)) for r, p in rivals.items()}
    clash = {r: d for r, d in clash.items() if d}
    if clash:
        reason = "started at the same time as " + ", ".join(sorted(clash))
        state = state.model_copy(update={"status": "aborted", "reason": reason, "owner": None})
        publish_retained(session, knowledge.topics.rollout(rid, "state"), state.to_bytes())
        raise RolloutConflictError(_overlap_text(clash))
    return state


def _refuse_overlap(knowledge: Knowledge, plan: RolloutPlan) -> None:
    clash = knowledge.overlapping(plan.devices, but=plan.rollout_id)
    if clash:
        raise RolloutConflictError(_overlap_text(clash))


def _overlap_text(clash: Mapping[str, list[str]]) -> str:
    parts = []
    for rid, devices in sorted(clash.items()):
        shown = ", ".join(devices[:5]) + (
            f" and {len(devices) - 5} more" if len(devices) > 5 else ""
        )
        parts.append(f"rollout {rid} drives {shown}")
    return "; ".join(parts) + " (abort it, roll it back, or wait until it is done)"


def load(knowledge: Knowledge, rollout_id: str) -> tuple[RolloutPlan, RolloutState]:
    plan = knowledge.plans.get(rollout_id)
    state = knowledge.states.get(rollout_id)
    if plan is None or state is None:
        known = ", ".join(sorted(knowledge.plans)) or "none"
        raise ConfigError(f"no rollout {rollout_id!r} on the broker (rollouts: {known})")
    return plan, state


def take_over(
    knowledge: Knowledge,
    inbox: queue.SimpleQueue[InboxItem],
    rollout_id: str,
    *,
    wait: float = LEASE_S + HEARTBEAT_S,
    progress: Progress | None = None,
) -> tuple[RolloutPlan, RolloutState]:
    """The rollout's plan and state once no other controller drives it (waiting for a dead
    one's lease to run out)."""
    plan, state = load(knowledge, rollout_id)
    if not lease_free(state, _now()):
        if progress:
            progress(f"{state.owner} drives {rollout_id}; waiting up to {wait:.0f} s for its lease")
        free = _wait(
            lambda: lease_free(knowledge.states[rollout_id], _now()), inbox, knowledge, wait
        )
        if not free:
            raise RolloutConflictError(
                f"{knowledge.states[rollout_id].owner} drives rollout {rollout_id} (heartbeat "
                f"{knowledge.states[rollout_id].heartbeat:%H:%M:%S}Z): pause or abort it there"
            )
        plan, state = load(knowledge, rollout_id)
    return plan, state


def wait_applied(
    knowledge: Knowledge,
    inbox: queue.SimpleQueue[InboxItem],
    rollout_id: str,
    control: RolloutControl,
    timeout: float = LEASE_S,
) -> bool:
    """Whether the driving controller takes ``control`` (its state says so) within ``timeout``."""

    def taken() -> bool:
        st = knowledge.states.get(rollout_id)
        return st is not None and st.control_at is not None and st.control_at >= control.at

    return _wait(taken, inbox, knowledge, timeout)


def request(
    session: Session, topics: Topics, rollout_id: str, action: str, by: str = ""
) -> RolloutControl:
    control = RolloutControl(rollout_id=rollout_id, action=action, at=_now(), by=by[:128])  # type: ignore[arg-type]
    publish_retained(session, topics.rollout(rollout_id, "control"), control.to_bytes())
    return control


@dataclass(frozen=True)
class Controlled:
    """What came of a pause or abort: ``set`` here (no controller was driving: ``status`` is
    the state written), ``taken`` by the driving ``owner``, or only ``asked`` of it so far."""

    how: Literal["set", "taken", "asked"]
    status: str
    owner: str | None


def pause_or_abort(
    session: Session,
    inbox: queue.SimpleQueue[InboxItem],
    knowledge: Knowledge,
    rollout_id: str,
    action: Literal["pause", "abort"],
    by: str = "",
) -> Controlled:
    """Ask for ``action``: a request the driving controller takes at its next tick; with none
    driving, the state is changed here. A finished rollout is refused (ConfigError)."""
    _, state = load(knowledge, rollout_id)
    if state.status in ROLLOUT_FINAL:
        raise ConfigError(f"rollout {rollout_id} is {state.status}")
    control = request(session, knowledge.topics, rollout_id, action, by)
    if lease_free(state, control.at):
        status = "aborted" if action == "abort" else "paused"
        if action == "pause" and state.status != "running":
            status = state.status
        new = state.model_copy(
            update={"status": status, "control_at": control.at, "updated": control.at}
        )
        if action == "abort":
            new = new.model_copy(update={"reason": f"aborted by {control.by}"})
        publish_retained(session, knowledge.topics.rollout(rollout_id, "state"), new.to_bytes())
        return Controlled("set", status, state.owner)
    if wait_applied(knowledge, inbox, rollout_id, control):
        return Controlled("taken", state.status, state.owner)
    return Controlled("asked", state.status, state.owner)


@dataclass(frozen=True)
class Resumed:
    """What came of a resume: ``taken`` by the live controller that held the rollout paused or
    halted (``owner``), ``finished`` with nothing to resume (``status``), or a ``controller``
    here, taken over, to drive it on."""

    how: Literal["taken", "finished", "driven"]
    status: str
    owner: str | None = None
    controller: Controller | None = None


def resume(
    session: Session,
    inbox: queue.SimpleQueue[InboxItem],
    knowledge: Knowledge,
    rollout_id: str,
    signers: Sequence[Signer],
    *,
    by: str = "",
    progress: Progress | None = None,
) -> Resumed:
    """Resume a rollout: a live controller that holds it (paused, it waits) is asked first;
    else it is taken over (once a dead controller's lease runs out) and driven from here, past
    the halt or the pause it stopped at."""
    _, state = load(knowledge, rollout_id)
    if not lease_free(state, _now()) and state.status in ("paused", "halted"):
        control = request(session, knowledge.topics, rollout_id, "resume", by)
        if wait_applied(knowledge, inbox, rollout_id, control):
            return Resumed("taken", state.status, owner=state.owner)
    plan, state = take_over(knowledge, inbox, rollout_id, progress=progress)
    if state.status in ROLLOUT_FINAL:
        return Resumed("finished", state.status)
    controller = Controller(session, inbox, knowledge, plan, state, signers, progress=progress)
    if state.status in ("paused", "halted"):
        control = request(session, knowledge.topics, rollout_id, "resume", by)
        controller.advance_if_halted(control.at)
    return Resumed("driven", state.status, controller=controller)


def rollback(
    session: Session,
    inbox: queue.SimpleQueue[InboxItem],
    knowledge: Knowledge,
    rollout_id: str,
    signers: Sequence[Signer],
    trust: TrustedState,
    *,
    days: int = 30,
    by: str = "",
    progress: Progress | None = None,
) -> Controller:
    """Roll a rollout back: a controller still driving it is told to stop (it aborts at its next
    tick and hands over); the returned controller, which owns it now, drives the rollback."""
    _, state = load(knowledge, rollout_id)
    if not lease_free(state, _now()):
        request(session, knowledge.topics, rollout_id, "abort", by)
    plan, state = take_over(knowledge, inbox, rollout_id, progress=progress)
    controller = Controller(session, inbox, knowledge, plan, state, signers, progress=progress)
    controller.start_rollback(trust, days=days)
    return controller


# -- status ------------------------------------------------------------------------------------
def summary(plan: RolloutPlan, state: RolloutState, knowledge: Knowledge) -> dict[str, Any]:
    """The rollout as JSON: waves with counts per phase, failures with their codes. Once a
    rollback has begun, the devices it returns count by where they stand with it ("active":
    back on what they ran before)."""
    rb = state.rollback
    follower = Follower(knowledge, rb.terms.deployment_id if rb else plan.terms.deployment_id)
    forward: dict[str, str | None] = {n: m.bundle_sha256 for n, m in plan.models.items()}
    waves = []
    active = 0
    for index, wave in enumerate(plan.waves):
        counts: dict[str, int] = {}
        if index < state.published:
            for device in wave:
                want = rollback_want(plan, device) if rb else forward
                o = follower.outcome(device, want)
                counts[o.phase] = counts.get(o.phase, 0) + 1
                active += o.ok
        else:
            counts["waiting"] = len(wave)
        waves.append({"wave": index + 1, "devices": len(wave), "phases": counts})
    total = len(plan.devices)
    return {
        "rollout": plan.rollout_id,
        "status": state.status,
        "models": {n: m.version for n, m in plan.models.items()},
        "group": plan.group,
        "selectors": plan.selectors,
        "wave": state.wave + 1,
        "waves": waves,
        "devices": total,
        "active": active,
        "percent": round(100 * active / total, 1) if total else 0.0,
        "failures": [f.model_dump(mode="json") for f in state.failures],
        "reason": state.reason,
        "owner": state.owner,
        "heartbeat": state.heartbeat.isoformat() if state.heartbeat else None,
        "updated": state.updated.isoformat(),
    }


def render(info: Mapping[str, Any]) -> str:
    from agent.fleet.control import bar

    models = ", ".join(f"{n} {v}" for n, v in sorted(info["models"].items()))
    where = f"group {info['group']}" if info["group"] else "devices"
    if info["selectors"]:
        where += " where " + " and ".join(info["selectors"])
    lines = [
        f"rollout {info['rollout']}: {models} to {where}",
        f"status   {info['status']}"
        + (f" (wave {info['wave']})" if info["status"] == "running" else ""),
        f"progress {bar(info['percent'])}  {info['active']} of {info['devices']} active",
    ]
    if info["reason"]:
        lines.append(f"reason   {info['reason']}")
    for w in info["waves"]:
        phases = ", ".join(f"{n} {p}" for p, n in sorted(w["phases"].items()))
        lines.append(f"  wave {w['wave']:>2}  {w['devices']:>5} device(s)  {phases}")
    if info["failures"]:
        lines.append("failures:")
        for f in info["failures"][:20]:
            lines.append(
                f"  {f['device']}  wave {f['wave'] + 1}  {f['code']}  {f['message']}".rstrip()
            )
        if len(info["failures"]) > 20:
            lines.append(f"  ... and {len(info['failures']) - 20} more (--json lists all)")
    return "\n".join(lines)
