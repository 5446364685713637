"""``edge-fleet bundle sign`` and ``verify``: descriptors, envelopes, and trust loaded from files."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path

from agent._fsutil import atomic_write_bytes
from agent._strictjson import parse_model
from agent.bundle.blocks import digest_file
from agent.bundle.limits import BundleLimits
from agent.bundle.reader import check_members, read_index
from agent.bundle.verify import VerifiedBundle, verify_bundle
from agent.errors import (
    BadContentError,
    ConfigError,
    RollbackError,
    StorageError,
)
from agent.fleet.keys import KEYRING_FILE, ROOT_FILE
from agent.trust.envelope import Envelope, parse_envelope, sign_envelope
from agent.trust.keys import Signer
from agent.trust.metadata import (
    DESCRIPTOR_TYPE,
    KEYRING_TYPE,
    MAX_METADATA_BYTES,
    ROOT_TYPE,
    BundleDescriptor,
)
from agent.trust.verifier import TrustedState

ENVELOPE_SUFFIX = ".dsse"


def envelope_path(bundle: Path) -> Path:
    return Path(f"{bundle}{ENVELOPE_SUFFIX}")


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
) -> tuple[Path, Envelope]:
    """Sign ``bundle``'s descriptor; add to an existing envelope for the same bytes if there is one.

    Adding lets several holders of release keys sign one descriptor when the keyring's threshold
    is above one.
    """
    if not signers:
        raise ConfigError("give at least one --key")
    out = Path(out) if out else envelope_path(bundle)
    fresh = describe_bundle(bundle, now=now, days=days)
    existing = _existing(out, fresh)
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


def _existing(path: Path, fresh: BundleDescriptor) -> Envelope | None:
    """The envelope at ``path`` if it describes these bytes on these terms (to add a signature).

    A co-signer vouches for the whole payload, so every field must be what this signer would have
    signed, except ``created``; ``expires`` may be earlier, never later. An envelope for other
    bytes (an earlier build) is replaced; a file that is not a descriptor envelope, or one that
    asks for a later expiry, is refused and left as it is.
    """
    if not path.exists():
        return None
    try:
        envelope = parse_envelope(_read(path, "signature envelope"))
        old = parse_model(
            BundleDescriptor, envelope.payload, what="descriptor", max_bytes=MAX_METADATA_BYTES
        )
    except BadContentError as exc:
        raise ConfigError(
            f"{path} exists and is not a descriptor envelope ({exc}); move it"
        ) from None
    if envelope.payload_type != DESCRIPTOR_TYPE:
        raise ConfigError(f"{path} exists and is not a descriptor envelope; move it")
    same_terms = old.model_copy(update={"created": fresh.created, "expires": fresh.expires})
    if same_terms != fresh:
        return None  # another bundle, or another build of it: sign afresh
    if old.expires > fresh.expires:
        raise ConfigError(
            f"{path} asks for a signature until {old.expires:%Y-%m-%d}, later than --days allows "
            f"({fresh.expires:%Y-%m-%d}); check it, or sign afresh with -o"
        )
    return envelope


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise StorageError(f"cannot read {what} {path}: {exc.strerror}") from None


def load_trust(trust: Path, now: datetime, *, keyring: Path | None = None) -> TrustedState:
    """Trust from a key directory, a root file or a keyring file.

    A root file's keyring is ``keyring.json`` beside it unless ``keyring`` names one; a keyring
    file's root is ``root.json`` beside it. The root given is trusted as it is (pinned).
    """
    trust = Path(trust)
    if trust.is_dir():
        root_path, keyring_path = trust / ROOT_FILE, keyring or trust / KEYRING_FILE
    else:
        kind = parse_envelope(_read(trust, "trust file")).payload_type
        if kind == ROOT_TYPE:
            root_path, keyring_path = trust, keyring or trust.parent / KEYRING_FILE
        elif kind == KEYRING_TYPE:
            root_path, keyring_path = trust.parent / ROOT_FILE, trust
        else:
            raise ConfigError(f"{trust} is neither a root nor a keyring (payload type {kind})")
    for path, what in ((root_path, "root"), (keyring_path, "keyring")):
        if not path.exists():
            raise ConfigError(f"no {what} at {path}")
    state = TrustedState.from_root(_read(root_path, "root"))
    return state.update_keyring(_read(keyring_path, "keyring"), now)


def verify_file(
    bundle: Path,
    trust: Path,
    *,
    now: datetime,
    envelope: Path | None = None,
    keyring: Path | None = None,
    min_release: int = 0,
) -> VerifiedBundle:
    """Verify ``bundle`` and its envelope; ``min_release`` plays the device's release floor."""
    state = load_trust(trust, now, keyring=keyring)
    data = _read(envelope or envelope_path(bundle), "signature envelope")
    verified = verify_bundle(Path(bundle), data, state, now)
    if verified.descriptor.release < min_release:
        raise RollbackError(
            f"{verified.descriptor.model} release {verified.descriptor.release} is older than "
            f"release {min_release}"
        )
    return verified
