"""The rollout's planner, gate and documents, on the fleet's view built from real messages.

No broker here: the retained messages a controller would receive are fed to its
:class:`~agent.fleet.rollout.Knowledge` as they come off the wire; documents and descriptors
are really signed and verified with the test keys.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from agent.errors import ConfigError
from agent.fleet.gate import Follower, allowed_failures, evaluate
from agent.fleet.plan import (
    Knowledge,
    Target,
    parse_duration,
    parse_failures,
    parse_waves,
    plan_rollout,
    rollout_document,
    select,
)
from agent.testing.fleet import TOPICS, deployment
from agent.transport.messages import (
    ErrorInfo,
    Event,
    Gate,
    HardwareProfile,
    ModelStatus,
    Online,
    Phase,
    Reported,
    RolloutState,
)
from agent.transport.session import Incoming
from agent.trust.envelope import parse_envelope
from agent.trust.metadata import DeploymentDocument
from tests.conftest import Keys

NOW = datetime.now(timezone.utc)


def _sha(envelope: bytes) -> str:
    return str(json.loads(parse_envelope(envelope).payload)["bundle_sha256"])


def _report(
    k: Knowledge,
    device: str,
    *,
    groups: tuple[str, ...] = ("lobby",),
    models: dict[str, ModelStatus] | None = None,
    accelerators: tuple[str, ...] = (),
    online: bool = True,
    deployment_id: str | None = "dep-1",
    retain: bool = True,
    error: ErrorInfo | None = None,
) -> None:
    r = Reported(
        device_id=device,
        agent_version="0.1.0",
        at=NOW,
        hardware=HardwareProfile(
            arch="aarch64", cpu_count=4, memory_mb=4096, accelerators=list(accelerators)
        ),
        groups=list(groups),
        deployment_id=deployment_id,
        models=models or {},
        error=error,
    )
    state = Online(state="online" if online else "offline")
    k.update(Incoming(TOPICS.device(device).online, state.to_bytes(), True))
    k.update(Incoming(TOPICS.device(device).reported, r.to_bytes(), retain))


def _running(envelope: bytes, version: str, phase: Phase = Phase.ACTIVE) -> ModelStatus:
    release = int(json.loads(parse_envelope(envelope).payload)["release"])
    return ModelStatus(phase=phase, version=version, release=release, bundle_sha256=_sha(envelope))


@pytest.fixture
def versions(signed) -> dict[str, bytes]:  # type: ignore[no-untyped-def]
    return {
        "1.0.0": signed("1.0.0")[1],
        "2.0.0": signed("2.0.0")[1],
        "det": signed("1.0.0", name="det")[1],
    }


@pytest.fixture
def knowledge(keys: Keys, versions: dict[str, bytes]) -> Knowledge:
    """Six devices in lobby run tiny 1.0.0 and det from the group's document; cam-5 is a
    Jetson, cam-6 is offline, and cam-x is in another group."""
    k = Knowledge(TOPICS, keys.state(NOW))
    doc = deployment(
        {"tiny": versions["1.0.0"], "det": versions["det"]}, keys.release, group="lobby"
    )
    k.update(Incoming(TOPICS.group_desired("lobby"), doc, True))
    running = {
        "tiny": _running(versions["1.0.0"], "1.0.0"),
        "det": _running(versions["det"], "1.0.0"),
    }
    for i in range(1, 7):
        _report(
            k,
            f"cam-{i}",
            models=running,
            accelerators=("jetson",) if i == 5 else (),
            online=i != 6,
        )
    _report(k, "cam-x", groups=("yard",), models=running)
    return k


def _plan(k: Knowledge, versions: dict[str, bytes], **kw: object):  # type: ignore[no-untyped-def]
    args: dict[str, object] = {
        "rollout_id": "ro-1",
        "descriptors": {"tiny": versions["2.0.0"]},
        "target": Target(group="lobby"),
        "waves": "1,50%,100%",
        "gate": Gate(wave_timeout_s=60),
        "now": NOW,
    }
    args.update(kw)
    return plan_rollout(k, **args)  # type: ignore[arg-type]


def test_the_target_set_is_the_groups_online_devices_narrowed_by_selectors(
    knowledge: Knowledge,
) -> None:
    chosen, left = select(knowledge, Target(group="lobby"))
    assert chosen == ["cam-1", "cam-2", "cam-3", "cam-4", "cam-5"]
    assert left == {"cam-6": "offline"}
    assert select(knowledge, Target(group="lobby", selectors=["accelerator=jetson"]))[0] == [
        "cam-5"
    ]
    assert (
        "cam-5" not in select(knowledge, Target(group="lobby", selectors=["accelerator!=jet*"]))[0]
    )
    assert "cam-6" in select(knowledge, Target(group="lobby", include_offline=True))[0]
    with pytest.raises(ConfigError, match="unknown key 'colour'"):
        select(knowledge, Target(group="lobby", selectors=["colour=red"]))


def test_waves_cover_every_device_once_in_a_stable_order(
    knowledge: Knowledge, versions: dict[str, bytes]
) -> None:
    plan = _plan(knowledge, versions).plan
    assert [len(w) for w in plan.waves] == [1, 2, 2]
    assert sorted(plan.devices) == ["cam-1", "cam-2", "cam-3", "cam-4", "cam-5"]
    assert _plan(knowledge, versions).plan.waves == plan.waves, "the same id, the same order"
    assert _plan(knowledge, versions, rollout_id="ro-2").plan.devices != plan.devices
    (prior,) = plan.prior["tiny"]
    assert prior.version == "1.0.0"
    assert prior.bundle_sha256 == _sha(versions["1.0.0"])
    assert prior.bundle_sha256 in plan.prior_descriptors  # what a rollback re-issues


def test_a_device_document_keeps_the_other_models_it_runs(
    keys: Keys, knowledge: Knowledge, versions: dict[str, bytes]
) -> None:
    plan = _plan(knowledge, versions).plan
    data = rollout_document(plan, "cam-1", knowledge, [keys.release])
    doc = DeploymentDocument.model_validate_json(parse_envelope(data).payload)
    assert sorted(doc.models) == ["det", "tiny"], "det is not removed by a rollout of tiny"
    assert doc.target.id == "cam-1"
    assert doc.deployment_id == "ro-1"
    # Signed on the plan's terms: the same bytes every time (a controller that carries on
    # publishes nothing a device would take as new).
    assert rollout_document(plan, "cam-1", knowledge, [keys.release]) == data
    verified = keys.state(NOW).verify_deployment(data, NOW, targets=[doc.target])
    assert verified.bundles["tiny"].descriptor.version == "2.0.0"


def test_a_device_whose_document_the_fleet_refuses_is_left_out(
    keys: Keys, knowledge: Knowledge, versions: dict[str, bytes]
) -> None:
    from agent.trust.keys import Signer

    stranger = Signer.generate()
    doc = deployment({"tiny": versions["1.0.0"]}, stranger, device="cam-2")
    knowledge.update(Incoming(TOPICS.device("cam-2").desired, doc, True))
    planned = _plan(knowledge, versions)
    assert "cam-2" not in planned.plan.devices
    assert "untrusted-key" in planned.left_out["cam-2"]


def _follower(k: Knowledge, plan) -> Follower:  # type: ignore[no-untyped-def]
    f = Follower(k, plan.terms.deployment_id, models=["tiny"])
    f.watching = set(plan.devices)
    return f


def test_the_gate_counts_failures_and_halts_past_the_threshold(
    knowledge: Knowledge, versions: dict[str, bytes]
) -> None:
    plan = _plan(
        knowledge, versions, waves="2,100%", gate=Gate(wave_timeout_s=60, max_failures=0)
    ).plan
    state = RolloutState(rollout_id="ro-1", status="running", published=1, updated=NOW)
    f = _follower(knowledge, plan)
    a, b = plan.waves[0]
    assert evaluate(plan, state, f, 0.0, 0.0).passed is None, "nothing reported yet"
    new = _running(versions["2.0.0"], "2.0.0")
    _report(knowledge, a, models={"tiny": new}, deployment_id="ro-1", retain=False)
    assert evaluate(plan, state, f, 1.0, 0.0).passed is None
    # b refuses the document: a rejected event on its own desired topic.
    ev = Event(
        device_id=b,
        seq=9,
        at=NOW,
        kind="rejected",
        topic=TOPICS.device(b).desired,
        error=ErrorInfo(code="untrusted-key", message="signed by an unknown key"),
    )
    f.update(Incoming(TOPICS.device(b).events, ev.to_bytes(), False))
    v = evaluate(plan, state, f, 2.0, 0.0)
    assert v.passed is False
    assert [(x.device, x.code) for x in v.failures] == [(b, "untrusted-key")]
    assert "1 of 2 devices failed (at most 0 may)" in v.reason
    # With one failure allowed the wave passes.
    lenient = plan.model_copy(update={"gate": Gate(wave_timeout_s=60, max_failures=1)})
    assert evaluate(lenient, state, f, 2.0, 0.0).passed is True


def test_devices_still_on_their_way_at_the_timeout_count_as_failures(
    knowledge: Knowledge, versions: dict[str, bytes]
) -> None:
    plan = _plan(knowledge, versions, waves="1,100%", gate=Gate(wave_timeout_s=5)).plan
    state = RolloutState(rollout_id="ro-1", status="running", published=1, updated=NOW)
    f = _follower(knowledge, plan)
    (canary,) = plan.waves[0]
    loading = _running(versions["2.0.0"], "2.0.0", Phase.LOADING)
    _report(knowledge, canary, models={"tiny": loading}, deployment_id="ro-1", retain=False)
    assert evaluate(plan, state, f, 4.0, 0.0).passed is None
    v = evaluate(plan, state, f, 5.0, 0.0)
    assert v.passed is False
    assert v.failures[0].code == "timed-out"
    assert "loading" in v.failures[0].message


def test_failure_thresholds_and_durations_parse() -> None:
    assert parse_failures("2") == (2, None)
    assert parse_failures("5%") == (None, 5.0)
    with pytest.raises(ConfigError):
        parse_failures("-1")
    assert (
        allowed_failures(Gate(wave_timeout_s=1, max_failures=None, max_failures_percent=10), 55)
        == 5
    )
    assert parse_duration("10m") == 600
    assert parse_duration("90") == 90
    with pytest.raises(ConfigError):
        parse_duration("soon")
    with pytest.raises(ConfigError, match="end with 100%"):
        parse_waves("1,50%", 10)
    with pytest.raises(ConfigError, match="grow"):
        parse_waves("5,2,100%", 10)
