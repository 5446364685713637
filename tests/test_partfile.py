"""A download's files: the part file, its bitmap, the stored block list; resume after a restart."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest

from agent.bundle.blocks import LocalBlock
from agent.errors import DiskFullError
from agent.state.partfile import PartFile

BLOCK = 4096
DATA = random.Random(3).randbytes(BLOCK * 11 + 500)  # 12 blocks, the last one short
COUNT = 12
BLOCK_LIST = b"".join(
    hashlib.sha256(DATA[o : o + BLOCK]).digest() for o in range(0, len(DATA), BLOCK)
)


def block(i: int) -> bytes:
    return DATA[i * BLOCK : (i + 1) * BLOCK]


def bits(*marked: int) -> bytes:
    return bytes(sum(1 << (i & 7) for i in marked if i >> 3 == byte) for byte in range(2))


def opened(directory: Path) -> PartFile:
    part = PartFile(directory, size=len(DATA), block_size=BLOCK)
    part.make_dir()
    part.open(BLOCK_LIST, reserve_mb=0)
    return part


def resumed(directory: Path) -> tuple[list[int], int | None]:
    """What a fresh run finds: the blocks that check out, and how many marked ones did not."""
    part = opened(directory)
    found: list[int] = []
    lost = part.resume(found.append)
    part.close()
    return found, lost


def test_a_new_part_file_has_the_bundle_size_and_nothing_to_resume(tmp_path: Path) -> None:
    part = opened(tmp_path / "d")
    assert part.part_path.stat().st_size == len(DATA)
    assert part.bitmap_path.exists()
    found: list[int] = []
    assert part.resume(found.append) is None
    assert found == []
    part.close()
    assert not part.is_open


def test_the_bitmap_round_trips_through_a_restart(tmp_path: Path) -> None:
    part = opened(tmp_path / "d")
    for i in (0, 3, 11):
        part.write(i, block(i))
    part.write_bitmap(bits(0, 3, 11))
    part.sync()
    part.close()
    assert (tmp_path / "d" / "bitmap").read_bytes() == bits(0, 3, 11)
    assert resumed(tmp_path / "d") == ([0, 3, 11], 0)
    with open(tmp_path / "d" / "bundle.part", "rb") as f:
        f.seek(11 * BLOCK)
        assert f.read() == block(11)


def test_marked_blocks_whose_bytes_are_not_there_do_not_count(tmp_path: Path) -> None:
    """A power cut may write the bitmap back before the data: each mark is checked."""
    part = opened(tmp_path / "d")
    part.write(0, block(0))
    part.write(2, block(2)[:-1] + b"\x00")
    part.write_bitmap(bits(0, 1, 2))  # 1 was never written at all
    part.close()
    assert resumed(tmp_path / "d") == ([0], 2)


def test_a_torn_bitmap_is_ignored(tmp_path: Path) -> None:
    part = opened(tmp_path / "d")
    part.write(0, block(0))
    part.close()
    (tmp_path / "d" / "bitmap").write_bytes(b"\x01")  # one byte of two
    assert resumed(tmp_path / "d") == ([], None)


def test_a_bitmap_without_its_part_file_is_removed(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    (d / "bitmap").write_bytes(b"\xff\xff")
    assert resumed(d) == ([], None)
    assert (d / "bitmap").read_bytes() == b""


def test_a_part_file_of_another_size_is_brought_to_the_bundle_size(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    (d / "bundle.part").write_bytes(block(0) + b"extra")
    (d / "bitmap").write_bytes(bits(0))
    assert resumed(d) == ([0], 0)
    assert (d / "bundle.part").stat().st_size == len(DATA)


def test_no_part_file_without_room_for_the_bundle_twice(tmp_path: Path) -> None:
    part = PartFile(tmp_path / "d", size=len(DATA), block_size=BLOCK)
    part.make_dir()
    free_mb = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize >> 20
    with pytest.raises(DiskFullError, match="reserve"):
        part.open(BLOCK_LIST, reserve_mb=free_mb + 1024)
    assert not part.part_path.exists()
    assert not part.is_open


def test_a_block_is_copied_in_only_if_it_checks_out(tmp_path: Path) -> None:
    other = tmp_path / "other.emb"
    other.write_bytes(b"head" + block(1) + block(11))
    part = opened(tmp_path / "d")
    assert part.copy_in(1, LocalBlock(other, 4, BLOCK))
    assert part.copy_in(11, LocalBlock(other, 4 + BLOCK, 500))
    assert not part.copy_in(2, LocalBlock(other, 4, BLOCK)), "other bytes"
    assert not part.copy_in(1, LocalBlock(other, 4, 500)), "another length"
    assert not part.copy_in(1, LocalBlock(tmp_path / "gone.emb", 0, BLOCK)), "unreadable"
    part.write_bitmap(bits(1, 2, 11))
    part.close()
    assert resumed(tmp_path / "d") == ([1, 11], 1)


def test_the_block_list_is_stored_whole(tmp_path: Path) -> None:
    part = PartFile(tmp_path / "d", size=len(DATA), block_size=BLOCK)
    part.make_dir()
    assert part.read_block_list() is None
    part.save_block_list(BLOCK_LIST)
    assert part.read_block_list() == BLOCK_LIST
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["blocklist"], "no temp file"


def test_remove_takes_the_whole_directory(tmp_path: Path) -> None:
    part = opened(tmp_path / "d")
    part.save_block_list(BLOCK_LIST)
    part.write(0, block(0))
    part.remove()
    assert not part.is_open
    assert not (tmp_path / "d").exists()
    part.remove()  # twice is fine
