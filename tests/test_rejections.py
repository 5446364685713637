"""Refused messages on every topic a device subscribes to, end to end.

One real mosquitto (TLS with client certificates and the shipped ACL), one bundle server and one
DeviceAgent (cam-01, in group "lobby") serve the whole module; the fleet identity publishes. The
device runs tiny 1.0.0, named by its own document and by the lobby document.

For every refused message the tests check the machine-readable code in the ``rejected`` event
(and in ``Reported.error`` for documents), that the device still runs what it ran, that its state
directory is byte-identical, and that a valid message on the same topic is accepted afterwards.
Nothing is shown by sleeping: a message is known to be processed once the report or the event it
causes has arrived, and a message that must cause nothing is followed by a refused control message
on the same topic.

The agent sends at most one ``rejected`` event per topic, reason code and second (counting the
rest into the next), and reports at most every ``report_interval_s``; the module sets both to
(next to) nothing so that each refusal has an event and a report of its own. The fleet publishes through a plain paho client run by ``loop_start``.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import shutil
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Literal

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from agent._strictjson import dump_model
from agent.config import AgentConfig
from agent.daemon import DeviceAgent
from agent.device import reporting
from agent.fleet.build import BuildOptions, build_bundle
from agent.fleet.keys import KeyStore, load_signer
from agent.fleet.sign import sign_bundle
from agent.testing.broker import Broker, make_certs, mosquitto_binary, tls_broker
from agent.testing.fleet import (
    TOPICS,
    WAIT,
    Watcher,
    agent,
    agent_config,
    bundle_server,
    deployment,
    watcher,
)
from agent.testing.models import make_onnx
from agent.transport.messages import (
    MAX_BLOCK_REPLY_BYTES,
    BlockReplyHeader,
    ErrorInfo,
    Event,
    Phase,
    Reported,
    TrustUpdate,
    encode_block_reply,
)
from agent.trust.envelope import sign_envelope
from agent.trust.keys import Signer
from agent.trust.metadata import (
    DEPLOYMENT_TYPE,
    DESCRIPTOR_TYPE,
    KEYRING_TYPE,
    MAX_METADATA_BYTES,
    ROOT_TYPE,
    BundleDescriptor,
    PublicKey,
    RootMetadata,
)

DEVICE = "cam-01"
OTHER_DEVICE = "cam-02"
GROUP = "lobby"
OTHER_GROUP = "hall"
ME = TOPICS.device(DEVICE)
TOPIC = {
    "device": ME.desired,
    "group": TOPICS.group_desired(GROUP),
    "trust": TOPICS.trust,
    "blocks": ME.blocks,
}
SOURCE = {"device": "device", "group": f"group-{GROUP}"}
FRAME = struct.Struct(">4sH")
NOT_FETCHED = "ab" * 32


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _code(error: ErrorInfo | None) -> str | None:
    return None if error is None else error.code


def _json(data: bytes) -> dict[str, object]:
    value = json.loads(data)
    assert isinstance(value, dict)
    return value


def _payload(envelope: bytes) -> dict[str, object]:
    return _json(base64.b64decode(str(_json(envelope)["payload"])))


def _with_payload(envelope: bytes, **changes: object) -> bytes:
    """The envelope with its payload changed and its signatures kept."""
    env = _json(envelope)
    payload = {**_payload(envelope), **changes}
    env["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    return json.dumps(env).encode()


def _padded(data: bytes, limit: int) -> bytes:
    """``data`` followed by whitespace up to one byte over ``limit`` (still the same JSON)."""
    return data + b" " * (limit + 1 - len(data))


def _frame(head: bytes, data: bytes = b"", magic: bytes = b"EMB1") -> bytes:
    return FRAME.pack(magic, len(head)) + head + data


class Publisher:
    """The fleet's publishing connection (identity "fleet"); paho's own thread does all its I/O."""

    def __init__(self, broker: Broker) -> None:
        assert broker.certs is not None
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"publisher-{os.getpid()}", protocol=mqtt.MQTTv5
        )
        self.client.tls_set(
            ca_certs=str(broker.certs / "ca.crt"),
            certfile=str(broker.certs / "fleet.crt"),
            keyfile=str(broker.certs / "fleet.key"),
        )
        self.connected = threading.Event()
        self.refused: dict[int, ReasonCode] = {}
        self.client.on_connect = self._on_connect
        self.client.on_publish = self._on_publish
        self.client.connect(broker.host, broker.port, keepalive=30)
        self.client.loop_start()
        assert self.connected.wait(WAIT), f"the publisher could not connect\n{broker.log()}"

    def _on_connect(
        self, client: mqtt.Client, userdata: object, flags: object, rc: ReasonCode, props: object
    ) -> None:
        if not rc.is_failure:
            self.connected.set()

    def _on_publish(
        self, client: mqtt.Client, userdata: object, mid: int, rc: ReasonCode, props: object
    ) -> None:
        if rc.is_failure:
            self.refused[mid] = rc

    def publish(self, topic: str, payload: bytes, retain: bool = True) -> None:
        self.publish_all(topic, [payload], retain=retain)

    def publish_all(self, topic: str, payloads: list[bytes], retain: bool = False) -> None:
        """Queue every payload at once, then wait for each PUBACK."""
        infos = [self.client.publish(topic, p, qos=1, retain=retain) for p in payloads]
        for info in infos:
            info.wait_for_publish(WAIT)
            assert info.is_published(), f"no PUBACK for {topic}"
            assert info.mid not in self.refused, self.refused[info.mid]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class World:
    broker: Broker
    fleet: Watcher
    pub: Publisher
    device: DeviceAgent
    state: Path
    keys: KeyStore
    release: Signer  # may sign every model
    narrow: Signer  # may sign only models named other-*
    descriptor: bytes  # tiny 1.0.0, installed
    upgrade: bytes  # tiny 1.1.0, served, not deployed
    first: dict[str, bytes]  # the first document accepted from each desired topic
    first_keyring: bytes  # keyring v1, the one shipped with the device
    trust_update: bytes  # the trust message accepted last
    sequences: Iterator[int]

    # -- documents ---------------------------------------------------------------------------
    def doc(
        self,
        kind: str,
        *,
        signer: Signer | None = None,
        sequence: int | None = None,
        now: datetime | None = None,
        days: int = 30,
        descriptor: bytes | None = None,
        device: str | None = None,
        group: str | None = None,
    ) -> bytes:
        """A deployment of tiny for the address behind ``kind`` (or ``device``/``group``)."""
        if device is None and group is None:
            device, group = (DEVICE, None) if kind == "device" else (None, GROUP)
        return deployment(
            {"tiny": descriptor or self.descriptor},
            signer or self.release,
            device=device,
            group=group,
            sequence=sequence or next(self.sequences),
            now=now,
            days=days,
        )

    def current(self, kind: str) -> bytes:
        """The document the device keeps for the ``kind`` topic (its own copy, on disk)."""
        return (self.state / "desired" / f"{SOURCE[kind]}.dsse").read_bytes()

    def descriptor_with(self, **changes: object) -> bytes:
        """tiny 1.0.0's descriptor with ``changes``, signed by the release key."""
        payload = base64.b64decode(str(_json(self.descriptor)["payload"]))
        d = BundleDescriptor.model_validate_json(payload).model_copy(update=changes)
        return sign_envelope(DESCRIPTOR_TYPE, dump_model(d), [self.release]).to_bytes()

    def root_signers(self) -> list[Signer]:
        return [load_signer(p) for p in sorted((self.keys.root / "private").glob("root-*.pem"))]

    def keyring(self, signers: list[Signer] | None = None, **changes: object) -> dict[str, object]:
        """The current keyring with ``changes``, signed by ``signers`` (the root threshold)."""
        keyring = self.keys.current_keyring().model_copy(update=changes)
        signers = self.root_signers()[:2] if signers is None else signers
        return _json(sign_envelope(KEYRING_TYPE, dump_model(keyring), signers).to_bytes())

    def reported(self) -> Reported:
        view = self.fleet.view.devices.get(DEVICE)
        assert view is not None
        assert view.reported is not None
        return view.reported

    def reports_since(self, since: datetime) -> list[Reported]:
        """The reports made at ``since`` or later, each once (QoS 1 may deliver one twice)."""
        found = (Reported.from_bytes(m.payload) for m in self.fleet.raw if m.topic == ME.reported)
        return sorted({r.at: r for r in found if r.at >= since}.values(), key=lambda r: r.at)

    def events_since(self, since: datetime) -> list[Event]:
        """The events made at ``since`` or later, each once."""
        found = {e.seq: e for e in self.fleet.events if e.at >= since}
        return [found[seq] for seq in sorted(found)]

    # -- valid messages ----------------------------------------------------------------------
    def accept_document(self, kind: str, signer: Signer | None = None) -> None:
        """Publish a new document on the ``kind`` desired topic; the device must take it."""
        sequence = next(self.sequences)
        doc = self.doc(kind, signer=signer, sequence=sequence)
        t0 = _now()
        self.pub.publish(TOPIC[kind], doc)
        if kind == "device":
            report = self.fleet.wait(
                DEVICE, lambda r: r.sequence == sequence, what=f"sequence {sequence} accepted"
            )
            assert report.error is None, report.error
        else:
            # The device's own document stays the effective one: taking the group's shows only
            # as the refusal's error being cleared (and in floors.json, below).
            self.fleet.wait(
                DEVICE, lambda r: r.at >= t0 and r.error is None, what="the error cleared"
            )
        floors = _json((self.state / "trust" / "floors.json").read_bytes())
        assert floors["sequence"][SOURCE[kind]]["sequence"] == sequence  # type: ignore[index]
        assert self.current(kind) == doc

    def accept_trust(self) -> None:
        """A keyring one version up with one more release key; a document signed by it passes."""
        keep = list(self.keys.current_keyring().release_keys)
        _, signer = self.keys.rotate_release(now=_now(), keep=keep)
        update = TrustUpdate(keyring=_json(self.keys.keyring_bytes())).to_bytes()
        self.pub.publish(TOPIC["trust"], update)
        self.trust_update = update
        self.accept_document("device", signer=signer)

    def accept(self, kind: str) -> None:
        if kind == "trust":
            self.accept_trust()
        else:
            self.accept_document("device" if kind == "blocks" else kind)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    mosquitto_binary()
    tmp = tmp_path_factory.mktemp("rejections")
    (tmp / "certs").mkdir()
    certs = make_certs(tmp / "certs", DEVICE, OTHER_DEVICE)
    keys = KeyStore.init(tmp / "keys", now=_now(), root_keys=3, threshold=2)
    release = load_signer(keys.release_key_paths()[0])
    first_keyring = keys.keyring_bytes()
    served = tmp / "served"
    served.mkdir()
    model = make_onnx(tmp / "tiny.onnx")
    envelopes = []
    for version in ("1.0.0", "1.1.0"):
        built = build_bundle([model], tmp / f"tiny-{version}.emb", BuildOptions("tiny", version))
        out, _ = sign_bundle(built.path, [release], now=_now())
        shutil.copyfile(built.path, served / built.path.name)
        envelopes.append(out.read_bytes())
    with ExitStack() as stack:
        patch = stack.enter_context(pytest.MonkeyPatch.context())
        patch.setattr(reporting, "REJECT_EVENT_INTERVAL_S", 0.0)
        broker = stack.enter_context(tls_broker(tmp, certs))
        config = agent_config(tmp / DEVICE, keys.root, broker, DEVICE, groups=(GROUP,))
        config = AgentConfig(**{**dict(config), "report_interval_s": 1e-6})
        fleet = stack.enter_context(watcher(broker))
        pub = Publisher(broker)
        stack.callback(pub.close)
        stack.enter_context(bundle_server(broker, served))
        device = stack.enter_context(agent(config))
        fleet.wait(DEVICE, lambda r: True, what="a first report")

        # keyring v2: a second release key that may sign only models named other-*
        _, narrow = keys.rotate_release(now=_now(), models=["other-*"], keep=[release.keyid])
        trust_update = TrustUpdate(keyring=_json(keys.keyring_bytes())).to_bytes()
        t0 = _now()
        pub.publish(TOPIC["trust"], trust_update)
        assert fleet.wait(DEVICE, lambda r: r.at >= t0, what="keyring v2").error is None

        w = World(
            broker=broker,
            fleet=fleet,
            pub=pub,
            device=device,
            state=config.state_dir,
            keys=keys,
            release=release,
            narrow=narrow,
            descriptor=envelopes[0],
            upgrade=envelopes[1],
            first={},
            first_keyring=first_keyring,
            trust_update=trust_update,
            sequences=itertools.count(int(time.time() * 1000)),
        )
        w.first["group"] = w.doc("group")
        pub.publish(TOPIC["group"], w.first["group"])
        running = fleet.wait(DEVICE, _runs("1.0.0"), what="tiny 1.0.0 active")
        assert running.error is None
        w.first["device"] = w.doc("device")
        pub.publish(TOPIC["device"], w.first["device"])
        sequence = _payload(w.first["device"])["sequence"]
        fleet.wait(DEVICE, lambda r: r.sequence == sequence, what="the device's own document")
        yield w


def _runs(version: str) -> Callable[[Reported], bool]:
    def check(r: Reported) -> bool:
        m = r.models.get("tiny")
        return m is not None and m.phase == Phase.ACTIVE and m.version == version

    return check


def _refused(w: World, kind: str, payload: bytes, code: str) -> None:
    """Publish ``payload`` on the ``kind`` topic; it must be refused with ``code``, changing nothing."""
    topic = TOPIC[kind]
    disk = _files(w.state)
    before = w.reported()
    t0 = _now()
    w.pub.publish(topic, payload, retain=False)
    if kind == "blocks":
        event = w.fleet.wait_event(lambda e: e.at >= t0, what=f"after the frame on {topic}")
    else:
        report = w.fleet.wait(DEVICE, lambda r: r.at >= t0, what=f"a report after {topic}")
        assert report.error is not None, f"the message on {topic} was accepted: {report}"
        event = w.fleet.wait_event(lambda e: e.at >= t0, what=f"after the message on {topic}")
        assert report.error.code == code, report.error
        assert report.models == before.models
        assert (report.deployment_id, report.sequence) == (before.deployment_id, before.sequence)
    assert event.kind == "rejected", event
    assert event.topic == topic
    assert _code(event.error) == code, event.error
    events = {(e.kind, e.topic, _code(e.error)) for e in w.events_since(t0)}
    assert events == {("rejected", topic, code)}
    assert _files(w.state) == disk
    assert _runs("1.0.0")(w.reported())


# -- desired topics: devices/cam-01/desired and groups/lobby/desired -----------------------------
MakeDoc = Callable[[World, str], bytes]


def _unsigned(w: World, kind: str) -> bytes:
    env = _json(w.doc(kind))
    env["signatures"] = []
    return json.dumps(env).encode()


def _tampered_payload(w: World, kind: str) -> bytes:
    return _with_payload(w.doc(kind), deployment_id="forged")


def _tampered_signature(w: World, kind: str) -> bytes:
    env = json.loads(w.doc(kind))
    [sig] = env["signatures"]
    raw = bytearray(base64.b64decode(sig["sig"]))
    raw[0] ^= 1
    sig["sig"] = base64.b64encode(bytes(raw)).decode()
    return json.dumps(env).encode()


def _same_sequence_other_content(w: World, kind: str) -> bytes:
    sequence = _payload(w.current(kind))["sequence"]
    assert isinstance(sequence, int)
    return w.doc(kind, sequence=sequence, days=29)


def _older_release(w: World, kind: str) -> bytes:
    release = _payload(w.descriptor)["release"]
    assert isinstance(release, int)
    return w.doc(kind, descriptor=w.descriptor_with(release=release - 1))


def _expired_descriptor(w: World, kind: str) -> bytes:
    now = _now().replace(microsecond=0)
    old = w.descriptor_with(created=now - timedelta(days=3), expires=now - timedelta(days=1))
    return w.doc(kind, descriptor=old)


def _signed_garbage(w: World, kind: str) -> bytes:
    return sign_envelope(DEPLOYMENT_TYPE, b'{"not": "a deployment"}', [w.release]).to_bytes()


def _bad_base64(w: World, kind: str) -> bytes:
    env = _json(w.doc(kind))
    env["payload"] = "not base64!"
    return json.dumps(env).encode()


def _crossed(w: World, kind: str) -> bytes:
    """A document for this device's other address: the group's on the device topic, and so on."""
    return w.doc("group" if kind == "device" else "device")


DESIRED: list[tuple[str, MakeDoc, str]] = [
    ("unsigned", _unsigned, "unsigned"),
    ("tampered-payload", _tampered_payload, "bad-signature"),
    ("tampered-signature", _tampered_signature, "bad-signature"),
    ("unknown-key", lambda w, k: w.doc(k, signer=Signer.generate()), "untrusted-key"),
    ("key-not-allowed-for-model", lambda w, k: w.doc(k, signer=w.narrow), "key-not-allowed"),
    ("replayed-older-sequence", lambda w, k: w.first[k], "rollback"),
    ("same-sequence-other-content", _same_sequence_other_content, "rollback"),
    ("older-bundle-release", _older_release, "rollback"),
    ("expired", lambda w, k: w.doc(k, now=_now() - timedelta(days=3), days=1), "expired"),
    ("expired-descriptor", _expired_descriptor, "expired"),
    ("not-json", lambda w, k: b"\x89PNG\r\n\x1a\n not json", "format"),
    ("truncated", lambda w, k: w.doc(k)[:200], "format"),
    ("json-not-an-envelope", lambda w, k: b'{"type": "deployment", "sequence": 1}', "format"),
    ("bad-base64", _bad_base64, "format"),
    ("signed-non-deployment", _signed_garbage, "format"),
    ("oversized-junk", lambda w, k: b"x" * (MAX_METADATA_BYTES + 1), "size-limit"),
    ("oversized-signed", lambda w, k: _padded(w.doc(k), MAX_METADATA_BYTES), "size-limit"),
    ("reported-json", lambda w, k: w.reported().to_bytes(), "format"),
    ("keyring-envelope", lambda w, k: w.keys.keyring_bytes(), "format"),
    ("descriptor-envelope", lambda w, k: w.descriptor, "format"),
    ("trust-update", lambda w, k: w.trust_update, "format"),
    ("block-frame", lambda w, k: _frame(b"{}"), "format"),
    ("other-device", lambda w, k: w.doc(k, device=OTHER_DEVICE), "wrong-target"),
    ("other-group", lambda w, k: w.doc(k, group=OTHER_GROUP), "wrong-target"),
    ("for-its-other-address", _crossed, "wrong-target"),
]


@pytest.mark.parametrize("kind", ["device", "group"])
@pytest.mark.parametrize(
    ("make", "code"), [pytest.param(make, code, id=name) for name, make, code in DESIRED]
)
def test_desired_document_is_refused(world: World, kind: str, make: MakeDoc, code: str) -> None:
    _refused(world, kind, make(world, kind), code)
    world.accept(kind)


# -- trust ----------------------------------------------------------------------------------------
Make = Callable[[World], bytes]


def _update(
    w: World, keyring: dict[str, object], roots: tuple[dict[str, object], ...] = ()
) -> bytes:
    return TrustUpdate(roots=list(roots), keyring=keyring).to_bytes()


def _t_unsigned(w: World) -> bytes:
    return _update(w, w.keyring(signers=[], version=w.keys.current_keyring().version + 1))


def _t_tampered(w: World) -> bytes:
    current = w.keys.keyring_bytes()
    version = _payload(current)["version"]
    assert isinstance(version, int)
    return _update(w, _json(_with_payload(current, version=version + 1)))


def _t_unknown_key(w: World) -> bytes:
    version = w.keys.current_keyring().version + 1
    return _update(w, w.keyring(signers=[Signer.generate(), Signer.generate()], version=version))


def _t_one_root_key(w: World) -> bytes:
    version = w.keys.current_keyring().version + 1
    return _update(w, w.keyring(signers=w.root_signers()[:1], version=version))


def _t_same_version_other_content(w: World) -> bytes:
    current = w.keys.current_keyring()
    return _update(w, w.keyring(expires=current.expires - timedelta(days=1)))


def _t_expired(w: World) -> bytes:
    version = w.keys.current_keyring().version + 1
    return _update(w, w.keyring(version=version, expires=_now() - timedelta(days=1)))


def _t_root_signed_by_itself(w: World) -> bytes:
    """Root v2 signed by its own new keys only, not by the threshold of root v1."""
    new = [Signer.generate() for _ in range(3)]
    root = RootMetadata(
        version=w.keys.current_root().version + 1,
        expires=_now() + timedelta(days=365),
        keys={s.keyid: PublicKey(public=s.public_raw.hex()) for s in new},
        threshold=2,
    )
    envelope = sign_envelope(ROOT_TYPE, dump_model(root), new).to_bytes()
    return _update(w, _json(w.keys.keyring_bytes()), (_json(envelope),))


TRUST: list[tuple[str, Make, str]] = [
    ("unsigned", _t_unsigned, "unsigned"),
    ("tampered-payload", _t_tampered, "bad-signature"),
    ("unknown-keys", _t_unknown_key, "untrusted-key"),
    ("below-root-threshold", _t_one_root_key, "threshold"),
    ("replayed-older-keyring", lambda w: _update(w, _json(w.first_keyring)), "rollback"),
    ("same-version-other-content", _t_same_version_other_content, "rollback"),
    ("expired", _t_expired, "expired"),
    ("root-not-signed-by-trusted-root", _t_root_signed_by_itself, "untrusted-key"),
    ("not-json", lambda w: b"\x00\xff not json", "format"),
    ("truncated", lambda w: w.trust_update[:100], "format"),
    ("keyring-not-an-envelope", lambda w: _update(w, {"hello": "world"}), "format"),
    ("oversized-junk", lambda w: b"{" * (MAX_METADATA_BYTES + 1), "size-limit"),
    ("oversized-update", lambda w: _padded(w.trust_update, MAX_METADATA_BYTES), "size-limit"),
    ("deployment-envelope", lambda w: w.current("device"), "format"),
    ("bare-keyring-envelope", lambda w: w.keys.keyring_bytes(), "format"),
    ("deployment-as-keyring", lambda w: _update(w, _json(w.current("device"))), "format"),
    ("reported-json", lambda w: w.reported().to_bytes(), "format"),
]


@pytest.mark.parametrize(
    ("make", "code"), [pytest.param(make, code, id=name) for name, make, code in TRUST]
)
def test_trust_message_is_refused(world: World, make: Make, code: str) -> None:
    _refused(world, "trust", make(world), code)
    world.accept("trust")


# -- blocks ---------------------------------------------------------------------------------------
def _header(**over: object) -> bytes:
    head = {"bundle_sha256": NOT_FETCHED, "kind": "block", "index": 0, "total": 1, **over}
    return json.dumps(head).encode()


def _valid_frame(kind: Literal["block", "error"] = "block") -> bytes:
    header = BlockReplyHeader(bundle_sha256=NOT_FETCHED, kind=kind, index=0, total=1)
    return encode_block_reply(header, b"\0" * 4096)


BLOCKS: list[tuple[str, Make, str]] = [
    ("other-magic", lambda w: _frame(_header(), magic=b"EMB2"), "format"),
    ("too-short", lambda w: b"EMB1", "format"),
    ("header-past-the-end", lambda w: _valid_frame()[:20], "format"),
    ("header-not-json", lambda w: _frame(b"\xff\xfe not json"), "format"),
    ("header-bad-field", lambda w: _frame(_header(index=-1)), "format"),
    ("header-unknown-field", lambda w: _frame(_header(extra=1)), "format"),
    ("reported-as-header", lambda w: _frame(w.reported().to_bytes()), "format"),
    ("deployment-envelope", lambda w: w.current("device"), "format"),
    ("reported-json", lambda w: w.reported().to_bytes(), "format"),
    ("oversized", lambda w: _valid_frame() + bytes(MAX_BLOCK_REPLY_BYTES), "size-limit"),
]


@pytest.mark.parametrize(
    ("make", "code"), [pytest.param(make, code, id=name) for name, make, code in BLOCKS]
)
def test_block_frame_is_refused(world: World, make: Make, code: str) -> None:
    t0 = _now()
    _refused(world, "blocks", make(world), code)
    world.accept("blocks")
    # Block frames are not documents: the refusal is an event only, never Reported.error.
    errors = [r.error for r in world.reports_since(t0)]
    assert errors
    assert not any(errors)


# -- messages that must change nothing, each followed by a refused control message ----------------
def _control(w: World, kind: str) -> tuple[bytes, str]:
    if kind == "blocks":
        return b"control", "format"
    if kind == "trust":
        return _t_unsigned(w), "unsigned"
    return _unsigned(w, kind), "unsigned"


IGNORED: list[tuple[str, str, Make]] = [
    ("device", "same-document-again", lambda w: w.current("device")),
    ("device", "retained-document-cleared", lambda w: b""),
    ("group", "same-document-again", lambda w: w.current("group")),
    ("group", "retained-document-cleared", lambda w: b""),
    ("trust", "same-update-again", lambda w: w.trust_update),
    ("trust", "retained-update-cleared", lambda w: b""),
    ("blocks", "block-of-a-bundle-not-fetched", lambda w: _valid_frame()),
    ("blocks", "error-reply-for-a-bundle-not-fetched", lambda w: _valid_frame("error")),
]


@pytest.mark.parametrize(
    ("kind", "make"),
    [pytest.param(kind, make, id=f"{kind}-{name}") for kind, name, make in IGNORED],
)
def test_message_that_changes_nothing(world: World, kind: str, make: Make) -> None:
    w, topic = world, TOPIC[kind]
    disk = _files(w.state)
    before = w.reported()
    control, code = _control(w, kind)
    t0 = _now()
    w.pub.publish(topic, make(w), retain=kind != "blocks")
    w.pub.publish(topic, control, retain=False)
    if kind == "blocks":
        w.fleet.wait_event(lambda e: e.at >= t0, what="the control frame refused")
    else:
        report = w.fleet.wait(DEVICE, lambda r: r.at >= t0, what="the control message refused")
        assert _code(report.error) == code, report
        assert report.models == before.models
        assert (report.deployment_id, report.sequence) == (before.deployment_id, before.sequence)
        assert {_code(r.error) for r in w.reports_since(t0)} == {code}
        w.fleet.wait_event(lambda e: e.at >= t0, what="the control message refused")
    events = {(e.kind, e.topic, _code(e.error)) for e in w.events_since(t0)}
    assert events == {("rejected", topic, code)}
    assert _files(w.state) == disk
    w.accept(kind)


# -- after all that, a new version still arrives over the blocks topic -------------------------------
def test_new_version_still_arrives_over_the_blocks_topic(world: World) -> None:
    w = world
    t0 = _now()
    w.pub.publish(TOPIC["blocks"], b"garbage before", retain=False)
    w.fleet.wait_event(lambda e: e.at >= t0, what="the garbage refused")
    sequence = next(w.sequences)
    w.pub.publish(TOPIC["device"], w.doc("device", descriptor=w.upgrade, sequence=sequence))
    t1 = _now()
    w.pub.publish(TOPIC["blocks"], b"garbage during", retain=False)
    reported = w.fleet.wait(DEVICE, _runs("1.1.0"), what="tiny 1.1.0 active")
    w.fleet.wait_event(lambda e: e.kind == "rejected" and e.at >= t1, what="the second garbage")
    assert reported.error is None
    assert reported.sequence == sequence
    assert reported.models["tiny"].bundle_sha256 == _payload(w.upgrade)["bundle_sha256"]
    # Events come through the device's store-and-forward queue, the report does not.
    w.fleet.wait_event(
        lambda e: e.kind == "phase" and e.phase == Phase.ACTIVE and e.at >= t1, what="active"
    )
    events = w.events_since(t0)
    refused = {(e.topic, _code(e.error)) for e in events if e.kind == "rejected"}
    assert refused == {(TOPIC["blocks"], "format")}
    phases = [e.phase for e in events if e.kind == "phase"]
    assert phases[:2] == [Phase.PENDING, Phase.DOWNLOADING]
    assert phases[-1] == Phase.ACTIVE
    assert Phase.FAILED not in phases


# -- the connection ---------------------------------------------------------------------------------
FLOOD = 300
DROPPED = r"Error|disconnected:|closed its connection"


def test_device_keeps_its_one_connection_through_all_refusals(world: World) -> None:
    """Every message above, and a flood of refused ones, went over one broker connection.

    The agent's thread publishes each refusal (an event and a report) while the session's thread
    reads the next message and acknowledges it. A device that drops its connection under refused
    traffic can be knocked off the broker by anyone who may publish to it, and each reconnect
    replays the messages in flight.
    """
    w = world
    t0 = _now()
    w.pub.publish_all(TOPIC["device"], [b"flood %d" % i for i in range(FLOOD)])
    w.pub.publish(TOPIC["trust"], b"last", retain=False)
    w.fleet.wait_event(
        lambda e: e.at >= t0 and e.topic == TOPIC["trust"], what="the last message refused"
    )
    refused = [e for e in w.events_since(t0) if e.topic == TOPIC["device"]]
    assert len(refused) >= FLOOD
    assert {_code(e.error) for e in refused} == {"format"}
    dropped = [line for line in w.broker.log().splitlines() if re.search(DROPPED, line)]
    assert w.device.session.connects == 1, "\n".join(dropped[:10])
