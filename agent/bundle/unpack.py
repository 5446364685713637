"""Safe unpack: every check before the first write, every write inside a fresh temp directory.

The index is read and checked in full (names, types, sizes, caps, manifest digest) before any
file is created. Members are then copied into a new temp directory beside the target, each hashed
on the way and compared with the manifest; only when all of them match is the temp directory
renamed to the target. On any failure the temp directory is removed and the target is never
created, so nothing is written outside it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from agent._failpoints import failpoint
from agent._fsutil import fsync_dir
from agent.bundle.archive import copy_range
from agent.bundle.limits import BundleLimits
from agent.bundle.manifest import MANIFEST_NAME, Manifest
from agent.bundle.reader import read_index
from agent.errors import DigestMismatchError, StorageError

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)


def unpack_bundle(
    bundle: Path, dest: Path, *, manifest_sha256: str, limits: BundleLimits | None = None
) -> Manifest:
    """Unpack ``bundle`` into the new directory ``dest`` and return its manifest.

    ``manifest_sha256`` is the signed digest of the manifest (from a verified descriptor).
    """
    dest = Path(dest)
    if dest.exists() or dest.is_symlink():
        raise StorageError(f"{dest} already exists")
    try:
        with open(bundle, "rb") as f:
            index = read_index(f, limits, manifest_sha256=manifest_sha256)
            tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".unpack", dir=dest.parent))
            try:
                expected = index.manifest.files()
                dirs = {tmp}
                for name, member in sorted(index.members.items(), key=lambda kv: kv[1].offset):
                    target = tmp / name
                    for parent in reversed(target.relative_to(tmp).parents[:-1]):
                        d = tmp / parent
                        if d not in dirs:
                            os.mkdir(d, 0o755)
                            dirs.add(d)
                    digest = hashlib.sha256()
                    with os.fdopen(os.open(target, _CREATE, 0o644), "wb") as out:
                        copy_range(f, member.offset, member.size, out.write, digest.update)
                        out.flush()
                        os.fsync(out.fileno())
                    if digest.hexdigest() != expected[name].sha256:
                        raise DigestMismatchError(
                            f"member {name!r} does not match the SHA-256 its manifest signs"
                        )
                    failpoint("unpacking")
                with os.fdopen(os.open(tmp / MANIFEST_NAME, _CREATE, 0o644), "wb") as out:
                    out.write(index.manifest_bytes)
                    out.flush()
                    os.fsync(out.fileno())
                for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
                    fsync_dir(d)
                os.rename(tmp, dest)
                fsync_dir(dest.parent)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    except OSError as exc:
        raise StorageError(f"cannot unpack {bundle} into {dest}: {exc.strerror or exc}") from None
    return index.manifest
