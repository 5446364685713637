"""Signed deployment documents: one test per way a device must refuse one."""

from __future__ import annotations

import base64
import json
from datetime import timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent._strictjson import canonical
from agent.errors import (
    BadContentError,
    BadSignatureError,
    ConfigError,
    ExpiredError,
    FormatError,
    KeyNotAllowedError,
    RollbackError,
    UnsignedError,
    UntrustedKeyError,
    VerificationError,
    WrongTargetError,
)
from agent.fleet.deploy import make_deployment
from agent.fleet.keys import load_signer
from agent.trust.envelope import sign_envelope
from agent.trust.keys import Signer
from agent.trust.metadata import DEPLOYMENT_TYPE, DeploymentTarget
from tests.conftest import NOW, Keys
from tests.test_envelope import W  # a trusted state built once per module

CAM = DeploymentTarget(kind="device", id="cam-01")
STORE = DeploymentTarget(kind="group", id="store-7")
MINE = (CAM, STORE)


@pytest.fixture
def descriptors(signed) -> dict[str, bytes]:
    """Signed descriptors of two models, as a box running a detector and a classifier has."""
    _, detector = signed("1.0.0", name="detector")
    _, classifier = signed("2.1.0", name="classifier")
    return {"detector": detector, "classifier": classifier}


def deploy(keys: Keys, descriptors: dict[str, bytes], **kw) -> bytes:
    kw.setdefault("target", CAM)
    kw.setdefault("signers", [keys.release])
    kw.setdefault("now", NOW)
    return make_deployment(descriptors, **kw)


def refused(exc: type[BaseException], fn, *args, **kw) -> BaseException:
    with pytest.raises(exc) as info:
        fn(*args, **kw)
    assert type(info.value) is exc, repr(info.value)
    return info.value


def resign(keys: Keys, data: bytes, **changes: object) -> bytes:
    """The same document with fields changed, signed again with a valid release key."""
    doc = json.loads(base64.b64decode(json.loads(data)["payload"]))
    doc.update(changes)
    return sign_envelope(DEPLOYMENT_TYPE, canonical(doc), [keys.release]).to_bytes()


def test_a_deployment_verifies_with_its_bundles(keys: Keys, descriptors) -> None:
    data = deploy(keys, descriptors, sequence=5, variants={"detector": "onnx-fp32"})
    verified = keys.state().verify_deployment(data, NOW, targets=MINE)
    assert verified.document.sequence == 5
    assert verified.document.models["detector"].variant == "onnx-fp32"
    assert set(verified.bundles) == {"detector", "classifier"}
    assert verified.bundles["classifier"].descriptor.version == "2.1.0"
    assert verified.signers == {keys.release.keyid}
    # A group's document reaches the device through its group.
    group = deploy(keys, descriptors, target=STORE)
    assert keys.state().verify_deployment(group, NOW, targets=MINE).document.target == STORE


def test_unsigned(keys: Keys, descriptors) -> None:
    data = json.loads(deploy(keys, descriptors))
    data["signatures"] = []
    refused(
        UnsignedError, keys.state().verify_deployment, json.dumps(data).encode(), NOW, targets=MINE
    )


def test_wrong_key(keys: Keys, descriptors) -> None:
    data = deploy(keys, descriptors, signers=[Signer.generate()])
    refused(UntrustedKeyError, keys.state().verify_deployment, data, NOW, targets=MINE)


def test_key_not_allowed_for_one_of_the_models(keys: Keys, descriptors) -> None:
    narrow, _ = keys.store.rotate_release(now=NOW, models=["detector"], keep=[keys.release.keyid])
    narrow_signer = load_signer(
        next(p for p in keys.store.release_key_paths() if keys.release.keyid[:16] not in p.name)
    )
    state = keys.store.state(NOW)
    assert narrow.version == 2
    only_detector = deploy(keys, {"detector": descriptors["detector"]}, signers=[narrow_signer])
    assert state.verify_deployment(only_detector, NOW, targets=MINE).bundles.keys() == {"detector"}
    both = deploy(keys, descriptors, signers=[narrow_signer])
    exc = refused(KeyNotAllowedError, state.verify_deployment, both, NOW, targets=MINE)
    assert "'classifier'" in str(exc)


def test_another_devices_deployment(keys: Keys, descriptors) -> None:
    data = deploy(keys, descriptors, target=DeploymentTarget(kind="device", id="cam-02"))
    exc = refused(WrongTargetError, keys.state().verify_deployment, data, NOW, targets=MINE)
    assert "cam-02" in str(exc)
    # Same id, other kind: a group named like the device is still another target.
    data = deploy(keys, descriptors, target=DeploymentTarget(kind="group", id="cam-01"))
    refused(WrongTargetError, keys.state().verify_deployment, data, NOW, targets=MINE)


def test_expired(keys: Keys, descriptors) -> None:
    data = deploy(keys, descriptors, days=1)
    assert keys.state().verify_deployment(data, NOW + timedelta(hours=23), targets=MINE)
    exc = refused(
        ExpiredError, keys.state().verify_deployment, data, NOW + timedelta(days=2), targets=MINE
    )
    assert "deployment" in str(exc)


def test_replayed_older_document(keys: Keys, descriptors) -> None:
    old = deploy(keys, descriptors, sequence=10)
    new = deploy(keys, descriptors, sequence=11)
    state = keys.state()
    point = state.verify_deployment(new, NOW, targets=MINE).point
    exc = refused(RollbackError, state.verify_deployment, old, NOW, targets=MINE, last=point)
    assert "sequence 11 was already accepted" in str(exc)
    # The retained document redelivered after a reconnect is the same one: it passes.
    assert state.verify_deployment(new, NOW, targets=MINE, last=point).point == point
    # Another document under the same sequence number does not.
    other = deploy(keys, {"detector": descriptors["detector"]}, sequence=11)
    refused(RollbackError, state.verify_deployment, other, NOW, targets=MINE, last=point)
    assert state.verify_deployment(
        deploy(keys, descriptors, sequence=12), NOW, targets=MINE, last=point
    )


def test_tampered_document(keys: Keys, descriptors) -> None:
    data = json.loads(deploy(keys, descriptors))
    payload = json.loads(base64.b64decode(data["payload"]))
    payload["sequence"] += 1
    data["payload"] = base64.b64encode(canonical(payload)).decode()
    refused(
        BadSignatureError,
        keys.state().verify_deployment,
        json.dumps(data).encode(),
        NOW,
        targets=MINE,
    )


def test_tampered_embedded_descriptor(keys: Keys, descriptors) -> None:
    inner = json.loads(descriptors["detector"])
    payload = json.loads(base64.b64decode(inner["payload"]))
    payload["release"] = 999_999_999
    inner["payload"] = base64.b64encode(canonical(payload)).decode()
    data = deploy(keys, {"detector": json.dumps(inner).encode()})
    refused(BadSignatureError, keys.state().verify_deployment, data, NOW, targets=MINE)


def test_descriptor_under_another_models_name(keys: Keys, descriptors) -> None:
    data = deploy(keys, {"detector": descriptors["classifier"]})
    exc = refused(VerificationError, keys.state().verify_deployment, data, NOW, targets=MINE)
    assert "carries the descriptor of 'classifier'" in str(exc)


def test_embedded_descriptor_below_the_release_floor(keys: Keys, descriptors) -> None:
    data = deploy(keys, descriptors)
    state = keys.state().with_release("detector", 2_000_000)
    refused(RollbackError, state.verify_deployment, data, NOW, targets=MINE)


@pytest.mark.parametrize(
    "changes",
    [
        {"sequence": "5"},
        {"sequence": 0},
        {"models": []},
        {"target": {"kind": "device", "id": "cam/01"}},
        {"target": {"kind": "shelf", "id": "x"}},
        {"surprise": True},
        {"expires": "tomorrow"},
        {"models": {"detector": {"descriptor": {}, "extra": 1}}},
    ],
)
def test_malformed_document(keys: Keys, descriptors, changes: dict[str, object]) -> None:
    data = resign(keys, deploy(keys, descriptors), **changes)
    refused(FormatError, keys.state().verify_deployment, data, NOW, targets=MINE)


def test_malformed_embedded_descriptor(keys: Keys, descriptors) -> None:
    data = resign(
        keys, deploy(keys, descriptors), models={"detector": {"descriptor": {"payload": 1}}}
    )
    refused(FormatError, keys.state().verify_deployment, data, NOW, targets=MINE)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=2048))
def test_any_bytes_are_refused_with_a_project_error(data: bytes) -> None:
    try:
        W.state.verify_deployment(data, NOW, targets=MINE)
    except BadContentError:
        return
    raise AssertionError("random bytes verified as a deployment")


def test_a_hand_back_is_for_a_device_and_names_no_models(keys: Keys, descriptors) -> None:
    back = deploy(keys, {}, follow_groups=True, sequence=9)
    verified = keys.state().verify_deployment(back, NOW, targets=MINE)
    assert verified.document.follow_groups is True
    assert verified.document.models == {}
    with pytest.raises(ConfigError, match="follow_groups"):
        deploy(keys, {}, follow_groups=True, target=STORE)
    with pytest.raises(ConfigError, match="follow_groups"):
        deploy(keys, descriptors, follow_groups=True)
    # Signed by hand with models, a device refuses it.
    bad = resign(keys, back, models={"x": {"descriptor": {}}})
    refused(FormatError, keys.state().verify_deployment, bad, NOW, targets=MINE)


def test_an_ordinary_deployment_does_not_carry_follow_groups(keys: Keys, descriptors) -> None:
    """Agents that predate the field read every ordinary document (they refuse unknown keys)."""
    data = deploy(keys, descriptors)
    assert "follow_groups" not in json.loads(base64.b64decode(json.loads(data)["payload"]))


def test_a_key_scoped_to_some_models_may_not_sign_a_document_that_names_none(keys: Keys) -> None:
    """An empty document removes every model a device runs, and a hand-back unpins all of
    them: a key for ``camera-*`` alone must not be able to do either."""
    from datetime import datetime, timezone

    _, narrow = keys.store.rotate_release(
        now=datetime.now(timezone.utc), models=["camera-*"], keep=[keys.release.keyid]
    )
    state = keys.store.state(NOW)
    for kw in ({}, {"follow_groups": True}):
        doc = deploy(keys, {}, signers=[narrow], **kw)
        err = refused(KeyNotAllowedError, state.verify_deployment, doc, NOW, targets=MINE)
        assert "names no model" in str(err)
        # The unscoped key may.
        assert state.verify_deployment(deploy(keys, {}, **kw), NOW, targets=MINE)
