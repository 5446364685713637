"""The block-fetch state machine alone: no file, no broker, no clock; time is handed in."""

from __future__ import annotations

import hashlib
import random
from datetime import datetime, timedelta, timezone

import pytest

from agent.errors import (
    BlockTooLargeError,
    BundleUnavailableError,
    DigestMismatchError,
    TransferTimeoutError,
)
from agent.transport.fetch import BITMAP_EVERY, Ask, BlockFetch, TransferSettings
from agent.transport.messages import BlockReplyHeader, ErrorInfo
from agent.trust.metadata import BundleDescriptor

BLOCK = 4096


class Rig:
    """A fetch of a made-up bundle, its asks recorded, replies made from the bundle's bytes."""

    def __init__(self, blocks: int = 20, **settings: float) -> None:
        rng = random.Random(blocks)
        self.data = rng.randbytes(BLOCK * (blocks - 1) + 1000)  # a short last block
        self.block_list = b"".join(
            hashlib.sha256(self.data[o : o + BLOCK]).digest()
            for o in range(0, len(self.data), BLOCK)
        )
        created = datetime(2026, 1, 1, tzinfo=timezone.utc)
        self.descriptor = BundleDescriptor(
            model="tiny",
            version="1.0.0",
            release=1,
            bundle_sha256=hashlib.sha256(self.data).hexdigest(),
            bundle_size=len(self.data),
            block_size=BLOCK,
            block_list_sha256=hashlib.sha256(self.block_list).hexdigest(),
            manifest_sha256="0" * 64,
            created=created,
            expires=created + timedelta(days=30),
        )
        self.fetch = BlockFetch(self.descriptor, TransferSettings(**settings))

    def header(self, kind: str, index: int, error: str | None = None) -> BlockReplyHeader:
        f = self.fetch
        return BlockReplyHeader(
            bundle_sha256=self.descriptor.bundle_sha256,
            kind=kind,  # type: ignore[arg-type]
            index=index,
            total=0 if error else f.count if kind == "block" else f.pages,
            error=None if error is None else ErrorInfo(code=error, message="as the server said"),
        )

    def asks(self) -> list[Ask]:
        return self.fetch.take_asks()

    def asked_blocks(self) -> list[int]:
        return [i for a in self.asks() if a.kind == "blocks" for i in a.indexes]

    def page(self, now: float, data: bytes | None = None) -> None:
        data = self.block_list if data is None else data
        assert self.fetch.on_reply(self.header("block-list", 0), data, now) is None

    def block(self, i: int, now: float, data: bytes | None = None) -> int | None:
        """Hand block ``i`` in; store it as the caller does when it is accepted."""
        data = self.data[i * BLOCK : (i + 1) * BLOCK] if data is None else data
        accepted = self.fetch.on_reply(self.header("block", i), data, now)
        if accepted is not None:
            self.fetch.stored(accepted, now)
        return accepted

    def listed(self, now: float = 0.0) -> list[int]:
        """Through the block list (as from the server) to blocks; the first blocks asked."""
        self.fetch.begin(now)
        assert self.asks() == [Ask("block-list", [0])]
        self.page(now)
        assert self.fetch.opening
        self.fetch.begin(now)
        assert self.fetch.state == "blocks"
        return self.asked_blocks()


def test_it_asks_for_the_block_list_first() -> None:
    rig = Rig()
    assert rig.fetch.opening
    assert rig.asks() == [], "nothing is asked for before the disk is known"
    rig.fetch.begin(0.0)
    assert rig.fetch.state == "block-list"
    assert rig.asks() == [Ask("block-list", [0])]


def test_the_signed_block_list_leads_to_the_blocks_lowest_first() -> None:
    rig = Rig(window=8)
    first = rig.listed()
    assert rig.fetch.block_list == rig.block_list
    assert first == list(range(8))


def test_a_block_list_that_does_not_match_the_descriptor_is_asked_for_again() -> None:
    rig = Rig()
    rig.fetch.begin(0.0)
    rig.asks()
    damaged = bytearray(rig.block_list)
    damaged[5] ^= 1
    rig.page(0.1, bytes(damaged))
    assert rig.fetch.state == "block-list"
    assert rig.fetch.block_list == b""
    assert rig.fetch.bad_blocks == 1
    assert rig.asks() == [Ask("block-list", [0])]


def test_a_block_list_page_of_the_wrong_length_is_asked_for_again() -> None:
    rig = Rig()
    rig.fetch.begin(0.0)
    rig.asks()
    rig.page(0.1, rig.block_list[:-32])
    assert rig.fetch.state == "block-list"
    assert rig.fetch.bad_blocks == 1
    assert rig.asks() == [Ask("block-list", [0])]


def test_a_stored_block_list_is_taken_only_if_it_is_the_signed_one() -> None:
    rig = Rig()
    assert not rig.fetch.use_block_list(rig.block_list[:-1] + b"\x00")
    assert rig.fetch.block_list == b""
    assert rig.fetch.use_block_list(rig.block_list)
    rig.fetch.begin(0.0)
    assert rig.fetch.state == "blocks", "no block-list page is asked for"
    assert all(a.kind == "blocks" for a in rig.asks())


def test_the_window_never_exceeds_its_bound() -> None:
    """Served out of order, some replies lost, timeouts: never more than ``window`` asked."""
    window = 8
    rig = Rig(blocks=200, window=window, request_timeout_s=1.0, stall_timeout_s=1e9)
    rng = random.Random(7)
    pending = rig.listed()
    now = 0.0
    while rig.fetch.state == "blocks" and now < 500:
        assert rig.fetch.outstanding <= window
        rng.shuffle(pending)
        for i in pending[: rng.randint(0, len(pending))]:
            pending.remove(i)
            if rng.random() < 0.2:
                continue  # lost on the way
            rig.block(i, now)
            assert rig.fetch.outstanding <= window
            for ask in rig.asks():
                assert len(ask.indexes) <= window
                pending += ask.indexes
            assert rig.fetch.outstanding <= window
        now += 0.5
        rig.fetch.tick(now)
        for ask in rig.asks():
            pending += ask.indexes
    assert rig.fetch.state == "done"


def test_it_asks_in_batches_of_a_quarter_window() -> None:
    rig = Rig(window=8)
    first = rig.listed()
    rig.block(first[0], 0.1)
    assert rig.asks() == [], "one free place: too few to ask for"
    rig.block(first[1], 0.2)
    assert rig.asked_blocks() == [8, 9]


def test_a_block_failing_its_hash_is_asked_for_again_next() -> None:
    rig = Rig(window=8)
    rig.listed()
    bad = bytearray(rig.data[2 * BLOCK : 3 * BLOCK])
    bad[0] ^= 0xFF
    assert rig.block(2, 0.1, bytes(bad)) is None
    assert not rig.fetch.has(2)
    assert rig.fetch.bad_blocks == 1
    assert rig.asked_blocks() == [], "one free place of eight"
    rig.block(0, 0.2)
    assert rig.asked_blocks() == [2, 8], "the bad block first"


def test_a_block_of_the_wrong_length_fails_its_hash() -> None:
    rig = Rig()
    rig.listed()
    assert rig.block(0, 0.1, rig.data[:100]) is None
    assert rig.fetch.bad_blocks == 1


def test_too_many_bad_blocks_fail_it() -> None:
    rig = Rig(window=8, max_bad_blocks=2)
    rig.listed()
    for i in range(3):
        rig.block(i, 0.1, bytes(BLOCK))
    assert rig.fetch.state == "failed"
    assert isinstance(rig.fetch.error, DigestMismatchError)
    assert rig.asks() == []


def test_a_duplicate_block_is_ignored() -> None:
    rig = Rig()
    rig.listed()
    assert rig.block(0, 0.1) == 0
    assert rig.block(0, 0.2) is None
    assert rig.fetch.duplicates == 1
    assert rig.fetch.have_count == 1
    assert rig.fetch.fetched_bytes == BLOCK


def test_a_block_never_asked_for_is_ignored() -> None:
    rig = Rig(window=4)
    rig.listed()
    assert rig.block(10, 0.1) is None, "not asked for yet"
    assert rig.fetch.duplicates == 1
    assert not rig.fetch.has(10)
    assert rig.fetch.on_reply(rig.header("block", 99), b"x", 0.2) is None, "beyond the bundle"
    assert rig.fetch.duplicates == 2


def test_blocks_before_the_block_list_are_ignored() -> None:
    rig = Rig()
    rig.fetch.begin(0.0)
    assert rig.block(0, 0.1) is None
    assert rig.fetch.duplicates == 1


def test_what_timed_out_is_asked_for_again() -> None:
    rig = Rig(window=4, request_timeout_s=5.0)
    first = rig.listed(0.0)
    rig.fetch.tick(4.9)
    assert rig.asks() == []
    rig.fetch.tick(5.0)
    assert rig.asked_blocks() == first


def test_the_request_timeout_counts_from_the_last_block_that_arrived() -> None:
    """On a slow link the window drains slowly: that is not a lost request."""
    rig = Rig(window=4, request_timeout_s=5.0)
    first = rig.listed(0.0)
    rig.block(first[0], 4.0)
    rig.asks()
    rig.fetch.tick(5.0)  # 5 s after the first asks, 1 s after the last block
    rig.fetch.tick(8.9)
    assert rig.asks() == []
    rig.fetch.tick(9.0)
    assert rig.asked_blocks() == [*first[1:], 4], "4 was asked for at 4.0"


def test_a_stall_fails_it_with_transfer_timeout() -> None:
    rig = Rig(stall_timeout_s=30.0)
    rig.listed(0.0)
    assert not rig.fetch.stalled(29.9)
    assert rig.fetch.stalled(30.0)
    rig.fetch.tick(30.0)
    assert rig.fetch.state == "failed"
    assert isinstance(rig.fetch.error, TransferTimeoutError)


def test_a_stall_after_error_replies_is_bundle_unavailable() -> None:
    rig = Rig(stall_timeout_s=30.0)
    rig.listed(0.0)
    rig.fetch.on_reply(rig.header("error", 0, "rate-limited"), b"", 1.0)
    assert rig.fetch.last_error_reply == "rate-limited: as the server said"
    rig.fetch.tick(30.0)
    assert isinstance(rig.fetch.error, BundleUnavailableError)


def test_no_stall_while_opening() -> None:
    rig = Rig(stall_timeout_s=30.0)
    rig.fetch.tick(1000.0)
    assert rig.fetch.opening
    assert not rig.fetch.stalled(1000.0)


def test_suspended_it_asks_for_nothing_and_resend_asks_again() -> None:
    rig = Rig(window=4, request_timeout_s=5.0, stall_timeout_s=30.0)
    first = rig.listed(0.0)
    rig.fetch.suspend(1.0)
    assert rig.fetch.outstanding == 0
    rig.fetch.tick(10.0)
    assert rig.asks() == []
    assert rig.block(first[0], 11.0) is None, "forgotten: asked again after resend()"
    rig.fetch.resend(100.0)
    assert rig.asked_blocks() == first
    rig.fetch.tick(129.0)
    assert rig.fetch.state == "blocks", "the stall clock starts again at resend()"


def test_resume_from_a_bitmap_asks_only_for_what_is_missing() -> None:
    rig = Rig(window=8)
    assert rig.fetch.use_block_list(rig.block_list)
    for i in (0, 1, 2, 5):
        rig.fetch.resumed(i)
    assert rig.fetch.have_count == 4
    assert rig.fetch.unsaved == 0, "those bits are on disk already"
    rig.fetch.begin(0.0)
    assert rig.asked_blocks() == [3, 4, 6, 7, 8, 9, 10, 11]
    assert rig.fetch.progress == 20.0


def test_done_at_once_when_the_disk_holds_every_block() -> None:
    rig = Rig()
    assert rig.fetch.use_block_list(rig.block_list)
    for i in range(rig.fetch.count):
        rig.fetch.copied(i)
    assert rig.fetch.reused_blocks == rig.fetch.count
    assert rig.fetch.bitmap_due
    rig.fetch.begin(0.0)
    assert rig.fetch.state == "done"
    assert rig.asks() == []
    assert rig.fetch.fetched_bytes == 0


def test_done_when_every_block_is_in() -> None:
    rig = Rig(window=8)
    pending = rig.listed()
    now = 0.0
    while pending:
        now += 0.01
        rig.block(pending.pop(0), now)
        pending += rig.asked_blocks()
    assert rig.fetch.state == "done"
    assert rig.fetch.finished
    assert rig.fetch.progress == 100.0
    assert rig.fetch.fetched_bytes == len(rig.data)
    assert rig.fetch.bitmap == bytes([0xFF, 0xFF, 0x0F])
    assert rig.block(0, now) is None, "a finished fetch takes nothing"
    rig.fetch.tick(now + 1000)
    assert rig.fetch.state == "done"


def test_the_bitmap_is_due_every_few_new_blocks() -> None:
    rig = Rig(window=16)
    rig.listed()
    for i in range(BITMAP_EVERY - 1):
        rig.block(i, 0.1)
    assert not rig.fetch.bitmap_due
    rig.block(BITMAP_EVERY - 1, 0.1)
    assert rig.fetch.bitmap_due
    assert rig.fetch.bitmap[0] == 0xFF
    rig.fetch.bitmap_saved()
    assert not rig.fetch.bitmap_due
    rig.fetch.bitmap_stale()
    assert rig.fetch.unsaved == 1


def test_one_block_too_large_refusal_fails_it_unless_as_large_came_through() -> None:
    rig = Rig(window=4)
    first = rig.listed()
    rig.block(first[0], 0.1)
    rig.fetch.on_reply(rig.header("error", first[1], BlockTooLargeError.code), b"", 0.2)
    assert rig.fetch.state == "blocks", "a full block came through: one server's fault"
    other = Rig(window=4)
    other.listed()
    other.fetch.on_reply(other.header("error", 0, BlockTooLargeError.code), b"", 0.1)
    assert other.fetch.state == "failed"
    assert isinstance(other.fetch.error, BlockTooLargeError)


def test_a_failed_fetch_asks_for_nothing_more() -> None:
    rig = Rig(window=4, request_timeout_s=1.0)
    rig.listed()
    rig.block(0, 0.1)
    rig.block(1, 0.1)  # asks for two more, not taken yet
    rig.fetch.fail(TransferTimeoutError("cut short"))
    assert rig.asks() == []
    assert rig.fetch.outstanding == 0
    rig.fetch.tick(10.0)
    assert rig.asks() == []
    assert rig.fetch.progress == 10.0


@pytest.mark.parametrize("blocks", [2, 2048, 2049])
def test_the_block_list_comes_in_pages(blocks: int) -> None:
    rig = Rig(blocks=blocks)
    rig.fetch.begin(0.0)
    [ask] = rig.asks()
    assert ask.indexes == list(range(-(-blocks // 2048)))
