"""Device side of the block transfer: pull one bundle, resumably, against a signed descriptor.

The device chooses what to ask for. A :class:`Transfer` first fetches the pages of the block-hash
list and checks their concatenation against ``block_list_sha256`` from the signed descriptor;
then it asks for blocks, never more than ``window`` outstanding, and checks each block against
the list before it is written at its offset in ``bundle.part``. Blocks already present in earlier
bundles on the box (same SHA-256, same length) are copied locally, not fetched.

On disk, in the transfer's own directory (``downloads/{sha256}/``)::

    blocklist      the verified block-hash list (written once, atomically)
    bundle.part    the bundle, sparse until complete
    bitmap         one bit per block that is written and verified (bits only ever go 0 -> 1)

The bitmap is written in place after every ``BITMAP_EVERY`` new blocks, after the blocks
themselves, so an agent killed at any instant fetches at most that many verified blocks again.
It is synced to disk (the data first) when the transfer pauses or is finished. On a resume every
block the bitmap marks is read back and checked against the list again before it counts, so a
bitmap that reached the disk before its data (a power cut) costs a refetch of those blocks, never
a bad bundle.

When every block is in, the file is the signed bundle: each block matched its SHA-256 in the
list, the list matched the hash the descriptor signs, and the size is signed. So the finished
file is not hashed again here; the caller checks its structure (manifest, members).

Threads. What reads or writes bundle-sized data is :meth:`Transfer.open` (the stored block list,
the part file, re-checking the blocks a bitmap marks, copying blocks from local bundles: minutes
for a bundle of many GiB), :meth:`Transfer.finish` and :meth:`Transfer.pause` (syncing it to
disk). With ``inline_open=False`` the caller runs those on a thread of its own (the daemon's
``prepare`` worker), so that its loop never waits on the disk: a new transfer, and one whose
block list has just arrived, is in state ``opening`` until the caller has run ``open()`` and
then :meth:`start`; meanwhile nothing else touches it but ``progress``. Every other method is
for one thread, the daemon's loop. Time comes in as ``now`` (monotonic seconds) so tests can
drive timeouts.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from agent._fsutil import atomic_write_bytes, fsync_dir, read_if_exists
from agent.bundle.blocks import BlockSource
from agent.errors import (
    BlockTooLargeError,
    BundleUnavailableError,
    DigestMismatchError,
    DiskFullError,
    EdgeAgentError,
    StorageError,
    TransferTimeoutError,
)
from agent.transport.messages import (
    BLOCK_LIST_PAGE,
    MAX_WINDOW,
    BlockReplyHeader,
    BlockRequest,
)
from agent.transport.topics import Topics
from agent.trust.metadata import BundleDescriptor

log = logging.getLogger("agent.transport.transfer")

DIGEST = 32
BITMAP_EVERY = 8  # blocks between two bitmap writes: what a kill -9 can cost at most


class TransferSettings(BaseModel):
    """The ``[transfer]`` table of agent.toml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Blocks asked for and not yet received. Stock mosquitto queues 1000 QoS 1 messages per
    # client (and keeps 20 of them in flight); 32 stay well inside that.
    window: Annotated[int, Field(ge=1, le=MAX_WINDOW)] = 32
    request_timeout_s: Annotated[float, Field(gt=0)] = 10.0  # ask again for a block after this
    stall_timeout_s: Annotated[float, Field(gt=0)] = 300.0  # fail after this long without progress
    max_bad_blocks: Annotated[int, Field(ge=1)] = 16  # blocks failing their hash, per transfer
    reserve_mb: Annotated[int, Field(ge=0)] = 64  # free disk to leave beyond the bundle
    retry_after_s: Annotated[float, Field(gt=0)] = 300.0  # a failed download is tried again


State = Literal["opening", "block-list", "blocks", "done", "failed"]


class Transfer:
    """One bundle being pulled. Call :meth:`start`, then feed replies and ticks."""

    def __init__(
        self,
        descriptor: BundleDescriptor,
        directory: Path,
        *,
        device_id: str,
        topics: Topics,
        publish: Callable[[str, bytes], object],
        settings: TransferSettings | None = None,
        reuse: BlockSource | Callable[[], BlockSource] | None = None,
        inline_open: bool = True,
    ) -> None:
        self.descriptor = descriptor
        self.dir = Path(directory)
        self.device_id = device_id
        self.settings = settings or TransferSettings()
        self._publish = publish
        self._request_topic = topics.bundle_request(descriptor.bundle_sha256, device_id)
        self._reuse = reuse or {}  # blocks held locally (or what finds them, called in open())
        self._inline = inline_open
        self.count = descriptor.block_count
        self.pages = -(-self.count // BLOCK_LIST_PAGE)
        self.state: State = "opening"
        self._opened: State | None = None  # what open() found: block-list, blocks, or failed
        self._fetched_list = False  # the block list in memory came from the server, not disk
        self.error: EdgeAgentError | None = None
        self._block_list: bytes = b""
        self._page_data: dict[int, bytes] = {}
        self._have = bytearray(-(-self.count // 8))
        self.have_count = 0
        self._unsaved = 0
        self._todo: list[int] = []  # indexes still to ask for, in order
        self._outstanding: OrderedDict[int, float] = OrderedDict()  # index -> when asked
        self._last_progress = 0.0
        self._fd: int | None = None
        self._bitmap_fd: int | None = None
        self.bad_blocks = 0
        self.fetched_bytes = 0  # block bytes received and written (not the reused ones)
        self.reused_blocks = 0
        self.duplicates = 0
        self.last_error_reply: str | None = None
        self.largest_reply = 0  # the most data one block or page frame brought (it got through)
        self._suspended = False

    # -- paths ------------------------------------------------------------------------------
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
    def block_list(self) -> bytes:
        return self._block_list

    @property
    def progress(self) -> float:
        """Percent of the bundle's blocks on disk and verified."""
        if self.state == "done":
            return 100.0
        return round(100.0 * self.have_count / self.count, 1) if self.count else 0.0

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed")

    # -- start and resume ---------------------------------------------------------------------
    @property
    def opening(self) -> bool:
        """Waiting for :meth:`open` (then :meth:`start`)."""
        return self.state == "opening"

    def open(self) -> None:
        """The disk work before requests: what an earlier run left (the block list, the part
        file, the blocks its bitmap marks, each checked again), free disk, blocks held locally.

        With ``inline_open=False``, on the caller's worker thread while the transfer is
        ``opening``; errors are kept for :meth:`start`.
        """
        try:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StorageError(f"cannot create {self.dir}: {exc.strerror}") from None
            if self._fetched_list:
                atomic_write_bytes(self.block_list_path, self._block_list, 0o600)
            else:
                self._load_block_list()
            if not self._block_list:
                self._opened = "block-list"
                return
            self._open_part()
            self._load_bitmap()
            self._reuse_local()
            self._plan()
            self._opened = "blocks"
        except EdgeAgentError as exc:
            self.error = exc
            self._opened = "failed"

    def start(self, now: float) -> None:
        """After :meth:`open` (run here first with ``inline_open``): ask for what is missing."""
        if self.state != "opening":
            return
        if self._opened is None:
            if not self._inline:  # the caller's mistake: fail this transfer, not the caller
                self.fail(StorageError(f"{self.dir}: the transfer was started before it opened"))
                return
            self.open()
        opened, self._opened = self._opened, None
        self._last_progress = now
        if opened == "failed":
            assert self.error is not None
            self.fail(self.error)
            return
        assert opened is not None
        self.state = opened
        if self.state == "blocks" and not self._todo:
            self._complete()
            return
        self._pump(now)

    def _load_block_list(self) -> None:
        data = read_if_exists(self.block_list_path)
        if data is None:
            return
        if hashlib.sha256(data).hexdigest() == self.descriptor.block_list_sha256:
            self._block_list = data
        else:  # damaged: fetch it again
            log.warning(
                "the stored block list of %s is damaged", self.descriptor.bundle_sha256[:16]
            )

    def _open_part(self) -> None:
        size = self.descriptor.bundle_size
        try:
            if not self.part_path.exists():
                self._check_disk(size)
                # A bitmap without its file marks nothing that is on disk.
                self.bitmap_path.unlink(missing_ok=True)
            self._fd = os.open(self.part_path, os.O_RDWR | os.O_CREAT, 0o600)
            if os.fstat(self._fd).st_size != size:
                os.ftruncate(self._fd, size)
            self._bitmap_fd = os.open(self.bitmap_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StorageError(f"cannot create {self.part_path}: {exc.strerror}") from None

    def _check_disk(self, size: int) -> None:
        """Free disk for the whole bundle, the unpacked copy, and the reserve: before block one."""
        free = shutil.disk_usage(self.dir).free
        need = 2 * size + self.settings.reserve_mb * (1 << 20)
        if free < need:
            raise DiskFullError(
                f"{free >> 20} MiB free in {self.dir}; the bundle needs {need >> 20} MiB "
                f"(twice its {size >> 20} MiB, plus a {self.settings.reserve_mb} MiB reserve)"
            )

    def _load_bitmap(self) -> None:
        """Take the bitmap an earlier run left, counting only blocks that still check out."""
        data = read_if_exists(self.bitmap_path)
        if data is None:
            return
        if len(data) != len(self._have):
            if data:
                log.warning("ignoring a bitmap of the wrong length in %s", self.dir)
            return
        assert self._fd is not None
        lost = 0
        started = time.monotonic()
        for i in range(self.count):
            if not data[i >> 3] & (1 << (i & 7)):
                continue
            try:
                block = os.pread(self._fd, self._length(i), i * self.descriptor.block_size)
            except OSError as exc:
                raise StorageError(f"cannot read {self.part_path}: {exc.strerror}") from None
            if hashlib.sha256(block).digest() == self._digest(i):
                self._have[i >> 3] |= 1 << (i & 7)
                self.have_count += 1
            else:
                lost += 1
        log.info(
            "resuming %s: %d of %d blocks on disk check out (%.1f s)",
            self.descriptor.bundle_sha256[:16],
            self.have_count,
            self.count,
            time.monotonic() - started,
        )
        if lost:
            log.warning(
                "%d block(s) in %s did not reach the disk; fetching them again", lost, self.dir
            )
            self._unsaved += 1
        self._save_bitmap(sync=True)

    def _reuse_local(self) -> None:
        """Copy blocks that earlier bundles on the box hold already (checked again on read)."""
        reuse = self._reuse() if callable(self._reuse) else self._reuse
        if not reuse:
            return
        assert self._fd is not None
        for i in range(self.count):
            if self._has(i):
                continue
            where = reuse.get(self._digest(i))
            if where is None or where.length != self._length(i):
                continue
            try:
                with open(where.path, "rb") as f:
                    f.seek(where.offset)
                    data = f.read(where.length)
            except OSError:
                continue
            if hashlib.sha256(data).digest() != self._digest(i):
                continue
            self._write(i, data)
            self.reused_blocks += 1
            self._unsaved += 1
        self._save_bitmap()

    def _plan(self) -> None:
        self._todo = [i for i in range(self.count) if not self._has(i)]
        self._todo.reverse()  # pop() from the end gives the lowest index first

    # -- requests -----------------------------------------------------------------------------
    def _pump(self, now: float) -> None:
        """Top up the window (block-list pages first), in requests of several indexes."""
        if self._suspended:
            return
        if self.state == "block-list":
            missing = [p for p in range(self.pages) if p not in self._page_data]
            ask = [p for p in missing if p not in self._outstanding][: self.settings.window]
            if ask and len(self._outstanding) == 0:
                self._request("block-list", ask, now)
            return
        if self.state != "blocks":
            return
        room = self.settings.window - len(self._outstanding)
        # Ask in batches of a quarter window or more: the pipe stays full, requests stay few.
        if room < max(1, self.settings.window // 4) and self._outstanding:
            return
        batch: list[int] = []
        while self._todo and len(batch) < room:
            i = self._todo.pop()
            if not self._has(i) and i not in self._outstanding:
                batch.append(i)
        if batch:
            self._request("blocks", batch, now)

    def _request(
        self, kind: Literal["blocks", "block-list"], indexes: list[int], now: float
    ) -> None:
        for i in indexes:
            self._outstanding[i] = now
        request = BlockRequest(
            device_id=self.device_id,
            bundle_sha256=self.descriptor.bundle_sha256,
            kind=kind,
            indexes=indexes,
        )
        self._publish(self._request_topic, request.to_bytes())

    def suspend(self, now: float) -> None:
        """The connection is gone: forget what is outstanding, ask for nothing until resend().

        Nothing queues up in the MQTT client while offline, and the stall clock stops: an
        outage is not a transfer that stalled.
        """
        if self.finished:
            return
        pending = list(self._outstanding)
        self._outstanding.clear()
        if self.state == "blocks":
            self._todo.extend(sorted(pending, reverse=True))
        self._suspended = True

    def resend(self, now: float) -> None:
        """The connection came back: ask again for everything outstanding."""
        if self.finished:
            return
        self.suspend(now)
        self._suspended = False
        self._last_progress = max(self._last_progress, now)
        self._pump(now)

    def tick(self, now: float) -> None:
        """Ask again for what timed out; fail when nothing has arrived for too long."""
        if self.finished:
            return
        if self.state == "opening":
            return  # the disk work of open(): not a stall
        if now - self._last_progress >= self.settings.stall_timeout_s:
            self._save_bitmap()  # a resume checks each marked block again: no need to sync
            if self.last_error_reply is not None:
                self.fail(
                    BundleUnavailableError(
                        f"no bundle server answered for {self.settings.stall_timeout_s:.0f} s "
                        f"(last reply: {self.last_error_reply})"
                    )
                )
            else:
                self.fail(
                    TransferTimeoutError(
                        f"no block arrived for {self.settings.stall_timeout_s:.0f} s "
                        f"({self.progress:.1f}% of {self.descriptor.bundle_sha256[:16]} done)"
                    )
                )
            return
        # Counted from the later of the request and the last block that arrived: on a slow
        # link the window drains slowly, and that is not a lost request.
        timeout = self.settings.request_timeout_s
        expired = [
            i for i, t in self._outstanding.items() if now - max(t, self._last_progress) >= timeout
        ]
        if expired:
            log.info(
                "asking again for %d block(s) of %s",
                len(expired),
                self.descriptor.bundle_sha256[:16],
            )
            for i in expired:
                del self._outstanding[i]
            if self.state == "blocks":
                self._todo.extend(sorted(expired, reverse=True))
        self._pump(now)

    # -- replies ------------------------------------------------------------------------------
    def on_reply(self, header: BlockReplyHeader, data: bytes, now: float) -> None:
        """One frame from ``devices/{id}/blocks`` for this bundle (the caller routed it)."""
        if self.finished:
            return
        if header.kind == "error":
            self.last_error_reply = (
                f"{header.error.code}: {header.error.message}" if header.error else "error"
            )
            log.warning("bundle server: %s", self.last_error_reply)
            if header.error is not None and header.error.code == BlockTooLargeError.code:
                self._on_too_large(header.index, header.error.message)
            return
        self.largest_reply = max(self.largest_reply, len(data))
        if header.kind == "block-list":
            self._on_page(header, data, now)
        else:
            self._on_block(header, data, now)
        self._pump(now)

    def _on_too_large(self, index: int, message: str) -> None:
        """A bundle server cannot send block (or page) ``index``: its packet exceeds the limit.

        One such answer fails the transfer at once. The limit is the broker's own (announced to
        every server in its CONNACK, or configured for a 3.1.1 broker), so every server that
        shares the load answers alike, and waiting would only turn the reason into
        ``transfer-timeout``. One server of several may be misconfigured with a lower limit than
        its peers; that shows when a reply at least as large as the refused one has already come
        through the broker in this transfer. Then the refusal is that server's fault, not the
        bundle's: it counts like any other error reply and the blocks are asked for again (by
        the shared subscription, most likely of another server). Either way a failed transfer
        is tried again after ``retry_after_s``.
        """
        if self.state == "block-list":
            refused = min(BLOCK_LIST_PAGE, max(1, self.count - index * BLOCK_LIST_PAGE)) * DIGEST
        else:
            refused = self._length(index) if index < self.count else self.descriptor.block_size
        if self.largest_reply >= refused:
            log.warning("a bundle server refused a reply as large as one that came through")
            return
        self.fail(
            BlockTooLargeError(
                f"the bundle server cannot send the bundle through the broker: {message}"
            )
        )

    def _on_page(self, header: BlockReplyHeader, data: bytes, now: float) -> None:
        p = header.index
        if self.state != "block-list" or p not in self._outstanding or header.total != self.pages:
            self.duplicates += 1
            return
        expected = min(BLOCK_LIST_PAGE, self.count - p * BLOCK_LIST_PAGE) * DIGEST
        del self._outstanding[p]
        if len(data) != expected:
            self._bad(f"block-list page {p} is {len(data)} bytes, not {expected}")
            return
        self._page_data[p] = data
        self._last_progress = now
        if len(self._page_data) < self.pages:
            return
        whole = b"".join(self._page_data[i] for i in range(self.pages))
        self._page_data.clear()
        if hashlib.sha256(whole).hexdigest() != self.descriptor.block_list_sha256:
            self._bad("the block list does not match the signed descriptor")
            return
        # Stored, then the part file and local blocks: the disk work of open().
        self._block_list = whole
        self._fetched_list = True
        self.state = "opening"
        if self._inline:
            self.start(now)  # opens it first

    def _on_block(self, header: BlockReplyHeader, data: bytes, now: float) -> None:
        i = header.index
        if self.state != "blocks" or i >= self.count or self._has(i):
            self.duplicates += 1
            return
        if i not in self._outstanding:
            self.duplicates += 1  # never asked for (or asked and given up): ignore
            return
        del self._outstanding[i]
        if len(data) != self._length(i) or hashlib.sha256(data).digest() != self._digest(i):
            self._todo.append(i)  # ask again, next
            self._bad(f"block {i} does not match its signed hash")
            return
        try:
            self._write(i, data)
        except EdgeAgentError as exc:
            self.fail(exc)
            return
        self.fetched_bytes += len(data)
        self._last_progress = now
        self.last_error_reply = None
        self._unsaved += 1
        if self._unsaved >= BITMAP_EVERY:
            self._save_bitmap()
        if self.have_count == self.count:
            self._complete()

    def _bad(self, what: str) -> None:
        self.bad_blocks += 1
        log.warning("%s (from the bundle server); asking again", what)
        if self.bad_blocks > self.settings.max_bad_blocks:
            self.fail(
                DigestMismatchError(
                    f"{self.bad_blocks} blocks failed their signed hash; the last: {what}"
                )
            )

    # -- disk -----------------------------------------------------------------------------
    def _digest(self, i: int) -> bytes:
        return self._block_list[i * DIGEST : (i + 1) * DIGEST]

    def _length(self, i: int) -> int:
        bs = self.descriptor.block_size
        return min(bs, self.descriptor.bundle_size - i * bs)

    def _has(self, i: int) -> bool:
        return bool(self._have[i >> 3] & (1 << (i & 7)))

    def _write(self, i: int, data: bytes) -> None:
        assert self._fd is not None
        try:
            os.pwrite(self._fd, data, i * self.descriptor.block_size)
        except OSError as exc:
            if exc.errno == 28:  # ENOSPC
                raise DiskFullError(f"the disk filled up while writing {self.part_path}") from None
            raise StorageError(f"cannot write {self.part_path}: {exc.strerror}") from None
        self._have[i >> 3] |= 1 << (i & 7)
        self.have_count += 1

    def _save_bitmap(self, *, sync: bool = False) -> None:
        """Write the bitmap in place; with ``sync``, the data first, then the bitmap, to disk.

        Without ``sync`` a kill -9 loses nothing (the page cache outlives the process); a power
        cut may lose the latest bits or, written back out of order, keep bits whose data did
        not reach the disk, which the next resume finds by checking every marked block.
        """
        if self._fd is None or self._bitmap_fd is None:
            return
        try:
            if self._unsaved:
                os.pwrite(self._bitmap_fd, bytes(self._have), 0)
                self._unsaved = 0
            if sync:
                os.fdatasync(self._fd)
                os.fdatasync(self._bitmap_fd)
        except OSError as exc:
            raise StorageError(f"cannot save {self.bitmap_path}: {exc.strerror}") from None

    def _complete(self) -> None:
        """Every block is in and was checked on arrival; :meth:`finish` syncs it to disk."""
        try:
            self._save_bitmap()
        except EdgeAgentError as exc:
            self.fail(exc)
            return
        self.state = "done"
        if self._inline:
            self.finish()

    def finish(self) -> None:
        """Sync the finished part file (the data, then the bitmap) and close it (slow: the
        whole bundle may still be in the page cache; off the loop with ``inline_open=False``)."""
        try:
            self._save_bitmap(sync=True)
        finally:
            self.close()

    def fail(self, exc: EdgeAgentError) -> None:
        log.error("transfer of %s failed: %s", self.descriptor.bundle_sha256[:16], exc)
        self.error = exc
        self.state = "failed"
        self._outstanding.clear()
        self.close()

    def pause(self) -> None:
        """Stop for now (the agent stops, or the deployment changed): save the bitmap, close."""
        try:
            self._save_bitmap(sync=True)
        except EdgeAgentError as exc:
            log.warning("%s", exc)
        self._outstanding.clear()
        self.close()

    def close(self) -> None:
        for fd in (self._fd, self._bitmap_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._bitmap_fd = None

    def discard(self) -> None:
        """Remove everything this transfer wrote (after the bundle was stored, or to cancel)."""
        self.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.dir.parent.exists():
            fsync_dir(self.dir.parent)
