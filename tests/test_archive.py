"""Hostile bundle archives, safe unpacking, and block alignment.

Each hostile archive is a real tar (written with :mod:`tarfile`, or a header crafted by hand where
tarfile will not write the lie) whose first member is a valid ``manifest.json``; the matching
``manifest_sha256`` is passed to :func:`unpack_bundle`, so the manifest check passes and the
hostile member is what gets refused. Every refusal is pinned to its exact exception class and
checked to have written nothing: the whole temp tree (paths, sizes, mtimes) is unchanged, the
destination does not exist and no ``.unpack`` directory is left behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import stat
import subprocess
import tarfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import agent.bundle.unpack as unpack_module
from agent.bundle.archive import BLOCK, Source, check_member_name, write_archive
from agent.bundle.blocks import digest_file
from agent.bundle.limits import BundleLimits, GiB
from agent.bundle.manifest import MANIFEST_NAME, FileEntry, Manifest, TensorSpec, Variant
from agent.bundle.reader import read_index
from agent.bundle.unpack import unpack_bundle
from agent.errors import (
    ArchiveError,
    BadContentError,
    DigestMismatchError,
    DuplicateMemberError,
    FormatError,
    MemberSizeError,
    SizeLimitError,
    StorageError,
    UnsafeMemberTypeError,
    UnsafePathError,
)
from agent.testing.models import make_onnx

PROPERTY = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])

MODEL = "variants/onnx-fp32/model.onnx"
DATA = "variants/onnx-fp32/weights.bin"
MODEL_BYTES = bytes(range(256)) * 20  # 5120 bytes: aligned when the block size is 4096
DATA_BYTES = b"external weights\n" * 30


# -- helpers -------------------------------------------------------------------------------------
def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_manifest(
    files: Mapping[str, bytes], *, sizes: Mapping[str, int] | None = None, **over: object
) -> Manifest:
    """A valid manifest listing ``files`` (name -> bytes); ``sizes`` overrides listed sizes."""
    sizes = sizes or {}
    entries = [
        FileEntry(path=name, size=sizes.get(name, len(data)), sha256=sha256(data))
        for name, data in files.items()
    ]
    fields: dict[str, object] = {
        "name": "tiny",
        "version": "1.0.0",
        "release": 1,
        "block_size": 4096,
        "variants": [
            Variant(
                id="onnx-fp32",
                format="onnx",
                precision="fp32",
                entrypoint=entries[0].path,
                files=entries,
                inputs=[TensorSpec(name="x", datatype="FP32", shape=[-1, 4])],
                outputs=[TensorSpec(name="y", datatype="FP32", shape=[-1, 2])],
            )
        ],
    }
    fields.update(over)
    return Manifest(**fields)  # type: ignore[arg-type]


MANIFEST = make_manifest({MODEL: MODEL_BYTES, DATA: DATA_BYTES})
MANIFEST_BYTES = MANIFEST.to_bytes()

Member = tuple[tarfile.TarInfo, bytes | None]


def reg(name: str, data: bytes, **pax: str) -> Member:
    """A regular-file member; ``pax`` records go in a pax header in front of it."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    if pax:
        info.pax_headers = dict(pax)
    return info, data


def node(name: str, typeflag: bytes, **attrs: object) -> Member:
    """A member of any other type (symlink, device, ...), no data."""
    info = tarfile.TarInfo(name)
    info.type = typeflag
    info.mode = 0o644
    for key, value in attrs.items():
        setattr(info, key, value)
    return info, None


def tar_bytes(members: Sequence[Member], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for info, data in members:
            tar.addfile(info, None if data is None else io.BytesIO(data))
    return buf.getvalue()


def archive(*members: Member, manifest: bytes = MANIFEST_BYTES) -> bytes:
    """``manifest.json`` first, then ``members``."""
    return tar_bytes([reg(MANIFEST_NAME, manifest), *members])


def valid_members() -> list[Member]:
    return [reg(MODEL, MODEL_BYTES), reg(DATA, DATA_BYTES)]


def header(name: str, size: int, typeflag: bytes = tarfile.REGTYPE) -> bytes:
    """One ustar header, written by hand so that it can claim any size without the data."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.type = typeflag
    info.mode = 0o644
    return info.tobuf(format=tarfile.USTAR_FORMAT, encoding="ascii", errors="strict")


def member_blob(name: str, data: bytes) -> bytes:
    return header(name, len(data)) + data + bytes(-len(data) % BLOCK)


def fix_checksums(data: bytearray) -> None:
    """Recompute the checksum of every block that looks like a ustar header."""
    for pos in range(0, len(data) - BLOCK + 1, BLOCK):
        hdr = data[pos : pos + BLOCK]
        if hdr[257:263] == b"ustar\0":
            checksum = sum(hdr[:148]) + 8 * 32 + sum(hdr[156:])
            data[pos + 148 : pos + 156] = b"%06o\0 " % checksum


def header_positions(data: bytes) -> list[int]:
    return [pos for pos in range(0, len(data), BLOCK) if data[pos + 257 : pos + 263] == b"ustar\0"]


Snapshot = dict[str, tuple[bool, int | None, int | None]]


def snapshot(root: Path, *, dir_mtimes: bool = True) -> Snapshot:
    """Every path under ``root`` (root included): is-dir, size of files, mtime.

    With ``dir_mtimes``, directory mtimes count too: then even a temp directory that was made
    and removed again shows up as a change.
    """
    out: Snapshot = {}
    paths = [root]
    for dirpath, dirnames, filenames in os.walk(root):
        paths.extend(Path(dirpath, n) for n in dirnames + filenames)
    for path in paths:
        st_ = path.lstat()
        is_dir = stat.S_ISDIR(st_.st_mode)
        mtime = st_.st_mtime_ns if dir_mtimes or not is_dir else None
        out[str(path.relative_to(root))] = (is_dir, None if is_dir else st_.st_size, mtime)
    return out


def assert_refused(
    tmp_path: Path,
    data: bytes,
    exc: type[BaseException],
    *,
    manifest: bytes = MANIFEST_BYTES,
    manifest_sha256: str | None = None,
    limits: BundleLimits | None = None,
    match: str | None = None,
    dir_mtimes: bool = True,
) -> BaseException:
    """Unpack ``data`` and check it fails with exactly ``exc`` and leaves no trace."""
    bundle = tmp_path / "hostile.emb"
    bundle.write_bytes(data)
    target = tmp_path / "models"
    target.mkdir()
    dest = target / "tiny-1.0.0"
    before = snapshot(tmp_path, dir_mtimes=dir_mtimes)
    with pytest.raises(exc, match=match) as excinfo:
        unpack_bundle(
            bundle, dest, manifest_sha256=manifest_sha256 or sha256(manifest), limits=limits
        )
    assert type(excinfo.value) is exc, repr(excinfo.value)
    assert snapshot(tmp_path, dir_mtimes=dir_mtimes) == before
    assert not dest.exists()
    assert not dest.is_symlink()
    assert os.listdir(target) == []  # no ".tiny-1.0.0.*.unpack" left behind
    return excinfo.value


# -- sanity: the helpers make a bundle that unpacks ----------------------------------------------
def test_crafted_bundle_unpacks(tmp_path: Path) -> None:
    bundle = tmp_path / "ok.emb"
    bundle.write_bytes(archive(*valid_members()))
    manifest = unpack_bundle(bundle, tmp_path / "out", manifest_sha256=sha256(MANIFEST_BYTES))
    assert manifest == MANIFEST
    assert (tmp_path / "out" / MODEL).read_bytes() == MODEL_BYTES
    assert (tmp_path / "out" / DATA).read_bytes() == DATA_BYTES
    assert (tmp_path / "out" / MANIFEST_NAME).read_bytes() == MANIFEST_BYTES
    assert sorted(os.listdir(tmp_path)) == ["ok.emb", "out"]


# -- names ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name",
    [
        "../x",
        "/etc/x",
        "a/../../x",
        "variants/..",
        "a\\b",
        "..\\..\\x",
        ".x",
        "variants/.x",
        "./x",
        "a//b",
        "a/",
        "C:x",
        "a b",
        "a\tb",
    ],
)
def test_unsafe_member_name_is_refused(tmp_path: Path, name: str) -> None:
    data = archive(reg(name, b"owned\n"), *valid_members())
    assert_refused(tmp_path, data, UnsafePathError)


def test_non_ascii_name_in_pax_path_is_refused(tmp_path: Path) -> None:
    data = archive(reg(MODEL, MODEL_BYTES, path="variants/onnx-fp32/modèle.onnx"), *valid_members())
    assert_refused(tmp_path, data, UnsafePathError, match="characters outside")


def test_pax_path_that_climbs_out_is_refused(tmp_path: Path) -> None:
    # The ustar name field says MODEL; the pax record that overrides it says otherwise.
    data = archive(reg(MODEL, MODEL_BYTES, path="../../etc/passwd"), reg(DATA, DATA_BYTES))
    assert_refused(tmp_path, data, UnsafePathError, match="climbs out")


def test_name_longer_than_one_ustar_field_is_refused(tmp_path: Path) -> None:
    long_name = "/".join(["d" * 60] * 3)  # needs a pax path or the ustar prefix field
    data = archive(reg(long_name, b"x"), *valid_members())
    assert_refused(tmp_path, data, UnsafePathError, match="longer than")


def test_check_member_name_accepts_ordinary_names() -> None:
    for name in (MODEL, "manifest.json", "samples/case-000/in0.npy", "a_b-c.d/e"):
        check_member_name(name)


# -- member types --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("member", "kind"),
    [
        (node(MODEL, tarfile.SYMTYPE, linkname="/etc/passwd"), "symlink"),
        (node(MODEL, tarfile.LNKTYPE, linkname=MANIFEST_NAME), "hardlink"),
        (node(MODEL, tarfile.CHRTYPE, devmajor=1, devminor=3), "character device"),
        (node(MODEL, tarfile.BLKTYPE, devmajor=8, devminor=0), "block device"),
        (node(MODEL, tarfile.FIFOTYPE), "fifo"),
        (node("variants", tarfile.DIRTYPE, mode=0o755), "directory"),
        (node(MODEL, tarfile.GNUTYPE_SPARSE), "GNU sparse file"),
        (node(MODEL, tarfile.CONTTYPE), "contiguous file"),
        (node(MODEL, b"Z"), "member of type"),
    ],
    ids=["symlink", "hardlink", "chardev", "blockdev", "fifo", "dir", "sparse", "contig", "other"],
)
def test_non_regular_member_is_refused(tmp_path: Path, member: Member, kind: str) -> None:
    data = archive(member, *valid_members())
    error = assert_refused(tmp_path, data, UnsafeMemberTypeError)
    assert kind in str(error)


@pytest.mark.parametrize(("typeflag", "kind"), [(b"L", "GNU long name"), (b"g", "global pax")])
def test_gnu_and_global_headers_are_refused(tmp_path: Path, typeflag: bytes, kind: str) -> None:
    record = b"./x\0"
    bad = header("././@LongLink", len(record), typeflag) + record + bytes(BLOCK - len(record))
    data = member_blob(MANIFEST_NAME, MANIFEST_BYTES) + bad + bytes(2 * BLOCK)
    error = assert_refused(tmp_path, data, UnsafeMemberTypeError)
    assert kind in str(error)


# -- duplicates and sizes ------------------------------------------------------------------------
def test_duplicate_member_is_refused(tmp_path: Path) -> None:
    data = archive(*valid_members(), reg(DATA, DATA_BYTES))
    assert_refused(tmp_path, data, DuplicateMemberError)


def test_second_manifest_is_a_duplicate(tmp_path: Path) -> None:
    data = archive(*valid_members(), reg(MANIFEST_NAME, MANIFEST_BYTES))
    assert_refused(tmp_path, data, DuplicateMemberError)


def test_member_larger_than_signed_size_is_refused(tmp_path: Path) -> None:
    data = archive(reg(MODEL, MODEL_BYTES + b"\0" * 100), reg(DATA, DATA_BYTES))
    error = assert_refused(tmp_path, data, MemberSizeError)
    assert str(len(MODEL_BYTES) + 100) in str(error)


def test_member_smaller_than_signed_size_is_refused(tmp_path: Path) -> None:
    data = archive(reg(MODEL, MODEL_BYTES[:-1]), reg(DATA, DATA_BYTES))
    assert_refused(tmp_path, data, MemberSizeError)


def test_header_claiming_a_huge_size_is_refused(tmp_path: Path) -> None:
    # 8 GiB - 1, the largest ustar size, and no data behind it: refused from the header alone.
    data = member_blob(MANIFEST_NAME, MANIFEST_BYTES) + header(MODEL, 8 * GiB - 1)
    assert_refused(tmp_path, data, SizeLimitError, match="claims")


def test_member_over_a_small_member_cap_is_refused(tmp_path: Path) -> None:
    # The manifest lists 600 bytes (under the cap) but the header claims more than the cap.
    small = make_manifest({DATA: DATA_BYTES[:600]})
    data = archive(reg(DATA, DATA_BYTES * 2), manifest=small.to_bytes())
    limits = BundleLimits(max_member_bytes=1000)
    assert_refused(tmp_path, data, SizeLimitError, manifest=small.to_bytes(), limits=limits)


def test_manifest_over_the_unpacked_cap_is_refused(tmp_path: Path) -> None:
    # Five members of almost 4 GiB each: every one under the member cap, 20 GiB together.
    names = [f"variants/onnx-fp32/part{i}.bin" for i in range(5)]
    big = make_manifest(
        {n: n.encode() for n in names}, sizes=dict.fromkeys(names, 4 * GiB - 1)
    ).to_bytes()
    data = archive(manifest=big)
    assert_refused(tmp_path, data, SizeLimitError, manifest=big, match="unpacks to")


def test_manifest_over_a_small_unpacked_cap_is_refused(tmp_path: Path) -> None:
    limits = BundleLimits(max_unpacked_bytes=len(MODEL_BYTES))
    data = archive(*valid_members())
    assert_refused(tmp_path, data, SizeLimitError, limits=limits, match="unpacks to")


def test_too_many_members_in_the_archive_are_refused(tmp_path: Path) -> None:
    limits = BundleLimits(max_members=3)
    data = archive(*valid_members(), reg("variants/onnx-fp32/extra.bin", b"x"))
    assert_refused(tmp_path, data, SizeLimitError, limits=limits, match="more than 3 members")


def test_manifest_listing_too_many_members_is_refused(tmp_path: Path) -> None:
    limits = BundleLimits(max_members=2)  # the manifest plus one file
    data = archive(*valid_members())
    assert_refused(tmp_path, data, SizeLimitError, limits=limits, match="lists 2 files")


def test_oversized_pax_header_is_refused(tmp_path: Path) -> None:
    # A pax header claiming 3 MiB with nothing behind it: refused before it is read.
    pax = header("././@PaxHeader", 3 << 20, tarfile.XHDTYPE)
    data = member_blob(MANIFEST_NAME, MANIFEST_BYTES) + pax
    assert_refused(tmp_path, data, SizeLimitError, match="pax header")


def test_pax_header_over_a_small_cap_is_refused(tmp_path: Path) -> None:
    data = archive(reg(MODEL, MODEL_BYTES, comment=" " * 2000), reg(DATA, DATA_BYTES))
    limits = BundleLimits(max_pax_header_bytes=1024)
    assert_refused(tmp_path, data, SizeLimitError, limits=limits, match="pax header")


# -- archive structure ---------------------------------------------------------------------------
def test_member_not_in_the_manifest_is_refused(tmp_path: Path) -> None:
    data = archive(*valid_members(), reg("variants/onnx-fp32/extra.bin", b"extra"))
    assert_refused(tmp_path, data, ArchiveError, match="not listed")


def test_listed_member_missing_is_refused(tmp_path: Path) -> None:
    data = archive(reg(MODEL, MODEL_BYTES))
    assert_refused(tmp_path, data, ArchiveError, match="missing")


def test_manifest_not_first_is_refused(tmp_path: Path) -> None:
    data = tar_bytes([reg(MODEL, MODEL_BYTES), reg(MANIFEST_NAME, MANIFEST_BYTES)])
    assert_refused(tmp_path, data, ArchiveError, match="first member")


def test_empty_archive_is_refused(tmp_path: Path) -> None:
    assert_refused(tmp_path, tar_bytes([]), ArchiveError, match="no members")


def test_bad_header_checksum_is_refused(tmp_path: Path) -> None:
    data = bytearray(archive(*valid_members()))
    second = header_positions(bytes(data))[1]
    assert data[second : second + len(MODEL)] == MODEL.encode()
    data[second + 100 + 6] ^= 0x01  # mode 0000644 -> 0000645, checksum left as it was
    assert_refused(tmp_path, bytes(data), ArchiveError, match="checksum")


def test_gnu_magic_is_refused(tmp_path: Path) -> None:
    data = tar_bytes([reg(MANIFEST_NAME, MANIFEST_BYTES), *valid_members()], tarfile.GNU_FORMAT)
    assert_refused(tmp_path, data, ArchiveError, match="not a POSIX ustar header")


@pytest.mark.parametrize(
    ("size_field", "message"),
    [(b"\x80" + bytes(10) + b"\x01", "base-256"), (b"0000000009x\0", "not an octal number")],
    ids=["base256", "not-octal"],
)
def test_odd_size_field_is_refused(tmp_path: Path, size_field: bytes, message: str) -> None:
    data = bytearray(archive(*valid_members()))
    second = header_positions(bytes(data))[1]
    data[second + 124 : second + 136] = size_field
    fix_checksums(data)
    assert_refused(tmp_path, bytes(data), ArchiveError, match=message)


@pytest.mark.parametrize("size", ["²", "1" * 5000, "-1", "0x10", " 5"])
def test_pax_size_that_is_not_a_plain_number_is_refused(tmp_path: Path, size: str) -> None:
    # "²".isdigit() is true and int() refuses it; int() also refuses over 4300 digits.
    data = archive(reg(MODEL, MODEL_BYTES, size=size), reg(DATA, DATA_BYTES))
    assert_refused(tmp_path, data, ArchiveError, match="pax size")


@pytest.mark.parametrize(
    "records",
    [{"linkpath": "/etc/passwd"}, {"GNU.sparse.map": "0,1"}, {"SCHILY.xattr.user.x": "y"}],
    ids=["linkpath", "gnu-sparse", "xattr"],
)
def test_unknown_pax_records_are_refused(tmp_path: Path, records: dict[str, str]) -> None:
    data = archive(reg(MODEL, MODEL_BYTES, **records), reg(DATA, DATA_BYTES))
    assert_refused(tmp_path, data, ArchiveError, match="unsupported pax record")


@pytest.mark.parametrize("junk", [b"\x01", b"PK\x03\x04 a zip behind the tar"])
def test_data_after_the_end_marker_is_refused(tmp_path: Path, junk: bytes) -> None:
    data = archive(*valid_members()) + junk
    assert_refused(tmp_path, data, ArchiveError, match="after the end-of-archive")


def test_member_hidden_after_the_end_marker_is_refused(tmp_path: Path) -> None:
    clean = archive(*valid_members())
    data = clean + member_blob("variants/onnx-fp32/extra.bin", b"smuggled")
    assert_refused(tmp_path, data, ArchiveError, match="after the end-of-archive")


@pytest.mark.parametrize("where", ["no-end-marker", "inside-member", "inside-header"])
def test_truncated_archive_is_refused(tmp_path: Path, where: str) -> None:
    full = archive(*valid_members())
    last = header_positions(full)[-1]  # DATA's header
    end = last + BLOCK + len(DATA_BYTES) + (-len(DATA_BYTES) % BLOCK)
    cut = {"no-end-marker": end, "inside-member": last + BLOCK + 10, "inside-header": last + 300}
    assert_refused(tmp_path, full[: cut[where]], ArchiveError, match="truncated")


# -- digests -------------------------------------------------------------------------------------
def test_member_with_other_bytes_is_refused_and_cleaned_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Same size, other bytes, in the member written last: the others are already on disk in
    # the temp directory when the mismatch is found, so this exercises the cleanup.
    tampered = bytearray(DATA_BYTES)
    tampered[-1] ^= 0xFF
    data = archive(reg(MODEL, MODEL_BYTES), reg(DATA, bytes(tampered)))
    copied: list[int] = []
    real_copy = unpack_module.copy_range

    def spy(src: object, offset: int, size: int, *sinks: Callable[[bytes], object]) -> None:
        copied.append(size)
        real_copy(src, offset, size, *sinks)  # type: ignore[arg-type]

    monkeypatch.setattr(unpack_module, "copy_range", spy)
    error = assert_refused(tmp_path, data, DigestMismatchError, dir_mtimes=False)
    assert repr(DATA) in str(error)
    assert copied == [len(MODEL_BYTES), len(DATA_BYTES)]  # the first member was written


def test_wrong_manifest_digest_is_refused(tmp_path: Path) -> None:
    data = archive(*valid_members())
    error = assert_refused(tmp_path, data, DigestMismatchError, manifest_sha256="0" * 64)
    assert MANIFEST_NAME in str(error)


def test_manifest_altered_after_signing_is_refused(tmp_path: Path) -> None:
    # A manifest that lists the attacker's bytes is valid, but not the one that was signed.
    evil = make_manifest({MODEL: b"evil" * 10, DATA: DATA_BYTES}).to_bytes()
    data = archive(reg(MODEL, b"evil" * 10), reg(DATA, DATA_BYTES), manifest=evil)
    assert_refused(
        tmp_path, data, DigestMismatchError, manifest=evil, manifest_sha256=sha256(MANIFEST_BYTES)
    )


# -- malformed manifests -------------------------------------------------------------------------
def _manifest_doc() -> dict[str, object]:
    return json.loads(MANIFEST_BYTES)


def _with(**over: object) -> bytes:
    doc = _manifest_doc()
    doc.update(over)
    return json.dumps(doc).encode()


def _with_file(**over: object) -> bytes:
    doc = _manifest_doc()
    doc["variants"][0]["files"][0].update(over)  # type: ignore[index]
    return json.dumps(doc).encode()


BAD_MANIFESTS = {
    "not-json": b"{not json",
    "empty": b"",
    "list": b"[]",
    "not-utf8": MANIFEST_BYTES.replace(b"tiny", b"t\xffny"),
    "utf16": MANIFEST_BYTES.decode().encode("utf-16"),
    "release-as-string": _with(release="1"),
    "release-as-float": _with(release=1.0),
    "release-as-bool": _with(release=True),
    "release-zero": _with(release=0),
    "block-size-not-power-of-two": _with(block_size=5000),
    "bad-version": _with(version="1.0"),
    "unknown-field": _with(extra=1),
    "unknown-file-field": _with_file(mode=493),
    "negative-size": _with_file(size=-1),
    "size-as-string": _with_file(size="5120"),
    "short-sha": _with_file(sha256="ab" * 16),
    "file-path-climbs": _with_file(path="../model.onnx"),
    "file-named-manifest": _with_file(path=MANIFEST_NAME),
    "duplicate-key": b'{"name":"other",' + MANIFEST_BYTES[1:],
    "duplicate-nested-key": MANIFEST_BYTES.replace(b'"size":', b'"size":1,"size":', 1),
    "nan": _with(release=float("nan")),
    "no-variants": _with(variants=[]),
    "wrong-type-tag": _with(type="bundle-descriptor"),
}


@pytest.mark.parametrize("manifest", BAD_MANIFESTS.values(), ids=BAD_MANIFESTS.keys())
def test_malformed_manifest_is_refused(tmp_path: Path, manifest: bytes) -> None:
    assert manifest != MANIFEST_BYTES
    data = archive(*valid_members(), manifest=manifest)
    assert_refused(tmp_path, data, FormatError, manifest=manifest)


def test_manifest_over_its_cap_is_refused(tmp_path: Path) -> None:
    big = _with(description=" " * 1000)
    limits = BundleLimits(max_manifest_bytes=1024)
    data = archive(*valid_members(), manifest=big)
    assert_refused(tmp_path, data, SizeLimitError, manifest=big, limits=limits)


# -- the happy path ------------------------------------------------------------------------------
def test_real_bundle_unpacks_with_every_digest_matching(build, tmp_path: Path) -> None:
    result = build(sample_count=2)
    with open(result.path, "rb") as f:
        index = read_index(f)
    dest = tmp_path / "models" / "tiny"
    dest.parent.mkdir()
    manifest = unpack_bundle(result.path, dest, manifest_sha256=index.manifest_sha256)
    assert manifest == result.manifest == index.manifest
    on_disk = {
        str(p.relative_to(dest)): p for p in dest.rglob("*") if p.is_file() or p.is_symlink()
    }
    assert set(on_disk) == {*manifest.files(), MANIFEST_NAME}
    assert on_disk[MANIFEST_NAME].read_bytes() == index.manifest_bytes
    for name, entry in manifest.files().items():
        data = on_disk[name].read_bytes()
        assert len(data) == entry.size
        assert sha256(data) == entry.sha256
    assert os.listdir(dest.parent) == ["tiny"]


def test_unpack_into_an_existing_directory_is_refused(build, tmp_path: Path) -> None:
    result = build(samples="none")
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "keep").write_bytes(b"mine")
    before = snapshot(tmp_path)
    with open(result.path, "rb") as f:
        digest = read_index(f).manifest_sha256
    with pytest.raises(StorageError, match="already exists"):
        unpack_bundle(result.path, dest, manifest_sha256=digest)
    assert snapshot(tmp_path) == before


# -- alignment -----------------------------------------------------------------------------------
def _covering_blocks(offset: int, size: int, block_size: int) -> range:
    return range(offset // block_size, (offset + size - 1) // block_size + 1)


def test_unchanged_model_keeps_its_blocks_and_alignment(build, tmp_path: Path) -> None:
    block_size = 4096
    model = make_onnx(tmp_path / "wide.onnx", inputs=256, outputs=64)  # 64 KiB of weights
    one = build("1.0.0", models=[model], block_size=block_size, sample_count=2, seed=0)
    two = build("2.0.0-beta.1", models=[model], block_size=block_size, sample_count=6, seed=7)
    with open(one.path, "rb") as f:
        index_one = read_index(f)
        blocks_one = digest_file(f, block_size)
    with open(two.path, "rb") as f:
        index_two = read_index(f)
        blocks_two = digest_file(f, block_size)
    name = one.manifest.variants[0].entrypoint
    assert name == two.manifest.variants[0].entrypoint
    member_one, member_two = index_one.members[name], index_two.members[name]
    assert member_one.size >= 64 * 1024
    # Other samples and a longer version moved the model: the test compares shifted blocks.
    assert member_one.offset != member_two.offset

    covering = _covering_blocks(member_one.offset, member_one.size, block_size)
    available = set(blocks_two.blocks)
    assert len(covering) == -(-member_one.size // block_size)
    for i in covering:
        assert blocks_one.blocks[i] in available, f"block {i} of the model is not reused"
    # And they are the same blocks, in the same order, at the model's new position.
    shift = (member_two.offset - member_one.offset) // block_size
    assert [blocks_two.blocks[i + shift] for i in covering] == [
        blocks_one.blocks[i] for i in covering
    ]

    for result, index in ((one, index_one), (two, index_two)):
        aligned = [m for m in index.members.values() if m.size >= block_size]
        assert aligned, "no member was large enough to be aligned"
        for member in aligned:
            assert member.offset % block_size == 0, member
        for member in index.members.values():
            assert member.offset % BLOCK == 0
        assert result.path.stat().st_size == index.file_size


def test_aligned_bundle_is_a_standard_tar(build, tmp_path: Path) -> None:
    block_size = 4096
    model = make_onnx(tmp_path / "wide.onnx", inputs=256, outputs=64)
    result = build(models=[model], block_size=block_size, sample_count=2)
    with open(result.path, "rb") as f:
        index = read_index(f)
    expected = {MANIFEST_NAME, *index.members}
    # The pax filler headers really are there (or the alignment test above proves nothing).
    assert b"comment=" in result.path.read_bytes()

    listed = subprocess.run(
        ["/usr/bin/tar", "tf", str(result.path)], capture_output=True, text=True, check=True
    )
    assert listed.stderr == ""
    names = listed.stdout.splitlines()
    assert sorted(names) == sorted(expected)

    with tarfile.open(result.path) as tar:
        infos = tar.getmembers()
        assert sorted(i.name for i in infos) == sorted(expected)
        assert all(i.isreg() for i in infos)
        for info in infos:
            extracted = tar.extractfile(info)
            assert extracted is not None
            data = extracted.read()
            if info.name == MANIFEST_NAME:
                assert data == index.manifest_bytes
            else:
                assert sha256(data) == index.manifest.files()[info.name].sha256
            assert info.offset_data == (
                index.members[info.name].offset if info.name != MANIFEST_NAME else BLOCK
            )


def test_write_archive_aligns_large_members_and_pads_after_each(tmp_path: Path) -> None:
    block_size = 4096
    sources = [
        Source(MANIFEST_NAME, len(MANIFEST_BYTES), lambda: io.BytesIO(MANIFEST_BYTES)),
        Source(MODEL, len(MODEL_BYTES), lambda: io.BytesIO(MODEL_BYTES)),
        Source(DATA, len(DATA_BYTES), lambda: io.BytesIO(DATA_BYTES)),
    ]
    buf = io.BytesIO()
    size = write_archive(buf, sources, block_size)
    assert size == len(buf.getvalue())
    index = read_index(io.BytesIO(buf.getvalue()))
    assert index.members[MODEL].offset % block_size == 0
    assert index.members[DATA].offset < index.members[MODEL].offset  # small ones first
    with pytest.raises(ArchiveError, match="changed size"):
        write_archive(
            io.BytesIO(), [Source(MODEL, 10, lambda: io.BytesIO(MODEL_BYTES[:11]))], block_size
        )


# -- property tests ------------------------------------------------------------------------------
def _small_bundle() -> bytes:
    buf = io.BytesIO()
    write_archive(
        buf,
        [
            Source(MANIFEST_NAME, len(MANIFEST_BYTES), lambda: io.BytesIO(MANIFEST_BYTES)),
            Source(MODEL, len(MODEL_BYTES), lambda: io.BytesIO(MODEL_BYTES)),
            Source(DATA, len(DATA_BYTES), lambda: io.BytesIO(DATA_BYTES)),
        ],
        4096,
    )
    return buf.getvalue()


SMALL_BUNDLE = _small_bundle()
SMALL_HEADERS = header_positions(SMALL_BUNDLE)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=15,
)


@PROPERTY
@given(st.binary(max_size=2048))
@example(b"")
@example(b"{}")
@example(b'{"a":1,"a":2}')
@example(b"[" * 100_000)
@example(b"1" * 5000)
def test_manifest_parser_on_any_bytes(data: bytes) -> None:
    with contextlib.suppress(BadContentError):
        Manifest.from_bytes(data, max_bytes=1 << 20)


@PROPERTY
@given(
    st.dictionaries(
        st.sampled_from(sorted(Manifest.model_fields)) | st.text(max_size=12),
        json_values,
        max_size=6,
    )
)
def test_manifest_parser_on_any_json_object(doc: dict[str, object]) -> None:
    with contextlib.suppress(FormatError, SizeLimitError):
        Manifest.from_bytes(json.dumps(doc).encode(), max_bytes=1 << 20)


_MANIFEST_PATHS = [
    ("name",),
    ("version",),
    ("release",),
    ("block_size",),
    ("variants",),
    ("variants", 0, "files"),
    ("variants", 0, "files", 0, "size"),
    ("variants", 0, "files", 0, "path"),
    ("variants", 0, "entrypoint"),
    ("variants", 0, "inputs", 0, "shape"),
    ("variants", 0, "tolerance"),
    ("samples",),
]


@PROPERTY
@given(st.sampled_from(_MANIFEST_PATHS), json_values)
def test_manifest_parser_on_a_valid_manifest_with_one_value_replaced(
    where: tuple[object, ...], value: object
) -> None:
    doc: object = json.loads(MANIFEST_BYTES)
    parent = doc
    for key in where[:-1]:
        parent = parent[key]  # type: ignore[index]
    parent[where[-1]] = value  # type: ignore[index]
    with contextlib.suppress(FormatError, SizeLimitError):
        Manifest.from_bytes(json.dumps(doc).encode(), max_bytes=1 << 20)


@PROPERTY
@given(st.binary(max_size=4096))
@example(bytes(1024))
@example(SMALL_BUNDLE[:BLOCK])
def test_archive_reader_on_any_bytes(data: bytes) -> None:
    with contextlib.suppress(BadContentError):
        read_index(io.BytesIO(data))


@PROPERTY
@given(
    edits=st.lists(
        st.tuples(st.integers(0, len(SMALL_BUNDLE) - 1), st.integers(0, 255)),
        min_size=1,
        max_size=8,
    ),
    in_headers=st.booleans(),
    fix=st.booleans(),
    cut=st.none() | st.integers(0, len(SMALL_BUNDLE)),
)
def test_archive_reader_on_mutated_bundles(
    edits: list[tuple[int, int]], in_headers: bool, fix: bool, cut: int | None
) -> None:
    data = bytearray(SMALL_BUNDLE)
    for pos, value in edits:
        if in_headers:  # aim at the headers: that is where the parser's decisions are
            pos = SMALL_HEADERS[pos % len(SMALL_HEADERS)] + pos % BLOCK
        data[pos] = value
    if fix:
        fix_checksums(data)
    if cut is not None:
        del data[cut:]
    try:
        index = read_index(io.BytesIO(bytes(data)))
    except BadContentError:
        return
    # Whatever got through is consistent with its manifest.
    files = index.manifest.files()
    assert set(index.members) == set(files)
    for name, member in index.members.items():
        assert member.size == files[name].size
        assert member.offset + member.size <= len(data)


def test_small_bundle_for_the_property_tests_is_valid() -> None:
    index = read_index(io.BytesIO(SMALL_BUNDLE))
    assert index.manifest == MANIFEST
    assert len(SMALL_HEADERS) >= 4  # manifest, DATA, the pax filler, MODEL


# -- parser cost, verify-then-parse, durability ------------------------------------------------
def test_pax_header_with_too_many_records_is_refused(tmp_path: Path) -> None:
    # Thousands of tiny records would make a careless parser quadratic; the count is capped.
    records = b"12 comment=\n" * 20000
    pax = header("././@PaxHeader", len(records), tarfile.XHDTYPE) + records
    pax += bytes(-len(records) % BLOCK)
    data = (
        member_blob(MANIFEST_NAME, MANIFEST_BYTES)
        + pax
        + member_blob(MODEL, MODEL_BYTES)
        + member_blob(DATA, DATA_BYTES)
        + bytes(2 * BLOCK)
    )
    assert_refused(tmp_path, data, ArchiveError, match="more than 16 pax records")


def test_signed_manifest_digest_is_checked_before_the_manifest_is_parsed(tmp_path: Path) -> None:
    garbage = b'{"not": "a manifest"'  # would be a FormatError if it were parsed
    data = archive(*valid_members(), manifest=garbage)
    assert_refused(tmp_path, data, DigestMismatchError, manifest=garbage, manifest_sha256="0" * 64)
    with pytest.raises(DigestMismatchError):
        read_index(io.BytesIO(data), manifest_sha256="0" * 64)


def test_every_file_is_flushed_before_its_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A power cut after unpack must not leave an empty manifest.json behind."""
    synced: dict[str, int] = {}
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        if os.path.isfile(path):
            synced[os.path.basename(path)] = os.fstat(fd).st_size
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    bundle = tmp_path / "b.emb"
    bundle.write_bytes(archive(*valid_members()))
    unpack_bundle(bundle, tmp_path / "out", manifest_sha256=sha256(MANIFEST_BYTES))
    assert synced == {
        MANIFEST_NAME: len(MANIFEST_BYTES),
        "model.onnx": len(MODEL_BYTES),
        "weights.bin": len(DATA_BYTES),
    }
