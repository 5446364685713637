"""Device side of the block transfer: pull one bundle, resumably, against a signed descriptor.

A :class:`Transfer` puts together what to ask for and what to make of the replies
(:class:`~agent.transport.fetch.BlockFetch`, no I/O), the download's files
(:class:`~agent.state.partfile.PartFile`: the block list, ``bundle.part`` and its bitmap) and
the session's publishing of requests. Each block is checked against the signed block list
before it is written at its offset. Blocks already present in earlier bundles on the box (same
SHA-256, same length) are copied locally, not fetched.

The bitmap is written after every ``BITMAP_EVERY`` new blocks, after the blocks themselves, so
an agent killed at any instant fetches at most that many verified blocks again. It is synced to
disk (the data first) when the transfer pauses or is finished. On a resume every block the
bitmap marks is read back and checked against the list again before it counts.

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

import logging
import time
from collections.abc import Callable
from pathlib import Path

from agent.bundle.blocks import BlockSource
from agent.errors import EdgeAgentError, StorageError
from agent.state.partfile import PartFile
from agent.transport.fetch import BlockFetch, State, TransferSettings
from agent.transport.messages import BlockReplyHeader, BlockRequest
from agent.transport.topics import Topics
from agent.trust.metadata import BundleDescriptor

log = logging.getLogger("agent.transport.transfer")  # the transfer's messages, one name


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
        self.fetch = BlockFetch(descriptor, self.settings)
        self.part = PartFile(
            self.dir, size=descriptor.bundle_size, block_size=descriptor.block_size
        )
        self._publish = publish
        self._request_topic = topics.bundle_request(descriptor.bundle_sha256, device_id)
        self._reuse = reuse or {}  # blocks held locally (or what finds them, called in open())
        self._inline = inline_open
        self._opened = False  # open() has run since the transfer was last opening
        self._open_error: EdgeAgentError | None = None  # what it kept for start()

    # -- what the fetch knows -------------------------------------------------------------------
    @property
    def state(self) -> State:
        return self.fetch.state

    @property
    def error(self) -> EdgeAgentError | None:
        return self.fetch.error

    @property
    def count(self) -> int:
        return self.fetch.count

    @property
    def pages(self) -> int:
        return self.fetch.pages

    @property
    def have_count(self) -> int:
        return self.fetch.have_count

    @property
    def bad_blocks(self) -> int:
        return self.fetch.bad_blocks

    @property
    def duplicates(self) -> int:
        return self.fetch.duplicates

    @property
    def fetched_bytes(self) -> int:
        """Block bytes received and written (not the reused ones)."""
        return self.fetch.fetched_bytes

    @property
    def last_error_reply(self) -> str | None:
        return self.fetch.last_error_reply

    @property
    def block_list(self) -> bytes:
        return self.fetch.block_list

    @property
    def progress(self) -> float:
        """Percent of the bundle's blocks on disk and verified."""
        return self.fetch.progress

    @property
    def finished(self) -> bool:
        return self.fetch.finished

    @property
    def opening(self) -> bool:
        """Waiting for :meth:`open` (then :meth:`start`)."""
        return self.fetch.opening

    def _has(self, i: int) -> bool:
        return self.fetch.has(i)

    @property
    def part_path(self) -> Path:
        return self.part.part_path

    # -- start and resume -----------------------------------------------------------------------
    def open(self) -> None:
        """The disk work before requests: what an earlier run left (the block list, the part
        file, the blocks its bitmap marks, each checked again), free disk, blocks held locally.

        With ``inline_open=False``, on the caller's worker thread while the transfer is
        ``opening``; errors are kept for :meth:`start`.
        """
        try:
            self.part.make_dir()
            # A block list in memory while opening came from the server; else look on disk.
            if self.fetch.block_list:
                self.part.save_block_list(self.fetch.block_list)
            else:
                self._load_block_list()
            if self.fetch.block_list:
                self.part.open(self.fetch.block_list, reserve_mb=self.settings.reserve_mb)
                self._resume()
                self._reuse_local()
        except EdgeAgentError as exc:
            self._open_error = exc
        self._opened = True

    def start(self, now: float) -> None:
        """After :meth:`open` (run here first with ``inline_open``): ask for what is missing."""
        if not self.fetch.opening:
            return
        if not self._opened:
            if not self._inline:  # the caller's mistake: fail this transfer, not the caller
                self.fail(StorageError(f"{self.dir}: the transfer was started before it opened"))
                return
            self.open()
        self._opened = False
        if self._open_error is not None:
            self.fail(self._open_error)
            return
        self.fetch.begin(now)
        self._settle()

    def _load_block_list(self) -> None:
        data = self.part.read_block_list()
        if data is not None and not self.fetch.use_block_list(data):  # damaged: fetch it again
            log.warning(
                "the stored block list of %s is damaged", self.descriptor.bundle_sha256[:16]
            )

    def _resume(self) -> None:
        """Take the bitmap an earlier run left, counting only blocks that still check out."""
        started = time.monotonic()
        lost = self.part.resume(self.fetch.resumed)
        if lost is None:
            return
        log.info(
            "resuming %s: %d of %d blocks on disk check out (%.1f s)",
            self.descriptor.bundle_sha256[:16],
            self.fetch.have_count,
            self.fetch.count,
            time.monotonic() - started,
        )
        if lost:
            log.warning(
                "%d block(s) in %s did not reach the disk; fetching them again", lost, self.dir
            )
            self.fetch.bitmap_stale()
        self._save_bitmap(sync=True)

    def _reuse_local(self) -> None:
        """Copy blocks that earlier bundles on the box hold already (checked again on read)."""
        reuse = self._reuse() if callable(self._reuse) else self._reuse
        if not reuse:
            return
        for i in self.fetch.missing():
            where = reuse.get(self.fetch.digest(i))
            if where is not None and self.part.copy_in(i, where):
                self.fetch.copied(i)
        self._save_bitmap()

    # -- requests and replies -------------------------------------------------------------------
    def _settle(self) -> None:
        """After each event: publish what the fetch asks for; close the files of one that has
        failed; store and sync one that is done."""
        for kind, indexes in self.fetch.take_asks():
            request = BlockRequest(
                device_id=self.device_id,
                bundle_sha256=self.descriptor.bundle_sha256,
                kind=kind,
                indexes=indexes,
            )
            self._publish(self._request_topic, request.to_bytes())
        if self.fetch.state == "done":
            self._complete()
        if self.fetch.state == "failed":
            self._failed()

    def suspend(self, now: float) -> None:
        """The connection is gone: ask for nothing until :meth:`resend` (see
        :meth:`BlockFetch.suspend`)."""
        self.fetch.suspend(now)

    def resend(self, now: float) -> None:
        """The connection came back: ask again for everything outstanding."""
        if self.finished:
            return
        self.fetch.resend(now)
        self._settle()

    def tick(self, now: float) -> None:
        """Ask again for what timed out; fail when nothing has arrived for too long."""
        if self.finished:
            return
        if self.fetch.stalled(now):
            self._save_bitmap()  # a resume checks each marked block again: no need to sync
        self.fetch.tick(now)
        self._settle()

    def on_reply(self, header: BlockReplyHeader, data: bytes, now: float) -> None:
        """One frame from ``devices/{id}/blocks`` for this bundle (the caller routed it)."""
        if self.finished:
            return
        listing = self.fetch.state == "block-list"
        accepted = self.fetch.on_reply(header, data, now)
        if accepted is not None:
            try:
                self.part.write(accepted, data)
            except EdgeAgentError as exc:
                self.fetch.fail(exc)
            else:
                self.fetch.stored(accepted, now)
                if self.fetch.bitmap_due:
                    self._save_bitmap()
        elif listing and self.fetch.opening and self._inline:
            # The block list is in: it is stored, then the part file and local blocks.
            self.start(now)
            return
        self._settle()

    # -- the end --------------------------------------------------------------------------------
    def _save_bitmap(self, *, sync: bool = False) -> None:
        """Write the bitmap if bits were set since; with ``sync``, the data, then the bitmap,
        to disk (see :meth:`PartFile.sync`)."""
        if not self.part.is_open:
            return
        if self.fetch.unsaved:
            self.part.write_bitmap(self.fetch.bitmap)
            self.fetch.bitmap_saved()
        if sync:
            self.part.sync()

    def _complete(self) -> None:
        """Every block is in and was checked on arrival; :meth:`finish` syncs it to disk."""
        try:
            self._save_bitmap()
        except EdgeAgentError as exc:
            self.fetch.fail(exc)
            return
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
        self.fetch.fail(exc)
        self._failed()

    def _failed(self) -> None:
        log.error("transfer of %s failed: %s", self.descriptor.bundle_sha256[:16], self.error)
        self.close()

    def pause(self) -> None:
        """Stop for now (the agent stops, or the deployment changed): save the bitmap, close."""
        try:
            self._save_bitmap(sync=True)
        except EdgeAgentError as exc:
            log.warning("%s", exc)
        self.fetch.forget_outstanding()
        self.close()

    def close(self) -> None:
        self.part.close()

    def discard(self) -> None:
        """Remove everything this transfer wrote (after the bundle was stored, or to cancel)."""
        self.part.remove()
