"""Whole-file SHA-256 and per-block SHA-256 digests in one read of the file.

The block-hash list (the raw 32-byte digests of each block, concatenated) is what a device checks
each downloaded block against; its own SHA-256 is signed in the bundle descriptor.

The calling thread reads chunks into a small ring of reused buffers and hashes the blocks; one
worker hashes the whole file, in order, a chunk or two behind (hashlib releases the GIL on large
buffers), so hashing twice costs about the wall time of hashing once. Plain reads, not mmap: a
file that shrinks or a flash card that fails mid-read then gives an OSError, never a SIGBUS that
kills the daemon.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

CHUNK_BYTES = 4 << 20
RING = 3  # buffers: one being read, two being hashed
TAIL_SHARE = 6  # percent of each chunk's blocks the worker hashes besides the whole-file digest
DIGEST = 32  # bytes of one block's SHA-256 in a block-hash list


@dataclass(frozen=True)
class FileDigests:
    size: int
    sha256: str
    block_size: int
    blocks: tuple[bytes, ...]

    @property
    def block_list(self) -> bytes:
        return b"".join(self.blocks)

    @property
    def block_list_sha256(self) -> str:
        return hashlib.sha256(self.block_list).hexdigest()


def _fill(f: BinaryIO, view: memoryview) -> int:
    """Read until ``view`` is full or the file ends; return the bytes read."""
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])  # type: ignore[attr-defined]
        if not n:
            break
        got += n
    return got


def _hash_blocks(view: memoryview, block_size: int) -> list[bytes]:
    return [
        hashlib.sha256(view[start : start + block_size]).digest()
        for start in range(0, len(view), block_size)
    ]


def digest_file(f: BinaryIO, block_size: int, *, limit: int | None = None) -> FileDigests:
    """Hash ``f`` from its start: the whole file and each ``block_size`` block.

    ``limit`` stops after that many bytes (the caller compares sizes).
    """
    chunk_bytes = max(block_size, CHUNK_BYTES - CHUNK_BYTES % block_size)
    ring = [memoryview(bytearray(chunk_bytes)) for _ in range(RING)]
    whole = hashlib.sha256()
    blocks: list[bytes] = []
    size = 0
    pending: deque[tuple[Future[list[bytes]], list[bytes]]] = deque()
    f.seek(0)

    def settle() -> None:
        tail, head = pending.popleft()
        blocks.extend(head)
        blocks.extend(tail.result())

    def whole_and_tail(view: memoryview, split: int) -> list[bytes]:
        whole.update(view)
        return _hash_blocks(view[split:], block_size)

    # One worker, so the whole-file updates run in the order they were submitted.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256-file") as pool:
        try:
            for turn in range(1 << 62):
                if len(pending) == RING:  # the buffer about to be reused must be hashed
                    settle()
                want = chunk_bytes if limit is None else min(chunk_bytes, limit - size)
                n = _fill(f, ring[turn % RING][:want]) if want > 0 else 0
                if not n:
                    break
                view = ring[turn % RING][:n]
                # The worker hashes the whole chunk and its last blocks; this thread, which also
                # reads, hashes the rest, so both threads carry about the same load.
                count = -(-n // block_size)
                split = min(n, (count - count * TAIL_SHARE // 100) * block_size)
                future = pool.submit(whole_and_tail, view, split)
                pending.append((future, _hash_blocks(view[:split], block_size)))
                size += n
                if n < want:
                    break
            while pending:
                settle()
        finally:
            for done, _ in pending:  # after an error: let the worker finish before buffers go
                done.exception()
    return FileDigests(
        size=size, sha256=whole.hexdigest(), block_size=block_size, blocks=tuple(blocks)
    )


@dataclass(frozen=True)
class LocalBlock:
    path: Path
    offset: int
    length: int


BlockSource = Mapping[bytes, LocalBlock]  # digest -> where the same bytes lie on the box


def blocks_of(path: Path, block_list: bytes, block_size: int, size: int) -> dict[bytes, LocalBlock]:
    """Index a complete bundle's blocks by digest (for :class:`Transfer`'s ``reuse``)."""
    found: dict[bytes, LocalBlock] = {}
    for i in range(len(block_list) // DIGEST):
        offset = i * block_size
        found.setdefault(
            block_list[i * DIGEST : (i + 1) * DIGEST],
            LocalBlock(path, offset, min(block_size, size - offset)),
        )
    return found
