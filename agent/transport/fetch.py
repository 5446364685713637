"""What a device asks for when it pulls one bundle in blocks, and what it makes of the replies.

:class:`BlockFetch` is the transfer's decisions without its I/O: no file, no socket, no clock
(time comes in as ``now``, monotonic seconds). It first asks for the pages of the block-hash
list and checks their concatenation against ``block_list_sha256`` from the signed descriptor;
then it asks for blocks, never more than ``window`` outstanding, and checks each block against
the list. It keeps the bitmap of the blocks that are in, says when that bitmap is due to be
saved (every ``BITMAP_EVERY`` new blocks), asks again for what timed out, and fails the
transfer when nothing arrives for too long, when too many blocks fail their hash, or when the
bundle cannot pass the broker.

The caller (:class:`agent.device.transfer.Transfer`) does the rest: it publishes what
:meth:`BlockFetch.take_asks` returns, writes each block :meth:`BlockFetch.on_reply` accepts and
then reports it with :meth:`BlockFetch.stored`, saves the bitmap, and tells the machine what an
earlier run left on disk while it is ``opening``.

States::

    opening -> block-list -> opening -> blocks -> done
    opening -> blocks        (the block list was on disk)
    opening -> done          (so was every block: resumed or copied)
    any of them -> failed

``opening`` waits for the caller to say what the disk holds (:meth:`BlockFetch.begin`): at
first, and again once the block list has come in.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Iterator
from typing import Annotated, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from agent.bundle.blocks import DIGEST
from agent.errors import (
    BlockTooLargeError,
    BundleUnavailableError,
    DigestMismatchError,
    EdgeAgentError,
    TransferTimeoutError,
)
from agent.transport.messages import BLOCK_LIST_PAGE, MAX_WINDOW, BlockReplyHeader
from agent.trust.metadata import BundleDescriptor

# The transfer's messages keep one logger name across the modules that make it up.
log = logging.getLogger("agent.transport.transfer")

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


class Ask(NamedTuple):
    """One request to publish: block-list pages or blocks, by index."""

    kind: Literal["blocks", "block-list"]
    indexes: list[int]


class BlockFetch:
    """The decisions of one bundle's transfer: events in; asks, accepted blocks, a verdict out."""

    def __init__(self, descriptor: BundleDescriptor, settings: TransferSettings | None = None):
        self.descriptor = descriptor
        self.settings = settings or TransferSettings()
        self.count = descriptor.block_count
        self.pages = -(-self.count // BLOCK_LIST_PAGE)
        self.state: State = "opening"
        self.error: EdgeAgentError | None = None
        self.block_list: bytes = b""
        self._page_data: dict[int, bytes] = {}
        self._have = bytearray(-(-self.count // 8))
        self.have_count = 0
        self.unsaved = 0  # bits set since the bitmap last went to disk
        self._todo: list[int] = []  # indexes still to ask for, in order
        self._outstanding: OrderedDict[int, float] = OrderedDict()  # index -> when asked
        self._last_progress = 0.0
        self._suspended = False
        self._asks: list[Ask] = []
        self.bad_blocks = 0
        self.fetched_bytes = 0  # block bytes received and stored (not the copied ones)
        self.reused_blocks = 0
        self.duplicates = 0
        self.last_error_reply: str | None = None
        self.largest_reply = 0  # the most data one block or page frame brought (it got through)

    # -- what it knows --------------------------------------------------------------------------
    @property
    def progress(self) -> float:
        """Percent of the bundle's blocks in and verified."""
        if self.state == "done":
            return 100.0
        return round(100.0 * self.have_count / self.count, 1) if self.count else 0.0

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed")

    @property
    def opening(self) -> bool:
        """Waiting for :meth:`begin`."""
        return self.state == "opening"

    @property
    def outstanding(self) -> int:
        """Blocks (or pages) asked for and not received."""
        return len(self._outstanding)

    def digest(self, i: int) -> bytes:
        return self.block_list[i * DIGEST : (i + 1) * DIGEST]

    def length(self, i: int) -> int:
        bs = self.descriptor.block_size
        return min(bs, self.descriptor.bundle_size - i * bs)

    def checks_out(self, i: int, data: bytes) -> bool:
        """``data`` is block ``i`` as the signed block list has it."""
        return len(data) == self.length(i) and hashlib.sha256(data).digest() == self.digest(i)

    def has(self, i: int) -> bool:
        return bool(self._have[i >> 3] & (1 << (i & 7)))

    def missing(self) -> Iterator[int]:
        """The blocks not in yet, lowest first."""
        return (i for i in range(self.count) if not self.has(i))

    @property
    def bitmap(self) -> bytes:
        """One bit per block that is in (block ``i``: bit ``i & 7`` of byte ``i >> 3``)."""
        return bytes(self._have)

    @property
    def bitmap_due(self) -> bool:
        return self.unsaved >= BITMAP_EVERY

    def bitmap_saved(self) -> None:
        self.unsaved = 0

    def take_asks(self) -> list[Ask]:
        """The requests to publish, in order, since the last call."""
        asks, self._asks = self._asks, []
        return asks

    # -- what the disk holds (while opening) ----------------------------------------------------
    def use_block_list(self, data: bytes) -> bool:
        """Take a stored block list if it is the signed one (else it is fetched again)."""
        if hashlib.sha256(data).hexdigest() != self.descriptor.block_list_sha256:
            return False
        self.block_list = data
        return True

    def resumed(self, i: int) -> None:
        """Block ``i`` is on disk from an earlier run, marked in its bitmap, and checks out."""
        self._set(i)

    def copied(self, i: int) -> None:
        """Block ``i`` was copied from a bundle on the box (and checked)."""
        self._set(i)
        self.reused_blocks += 1
        self.unsaved += 1

    def bitmap_stale(self) -> None:
        """The saved bitmap marks blocks that are not on disk: it is to be written again."""
        self.unsaved += 1

    def begin(self, now: float) -> None:
        """What the disk holds is known: ask for the block list, or for the blocks not in yet
        (``done`` at once when every block is)."""
        if self.state != "opening":
            return
        self._last_progress = now
        if not self.block_list:
            self.state = "block-list"
        else:
            self._todo = list(self.missing())
            self._todo.reverse()  # pop() from the end gives the lowest index first
            self.state = "blocks" if self._todo else "done"
        self._pump(now)

    # -- requests -------------------------------------------------------------------------------
    def _pump(self, now: float) -> None:
        """Top up the window (block-list pages first), in requests of several indexes."""
        if self._suspended:
            return
        if self.state == "block-list":
            missing = [p for p in range(self.pages) if p not in self._page_data]
            ask = [p for p in missing if p not in self._outstanding][: self.settings.window]
            if ask and len(self._outstanding) == 0:
                self._ask("block-list", ask, now)
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
            if not self.has(i) and i not in self._outstanding:
                batch.append(i)
        if batch:
            self._ask("blocks", batch, now)

    def _ask(self, kind: Literal["blocks", "block-list"], indexes: list[int], now: float) -> None:
        for i in indexes:
            self._outstanding[i] = now
        self._asks.append(Ask(kind, indexes))

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

    def stalled(self, now: float) -> bool:
        """Nothing has arrived for ``stall_timeout_s``: the next :meth:`tick` fails it."""
        if self.finished or self.state == "opening":
            return False
        return now - self._last_progress >= self.settings.stall_timeout_s

    def tick(self, now: float) -> None:
        """Ask again for what timed out; fail when nothing has arrived for too long."""
        if self.finished:
            return
        if self.state == "opening":
            return  # the disk work of opening: not a stall
        if self.stalled(now):
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

    # -- replies --------------------------------------------------------------------------------
    def on_reply(self, header: BlockReplyHeader, data: bytes, now: float) -> int | None:
        """One frame from ``devices/{id}/blocks`` for this bundle (the caller routed it).

        Returns the index of a block that checks out: the caller writes ``data`` at its offset,
        then calls :meth:`stored` (or :meth:`fail`). None for anything else.
        """
        if self.finished:
            return None
        if header.kind == "error":
            self.last_error_reply = (
                f"{header.error.code}: {header.error.message}" if header.error else "error"
            )
            log.warning("bundle server: %s", self.last_error_reply)
            if header.error is not None and header.error.code == BlockTooLargeError.code:
                self._on_too_large(header.index, header.error.message)
            return None
        self.largest_reply = max(self.largest_reply, len(data))
        if header.kind == "block-list":
            self._on_page(header, data, now)
        else:
            accepted = self._on_block(header, data)
            if accepted is not None:
                return accepted  # the window is topped up once it is stored
        self._pump(now)
        return None

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
            refused = self.length(index) if index < self.count else self.descriptor.block_size
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
        if not self.use_block_list(whole):
            self._bad("the block list does not match the signed descriptor")
            return
        self.state = "opening"  # the caller stores it, then what the disk holds: begin()

    def _on_block(self, header: BlockReplyHeader, data: bytes) -> int | None:
        i = header.index
        if self.state != "blocks" or i >= self.count or self.has(i):
            self.duplicates += 1
            return None
        if i not in self._outstanding:
            self.duplicates += 1  # never asked for (or asked and given up): ignore
            return None
        del self._outstanding[i]
        if not self.checks_out(i, data):
            self._todo.append(i)  # ask again, next
            self._bad(f"block {i} does not match its signed hash")
            return None
        return i

    def stored(self, i: int, now: float) -> None:
        """Block ``i``, accepted by :meth:`on_reply`, is written: it counts (``done`` with the
        last one; save the bitmap when :attr:`bitmap_due`), and the window is topped up."""
        self._set(i)
        self.fetched_bytes += self.length(i)
        self._last_progress = now
        self.last_error_reply = None
        self.unsaved += 1
        if self.have_count == self.count:
            self.state = "done"
        self._pump(now)  # written and marked: then ask for more, as the part file has it

    def _bad(self, what: str) -> None:
        self.bad_blocks += 1
        log.warning("%s (from the bundle server); asking again", what)
        if self.bad_blocks > self.settings.max_bad_blocks:
            self.fail(
                DigestMismatchError(
                    f"{self.bad_blocks} blocks failed their signed hash; the last: {what}"
                )
            )

    def _set(self, i: int) -> None:
        self._have[i >> 3] |= 1 << (i & 7)
        self.have_count += 1

    # -- the end --------------------------------------------------------------------------------
    def fail(self, exc: EdgeAgentError) -> None:
        self.error = exc
        self.state = "failed"
        self.forget_outstanding()
        self._asks.clear()

    def forget_outstanding(self) -> None:
        """Ask for nothing more that is outstanding (the transfer stops)."""
        self._outstanding.clear()
