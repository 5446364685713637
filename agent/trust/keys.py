"""Ed25519 keys: key ids, signing and verification (pure; no disk)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.errors import FormatError

_P = 2**255 - 19
# Encodings (sign bit cleared) of the points of small order, as libsodium lists them. With such
# a key, a signature of the identity point and S = 0 verifies for every message.
_SMALL_ORDER = frozenset(
    bytes.fromhex(h)
    for h in (
        "00" * 32,
        "01" + "00" * 31,
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
        "ec" + "ff" * 30 + "7f",
    )
)


def is_weak_public_key(public_raw: bytes) -> bool:
    """True for a non-canonical encoding or a point of small order: never a real signer's key."""
    if len(public_raw) != 32:
        return True
    y = int.from_bytes(public_raw, "little") & ((1 << 255) - 1)
    cleared = y.to_bytes(32, "little")
    return y >= _P or cleared in _SMALL_ORDER


def keyid_for(public_raw: bytes) -> str:
    """A key's id: the SHA-256 of its 32 raw public bytes, in hex."""
    return hashlib.sha256(public_raw).hexdigest()


@lru_cache(maxsize=256)
def _public(public_raw: bytes) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(public_raw)


def verify_ed25519(public_raw: bytes, signature: bytes, message: bytes) -> bool:
    """True when ``signature`` is ``public_raw``'s Ed25519 signature of ``message``."""
    if len(signature) != 64 or is_weak_public_key(public_raw):
        return False
    try:
        _public(public_raw).verify(signature, message)
    except InvalidSignature:
        return False
    return True


@dataclass(frozen=True)
class Signer:
    """An Ed25519 private key able to sign envelopes."""

    private: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> Signer:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_pem(cls, pem: bytes, password: bytes | None = None) -> Signer:
        try:
            key = serialization.load_pem_private_key(pem, password=password)
        except (ValueError, TypeError) as exc:
            raise FormatError(f"not a PEM private key: {exc}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise FormatError("the private key is not an Ed25519 key")
        return cls(key)

    def to_pem(self, password: bytes | None = None) -> bytes:
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(password)
            if password
            else serialization.NoEncryption()
        )
        return self.private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
        )

    @property
    def public_raw(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @property
    def keyid(self) -> str:
        return keyid_for(self.public_raw)

    def sign(self, message: bytes) -> bytes:
        return self.private.sign(message)
