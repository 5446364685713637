"""Whole-file SHA-256 and per-block SHA-256 digests in one pass over the file.

The block-hash list (the raw 32-byte digests of each block, concatenated) is what a device checks
each downloaded block against; its own SHA-256 is signed in the bundle descriptor. The two hashes
run on two threads (hashlib releases the GIL on large buffers), so hashing both costs about as
much wall time as hashing once. Regular files are memory-mapped, so no thread copies the bytes;
the files verified are the agent's own (its state directory), which nothing truncates meanwhile.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO

CHUNK_BYTES = 4 << 20


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


def _chunks_mapped(f: BinaryIO, length: int, chunk_bytes: int) -> Iterator[memoryview]:
    with mmap.mmap(f.fileno(), length, access=mmap.ACCESS_READ) as mapped:
        if hasattr(mapped, "madvise"):
            mapped.madvise(mmap.MADV_SEQUENTIAL)
        view = memoryview(mapped)
        try:
            for start in range(0, length, chunk_bytes):
                chunk = view[start : start + chunk_bytes]
                try:
                    yield chunk
                finally:
                    chunk.release()
        finally:
            view.release()


def _chunks_read(f: BinaryIO, limit: int | None, chunk_bytes: int) -> Iterator[memoryview]:
    f.seek(0)
    size = 0
    while limit is None or size < limit:
        data = f.read(chunk_bytes if limit is None else min(chunk_bytes, limit - size))
        if not data:
            return
        size += len(data)
        yield memoryview(data)


def digest_file(f: BinaryIO, block_size: int, *, limit: int | None = None) -> FileDigests:
    """Hash ``f`` from its start: the whole file and each ``block_size`` block.

    ``limit`` stops after that many bytes (the caller compares sizes).
    """
    chunk_bytes = max(block_size, CHUNK_BYTES - CHUNK_BYTES % block_size)
    try:
        length = os.fstat(f.fileno()).st_size
        if limit is not None:
            length = min(length, limit)
        chunks = _chunks_mapped(f, length, chunk_bytes) if length else iter(())
    except (AttributeError, OSError, ValueError):  # not a regular file: read it
        chunks = _chunks_read(f, limit, chunk_bytes)
    whole = hashlib.sha256()
    blocks: list[bytes] = []
    size = 0
    pending: deque[Future[None]] = deque()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256") as pool:
        try:
            for chunk in chunks:
                pending.append(pool.submit(whole.update, chunk))
                for start in range(0, len(chunk), block_size):
                    blocks.append(hashlib.sha256(chunk[start : start + block_size]).digest())
                size += len(chunk)
                # The worker must be done with this chunk before the generator releases it.
                while pending:
                    pending.popleft().result()
        finally:
            while pending:
                pending.popleft().result()
    return FileDigests(
        size=size, sha256=whole.hexdigest(), block_size=block_size, blocks=tuple(blocks)
    )
