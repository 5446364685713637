"""Resuming a transfer from what is on disk, without a broker: requests are recorded.

A bitmap is a claim, not proof: on a resume every block it marks is read back and checked
against the signed block-hash list before it counts (a power cut may have written the bitmap
before the data).
"""

from __future__ import annotations

from pathlib import Path

from agent.bundle.blocks import digest_file
from agent.device.transfer import Transfer
from agent.testing.fleet import TOPICS
from agent.testing.models import make_onnx
from agent.transport.fetch import TransferSettings
from agent.transport.messages import BlockReplyHeader, BlockRequest
from agent.trust.envelope import parse_envelope
from agent.trust.metadata import BundleDescriptor

BLOCK = 4096


def _setup(tmp_path: Path, signed) -> tuple[Path, BundleDescriptor, bytes]:  # type: ignore[no-untyped-def]
    model = make_onnx(tmp_path / "m.onnx", inputs=128, outputs=128)
    path, envelope = signed("1.0.0", models=[model], block_size=BLOCK, samples="none")
    descriptor = BundleDescriptor.model_validate_json(parse_envelope(envelope).payload)
    with open(path, "rb") as f:
        block_list = digest_file(f, BLOCK).block_list
    return path, descriptor, block_list


def _transfer(directory: Path, descriptor: BundleDescriptor, asked: list[BlockRequest]) -> Transfer:
    return Transfer(
        descriptor,
        directory,
        device_id="cam-01",
        topics=TOPICS,
        publish=lambda topic, payload: asked.append(BlockRequest.from_bytes(payload)),
        settings=TransferSettings(window=64),
    )


def test_marked_blocks_that_do_not_check_out_are_fetched_again(tmp_path: Path, signed) -> None:  # type: ignore[no-untyped-def]
    path, descriptor, block_list = _setup(tmp_path, signed)
    data = path.read_bytes()
    count = descriptor.block_count
    d = tmp_path / "download"
    d.mkdir()
    (d / "blocklist").write_bytes(block_list)
    part = bytearray(data)
    part[3 * BLOCK + 7] ^= 0xFF  # block 3 is marked but its bytes never reached the disk
    part[5 * BLOCK : 6 * BLOCK] = bytes(BLOCK)  # block 5 too
    (d / "bundle.part").write_bytes(bytes(part))
    marked = set(range(10))
    (d / "bitmap").write_bytes(
        bytes(sum(1 << (i & 7) for i in marked if i >> 3 == byte) for byte in range(-(-count // 8)))
    )
    asked: list[BlockRequest] = []
    transfer = _transfer(d, descriptor, asked)
    transfer.start(0.0)
    assert transfer.have_count == len(marked) - 2
    requested = [i for r in asked for i in r.indexes]
    assert requested[:2] == [3, 5], "the damaged blocks come first, in order"
    assert not (set(requested) & (marked - {3, 5})), "good marked blocks are not fetched"
    # Serve everything asked for until done; the file is then the bundle.
    now = 1.0
    while transfer.state == "blocks":
        request = asked.pop(0)
        for i in request.indexes:
            header = BlockReplyHeader(
                bundle_sha256=descriptor.bundle_sha256, kind="block", index=i, total=count
            )
            transfer.on_reply(header, data[i * BLOCK : (i + 1) * BLOCK], now)
        now += 0.01
    assert transfer.state == "done"
    assert (d / "bundle.part").read_bytes() == data
    assert transfer.fetched_bytes == len(data) - (len(marked) - 2) * BLOCK


def test_a_bitmap_without_its_part_file_is_dropped(tmp_path: Path, signed) -> None:  # type: ignore[no-untyped-def]
    _, descriptor, block_list = _setup(tmp_path, signed)
    d = tmp_path / "download"
    d.mkdir()
    (d / "blocklist").write_bytes(block_list)
    (d / "bitmap").write_bytes(b"\xff" * -(-descriptor.block_count // 8))
    asked: list[BlockRequest] = []
    transfer = _transfer(d, descriptor, asked)
    transfer.start(0.0)
    assert transfer.have_count == 0
    assert asked[0].indexes[0] == 0


def test_a_damaged_stored_block_list_is_fetched_again(tmp_path: Path, signed) -> None:  # type: ignore[no-untyped-def]
    _, descriptor, block_list = _setup(tmp_path, signed)
    d = tmp_path / "download"
    d.mkdir()
    (d / "blocklist").write_bytes(block_list[:-1] + b"\x00")
    asked: list[BlockRequest] = []
    transfer = _transfer(d, descriptor, asked)
    transfer.start(0.0)
    assert transfer.state == "block-list"
    assert asked[0].kind == "block-list"
