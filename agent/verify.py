"""The whole verification of a bundle in one call: the trust core's verdict on its descriptor,
then the bundle's bytes against it; and trust loaded from files for it.

This is where :mod:`agent.trust` (signatures, keys, expiry) and :mod:`agent.bundle` (the bytes)
meet; neither imports the other. ``edge-fleet bundle verify`` and ``edge-agent serve`` call
:func:`verify_file`, the device's agent runs the same checks on what it downloads.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from agent.bundle.limits import BundleLimits
from agent.bundle.reader import BundleIndex
from agent.bundle.verify import check_bundle_file
from agent.errors import ConfigError, RollbackError, StorageError
from agent.trust.envelope import parse_envelope
from agent.trust.metadata import KEYRING_TYPE, ROOT_TYPE, BundleDescriptor
from agent.trust.verifier import TrustedState

__all__ = [
    "ENVELOPE_SUFFIX",
    "KEYRING_FILE",
    "ROOT_FILE",
    "VerifiedBundle",
    "envelope_path",
    "load_trust",
    "verify_bundle",
    "verify_file",
]

ROOT_FILE = "root.json"
KEYRING_FILE = "keyring.json"
ENVELOPE_SUFFIX = ".dsse"


@dataclass(frozen=True)
class VerifiedBundle:
    path: Path
    descriptor: BundleDescriptor
    signers: frozenset[str]
    index: BundleIndex


def envelope_path(bundle: Path) -> Path:
    """Where a bundle's descriptor envelope lies: beside it, with ``.dsse`` appended."""
    return Path(f"{bundle}{ENVELOPE_SUFFIX}")


def verify_bundle(
    path: Path,
    envelope: bytes,
    state: TrustedState,
    now: datetime,
    limits: BundleLimits | None = None,
) -> VerifiedBundle:
    """Verify the descriptor envelope, then the bundle file against it
    (:func:`agent.bundle.verify.check_bundle`)."""
    verified = state.verify_descriptor(envelope, now)
    index = check_bundle_file(path, verified.descriptor, limits)
    return VerifiedBundle(
        path=Path(path), descriptor=verified.descriptor, signers=verified.signers, index=index
    )


def read_file(path: Path, what: str) -> bytes:
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
        kind = parse_envelope(read_file(trust, "trust file")).payload_type
        if kind == ROOT_TYPE:
            root_path, keyring_path = trust, keyring or trust.parent / KEYRING_FILE
        elif kind == KEYRING_TYPE:
            root_path, keyring_path = trust.parent / ROOT_FILE, trust
        else:
            raise ConfigError(f"{trust} is neither a root nor a keyring (payload type {kind})")
    for path, what in ((root_path, "root"), (keyring_path, "keyring")):
        if not path.exists():
            raise ConfigError(f"no {what} at {path}")
    state = TrustedState.from_root(read_file(root_path, "root"))
    return state.update_keyring(read_file(keyring_path, "keyring"), now)


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
    data = read_file(envelope or envelope_path(bundle), "signature envelope")
    verified = verify_bundle(Path(bundle), data, state, now)
    if verified.descriptor.release < min_release:
        raise RollbackError(
            f"{verified.descriptor.model} release {verified.descriptor.release} is older than "
            f"release {min_release}"
        )
    return verified
