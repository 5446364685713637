"""Reading a bundle's table of contents: the manifest and where each member lies."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import BinaryIO

from agent.bundle.archive import MemberInfo, copy_range, iter_members
from agent.bundle.limits import BundleLimits
from agent.bundle.manifest import MANIFEST_NAME, Manifest
from agent.errors import (
    ArchiveError,
    DigestMismatchError,
    DuplicateMemberError,
    MemberSizeError,
    SizeLimitError,
)


@dataclass(frozen=True)
class BundleIndex:
    manifest: Manifest
    manifest_bytes: bytes
    manifest_sha256: str
    members: Mapping[str, MemberInfo]
    file_size: int


def file_size(f: BinaryIO) -> int:
    try:
        return os.fstat(f.fileno()).st_size
    except (AttributeError, OSError):
        return f.seek(0, os.SEEK_END)


def read_index(
    f: BinaryIO, limits: BundleLimits | None = None, *, manifest_sha256: str | None = None
) -> BundleIndex:
    """Walk the archive's headers and check them against the manifest; read no member data.

    With ``manifest_sha256`` (the signed digest), the manifest's bytes are compared with it
    before they are parsed: verify, then parse.

    Refuses: a file over the bundle cap; a first member other than ``manifest.json``; unsafe
    names or member types; duplicates; members the manifest does not list, or whose size differs
    from the size it lists; members it lists that are missing; totals over the caps.
    """
    limits = limits or BundleLimits()
    size = file_size(f)
    if size > limits.max_bundle_bytes:
        raise SizeLimitError(f"bundle is {size} bytes; the limit is {limits.max_bundle_bytes}")
    members = iter_members(
        f,
        size,
        max_members=limits.max_members,
        max_member_bytes=limits.max_member_bytes,
        max_pax_bytes=limits.max_pax_header_bytes,
    )
    first = next(members, None)
    if first is None:
        raise ArchiveError("the bundle holds no members")
    if first.name != MANIFEST_NAME:
        raise ArchiveError(f"the first member must be {MANIFEST_NAME}, not {first.name!r}")
    if first.size > limits.max_manifest_bytes:
        raise SizeLimitError(
            f"{MANIFEST_NAME} is {first.size} bytes; the limit is {limits.max_manifest_bytes}"
        )
    f.seek(first.offset)
    manifest_bytes = f.read(first.size)
    if len(manifest_bytes) != first.size:
        raise ArchiveError(f"the bundle is truncated inside {MANIFEST_NAME}")
    digest = hashlib.sha256(manifest_bytes).hexdigest()
    if manifest_sha256 is not None and digest != manifest_sha256:
        raise DigestMismatchError(
            f"{MANIFEST_NAME} has SHA-256 {digest[:16]}..., the signed one is {manifest_sha256[:16]}..."
        )
    manifest = Manifest.from_bytes(manifest_bytes, max_bytes=limits.max_manifest_bytes)
    expected = manifest.files()
    _check_caps(manifest, limits)

    found: dict[str, MemberInfo] = {}
    for member in members:
        if member.name in found or member.name == MANIFEST_NAME:
            raise DuplicateMemberError(f"member {member.name!r} appears twice")
        entry = expected.get(member.name)
        if entry is None:
            raise ArchiveError(f"member {member.name!r} is not listed in the manifest")
        if member.size != entry.size:
            raise MemberSizeError(
                f"member {member.name!r} is {member.size} bytes; the manifest signs {entry.size}"
            )
        if member.offset + member.size > size:
            raise ArchiveError(f"the bundle is truncated inside {member.name!r}")
        found[member.name] = member
    missing = sorted(set(expected) - set(found))
    if missing:
        raise ArchiveError(f"members listed in the manifest are missing: {', '.join(missing)}")
    return BundleIndex(
        manifest=manifest,
        manifest_bytes=manifest_bytes,
        manifest_sha256=digest,
        members=found,
        file_size=size,
    )


def check_members(f: BinaryIO, index: BundleIndex) -> None:
    """Hash every member and compare it with the SHA-256 its manifest entry lists."""
    files = index.manifest.files()
    for name, member in index.members.items():
        digest = hashlib.sha256()
        copy_range(f, member.offset, member.size, digest.update)
        if digest.hexdigest() != files[name].sha256:
            raise DigestMismatchError(f"member {name!r} differs from its manifest entry")


def _check_caps(manifest: Manifest, limits: BundleLimits) -> None:
    files = manifest.files()
    if len(files) + 1 > limits.max_members:
        raise SizeLimitError(
            f"the manifest lists {len(files)} files; the limit is {limits.max_members}"
        )
    for entry in files.values():
        if entry.size > limits.max_member_bytes:
            raise SizeLimitError(
                f"{entry.path!r} is {entry.size} bytes; the limit is {limits.max_member_bytes}"
            )
    total = manifest.total_size()
    if total > limits.max_unpacked_bytes:
        raise SizeLimitError(
            f"the bundle unpacks to {total} bytes; the limit is {limits.max_unpacked_bytes}"
        )
