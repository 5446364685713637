"""DSSE envelopes: a payload type, the exact payload bytes, and signatures over both.

Format (https://github.com/secure-systems-lab/dsse, protocol v1)::

    {"payloadType": "<type>", "payload": "<base64>", "signatures": [{"keyid": "<hex>", "sig": "<base64>"}]}

A signature covers PAE(type, payload) = "DSSEv1" SP len(type) SP type SP len(payload) SP payload,
so a payload cannot be relabelled as another type. Verification works on the exact payload bytes;
the payload is parsed only after its signatures count (DSSE "verify, then parse").
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from agent._strictjson import loads
from agent.errors import (
    BadSignatureError,
    FormatError,
    ThresholdError,
    UnsignedError,
    UntrustedKeyError,
)
from agent.trust.keys import Signer, verify_ed25519

MAX_ENVELOPE_BYTES = 1 << 20
MAX_SIGNATURES = 32

_ENVELOPE_FIELDS = {"payloadType", "payload", "signatures"}
_SIGNATURE_FIELDS = {"keyid", "sig"}


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE pre-authentication encoding."""
    t = payload_type.encode("utf-8")
    return b"DSSEv1 %d %b %d %b" % (len(t), t, len(payload), payload)


@dataclass(frozen=True)
class Signature:
    keyid: str
    sig: bytes


@dataclass(frozen=True)
class Envelope:
    payload_type: str
    payload: bytes
    signatures: tuple[Signature, ...]

    def to_bytes(self) -> bytes:
        doc = {
            "payload": base64.b64encode(self.payload).decode(),
            "payloadType": self.payload_type,
            "signatures": [
                {"keyid": s.keyid, "sig": base64.b64encode(s.sig).decode()} for s in self.signatures
            ],
        }
        return json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"


def _b64(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise FormatError(f"envelope {what} must be a base64 string")
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        raise FormatError(f"envelope {what} is not valid base64") from None


def parse_envelope(data: bytes, *, max_bytes: int = MAX_ENVELOPE_BYTES) -> Envelope:
    """Parse the envelope's JSON shape; nothing is trusted yet."""
    doc = loads(data, what="envelope", max_bytes=max_bytes)
    if not isinstance(doc, dict):
        raise FormatError("envelope must be a JSON object")
    if set(doc) != _ENVELOPE_FIELDS:
        extra = sorted(set(doc) - _ENVELOPE_FIELDS)
        missing = sorted(_ENVELOPE_FIELDS - set(doc))
        raise FormatError(f"envelope fields wrong: unknown {extra}, missing {missing}")
    payload_type = doc["payloadType"]
    if not isinstance(payload_type, str) or not payload_type:
        raise FormatError("envelope payloadType must be a non-empty string")
    payload = _b64(doc["payload"], "payload")
    raw_sigs = doc["signatures"]
    if not isinstance(raw_sigs, list):
        raise FormatError("envelope signatures must be a list")
    if len(raw_sigs) > MAX_SIGNATURES:
        raise FormatError(f"envelope has {len(raw_sigs)} signatures; at most {MAX_SIGNATURES}")
    sigs = []
    for raw in raw_sigs:
        if not isinstance(raw, dict) or set(raw) != _SIGNATURE_FIELDS:
            raise FormatError("each signature must be an object with exactly keyid and sig")
        keyid = raw["keyid"]
        if not isinstance(keyid, str):
            raise FormatError("signature keyid must be a string")
        sigs.append(Signature(keyid=keyid, sig=_b64(raw["sig"], "signature")))
    return Envelope(payload_type=payload_type, payload=payload, signatures=tuple(sigs))


def sign_envelope(payload_type: str, payload: bytes, signers: Iterable[Signer]) -> Envelope:
    message = pae(payload_type, payload)
    sigs = tuple(Signature(keyid=s.keyid, sig=s.sign(message)) for s in signers)
    return Envelope(payload_type=payload_type, payload=payload, signatures=sigs)


@dataclass(frozen=True)
class SignatureCount:
    """Which signatures of an envelope verify against a set of candidate keys."""

    valid: frozenset[str]
    invalid: frozenset[str]
    unknown: frozenset[str]


def count_signatures(envelope: Envelope, keys: Mapping[str, bytes]) -> SignatureCount:
    """Check each signature against ``keys`` (key id -> raw Ed25519 public key).

    A key id signing twice counts once; a signature by a key outside ``keys`` is ``unknown``.
    """
    message = pae(envelope.payload_type, envelope.payload)
    valid: set[str] = set()
    invalid: set[str] = set()
    unknown: set[str] = set()
    for s in envelope.signatures:
        public = keys.get(s.keyid)
        if public is None:
            unknown.add(s.keyid)
        elif verify_ed25519(public, s.sig, message):
            valid.add(s.keyid)
        else:
            invalid.add(s.keyid)
    return SignatureCount(frozenset(valid), frozenset(invalid - valid), frozenset(unknown))


def require_threshold(count: SignatureCount, threshold: int, *, what: str) -> None:
    """Raise the most specific error when fewer than ``threshold`` signatures are valid."""
    if len(count.valid) >= threshold:
        return
    if not (count.valid or count.invalid or count.unknown):
        raise UnsignedError(f"{what} carries no signature")
    if count.invalid:
        raise BadSignatureError(
            f"{what}: signature by key {min(count.invalid)[:16]} does not match the content"
        )
    if not count.valid:
        ids = ", ".join(sorted(k[:16] for k in count.unknown))
        raise UntrustedKeyError(f"{what} is signed only by keys that are not trusted ({ids})")
    raise ThresholdError(
        f"{what} has {len(count.valid)} valid signature(s); {threshold} are required"
    )
