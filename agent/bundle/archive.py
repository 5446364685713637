"""The bundle archive: a POSIX ustar file whose large members start on block boundaries.

Why tar: technicians can list a bundle with ``tar tvf``, and every member is stored, not
compressed (model weights barely compress), so no decompression bomb can exist.

Layout, in order: ``manifest.json``; the members smaller than one block, packed densely; then
each larger member with its data starting at a multiple of the block size. The gap in front of
an aligned member is filled by a pax extended header holding only a ``comment`` record, so the
archive stays a standard tar that GNU tar, bsdtar and Python's ``tarfile`` read, while a member
that is unchanged between two versions yields identical blocks -- its tail block included, since
the filler after it depends only on its own size. A device that holds those blocks from the
previous bundle does not fetch them again.

The reader here is deliberately small and strict: ustar headers with POSIX magic, checksums
checked, regular files only, pax records limited to a known set. Anything else is refused before
a byte is written.
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO

from agent.errors import ArchiveError, SizeLimitError, UnsafeMemberTypeError, UnsafePathError

BLOCK = 512
_ZERO = bytes(BLOCK)

_TYPE_NAMES = {
    b"1": "hardlink",
    b"2": "symlink",
    b"3": "character device",
    b"4": "block device",
    b"5": "directory",
    b"6": "fifo",
    b"7": "contiguous file",
    b"g": "global pax header",
    b"L": "GNU long name",
    b"K": "GNU long link name",
    b"S": "GNU sparse file",
    b"D": "GNU directory dump",
    b"M": "GNU multi-volume continuation",
    b"V": "GNU volume label",
}
_PAX_IGNORED = {"comment", "mtime", "atime", "ctime", "uid", "gid", "uname", "gname"}
_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-/")
MAX_NAME_BYTES = 100
MAX_PAX_RECORDS = 16


def _pad(size: int) -> int:
    return -size % BLOCK


# -- writing ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """A member to write: its name, size and a way to open its bytes."""

    name: str
    size: int
    open: Callable[[], BinaryIO]


def _header(name: str, size: int, typeflag: bytes = tarfile.REGTYPE) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = typeflag
    return info.tobuf(format=tarfile.USTAR_FORMAT, encoding="ascii", errors="strict")


def _filler(length: int) -> bytes:
    """A pax extended header of exactly ``length`` bytes (header + data) holding a comment."""
    data_len = length - BLOCK
    if data_len < BLOCK or data_len % BLOCK:
        raise ValueError(f"filler length {length} is not possible")
    digits = len(str(data_len))
    record = b"%d comment=%s\n" % (data_len, b" " * (data_len - digits - len(" comment=\n")))
    assert len(record) == data_len
    return _header("././@PaxHeader", data_len, tarfile.XHDTYPE) + record


def write_archive(out: BinaryIO, members: Sequence[Source], block_size: int) -> int:
    """Write ``members`` (the first one is written first, as is) and return the archive size."""
    if not members:
        raise ValueError("an archive needs at least one member")
    first, rest = members[0], sorted(members[1:], key=lambda m: (m.size >= block_size, m.name))
    offset = 0

    def emit(blob: bytes) -> None:
        nonlocal offset
        out.write(blob)
        offset += len(blob)

    for member in [first, *rest]:
        if member.size >= block_size:
            gap = -(offset + BLOCK) % block_size  # room before the header, so data is aligned
            # Always at least one whole filler block past the boundary: the bytes after the
            # previous member's data then depend only on that member's size.
            emit(_filler(gap + block_size))
        emit(_header(member.name, member.size))
        with member.open() as src:
            copied = 0
            while chunk := src.read(min(1 << 20, member.size - copied)):
                out.write(chunk)
                copied += len(chunk)
            if copied != member.size or src.read(1):
                raise ArchiveError(f"{member.name} changed size while the bundle was written")
        offset += member.size
        emit(bytes(_pad(member.size)))
    emit(_ZERO * 2)
    return offset


# -- reading ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemberInfo:
    name: str
    offset: int  # of the data
    size: int


def check_member_name(name: str) -> None:
    """Refuse any name that could leave the target directory or confuse a filesystem."""
    if not name:
        raise UnsafePathError("empty member name")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise UnsafePathError(f"absolute member name {name!r}")
    if "\\" in name:
        raise UnsafePathError(f"backslash in member name {name!r}")
    parts = name.split("/")
    if ".." in parts:
        raise UnsafePathError(f"member name {name!r} climbs out with '..'")
    if any(p in ("", ".") for p in parts):
        raise UnsafePathError(f"member name {name!r} has an empty or '.' component")
    if any(p.startswith(".") for p in parts):
        raise UnsafePathError(f"member name {name!r} has a hidden component")
    if not set(name) <= _NAME_CHARS:
        raise UnsafePathError(f"member name {name!r} has characters outside [A-Za-z0-9._-/]")
    if len(name.encode()) > MAX_NAME_BYTES:
        raise UnsafePathError(f"member name {name[:40]!r}... is longer than {MAX_NAME_BYTES} bytes")


def _number(field: bytes, what: str) -> int:
    if field[:1] and field[0] & 0x80:
        raise ArchiveError(f"{what}: base-256 numbers are not supported")
    digits = field.split(b"\0", 1)[0].strip(b" ")
    if not digits:
        return 0
    if not all(48 <= c <= 55 for c in digits):
        raise ArchiveError(f"{what}: {digits!r} is not an octal number")
    return int(digits, 8)


def _text(field: bytes, what: str) -> str:
    try:
        return field.split(b"\0", 1)[0].decode("utf-8")
    except UnicodeDecodeError:
        raise ArchiveError(f"{what} is not UTF-8") from None


def _check_header(hdr: bytes, pos: int) -> None:
    if hdr[257:263] != b"ustar\0" or hdr[263:265] != b"00":
        raise ArchiveError(f"header at byte {pos} is not a POSIX ustar header")
    stored = _number(hdr[148:156], f"checksum at byte {pos}")
    computed = sum(hdr[:148]) + 8 * 32 + sum(hdr[156:])
    if stored != computed:
        raise ArchiveError(f"header at byte {pos} fails its checksum")


def _parse_pax(data: bytes) -> dict[str, str]:
    records: dict[str, str] = {}
    pos = 0
    count = 0
    while pos < len(data):
        if data[pos] == 0:  # NUL padding ends the records; it must run to the end
            if data.count(0, pos) != len(data) - pos:
                raise ArchiveError("malformed pax record")
            break
        count += 1
        if count > MAX_PAX_RECORDS:
            raise ArchiveError(f"more than {MAX_PAX_RECORDS} pax records")
        space = data.find(b" ", pos, pos + 20)
        if space < 0:
            raise ArchiveError("malformed pax record")
        try:
            length = int(data[pos:space].decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raise ArchiveError("malformed pax record length") from None
        end = pos + length
        if length <= space - pos + 1 or end > len(data) or data[end - 1 : end] != b"\n":
            raise ArchiveError("malformed pax record")
        key, eq, value = data[space + 1 : end - 1].partition(b"=")
        if not eq:
            raise ArchiveError("malformed pax record")
        try:
            k, v = key.decode("utf-8"), value.decode("utf-8")
        except UnicodeDecodeError:
            raise ArchiveError("pax record is not UTF-8") from None
        if k not in _PAX_IGNORED and k not in ("path", "size"):
            raise ArchiveError(f"unsupported pax record {k!r}")
        if k in records and k != "comment":
            raise ArchiveError(f"pax record {k!r} given twice")
        records[k] = v
        pos = end
    return records


def iter_members(
    f: BinaryIO, file_size: int, *, max_members: int, max_member_bytes: int, max_pax_bytes: int
) -> Iterator[MemberInfo]:
    """Yield the regular-file members of the archive ``f``; refuse everything else.

    Checks here: header shape and checksum, member type, name safety, per-member size cap,
    member count. The caller checks sizes against the manifest and that data lies in the file.
    """
    pos = 0
    pax: dict[str, str] | None = None
    count = 0
    while True:
        f.seek(pos)
        hdr = f.read(BLOCK)
        if len(hdr) < BLOCK:
            raise ArchiveError("archive is truncated: no end-of-archive marker")
        if hdr == _ZERO:
            if pax is not None:
                raise ArchiveError("pax header at the end of the archive")
            _check_trailer(f, pos + BLOCK, file_size)
            return
        _check_header(hdr, pos)
        typeflag = hdr[156:157]
        name = _text(hdr[345:500], "name prefix")
        name = f"{name}/{_text(hdr[0:100], 'name')}" if name else _text(hdr[0:100], "name")
        size = _number(hdr[124:136], f"size of {name!r}")
        if typeflag == tarfile.XHDTYPE:
            if pax is not None:
                raise ArchiveError("two pax headers in a row")
            if size > max_pax_bytes:
                raise SizeLimitError(f"pax header of {size} bytes; the limit is {max_pax_bytes}")
            data = f.read(size)
            if len(data) != size:
                raise ArchiveError("archive is truncated inside a pax header")
            pax = _parse_pax(data)
            pos += BLOCK + size + _pad(size)
            continue
        if typeflag not in (tarfile.REGTYPE, tarfile.AREGTYPE):
            kind = _TYPE_NAMES.get(typeflag, f"member of type {typeflag!r}")
            raise UnsafeMemberTypeError(f"{name!r} is a {kind}; bundles hold regular files only")
        if pax:
            name = pax.get("path", name)
            if "size" in pax:
                # ASCII digits only ("²".isdigit() is true, int() refuses it), and few enough
                # that int() accepts them (it refuses strings over 4300 digits).
                digits = pax["size"]
                if not (digits.isascii() and digits.isdigit()) or len(digits) > 20:
                    raise ArchiveError(f"pax size of {name!r} is not a number")
                size = int(pax["size"])
        pax = None
        check_member_name(name)
        if size > max_member_bytes:
            raise SizeLimitError(
                f"member {name!r} claims {size} bytes; the limit is {max_member_bytes}"
            )
        count += 1
        if count > max_members:
            raise SizeLimitError(f"more than {max_members} members")
        yield MemberInfo(name=name, offset=pos + BLOCK, size=size)
        pos += BLOCK + size + _pad(size)


def _check_trailer(f: BinaryIO, pos: int, file_size: int) -> None:
    f.seek(pos)
    remaining = file_size - pos
    while remaining > 0:
        chunk = f.read(min(remaining, 1 << 16))
        if not chunk:
            break
        if chunk.count(0) != len(chunk):
            raise ArchiveError("data after the end-of-archive marker")
        remaining -= len(chunk)


def copy_range(src: BinaryIO, offset: int, size: int, *sinks: Callable[[bytes], object]) -> None:
    """Read ``size`` bytes at ``offset`` of ``src`` in chunks and pass each chunk to every sink."""
    src.seek(offset)
    left = size
    while left:
        chunk = src.read(min(left, 1 << 20))
        if not chunk:
            raise ArchiveError("archive is truncated inside a member")
        for sink in sinks:
            sink(chunk)
        left -= len(chunk)


__all__ = [
    "MemberInfo",
    "Source",
    "check_member_name",
    "copy_range",
    "iter_members",
    "write_archive",
]
