"""A bundle being downloaded, on disk: ``downloads/{sha256}/`` of the state directory.

::

    blocklist      the verified block-hash list (written once, atomically)
    bundle.part    the bundle, sparse until complete (its full size from the start)
    bitmap         one bit per block that is written and verified (bits only ever go 0 -> 1)

The bitmap is written in place, after the blocks it marks, and synced to disk (the data first)
only when :meth:`PartFile.sync` is called: when the transfer pauses or is finished. That is safe
without a temporary file and a rename because a bitmap is a claim, never proof: on a resume
every block it marks is read back and checked against the signed block list before it counts
(:meth:`PartFile.resume`). A torn or stale bitmap, or one that reached the disk before its data
(a power cut), costs a refetch of those blocks, never a bad bundle; one of the wrong length is
ignored, and one whose part file is gone is removed.

Which blocks are in, and when the bitmap is due, is the transfer's to decide
(:class:`agent.transport.fetch.BlockFetch`); this class holds the files.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from agent._fsutil import atomic_write_bytes, fsync_dir, read_if_exists
from agent.bundle.blocks import DIGEST, LocalBlock
from agent.errors import DiskFullError, StorageError

log = logging.getLogger("agent.transport.transfer")  # the transfer's messages, one name


class PartFile:
    """The files of one download: the block list, the part file and its bitmap."""

    def __init__(self, directory: Path, *, size: int, block_size: int) -> None:
        self.dir = Path(directory)
        self.size = size
        self.block_size = block_size
        self.count = -(-size // block_size)
        self._block_list = b""
        self._fd: int | None = None
        self._bitmap_fd: int | None = None

    @property
    def part_path(self) -> Path:
        return self.dir / "bundle.part"

    @property
    def bitmap_path(self) -> Path:
        return self.dir / "bitmap"

    @property
    def block_list_path(self) -> Path:
        return self.dir / "blocklist"

    @property
    def is_open(self) -> bool:
        return self._fd is not None and self._bitmap_fd is not None

    def _length(self, i: int) -> int:
        return min(self.block_size, self.size - i * self.block_size)

    def _checks_out(self, i: int, data: bytes) -> bool:
        return hashlib.sha256(data).digest() == self._block_list[i * DIGEST : (i + 1) * DIGEST]

    # -- the block list -------------------------------------------------------------------------
    def make_dir(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create {self.dir}: {exc.strerror}") from None

    def read_block_list(self) -> bytes | None:
        """The block list an earlier run stored (the caller checks it), or None."""
        return read_if_exists(self.block_list_path)

    def save_block_list(self, block_list: bytes) -> None:
        atomic_write_bytes(self.block_list_path, block_list, 0o600)

    # -- the part file and its bitmap -----------------------------------------------------------
    def open(self, block_list: bytes, *, reserve_mb: int) -> None:
        """Open (or create, at the bundle's full size) the part file and its bitmap.

        A new part file needs free disk for the whole bundle, the unpacked copy, and
        ``reserve_mb`` more: checked before block one. ``block_list`` (verified) is what blocks
        read back or copied in are checked against.
        """
        self._block_list = block_list
        try:
            if not self.part_path.exists():
                self._check_disk(reserve_mb)
                # A bitmap without its file marks nothing that is on disk.
                self.bitmap_path.unlink(missing_ok=True)
            self._fd = os.open(self.part_path, os.O_RDWR | os.O_CREAT, 0o600)
            if os.fstat(self._fd).st_size != self.size:
                os.ftruncate(self._fd, self.size)
            self._bitmap_fd = os.open(self.bitmap_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StorageError(f"cannot create {self.part_path}: {exc.strerror}") from None

    def _check_disk(self, reserve_mb: int) -> None:
        free = shutil.disk_usage(self.dir).free
        need = 2 * self.size + reserve_mb * (1 << 20)
        if free < need:
            raise DiskFullError(
                f"{free >> 20} MiB free in {self.dir}; the bundle needs {need >> 20} MiB "
                f"(twice its {self.size >> 20} MiB, plus a {reserve_mb} MiB reserve)"
            )

    def resume(self, found: Callable[[int], object]) -> int | None:
        """Read back every block the saved bitmap marks and check it against the block list:
        ``found(i)`` for each that checks out, one by one (a bundle of many GiB takes minutes).

        Returns how many marked blocks did not check out (their bits are not to be trusted:
        the bitmap is to be written again), or None when there is no bitmap to go by.
        """
        assert self._fd is not None, "open() first"
        data = read_if_exists(self.bitmap_path)
        if data is None:
            return None
        if len(data) != -(-self.count // 8):
            if data:
                log.warning("ignoring a bitmap of the wrong length in %s", self.dir)
            return None
        lost = 0
        for i in range(self.count):
            if not data[i >> 3] & (1 << (i & 7)):
                continue
            try:
                block = os.pread(self._fd, self._length(i), i * self.block_size)
            except OSError as exc:
                raise StorageError(f"cannot read {self.part_path}: {exc.strerror}") from None
            if self._checks_out(i, block):
                found(i)
            else:
                lost += 1
        return lost

    def write(self, i: int, data: bytes) -> None:
        """Block ``i`` at its offset (checked by the caller)."""
        assert self._fd is not None, "open() first"
        try:
            os.pwrite(self._fd, data, i * self.block_size)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise DiskFullError(f"the disk filled up while writing {self.part_path}") from None
            raise StorageError(f"cannot write {self.part_path}: {exc.strerror}") from None

    def copy_in(self, i: int, where: LocalBlock) -> bool:
        """Block ``i`` from where the same bytes lie on the box (another bundle), if they read
        back and check out against the block list; False, and nothing written, if not."""
        if where.length != self._length(i):
            return False
        try:
            with open(where.path, "rb") as f:
                f.seek(where.offset)
                data = f.read(where.length)
        except OSError:
            return False
        if not self._checks_out(i, data):
            return False
        self.write(i, data)
        return True

    def write_bitmap(self, bitmap: bytes) -> None:
        """The bitmap, in place (after the blocks it marks were written)."""
        assert self._bitmap_fd is not None, "open() first"
        try:
            os.pwrite(self._bitmap_fd, bitmap, 0)
        except OSError as exc:
            raise StorageError(f"cannot save {self.bitmap_path}: {exc.strerror}") from None

    def sync(self) -> None:
        """The data to disk, then the bitmap: a bit on disk then marks data on disk.

        Without it a kill -9 loses nothing (the page cache outlives the process); a power cut
        may lose the latest bits or, written back out of order, keep bits whose data did not
        reach the disk, which :meth:`resume` finds.
        """
        assert self._fd is not None, "open() first"
        assert self._bitmap_fd is not None, "open() first"
        try:
            os.fdatasync(self._fd)
            os.fdatasync(self._bitmap_fd)
        except OSError as exc:
            raise StorageError(f"cannot save {self.bitmap_path}: {exc.strerror}") from None

    def close(self) -> None:
        for fd in (self._fd, self._bitmap_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._bitmap_fd = None

    def remove(self) -> None:
        """Remove the download's directory and all in it."""
        self.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.dir.parent.exists():
            fsync_dir(self.dir.parent)
