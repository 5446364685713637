"""``edge-agent enroll``: install an enrolment file on the box, or make the key and CSR for one.

What it writes, under the config directory (``/etc/edge-agent``), as the shipped agent.toml
and the unit expect them:

=================================== ======= =============== ==================================
file                                mode    owner           what
=================================== ======= =============== ==================================
``tls/``                            0750    root:edge-agent the directory (made if missing)
``tls/ca.crt``, ``tls/device.crt``  0644    root            the fleet CA, the device's cert
``tls/device.key``                  0640    root:edge-agent the device's key (the service reads it)
``root.json``, ``keyring.json``     0644    root            the trust root and first keyring
``agent.toml.d/50-enrolment.toml``  0644    root            device_id, groups, broker, paths
``enrolment.files``                 0644    root            what enrolment wrote (for purge)
=================================== ======= =============== ==================================

``enroll --csr`` makes the key on the box (``tls/device.key.new``, 0640 root:edge-agent) and
prints a CSR; the fleet signs it (``edge-fleet device add ID --csr FILE``) and the enrolment
file that comes back carries no key: installing it takes the new key into place. So a key
never leaves the box, and a renewal leaves the running key alone until its certificate comes.

Everything is checked before anything is written: the file's format and version, the trust
root and keyring (they verify), the certificate against the CA (signed by it, valid now), the
key against the certificate, the device id against the certificate's CN. A refusal writes
nothing. Each file is replaced atomically (temp file, fsync, rename), the drop-in last. The
running agent notices the new certificate (agent.transport.session watches the TLS files) and
reconnects with it; ``systemctl reload edge-agent`` makes it look at once.
"""

from __future__ import annotations

import grp
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from agent._fsutil import fsync_dir
from agent.device.enrolment import (
    Enrolment,
    check_issued,
    common_name,
    key_matches,
    load_certificate,
    load_private_key,
)
from agent.errors import BadContentError, ConfigError, StorageError, VerificationError
from agent.trust.verifier import TrustedState

DEFAULT_DIR = Path("/etc/edge-agent")
DEFAULT_GROUP = "edge-agent"  # the service's group (the unit's Group=)
DROPIN_NAME = "50-enrolment.toml"
LIST_NAME = "enrolment.files"


@dataclass(frozen=True)
class Layout:
    """Where enrolment puts each file, under ``root`` (``/etc/edge-agent``)."""

    root: Path = DEFAULT_DIR

    @property
    def tls(self) -> Path:
        return self.root / "tls"

    @property
    def ca_file(self) -> Path:
        return self.tls / "ca.crt"

    @property
    def cert_file(self) -> Path:
        return self.tls / "device.crt"

    @property
    def key_file(self) -> Path:
        return self.tls / "device.key"

    @property
    def pending_key(self) -> Path:
        return self.tls / "device.key.new"

    @property
    def trust_root(self) -> Path:
        return self.root / "root.json"

    @property
    def keyring(self) -> Path:
        return self.root / "keyring.json"

    @property
    def dropin(self) -> Path:
        return self.root / "agent.toml.d" / DROPIN_NAME

    @property
    def files_list(self) -> Path:
        return self.root / LIST_NAME


@dataclass(frozen=True)
class Installed:
    """What :func:`install` did: the device, and each file it wrote."""

    device_id: str
    groups: list[str]
    files: list[Path]
    key_from: str  # "enrolment file", "key made by enroll --csr" or "the key already in place"
    not_after: datetime


def service_gid(group: str) -> int:
    """The gid of the service's group; ConfigError when this box has no such group."""
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(
            f"there is no group {group!r} on this box (the package makes 'edge-agent'; "
            "install it first, or give --group)"
        ) from None


def _write(path: Path, data: bytes, mode: int, gid: int | None = None) -> None:
    """Replace ``path`` atomically with ``data``, with ``mode`` and (if given) group ``gid``
    set before the rename: the file is never readable by anyone it should not be."""
    import contextlib
    import tempfile

    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise StorageError(f"cannot write in {path.parent}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            if gid is not None:
                os.fchown(f.fileno(), -1, gid)
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise StorageError(f"cannot write {path}: {exc.strerror or exc}") from None
        raise


def _make_dir(path: Path, mode: int, gid: int | None = None) -> None:
    """Make ``path`` (and its parents) if missing, with ``mode`` and group ``gid``; an existing
    directory is left as it is."""
    if path.is_dir():
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir(mode=mode)
        if gid is not None:
            os.chown(path, -1, gid)
        os.chmod(path, mode)  # mkdir's mode is cut by the umask
    except OSError as exc:
        raise StorageError(f"cannot make {path}: {exc.strerror}") from None


def make_csr(device_id: str, layout: Layout, group: str = DEFAULT_GROUP) -> bytes:
    """A new key for ``device_id`` at ``layout.pending_key`` (0640, group ``group``) and its
    CSR (PEM) for ``edge-fleet device add ID --csr FILE``. The key in use stays in place."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    from pydantic import TypeAdapter, ValidationError

    from agent.values import TargetId

    try:
        TypeAdapter(TargetId).validate_python(device_id)
    except ValidationError:
        raise ConfigError(
            f"device id {device_id!r}: 1-64 of [A-Za-z0-9._-], starting with a letter or digit"
        ) from None
    gid = service_gid(group)
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .sign(key, hashes.SHA256())
    )
    _make_dir(layout.root, 0o755)
    _make_dir(layout.tls, 0o750, gid)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write(layout.pending_key, pem, 0o640, gid)
    return csr.public_bytes(serialization.Encoding.PEM)


def _read_key(path: Path) -> Any:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror}") from None
    return load_private_key(data, str(path))


def _dropin(enrolment: Enrolment, layout: Layout, now: datetime) -> bytes:
    def q(value: object) -> str:
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'

    b = enrolment.broker
    lines = [
        f"# Written by `edge-agent enroll` for {enrolment.device_id} on {now:%Y-%m-%d %H:%M} UTC.",
        "# Enrolling again replaces this file; put local settings in a later one",
        "# (e.g. 90-local.toml). `edge-agent check-config` lists what is read.",
        f"device_id = {q(enrolment.device_id)}",
        f"groups = [{', '.join(q(g) for g in enrolment.groups)}]",
        f"topic_prefix = {q(enrolment.topic_prefix)}",
        "",
        "[mqtt]",
        f"host = {q(b.host)}",
        f"port = {b.port}",
        f"protocol = {q(b.protocol)}",
        "tls = true",
        f"ca_file = {q(layout.ca_file)}",
        f"cert_file = {q(layout.cert_file)}",
        f"key_file = {q(layout.key_file)}",
        "",
        "[trust]",
        f"root = {q(layout.trust_root)}",
    ]
    if enrolment.keyring is not None:
        lines.append(f"keyring = {q(layout.keyring)}")
    return ("\n".join(lines) + "\n").encode()


def install(
    data: bytes,
    layout: Layout,
    *,
    now: datetime,
    group: str = DEFAULT_GROUP,
    what: str = "enrolment file",
) -> Installed:
    """Check the enrolment file ``data`` through and through, then install it (see the module
    docstring). BadContentError (nothing written) when it does not check out."""
    from cryptography.hazmat.primitives import serialization

    enrolment = Enrolment.from_bytes(data, what)
    ca = load_certificate(enrolment.ca_cert, f"{what}: ca_cert")
    cert = load_certificate(enrolment.cert, f"{what}: cert")
    check_issued(cert, ca, now, f"{what}: the device certificate")
    cn = common_name(cert)
    if cn != enrolment.device_id:
        raise VerificationError(
            f"{what} is for device {enrolment.device_id!r} but its certificate is "
            f"{cn!r}'s: the broker would give this box {cn!r}'s topics; make it again with "
            "'edge-fleet device add'"
        )
    # The key: the file's, else the one `enroll --csr` made, else the one in place (a renewal
    # of the same key).
    key: Any
    if enrolment.key is not None:
        key = load_private_key(enrolment.key, f"{what}: key")
        if not key_matches(cert, key):
            raise VerificationError(
                f"{what}: its key is not the key of its certificate (serial "
                f"{cert.serial_number:X}): the file is damaged or mixed from two devices"
            )
        key_from = "enrolment file"
    else:
        key = None
        key_from = ""
        for path, source in (
            (layout.pending_key, "key made by enroll --csr"),
            (layout.key_file, "the key already in place"),
        ):
            candidate = _read_key(path)
            if candidate is not None and key_matches(cert, candidate):
                key, key_from = candidate, source
                break
        if key is None:
            raise VerificationError(
                f"{what} carries no key, and neither {layout.pending_key} nor "
                f"{layout.key_file} is the key of its certificate: it was made for a CSR of "
                "another box, or of an earlier 'edge-agent enroll --csr' here; run "
                "'edge-agent enroll --csr' and have the fleet sign that CSR"
            )
    try:
        state = TrustedState.from_root(enrolment.root.encode())
        state.check_root_fresh(now)
        if enrolment.keyring is not None:
            state.update_keyring(enrolment.keyring.encode(), now)
    except BadContentError as exc:
        raise type(exc)(f"{what}: its trust root or keyring does not verify: {exc}") from None
    gid = service_gid(group)

    # Checked: now write, the drop-in last (it is what makes the agent use the rest).
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _make_dir(layout.root, 0o755)
    _make_dir(layout.tls, 0o750, gid)
    _make_dir(layout.dropin.parent, 0o755)
    written: list[Path] = []

    def put(path: Path, content: bytes, mode: int = 0o644, group_id: int | None = None) -> None:
        _write(path, content, mode, group_id)
        written.append(path)

    put(layout.trust_root, enrolment.root.encode())
    if enrolment.keyring is not None:
        put(layout.keyring, enrolment.keyring.encode())
    put(layout.ca_file, enrolment.ca_cert.encode())
    # The key before its certificate: an agent that looks in between finds a pair that does
    # not load, keeps its connection, and looks again.
    put(layout.key_file, key_pem, 0o640, gid)
    put(layout.cert_file, enrolment.cert.encode())
    put(layout.dropin, _dropin(enrolment, layout, now))
    if key_from == "key made by enroll --csr":
        try:
            layout.pending_key.unlink()
        except OSError as exc:
            raise StorageError(f"cannot remove {layout.pending_key}: {exc.strerror}") from None
    listed = [*written, layout.files_list]
    _write(layout.files_list, "".join(f"{p}\n" for p in listed).encode(), 0o644)
    return Installed(
        device_id=enrolment.device_id,
        groups=list(enrolment.groups),
        files=listed,
        key_from=key_from,
        not_after=cert.not_valid_after_utc,
    )
