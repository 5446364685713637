"""The shipped broker ACL (config/broker/acl), against a real mosquitto with TLS client certificates.

The ACL file is copied verbatim into the broker, so a wrong shipped file fails these tests.
Identities come from config/broker/make-certs.sh: devices cam-01 and cam-02, and the fleet.

"Not delivered" is never shown by sleeping alone: after the message that must not arrive, the
same connection sends a control message that must arrive; MQTT keeps the order of one client's
messages, so once the control message is in, the forbidden one would have been too.
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode

from agent.testing.broker import Broker, make_certs
from agent.testing.wait import wait_until
from tests.conftest import broker_fixture

WAIT = 5.0  # seconds; every wait is bounded by this
P = "ema/v1"
SHARED_REQUESTS = f"$share/ema-bundle-servers/{P}/bundles/+/request/+"
BUNDLE = "ab" * 32
V5 = mqtt.MQTTv5
V311 = mqtt.MQTTv311


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second, unrelated CA issuing a certificate with the very same name cam-01."""
    return make_certs(tmp_path_factory.mktemp("other-ca"), "cam-01")


broker = broker_fixture(tls=True, scope="module")


@dataclass
class Peer:
    """A paho client (callback API v2) whose events are recorded for bounded waits."""

    client: mqtt.Client
    connected: threading.Event = field(default_factory=threading.Event)
    disconnected: threading.Event = field(default_factory=threading.Event)
    connect_rc: ReasonCode | None = None
    messages: list[mqtt.MQTTMessage] = field(default_factory=list)
    subacks: dict[int, list[ReasonCode]] = field(default_factory=dict)
    pubacks: dict[int, ReasonCode] = field(default_factory=dict)
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def wait_message(self, topic: str, payload: bytes | None = None) -> mqtt.MQTTMessage:
        def find() -> mqtt.MQTTMessage | None:
            return next(
                (
                    m
                    for m in self.messages
                    if m.topic == topic and (payload is None or m.payload == payload)
                ),
                None,
            )

        with self._cond:
            self._cond.wait_for(lambda: find() is not None, timeout=WAIT)
            found = find()
        assert found is not None, f"no message on {topic} {payload!r}; got {self.topics()}"
        return found

    def topics(self) -> list[tuple[str, bytes]]:
        with self._cond:
            return [(m.topic, bytes(m.payload)) for m in self.messages]

    def subscribe(self, topic: str, qos: int = 1) -> list[ReasonCode]:
        rc, mid = self.client.subscribe(topic, qos)
        assert rc == mqtt.MQTT_ERR_SUCCESS
        assert mid is not None
        with self._cond:
            assert self._cond.wait_for(lambda: mid in self.subacks, timeout=WAIT), "no SUBACK"
            return self.subacks[mid]

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> ReasonCode:
        """Publish at QoS 1 and return the PUBACK's reason code (always success in MQTT 3.1.1)."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(timeout=WAIT)
        assert info.is_published(), f"no PUBACK for {topic}"
        with self._cond:
            assert self._cond.wait_for(lambda: info.mid in self.pubacks, timeout=WAIT)
            return self.pubacks[info.mid]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


Connect = Callable[..., Peer]  # connect(name, client_id=name, protocol=V5) -> Peer


def _client(
    broker: Broker,
    ca: Path,
    identity: Path | None,
    client_id: str,
    protocol: MQTTProtocolVersion = V5,
) -> Peer:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
    peer = Peer(client)
    client.tls_set(
        ca_certs=str(ca),
        certfile=None if identity is None else str(identity.with_suffix(".crt")),
        keyfile=None if identity is None else str(identity.with_suffix(".key")),
        cert_reqs=ssl.CERT_REQUIRED,
    )

    def on_connect(c, userdata, flags, reason_code, properties):  # type: ignore[no-untyped-def]
        peer.connect_rc = reason_code
        if not reason_code.is_failure:
            peer.connected.set()
        else:
            peer.disconnected.set()

    def on_disconnect(c, userdata, flags, reason_code, properties):  # type: ignore[no-untyped-def]
        peer.disconnected.set()

    def on_message(c, userdata, message):  # type: ignore[no-untyped-def]
        with peer._cond:
            peer.messages.append(message)
            peer._cond.notify_all()

    def on_subscribe(c, userdata, mid, reason_codes, properties):  # type: ignore[no-untyped-def]
        with peer._cond:
            peer.subacks[mid] = list(reason_codes)
            peer._cond.notify_all()

    def on_publish(c, userdata, mid, reason_code, properties):  # type: ignore[no-untyped-def]
        with peer._cond:
            peer.pubacks[mid] = reason_code
            peer._cond.notify_all()

    client.on_connect = on_connect
    client.on_publish = on_publish
    client.on_disconnect = on_disconnect
    client.on_message = on_message
    client.on_subscribe = on_subscribe
    return peer


def _try_connect(peer: Peer, broker: Broker, port: int | None = None) -> bool:
    """Connect (to ``port``, default the broker's) and wait for the outcome: True once CONNACK
    says success, False if refused."""
    try:
        peer.client.connect(broker.host, port or broker.port, keepalive=10)
    except (ssl.SSLError, OSError):
        return False  # the TLS handshake failed (TLS 1.2, or our side rejected the server)
    peer.client.loop_start()
    for _ in range(int(WAIT / 0.05)):
        if peer.connected.is_set():
            return True
        if peer.disconnected.is_set():
            break
        peer.disconnected.wait(0.05)
    peer.client.disconnect()  # stop the loop thread from reconnecting
    peer.client.loop_stop()
    return False


@pytest.fixture
def connect(broker: Broker, certs: Path) -> Iterator[Connect]:
    """connect(name, client_id=name, protocol=V5) -> a connected Peer; all closed afterwards."""
    peers: list[Peer] = []

    def _connect(
        name: str, client_id: str | None = None, protocol: MQTTProtocolVersion = V5
    ) -> Peer:
        peer = _client(broker, certs / "ca.crt", certs / name, client_id or name, protocol)
        peers.append(peer)
        assert _try_connect(peer, broker), f"{name} could not connect\n{broker.log()}"
        return peer

    yield _connect
    for peer in peers:
        peer.close()


def _granted(codes: list[ReasonCode]) -> bool:
    return all(not rc.is_failure for rc in codes)


# -- (a)-(c): who may connect ------------------------------------------------------------------


def test_device_with_valid_certificate_connects(connect: Connect) -> None:
    peer = connect("cam-01")
    assert peer.connect_rc is not None
    assert peer.connect_rc.value == 0


def test_client_without_certificate_is_refused(broker: Broker, certs: Path) -> None:
    peer = _client(broker, certs / "ca.crt", None, "intruder-no-cert")
    try:
        assert not _try_connect(peer, broker)
    finally:
        peer.client.loop_stop()
    assert "intruder-no-cert" not in _connected_clients(broker)


def test_certificate_from_another_ca_is_refused(
    broker: Broker, certs: Path, other_ca: Path
) -> None:
    # Trust the real broker (our CA), present a cam-01 certificate signed by the other CA.
    peer = _client(broker, certs / "ca.crt", other_ca / "cam-01", "intruder-other-ca")
    try:
        assert not _try_connect(peer, broker)
    finally:
        peer.client.loop_stop()
    assert "intruder-other-ca" not in _connected_clients(broker)


def _connected_clients(broker: Broker) -> str:
    """Log lines of successful connections (mosquitto logs 'New client connected ... as ID')."""
    return "\n".join(line for line in broker.log().splitlines() if "New client connected" in line)


# -- (d), (e): device -> fleet -----------------------------------------------------------------


@pytest.mark.parametrize("protocol", [V5, V311], ids=["mqtt5", "mqtt311"])
def test_device_reports_reach_the_fleet_but_not_as_another_device(
    connect: Connect,
    protocol: MQTTProtocolVersion,
) -> None:
    fleet = connect("fleet", client_id=f"fleet-reports-{protocol}")
    assert _granted(fleet.subscribe(f"{P}/devices/+/reported"))
    cam = connect("cam-01", protocol=protocol)

    forged = cam.publish(f"{P}/devices/cam-02/reported", b"forged")  # denied by the ACL
    own = cam.publish(f"{P}/devices/cam-01/reported", b"own")  # allowed: the control message

    fleet.wait_message(f"{P}/devices/cam-01/reported", b"own")
    assert (f"{P}/devices/cam-02/reported", b"forged") not in fleet.topics()
    assert not own.is_failure
    # mosquitto 2.0 drops a denied publish but still acknowledges it: in MQTT 5 the PUBACK says
    # 0x87 Not authorized; MQTT 3.1.1 has no reason codes, so there it looks like a success.
    assert forged.value == (0x87 if protocol == V5 else 0)


# -- (f), (g): fleet -> device -----------------------------------------------------------------


@pytest.fixture(scope="module")
def retained(broker: Broker, certs: Path) -> None:
    """Retained desired documents for cam-01 and cam-02, and a retained trust document."""
    fleet = _client(broker, certs / "ca.crt", certs / "fleet", "fleet-retained")
    assert _try_connect(fleet, broker)
    try:
        fleet.publish(f"{P}/devices/cam-01/desired", b"desired-01", retain=True)
        fleet.publish(f"{P}/devices/cam-02/desired", b"desired-02", retain=True)
        fleet.publish(f"{P}/trust", b"trust", retain=True)
        fleet.publish(f"{P}/groups/cameras/desired", b"group", retain=True)
    finally:
        fleet.close()


@pytest.mark.usefixtures("retained")
@pytest.mark.parametrize("client_id", ["cam-01", "cam-02"], ids=["own-id", "spoofed-id"])
@pytest.mark.parametrize("protocol", [V5, V311], ids=["mqtt5", "mqtt311"])
def test_device_cannot_read_another_devices_desired(
    connect: Connect,
    client_id: str,
    protocol: MQTTProtocolVersion,
) -> None:
    # cam-01's certificate, possibly claiming to be "cam-02" as its client id: the ACL binds
    # topics to the certificate's CN (%u), never to the client id.
    cam = connect("cam-01", client_id=client_id, protocol=protocol)
    # mosquitto 2.0's acl_file does not check subscriptions: this SUBACK grants the subscription
    # (QoS 1, in MQTT 5 and 3.1.1 alike) and the `read` check is made on every message it would
    # deliver, the retained one included. So the SUBACK is no evidence either way; delivery is.
    cam.subscribe(f"{P}/devices/cam-02/desired")
    granted = cam.subscribe(f"{P}/devices/cam-01/desired")  # control: its retained comes next

    cam.wait_message(f"{P}/devices/cam-01/desired", b"desired-01")
    assert all(t != f"{P}/devices/cam-02/desired" for t, _ in cam.topics())
    assert _granted(granted)


@pytest.mark.usefixtures("retained")
def test_device_receives_its_desired_the_trust_document_and_groups(connect: Connect) -> None:
    cam = connect("cam-01")
    assert _granted(cam.subscribe(f"{P}/devices/cam-01/desired"))
    assert _granted(cam.subscribe(f"{P}/trust"))
    assert _granted(cam.subscribe(f"{P}/groups/+/desired"))
    assert cam.wait_message(f"{P}/devices/cam-01/desired", b"desired-01").retain
    assert cam.wait_message(f"{P}/trust", b"trust").retain
    assert cam.wait_message(f"{P}/groups/cameras/desired", b"group").retain


def test_device_cannot_publish_fleet_documents(connect: Connect) -> None:
    fleet = connect("fleet", client_id="fleet-watch")
    assert _granted(fleet.subscribe(f"{P}/#"))
    cam = connect("cam-01")
    cam.publish(f"{P}/devices/cam-01/desired", b"self-granted")
    cam.publish(f"{P}/trust", b"forged-trust")
    cam.publish(f"{P}/devices/cam-01/telemetry", b"control")
    fleet.wait_message(f"{P}/devices/cam-01/telemetry", b"control")
    got = fleet.topics()
    assert (f"{P}/devices/cam-01/desired", b"self-granted") not in got
    assert (f"{P}/trust", b"forged-trust") not in got


# -- (h): block requests on the shared subscription --------------------------------------------


def _request_round(cam: Peer, n: int, tag: str) -> tuple[str, set[bytes]]:
    topic = f"{P}/bundles/{BUNDLE}/request/cam-01"
    want = {f"{tag}-{i}".encode() for i in range(n)}
    for payload in sorted(want):
        assert not cam.publish(topic, payload).is_failure
    return topic, want


def test_fleet_serves_block_requests_on_a_shared_subscription(connect: Connect) -> None:
    servers = (
        connect("fleet", client_id="bundle-server-a"),
        connect("fleet", client_id="bundle-server-b"),
    )
    for server in servers:
        assert _granted(server.subscribe(SHARED_REQUESTS))
    cam = connect("cam-01")

    topic, want = _request_round(cam, 4, "req")

    for payload in sorted(want):
        _wait_any(servers, topic, payload)
    got = [p for s in servers for t, p in s.topics() if t == topic]
    assert sorted(got) == sorted(want), "each request goes to exactly one server of the group"
    assert all(s.topics() for s in servers), "the group shares the load"


def _wait_any(peers: tuple[Peer, ...], topic: str, payload: bytes, wait: float = WAIT) -> None:
    wait_until(
        lambda: any((topic, payload) in p.topics() for p in peers),
        wait,
        interval=0.05,
        message=lambda: f"no server got {payload!r}: {[p.topics() for p in peers]}",
    )
