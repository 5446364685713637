"""Whole-file SHA-256 and per-block SHA-256 digests in one read of the file.

The block-hash list (the raw 32-byte digests of each block, concatenated) is what a device checks
each downloaded block against; its own SHA-256 is signed in the bundle descriptor. The two hashes
run on two threads (hashlib releases the GIL on large buffers), so hashing both costs about as
much wall time as hashing once.
"""

from __future__ import annotations

import hashlib
from collections import deque
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


def block_list_sha256(block_list: bytes) -> str:
    return hashlib.sha256(block_list).hexdigest()


def digest_file(f: BinaryIO, block_size: int, *, limit: int | None = None) -> FileDigests:
    """Hash ``f`` from its start: the whole file and each ``block_size`` block.

    ``limit`` stops reading after that many bytes (the caller then compares sizes).
    """
    chunk_bytes = max(block_size, CHUNK_BYTES - CHUNK_BYTES % block_size)
    whole = hashlib.sha256()
    blocks: list[bytes] = []
    size = 0
    pending: deque[Future[None]] = deque()
    f.seek(0)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256") as pool:
        while limit is None or size < limit:
            want = chunk_bytes if limit is None else min(chunk_bytes, limit - size)
            chunk = f.read(want)
            if not chunk:
                break
            pending.append(pool.submit(whole.update, chunk))
            view = memoryview(chunk)
            for start in range(0, len(chunk), block_size):
                blocks.append(hashlib.sha256(view[start : start + block_size]).digest())
            size += len(chunk)
            while len(pending) > 1:
                pending.popleft().result()
            if len(chunk) % block_size:
                # A short read ends the file; anything after it would misalign the blocks.
                if f.read(1):
                    raise OSError("short read in the middle of a file")
                break
        while pending:
            pending.popleft().result()
    return FileDigests(size=size, sha256=whole.hexdigest(), block_size=block_size, blocks=tuple(blocks))
