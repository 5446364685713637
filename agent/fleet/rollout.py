"""Rollouts: a new version over a target set in waves, each wave behind a gate.

``edge-fleet rollout start`` plans and then drives a rollout; ``pause``, ``resume``, ``abort`` and
``rollback`` act on one; ``status`` shows it. The parts:

* **Plan** (:func:`plan_rollout`): the target set comes from the devices' retained ``reported``
  and ``online`` topics (the group a device follows, narrowed by selectors on what it reports),
  ordered by a hash of the rollout id and the device id (so the canaries are a fair sample and
  the same on every replanning), cut into waves. For each device the plan keeps what its
  effective document named (the device's own, else its first group's): its document during the
  rollout names those models too, with the rolled-out ones replaced, so that no other model is
  removed; and what each rolled-out model ran before, where a rollback returns it.
* **State** (``rollouts/{id}/plan``, ``/state`` and ``/control``, all retained): on the broker
  rather than in a local file, so any controller on any machine can carry a rollout on after a
  crash, every operator sees it, and two operators' rollouts over the same devices are refused
  (the broker's order of the two plans decides which one stands). A device document is signed on
  the plan's terms, so a controller that publishes one again after a restart publishes the same
  bytes, which devices take as the document they already have.
* **Gate** (:func:`evaluate`): a wave passes once every device of it is active, or the
  wave's timeout has passed (devices still on their way count as timed out), with failures --
  failed, rolled back, refused, timed out, counted over every device published so far -- at most
  the threshold; then, with a soak time, the new version's error rate and p99 latency from the
  devices' telemetry against the old version's. A gate that fails halts the rollout at once.
* **Rollback** (:func:`rollback_terms`): every device the rollout published to gets a document
  that names what it ran before, each earlier bundle's descriptor re-issued with a release above
  every release the rollout reached: devices keep refusing older releases, and the bytes, so
  the blocks already on the boxes, are the same.
"""

from __future__ import annotations

import fnmatch
import hashlib
import itertools
import json
import math
import os
import queue
import re
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Literal

from agent._strictjson import parse_model
from agent.errors import BadContentError, BrokerError, ConfigError, RolloutConflictError
from agent.fleet import control
from agent.fleet.control import FleetView, publish_retained
from agent.fleet.deploy import default_sequence, make_deployment
from agent.transport.messages import (
    HEARTBEAT_S,
    LEASE_S,
    MAX_MESSAGE_BYTES,
    MAX_ROLLOUT_DEVICES,
    NOT_RETURNED,
    OFFLINE,
    ROLLOUT_FINAL,
    TIMED_OUT,
    DeviceFailure,
    DocumentTerms,
    Event,
    Gate,
    Phase,
    PriorVersion,
    Reported,
    RollbackTerms,
    RolloutControl,
    RolloutModel,
    RolloutPlan,
    RolloutState,
    Telemetry,
)
from agent.transport.session import Connection, InboxItem, Incoming, Session
from agent.transport.topics import Topics
from agent.trust.envelope import parse_envelope
from agent.trust.keys import Signer
from agent.trust.metadata import (
    MAX_METADATA_BYTES,
    BundleDescriptor,
    DeploymentDocument,
    DeploymentTarget,
)
from agent.trust.verifier import TrustedState

TICK_S = 0.2


# -- parsing what an operator types -------------------------------------------------------------
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)?$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str, what: str = "duration") -> float:
    """``90``, ``90s``, ``10m``, ``2h``, ``1d`` -> seconds."""
    m = _DURATION.fullmatch(text.strip())
    if not m:
        raise ConfigError(f"{what} {text!r} is not a duration (e.g. 90s, 10m, 2h)")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def parse_waves(spec: str, total: int) -> list[int]:
    """Cumulative wave ends from ``1,10%,50%,100%`` (a count, or a percentage of ``total``).

    Each entry is how many devices have been reached by the end of that wave; a percentage is
    rounded up. Entries that add no device are dropped; the last must reach every device.
    """
    ends: list[int] = []
    for part in (p.strip() for p in spec.split(",")):
        try:
            n = math.ceil(total * float(part[:-1]) / 100) if part.endswith("%") else int(part)
        except ValueError:
            raise ConfigError(f"--waves: {part!r} is neither a count nor a percentage") from None
        if n < 1 or (part.endswith("%") and float(part[:-1]) > 100):
            raise ConfigError(f"--waves: {part!r} reaches no device, or more than all of them")
        n = min(n, total)
        if ends and n < ends[-1]:
            raise ConfigError(f"--waves: {spec!r} must grow from one wave to the next")
        if not ends or n > ends[-1]:
            ends.append(n)
    if not ends or ends[-1] != total:
        raise ConfigError(
            f"--waves: {spec!r} reaches {ends[-1] if ends else 0} of the {total} devices; "
            "end with 100%"
        )
    return ends


def parse_failures(spec: str) -> tuple[int | None, float | None]:
    """``--max-failures``: ``2`` (devices) or ``5%`` (of the devices published so far)."""
    try:
        if spec.endswith("%"):
            pct = float(spec[:-1])
            if not 0 <= pct <= 100:
                raise ValueError
            return None, pct
        count = int(spec)
        if count < 0:
            raise ValueError
        return count, None
    except ValueError:
        raise ConfigError(
            f"--max-failures {spec!r}: give a count (2) or a percentage (5%)"
        ) from None


# -- selectors ---------------------------------------------------------------------------------
def _values(key: str, device: str, r: Reported) -> list[str]:
    hw = r.hardware
    models = r.models.values()
    if key == "device":
        return [device]
    if key == "arch":
        return [hw.arch] if hw else []
    if key == "accelerator":
        return list(hw.accelerators) if hw else []
    if key == "agent_version":
        return [r.agent_version]
    if key in ("runtime", "variant", "version"):
        return [v for m in models if (v := getattr(m, key))]
    if key.startswith("hardware."):
        detail = hw.details.get(key.removeprefix("hardware.")) if hw else None
        return [detail] if detail is not None else []
    raise ConfigError(
        f"--where: unknown key {key!r} (device, arch, accelerator, agent_version, runtime, "
        "variant, version, hardware.<detail>)"
    )


def parse_selector(text: str) -> tuple[str, bool, str]:
    """``KEY=GLOB`` or ``KEY!=GLOB`` -> (key, wanted, glob)."""
    m = re.fullmatch(r"([a-z_][a-z0-9_.]*)(!?=)(.+)", text.strip())
    if not m:
        raise ConfigError(f"--where {text!r}: write KEY=GLOB or KEY!=GLOB (runtime=openvino*)")
    key, op, glob = m.groups()
    _values(key, "x", Reported(device_id="x", agent_version="0", at=_now()))  # known key?
    return key, op == "=", glob


def matches(device: str, r: Reported, selectors: Iterable[str]) -> bool:
    for text in selectors:
        key, wanted, glob = parse_selector(text)
        hit = any(fnmatch.fnmatchcase(v, glob) for v in _values(key, device, r))
        if hit != wanted:
            return False
    return True


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _order(rollout_id: str, device: str) -> str:
    return hashlib.sha256(f"{rollout_id}/{device}".encode()).hexdigest()


# -- what the fleet knows: devices (FleetView) and the documents they follow --------------------
class Knowledge:
    """Devices' retained state, their desired documents, and the rollouts, from the broker.

    Desired documents are verified with the fleet's trust as a device would (signatures, target,
    expiry) before anything is taken from them: a document is only re-used in a rollout's own
    documents when a release key signed it.
    """

    def __init__(self, topics: Topics, trust: TrustedState | None = None) -> None:
        self.topics = topics
        self.trust = trust
        self.view = FleetView(topics)
        self.desired: dict[tuple[str, str], DeploymentDocument] = {}  # (kind, id) -> document
        self.unverified: dict[tuple[str, str], str] = {}  # (kind, id) -> why it was refused
        self.plans: dict[str, RolloutPlan] = {}
        self.states: dict[str, RolloutState] = {}
        self.controls: dict[str, RolloutControl] = {}
        self.plan_order: list[str] = []  # rollout ids in the order their plans arrived
        self.problems: list[str] = []

    @property
    def subscriptions(self) -> list[str]:
        t = self.topics
        subs = [*self.view.subscriptions, t.all_devices_filter("telemetry")]
        subs += [t.all_devices_filter("desired"), f"{t.prefix}/groups/+/desired"]
        subs += [t.all_rollouts_filter(c) for c in ("plan", "state", "control")]
        return subs

    def update(self, item: Incoming) -> None:
        try:
            ref = self.topics.parse(item.topic)
        except BadContentError:
            return
        try:
            if ref.kind == "rollout":
                self._rollout(ref.id, ref.channel, item.payload)
            elif ref.channel == "desired":
                self._desired(ref.kind, ref.id, item.payload)
            elif ref.kind == "device":
                self.view.update(item)
        except BadContentError as exc:
            self.problems.append(f"{item.topic}: {exc}")
            del self.problems[:-20]

    def _rollout(self, rollout_id: str, channel: str, payload: bytes) -> None:
        if not payload:
            if channel == "plan":
                self.plans.pop(rollout_id, None)
            elif channel == "state":
                self.states.pop(rollout_id, None)
            else:
                self.controls.pop(rollout_id, None)
            return
        if channel == "plan":
            self.plans[rollout_id] = RolloutPlan.from_bytes(payload)
            self.plan_order.append(rollout_id)
        elif channel == "state":
            self.states[rollout_id] = RolloutState.from_bytes(payload)
        elif channel == "control":
            self.controls[rollout_id] = RolloutControl.from_bytes(payload)

    def _desired(self, kind: str, ident: str, payload: bytes) -> None:
        key = (kind, ident)
        self.desired.pop(key, None)
        self.unverified.pop(key, None)
        if not payload or self.trust is None:
            return
        target = DeploymentTarget(kind="device" if kind == "device" else "group", id=ident)
        try:
            verified = self.trust.verify_deployment(payload, _now(), targets=[target])
        except BadContentError as exc:
            self.unverified[key] = f"{exc.code}: {exc}"
            raise
        self.desired[key] = verified.document

    def descriptors(self) -> dict[str, dict[str, object]]:
        """Every signed descriptor a verified desired document carries, by bundle SHA-256."""
        out: dict[str, dict[str, object]] = {}
        for doc in self.desired.values():
            for entry in doc.models.values():
                out[_descriptor(entry.descriptor).bundle_sha256] = entry.descriptor
        return out

    def effective(self, device: str) -> tuple[DeploymentDocument | None, str]:
        """The document ``device`` follows -- its own, unless it hands it back to its groups,
        else the first of its groups' that has one, as the agent chooses -- or why it is not
        known (a document the fleet's trust refuses: its models cannot be carried over)."""
        view = self.view.devices.get(device)
        groups = view.reported.groups if view and view.reported else []
        for key in [("device", device), *(("group", g) for g in groups)]:
            if key in self.unverified:
                return None, f"its {key[0]} document is refused here ({self.unverified[key]})"
            doc = self.desired.get(key)
            if doc is not None and not doc.follow_groups:
                return doc, ""
        return None, ""

    def overlapping(self, devices: Iterable[str], but: str = "") -> dict[str, list[str]]:
        """Rollouts other than ``but``, not yet final, that have any of ``devices``."""
        mine = set(devices)
        out: dict[str, list[str]] = {}
        for rid, plan in self.plans.items():
            state = self.states.get(rid)
            if rid == but or (state is not None and state.status in ROLLOUT_FINAL):
                continue
            both = sorted(mine.intersection(plan.devices))
            if both:
                out[rid] = both
        return out


def collect(
    inbox: queue.SimpleQueue[InboxItem],
    knowledge: Knowledge,
    *,
    quiet: float = 0.5,
    timeout: float = 10.0,
) -> None:
    """Take messages until no retained one came for ``quiet`` seconds (at most ``timeout``)."""
    control.collect(inbox, knowledge, quiet=quiet, timeout=timeout)


# -- planning ----------------------------------------------------------------------------------
@dataclass
class Target:
    """Whom a rollout is for: a group (its members, as they report), or named devices."""

    group: str | None = None
    devices: Sequence[str] = ()
    selectors: Sequence[str] = ()
    include_offline: bool = False


def select(knowledge: Knowledge, target: Target) -> tuple[list[str], dict[str, str]]:
    """The devices ``target`` reaches now, and those left out with the reason."""
    chosen: list[str] = []
    left: dict[str, str] = {}
    named = set(target.devices)
    for device, view in sorted(knowledge.view.devices.items()):
        r = view.reported
        if named and device not in named:
            continue
        if r is None:
            left[device] = "has not reported"
            continue
        if target.group is not None and target.group not in r.groups:
            continue
        if not matches(device, r, target.selectors):
            continue
        if view.online is False and not target.include_offline:
            left[device] = "offline"
            continue
        chosen.append(device)
    for device in sorted(named - set(knowledge.view.devices)):
        left[device] = "has not reported"
    return chosen, left


def _descriptor(envelope: Mapping[str, Any]) -> BundleDescriptor:
    payload = parse_envelope(json.dumps(envelope).encode()).payload
    return parse_model(
        BundleDescriptor, payload, what="bundle descriptor", max_bytes=MAX_METADATA_BYTES
    )


@dataclass
class Planned:
    plan: RolloutPlan
    left_out: dict[str, str]


def plan_rollout(
    knowledge: Knowledge,
    *,
    rollout_id: str,
    descriptors: Mapping[str, bytes],
    target: Target,
    waves: str,
    gate: Gate,
    now: datetime,
    days: int = 30,
    variants: Mapping[str, str] | None = None,
    created_by: str = "",
) -> Planned:
    """Plan a rollout of ``descriptors`` (model -> descriptor envelope) from what is known."""
    if days < 1:
        raise ConfigError("--days must be at least 1: a document must not expire before use")
    models: dict[str, RolloutModel] = {}
    for name, data in descriptors.items():
        envelope = json.loads(data)
        d = _descriptor(envelope)
        models[name] = RolloutModel(
            version=d.version, release=d.release, bundle_sha256=d.bundle_sha256, descriptor=envelope
        )
    chosen, left = select(knowledge, target)
    known = knowledge.descriptors()
    prior: dict[str, dict[tuple[str, str, int, str | None], list[str]]] = {}
    devices: list[str] = []
    for device in chosen:
        _, problem = knowledge.effective(device)
        if problem:
            left[device] = problem
            continue
        r = knowledge.view.devices[device].reported
        assert r is not None
        for name in models:
            status = r.models.get(name)
            if status is None or status.bundle_sha256 is None or status.version is None:
                continue
            if status.bundle_sha256 not in known:
                # What it runs came with no document the broker still has: a rollback could
                # not name it again.
                left[device] = (
                    f"runs {name} {status.version}, whose signed descriptor no retained "
                    "document carries (a rollback could not return it)"
                )
                break
            key = (status.bundle_sha256, status.version, status.release or 1, status.variant)
            prior.setdefault(name, {}).setdefault(key, []).append(device)
        else:
            devices.append(device)
    if not devices:
        why = "; ".join(f"{d}: {w}" for d, w in sorted(left.items())[:5])
        raise ConfigError(f"the rollout reaches no device{f' ({why})' if why else ''}")
    if len(devices) > MAX_ROLLOUT_DEVICES:
        raise ConfigError(f"{len(devices)} devices; a rollout takes at most {MAX_ROLLOUT_DEVICES}")
    devices.sort(key=lambda d: _order(rollout_id, d))
    ends = parse_waves(waves, len(devices))
    cuts = [0, *ends]
    sequence = default_sequence(now)
    plan = RolloutPlan(
        rollout_id=rollout_id,
        created=now.replace(microsecond=0),
        created_by=created_by[:128],
        group=target.group,
        selectors=list(target.selectors),
        models=models,
        variants=dict(variants or {}),
        terms=DocumentTerms(
            deployment_id=rollout_id,
            sequence=sequence,
            issued=now.replace(microsecond=0),
            expires=(now + timedelta(days=days)).replace(microsecond=0),
        ),
        gate=gate,
        waves=[devices[a:b] for a, b in itertools.pairwise(cuts)],
        prior={
            name: [
                PriorVersion(
                    version=v, release=rel, bundle_sha256=sha, variant=var, devices=sorted(ds)
                )
                for (sha, v, rel, var), ds in sorted(versions.items(), key=lambda kv: kv[0][:3])
            ]
            for name, versions in prior.items()
        },
        prior_descriptors={
            sha: known[sha] for versions in prior.values() for (sha, _, _, _) in versions
        },
    )
    if len(plan.to_bytes()) > MAX_MESSAGE_BYTES:
        raise ConfigError("the plan is too large for one message: roll out to fewer devices")
    return Planned(plan, left)


# -- documents -----------------------------------------------------------------------------------
def device_document(
    device: str,
    base: DeploymentDocument | None,
    signers: Sequence[Signer],
    *,
    terms: DocumentTerms,
    replace: Iterable[str],
    models: Mapping[str, bytes],
    variants: Mapping[str, str],
) -> bytes:
    """The signed document for ``device``: what ``base`` (the document it follows) names, with
    the models in ``replace`` taken out and ``models`` put in (each with its variant, if any)."""
    entries = {
        n: json.dumps(e.descriptor).encode() for n, e in (base.models if base else {}).items()
    }
    chosen = {n: e.variant for n, e in (base.models if base else {}).items() if e.variant}
    for name in replace:  # a model the rollback has no earlier version of is removed
        entries.pop(name, None)
        chosen.pop(name, None)
    entries.update(models)
    chosen.update({n: v for n, v in variants.items() if n in models})
    return make_deployment(
        entries,
        target=DeploymentTarget(kind="device", id=device),
        signers=signers,
        now=terms.issued,
        days=max(1, math.ceil((terms.expires - terms.issued).total_seconds() / 86400)),
        sequence=terms.sequence,
        deployment_id=terms.deployment_id,
        variants=chosen,
    )


def rollout_document(
    plan: RolloutPlan, device: str, knowledge: Knowledge, signers: Sequence[Signer]
) -> bytes:
    base, _ = knowledge.effective(device)
    return device_document(
        device,
        base,
        signers,
        terms=plan.terms,
        replace=plan.models,
        models={n: json.dumps(m.descriptor).encode() for n, m in plan.models.items()},
        variants=plan.variants,
    )


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
class Verdict:
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
) -> Verdict:
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
        return Verdict(False, failures, counts, reason)
    if pending_in_wave:
        return Verdict(None, failures, counts)
    return Verdict(True, failures, counts)


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

    def _show(self, verdict: Verdict) -> None:
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


def _releases(terms: RollbackTerms) -> str:
    return (
        ", ".join(sorted({str(_descriptor(e).release) for e in terms.descriptors.values()})) or "-"
    )


def prior_of(plan: RolloutPlan, device: str) -> dict[str, PriorVersion | None]:
    out: dict[str, PriorVersion | None] = dict.fromkeys(plan.models)
    for name, versions in plan.prior.items():
        for p in versions:
            if device in p.devices:
                out[name] = p
    return out


def rollback_want(plan: RolloutPlan, device: str) -> dict[str, str | None]:
    return {n: p.bundle_sha256 if p else None for n, p in prior_of(plan, device).items()}


def rollback_terms(
    plan: RolloutPlan,
    state: RolloutState,
    knowledge: Knowledge,
    trust: TrustedState,
    signers: Sequence[Signer],
    *,
    now: datetime,
    days: int,
) -> RollbackTerms:
    """Re-issue the descriptor of every earlier version the touched devices ran, with a release
    above every one the rollout or the devices reached for that model."""
    from agent.fleet.sign import descriptor_to_reissue, reissue_descriptor

    touched = [d for w in plan.waves[: state.published] for d in w]
    top: dict[str, int] = {n: m.release for n, m in plan.models.items()}
    for name, versions in plan.prior.items():
        for p in versions:
            top[name] = max(top[name], p.release)
    for device in touched:
        view = knowledge.view.devices.get(device)
        for name, m in view.reported.models.items() if view and view.reported else ():
            if name in top and m.release:
                top[name] = max(top[name], m.release)
    descriptors: dict[str, dict[str, object]] = {}
    for name, versions in plan.prior.items():
        for p in versions:
            if not set(p.devices).intersection(touched):
                continue
            envelope = plan.prior_descriptors[p.bundle_sha256]
            earlier = descriptor_to_reissue(json.dumps(envelope).encode(), trust, now)
            data = reissue_descriptor(earlier, signers, release=top[name] + 1, now=now, days=days)
            descriptors[p.bundle_sha256] = json.loads(data)
    sequence = max(default_sequence(now), plan.terms.sequence + 1)
    return RollbackTerms(
        terms=DocumentTerms(
            deployment_id=f"{plan.rollout_id}-rollback"[:64],
            sequence=sequence,
            issued=now.replace(microsecond=0),
            expires=(now + timedelta(days=days)).replace(microsecond=0),
        ),
        descriptors=descriptors,
        devices=touched,
    )


def rollback_document(
    plan: RolloutPlan,
    rb: RollbackTerms,
    device: str,
    knowledge: Knowledge,
    signers: Sequence[Signer],
) -> bytes:
    earlier = {n: p for n, p in prior_of(plan, device).items() if p is not None}
    base, _ = knowledge.effective(device)
    return device_document(
        device,
        base,
        signers,
        terms=rb.terms,
        replace=plan.models,
        models={
            n: json.dumps(rb.descriptors[p.bundle_sha256]).encode() for n, p in earlier.items()
        },
        variants={n: p.variant for n, p in earlier.items() if p.variant},
    )


# -- commands ----------------------------------------------------------------------------------
EXIT_CODES = {"done": 0, "rolled-back": 0, "halted": 4, "aborted": 5}
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
