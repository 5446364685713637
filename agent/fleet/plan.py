"""Planning a rollout: what an operator types, which devices, in which waves, with what documents.

* what an operator types: durations, waves (``1,10%,50%,100%``), failure thresholds, selectors
  (``--where KEY=GLOB``) matched on what devices report;
* what the fleet knows (:class:`Knowledge`): the devices' retained ``reported`` and ``online``
  topics and the documents they follow;
* the plan (:func:`plan_rollout`): the target set ordered by a hash of the rollout id and the device
  id (the canaries are a fair sample, the same on every replanning), cut into waves, with what each
  device ran before;
* the documents a device gets during the rollout (:func:`device_document`) and for a rollback
  (:func:`rollback_terms`, :func:`rollback_document`).

No I/O beyond reading what :func:`collect` gathered: :mod:`agent.fleet.rollout` drives the plan.
"""

from __future__ import annotations

import fnmatch
import hashlib
import itertools
import json
import math
import queue
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from agent._strictjson import parse_model
from agent.errors import BadContentError, ConfigError
from agent.fleet import control
from agent.fleet.control import FleetView
from agent.fleet.deploy import default_sequence, make_deployment
from agent.transport.messages import (
    MAX_MESSAGE_BYTES,
    MAX_ROLLOUT_DEVICES,
    ROLLOUT_FINAL,
    DocumentTerms,
    Gate,
    PriorVersion,
    Reported,
    RollbackTerms,
    RolloutControl,
    RolloutModel,
    RolloutPlan,
    RolloutState,
)
from agent.transport.session import InboxItem, Incoming
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
                out[descriptor_of(entry.descriptor).bundle_sha256] = entry.descriptor
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


def descriptor_of(envelope: Mapping[str, Any]) -> BundleDescriptor:
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
        d = descriptor_of(envelope)
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
