"""Following a rollout's devices and judging a wave: where each device stands
(:func:`outcome`, :class:`Follower`), what telemetry says of each version (:class:`Health`), and the
gate (:func:`evaluate`, :func:`soak_verdict`) whose :class:`GateVerdict` lets a wave pass or halts
the rollout. Pure: every input is given, nothing is published.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.errors import BadContentError
from agent.fleet.plan import Knowledge
from agent.transport.messages import (
    OFFLINE,
    TIMED_OUT,
    DeviceFailure,
    Event,
    Gate,
    Phase,
    Reported,
    RolloutPlan,
    RolloutState,
    Telemetry,
)
from agent.transport.session import Incoming


# -- following devices ------------------------------------------------------------------------
@dataclass(frozen=True)
class Outcome:
    """Where one device stands with a document published to it."""

    phase: str  # a Phase value, "pending", or a failure code below
    final: bool = False
    ok: bool = False
    code: str | None = None
    message: str = ""
    model: str | None = None  # the model that failed

    def failure(self, device: str, wave: int) -> DeviceFailure:
        text = f"{self.model}: {self.message}" if self.model else self.message
        return DeviceFailure(
            device=device, wave=wave, code=self.code or self.phase, message=text[:1024]
        )


def outcome(
    reported: Reported | None,
    deployment_id: str,
    want: Mapping[str, str | None],
    refused: DeviceFailure | None = None,
) -> Outcome:
    """A device's outcome for the document ``deployment_id``: each model in ``want`` active on
    its bundle (``None``: the model removed), or the first failure."""
    if reported is not None and reported.deployment_id == deployment_id:
        phases: list[str] = []
        for name, sha in want.items():
            m = reported.models.get(name)
            if sha is None:
                phases.append(Phase.ACTIVE.value if m is None else "removing")
                continue
            if m is None:
                phases.append("pending")
            elif m.phase in (Phase.FAILED, Phase.ROLLED_BACK):
                code = m.error.code if m.error else m.phase.value
                return Outcome(
                    m.phase.value, final=True, code=code, message=_msg(m.error), model=name
                )
            elif m.phase == Phase.ACTIVE and m.bundle_sha256 != sha:
                phases.append("pending")
            else:
                phases.append(m.phase.value)
        if all(p == Phase.ACTIVE.value for p in phases):
            return Outcome(Phase.ACTIVE.value, final=True, ok=True)
        return Outcome(min(phases, key=_PHASE_ORDER.index))
    if refused is not None:
        return Outcome("refused", final=True, code=refused.code, message=refused.message)
    return Outcome("pending")


def _msg(error: Any) -> str:
    return str(error.message) if error is not None else ""


_PHASE_ORDER = ["pending", *(p.value for p in Phase), "removing"]


@dataclass
class Follower:
    """Follows the devices a document went to: their reports, refusals and telemetry.

    A refusal is a ``rejected`` event on the device's desired topic, or a report that arrives
    live (not a retained copy) with a document error while naming another deployment.
    """

    knowledge: Knowledge
    deployment_id: str
    watching: set[str] = field(default_factory=set)
    refused: dict[str, DeviceFailure] = field(default_factory=dict)
    samples: deque[tuple[float, str, float, float, float]] = field(
        default_factory=lambda: deque(maxlen=200_000)
    )  # (monotonic time, device, rps, errors per s, p99 ms)
    models: Sequence[str] = ()
    group: str | None = None  # the document went to this group's topic (else the devices')

    def _doc_topics(self, device: str) -> set[str]:
        t = self.knowledge.topics
        return {t.group_desired(self.group) if self.group else t.device(device).desired}

    def update(self, item: Incoming) -> None:
        k = self.knowledge
        k.update(item)
        try:
            ref = k.topics.parse(item.topic)
        except BadContentError:
            return
        if ref.kind != "device" or ref.id not in self.watching:
            return
        try:
            if ref.channel == "events":
                ev = Event.from_bytes(item.payload)
                if ev.kind == "rejected" and ev.error and ev.topic in self._doc_topics(ref.id):
                    self._refuse(ref.id, ev.error.code, ev.error.message)
            elif ref.channel == "reported" and not item.retain:
                view = k.view.devices.get(ref.id)
                r = view.reported if view else None
                if r is not None and r.error is not None and r.deployment_id != self.deployment_id:
                    self._refuse(ref.id, r.error.code, r.error.message)
            elif ref.channel == "telemetry":
                self._sample(ref.id, Telemetry.from_bytes(item.payload))
        except BadContentError:
            return

    def _refuse(self, device: str, code: str, message: str) -> None:
        self.refused[device] = DeviceFailure(
            device=device, wave=0, code=code, message=message[:1024]
        )

    def _sample(self, device: str, t: Telemetry) -> None:
        for name in self.models:
            m = t.metrics
            rps = m.get(f"model.{name}.rps")
            if rps is None:
                continue
            errs = m.get(f"model.{name}.errors_per_s", 0.0)
            p99 = m.get(f"model.{name}.p99_ms", 0.0)
            self.samples.append((time.monotonic(), device, rps, errs, p99))

    def outcome(self, device: str, want: Mapping[str, str | None]) -> Outcome:
        view = self.knowledge.view.devices.get(device)
        return outcome(
            view.reported if view else None, self.deployment_id, want, self.refused.get(device)
        )

    def online(self, device: str) -> bool | None:
        view = self.knowledge.view.devices.get(device)
        return view.online if view else None


@dataclass(frozen=True)
class Health:
    """Requests, error rate and p99 latency over a set of telemetry samples."""

    samples: int
    requests_per_s: float
    error_rate: float | None
    p99_ms: float | None

    @staticmethod
    def of(samples: Iterable[tuple[float, str, float, float, float]]) -> Health:
        n, rps, errs, p99s = 0, 0.0, 0.0, []
        for _, _, r, e, p in samples:
            n += 1
            rps += r
            errs += e
            if r > 0:
                p99s.append(p)
        return Health(
            samples=n,
            requests_per_s=rps,
            error_rate=errs / rps if rps > 0 else None,
            p99_ms=sorted(p99s)[len(p99s) // 2] if p99s else None,
        )


# -- the gate ----------------------------------------------------------------------------------
@dataclass
class GateVerdict:
    passed: bool | None  # None: not decided yet
    failures: list[DeviceFailure]
    counts: dict[str, int]
    reason: str = ""


def allowed_failures(gate: Gate, published: int) -> int:
    limits = []
    if gate.max_failures is not None:
        limits.append(gate.max_failures)
    if gate.max_failures_percent is not None:
        limits.append(math.floor(published * gate.max_failures_percent / 100))
    return min(limits) if limits else published


def evaluate(
    plan: RolloutPlan,
    state: RolloutState,
    follower: Follower,
    now_mono: float,
    wave_started_mono: float,
) -> GateVerdict:
    """The gate of the current wave, from what the devices published to so far report."""
    want: dict[str, str | None] = {n: m.bundle_sha256 for n, m in plan.models.items()}
    failures: list[DeviceFailure] = []
    counts: dict[str, int] = {}
    pending_in_wave = 0
    timed_out = now_mono - wave_started_mono >= plan.gate.wave_timeout_s
    for index, wave in enumerate(plan.waves[: state.published]):
        for device in wave:
            o = follower.outcome(device, want)
            phase = o.phase
            if o.final and not o.ok:
                failures.append(o.failure(device, index))
            elif not o.final:
                if timed_out:
                    code = OFFLINE if follower.online(device) is False else TIMED_OUT
                    failures.append(
                        DeviceFailure(
                            device=device,
                            wave=index,
                            code=code,
                            message=f"not active within {plan.gate.wave_timeout_s:g} s ({phase})",
                        )
                    )
                    phase = code
                elif index == state.wave:
                    pending_in_wave += 1
            counts[phase] = counts.get(phase, 0) + 1
    published = sum(len(w) for w in plan.waves[: state.published])
    limit = allowed_failures(plan.gate, published)
    if len(failures) > limit:
        shown = ", ".join(f"{f.device}: {f.code}" for f in failures[:5])
        more = f" and {len(failures) - 5} more" if len(failures) > 5 else ""
        reason = (
            f"{len(failures)} of {published} devices failed (at most {limit} may): {shown}{more}"
        )
        return GateVerdict(False, failures, counts, reason)
    if pending_in_wave:
        return GateVerdict(None, failures, counts)
    return GateVerdict(True, failures, counts)


def soak_verdict(
    plan: RolloutPlan, state: RolloutState, follower: Follower, since_mono: float
) -> tuple[bool, str]:
    """The new version's telemetry over the soak against the old version's (devices not yet
    reached, over the whole time the controller watched)."""
    reached = {d for w in plan.waves[: state.published] for d in w}
    new = Health.of(s for s in follower.samples if s[1] in reached and s[0] >= since_mono)
    old = Health.of(s for s in follower.samples if s[1] not in reached)
    g = plan.gate
    text = (
        f"new: {new.samples} samples, error rate {_pct(new.error_rate)}, p99 {_ms(new.p99_ms)}; "
        f"old: {old.samples} samples, error rate {_pct(old.error_rate)}, p99 {_ms(old.p99_ms)}"
    )
    if new.samples == 0:
        return False, f"no telemetry from the wave during the soak ({text})"
    if new.error_rate is not None:
        base = old.error_rate or 0.0
        if new.error_rate > base + g.max_error_rate_increase:
            return (
                False,
                f"error rate above the old version's by more than {_pct(g.max_error_rate_increase)} ({text})",
            )
    if new.p99_ms is not None and old.p99_ms and new.p99_ms > old.p99_ms * g.max_p99_ratio:
        return False, f"p99 above {g.max_p99_ratio:g} times the old version's ({text})"
    return True, text


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f} ms"
