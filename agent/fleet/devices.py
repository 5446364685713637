"""``edge-fleet device``: a device's certificate from the fleet's CA, its enrolment file, and
its revocation.

The CA is the directory ``config/broker/make-certs.sh`` makes (its OUTDIR): ``ca.crt``,
``ca.crl``, the CA's key in ``private/ca.key`` (``ca.key`` beside the certificates in earlier
setups) and openssl's CA database in ``private/ca/`` (``index.txt``, ``crlnumber``). This
module keeps that database as ``openssl ca`` does, so the two tools mix: each certificate it
issues is a ``V`` line of ``index.txt`` and ``OUTDIR/ID.crt`` (so ``make-certs.sh OUTDIR
--revoke ID`` revokes it too), a revocation turns the line into ``R``, and ``ca.crl`` is made
from the ``R`` lines, as ``make-certs.sh`` makes it (which then keeps what this module revoked).

A certificate is issued for a CSR the box made (``edge-agent enroll --csr``: the key never
leaves the box) or, without one, for a key made here that goes into the enrolment file and
nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from agent._fsutil import atomic_write_bytes
from agent.device.enrolment import BrokerAddress, Enrolment, common_name, load_certificate
from agent.errors import ConfigError, FormatError, StorageError, VerificationError
from agent.transport.topics import DEFAULT_PREFIX
from agent.trust.verifier import TrustedState

__all__ = ["DeviceCA", "Issued", "Revoked", "add_device", "revoke_device", "write_enrolment"]

DAYS = 825  # leaf validity, as make-certs.sh's DAYS
CRL_DAYS = 30  # as make-certs.sh's CRL_DAYS: renew the CRL before then
_TIME = "%y%m%d%H%M%SZ"  # openssl's index.txt times


def _serial_hex(serial: int) -> str:
    """A serial as openssl's index.txt writes it: upper-case hex of whole bytes."""
    text = f"{serial:X}"
    return text if len(text) % 2 == 0 else "0" + text


@dataclass(frozen=True)
class Entry:
    """One line of openssl's ``index.txt``."""

    status: str  # V valid, R revoked, E expired
    expires: str
    revoked: str  # the revocation time ("" unless R)
    serial: str
    subject: str

    def line(self) -> str:
        return f"{self.status}\t{self.expires}\t{self.revoked}\t{self.serial}\tunknown\t{self.subject}\n"


@dataclass(frozen=True)
class Issued:
    """What :func:`add_device` made."""

    enrolment: Enrolment
    serial: str
    not_after: datetime
    replaced: str | None  # the serial of the certificate it replaced (``renew``), if any
    cert_path: Path


@dataclass(frozen=True)
class Revoked:
    """What :func:`revoke_device` did."""

    device_id: str
    serial: str
    already: bool  # it was revoked before
    crl: Path
    revoked_count: int  # certificates the CRL now lists


class DeviceCA:
    """The fleet CA of a make-certs.sh directory (see the module docstring)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.cert_path = directory / "ca.crt"
        self.crl_path = directory / "ca.crl"
        self.db = directory / "private" / "ca"
        key = directory / "private" / "ca.key"
        self.key_path = directory / "ca.key" if (directory / "ca.key").is_file() else key
        for path in (self.cert_path, self.key_path, self.db / "index.txt"):
            if not path.is_file():
                raise ConfigError(
                    f"{directory} is not the fleet's CA directory: no {path} (make it with "
                    f"config/broker/make-certs.sh {directory} ...)"
                )

    # -- reading ---------------------------------------------------------------------------
    def certificate(self) -> Any:
        return load_certificate(self._read(self.cert_path), str(self.cert_path))

    def _read(self, path: Path) -> bytes:
        try:
            return path.read_bytes()
        except OSError as exc:
            raise StorageError(f"cannot read {path}: {exc.strerror}") from None

    def _key(self) -> Any:
        from cryptography.hazmat.primitives import serialization

        try:
            return serialization.load_pem_private_key(self._read(self.key_path), password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{self.key_path}: not an unencrypted PEM key: {exc}") from None

    def entries(self) -> list[Entry]:
        out = []
        for n, raw in enumerate(self._read(self.db / "index.txt").decode().splitlines(), 1):
            parts = raw.split("\t")
            if len(parts) != 6:
                raise FormatError(f"{self.db / 'index.txt'}:{n}: not an openssl index line")
            out.append(Entry(parts[0], parts[1], parts[2], parts[3].upper(), parts[5]))
        return out

    def _write_entries(self, entries: list[Entry]) -> None:
        atomic_write_bytes(
            self.db / "index.txt", "".join(e.line() for e in entries).encode(), 0o600
        )

    # -- issuing -----------------------------------------------------------------------------
    def issue(self, device_id: str, public_key: Any, now: datetime, days: int = DAYS) -> Any:
        """A client certificate for ``device_id`` (CN) on ``public_key``, recorded as valid,
        with the extensions make-certs.sh gives device certificates."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        ca = self.certificate()
        key = self._key()
        start = now - timedelta(minutes=5)  # a box whose clock is a little behind
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
            .issuer_name(ca.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(now + timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.public_key()),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
        # A renewal records a second valid certificate of one subject, which openssl's CA
        # (make-certs.sh's -gencrl) refuses to load unless the database allows it.
        attr = self.db / "index.txt.attr"
        if not attr.exists():
            atomic_write_bytes(attr, b"unique_subject = no\n", 0o600)
        entries = self.entries()
        entries.append(
            Entry(
                "V",
                cert.not_valid_after_utc.strftime(_TIME),
                "",
                _serial_hex(cert.serial_number),
                f"/CN={device_id}",
            )
        )
        self._write_entries(entries)
        return cert

    # -- revoking ----------------------------------------------------------------------------
    def revoke(self, serial: str, subject: str, expires: datetime, now: datetime) -> bool:
        """Mark ``serial`` revoked (added if the database lacks it); False if it was already."""
        entries = self.entries()
        for i, e in enumerate(entries):
            if e.serial == serial:
                if e.status == "R":
                    return False
                entries[i] = Entry("R", e.expires, now.strftime(_TIME), e.serial, e.subject)
                break
        else:
            entries.append(
                Entry("R", expires.strftime(_TIME), now.strftime(_TIME), serial, subject)
            )
        self._write_entries(entries)
        return True

    def write_crl(self, now: datetime, days: int = CRL_DAYS) -> int:
        """``ca.crl`` anew from the database's revoked lines; how many it lists."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization

        ca = self.certificate()
        number_file = self.db / "crlnumber"
        try:
            number = int(self._read(number_file).decode().strip() or "1", 16)
        except ValueError:
            raise FormatError(f"{number_file} does not hold a hex number") from None
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(ca.subject)
            .last_update(now)
            .next_update(now + timedelta(days=days))
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.public_key()),
                critical=False,
            )
            .add_extension(x509.CRLNumber(number), critical=False)
        )
        count = 0
        for e in self.entries():
            if e.status != "R":
                continue
            when = datetime.strptime(e.revoked.split(",")[0], _TIME).replace(tzinfo=now.tzinfo)
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(int(e.serial, 16))
                .revocation_date(when)
                .build()
            )
            count += 1
        crl = builder.sign(self._key(), hashes.SHA256())
        atomic_write_bytes(self.crl_path, crl.public_bytes(serialization.Encoding.PEM), 0o644)
        atomic_write_bytes(number_file, f"{_serial_hex(number + 1)}\n".encode(), 0o600)
        return count


def _check_csr(data: bytes, device_id: str) -> Any:
    """The public key of a CSR for ``device_id``; VerificationError/FormatError otherwise."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import NameOID

    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError as exc:
        raise FormatError(f"the CSR is not a PEM certificate request: {exc}") from None
    if not csr.is_signature_valid:
        raise VerificationError("the CSR's signature does not verify: it is damaged")
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = str(names[0].value) if len(names) == 1 else None
    if cn != device_id:
        raise VerificationError(
            f"the CSR is for {cn!r}, not {device_id!r}: make it on the box with "
            f"'edge-agent enroll --csr --device-id {device_id}'"
        )
    key = csr.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in ("secp256r1", "secp384r1"):
        return key
    if isinstance(key, rsa.RSAPublicKey) and key.key_size >= 2048:
        return key
    raise VerificationError("the CSR's key is neither ECDSA P-256/P-384 nor RSA of 2048 bits up")


def _trust(trust_dir: Path, now: datetime) -> tuple[str, str | None]:
    """root.json and keyring.json of the fleet's key directory, checked to verify."""
    root_path, ring_path = trust_dir / "root.json", trust_dir / "keyring.json"
    try:
        root = root_path.read_bytes()
        ring = ring_path.read_bytes() if ring_path.is_file() else None
    except OSError as exc:
        raise ConfigError(
            f"--trust {trust_dir}: cannot read {exc.filename}: {exc.strerror} (the fleet's "
            "key directory, as 'edge-fleet keys init' made it)"
        ) from None
    state = TrustedState.from_root(root)
    state.check_root_fresh(now)
    if ring is not None:
        state.update_keyring(ring, now)
    return root.decode(), None if ring is None else ring.decode()


def add_device(
    ca_dir: Path,
    device_id: str,
    *,
    broker: BrokerAddress,
    trust_dir: Path,
    now: datetime,
    groups: list[str] | None = None,
    csr: bytes | None = None,
    days: int = DAYS,
    renew: bool = False,
    topic_prefix: str = DEFAULT_PREFIX,
) -> Issued:
    """Issue ``device_id``'s certificate (for ``csr``, or for a key made here) and make its
    enrolment file. A device that has a certificate already needs ``renew``; the old one stays
    valid until it is revoked (:func:`revoke_device` with its serial), so the box keeps its
    connection until it uses the new one."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    ca = DeviceCA(ca_dir)
    if device_id in ("ca", "broker", "operator-ca", "private"):
        raise ConfigError(f"device id {device_id!r} clashes with the CA directory's files")
    cert_path = ca_dir / f"{device_id}.crt"
    replaced = None
    if cert_path.exists():
        old = load_certificate(ca._read(cert_path), str(cert_path))
        replaced = _serial_hex(old.serial_number)
        if not renew:
            raise ConfigError(
                f"{device_id} has a certificate already ({cert_path}, serial {replaced}): "
                "give --renew for a new one, or revoke it first"
            )
    root, keyring = _trust(trust_dir, now)
    key_pem = None
    if csr is not None:
        public_key = _check_csr(csr, device_id)
    else:
        key = ec.generate_private_key(ec.SECP256R1())
        public_key = key.public_key()
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
    # Validated before anything is issued: a bad group or prefix writes nothing.
    draft: dict[str, Any] = {
        "device_id": device_id,
        "groups": list(groups or []),
        "topic_prefix": topic_prefix,
        "broker": broker,
        "ca_cert": ca._read(ca.cert_path).decode(),
        "cert": "",
        "key": key_pem,
        "root": root,
        "keyring": keyring,
    }
    _validated(draft)
    cert = ca.issue(device_id, public_key, now, days)
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    atomic_write_bytes(cert_path, cert_pem, 0o644)
    enrolment = _validated({**draft, "cert": cert_pem.decode()})
    return Issued(
        enrolment=enrolment,
        serial=_serial_hex(cert.serial_number),
        not_after=cert.not_valid_after_utc,
        replaced=replaced,
        cert_path=cert_path,
    )


def _validated(fields: dict[str, Any]) -> Enrolment:
    import pydantic

    from agent._strictjson import describe_validation_error

    try:
        return Enrolment.model_validate(fields)
    except pydantic.ValidationError as exc:
        raise ConfigError(f"enrolment: {describe_validation_error(exc)}") from None


def revoke_device(
    ca_dir: Path, device_id: str, *, now: datetime, serial: str | None = None
) -> Revoked:
    """Revoke ``device_id``'s certificate (``ca_dir/ID.crt``, or the one of ``serial`` the CA
    issued to it) and write ``ca.crl`` anew."""
    ca = DeviceCA(ca_dir)
    subject = f"/CN={device_id}"
    if serial is None:
        cert_path = ca_dir / f"{device_id}.crt"
        if not cert_path.is_file():
            raise ConfigError(f"{device_id} has no certificate in {ca_dir} ({cert_path})")
        cert = load_certificate(ca._read(cert_path), str(cert_path))
        if common_name(cert) != device_id:
            raise VerificationError(f"{cert_path} is {common_name(cert)!r}'s, not {device_id!r}")
        target = _serial_hex(cert.serial_number)
        expires = cert.not_valid_after_utc
    else:
        target = serial.upper().removeprefix("0X").replace(":", "")
        target = target if len(target) % 2 == 0 else "0" + target
        found = [e for e in ca.entries() if e.serial == target]
        if not found or found[0].subject != subject:
            raise ConfigError(
                f"the CA issued {device_id} no certificate of serial {target} "
                f"(its database, {ca.db / 'index.txt'}, has "
                f"{', '.join(e.serial for e in ca.entries() if e.subject == subject) or 'none'})"
            )
        expires = datetime.strptime(found[0].expires, _TIME).replace(tzinfo=now.tzinfo)
    changed = ca.revoke(target, subject, expires, now)
    count = ca.write_crl(now)
    return Revoked(device_id, target, not changed, ca.crl_path, count)


def write_enrolment(path: Path, enrolment: Enrolment) -> None:
    """The enrolment file, 0600: it may hold the device's private key."""
    if path.is_dir():
        raise ConfigError(f"-o {path} is a directory")
    atomic_write_bytes(path, enrolment.to_bytes(), 0o600)
