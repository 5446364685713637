"""Checking a bundle file against what a signed descriptor vouches for.

:func:`check_bundle` is the one check a bundle passes before anything installs or serves it:
the device's agent (before it stores a download), ``edge-fleet bundle verify`` and ``edge-agent
serve`` all call it, so an operator's "verified" means what a device means. It checks

1. the bytes: size, SHA-256 and block list against the descriptor (skipped where every block was
   already checked against the signed block list as it arrived);
2. the structure: the archive's index, and its manifest against the one the descriptor signs;
3. the members: each one hashed and compared with the SHA-256 its manifest entry lists.

The descriptor is anything with the fields of :class:`Vouched` (the trust core's
``BundleDescriptor`` is one); checking its signatures is the trust core's job, and the two
meet in :mod:`agent.verify`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from agent.bundle.blocks import digest_file
from agent.bundle.limits import BundleLimits
from agent.bundle.reader import BundleIndex, check_members, file_size, read_index
from agent.errors import BadContentError, DigestMismatchError, SizeLimitError, StorageError


class Vouched(Protocol):
    """What a signed bundle descriptor vouches for, as far as the bytes are concerned."""

    @property
    def model(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def manifest_release(self) -> int: ...
    @property
    def bundle_sha256(self) -> str: ...
    @property
    def bundle_size(self) -> int: ...
    @property
    def block_size(self) -> int: ...
    @property
    def block_list_sha256(self) -> str: ...
    @property
    def manifest_sha256(self) -> str: ...


def _diagnose(path: Path, descriptor: Vouched, limits: BundleLimits) -> str:
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


def check_bundle(
    path: Path,
    descriptor: Vouched,
    limits: BundleLimits | None = None,
    *,
    bytes_checked: bool = False,
) -> BundleIndex:
    """Every check of the module docstring, in order; ``bytes_checked`` skips the first (a
    download whose blocks were each checked on arrival against the signed block list)."""
    index = (
        check_bundle_structure(path, descriptor, limits)
        if bytes_checked
        else check_bundle_bytes(path, descriptor, limits)
    )
    try:
        with open(path, "rb") as f:
            check_members(f, index)
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror or exc}") from None
    return index


def check_bundle_file(
    path: Path, descriptor: Vouched, limits: BundleLimits | None = None
) -> BundleIndex:
    """:func:`check_bundle` of a file whose bytes are not known yet."""
    return check_bundle(path, descriptor, limits)


def check_bundle_bytes(
    path: Path, descriptor: Vouched, limits: BundleLimits | None = None
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
    path: Path, descriptor: Vouched, limits: BundleLimits | None = None
) -> BundleIndex:
    """Read the archive's index and compare its manifest with what the descriptor signs."""
    limits = limits or BundleLimits()
    try:
        with open(path, "rb") as f:
            index = read_index(f, limits)
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror or exc}") from None
    check_index(index, descriptor)
    return index


def check_index(index: BundleIndex, descriptor: Vouched) -> None:
    """An archive's index, read before, against what a descriptor signs: the manifest's digest,
    then its name, version, release and block size (no disk: for bytes checked already)."""
    manifest = index.manifest
    if index.manifest_sha256 != descriptor.manifest_sha256:
        raise DigestMismatchError("manifest.json differs from the signed manifest")
    # A re-issued descriptor signs a higher release than the manifest's; it names the
    # manifest's in ``bundle_release`` (agent.trust.metadata).
    signed = (
        descriptor.model,
        descriptor.version,
        descriptor.manifest_release,
        descriptor.block_size,
    )
    found = (manifest.name, manifest.version, manifest.release, manifest.block_size)
    if signed != found:
        raise DigestMismatchError(
            "the manifest says (name, version, release, block size) "
            f"{found}, the descriptor signs {signed}"
        )
