"""One MQTT connection that keeps itself up (paho-mqtt 2.x, callback API version 2).

:class:`Session` owns a paho client and one network thread of its own (``mqtt-<client id>``).
That thread connects, runs paho's loop, and on any loss of the connection waits a jittered
exponential backoff before it connects again (equal jitter: between half and all of
``min(max, initial * 2**attempt)``, so a fleet that lost its broker does not come back in step).

Threads:

* **paho callbacks** (``on_connect``, ``on_disconnect``, ``on_message``, ``on_subscribe``) run on
  the session's network thread, inside ``client.loop()``. They never block: they only put
  :class:`Incoming` and :class:`Connection` items on the ``inbox`` queue, which the daemon's own
  loop (or the bundle server's) drains. A callback that blocked would stall keepalives and every
  other message.
* :meth:`Session.publish` and :meth:`Session.subscribe` may be called from any thread; paho
  guards its outgoing queue with its own locks and wakes the network thread.

What the broker keeps for us: a persistent session (MQTT 5 ``clean_start=False`` with a session
expiry; MQTT 3.1.1 ``clean_session=False``), so QoS 1 messages sent while the device was away are
delivered when it returns; subscriptions are made again on every connect anyway (idempotent; the
broker may have expired the session). The will message (retained) says ``offline`` on
``devices/{id}/online`` when the connection drops without a DISCONNECT; on connect the session
publishes the retained ``online`` message.

Broker clusters: ``failover`` names further nodes of the same cluster. An attempt that does not
reach a successful CONNACK moves on to the next one, in turn; a connection that was up is tried
again where it was first. The session the broker keeps is the cluster's, so it resumes on any
node. A node that dies sends no will (it held the connection), so ``online`` stays as it was
until the device says it again from another node.

Refused subscriptions: the session names each topic the broker refused in the SUBACK and asks
for it again, with the same jittered backoff, for as long as the connection lasts (and again at
every connect). A refusal may pass: a clustered broker may refuse while it re-elects the node
that stores subscriptions, and a server whose request subscription was lost would answer nobody.

Certificate renewal: the TLS files (``ca_file``, ``cert_file``, ``key_file``) are looked at
every ``tls_check_s`` seconds on the network thread (a ``stat`` of each: inode, size, mtime)
and at once after :meth:`Session.reload_tls` (the daemon's SIGHUP). When they changed and load
together, the next connection uses them, and the session reconnects at once (a clean
DISCONNECT: no will; the broker keeps the session, paho sends again what was in flight) so that
the broker sees the new certificate. Files that do not load (a key written before its
certificate) change nothing: the connection stays up on the old ones, and they are tried again
when they change again.

Packet size: a broker drops a client that sends a packet larger than it accepts (mosquitto's
``max_packet_size``; AWS IoT Core's 128 KiB per message), and paho, reconnecting, sends the same
QoS 1 message again. On MQTT 5 the broker announces its limit in the CONNACK (Maximum Packet
Size, MQTT 5 section 3.2.2.3.6); :attr:`Session.max_packet_size` holds it from each connect.
:func:`publish_packet_size` says how large a PUBLISH is on the wire, so a sender can check first.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from agent.errors import ConfigError

log = logging.getLogger("agent.transport")


class MqttSettings(BaseModel):
    """How to reach the broker (the ``[mqtt]`` table of agent.toml; also the fleet CLI's flags)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "localhost"
    port: Annotated[int, Field(ge=1, le=65535)] = 8883
    protocol: Literal["5", "3.1.1"] = "5"
    tls: bool = True
    ca_file: Path | None = None  # None: the system's CA store
    cert_file: Path | None = None  # the client certificate (its CN is the identity)
    key_file: Path | None = None
    client_id: str | None = None  # default: the device id (or the fleet tool's own)
    keepalive_s: Annotated[int, Field(ge=5, le=3600)] = 30
    session_expiry_s: Annotated[int, Field(ge=0)] = 7 * 24 * 3600  # MQTT 5 only
    backoff_initial_s: Annotated[float, Field(gt=0)] = 1.0
    backoff_max_s: Annotated[float, Field(gt=0)] = 60.0
    connect_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    # How often the TLS files are looked at for a renewed certificate (0: only on reload).
    tls_check_s: Annotated[float, Field(ge=0)] = 5.0
    # Other nodes of the same broker cluster, tried in turn after host:port: "HOST" (with
    # ``port``), "HOST:PORT" or "[IPv6]:PORT".
    failover: list[str] = Field(default=[], max_length=16)

    @field_validator("failover")
    @classmethod
    def _endpoints(cls, value: list[str]) -> list[str]:
        for entry in value:
            parse_endpoint(entry, 1)  # raises ValueError with what is wrong
        return value

    @model_validator(mode="after")
    def _pair(self) -> MqttSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("give cert_file and key_file together")
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("backoff_max_s must not be below backoff_initial_s")
        return self

    @property
    def endpoints(self) -> list[tuple[str, int]]:
        """Where to connect, in the order tried: host:port, then each failover node."""
        return [(self.host, self.port), *(parse_endpoint(e, self.port) for e in self.failover)]


def parse_endpoint(text: str, default_port: int) -> tuple[str, int]:
    """``HOST``, ``HOST:PORT`` or ``[IPv6]:PORT`` as (host, port); ValueError if malformed."""
    host, colon, port = text, "", ""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"{text!r}: write an IPv6 address as [ADDRESS]:PORT")
        colon, port = rest[:1], rest[1:]
    elif text.count(":") == 1:  # more than one: a bare IPv6 address
        host, colon, port = text.partition(":")
    if not host or any(c.isspace() for c in host):
        raise ValueError(f"{text!r} is not HOST, HOST:PORT or [IPv6]:PORT")
    if colon and not (port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(f"{text!r}: the port must be a number from 1 to 65535")
    return host, int(port) if port else default_port


@dataclass(frozen=True)
class Incoming:
    """A message as it came off the wire."""

    topic: str
    payload: bytes
    retain: bool


@dataclass(frozen=True)
class Connection:
    """The session connected (``up``, with ``session_present``) or lost its connection."""

    up: bool
    session_present: bool = False
    reason: str = ""


InboxItem = Incoming | Connection


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes


def _varint_size(n: int) -> int:
    """Bytes of an MQTT Variable Byte Integer (MQTT 5 section 1.5.5; 3.1.1 section 2.2.3)."""
    return 1 if n < 1 << 7 else 2 if n < 1 << 14 else 3 if n < 1 << 21 else 4


def publish_packet_size(
    topic: str, payload_len: int, *, qos: int = 1, v5: bool = True, properties_len: int = 0
) -> int:
    """The whole PUBLISH packet as the spec counts it (MQTT 5 section 3.3), in bytes.

    Fixed header byte, Remaining Length, topic (2-byte length and UTF-8), packet identifier
    (QoS 1 and 2), on MQTT 5 the property length and ``properties_len`` bytes of properties, then
    the payload: what paho writes for :meth:`Session.publish` (tests/test_packet_size.py measures
    it). Brokers count no more than this (mosquitto leaves out the Remaining Length bytes), so a
    packet of this size at or below a broker's limit passes it.
    """
    remaining = 2 + len(topic.encode()) + (2 if qos else 0) + payload_len
    if v5:
        remaining += _varint_size(properties_len) + properties_len
    return 1 + _varint_size(remaining) + remaining


def backoff_delay(attempt: int, initial: float, maximum: float, rng: random.Random) -> float:
    """Equal jitter: a delay between half and all of ``min(maximum, initial * 2**attempt)``."""
    ceiling = min(maximum, initial * (2 ** min(attempt, 30)))
    return float(ceiling / 2 + rng.uniform(0, ceiling / 2))


def tls_context(settings: MqttSettings) -> ssl.SSLContext:
    """The client TLS context of ``settings`` (TLS 1.2 up); ConfigError when its files do not load."""
    try:
        context = ssl.create_default_context(
            cafile=None if settings.ca_file is None else str(settings.ca_file)
        )
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if settings.cert_file is not None and settings.key_file is not None:
            context.load_cert_chain(str(settings.cert_file), str(settings.key_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the TLS files: {exc}") from None
    return context


def tls_stamp(settings: MqttSettings) -> tuple[tuple[int, int, int, int] | None, ...]:
    """What says the TLS files of ``settings`` changed: each one's device, inode, size and
    mtime (None for one that cannot be read)."""
    stamps = []
    for path in (settings.ca_file, settings.cert_file, settings.key_file):
        try:
            st = path.stat() if path is not None else None
        except OSError:
            st = None
        stamps.append(None if st is None else (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(stamps)


def _network_thread_writes(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    """Nothing to register: the network thread's loop() writes whatever is queued."""


def _no_delay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    """Small packets (block requests, PUBACKs) go out at once.

    With Nagle's algorithm on, a request written just after a PUBACK waits for the peer's
    delayed ACK (40 ms on Linux): once per window, that is most of a transfer's time.
    """
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def new_client(
    settings: MqttSettings,
    client_id: str,
    *,
    will: Will | None = None,
    persistent: bool = True,
    tls: ssl.SSLContext | None = None,
) -> mqtt.Client:
    """A paho client set up as every connection of the project is; callbacks are the caller's.

    ``tls`` is a context to share between many clients (default: one made from ``settings``).
    The caller connects it with :func:`connect` and drives its network loop.
    """
    v5 = settings.protocol == "5"
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        clean_session=None if v5 else not persistent,
        reconnect_on_failure=False,  # the caller reconnects, with jitter
    )
    client.connect_timeout = settings.connect_timeout_s
    # Replies and retained documents are never lost to a full paho queue: bounded by the
    # request window on the device and by the bundle server's own backlog.
    client.max_queued_messages_set(0)
    client.max_inflight_messages_set(20)
    if settings.tls:
        client.tls_set_context(tls or tls_context(settings))
    if will is not None:
        client.will_set(will.topic, will.payload, qos=1, retain=True)
    client.on_socket_open = _no_delay
    return client


def connect(
    client: mqtt.Client,
    settings: MqttSettings,
    *,
    persistent: bool = True,
    endpoint: tuple[str, int] | None = None,
) -> None:
    """Open the connection to ``endpoint`` (default: host and port) and send CONNECT, with the
    session kept by the broker when ``persistent``. Blocks for up to ``connect_timeout_s``;
    raises OSError or ssl.SSLError."""
    host, port = endpoint or (settings.host, settings.port)
    properties = None
    clean_start: bool | Literal[3] = mqtt.MQTT_CLEAN_START_FIRST_ONLY
    if settings.protocol == "5":
        clean_start = not persistent
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = settings.session_expiry_s if persistent else 0
    client.connect(
        host,
        port,
        keepalive=settings.keepalive_s,
        clean_start=clean_start,
        properties=properties,
    )


class Session:
    """A paho client on its own network thread, reconnecting with jittered backoff.

    Everything that arrives goes to ``inbox``; :meth:`publish` may be called from any thread.
    ``online`` (retained) is published on ``will.topic`` at every connect when ``online_payload``
    is given; the will (retained) carries ``will.payload``.
    """

    def __init__(
        self,
        settings: MqttSettings,
        client_id: str,
        inbox: queue.SimpleQueue[InboxItem],
        *,
        subscriptions: Sequence[str] = (),
        will: Will | None = None,
        online_payload: bytes | None = None,
        persistent: bool = True,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.client_id = settings.client_id or client_id
        self.inbox = inbox
        self._subscriptions: list[str] = list(subscriptions)
        self._will = will
        self._online = online_payload
        self._persistent = persistent
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not secrecy
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.connected = threading.Event()
        self.attempts = 0  # connection attempts since the last success (for tests and status)
        self.connects = 0  # successful connects so far
        self.refused: dict[int, str] = {}  # message id -> reason the broker gave (MQTT 5)
        # The largest packet the broker accepts, from the last CONNACK (MQTT 5 Maximum Packet
        # Size); None: it announced none (always so on 3.1.1). Set on the network thread before
        # ``connected`` is, read from any thread.
        self.max_packet_size: int | None = None
        self.v5 = settings.protocol == "5"
        self._endpoints = settings.endpoints
        self._endpoint = 0  # index of the node connected to, or tried next
        self._subscribing: dict[int, list[str]] = {}  # SUBSCRIBE message id -> its topics
        # Topics the broker refused, asked for again at ``_retry_at`` (network thread only).
        self._refused_topics: list[str] = []
        self._retry_at = 0.0
        self._retries = 0
        self._answered = False  # a CONNACK came for the connection attempt (network thread)
        # TLS files: their stamp when last loaded (or tried), when next looked at, and whether
        # a reload was asked for (any thread sets it; the network thread acts on it).
        self._tls_stamp = tls_stamp(settings) if settings.tls else ()
        self._tls_check_at = time.monotonic() + settings.tls_check_s
        self._tls_reload = threading.Event()
        self._reconnect_now = False  # skip the backoff once: a reconnect for new TLS files
        self.tls_reloads = 0  # TLS files taken up since start (for tests and status)
        self._client = self._make_client()

    @property
    def endpoint(self) -> tuple[str, int]:
        """The broker node connected to (or tried next): host and port."""
        return self._endpoints[self._endpoint]

    # -- set-up -----------------------------------------------------------------------------
    def _make_client(self) -> mqtt.Client:
        client = new_client(
            self.settings, self.client_id, will=self._will, persistent=self._persistent
        )
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        # publish() and subscribe() are called from other threads. Without this callback paho
        # writes to the socket from the caller's thread, racing loop() on the network thread
        # (interleaved packets, corrupted TLS records); with it, paho queues the packet and
        # wakes the network thread, which does every write.
        client.on_socket_register_write = _network_thread_writes
        return client

    # -- paho callbacks: all on the network thread; none blocks --------------------------------
    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._answered = True
        if reason_code.is_failure:
            log.warning("broker refused the connection: %s", reason_code)
            return
        announced = getattr(properties, "MaximumPacketSize", None) if self.v5 else None
        self.max_packet_size = announced if isinstance(announced, int) else None
        with self._lock:
            topics = list(self._subscriptions)
        self._refused_topics.clear()  # all asked for again now
        self._retries = 0
        if topics:
            self._subscribed(topics, client.subscribe([(t, 1) for t in topics])[1])
        if self._online is not None and self._will is not None:
            client.publish(self._will.topic, self._online, qos=1, retain=True)
        self.attempts = 0
        self.connects += 1
        self.connected.set()
        log.info(
            "connected to %s:%d (MQTT %s, session %s%s)",
            *self.endpoint,
            self.settings.protocol,
            "resumed" if flags.session_present else "new",
            "" if self.max_packet_size is None else f", packets up to {self.max_packet_size} bytes",
        )
        self.inbox.put(Connection(up=True, session_present=flags.session_present))

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        was_up = self.connected.is_set()
        self.connected.clear()
        if was_up:
            if self._stop.is_set():
                log.info("disconnected from the broker")
            else:
                log.warning("connection to the broker lost: %s", reason_code)
            self.inbox.put(Connection(up=False, reason=str(reason_code)))

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self.inbox.put(Incoming(message.topic, bytes(message.payload), bool(message.retain)))

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:  # MQTT 5 only: e.g. 0x87, the ACL denied it
            with self._lock:
                self.refused[mid] = str(reason_code)
            log.error("broker refused a message (mid %d): %s", mid, reason_code)

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        with self._lock:
            topics = self._subscribing.pop(mid, [])
        failed = [i for i, rc in enumerate(reason_codes) if rc.is_failure]
        if not failed:
            return
        # Nothing arrives on these topics: say which, so a person can check the ACL (or what
        # the broker accepts in a topic).
        log.error(
            "broker refused the subscription to %s",
            ", ".join(
                f"{topics[i]} ({reason_codes[i]})" if i < len(topics) else str(reason_codes[i])
                for i in failed
            ),
        )
        # A refusal may pass (see the module docstring): ask again, with backoff.
        again = [topics[i] for i in failed if i < len(topics)]
        if again:
            self._refused_topics.extend(t for t in again if t not in self._refused_topics)
            s = self.settings
            delay = backoff_delay(self._retries, s.backoff_initial_s, s.backoff_max_s, self._rng)
            self._retries += 1
            self._retry_at = time.monotonic() + delay

    def _retry_refused(self) -> None:
        """Subscribe again to what the broker refused, once its time has come (network thread)."""
        if not self._refused_topics or time.monotonic() < self._retry_at:
            return
        with self._lock:
            topics = [t for t in self._refused_topics if t in self._subscriptions]
        self._refused_topics.clear()
        if topics and self.connected.is_set():
            log.info("subscribing again to %s", ", ".join(topics))
            self._subscribed(topics, self._client.subscribe([(t, 1) for t in topics])[1])

    def _subscribed(self, topics: list[str], mid: int | None) -> None:
        """Remember which topics SUBSCRIBE ``mid`` asked for, to name them in a refusal."""
        if mid is not None:
            with self._lock:
                self._subscribing[mid] = topics

    # -- the network thread -------------------------------------------------------------------
    def _check_tls(self) -> None:
        """Take up renewed TLS files (see the module docstring); network thread only."""
        if not self.settings.tls:
            return
        asked = self._tls_reload.is_set()
        if not asked and (self.settings.tls_check_s == 0 or time.monotonic() < self._tls_check_at):
            return
        self._tls_reload.clear()
        self._tls_check_at = time.monotonic() + self.settings.tls_check_s
        stamp = tls_stamp(self.settings)
        if stamp == self._tls_stamp and not asked:
            return
        if stamp == self._tls_stamp:
            log.info("TLS files unchanged: keeping the connection")
            return
        self._tls_stamp = stamp
        try:
            context = tls_context(self.settings)
        except ConfigError as exc:
            log.error("TLS files changed but do not load, keeping the ones in use: %s", exc)
            return
        # paho wraps each new connection's socket with this context (tls_set_context() may
        # be called once only); the next connect uses the new files.
        self._client._ssl_context = context
        self.tls_reloads += 1
        if self.connected.is_set():
            log.info("TLS files changed: reconnecting with the new certificate")
            self._reconnect_now = True
            self._client.disconnect()
        else:
            log.info("TLS files changed: the next connection uses them")

    def reload_tls(self) -> None:
        """Look at the TLS files now (from any thread; SIGHUP): new ones are taken up, with a
        reconnect."""
        self._tls_reload.set()

    def _connect_once(self) -> bool:
        s = self.settings
        host, port = self.endpoint
        try:
            connect(self._client, s, persistent=self._persistent, endpoint=(host, port))
        except (OSError, ssl.SSLError) as exc:
            log.warning("cannot connect to %s:%d: %s", host, port, exc)
            return False
        return True

    def _run(self) -> None:
        s = self.settings
        while not self._stop.is_set():
            connects = self.connects
            self._answered = False
            if self._connect_once():
                rc = mqtt.MQTT_ERR_SUCCESS
                while not self._stop.is_set() and rc == mqtt.MQTT_ERR_SUCCESS:
                    rc = self._client.loop(timeout=0.5)
                    self._retry_refused()
                    self._check_tls()
                if self._stop.is_set():
                    break
                if self._reconnect_now:  # new TLS files: connect again at once, same node
                    self._reconnect_now = False
                    continue
                if not self._answered:  # MQTT 3.1.1 brokers close without a CONNACK to refuse
                    log.warning(
                        "%s:%d closed the connection without answering the CONNECT; the "
                        "broker's log says why (e.g. a client id or will topic it refuses)",
                        *self.endpoint,
                    )
            if self.connects == connects:  # never got through: the next node (if any) next
                self._endpoint = (self._endpoint + 1) % len(self._endpoints)
            delay = backoff_delay(self.attempts, s.backoff_initial_s, s.backoff_max_s, self._rng)
            self.attempts += 1
            log.info("reconnecting in %.1f s", delay)
            # Renewed TLS files are taken up while waiting too (a revoked certificate replaced).
            deadline = time.monotonic() + delay
            reloads = self.tls_reloads
            while not self._stop.wait(min(0.5, max(0.0, deadline - time.monotonic()))):
                self._check_tls()
                if time.monotonic() >= deadline or self.tls_reloads != reloads:
                    break

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the session was started already")
        self._thread = threading.Thread(
            target=self._run, name=f"mqtt-{self.client_id}", daemon=True
        )
        self._thread.start()

    def stop(self, *, offline_payload: bytes | None = None, timeout: float = 5.0) -> None:
        """Say ``offline_payload`` on the will topic (if connected), disconnect, join the thread.

        A clean DISCONNECT suppresses the will, hence the explicit offline message.
        """
        if self._thread is None:
            return
        if offline_payload is not None and self._will is not None and self.connected.is_set():
            info = self._client.publish(self._will.topic, offline_payload, qos=1, retain=True)
            # Not connected any more: then the will says offline instead.
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout=min(timeout, 2.0))
        self._stop.set()
        # A connect in progress may block the network thread for up to connect_timeout_s.
        self._thread.join(timeout + self.settings.connect_timeout_s)
        self._client.disconnect()
        self._client.loop(timeout=0.1)  # flush the DISCONNECT
        # If the DISCONNECT could not be written (the connection was already failing), paho
        # keeps its socket open: close it here rather than leave the descriptor behind.
        sock = self._client.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()
        # paho's wake-up socket pair (a loopback TCP pair its loop() makes): nothing else
        # closes it, and each stopped session would leave two descriptors behind.
        with contextlib.suppress(AttributeError, OSError):
            self._client._reset_sockets(sockpair_only=True)
        self.connected.clear()
        self._thread = None

    # -- any thread ---------------------------------------------------------------------------
    def publish(
        self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1
    ) -> mqtt.MQTTMessageInfo:
        """Queue a message; it goes out now if connected, else after the next connect.

        QoS 1 messages queued while disconnected are sent on reconnect by paho.
        """
        return self._client.publish(topic, payload, qos=qos, retain=retain)

    def packet_size(self, topic: str, payload_len: int, *, qos: int = 1) -> int:
        """The size on the wire of what :meth:`publish` sends for this topic and payload."""
        return publish_packet_size(topic, payload_len, qos=qos, v5=self.v5)

    def subscribe(self, topic: str) -> None:
        with self._lock:
            if topic in self._subscriptions:
                return
            self._subscriptions.append(topic)
        if self.connected.is_set():
            self._subscribed([topic], self._client.subscribe(topic, 1)[1])

    def unsubscribe(self, topic: str) -> None:
        with self._lock:
            if topic not in self._subscriptions:
                return
            self._subscriptions.remove(topic)
        if self.connected.is_set():
            self._client.unsubscribe(topic)

    @property
    def alive(self) -> bool:
        """The network thread runs (connected or reconnecting)."""
        return self._thread is not None and self._thread.is_alive()

    def pending(self) -> int:
        """Outgoing messages paho holds (queued or in flight)."""
        return len(self._client._out_messages)
