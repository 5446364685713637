"""The enrolment file: everything a new box needs from the fleet, in one JSON document.

``edge-fleet device add`` writes it; ``edge-agent enroll FILE`` installs it (agent.enrol). It
holds the broker's address, the fleet CA's certificate, the device's certificate (and its
private key when the fleet made the key; none when the box made it and sent a CSR), the trust
root and keyring exactly as the fleet's key directory has them, and the device's settings::

    {"format": "edge-model-agent-enrolment", "version": 1,
     "device_id": "cam-01", "groups": ["lobby"], "topic_prefix": "ema/v1",
     "broker": {"host": "broker.example", "port": 8883, "protocol": "5"},
     "ca_cert": "-----BEGIN CERTIFICATE-----...", "cert": "...", "key": "..." | null,
     "root": "<root.json>", "keyring": "<keyring.json>" | null}

A reader checks ``format`` and ``version`` before anything else, so a file of a later version
is refused with a message that says so, not with a list of unknown fields. The certificate
helpers here are the checks both sides make: the certificate's identity, whether a key is the
certificate's, whether the CA issued it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from agent._strictjson import describe_validation_error, loads
from agent.errors import FormatError, VerificationError
from agent.transport.topics import DEFAULT_PREFIX
from agent.values import TargetId

FORMAT: Final = "edge-model-agent-enrolment"
VERSION: Final = 1
MAX_BYTES = 1 << 20  # certificates and trust files: a few KiB


class BrokerAddress(BaseModel):
    """Where the device connects: the broker's device listener."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field(min_length=1, max_length=253)
    port: int = Field(default=8883, ge=1, le=65535)
    protocol: Literal["5", "3.1.1"] = "5"


class Enrolment(BaseModel):
    """One enrolment file (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["edge-model-agent-enrolment"] = FORMAT
    version: Literal[1] = VERSION
    device_id: TargetId
    groups: list[TargetId] = Field(default=[], max_length=32)
    topic_prefix: str = DEFAULT_PREFIX
    broker: BrokerAddress
    ca_cert: str  # PEM
    cert: str  # PEM
    key: str | None = None  # PEM; None: the key is on the box (edge-agent enroll --csr)
    root: str  # root.json, as the key directory has it
    keyring: str | None = None  # keyring.json

    def to_bytes(self) -> bytes:
        import json

        return (json.dumps(self.model_dump(mode="json"), indent=2) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes, what: str = "enrolment file") -> Enrolment:
        """Parse an enrolment file: FormatError naming what is wrong."""
        import pydantic

        doc: Any = loads(data, what=what, max_bytes=MAX_BYTES)
        if not isinstance(doc, dict):
            raise FormatError(f"{what} must be a JSON object")
        if doc.get("format") != FORMAT:
            raise FormatError(
                f"{what} is not an enrolment file (format {doc.get('format')!r}, "
                f"not {FORMAT!r}): make one with 'edge-fleet device add'"
            )
        if doc.get("version") != VERSION:
            raise FormatError(
                f"{what} is of version {doc.get('version')!r}; this agent reads version "
                f"{VERSION}: install a newer edge-model-agent, or make the file with this "
                "version's edge-fleet"
            )
        try:
            return cls.model_validate(doc, strict=True)
        except pydantic.ValidationError as exc:
            raise FormatError(f"{what} is invalid: {describe_validation_error(exc)}") from None


# -- certificates ------------------------------------------------------------------------------
# cryptography's x509 is imported in the functions: this module's model is cheap to import.
def load_certificate(pem: str | bytes, what: str) -> Any:
    """An x509 certificate from PEM; FormatError naming ``what`` when it is not one."""
    from cryptography import x509

    data = pem.encode() if isinstance(pem, str) else pem
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise FormatError(f"{what} is not a PEM certificate: {exc}") from None


def load_private_key(pem: str | bytes, what: str) -> Any:
    """A private key from unencrypted PEM; FormatError naming ``what`` when it is not one."""
    from cryptography.hazmat.primitives import serialization

    data = pem.encode() if isinstance(pem, str) else pem
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise FormatError(f"{what} is not an unencrypted PEM private key: {exc}") from None


def common_name(cert: Any) -> str | None:
    """The certificate's subject CN: the identity the broker binds topics to."""
    from cryptography.x509.oid import NameOID

    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if len(names) == 1 else None


def _public_der(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    der: bytes = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


def key_matches(cert: Any, key: Any) -> bool:
    """Whether ``key`` (a private key) is the one ``cert`` certifies."""
    return _public_der(cert.public_key()) == _public_der(key.public_key())


def check_issued(cert: Any, ca: Any, now: datetime, what: str = "the certificate") -> None:
    """VerificationError unless ``ca`` signed ``cert`` and ``cert`` is valid at ``now``."""
    from cryptography.exceptions import InvalidSignature

    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise VerificationError(
            f"{what} ({cert.subject.rfc4514_string()}) is not signed by the CA "
            f"{ca.subject.rfc4514_string()}: the broker would refuse it"
        ) from None
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise VerificationError(
            f"{what} is valid from {cert.not_valid_before_utc:%Y-%m-%d %H:%M} to "
            f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC, not now"
        )
