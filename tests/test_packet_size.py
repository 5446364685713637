"""The size of a PUBLISH on the wire, against what paho writes and what mosquitto accepts.

paho's packets are measured on a loopback socket: :class:`Listener` is just enough of a broker
to take a real :class:`Session`'s CONNECT, answer it (announcing a Maximum Packet Size when told
to), and record every packet that comes after, byte for byte.
"""

from __future__ import annotations

import queue
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from agent.testing.broker import HOST, plain_broker
from agent.testing.fleet import WAIT, mqtt_settings
from agent.testing.wait import wait_until
from agent.transport.messages import (
    MAX_BLOCK_BYTES,
    MAX_BLOCK_PACKET_BYTES,
    MAX_BLOCK_REPLY_BYTES,
    BlockReplyHeader,
    block_reply_length,
)
from agent.transport.session import (
    InboxItem,
    Incoming,
    MqttSettings,
    Session,
    publish_packet_size,
)

PUBLISH = 3
CONNECT = 1


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


class Listener:
    """One MQTT client on a loopback port: CONNACK for its CONNECT, PUBACK for QoS 1 PUBLISHes,
    PINGRESP for pings; every packet it sends is put on ``packets`` as (type, raw bytes)."""

    def __init__(self, v5: bool, max_packet_size: int | None = None) -> None:
        self.v5 = v5
        self.max_packet_size = max_packet_size
        self.packets: queue.SimpleQueue[tuple[int, bytes]] = queue.SimpleQueue()
        self._server = socket.create_server((HOST, 0))
        self._server.settimeout(WAIT)
        self.port: int = self._server.getsockname()[1]
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _connack(self) -> bytes:
        if not self.v5:
            return b"\x20\x02\x00\x00"
        props = b""
        if self.max_packet_size is not None:
            props = b"\x27" + struct.pack(">I", self.max_packet_size)  # Maximum Packet Size
        body = b"\x00\x00" + _varint(len(props)) + props
        return b"\x20" + _varint(len(body)) + body

    def _run(self) -> None:
        try:
            conn, _ = self._server.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(WAIT)
            reader = conn.makefile("rb")
            while True:
                first = reader.read(1)
                if not first:
                    return
                raw = bytearray(first)
                length, shift = 0, 0
                while True:
                    b = reader.read(1)[0]
                    raw.append(b)
                    length |= (b & 0x7F) << shift
                    shift += 7
                    if not b & 0x80:
                        break
                body = reader.read(length)
                raw += body
                kind = first[0] >> 4
                self.packets.put((kind, bytes(raw)))
                if kind == CONNECT:
                    conn.sendall(self._connack())
                elif kind == PUBLISH and (first[0] >> 1) & 3:
                    (topic_len,) = struct.unpack_from(">H", body)
                    mid = body[2 + topic_len : 4 + topic_len]
                    conn.sendall(b"\x40\x02" + mid if not self.v5 else b"\x40\x03" + mid + b"\x00")
                elif kind == 12:  # PINGREQ
                    conn.sendall(b"\xd0\x00")
                elif kind == 14:  # DISCONNECT
                    return

    def next_publish(self) -> bytes:
        while True:
            kind, raw = self.packets.get(timeout=WAIT)
            if kind == PUBLISH:
                return raw

    def close(self) -> None:
        self._server.close()
        self._thread.join(WAIT)


@contextmanager
def connected(v5: bool, max_packet_size: int | None = None) -> Iterator[tuple[Session, Listener]]:
    listener = Listener(v5, max_packet_size)
    settings = MqttSettings(
        host=HOST, port=listener.port, protocol="5" if v5 else "3.1.1", tls=False, keepalive_s=60
    )
    session = Session(settings, "measured", queue.SimpleQueue(), persistent=False)
    session.start()
    try:
        assert session.connected.wait(WAIT), "no CONNACK"
        yield session, listener
    finally:
        session.stop()
        listener.close()


TOPICS = ["ema/v1/devices/cam-01/blocks", "ema/v1/devices/kamera-ü/blocks", "t"]
# Remaining Length values where its encoding grows a byte (MQTT 5 section 1.5.5).
EDGES = [127, 128, 16_383, 16_384, 2_097_151, 2_097_152]


@pytest.mark.parametrize("v5", [True, False], ids=["mqtt5", "mqtt311"])
def test_the_computed_size_is_what_paho_writes(v5: bool) -> None:
    with connected(v5) as (session, listener):
        for topic in TOPICS:
            fixed = 2 + len(topic.encode()) + 2 + (1 if v5 else 0)  # all but the payload
            for payload_len in [0, 1, 1000, *(r - fixed for r in EDGES if r >= fixed)]:
                session.publish(topic, b"\xa5" * payload_len)
                raw = listener.next_publish()
                assert len(raw) == session.packet_size(topic, payload_len), (topic, payload_len)
                assert len(raw) == publish_packet_size(topic, payload_len, v5=v5)


@pytest.mark.parametrize("announced", [None, 4096, 131_072])
def test_the_session_learns_the_announced_limit_from_the_connack(announced: int | None) -> None:
    with connected(True, announced) as (session, _):
        assert session.max_packet_size == announced


def test_mqtt311_has_no_announced_limit() -> None:
    with connected(False) as (session, _):
        assert session.max_packet_size is None


@pytest.mark.parametrize(("protocol", "limit"), [("5", 131_072), ("3.1.1", None)])
def test_mosquitto_announces_its_max_packet_size(
    tmp_path: Path, protocol: str, limit: int | None
) -> None:
    with plain_broker(tmp_path, ["max_packet_size 131072"]) as broker:
        session = Session(mqtt_settings(broker, protocol=protocol), "limits", queue.SimpleQueue())
        session.start()
        try:
            assert session.connected.wait(WAIT)
            assert session.max_packet_size == limit
        finally:
            session.stop()


def _payloads(inbox: queue.SimpleQueue[InboxItem], wait: float) -> list[int]:
    """Lengths of the messages that arrive within ``wait`` seconds (probes left out)."""
    lengths = []
    deadline = time.monotonic() + wait
    while (left := deadline - time.monotonic()) > 0:
        try:
            item = inbox.get(timeout=left)
        except queue.Empty:
            break
        if isinstance(item, Incoming) and item.payload != b"probe":
            lengths.append(len(item.payload))
            wait = 0.0
            deadline = time.monotonic() + 0.2  # anything else right behind it
    return lengths


def _subscribed(session: Session, inbox: queue.SimpleQueue[InboxItem], topic: str) -> None:
    """Publish probes until one comes back: then the subscription is in place."""

    def probe_back() -> bool:
        session.publish(topic, b"probe")
        try:
            while True:
                item = inbox.get(timeout=0.2)
                if isinstance(item, Incoming) and item.payload == b"probe":
                    return True
        except queue.Empty:
            return False

    wait_until(probe_back, WAIT, interval=0, message="the subscription did not take")


def test_a_packet_of_the_computed_limit_passes_mosquitto_and_a_larger_one_does_not(
    tmp_path: Path,
) -> None:
    """What the arithmetic says fits, fits. mosquitto leaves the Remaining Length bytes out of
    its count, so what it drops is 4 bytes over the limit by the spec's count (3 of them, and 1
    more)."""
    limit = 131_072
    topic = "ema/v1/devices/cam-01/blocks"
    with plain_broker(tmp_path, [f"max_packet_size {limit}"]) as broker:
        inbox: queue.SimpleQueue[InboxItem] = queue.SimpleQueue()
        receiver = Session(mqtt_settings(broker), "receiver", inbox, subscriptions=[topic])
        sender = Session(mqtt_settings(broker), "sender", queue.SimpleQueue(), persistent=False)
        receiver.start()
        sender.start()
        try:
            assert receiver.connected.wait(WAIT)
            assert sender.connected.wait(WAIT)
            _subscribed(receiver, inbox, topic)
            fits = limit - publish_packet_size(topic, 0) - 2  # the Remaining Length grows by 2
            assert sender.packet_size(topic, fits) == limit
            info = sender.publish(topic, b"x" * fits)
            info.wait_for_publish(WAIT)
            assert info.is_published()
            assert _payloads(inbox, WAIT) == [fits]
            assert sender.connects == 1
            sender.publish(topic, b"x" * (fits + 4))
            wait_until(
                lambda: sender.connects > 1,
                WAIT,
                interval=0.05,
                message="mosquitto kept a client that sent too large a packet",
            )
            assert "sender disconnected due to oversize packet" in broker.log()
            assert _payloads(inbox, 0.5) == [], "and it passed nothing of it on"
        finally:
            sender.stop()
            receiver.stop()


def test_the_largest_block_reply_fits_the_protocols_packet_limit() -> None:
    """MAX_BLOCK_PACKET_BYTES (and the shipped broker's max_packet_size, which
    tests/test_broker_config.py checks is the same) holds the largest block the format allows,
    on the longest blocks topic the topic rules allow, on MQTT 5 and 3.1.1."""
    header = BlockReplyHeader(bundle_sha256="f" * 64, kind="block", index=2**31, total=2**31 + 1)
    reply = block_reply_length(header, MAX_BLOCK_BYTES)
    assert reply <= MAX_BLOCK_REPLY_BYTES
    prefix = "/".join(["p" * 64] * 8)
    topic = f"{prefix}/devices/{'d' * 64}/blocks"
    for v5 in (True, False):
        assert publish_packet_size(topic, MAX_BLOCK_REPLY_BYTES, v5=v5) <= MAX_BLOCK_PACKET_BYTES
