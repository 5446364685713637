"""``edge-fleet bundle sign``, ``reissue`` and ``verify``: descriptors, envelopes, and trust
loaded from files.

A rollback the fleet wants is a *re-issue* (after TUF and Uptane, where the anti-rollback
counter belongs to the signed metadata and the target's bytes stay pinned by hash): the
earlier bundle's descriptor, signed afresh by release keys under a new, higher ``release``,
with ``bundle_release`` naming the release its manifest was built with. The bytes do not change,
so a device that kept the earlier bundle (it keeps the last good one) fetches nothing, and its
release floor still only rises. Re-issuing takes a release key, as building a new bundle with
a higher ``--release`` does, and gives no power beyond that.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path

import pydantic

from agent._fsutil import atomic_write_bytes
from agent._strictjson import describe_validation_error, parse_model
from agent.bundle.blocks import digest_file
from agent.bundle.limits import BundleLimits
from agent.bundle.manifest import Manifest
from agent.bundle.reader import check_members, read_index
from agent.errors import (
    BadContentError,
    ConfigError,
    StorageError,
)
from agent.trust.envelope import Envelope, count_signatures, parse_envelope, sign_envelope
from agent.trust.keys import Signer
from agent.trust.metadata import (
    DESCRIPTOR_TYPE,
    MAX_METADATA_BYTES,
    BundleDescriptor,
    KeyringMetadata,
)
from agent.trust.verifier import TrustedState
from agent.verify import (
    ENVELOPE_SUFFIX,
    envelope_path,
)
from agent.verify import read_file as _read


def describe_bundle(
    bundle: Path, *, now: datetime, days: int, limits: BundleLimits | None = None
) -> BundleDescriptor:
    """Check that ``bundle`` agrees with its own manifest, then describe it for signing.

    A bundle whose members do not match the manifest is never signed.
    """
    try:
        with open(bundle, "rb") as f:
            index = read_index(f, limits)
            check_members(f, index)
            digests = digest_file(f, index.manifest.block_size)
    except OSError as exc:
        raise StorageError(f"cannot read {bundle}: {exc.strerror or exc}") from None
    m = index.manifest
    return BundleDescriptor(
        model=m.name,
        version=m.version,
        release=m.release,
        bundle_sha256=digests.sha256,
        bundle_size=digests.size,
        block_size=m.block_size,
        block_list_sha256=digests.block_list_sha256,
        manifest_sha256=index.manifest_sha256,
        created=now.replace(microsecond=0),
        expires=(now + timedelta(days=days)).replace(microsecond=0),
    )


def sign_bundle(
    bundle: Path,
    signers: Sequence[Signer],
    *,
    now: datetime,
    days: int = 90,
    out: Path | None = None,
    keep: Collection[str] | None = None,
) -> tuple[Path, Envelope]:
    """Sign ``bundle``'s descriptor; add to an existing envelope for the same bytes if there is one.

    Adding lets several holders of release keys sign one descriptor when the keyring's threshold
    is above one. ``keep``: the key ids whose signatures of the existing envelope stay (None: all
    of them); an envelope left with none is replaced by a fresh descriptor.
    """
    fresh = describe_bundle(bundle, now=now, days=days)
    return _sign(fresh, signers, Path(out) if out else envelope_path(bundle), keep)


def reissue_path(bundle: Path, release: int) -> Path:
    """Where ``bundle reissue`` writes by default: beside ``BUNDLE.dsse``, which is kept."""
    return Path(f"{bundle}.r{release}{ENVELOPE_SUFFIX}")


def reissue_bundle(
    bundle: Path,
    signers: Sequence[Signer],
    *,
    release: int,
    now: datetime,
    days: int = 90,
    out: Path | None = None,
) -> tuple[Path, Envelope]:
    """Re-issue ``bundle``'s descriptor under ``release``, described from the file's bytes as
    :func:`sign_bundle` describes it (a co-signer adds to an envelope on the same terms)."""
    fresh = reissued(
        describe_bundle(bundle, now=now, days=days), release=release, now=now, days=days
    )
    return _sign(fresh, signers, Path(out) if out else reissue_path(bundle, release))


def reissued(
    descriptor: BundleDescriptor, *, release: int, now: datetime, days: int
) -> BundleDescriptor:
    """``descriptor`` under a new, higher ``release``, with a new ``created`` and expiry.

    Everything that pins the bytes stays; ``bundle_release`` is the release the manifest says
    (the original descriptor's ``release``, or its ``bundle_release`` if it was a re-issue).
    """
    if release <= descriptor.release:
        raise ConfigError(
            f"release {release} is not above {descriptor.model} {descriptor.version}'s release "
            f"{descriptor.release}: a re-issue must raise it (above every release the devices "
            "have run, or they refuse it as a rollback)"
        )
    data = descriptor.model_dump()
    data.update(
        release=release,
        bundle_release=descriptor.manifest_release,
        created=now.replace(microsecond=0),
        expires=(now + timedelta(days=days)).replace(microsecond=0),
    )
    try:
        return BundleDescriptor.model_validate(data)
    except pydantic.ValidationError as exc:
        raise ConfigError(
            f"the re-issued descriptor would be invalid: {describe_validation_error(exc)}"
        ) from None


def reissue_descriptor(
    descriptor: BundleDescriptor,
    signers: Sequence[Signer],
    *,
    release: int,
    now: datetime,
    days: int,
) -> bytes:
    """The envelope of ``descriptor`` re-issued under ``release`` (:func:`reissued`), signed by
    ``signers``. Pure: bytes out, nothing written.

    Sign only a descriptor the fleet has reason to trust: one read back from a document it
    published is checked first with :func:`descriptor_to_reissue`.
    """
    if not signers:
        raise ConfigError("give at least one release key")
    fresh = reissued(descriptor, release=release, now=now, days=days)
    return sign_envelope(DESCRIPTOR_TYPE, fresh.to_payload(), signers).to_bytes()


def descriptor_to_reissue(envelope: bytes, trust: TrustedState, now: datetime) -> BundleDescriptor:
    """The descriptor in an earlier envelope, once its signatures hold against ``trust`` now.

    ``envelope`` is its bytes; a deployment's embedded one is read as the device reads it,
    ``json.dumps(entry.descriptor).encode()``.

    Its own expiry is not checked: a rollback may come long after the descriptor expired, and
    what a re-issue keeps of it (the hashes that pin the bundle, its block list and manifest)
    does not go stale. What is checked is that release keys the fleet trusts today signed it,
    at the keyring's threshold and allowed for its model
    (:meth:`~agent.trust.verifier.TrustedState.descriptor_once_signed`). Without that, whoever
    can write the documents the fleet reads back (the broker) would have the fleet sign any
    bundle hash under a fresh release. A descriptor whose keys have since been revoked or have
    expired is refused: re-issue it from the bundle file instead (``edge-fleet bundle reissue``,
    which describes the bytes it holds).
    """
    return trust.descriptor_once_signed(envelope, now)


def _sign(
    fresh: BundleDescriptor,
    signers: Sequence[Signer],
    out: Path,
    keep: Collection[str] | None = None,
) -> tuple[Path, Envelope]:
    """Write ``fresh``'s envelope to ``out``, or add ``signers`` to the one there on its terms
    (keeping the signatures of ``keep``: see :func:`sign_bundle`)."""
    if not signers:
        raise ConfigError("give at least one --key")
    existing = _existing(out, fresh, keep)
    if existing is None:
        envelope = sign_envelope(DESCRIPTOR_TYPE, fresh.to_payload(), signers)
    else:
        added = sign_envelope(DESCRIPTOR_TYPE, existing.payload, signers).signatures
        have = {s.keyid for s in existing.signatures}
        envelope = Envelope(
            existing.payload_type,
            existing.payload,
            existing.signatures + tuple(s for s in added if s.keyid not in have),
        )
    atomic_write_bytes(out, envelope.to_bytes())
    return out, envelope


def _read_descriptor(path: Path) -> tuple[bytes, Envelope, BundleDescriptor]:
    """The descriptor envelope at ``path``, parsed (not verified); ConfigError for another file."""
    data = _read(path, "signature envelope")
    try:
        envelope = parse_envelope(data)
        descriptor = parse_model(
            BundleDescriptor, envelope.payload, what="descriptor", max_bytes=MAX_METADATA_BYTES
        )
    except BadContentError as exc:
        raise ConfigError(
            f"{path} exists and is not a descriptor envelope ({exc}); move it"
        ) from None
    if envelope.payload_type != DESCRIPTOR_TYPE:
        raise ConfigError(f"{path} exists and is not a descriptor envelope; move it")
    return data, envelope, descriptor


def _existing(path: Path, fresh: BundleDescriptor, keep: Collection[str] | None) -> Envelope | None:
    """The envelope at ``path`` if it describes these bytes on these terms (to add a signature).

    A co-signer vouches for the whole payload, so every field must be what this signer would have
    signed, except ``created``; ``expires`` may be earlier, never later. An envelope for other
    bytes (an earlier build) is replaced; a file that is not a descriptor envelope, or one that
    asks for a later expiry, is refused and left as it is.
    """
    if not path.exists():
        return None
    _, envelope, old = _read_descriptor(path)
    same_terms = old.model_copy(update={"created": fresh.created, "expires": fresh.expires})
    if same_terms != fresh:
        return None  # another bundle, or another build of it: sign afresh
    if keep is not None:
        envelope = replace(
            envelope, signatures=tuple(s for s in envelope.signatures if s.keyid in keep)
        )
        if not envelope.signatures:
            return None  # nobody vouches for these terms any more: sign afresh
    if old.expires > fresh.expires:
        raise ConfigError(
            f"{path} asks for a signature until {old.expires:%Y-%m-%d}, later than --days allows "
            f"({fresh.expires:%Y-%m-%d}); check it, or sign afresh with -o"
        )
    return envelope


def check_signers(
    signers: Sequence[Signer], keyring: KeyringMetadata, model: str, now: datetime
) -> None:
    """ConfigError unless each of ``signers`` is a release key of ``keyring`` that may sign
    ``model`` now: a device refuses what any other key signs."""
    for signer in signers:
        key = keyring.release_keys.get(signer.keyid)
        if key is None:
            raise ConfigError(
                f"release key {signer.keyid[:16]} is not in keyring v{keyring.version} (revoked, "
                "or never added): use a key it lists ('edge-fleet keys show')"
            )
        if key.expires <= now:
            raise ConfigError(
                f"release key {signer.keyid[:16]} expired at {key.expires:%Y-%m-%d %H:%M}Z"
            )
        if not key.may_sign(model):
            raise ConfigError(
                f"release key {signer.keyid[:16]} may not sign model {model!r} "
                f"(it signs {', '.join(key.models)})"
            )


def signed_for(
    bundle: Path, signers: Sequence[Signer], trust: TrustedState, *, now: datetime
) -> tuple[bytes, str | None]:
    """``bundle``'s descriptor envelope as ``trust`` accepts it, signed by ``signers`` where it
    must be: what ``edge-fleet deploy`` puts in a deployment that ``signers`` sign.

    No envelope yet: one is signed. An envelope whose signatures no longer reach the keyring's
    threshold (its keys rotated away, revoked or expired) would be refused by every device
    (``untrusted-key``), so it is signed again. The signatures that no longer count are dropped:
    a revoked key's signature counts for no device, and left in place it would read as if that
    key still vouched for the release. Those that still count stay, and ``signers`` add theirs;
    none left: a fresh descriptor, made from the bundle itself, since nobody trusted now vouches
    for the old one. Returns the envelope, and a line that says why when it was signed again.
    """
    keyring = trust.keyring
    if keyring is None:
        raise ConfigError("the fleet's trust holds no keyring")
    path = envelope_path(bundle)
    counted: frozenset[str] = frozenset()
    dropped: list[str] | None = None  # None: there was no envelope
    if path.exists():
        data, envelope, descriptor = _read_descriptor(path)
        keys = {
            k: raw
            for k, raw in keyring.usable_keys(now).items()
            if keyring.release_keys[k].may_sign(descriptor.model)
        }
        counted = count_signatures(envelope, keys).valid
        if len(counted) >= keyring.threshold:
            check_signers(signers, keyring, descriptor.model, now)
            trust.verify_descriptor(data, now)
            return data, None
        dropped = sorted({s.keyid for s in envelope.signatures} - counted)
    model = _manifest(bundle).name
    check_signers(signers, keyring, model, now)
    adding = {s.keyid for s in signers} - counted
    if len(counted) + len(adding) < keyring.threshold:
        raise ConfigError(
            f"{path.name}: keyring v{keyring.version} asks for {keyring.threshold} release "
            f"signatures; {len(counted)} of its own still count and --key adds {len(adding)}: "
            "give more --key"
        )
    _, envelope = sign_bundle(bundle, signers, now=now, keep=counted)
    data = envelope.to_bytes()
    trust.verify_descriptor(data, now)
    if dropped is None:
        return data, None  # signed for the first time, as deploy always did
    note = (
        f"{path.name}: its signatures do not satisfy keyring v{keyring.version} (threshold "
        f"{keyring.threshold}); signed again with {', '.join(k[:16] for k in sorted(adding))}"
    )
    if dropped:
        note += (
            f", dropped {len(dropped)} that no longer count ({', '.join(k[:16] for k in dropped)})"
        )
    if counted:
        note += f", kept {len(counted)} that still count"
    return data, note


def _manifest(bundle: Path) -> Manifest:
    try:
        with open(bundle, "rb") as f:
            return read_index(f).manifest
    except OSError as exc:
        raise StorageError(f"cannot read {bundle}: {exc.strerror or exc}") from None
