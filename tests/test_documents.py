"""agent.device.documents without a broker: what becomes of each message on a desired topic, what
is kept on disk, which document is effective, and trust that arrives later. Real keys, real
signatures and a real state directory; only the MQTT message is made by hand."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from agent.device.documents import Documents, Received
from agent.fleet.deploy import make_deployment
from agent.state.store import StateStore
from agent.transport.session import Incoming
from agent.trust.keys import Signer
from agent.trust.metadata import MAX_METADATA_BYTES, DeploymentTarget
from tests.conftest import NOW, Keys

DEVICE = DeploymentTarget(kind="device", id="cam-01")
LOBBY = DeploymentTarget(kind="group", id="lobby")
SignedFn = Callable[..., tuple[Path, bytes]]


def _docs(store: StateStore, keys: Keys) -> Documents:
    return Documents(store, keys.state(), device_id="cam-01", groups=["lobby"])


def _message(payload: bytes, topic: str = "ema/v1/devices/cam-01/desired") -> Incoming:
    return Incoming(topic=topic, payload=payload, retain=True)


@pytest.fixture
def envelope(signed: SignedFn) -> bytes:
    return signed("1.0.0")[1]


def _deployment(
    keys: Keys,
    envelope: bytes,
    *,
    target: DeploymentTarget = DEVICE,
    sequence: int,
    signer: Signer | None = None,
    follow_groups: bool = False,
) -> bytes:
    return make_deployment(
        {} if follow_groups else {"tiny": envelope},
        target=target,
        signers=[signer or keys.release],
        now=NOW,
        sequence=sequence,
        follow_groups=follow_groups,
    )


def test_an_accepted_document_is_on_disk_and_resumed_after_a_restart(
    tmp_path: Path, keys: Keys, envelope: bytes
) -> None:
    store = StateStore(tmp_path / "state")
    docs = _docs(store, keys)
    receipt = docs.receive("device", _message(_deployment(keys, envelope, sequence=5)), NOW)
    assert receipt.kind is Received.ACCEPTED
    assert receipt.verified is not None
    assert docs.by_source["device"] is receipt.verified
    assert docs.points["device"] == receipt.verified.point

    again = _docs(StateStore(tmp_path / "state"), keys)
    assert again.points["device"] == receipt.verified.point
    again.restore(NOW)
    assert again.by_source["device"].document.sequence == 5


def test_the_same_document_again_is_not_a_new_one(
    tmp_path: Path, keys: Keys, envelope: bytes
) -> None:
    docs = _docs(StateStore(tmp_path / "state"), keys)
    payload = _deployment(keys, envelope, sequence=5)
    assert docs.receive("device", _message(payload), NOW).kind is Received.ACCEPTED
    assert docs.receive("device", _message(payload), NOW).kind is Received.AGAIN
    # Dropped since (as when trust at start-up refused it): the same bytes resume it.
    del docs.by_source["device"]
    assert docs.receive("device", _message(payload), NOW).kind is Received.RESUMED
    assert "device" in docs.by_source


def test_refusals_change_nothing(tmp_path: Path, keys: Keys, envelope: bytes) -> None:
    store = StateStore(tmp_path / "state")
    docs = _docs(store, keys)
    docs.receive("device", _message(_deployment(keys, envelope, sequence=5)), NOW)
    point = docs.points["device"]

    cases = {
        "rollback": _deployment(keys, envelope, sequence=4),
        "wrong-target": _deployment(keys, envelope, target=LOBBY, sequence=9),
        "size-limit": b"{" + b" " * MAX_METADATA_BYTES + b"}",
        "format": b"not json",
    }
    for code, payload in cases.items():
        receipt = docs.receive("device", _message(payload), NOW)
        assert receipt.kind is Received.REFUSED, code
        assert receipt.error is not None
        assert receipt.error.code == code
        assert docs.points["device"] == point
        assert docs.by_source["device"].document.sequence == 5
    assert _docs(StateStore(tmp_path / "state"), keys).points["device"] == point


def test_an_emptied_topic_keeps_what_runs(tmp_path: Path, keys: Keys, envelope: bytes) -> None:
    docs = _docs(StateStore(tmp_path / "state"), keys)
    docs.receive("device", _message(_deployment(keys, envelope, sequence=5)), NOW)
    assert docs.receive("device", _message(b""), NOW).kind is Received.WITHDRAWN
    assert "device" in docs.by_source


def test_the_device_document_wins_unless_it_hands_the_device_back(
    tmp_path: Path, keys: Keys, envelope: bytes
) -> None:
    docs = _docs(StateStore(tmp_path / "state"), keys)
    group_topic = "ema/v1/groups/lobby/desired"
    assert docs.effective(None, NOW) == (None, [])
    docs.receive(
        "group-lobby",
        _message(_deployment(keys, envelope, target=LOBBY, sequence=3), group_topic),
        NOW,
    )
    group, _ = docs.effective(None, NOW)
    assert group is not None
    assert group.document.target == LOBBY

    docs.receive("device", _message(_deployment(keys, envelope, sequence=5)), NOW)
    own, lapsed = docs.effective(group, NOW)
    assert own is not None
    assert own.document.target == DEVICE
    assert lapsed == []

    docs.receive(
        "device", _message(_deployment(keys, envelope, sequence=6, follow_groups=True)), NOW
    )
    back, _ = docs.effective(own, NOW)
    assert back is not None
    assert back.document.target == LOBBY


def test_a_document_that_no_longer_holds_is_passed_over(
    tmp_path: Path, keys: Keys, envelope: bytes
) -> None:
    docs = _docs(StateStore(tmp_path / "state"), keys)
    group_topic = "ema/v1/groups/lobby/desired"
    docs.receive(
        "group-lobby",
        _message(_deployment(keys, envelope, target=LOBBY, sequence=3), group_topic),
        NOW,
    )
    # A year later the group's document has long expired: it is verified again, and dropped.
    later = NOW.replace(year=NOW.year + 1)
    doc, lapsed = docs.effective(None, later)
    assert doc is None
    assert [(source, exc.code) for source, exc in lapsed] == [("group-lobby", "expired")]
    assert "group-lobby" not in docs.by_source


def test_a_document_refused_for_want_of_trust_is_tried_again_when_trust_arrives(
    tmp_path: Path, keys: Keys, envelope: bytes
) -> None:
    store = StateStore(tmp_path / "state")
    docs = _docs(store, keys)
    _, newer = keys.store.rotate_release(
        now=NOW, keep=[k[:16] for k in keys.state().keyring.release_keys]
    )  # type: ignore[union-attr]
    payload = _deployment(keys, envelope, sequence=5, signer=newer)
    receipt = docs.receive("device", _message(payload), NOW)
    assert receipt.kind is Received.REFUSED
    assert receipt.error is not None
    assert receipt.error.code == "untrusted-key"

    update = keys.store.trust_update().to_bytes()
    waiting = docs.update_trust(update, NOW)
    assert waiting is not None
    assert list(waiting) == ["device"]
    assert docs.receive("device", waiting["device"], NOW).kind is Received.ACCEPTED
    # The same trust again changes nothing, and nothing waits any more.
    assert docs.update_trust(update, NOW) is None


def test_a_refusal_for_good_is_not_tried_again(tmp_path: Path, keys: Keys, envelope: bytes) -> None:
    docs = _docs(StateStore(tmp_path / "state"), keys)
    _, newer = keys.store.rotate_release(
        now=NOW, keep=[k[:16] for k in keys.state().keyring.release_keys]
    )  # type: ignore[union-attr]
    docs.receive("device", _message(_deployment(keys, envelope, sequence=5, signer=newer)), NOW)
    # The topic then holds a document refused for another reason: the earlier one is forgotten.
    docs.receive("device", _message(b"not json"), NOW)
    assert docs.update_trust(keys.store.trust_update().to_bytes(), NOW) == {}


def test_a_raised_floor_is_on_disk_before_it_counts(
    tmp_path: Path, keys: Keys, envelope: bytes
) -> None:
    store = StateStore(tmp_path / "state")
    docs = _docs(store, keys)
    docs.raise_floor("tiny", 7)
    assert docs.trusted.release_floor["tiny"] == 7
    stored = StateStore(tmp_path / "state").load_trust(keys.store.root_bytes(), None, NOW)
    assert stored.release_floor["tiny"] == 7
    # At start-up a floor is assumed from what runs, and written with the next change.
    docs.assume_floor("other", 3)
    assert docs.trusted.release_floor["other"] == 3
    again = StateStore(tmp_path / "state").load_trust(keys.store.root_bytes(), None, NOW)
    assert "other" not in again.release_floor
