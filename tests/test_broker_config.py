"""The shipped broker configuration as Debian runs it: config/broker/mosquitto.conf in the conf.d
of a copy of Debian's default main file, the shipped ACL, certificates from make-certs.sh.

Identities: devices cam-01 and cam-02, bundle servers bundle-server-1 and bundle-server-2 (the
device listener), the operator "operator" (its own CA, the operator listener). "Not delivered"
and "not disconnected" are shown with a control message behind, as in tests/test_broker_acl.py.
"""

from __future__ import annotations

import grp
import os
import re
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.fleet.server import serve
from agent.testing.broker import SHIPPED_CONF, Broker, make_certs, shipped_broker
from agent.testing.fleet import TOPICS
from agent.testing.wait import wait_until
from agent.transport.messages import (
    MAX_BLOCK_PACKET_BYTES,
    BlockRequest,
    decode_block_reply,
)
from agent.transport.session import MqttSettings
from tests.test_broker_acl import SHARED_REQUESTS, WAIT, Peer, _client, _granted, _try_connect

P = "ema/v1"
SERVERS = ("bundle-server-1", "bundle-server-2")
DEVICES = ("cam-01", "cam-02")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_certs(
        tmp_path_factory.mktemp("pki"), *DEVICES, servers=SERVERS, operators=["operator"]
    )


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory, pki: Path) -> Iterator[Broker]:
    with shipped_broker(tmp_path_factory.mktemp("shipped"), pki) as b:
        yield b


class Connector:
    def __init__(self, broker: Broker, certs: Path) -> None:
        self.broker = broker
        self.certs = certs
        self.peers: list[Peer] = []

    def peer(
        self,
        name: str,
        client_id: str | None = None,
        *,
        operator: bool = False,
    ) -> tuple[Peer, bool]:
        """A client with ``name``'s certificate; whether it got connected."""
        peer = _client(self.broker, self.certs / "ca.crt", self.certs / name, client_id or name)
        self.peers.append(peer)
        port = self.broker.operator_port if operator else None
        return peer, _try_connect(peer, self.broker, port)

    def __call__(self, name: str, client_id: str | None = None, *, operator: bool = False) -> Peer:
        peer, ok = self.peer(name, client_id, operator=operator)
        assert ok, f"{name} could not connect\n{self.broker.log()}"
        return peer

    def close(self) -> None:
        while self.peers:
            self.peers.pop().close()


@pytest.fixture
def connect(broker: Broker, pki: Path) -> Iterator[Connector]:
    c = Connector(broker, pki)
    yield c
    c.close()


def _still_connected(peer: Peer, device: str, watcher: Peer, tag: str) -> None:
    """``peer`` (certificate ``device``) is connected: a report it sends now reaches ``watcher``."""
    assert not peer.disconnected.is_set(), "it was disconnected"
    assert not peer.publish(f"{P}/devices/{device}/telemetry", tag.encode()).is_failure
    watcher.wait_message(f"{P}/devices/{device}/telemetry", tag.encode())
    assert not peer.disconnected.is_set(), "it was disconnected"


# -- the fragment in Debian's layout ------------------------------------------------------------


def test_the_fragment_loads_in_debians_main_file_with_both_listeners(broker: Broker) -> None:
    log = broker.log()
    assert f"listen socket on port {broker.port}." in log
    assert f"listen socket on port {broker.operator_port}." in log
    assert "Config loaded from" in log
    problems = [
        line
        for line in log.splitlines()
        if ("Error" in line or "Warning" in line) and "does not contain '%c' or '%u'" not in line
    ]
    assert problems == []
    # Debian's persistence is on (the fragment relies on it), in the redirected location.
    assert (broker.dir / "mosquitto.conf").read_text().count("persistence true") == 1
    assert "persistence" not in re.sub(r"#.*", "", SHIPPED_CONF.read_text()).replace(
        "persistent_client_expiration", ""
    )


def test_the_packet_limit_is_the_protocols_largest_packet() -> None:
    limits = re.findall(r"^max_packet_size (\d+)$", SHIPPED_CONF.read_text(), re.M)
    assert limits == [str(MAX_BLOCK_PACKET_BYTES)]


# -- client ids are bound to certificates ------------------------------------------------------


def test_a_device_certificate_cannot_take_over_another_devices_session(
    connect: Connector, broker: Broker
) -> None:
    watcher = connect("operator", "watcher", operator=True)
    assert _granted(watcher.subscribe(f"{P}/devices/+/telemetry"))
    cam1 = connect("cam-01")

    rogue = connect("cam-02", client_id="cam-01")  # asks for cam-01's client id

    _still_connected(cam1, "cam-01", watcher, "cam-01-after")
    _still_connected(rogue, "cam-02", watcher, "rogue-is-cam-02")
    assert re.search(r"New client connected from \S+ as cam-02 ", broker.log())


def test_a_device_certificate_cannot_take_over_a_bundle_server(connect: Connector) -> None:
    server = connect("bundle-server-1", client_id="edge-fleet-serve-1")
    assert _granted(server.subscribe(SHARED_REQUESTS))
    connect("cam-02", client_id="bundle-server-1")
    connect("cam-02", client_id="edge-fleet-serve-1")
    cam1 = connect("cam-01")
    topic = f"{P}/bundles/{'ab' * 32}/request/cam-01"
    assert not cam1.publish(topic, b"after").is_failure
    server.wait_message(topic, b"after")
    assert not server.disconnected.is_set()


def test_one_certificate_is_one_connection_on_the_device_listener(connect: Connector) -> None:
    first = connect("cam-01", client_id="first")
    connect("cam-01", client_id="second")  # the same id, cam-01: it takes its own session over
    assert first.disconnected.wait(WAIT)


def test_operators_have_their_own_listener_and_ca(connect: Connector) -> None:
    _, device_on_operator = connect.peer("cam-01", "cam-01", operator=True)
    assert not device_on_operator, "a device certificate must not reach the operator listener"
    _, operator_on_device = connect.peer("operator")
    assert not operator_on_device, "operator certificates are for the operator listener only"

    # One operator certificate, several tools at once, each with its own client id.
    status = connect("operator", "edge-fleet-status-1", operator=True)
    deploy = connect("operator", "edge-fleet-deploy-2", operator=True)
    cam1 = connect("cam-01")
    assert _granted(cam1.subscribe(f"{P}/devices/cam-01/desired"))
    assert _granted(status.subscribe(f"{P}/devices/+/reported"))
    assert not deploy.publish(f"{P}/devices/cam-01/desired", b"doc").is_failure
    cam1.wait_message(f"{P}/devices/cam-01/desired", b"doc")
    assert not cam1.publish(f"{P}/devices/cam-01/reported", b"rep").is_failure
    status.wait_message(f"{P}/devices/cam-01/reported", b"rep")
    assert not status.disconnected.is_set()
    assert not deploy.disconnected.is_set()
    # ...but it may not answer block requests: that is the bundle servers' role.
    assert deploy.publish(f"{P}/devices/cam-01/blocks", b"x").value == 0x87
    deploy.publish(f"{P}/devices/cam-01/desired", b"", retain=True)


# -- a device in the bundle servers' shared subscription ---------------------------------------


def test_a_device_in_the_shared_subscription_delays_requests_but_swallows_none(
    connect: Connector,
) -> None:
    server = connect("bundle-server-1")
    assert _granted(server.subscribe(SHARED_REQUESTS))
    # mosquitto 2.0 grants this (its ACL file does not check SUBSCRIBE) ...
    rogue = connect("cam-02", client_id="rogue-1")
    assert _granted(rogue.subscribe(SHARED_REQUESTS))
    # ... and a second connection with the same certificate replaces the first: one member.
    rogue2 = connect("cam-02", client_id="rogue-2")
    assert rogue.disconnected.wait(WAIT)
    assert _granted(rogue2.subscribe(SHARED_REQUESTS))
    cam1 = connect("cam-01")
    topic = f"{P}/bundles/{'cd' * 32}/request/cam-01"

    sends = []
    for i in range(8):
        payload = f"req-{i}".encode()
        for attempt in range(1, 4):  # as the device does: ask again when no answer comes
            assert not cam1.publish(topic, payload).is_failure
            try:
                wait_until(lambda p=payload: (topic, p) in server.topics(), 0.5, interval=0.02)
            except AssertionError:
                continue
            sends.append(attempt)
            break
        else:
            pytest.fail(f"{payload!r} never reached the server: {server.topics()}")

    assert rogue2.topics() == [], "the device reads none of them (the ACL denies `read`)"
    assert max(sends) == 2, f"a swallowed request is answered when asked again: {sends}"
    assert 2 in sends, f"the device was a member of the group and swallowed some: {sends}"


# -- retained requests ---------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["5", "3.1.1"], ids=["mqtt5", "mqtt311"])
def test_a_retained_request_is_not_answered_by_a_server_that_starts_later(
    connect: Connector, broker: Broker, pki: Path, tmp_path: Path, protocol: str
) -> None:
    stale, fresh = "e1" * 32, "f1" * 32
    cam1 = connect("cam-01")
    assert _granted(cam1.subscribe(f"{P}/devices/cam-01/blocks"))

    def request(sha: str) -> bytes:
        return BlockRequest(
            device_id="cam-01", bundle_sha256=sha, kind="blocks", indexes=[0]
        ).to_bytes()

    stale_topic = f"{P}/bundles/{stale}/request/cam-01"
    assert not cam1.publish(stale_topic, request(stale), retain=True).is_failure

    (tmp_path / "bundles").mkdir()
    stop = threading.Event()
    settings = MqttSettings(
        host=broker.host,
        port=broker.port,
        protocol=protocol,
        tls=True,
        ca_file=pki / "ca.crt",
        cert_file=pki / "bundle-server-2.crt",
        key_file=pki / "bundle-server-2.key",
        keepalive_s=5,
    )
    thread = threading.Thread(
        target=serve,
        args=(tmp_path / "bundles", settings),
        kwargs={"topics": TOPICS, "client_id": "srv", "rate_bytes_s": 0, "stop": stop},
        daemon=True,
    )
    thread.start()
    try:
        # Ask for another bundle until the server answers (then it has subscribed): the
        # control. Its answer comes after anything it did with the retained request.
        fresh_topic = f"{P}/bundles/{fresh}/request/cam-01"

        def answered() -> bool:
            cam1.publish(fresh_topic, request(fresh))
            return any(
                decode_block_reply(m.payload)[0].bundle_sha256 == fresh for m in list(cam1.messages)
            )

        wait_until(answered, WAIT, interval=0.2, message="the server never answered")
        shas = [decode_block_reply(m.payload)[0].bundle_sha256 for m in list(cam1.messages)]
        assert stale not in shas
    finally:
        stop.set()
        thread.join(WAIT)
        cam1.publish(stale_topic, b"", retain=True)


def test_the_broker_refuses_a_retained_request_larger_than_any_protocol_packet(
    connect: Connector, broker: Broker
) -> None:
    watcher = connect("operator", "retained-watcher", operator=True)
    cam1 = connect("cam-01")
    topic = f"{P}/bundles/{'aa' * 32}/request/cam-01"
    cam1.client.publish(topic, b"x" * MAX_BLOCK_PACKET_BYTES, qos=1, retain=True)
    assert cam1.disconnected.wait(WAIT), "mosquitto kept a client that sent too large a packet"
    assert "cam-01 disconnected due to oversize packet" in broker.log()
    # Nothing of it was retained: a new subscriber gets the control retained message only.
    control = connect("cam-02")
    control.publish(f"{P}/devices/cam-02/reported", b"control", retain=True)
    assert _granted(watcher.subscribe(f"{P}/bundles/+/request/+"))
    assert _granted(watcher.subscribe(f"{P}/devices/cam-02/reported"))
    watcher.wait_message(f"{P}/devices/cam-02/reported", b"control")
    assert [t for t, _ in watcher.topics() if "/request/" in t] == []
    control.publish(f"{P}/devices/cam-02/reported", b"", retain=True)


# -- revocation ----------------------------------------------------------------------------------


def test_a_revoked_certificate_is_refused(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "pki", *DEVICES, operators=["operator", "alice"])
    with shipped_broker(tmp_path, certs) as broker:
        c = Connector(broker, certs)
        try:
            assert c.peer("cam-02")[1], "with the empty CRL, cam-02 gets in"
            assert c.peer("alice", operator=True)[1]
            c.close()
            make_certs(tmp_path / "pki", revoke=["cam-02", "alice"])
            broker.stop()  # a restart loads the new CRL
            broker.start()
            assert c.peer("cam-01")[1]
            assert not c.peer("cam-02")[1], "the revoked device got in"
            assert c.peer("operator", operator=True)[1]
            assert not c.peer("alice", operator=True)[1], "the revoked operator got in"
        finally:
            c.close()


# -- make-certs.sh output ------------------------------------------------------------------------


def test_make_certs_keeps_the_ca_keys_apart_and_the_broker_key_readable_by_mosquitto(
    pki: Path,
) -> None:
    def mode(path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    broker_files = ["ca.crt", "ca.crl", "operator-ca.crt", "operator-ca.crl", "broker.crt"]
    assert all(mode(pki / f) == 0o644 for f in broker_files)
    assert mode(pki) == 0o755
    assert not (pki / "ca.key").exists()
    assert mode(pki / "private") == 0o700
    assert mode(pki / "private" / "ca.key") == 0o600
    assert mode(pki / "private" / "operator-ca.key") == 0o600
    assert all(mode(pki / f"{name}.key") == 0o600 for name in (*DEVICES, *SERVERS, "operator"))
    try:
        group = grp.getgrnam("mosquitto").gr_gid
    except KeyError:
        group = None
    key = pki / "broker.key"
    if os.geteuid() == 0 and group is not None:
        assert (key.stat().st_gid, mode(key)) == (group, 0o640)
    else:  # no right to give the file to the mosquitto group: it stays its owner's
        assert mode(key) == 0o600
