"""What goes into a deployment (agent.fleet.deploy), the fleet's trust and its trust message
(agent.fleet.keys), called as a library: no broker."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import pytest

from agent.errors import ConfigError
from agent.fleet.deploy import (
    bundle_sha256,
    check_bundles,
    deployment_target,
    given_descriptors,
    parse_variants,
    stage_descriptors,
)
from agent.fleet.gate import Outcome
from agent.fleet.keys import fleet_trust, load_signer
from agent.fleet.plan import Knowledge
from agent.fleet.sign import reissue_bundle
from agent.fleet.watch import Watched, progress_line
from agent.transport.topics import Topics
from agent.trust.metadata import BundleDescriptor
from agent.trust.verifier import TrustedState
from tests.conftest import BuildFn, Keys

Signed = Callable[..., tuple[Path, bytes]]
NOW = datetime.now(timezone.utc)


def no_trust() -> TrustedState:
    raise AssertionError("the fleet's trust was not needed here")


def test_variants_and_targets() -> None:
    assert parse_variants(["det=onnx-fp16", "cls=a=b"]) == {"det": "onnx-fp16", "cls": "a=b"}
    with pytest.raises(ConfigError, match="MODEL=VARIANT"):
        parse_variants(["det"])
    assert deployment_target("cam-01", None).kind == "device"
    group = deployment_target(None, "line-1")
    assert (group.kind, group.id) == ("group", "line-1")


def test_a_deployment_names_bundles_or_follows_groups(tmp_path: Path) -> None:
    bundle = [tmp_path / "a.emb"]
    check_bundles(bundle, device=None, follow_groups=False)
    check_bundles([], device="cam-01", follow_groups=True)
    with pytest.raises(ConfigError, match="name the bundles"):
        check_bundles([], device="cam-01", follow_groups=False)
    with pytest.raises(ConfigError, match="give no bundles"):
        check_bundles(bundle, device="cam-01", follow_groups=True)
    with pytest.raises(ConfigError, match="give no bundles"):
        check_bundles([], device=None, follow_groups=True)


def test_bundles_are_staged_with_their_own_descriptors(
    tmp_path: Path, signed: Signed, keys: Keys
) -> None:
    bundle, envelope = signed("1.0.0")
    staged: list[tuple[BundleDescriptor, Path]] = []
    notes: list[str] = []
    served = tmp_path / "served"
    descriptors = stage_descriptors(
        [bundle],
        served,
        signers=[keys.release],
        trust=keys.state,
        now=NOW,
        on_signed_again=notes.append,
        on_staged=lambda d, path: staged.append((d, path)),
    )
    assert descriptors == {"tiny": envelope}  # still trusted: published as it is
    assert notes == []
    ((descriptor, path),) = staged
    assert (descriptor.model, descriptor.version) == ("tiny", "1.0.0")
    assert path == served / bundle.name
    assert path.read_bytes() == bundle.read_bytes()
    assert (served / f"{bundle.name}.dsse").read_bytes() == envelope
    assert bundle_sha256(envelope) == descriptor.bundle_sha256


def test_two_bundles_of_one_model_are_refused(tmp_path: Path, signed: Signed, keys: Keys) -> None:
    first, _ = signed("1.0.0")
    second, _ = signed("1.1.0")
    with pytest.raises(ConfigError, match="two bundles of model 'tiny'"):
        stage_descriptors(
            [first, second], tmp_path / "served", signers=[keys.release], trust=keys.state, now=NOW
        )


def test_a_descriptor_signed_by_a_rotated_key_is_signed_again(
    tmp_path: Path, signed: Signed, keys: Keys
) -> None:
    bundle, old = signed("1.0.0")
    _, signer = keys.store.rotate_release(now=NOW, models=["*"], keep=[])
    new_key = load_signer(keys.store.private / f"release-{signer.keyid[:16]}.pem")
    notes: list[str] = []
    descriptors = stage_descriptors(
        [bundle],
        tmp_path / "served",
        signers=[new_key],
        trust=keys.state,
        now=NOW,
        on_signed_again=notes.append,
    )
    (note,) = notes
    assert "signed again with" in note
    assert signer.keyid[:16] in note
    assert descriptors["tiny"] != old
    keys.state().verify_descriptor(descriptors["tiny"], NOW)  # devices take it


def test_a_given_descriptor_is_matched_to_its_bundle(
    tmp_path: Path, signed: Signed, build: BuildFn, keys: Keys
) -> None:
    bundle, _ = signed("1.0.0")
    other = build("2.0.0", name="other").path
    out, _ = reissue_bundle(bundle, [keys.release], release=5_000_000, now=NOW)
    given = given_descriptors([out], [other, bundle])
    assert given == {bundle: out.read_bytes()}
    # Given: published as given, without asking for the fleet's trust.
    descriptors = stage_descriptors(
        [bundle], tmp_path / "served", signers=[keys.release], trust=no_trust, now=NOW, given=given
    )
    assert descriptors == {"tiny": out.read_bytes()}
    with pytest.raises(ConfigError, match="none of the bundles given"):
        given_descriptors([out], [other])
    with pytest.raises(ConfigError, match="two --descriptor envelopes"):
        given_descriptors([out, out], [bundle])
    with pytest.raises(ConfigError, match="cannot read --descriptor"):
        given_descriptors([tmp_path / "missing.dsse"], [bundle])
    assert given_descriptors([], [tmp_path / "not-read.emb"]) == {}


def test_the_fleet_trust_is_the_key_directory_of_the_key(tmp_path: Path, keys: Keys) -> None:
    key = keys.store.release_key_paths()[0]
    found = fleet_trust(None, [key], NOW)
    assert found.keyring == keys.state().keyring
    assert fleet_trust(keys.dir, [tmp_path / "elsewhere.pem"], NOW).keyring == found.keyring
    loose = tmp_path / "loose.pem"
    loose.write_bytes(key.read_bytes())
    with pytest.raises(ConfigError, match="give --trust"):
        fleet_trust(None, [loose], NOW)


def test_the_trust_message_carries_the_root_chain_and_the_keyring(keys: Keys) -> None:
    update = keys.store.trust_update()
    assert update.roots == []  # devices hold v1 from installation
    assert update.keyring == json.loads(keys.store.keyring_bytes())
    keys.store.rotate_root(now=NOW, root_keys=3, threshold=2)
    update = keys.store.trust_update()
    v2 = json.loads((keys.dir / "history" / "root.v2.json").read_bytes())
    assert update.roots == [v2]
    assert update.keyring == json.loads(keys.store.keyring_bytes())
    # What a device does with it: walk from v1 to v2, then take the keyring.
    state = TrustedState.from_root((keys.dir / "history" / "root.v1.json").read_bytes())
    for root in update.roots:
        state = state.update_root(json.dumps(root).encode())
    assert state.root.version == 2
    state = state.update_keyring(json.dumps(update.keyring).encode(), NOW)
    assert state.keyring == keys.store.current_keyring()


def test_the_progress_line_of_a_group_with_no_device() -> None:
    knowledge = Knowledge(Topics("ema/v1"))
    assert (
        progress_line(knowledge, {}, "dep-1", group="line-1") == "group line-1: no device reported"
    )
    outcomes = {
        "a": Outcome("active", final=True, ok=True),
        "b": Outcome("active", final=True, ok=True),
        "c": Outcome("downloading"),
        "d": Outcome("failed", final=True, code="self-test", model="det"),
    }
    line = progress_line(knowledge, outcomes, "dep-1", group="line-1")
    assert line == "group line-1: 2 active, 1 downloading, 1 failed"
    watched = Watched(outcomes, finished=False)
    assert watched.waiting == ["c"]
    assert list(watched.failed) == ["d"]
