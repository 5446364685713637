"""A bundle file against its signed descriptor: every altered byte, swapped file or wrong size.

The descriptor signs the bundle's size, SHA-256, block list and manifest digest; these tests
alter the file after signing and check that :func:`verify_bundle` refuses it with exactly
:class:`DigestMismatchError` (or :class:`SizeLimitError` for a signed size over the cap), says
which part differs, and writes nothing.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.bundle.archive import BLOCK, Source, write_archive
from agent.bundle.limits import BundleLimits
from agent.bundle.manifest import MANIFEST_NAME
from agent.bundle.reader import BundleIndex, read_index
from agent.bundle.unpack import unpack_bundle
from agent.bundle.verify import check_bundle_file
from agent.errors import DigestMismatchError, SizeLimitError
from agent.fleet.sign import reissue_descriptor
from agent.testing.models import make_onnx
from agent.trust.envelope import sign_envelope
from agent.trust.metadata import DESCRIPTOR_TYPE
from agent.verify import verify_bundle
from tests.conftest import NOW, Keys

SignedFn = Callable[..., tuple[Path, bytes]]


def index_of(path: Path) -> BundleIndex:
    with open(path, "rb") as f:
        return read_index(f)


def snapshot(root: Path) -> dict[str, tuple[bool, int, int]]:
    out = {}
    paths = [root]
    for dirpath, dirnames, filenames in os.walk(root):
        paths.extend(Path(dirpath, n) for n in dirnames + filenames)
    for path in paths:
        st_ = path.lstat()
        out[str(path.relative_to(root))] = (
            stat.S_ISDIR(st_.st_mode),
            st_.st_size,
            st_.st_mtime_ns,
        )
    return out


def refused(
    tmp_path: Path,
    path: Path,
    envelope: bytes,
    keys: Keys,
    exc: type[BaseException],
    *,
    limits: BundleLimits | None = None,
) -> str:
    """Verify and check it fails with exactly ``exc`` and changes nothing; return the message."""
    before = snapshot(tmp_path)
    with pytest.raises(exc) as excinfo:
        verify_bundle(path, envelope, keys.state(), NOW, limits)
    assert type(excinfo.value) is exc, repr(excinfo.value)
    assert snapshot(tmp_path) == before
    return str(excinfo.value)


def flip(path: Path, offset: int, mask: int = 0x01) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


def rebuild(path: Path, out: Path, replace: dict[str, bytes] | None = None) -> Path:
    """Write ``path``'s members again with ``write_archive``, some of them with other bytes."""
    index = index_of(path)
    blob = path.read_bytes()
    members = {
        name: blob[m.offset : m.offset + m.size]
        for name, m in sorted(index.members.items(), key=lambda kv: kv[1].offset)
    }
    members.update(replace or {})

    def source(name: str, data: bytes) -> Source:
        return Source(name, len(data), lambda: io.BytesIO(data))

    sources = [source(MANIFEST_NAME, index.manifest_bytes)]
    sources += [source(n, d) for n, d in members.items()]
    with open(out, "wb") as f:
        write_archive(f, sources, index.manifest.block_size)
    return out


# -- the manifest and the members ----------------------------------------------------------------
def test_untouched_bundle_verifies_and_unpacks(
    signed: SignedFn, keys: Keys, tmp_path: Path
) -> None:
    path, envelope = signed()
    verified = verify_bundle(path, envelope, keys.state(), NOW)
    descriptor = verified.descriptor
    assert descriptor.bundle_size == path.stat().st_size
    assert descriptor.bundle_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert descriptor.manifest_sha256 == verified.index.manifest_sha256
    assert verified.signers == frozenset({keys.release.keyid})

    dest = tmp_path / "installed"
    manifest = unpack_bundle(path, dest, manifest_sha256=descriptor.manifest_sha256)
    assert manifest == verified.index.manifest
    assert (descriptor.model, descriptor.version) == (manifest.name, manifest.version)
    assert (dest / MANIFEST_NAME).read_bytes() == verified.index.manifest_bytes
    for name, entry in manifest.files().items():
        assert hashlib.sha256((dest / name).read_bytes()).hexdigest() == entry.sha256


def test_flipped_byte_in_the_manifest_is_refused(
    signed: SignedFn, keys: Keys, tmp_path: Path
) -> None:
    path, envelope = signed()
    index = index_of(path)
    # Change one hex digit of a listed SHA-256: the manifest stays valid, but is not the signed one.
    at = index.manifest_bytes.index(b'"sha256":"') + len(b'"sha256":"')
    digit = index.manifest_bytes[at]
    assert chr(digit) in "0123456789abcdef"
    other = ord("1") if digit == ord("0") else ord("0")
    flip(path, BLOCK + at, digit ^ other)  # the manifest is the first member: data at BLOCK
    assert index_of(path).manifest_bytes[at] == other
    message = refused(tmp_path, path, envelope, keys, DigestMismatchError)
    assert "manifest.json differs from the signed manifest" in message


def test_flipped_byte_that_breaks_the_manifest_json_is_refused(
    signed: SignedFn, keys: Keys, tmp_path: Path
) -> None:
    path, envelope = signed()
    flip(path, BLOCK, ord("{") ^ ord("["))  # the manifest's first byte: "{" -> "["
    message = refused(tmp_path, path, envelope, keys, DigestMismatchError)
    assert "manifest" in message


def test_flipped_byte_in_a_model_file_is_refused(
    signed: SignedFn, keys: Keys, tmp_path: Path
) -> None:
    path, envelope = signed()
    index = index_of(path)
    model = index.manifest.variants[0].entrypoint
    member = index.members[model]
    flip(path, member.offset + member.size // 2)
    message = refused(tmp_path, path, envelope, keys, DigestMismatchError)
    assert f"member {model!r} differs" in message
    # The unpacker, given the signed manifest digest alone, refuses the same file too.
    descriptor = keys.state().verify_descriptor(envelope, NOW).descriptor
    with pytest.raises(DigestMismatchError, match="does not match"):
        unpack_bundle(path, tmp_path / "out", manifest_sha256=descriptor.manifest_sha256)
    assert not (tmp_path / "out").exists()


def test_flipped_byte_in_the_archive_padding_is_refused(
    signed: SignedFn, keys: Keys, tmp_path: Path
) -> None:
    path, envelope = signed()
    size = path.stat().st_size
    flip(path, size - 1)  # inside the zero blocks that end the archive
    message = refused(tmp_path, path, envelope, keys, DigestMismatchError)
    assert "SHA-256" in message


# -- mix and match -------------------------------------------------------------------------------
def test_other_bundle_with_this_envelope_is_refused(
    signed: SignedFn, keys: Keys, tmp_path: Path
) -> None:
    path_a, envelope_a = signed("1.0.0")
    path_b, _ = signed("1.0.1")
    # Same size (the versions are as long as each other), so the digest is what tells them apart.
    assert path_a.stat().st_size == path_b.stat().st_size
    message = refused(tmp_path, path_b, envelope_a, keys, DigestMismatchError)
    assert "is not the signed" in message
    assert "manifest.json differs" in message


def test_model_file_swapped_in_from_another_bundle_is_refused(
    signed: SignedFn, keys: Keys, tmp_path: Path
) -> None:
    (tmp_path / "other").mkdir()
    other_model = make_onnx(tmp_path / "other" / "tiny.onnx", seed=2)  # same name, other weights
    path_a, envelope_a = signed("1.0.0")
    path_b, _ = signed("1.0.0", models=[other_model])
    index_a, index_b = index_of(path_a), index_of(path_b)
    name = index_a.manifest.variants[0].entrypoint
    assert name == index_b.manifest.variants[0].entrypoint
    blob_b = path_b.read_bytes()
    model_b = blob_b[index_b.members[name].offset :][: index_b.members[name].size]
    assert len(model_b) == index_a.members[name].size
    model_a = path_a.read_bytes()[index_a.members[name].offset :][: len(model_b)]
    assert model_b != model_a

    # Rebuilding from the same members gives the same bytes, so the swap is the only change.
    same = rebuild(path_a, tmp_path / "same.emb")
    assert same.read_bytes() == path_a.read_bytes()
    swapped = rebuild(path_a, tmp_path / "swapped.emb", {name: model_b})
    assert swapped.stat().st_size == path_a.stat().st_size
    message = refused(tmp_path, swapped, envelope_a, keys, DigestMismatchError)
    assert f"member {name!r} differs" in message


# -- size ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("change", ["truncate", "extend-zero", "extend-byte"])
def test_bundle_of_another_size_is_refused(
    signed: SignedFn, keys: Keys, tmp_path: Path, change: str
) -> None:
    path, envelope = signed()
    data = path.read_bytes()
    altered = {"truncate": data[:-1], "extend-zero": data + b"\0", "extend-byte": data + b"x"}
    path.write_bytes(altered[change])
    message = refused(tmp_path, path, envelope, keys, DigestMismatchError)
    assert f"bundle is {len(altered[change])} bytes" in message
    assert f"signs {len(data)}" in message


def test_signed_size_over_the_cap_is_refused_before_reading(
    signed: SignedFn, keys: Keys, tmp_path: Path
) -> None:
    path, envelope = signed()
    limits = BundleLimits(max_bundle_bytes=path.stat().st_size - 1)
    message = refused(tmp_path, path, envelope, keys, SizeLimitError, limits=limits)
    assert "descriptor signs" in message
    # Before reading: with the file gone it is still the size cap that refuses, not the disk.
    path.unlink()
    descriptor = keys.state().verify_descriptor(envelope, NOW).descriptor
    with pytest.raises(SizeLimitError) as excinfo:
        check_bundle_file(path, descriptor, limits)
    assert type(excinfo.value) is SizeLimitError


def test_signed_size_at_the_cap_is_accepted(signed: SignedFn, keys: Keys) -> None:
    path, envelope = signed()
    limits = BundleLimits(max_bundle_bytes=path.stat().st_size)
    verified = verify_bundle(path, envelope, keys.state(), NOW, limits)
    assert verified.index.file_size == path.stat().st_size


# -- a re-issued descriptor ------------------------------------------------------------------------
def test_a_reissued_descriptor_verifies_the_same_bytes(
    signed: SignedFn, keys: Keys, tmp_path: Path
) -> None:
    """Under a new release the manifest's release is ``bundle_release``; the bytes are as signed."""
    path, envelope = signed("1.0.0", release=1)
    original = keys.state().verify_descriptor(envelope, NOW).descriptor
    again = reissue_descriptor(original, [keys.release], release=3, now=NOW, days=30)
    verified = verify_bundle(path, again, keys.state().with_release("tiny", 2), NOW)
    assert (verified.descriptor.release, verified.descriptor.bundle_release) == (3, 1)
    assert verified.index.manifest.release == 1


@pytest.mark.parametrize("bundle_release", [None, 2])
def test_a_reissued_descriptor_that_misnames_the_manifest_release_is_refused(
    signed: SignedFn, keys: Keys, tmp_path: Path, bundle_release: int | None
) -> None:
    """Without ``bundle_release``, or with another one, release 3 is not what the manifest says."""
    path, envelope = signed("1.0.0", release=1)
    original = keys.state().verify_descriptor(envelope, NOW).descriptor
    wrong = original.model_copy(update={"release": 3, "bundle_release": bundle_release})
    forged = sign_envelope(DESCRIPTOR_TYPE, wrong.to_payload(), [keys.release]).to_bytes()
    message = refused(tmp_path, path, forged, keys, DigestMismatchError)
    assert f"the descriptor signs ('tiny', '1.0.0', {bundle_release or 3}, " in message
    assert "('tiny', '1.0.0', 1, " in message
