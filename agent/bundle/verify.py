"""Checking a bundle file against a signed descriptor, and the whole verification in one call."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from agent.bundle.blocks import digest_file
from agent.bundle.limits import BundleLimits
from agent.bundle.reader import BundleIndex, check_members, file_size, read_index
from agent.errors import BadContentError, DigestMismatchError, SizeLimitError, StorageError
from agent.trust.metadata import BundleDescriptor
from agent.trust.verifier import TrustedState


@dataclass(frozen=True)
class VerifiedBundle:
    path: Path
    descriptor: BundleDescriptor
    signers: frozenset[str]
    index: BundleIndex


def _diagnose(path: Path, descriptor: BundleDescriptor, limits: BundleLimits) -> str:
    """Say which part of a bundle differs, for a person reading the error."""
    try:
        with open(path, "rb") as f:
            index = read_index(f, limits)
            if index.manifest_sha256 != descriptor.manifest_sha256:
                return "manifest.json differs from the signed manifest"
            check_members(f, index)
    except BadContentError as exc:
        return str(exc)
    except OSError:
        return "the file cannot be read"
    return "the archive's padding or headers were altered"


def check_bundle_file(
    path: Path, descriptor: BundleDescriptor, limits: BundleLimits | None = None
) -> BundleIndex:
    """Check the bytes of ``path`` against ``descriptor``: size, SHA-256, block list, manifest."""
    limits = limits or BundleLimits()
    path = Path(path)
    if descriptor.bundle_size > limits.max_bundle_bytes:
        raise SizeLimitError(
            f"the descriptor signs {descriptor.bundle_size} bytes; the limit is {limits.max_bundle_bytes}"
        )
    try:
        # Unbuffered: the hashing reads whole chunks, and a buffer would only add a copy.
        with open(path, "rb", buffering=0) as f:
            size = file_size(f)
            if size != descriptor.bundle_size:
                raise DigestMismatchError(
                    f"bundle is {size} bytes; the descriptor signs {descriptor.bundle_size}"
                )
            digests = digest_file(f, descriptor.block_size, limit=descriptor.bundle_size)
            if (
                digests.sha256 != descriptor.bundle_sha256
                or digests.block_list_sha256 != descriptor.block_list_sha256
            ):
                raise DigestMismatchError(
                    f"bundle SHA-256 {digests.sha256[:16]}... is not the signed "
                    f"{descriptor.bundle_sha256[:16]}...: {_diagnose(path, descriptor, limits)}"
                )
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror or exc}") from None
    return check_bundle_structure(path, descriptor, limits)


def check_bundle_structure(
    path: Path, descriptor: BundleDescriptor, limits: BundleLimits | None = None
) -> BundleIndex:
    """Read the archive's index and compare its manifest with what the descriptor signs.

    For a file whose bytes are known to be the signed ones already (every block checked against
    the signed block-hash list on arrival), this is the rest of :func:`check_bundle_file`.
    """
    limits = limits or BundleLimits()
    try:
        with open(path, "rb") as f:
            index = read_index(f, limits)
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror or exc}") from None
    manifest = index.manifest
    if index.manifest_sha256 != descriptor.manifest_sha256:
        raise DigestMismatchError("manifest.json differs from the signed manifest")
    signed = (descriptor.model, descriptor.version, descriptor.release, descriptor.block_size)
    found = (manifest.name, manifest.version, manifest.release, manifest.block_size)
    if signed != found:
        raise DigestMismatchError(f"the manifest says {found}, the descriptor signs {signed}")
    return index


def verify_bundle(
    path: Path,
    envelope: bytes,
    state: TrustedState,
    now: datetime,
    limits: BundleLimits | None = None,
) -> VerifiedBundle:
    """Verify the descriptor envelope, then the bundle file against it."""
    verified = state.verify_descriptor(envelope, now)
    index = check_bundle_file(path, verified.descriptor, limits)
    return VerifiedBundle(
        path=Path(path), descriptor=verified.descriptor, signers=verified.signers, index=index
    )
