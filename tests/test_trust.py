"""Attacks on the trust core: one test per attack, each pinned to the exact exception it raises.

The metadata here is mostly made by :class:`~agent.fleet.keys.KeyStore` (what an operator runs);
forged and malformed metadata is signed by hand with :func:`~agent.trust.envelope.sign_envelope`
so that the signatures are valid and the check under test is the one that fails.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from agent._strictjson import canonical, dump_model
from agent.errors import (
    BadSignatureError,
    ExpiredError,
    FormatError,
    KeyNotAllowedError,
    RollbackError,
    ThresholdError,
    UnsignedError,
    UntrustedKeyError,
    VerificationError,
)
from agent.fleet.keys import KeyStore, load_signer
from agent.trust.envelope import Envelope, parse_envelope, sign_envelope
from agent.trust.keys import Signer
from agent.trust.metadata import (
    DESCRIPTOR_TYPE,
    KEYRING_TYPE,
    ROOT_TYPE,
    BundleDescriptor,
    KeyringMetadata,
    PublicKey,
    ReleaseKey,
    RootMetadata,
)
from agent.trust.verifier import TrustedState
from agent.verify import verify_bundle
from tests.conftest import NOW, Keys
from tests.documents import DAY, descriptor_doc


# -- helpers -------------------------------------------------------------------------------------
def iso(moment: datetime) -> str:
    return moment.isoformat()


def sign_payload(payload: bytes, signers: Iterable[Signer], payload_type: str) -> bytes:
    return sign_envelope(payload_type, payload, list(signers)).to_bytes()


def sign_descriptor(signers: Iterable[Signer], **over: object) -> bytes:
    return sign_payload(canonical(descriptor_doc(**over)), signers, DESCRIPTOR_TYPE)


def public(signer: Signer) -> PublicKey:
    return PublicKey(public=signer.public_raw.hex())


def release_key(signer: Signer, *, models: Sequence[str] = ("*",), days: int = 365) -> ReleaseKey:
    return ReleaseKey(key=public(signer), expires=NOW + days * DAY, models=list(models))


def make_keyring(
    signed_by: Iterable[Signer],
    *,
    version: int,
    release: dict[str, ReleaseKey],
    threshold: int = 1,
    days: int = 365,
) -> bytes:
    keyring = KeyringMetadata(
        version=version, expires=NOW + days * DAY, release_keys=release, threshold=threshold
    )
    return sign_payload(dump_model(keyring), signed_by, KEYRING_TYPE)


def make_root(
    signed_by: Iterable[Signer],
    *,
    version: int,
    keys: Sequence[Signer],
    threshold: int,
    days: int = 730,
) -> bytes:
    root = RootMetadata(
        version=version,
        expires=NOW + days * DAY,
        keys={s.keyid: public(s) for s in keys},
        threshold=threshold,
    )
    return sign_payload(dump_model(root), signed_by, ROOT_TYPE)


def root_signers(store: KeyStore) -> list[Signer]:
    """The current root's private keys, in the order the root lists them."""
    return [load_signer(store.private / f"root-{k[:16]}.pem") for k in store.current_root().keys]


def root_only(store: KeyStore) -> TrustedState:
    return TrustedState.from_root(store.root_bytes())


def fresh(n: int) -> list[Signer]:
    return [Signer.generate() for _ in range(n)]


def raises_exactly(
    cls: type[BaseException], fn: Callable[..., object], *args: object, match: str | None = None
) -> BaseException:
    """Call ``fn`` and check that it raised ``cls`` itself, not a parent or a sibling."""
    with pytest.raises(cls, match=match) as excinfo:
        fn(*args)
    assert type(excinfo.value) is cls, f"{type(excinfo.value).__name__}: {excinfo.value}"
    return excinfo.value


# -- the baseline ----------------------------------------------------------------------------------
def test_well_formed_descriptor_verifies(keys: Keys) -> None:
    data = sign_descriptor([keys.release])
    verified = keys.state().verify_descriptor(data, NOW)
    assert verified.descriptor.model == "tiny"
    assert verified.descriptor.release == 1
    assert verified.signers == {keys.release.keyid}
    assert len(verified.envelope_sha256) == 64


def test_no_keyring_loaded_is_a_verification_error(keys: Keys) -> None:
    state = root_only(keys.store)
    assert state.keyring is None
    raises_exactly(
        VerificationError,
        state.verify_descriptor,
        sign_descriptor([keys.release]),
        NOW,
        match="no trusted keyring",
    )


def test_naive_reference_time_is_refused(keys: Keys) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        keys.state().verify_descriptor(sign_descriptor([keys.release]), NOW.replace(tzinfo=None))


# -- unsigned ------------------------------------------------------------------------------------
def test_unsigned_descriptor(keys: Keys) -> None:
    data = sign_descriptor([])
    assert json.loads(data)["signatures"] == []
    raises_exactly(UnsignedError, keys.state().verify_descriptor, data, NOW, match="no signature")


def test_unsigned_keyring(keys: Keys) -> None:
    data = make_keyring([], version=2, release={keys.release.keyid: release_key(keys.release)})
    raises_exactly(UnsignedError, keys.state().update_keyring, data, NOW, match="no signature")


def test_unsigned_root(keys: Keys) -> None:
    new = fresh(1)
    data = make_root([], version=1, keys=new, threshold=1)
    raises_exactly(UnsignedError, TrustedState.from_root, data, match="no signature")
    data2 = make_root([], version=2, keys=new, threshold=1)
    raises_exactly(UnsignedError, keys.state().update_root, data2, match="no signature")


# -- wrong key -----------------------------------------------------------------------------------
def test_descriptor_signed_by_unknown_key(keys: Keys) -> None:
    stranger = Signer.generate()
    data = sign_descriptor([stranger])
    exc = raises_exactly(UntrustedKeyError, keys.state().verify_descriptor, data, NOW)
    assert stranger.keyid[:16] in str(exc)


def test_descriptor_signed_by_root_key(keys: Keys) -> None:
    """Root keys sign the keyring, never bundles: roles do not mix."""
    data = sign_descriptor(root_signers(keys.store))
    raises_exactly(UntrustedKeyError, keys.state().verify_descriptor, data, NOW)


def test_keyring_signed_by_attacker_keys(keys: Keys) -> None:
    attacker = fresh(3)
    evil = make_keyring(attacker, version=2, release={attacker[0].keyid: release_key(attacker[0])})
    raises_exactly(UntrustedKeyError, keys.state().update_keyring, evil, NOW)


def test_keyring_signed_by_release_key(keys: Keys) -> None:
    """A release key cannot vouch for a keyring (it could add keys for itself)."""
    stranger = Signer.generate()
    evil = make_keyring(
        [keys.release],
        version=2,
        release={
            keys.release.keyid: release_key(keys.release),
            stranger.keyid: release_key(stranger),
        },
    )
    raises_exactly(UntrustedKeyError, keys.state().update_keyring, evil, NOW)


def test_verify_then_parse_garbage_from_untrusted_key(keys: Keys) -> None:
    """A payload that is not even JSON, from an untrusted key: refused for the key, unparsed."""
    data = sign_payload(b"\xff not json {", [Signer.generate()], DESCRIPTOR_TYPE)
    raises_exactly(UntrustedKeyError, keys.state().verify_descriptor, data, NOW)


# -- key not allowed for this model ----------------------------------------------------------------
def test_key_not_allowed_for_model(tmp_path: Path) -> None:
    store = KeyStore.init(tmp_path / "k", now=NOW, models=["detector-*"])
    release = load_signer(store.release_key_paths()[0])
    state = store.state(NOW)
    exc = raises_exactly(
        KeyNotAllowedError, state.verify_descriptor, sign_descriptor([release]), NOW
    )
    assert "'tiny'" in str(exc)
    assert release.keyid[:16] in str(exc)
    ok = state.verify_descriptor(sign_descriptor([release], model="detector-v2"), NOW)
    assert ok.descriptor.model == "detector-v2"


def test_rotated_key_restricted_to_models(keys: Keys) -> None:
    _, new = keys.store.rotate_release(now=NOW, models=["detector-*", "seg?"])
    state = keys.state()
    raises_exactly(KeyNotAllowedError, state.verify_descriptor, sign_descriptor([new]), NOW)
    for model in ("detector-x", "seg1"):
        assert state.verify_descriptor(sign_descriptor([new], model=model), NOW).signers == {
            new.keyid
        }
    raises_exactly(
        KeyNotAllowedError, state.verify_descriptor, sign_descriptor([new], model="seg12"), NOW
    )


def test_key_not_allowed_counts_against_threshold(keys: Keys) -> None:
    """Threshold 2: one key that may sign 'tiny' and one that may not are not enough."""
    narrow = Signer.generate()
    ring = make_keyring(
        root_signers(keys.store)[:2],
        version=2,
        release={
            keys.release.keyid: release_key(keys.release),
            narrow.keyid: release_key(narrow, models=["detector-*"]),
        },
        threshold=2,
    )
    state = keys.state().update_keyring(ring, NOW)
    data = sign_descriptor([keys.release, narrow])
    exc = raises_exactly(KeyNotAllowedError, state.verify_descriptor, data, NOW)
    assert narrow.keyid[:16] in str(exc)
    both = state.verify_descriptor(sign_descriptor([keys.release, narrow], model="detector-1"), NOW)
    assert both.signers == {keys.release.keyid, narrow.keyid}


# -- threshold -----------------------------------------------------------------------------------
def test_keyring_signed_by_one_of_three_root_keys(keys: Keys) -> None:
    roots = root_signers(keys.store)
    assert len(roots) == 3
    assert keys.store.current_root().threshold == 2
    ring = make_keyring(
        roots[:1], version=2, release={keys.release.keyid: release_key(keys.release)}
    )
    raises_exactly(
        ThresholdError,
        keys.state().update_keyring,
        ring,
        NOW,
        match=r"1 valid signature\(s\); 2 are required",
    )
    ok = make_keyring(roots[1:], version=2, release={keys.release.keyid: release_key(keys.release)})
    assert keys.state().update_keyring(ok, NOW).keyring.version == 2  # type: ignore[union-attr]


def test_one_root_key_signing_twice_counts_once(keys: Keys) -> None:
    root = root_signers(keys.store)[0]
    ring = make_keyring(
        [root, root], version=2, release={keys.release.keyid: release_key(keys.release)}
    )
    assert len(json.loads(ring)["signatures"]) == 2
    raises_exactly(ThresholdError, keys.state().update_keyring, ring, NOW)


def test_descriptor_below_release_threshold(keys: Keys) -> None:
    second = Signer.generate()
    ring = make_keyring(
        root_signers(keys.store)[:2],
        version=2,
        release={
            keys.release.keyid: release_key(keys.release),
            second.keyid: release_key(second),
        },
        threshold=2,
    )
    state = keys.state().update_keyring(ring, NOW)
    for signer in (keys.release, second):
        raises_exactly(
            ThresholdError,
            state.verify_descriptor,
            sign_descriptor([signer]),
            NOW,
            match=r"1 valid signature\(s\); 2 are required",
        )
    # The same key twice is still one key.
    raises_exactly(ThresholdError, state.verify_descriptor, sign_descriptor([second, second]), NOW)
    # A stranger does not make up the difference.
    raises_exactly(
        ThresholdError,
        state.verify_descriptor,
        sign_descriptor([second, Signer.generate()]),
        NOW,
    )
    verified = state.verify_descriptor(sign_descriptor([keys.release, second]), NOW)
    assert verified.signers == {keys.release.keyid, second.keyid}


def test_compromised_root_key_cannot_sign_keyring(keys: Keys) -> None:
    """The attacker holds one root key (threshold 2) and adds a release key of their own."""
    stolen = root_signers(keys.store)[0]
    attacker = Signer.generate()
    evil = make_keyring(
        [stolen, attacker],
        version=2,
        release={attacker.keyid: release_key(attacker)},
    )
    raises_exactly(ThresholdError, keys.state().update_keyring, evil, NOW)


def test_compromised_root_key_cannot_rotate_root(keys: Keys) -> None:
    """One stolen root key plus a root of the attacker's own keys, threshold 1: refused."""
    stolen = root_signers(keys.store)[0]
    attacker = fresh(1)
    evil = make_root([stolen, *attacker], version=2, keys=attacker, threshold=1)
    exc = raises_exactly(ThresholdError, keys.state().update_root, evil)
    assert "root v1" in str(exc)


# -- expiry (freeze attacks) -----------------------------------------------------------------------
def test_descriptor_expired(keys: Keys) -> None:
    state = keys.state()
    expires = NOW + 30 * DAY
    data = sign_descriptor([keys.release], expires=iso(expires))
    assert state.verify_descriptor(data, expires - timedelta(seconds=1)).descriptor.release == 1
    for when in (expires, expires + DAY):
        raises_exactly(ExpiredError, state.verify_descriptor, data, when, match="descriptor")


def test_descriptor_already_expired_when_signed(keys: Keys) -> None:
    data = sign_descriptor([keys.release], expires=iso(NOW - timedelta(seconds=1)))
    raises_exactly(ExpiredError, keys.state().verify_descriptor, data, NOW, match="descriptor")


def test_keyring_expired_when_verifying(keys: Keys) -> None:
    state = keys.state()
    later = NOW + 366 * DAY  # keyring: 365 days; root: 730 days
    data = sign_descriptor([keys.release], expires=iso(later + DAY))
    raises_exactly(ExpiredError, state.verify_descriptor, data, later, match="keyring v1")


def test_keyring_expired_when_loading(keys: Keys) -> None:
    state = root_only(keys.store)
    raises_exactly(
        ExpiredError,
        state.update_keyring,
        keys.store.keyring_bytes(),
        NOW + 366 * DAY,
        match="keyring v1",
    )
    stale = make_keyring(
        root_signers(keys.store),
        version=2,
        release={keys.release.keyid: release_key(keys.release)},
        days=-1,
    )
    raises_exactly(ExpiredError, keys.state().update_keyring, stale, NOW, match="keyring v2")


def test_root_expired_freeze(keys: Keys) -> None:
    state = keys.state()
    later = NOW + 731 * DAY
    data = sign_descriptor([keys.release], expires=iso(later + DAY))
    raises_exactly(ExpiredError, state.verify_descriptor, data, later, match="root v1")
    raises_exactly(
        ExpiredError,
        root_only(keys.store).update_keyring,
        keys.store.keyring_bytes(),
        later,
        match="root v1",
    )
    raises_exactly(ExpiredError, state.check_root_fresh, later, match="root v1")


def test_expired_root_can_still_be_rotated(keys: Keys) -> None:
    """TUF 5.3: the root's expiry is checked on use, so an expired device can catch up."""
    state = keys.state()
    later = NOW + 800 * DAY
    raises_exactly(ExpiredError, state.check_root_fresh, later)
    keys.store.rotate_root(now=later)
    rotated = state.update_root(keys.store.root_bytes())
    rotated.check_root_fresh(later)
    rotated = rotated.update_keyring(keys.store.keyring_bytes(), later)
    assert rotated.keyring is not None
    assert rotated.keyring.version == 2


def test_release_key_expired(tmp_path: Path) -> None:
    store = KeyStore.init(tmp_path / "k", now=NOW, release_days=10)
    release = load_signer(store.release_key_paths()[0])
    state = store.state(NOW)
    data = sign_descriptor([release], expires=iso(NOW + 30 * DAY))
    assert state.verify_descriptor(data, NOW + 9 * DAY).signers == {release.keyid}
    exc = raises_exactly(
        ExpiredError, state.verify_descriptor, data, NOW + 11 * DAY, match="release key"
    )
    assert release.keyid[:16] in str(exc)


# -- rollback ------------------------------------------------------------------------------------
def test_descriptor_release_below_floor(keys: Keys) -> None:
    state = keys.state().with_release("tiny", 5)
    old = sign_descriptor([keys.release], release=4)
    exc = raises_exactly(RollbackError, state.verify_descriptor, old, NOW)
    assert "release 4" in str(exc)
    assert "release 5" in str(exc)
    # The same release is reinstallable, a newer one is fine, and floors are per model.
    assert state.verify_descriptor(sign_descriptor([keys.release], release=5), NOW)
    assert state.verify_descriptor(sign_descriptor([keys.release], release=6), NOW)
    assert state.verify_descriptor(sign_descriptor([keys.release], model="other", release=1), NOW)


def test_release_floor_never_goes_down(keys: Keys) -> None:
    state = keys.state().with_release("tiny", 5).with_release("tiny", 3)
    assert state.release_floor["tiny"] == 5
    raises_exactly(
        RollbackError, state.verify_descriptor, sign_descriptor([keys.release], release=4), NOW
    )
    assert keys.state().release_floor == {}


# -- a re-issued descriptor: an earlier bundle under a higher release ------------------------------
def test_a_descriptor_without_bundle_release_keeps_its_bytes(signed) -> None:  # type: ignore[no-untyped-def]
    """The field is written only when set: every other descriptor reads and writes as before,
    so agents that predate it read them all."""
    descriptor = BundleDescriptor.model_validate_json(canonical(descriptor_doc()))
    assert descriptor.bundle_release is None
    assert descriptor.manifest_release == descriptor.release == 1
    # The bytes the model without the field dumped (what was signed before it existed).
    before = {k: v for k, v in descriptor.model_dump(mode="json").items() if k != "bundle_release"}
    assert set(before) == set(descriptor_doc())
    assert descriptor.to_payload() == canonical(before)
    # What edge-fleet bundle sign writes: those fields, and it reads back to the same bytes.
    _, envelope = signed("1.0.0")
    written = parse_envelope(envelope).payload
    assert set(json.loads(written)) == set(descriptor_doc())
    assert BundleDescriptor.model_validate_json(written).to_payload() == written


def test_a_reissued_descriptor_is_judged_by_its_own_release(keys: Keys) -> None:
    """The floor compares ``release``; ``bundle_release`` is what the manifest says."""
    state = keys.state().with_release("tiny", 2)
    reissued = sign_descriptor([keys.release], release=3, bundle_release=1)
    verified = state.verify_descriptor(reissued, NOW)
    assert (verified.descriptor.release, verified.descriptor.bundle_release) == (3, 1)
    assert verified.descriptor.manifest_release == 1
    assert b"bundle_release" in parse_envelope(reissued).payload
    # The bundle's original descriptor stays below the floor, and a re-issue cannot lower it.
    raises_exactly(
        RollbackError, state.verify_descriptor, sign_descriptor([keys.release], release=1), NOW
    )
    raises_exactly(
        RollbackError,
        state.with_release("tiny", 4).verify_descriptor,
        reissued,
        NOW,
        match="release 3 is older",
    )


@pytest.mark.parametrize(("release", "bundle_release"), [(3, 3), (3, 4), (3, 0)])
def test_bundle_release_not_below_release_is_malformed(
    keys: Keys, release: int, bundle_release: int
) -> None:
    data = sign_descriptor([keys.release], release=release, bundle_release=bundle_release)
    exc = raises_exactly(FormatError, keys.state().verify_descriptor, data, NOW)
    assert "bundle_release" in str(exc)


def test_a_reissued_descriptor_needs_a_release_key(keys: Keys) -> None:
    """Re-issuing is signing: a key outside the keyring gains nothing by it."""
    data = sign_descriptor(fresh(1), release=3, bundle_release=1)
    raises_exactly(UntrustedKeyError, keys.state().verify_descriptor, data, NOW)


def test_keyring_version_rollback(keys: Keys) -> None:
    v1 = keys.store.keyring_bytes()
    keys.store.rotate_release(now=NOW)
    v2 = keys.store.keyring_bytes()
    state = root_only(keys.store).update_keyring(v2, NOW)
    exc = raises_exactly(RollbackError, state.update_keyring, v1, NOW)
    assert "v1" in str(exc)
    assert "v2" in str(exc)


def test_keyring_same_version_different_content(keys: Keys) -> None:
    attacker = Signer.generate()
    roots = root_signers(keys.store)
    current = keys.store.current_keyring()
    forked = current.model_copy(
        update={"release_keys": {**current.release_keys, attacker.keyid: release_key(attacker)}}
    )
    data = sign_payload(dump_model(forked), roots, KEYRING_TYPE)
    exc = raises_exactly(RollbackError, keys.state().update_keyring, data, NOW)
    assert "same version" in str(exc)


def test_keyring_same_version_same_content_is_accepted(keys: Keys) -> None:
    """Re-signed by other root keys, the same keyring is the same keyring."""
    roots = root_signers(keys.store)
    resigned = sign_payload(dump_model(keys.store.current_keyring()), roots[1:], KEYRING_TYPE)
    assert resigned != keys.store.keyring_bytes()
    state = keys.state().update_keyring(resigned, NOW)
    assert state.keyring == keys.store.current_keyring()


def test_root_same_version(keys: Keys) -> None:
    state = keys.state()
    raises_exactly(RollbackError, state.update_root, keys.store.root_bytes(), match="not newer")
    roots = root_signers(keys.store)
    other = make_root(roots, version=1, keys=roots, threshold=3)
    raises_exactly(RollbackError, state.update_root, other, match="not newer")


def test_root_lower_version(keys: Keys) -> None:
    old = root_signers(keys.store)
    new = fresh(3)
    v2 = make_root([*old[:2], *new[:2]], version=2, keys=new, threshold=2)
    state = keys.state().update_root(v2)
    assert state.root.version == 2
    v1 = make_root(new, version=1, keys=new, threshold=2)
    raises_exactly(RollbackError, state.update_root, v1, match="v1 is not newer than trusted v2")


def test_replayed_old_root_is_refused(keys: Keys) -> None:
    """After a rotation the old root (signed by the retired keys) no longer verifies."""
    v1_state = keys.state()
    v1 = keys.store.root_bytes()
    keys.store.rotate_root(now=NOW)
    state = v1_state.update_root(keys.store.root_bytes())
    assert state.root.version == 2
    # TUF order: signatures (5.3.4) before the version (5.3.6), so the old keys fail first.
    raises_exactly(UntrustedKeyError, state.update_root, v1)


# -- payload type confusion --------------------------------------------------------------------------
def test_keyring_offered_as_descriptor(keys: Keys) -> None:
    exc = raises_exactly(
        FormatError, keys.state().verify_descriptor, keys.store.keyring_bytes(), NOW
    )
    assert KEYRING_TYPE in str(exc)


def test_descriptor_offered_as_keyring_or_root(keys: Keys) -> None:
    data = sign_descriptor([keys.release])
    raises_exactly(FormatError, keys.state().update_keyring, data, NOW, match="payload type")
    raises_exactly(FormatError, keys.state().update_root, data, match="payload type")
    raises_exactly(FormatError, TrustedState.from_root, data, match="payload type")


def test_root_offered_as_keyring(keys: Keys) -> None:
    raises_exactly(
        FormatError,
        keys.state().update_keyring,
        keys.store.root_bytes(),
        NOW,
        match=re.escape(ROOT_TYPE),
    )


def test_relabelled_payload_type_breaks_signature(keys: Keys) -> None:
    """The signature covers the type (PAE): a descriptor signed as something else is refused."""
    env = sign_envelope("application/x-other", canonical(descriptor_doc()), [keys.release])
    relabelled = Envelope(DESCRIPTOR_TYPE, env.payload, env.signatures).to_bytes()
    raises_exactly(BadSignatureError, keys.state().verify_descriptor, relabelled, NOW)


# -- rotation and revocation ---------------------------------------------------------------------------
def test_rotate_release_revokes_old_key(signed, keys: Keys) -> None:
    old_path, old_env = signed("1.0.0")
    state_v1 = keys.state()
    assert verify_bundle(old_path, old_env, state_v1, NOW).signers == {keys.release.keyid}

    keyring, new = keys.store.rotate_release(now=NOW)
    assert keys.release.keyid not in keyring.release_keys
    assert set(keyring.release_keys) == {new.keyid}
    state_v2 = state_v1.update_keyring(keys.store.keyring_bytes(), NOW)

    raises_exactly(UntrustedKeyError, verify_bundle, old_path, old_env, state_v2, NOW)
    new_path, new_env = signed("1.0.1", signers=[new])
    assert verify_bundle(new_path, new_env, state_v2, NOW).signers == {new.keyid}
    # The retired private key left the active directory.
    assert not (keys.store.private / f"release-{keys.release.keyid[:16]}.pem").exists()
    assert (keys.store.private / "retired" / f"release-{keys.release.keyid[:16]}.pem").exists()


def test_revoke_release(signed, keys: Keys) -> None:
    _, new = keys.store.rotate_release(now=NOW, keep=[keys.release.keyid[:16]])
    state = keys.state()
    assert state.keyring is not None
    assert set(state.keyring.release_keys) == {keys.release.keyid, new.keyid}
    old_path, old_env = signed("1.0.0")
    assert verify_bundle(old_path, old_env, state, NOW)

    keyring = keys.store.revoke_release([keys.release.keyid[:12]], now=NOW)
    assert set(keyring.release_keys) == {new.keyid}
    assert keyring.version == 3
    revoked = state.update_keyring(keys.store.keyring_bytes(), NOW)
    raises_exactly(UntrustedKeyError, verify_bundle, old_path, old_env, revoked, NOW)
    new_path, new_env = signed("1.0.1", signers=[new])
    assert verify_bundle(new_path, new_env, revoked, NOW).signers == {new.keyid}


def test_rotated_keyring_accepted(keys: Keys) -> None:
    v1 = keys.state()
    assert v1.keyring is not None
    assert v1.keyring.version == 1
    keys.store.rotate_release(now=NOW)
    v2_bytes = keys.store.keyring_bytes()
    v2 = v1.update_keyring(v2_bytes, NOW)
    assert v2.keyring is not None
    assert v2.keyring.version == 2
    assert v2.keyring_bytes == v2_bytes
    # The state is immutable: the old one still holds v1.
    assert v1.keyring.version == 1
    # Reloading the same keyring is idempotent.
    assert v2.update_keyring(v2_bytes, NOW).keyring == v2.keyring


# -- root rotation -------------------------------------------------------------------------------
def test_root_rotation_chain(keys: Keys) -> None:
    state = keys.state()
    old_keyring = keys.store.keyring_bytes()
    root = keys.store.rotate_root(now=NOW)
    assert root.version == 2
    assert not set(root.keys) & set(state.root.keys)

    rotated = state.update_root(keys.store.root_bytes())
    assert rotated.root == root
    assert rotated.root_bytes == keys.store.root_bytes()
    # The keyring signed only by the old root keys is no longer trusted ...
    assert rotated.keyring is None
    assert rotated.keyring_bytes is None
    raises_exactly(
        VerificationError,
        rotated.verify_descriptor,
        sign_descriptor([keys.release]),
        NOW,
        match="no trusted keyring",
    )
    raises_exactly(UntrustedKeyError, rotated.update_keyring, old_keyring, NOW)
    # ... and the one re-signed by the new root loads, with the release keys it carries.
    loaded = rotated.update_keyring(keys.store.keyring_bytes(), NOW)
    assert loaded.keyring is not None
    assert loaded.keyring.version == 2
    assert loaded.verify_descriptor(sign_descriptor([keys.release]), NOW).signers == {
        keys.release.keyid
    }
    # The published history keeps every root for devices that must walk the chain.
    assert (keys.dir / "history" / "root.v1.json").read_bytes() == state.root_bytes


def test_root_rotation_walks_history(keys: Keys) -> None:
    state = keys.state()
    keys.store.rotate_root(now=NOW)
    keys.store.rotate_root(now=NOW)
    history = keys.dir / "history"
    v3 = (history / "root.v3.json").read_bytes()
    # Jumping from v1 to v3: v3 is not signed by v1's keys.
    raises_exactly(UntrustedKeyError, state.update_root, v3)
    walked = state.update_root((history / "root.v2.json").read_bytes()).update_root(v3)
    assert walked.root.version == 3
    walked = walked.update_keyring(keys.store.keyring_bytes(), NOW)
    assert walked.keyring is not None
    assert walked.keyring.version == 3


def test_new_root_signed_only_by_its_own_keys(keys: Keys) -> None:
    """TUF 5.3.4: a new root must carry the old root's threshold; its own keys prove nothing."""
    new = fresh(3)
    evil = make_root(new, version=2, keys=new, threshold=2)
    # None of its signatures is by a key the device trusts, so the code says "untrusted key".
    exc = raises_exactly(UntrustedKeyError, keys.state().update_root, evil)
    assert "root v1" in str(exc)
    # With one old key (threshold 2) it is a threshold failure instead.
    old = root_signers(keys.store)
    evil2 = make_root([old[0], *new], version=2, keys=new, threshold=2)
    raises_exactly(ThresholdError, keys.state().update_root, evil2)


def test_new_root_not_signed_by_its_own_threshold(keys: Keys) -> None:
    """TUF 5.3.5: the new root must also be signed by the threshold of its own keys."""
    old = root_signers(keys.store)
    new = fresh(3)
    data = make_root([*old[:2], new[0]], version=2, keys=new, threshold=2)
    exc = raises_exactly(ThresholdError, keys.state().update_root, data)
    assert "its own keys" in str(exc)
    data = make_root(old[:2], version=2, keys=new, threshold=2)
    raises_exactly(UntrustedKeyError, keys.state().update_root, data, match="its own keys")


def test_root_skipping_a_version(keys: Keys) -> None:
    old = root_signers(keys.store)
    new = fresh(3)
    v3 = make_root([*old[:2], *new[:2]], version=3, keys=new, threshold=2)
    raises_exactly(VerificationError, keys.state().update_root, v3, match="skips")
    v2 = make_root([*old[:2], *new[:2]], version=2, keys=new, threshold=2)
    assert keys.state().update_root(v2).root.version == 2


def test_root_rotation_keeping_the_keys_keeps_the_keyring(keys: Keys) -> None:
    old = root_signers(keys.store)
    v2 = make_root(old, version=2, keys=old, threshold=2)
    rotated = keys.state().update_root(v2)
    assert rotated.keyring is not None
    assert rotated.keyring_bytes == keys.store.keyring_bytes()


def test_root_rotation_raising_the_threshold_drops_a_thin_keyring(keys: Keys) -> None:
    """A keyring with two root signatures does not survive a root that asks for three."""
    old = root_signers(keys.store)
    thin = make_keyring(old[:2], version=2, release={keys.release.keyid: release_key(keys.release)})
    state = keys.state().update_keyring(thin, NOW)
    v2 = make_root(old, version=2, keys=old, threshold=3)
    rotated = state.update_root(v2)
    assert rotated.root.threshold == 3
    assert rotated.keyring is None
    raises_exactly(ThresholdError, rotated.update_keyring, thin, NOW)


# -- malformed content ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"{",
        b"not json",
        b"[]",
        b'"a string"',
        b"\xff\xfe{}",
        b'{"payloadType": NaN}',
    ],
)
def test_malformed_envelope_json(keys: Keys, data: bytes) -> None:
    raises_exactly(FormatError, keys.state().verify_descriptor, data, NOW)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("release", "5"),
        ("release", 5.0),
        ("release", True),
        ("release", 0),
        ("release", 2**53 + 1),
        ("bundle_size", "8192"),
        ("block_size", 5000),
        ("block_size", 4096 * 3),
        ("model", "Tiny"),
        ("model", ["tiny"]),
        ("version", "1.0"),
        ("version", 1),
        ("bundle_sha256", "AB" * 32),
        ("expires", 1_900_000_000),
        ("expires", "2030-01-01T00:00:00"),
        ("type", "keyring"),
        ("spec_version", 2),
    ],
)
def test_signed_descriptor_with_wrong_types(keys: Keys, field: str, value: object) -> None:
    """Validly signed, so the parse is what fails."""
    data = sign_descriptor([keys.release], **{field: value})
    exc = raises_exactly(FormatError, keys.state().verify_descriptor, data, NOW)
    assert field in str(exc)


def test_semver_with_trailing_newline_is_refused(keys: Keys) -> None:
    data = sign_descriptor([keys.release], version="1.0.0\n")
    raises_exactly(FormatError, keys.state().verify_descriptor, data, NOW, match="version")


def test_signed_descriptor_with_unknown_field(keys: Keys) -> None:
    data = sign_descriptor([keys.release], install_hook="rm -rf /")
    exc = raises_exactly(FormatError, keys.state().verify_descriptor, data, NOW)
    assert "install_hook" in str(exc)


def test_signed_descriptor_with_missing_field(keys: Keys) -> None:
    doc = descriptor_doc()
    del doc["manifest_sha256"]
    data = sign_payload(canonical(doc), [keys.release], DESCRIPTOR_TYPE)
    exc = raises_exactly(FormatError, keys.state().verify_descriptor, data, NOW)
    assert "manifest_sha256" in str(exc)


@pytest.mark.parametrize("payload", [b"[]", b"5", b"null", b'"descriptor"', b"", b"{}"])
def test_signed_descriptor_that_is_no_object(keys: Keys, payload: bytes) -> None:
    data = sign_payload(payload, [keys.release], DESCRIPTOR_TYPE)
    raises_exactly(FormatError, keys.state().verify_descriptor, data, NOW)


def test_duplicate_key_in_signed_payload(keys: Keys) -> None:
    """Two parsers could read ``release`` differently: 1 or 99. Refused however it is signed."""
    body = canonical(descriptor_doc(release=1))
    assert body.startswith(b"{")
    payload = b'{"release":99,' + body[1:]
    assert json.loads(payload)["release"] == 1  # what a lax parser would believe
    data = sign_payload(payload, [keys.release], DESCRIPTOR_TYPE)
    raises_exactly(
        FormatError, keys.state().verify_descriptor, data, NOW, match="duplicate key 'release'"
    )


def test_duplicate_key_in_envelope(keys: Keys) -> None:
    good = json.loads(sign_descriptor([keys.release]))
    evil = sign_descriptor([Signer.generate()])
    doc = json.loads(evil)
    # {"payload": <attacker's>, "payload": <good>, ...}: a lax parser keeps the last one.
    text = (
        f'{{"payload": "{doc["payload"]}", "payload": "{good["payload"]}", '
        f'"payloadType": "{DESCRIPTOR_TYPE}", "signatures": {json.dumps(good["signatures"])}}}'
    )
    assert json.loads(text)["payload"] == good["payload"]  # what a lax parser would take
    raises_exactly(
        FormatError,
        keys.state().verify_descriptor,
        text.encode(),
        NOW,
        match="duplicate key 'payload'",
    )


def test_unknown_field_in_envelope(keys: Keys) -> None:
    doc = json.loads(sign_descriptor([keys.release]))
    doc["comment"] = "hi"
    exc = raises_exactly(FormatError, keys.state().verify_descriptor, json.dumps(doc).encode(), NOW)
    assert "comment" in str(exc)


@pytest.mark.parametrize(
    ("field", "value"),
    [("threshold", "1"), ("threshold", 0), ("version", 0), ("release_keys", []), ("extra", 1)],
)
def test_signed_keyring_with_wrong_types(keys: Keys, field: str, value: object) -> None:
    doc = keys.store.current_keyring().model_dump(mode="json")
    doc[field] = value
    data = sign_payload(canonical(doc), root_signers(keys.store), KEYRING_TYPE)
    exc = raises_exactly(FormatError, keys.state().update_keyring, data, NOW)
    assert field in str(exc)


def test_keyring_key_id_not_matching_its_key(keys: Keys) -> None:
    """A release key listed under another key's id: refused, not trusted under either id."""
    other = Signer.generate()
    doc = keys.store.current_keyring().model_dump(mode="json")
    doc["version"] = 2
    doc["release_keys"] = {other.keyid: release_key(keys.release).model_dump(mode="json")}
    data = sign_payload(canonical(doc), root_signers(keys.store), KEYRING_TYPE)
    raises_exactly(FormatError, keys.state().update_keyring, data, NOW, match="does not match")


def test_root_threshold_above_key_count(keys: Keys) -> None:
    signers = fresh(2)
    doc = {
        "type": "root",
        "spec_version": 1,
        "version": 1,
        "expires": iso(NOW + DAY),
        "keys": {s.keyid: {"keytype": "ed25519", "public": s.public_raw.hex()} for s in signers},
        "threshold": 3,
    }
    data = sign_payload(canonical(doc), signers, ROOT_TYPE)
    raises_exactly(FormatError, TrustedState.from_root, data, match="threshold")


def test_revocation_survives_a_root_rotation_that_drops_the_keyring(keys: Keys) -> None:
    """Keyring v3 trusts R, v4 revokes it; a new root drops v4. v3 must not come back."""
    a, b, c = root_signers(keys.store)
    revoked = Signer.generate()
    v2 = make_keyring([a, b], version=2, release={revoked.keyid: release_key(revoked)})
    v3 = make_keyring([a, c], version=3, release={keys.release.keyid: release_key(keys.release)})
    state = keys.state().update_keyring(v2, NOW).update_keyring(v3, NOW)
    d = Signer.generate()
    # Root v2 keeps a and b and swaps c for d: keyring v3 (signed a, c) has one valid signature
    # left and is dropped, while the older v2 (signed a, b) would still carry two.
    root2 = make_root([a, b, d], version=2, keys=[a, b, d], threshold=2)
    state = state.update_root(root2)
    assert state.keyring is None
    assert state.keyring_floor == 3
    raises_exactly(RollbackError, state.update_keyring, v2, NOW, match="not newer than v3")
    v4 = make_keyring([a, b, d], version=4, release={keys.release.keyid: release_key(keys.release)})
    assert state.update_keyring(v4, NOW).keyring.version == 4  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "public",
    [
        "01" + "00" * 31,  # the identity point: (R = identity, S = 0) verifies any message
        "00" * 32,
        "ec" + "ff" * 30 + "7f",
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
        "01" + "00" * 30 + "80",  # the identity again, with the sign bit set
        "ee" + "ff" * 30 + "7f",  # p + 1: a non-canonical encoding of the identity
    ],
)
def test_small_order_and_non_canonical_keys_are_refused(public: str) -> None:
    from agent.trust.keys import is_weak_public_key, verify_ed25519

    raw = bytes.fromhex(public)
    assert is_weak_public_key(raw)
    forged = bytes.fromhex("01" + "00" * 31) + bytes(32)
    assert not verify_ed25519(raw, forged, b"any message")
    with pytest.raises(ValueError, match="small order or non-canonical"):
        PublicKey(public=public)


def test_a_real_key_is_not_weak() -> None:
    from agent.trust.keys import is_weak_public_key

    assert not any(is_weak_public_key(Signer.generate().public_raw) for _ in range(50))
