"""DSSE envelopes: PAE, parsing, single-byte tampering, and property tests over arbitrary input.

The trust world here is made in memory (no key directory), once for the module, so that the
hypothesis tests can use it without function-scoped fixtures.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from agent._strictjson import canonical, dump_model
from agent.errors import (
    BadContentError,
    BadSignatureError,
    ExpiredError,
    FormatError,
    SizeLimitError,
    ThresholdError,
    UnsignedError,
    UntrustedKeyError,
)
from agent.trust.envelope import (
    MAX_ENVELOPE_BYTES,
    MAX_SIGNATURES,
    Envelope,
    Signature,
    count_signatures,
    pae,
    parse_envelope,
    require_threshold,
    sign_envelope,
)
from agent.trust.keys import Signer
from agent.trust.metadata import (
    DESCRIPTOR_TYPE,
    KEYRING_TYPE,
    ROOT_TYPE,
    BundleDescriptor,
    KeyringMetadata,
    PublicKey,
    ReleaseKey,
    RootMetadata,
)
from agent.trust.verifier import TrustedState, VerifiedDescriptor
from tests.conftest import NOW
from tests.documents import DAY, descriptor_doc

PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@dataclass(frozen=True)
class World:
    roots: tuple[Signer, ...]
    release: Signer
    state: TrustedState
    payload: bytes  # a valid descriptor payload
    envelope: bytes  # that payload, signed by the release key


def _make_world() -> World:
    roots = tuple(Signer.generate() for _ in range(3))
    release = Signer.generate()
    root = RootMetadata(
        version=1,
        expires=NOW + 730 * DAY,
        keys={s.keyid: PublicKey(public=s.public_raw.hex()) for s in roots},
        threshold=2,
    )
    keyring = KeyringMetadata(
        version=1,
        expires=NOW + 365 * DAY,
        release_keys={
            release.keyid: ReleaseKey(
                key=PublicKey(public=release.public_raw.hex()),
                expires=NOW + 365 * DAY,
                models=["*"],
            )
        },
    )
    state = TrustedState.from_root(
        sign_envelope(ROOT_TYPE, dump_model(root), roots).to_bytes()
    ).update_keyring(sign_envelope(KEYRING_TYPE, dump_model(keyring), roots[:2]).to_bytes(), NOW)
    payload = canonical(descriptor_doc())
    envelope = sign_envelope(DESCRIPTOR_TYPE, payload, [release]).to_bytes()
    return World(roots, release, state, payload, envelope)


W = _make_world()


def verify(data: bytes) -> VerifiedDescriptor:
    return W.state.verify_descriptor(data, NOW)


def with_fields(data: bytes, **fields: object) -> bytes:
    doc = json.loads(data)
    doc.update(fields)
    return json.dumps(doc).encode()


def raises_exactly(cls: type[BaseException], data: bytes, match: str | None = None) -> str:
    with pytest.raises(cls, match=match) as excinfo:
        verify(data)
    assert type(excinfo.value) is cls, f"{type(excinfo.value).__name__}: {excinfo.value}"
    return str(excinfo.value)


def _spare_bits_mutation() -> tuple[int, int]:
    """A byte change in the payload's base64 that decodes to the same bytes (unused low bits)."""
    assert len(W.payload) % 3 != 0, "the test payload needs base64 padding"
    start = W.envelope.index(b'"payload": "') + len(b'"payload": "')
    last = W.envelope.index(b"=", start) - 1
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    index = alphabet.index(W.envelope[last])
    return last, alphabet[index ^ 1]


SPARE_POSITION, SPARE_VALUE = _spare_bits_mutation()
SPACE_POSITION = W.envelope.index(b" ")


def flip_b64_char(text: str, index: int) -> str:
    """Replace one base64 character with another, so the text still decodes."""
    char = text[index]
    other = "B" if char != "B" else "C"
    return text[:index] + other + text[index + 1 :]


# -- PAE -----------------------------------------------------------------------------------------
def test_pae_test_vector() -> None:
    assert (
        pae("http://example.com/HelloWorld", b"hello world")
        == b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )


def test_pae_counts_bytes_not_characters() -> None:
    assert pae("é", b"") == b"DSSEv1 2 \xc3\xa9 0 "
    # Lengths keep type and payload apart: no way to shift bytes from one into the other.
    assert pae("a b", b"c") != pae("a", b"b c")


def test_sign_envelope_signs_pae() -> None:
    env = sign_envelope(DESCRIPTOR_TYPE, b"x", [W.release])
    (sig,) = env.signatures
    assert sig.keyid == W.release.keyid
    W.release.private.public_key().verify(sig.sig, pae(DESCRIPTOR_TYPE, b"x"))


# -- parsing -------------------------------------------------------------------------------------
def test_round_trip() -> None:
    env = parse_envelope(W.envelope)
    assert env.payload_type == DESCRIPTOR_TYPE
    assert env.payload == W.payload
    assert [s.keyid for s in env.signatures] == [W.release.keyid]
    assert parse_envelope(env.to_bytes()) == env
    assert env.to_bytes() == W.envelope
    assert verify(W.envelope).descriptor == BundleDescriptor.model_validate_json(W.payload)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"payloadType": ""}, "payloadType"),
        ({"payloadType": 5}, "payloadType"),
        ({"payloadType": None}, "payloadType"),
        ({"payload": 5}, "payload"),
        ({"payload": "not base64!"}, "payload"),
        ({"payload": "YQ"}, "payload"),  # missing padding
        ({"payload": "YQ==\n"}, "payload"),
        ({"payload": "é"}, "payload"),
        ({"signatures": {}}, "signatures"),
        ({"signatures": [5]}, "signature"),
        ({"signatures": [{"keyid": "a"}]}, "signature"),
        ({"signatures": [{"keyid": "a", "sig": "", "x": 1}]}, "signature"),
        ({"signatures": [{"keyid": 1, "sig": ""}]}, "keyid"),
        ({"signatures": [{"keyid": "a", "sig": 1}]}, "signature"),
        ({"signatures": [{"keyid": "a", "sig": "%%%"}]}, "signature"),
        ({"extra": 1}, "extra"),
    ],
)
def test_parse_envelope_shape_errors(fields: dict[str, object], match: str) -> None:
    data = with_fields(W.envelope, **fields)
    with pytest.raises(FormatError, match=match):
        parse_envelope(data)
    raises_exactly(FormatError, data)


def test_parse_envelope_missing_field() -> None:
    doc = json.loads(W.envelope)
    del doc["signatures"]
    raises_exactly(FormatError, json.dumps(doc).encode(), match="missing")


def test_too_many_signatures() -> None:
    sig = json.loads(W.envelope)["signatures"][0]
    data = with_fields(W.envelope, signatures=[sig] * (MAX_SIGNATURES + 1))
    raises_exactly(FormatError, data, match="at most")
    # At the cap it parses, and one key signing 32 times counts once.
    assert verify(with_fields(W.envelope, signatures=[sig] * MAX_SIGNATURES)).signers == {
        W.release.keyid
    }


def test_oversized_envelope() -> None:
    data = W.envelope + b" " * MAX_ENVELOPE_BYTES
    with pytest.raises(SizeLimitError):
        parse_envelope(data)
    raises_exactly(SizeLimitError, data)


@pytest.mark.parametrize(
    "data",
    [
        b'{"payloadType": "t", "payloadType": "t", "payload": "", "signatures": []}',
        b'{"payloadType": "t", "payload": "", "signatures": [{"keyid": "a", "keyid": "b", "sig": ""}]}',
    ],
)
def test_duplicate_keys_in_envelope(data: bytes) -> None:
    with pytest.raises(FormatError, match="duplicate key"):
        parse_envelope(data)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xef\xbb\xbf" + W.envelope,  # UTF-8 BOM
        W.envelope.decode().encode("utf-16"),
        b'{"payloadType": Infinity}',
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a": 1} {"b": 2}',
    ],
)
def test_not_one_strict_json_document(data: bytes) -> None:
    with pytest.raises(FormatError):
        parse_envelope(data)


# -- one flipped byte ----------------------------------------------------------------------------
def test_flipped_byte_in_payload() -> None:
    doc = json.loads(W.envelope)
    tampered = flip_b64_char(doc["payload"], len(doc["payload"]) // 2)
    decoded = base64.b64decode(tampered, validate=True)
    assert decoded != W.payload
    assert len(decoded) == len(W.payload)
    raises_exactly(BadSignatureError, with_fields(W.envelope, payload=tampered))


def test_flipped_byte_in_signature() -> None:
    doc = json.loads(W.envelope)
    sig = doc["signatures"][0]
    # 64 bytes are 86 base64 characters; the last one carries 4 bits of padding, so stop at 84.
    for index in (0, 40, 84):
        bad = {"keyid": sig["keyid"], "sig": flip_b64_char(sig["sig"], index)}
        assert base64.b64decode(bad["sig"]) != base64.b64decode(sig["sig"])
        raises_exactly(
            BadSignatureError,
            with_fields(W.envelope, signatures=[bad]),
            match=W.release.keyid[:16],
        )


def test_truncated_signature() -> None:
    sig = json.loads(W.envelope)["signatures"][0]
    short = base64.b64encode(base64.b64decode(sig["sig"])[:63]).decode()
    raises_exactly(BadSignatureError, with_fields(W.envelope, signatures=[{**sig, "sig": short}]))


def test_flipped_byte_in_keyid() -> None:
    sig = json.loads(W.envelope)["signatures"][0]
    keyid = ("0" if sig["keyid"][0] != "0" else "1") + sig["keyid"][1:]
    raises_exactly(UntrustedKeyError, with_fields(W.envelope, signatures=[{**sig, "keyid": keyid}]))


def test_flip_that_breaks_json() -> None:
    start = W.envelope.index(b'"payload"')
    broken = W.envelope[:start] + b"'" + W.envelope[start + 1 :]
    raises_exactly(FormatError, broken, match="not valid JSON")
    # And a flip to a character outside base64 inside the payload string.
    inside = W.envelope.index(b'"payload": "') + len(b'"payload": "') + 10
    not_b64 = W.envelope[:inside] + b"!" + W.envelope[inside + 1 :]
    raises_exactly(FormatError, not_b64, match="base64")


def test_flip_in_payload_type() -> None:
    at = W.envelope.index(DESCRIPTOR_TYPE.encode()) + 3
    data = W.envelope[:at] + b"X" + W.envelope[at + 1 :]
    raises_exactly(FormatError, data, match="payload type")


def test_every_single_byte_flip() -> None:
    """XOR each byte of the envelope with 1: it verifies only if what it decodes to is unchanged."""
    original = parse_envelope(W.envelope)
    verified = 0
    for i in range(len(W.envelope)):
        data = W.envelope[:i] + bytes([W.envelope[i] ^ 1]) + W.envelope[i + 1 :]
        try:
            verify(data)
        except BadContentError:
            continue
        verified += 1
        assert parse_envelope(data) == original
    # Only a few whitespace or unused-bit flips can survive; never most of them.
    assert verified < len(W.envelope) // 10


def test_cosmetic_mutations_verify() -> None:
    """What the mutation property allows: whitespace and unused base64 bits change nothing."""
    for position, value in ((SPACE_POSITION, ord("\t")), (SPARE_POSITION, SPARE_VALUE)):
        data = W.envelope[:position] + bytes([value]) + W.envelope[position + 1 :]
        assert data != W.envelope
        assert verify(data).descriptor == verify(W.envelope).descriptor
        assert parse_envelope(data) == parse_envelope(W.envelope)


# -- signature counting --------------------------------------------------------------------------
def test_count_signatures_classifies() -> None:
    stranger = Signer.generate()
    env = sign_envelope(DESCRIPTOR_TYPE, b"p", [W.release, stranger, W.release])
    forged = Signature(W.roots[0].keyid, env.signatures[0].sig)
    env = Envelope(env.payload_type, env.payload, (*env.signatures, forged))
    keys = {W.release.keyid: W.release.public_raw, W.roots[0].keyid: W.roots[0].public_raw}
    count = count_signatures(env, keys)
    assert count.valid == {W.release.keyid}
    assert count.invalid == {W.roots[0].keyid}
    assert count.unknown == {stranger.keyid}


def test_valid_and_invalid_signature_by_one_key_counts_valid() -> None:
    env = sign_envelope(DESCRIPTOR_TYPE, b"p", [W.release])
    bad = Signature(W.release.keyid, bytes(64))
    count = count_signatures(
        Envelope(env.payload_type, env.payload, (bad, *env.signatures)),
        {W.release.keyid: W.release.public_raw},
    )
    assert count.valid == {W.release.keyid}
    assert count.invalid == frozenset()
    require_threshold(count, 1, what="x")
    with pytest.raises(ThresholdError):
        require_threshold(count, 2, what="x")


@pytest.mark.parametrize(
    ("signers", "cls"),
    [
        ((), UnsignedError),
        (("stranger",), UntrustedKeyError),
        (("release", "stranger"), ThresholdError),
        (("release", "forged"), BadSignatureError),
    ],
)
def test_require_threshold_picks_the_reason(signers: tuple[str, ...], cls: type) -> None:
    env = sign_envelope(DESCRIPTOR_TYPE, b"p", [])
    sigs = []
    for who in signers:
        if who == "release":
            sigs.append(sign_envelope(DESCRIPTOR_TYPE, b"p", [W.release]).signatures[0])
        elif who == "stranger":
            sigs.append(sign_envelope(DESCRIPTOR_TYPE, b"p", [Signer.generate()]).signatures[0])
        else:
            sigs.append(Signature(W.roots[0].keyid, bytes(64)))
    keys = {s.keyid: s.public_raw for s in (W.release, W.roots[0])}
    count = count_signatures(Envelope(env.payload_type, env.payload, tuple(sigs)), keys)
    with pytest.raises(cls) as excinfo:
        require_threshold(count, 2, what="thing")
    assert type(excinfo.value) is cls
    assert "thing" in str(excinfo.value)


# -- properties ----------------------------------------------------------------------------------
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | st.datetimes(timezones=st.none() | st.timezones()).map(datetime.isoformat)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
b64_strings = st.binary(max_size=80).map(lambda b: base64.b64encode(b).decode())
keyids = st.sampled_from([W.release.keyid, W.roots[0].keyid]) | st.text(max_size=70)
signature_objects = st.fixed_dictionaries(
    {"keyid": keyids | json_values, "sig": b64_strings | json_values}
)
envelope_docs = st.fixed_dictionaries(
    {
        "payloadType": st.sampled_from([DESCRIPTOR_TYPE, KEYRING_TYPE, ROOT_TYPE, ""])
        | json_values,
        "payload": st.just(base64.b64encode(W.payload).decode()) | b64_strings | json_values,
        "signatures": st.lists(signature_objects | json_values, max_size=3) | json_values,
    },
    optional={"extra": json_values},
)
envelope_bytes = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=200).map(str.encode),
    envelope_docs.map(lambda d: json.dumps(d).encode()),
    envelope_docs.map(lambda d: json.dumps(d, ensure_ascii=False).encode("utf-8", "surrogatepass")),
)


@PROPERTY
@given(envelope_bytes)
@example(W.envelope)
@example(b"[" * 5000)
@example(b'{"payloadType": "\\ud800", "payload": "", "signatures": []}')
@example(b'{"payloadType": "t", "payload": "\xc3\xa9", "signatures": []}')
def test_parse_envelope_returns_or_refuses(data: bytes) -> None:
    try:
        env = parse_envelope(data)
    except BadContentError:
        return
    assert isinstance(env, Envelope)
    assert isinstance(env.payload, bytes)
    assert all(isinstance(s.sig, bytes) for s in env.signatures)


@PROPERTY
@given(envelope_bytes)
@example(W.envelope)
@example(
    json.dumps(
        {
            "payloadType": DESCRIPTOR_TYPE,
            "payload": "",
            "signatures": [{"keyid": "\ud800", "sig": ""}],
        }
    ).encode()
)
def test_verify_descriptor_returns_or_refuses(data: bytes) -> None:
    try:
        verify(data)
    except BadContentError:
        return
    # Only the genuine article gets through.
    assert parse_envelope(data).payload == W.payload


@PROPERTY
@given(position=st.integers(min_value=0), value=st.integers(min_value=0, max_value=255))
@example(position=SPACE_POSITION, value=ord("\t"))
@example(position=SPARE_POSITION, value=SPARE_VALUE)
@example(position=SPARE_POSITION, value=ord("A"))
def test_single_byte_mutation_never_forges(position: int, value: int) -> None:
    position %= len(W.envelope)
    assume(W.envelope[position] != value)
    data = W.envelope[:position] + bytes([value]) + W.envelope[position + 1 :]
    try:
        verified = verify(data)
    except BadContentError:
        return
    # It verified: the mutation must have left the decoded envelope as it was (JSON whitespace,
    # unused base64 bits), so the payload and the signatures are byte for byte the originals.
    tampered = parse_envelope(data)
    original = parse_envelope(W.envelope)
    assert tampered.payload == original.payload
    assert tampered.signatures == original.signatures
    assert verified.descriptor == BundleDescriptor.model_validate_json(W.payload)


def _sign(payload: bytes) -> bytes:
    return sign_envelope(DESCRIPTOR_TYPE, payload, [W.release]).to_bytes()


def _check_signed(payload: bytes) -> None:
    """Validly signed: either FormatError, or a descriptor that really is well-formed."""
    try:
        verified = verify(_sign(payload))
    except FormatError:
        return
    except ExpiredError:
        # Only if it is well-formed and its own expiry is past (the keys here do not expire).
        descriptor = BundleDescriptor.model_validate_json(payload, strict=True)
        assert descriptor.expires <= NOW
        return
    assert verified.descriptor == BundleDescriptor.model_validate_json(payload, strict=True)


@PROPERTY
@given(json_values)
def test_signed_arbitrary_json_is_format_error_or_valid(value: object) -> None:
    _check_signed(json.dumps(value).encode())


@PROPERTY
@given(st.binary(max_size=200))
@example(b'{"model": "\\ud800"}')
@example(canonical(descriptor_doc())[:-1])
def test_signed_arbitrary_bytes_are_format_error_or_valid(payload: bytes) -> None:
    _check_signed(payload)


descriptor_fields = sorted(descriptor_doc())


@PROPERTY
@given(
    changes=st.dictionaries(
        st.sampled_from([*descriptor_fields, "extra"]),
        json_values | st.none().map(lambda _: ...),
        max_size=3,
    )
)
@example(changes={"expires": (NOW - DAY).isoformat()})
@example(changes={"expires": "9999-12-31T23:59:59-23:59"})
@example(changes={"expires": "0001-01-01T00:00:00+23:59"})
@example(changes={"created": "9999-12-31T23:59:59+23:59"})
@example(changes={"release": 2**53})
@example(changes={})
def test_signed_mutated_descriptor_is_format_error_or_valid(changes: dict[str, object]) -> None:
    """A valid descriptor with fields replaced (``...``: removed) or added, validly signed."""
    doc = descriptor_doc()
    for key, value in changes.items():
        if value is ...:
            doc.pop(key, None)
        else:
            doc[key] = value
    _check_signed(json.dumps(doc).encode())


def test_mutated_descriptor_examples_reach_both_outcomes() -> None:
    """The properties above are not vacuous: the same helper sees successes and expiry."""
    verify(_sign(json.dumps(descriptor_doc()).encode()))
    with pytest.raises(ExpiredError):
        verify(_sign(json.dumps(descriptor_doc(expires=(NOW - DAY).isoformat())).encode()))
    far = datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone(-timedelta(hours=23, minutes=59)))
    assert verify(_sign(json.dumps(descriptor_doc(expires=far.isoformat())).encode()))
