"""The bundle server behind ``edge-fleet serve``: answers devices' block requests over MQTT.

A device asks on ``bundles/{sha256}/request/{id}`` for pages of a bundle's block-hash list or for
blocks; the server answers each page or block with one frame on ``devices/{id}/blocks``. The
server keeps nothing per device but a token bucket: all state of a transfer lives on the device.

Several servers share the load through the MQTT 5 shared subscription
``$share/ema-bundle-servers/...``. MQTT 3.1.1 has none: there each server subscribes to the plain
filter and answers every request, and the device keeps the first copy of each block, so several
servers give redundancy (one may go away mid-transfer), not capacity.
Each serves the bundles of its own ``--bundles`` directory, found by SHA-256 (the directory is
rescanned, at most every few seconds, when a request names a bundle it does not know, so
``edge-fleet deploy`` can add bundles while it runs).

Per-device rate limit: a token bucket of bytes per second (``rate`` with a ``burst``). A request
beyond it waits in a small per-device backlog until the bucket allows it; beyond the backlog it
is answered with a ``rate-limited`` error and the device asks again after its timeout. The limit
is per server process.

Packet limit: no frame goes out that exceeds the broker's packet limit. A broker drops a client
that sends a larger packet (mosquitto's ``max_packet_size``; AWS IoT Core allows 128 KiB per
message), paho sends the same QoS 1 message again after reconnecting, and the server would
reconnect in a loop while every other device's requests wait. The limit is the smaller of what
the broker announces in its CONNACK (MQTT 5 Maximum Packet Size, learned at every connect) and
``max_packet_bytes`` (``--max-packet-bytes``; a 3.1.1 broker announces nothing, so there it is
the only one). A request whose reply would not fit, counted as the whole PUBLISH packet, is
answered with a ``block-too-large`` error frame that names the sizes; the device fails the
transfer with that code rather than waiting for blocks that can never come.

What it says: a line per bundle asked for in each report interval (``report_interval_s``,
``--report-interval``: requests, distinct devices, blocks, pages and bytes sent, requests
refused), a warning the first time in an interval that a request names a bundle this server does
not have, and with ``-v`` every request at debug level. The request path only counts; the lines
are written by the serving loop.

Who asks: the device id is the last level of the request topic, which the broker's ACL binds to
the device's certificate (``pattern write .../bundles/+/request/%u``); a request whose body names
another device is dropped. Replies go to that device only, so no device can have blocks sent to
another one or spend another one's rate limit.
"""

from __future__ import annotations

import heapq
import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from agent._units import size_text
from agent.bundle.blocks import digest_file
from agent.bundle.limits import BundleLimits
from agent.bundle.reader import read_index
from agent.errors import (
    BadContentError,
    BlockTooLargeError,
    ConfigError,
    EdgeAgentError,
    StorageError,
)
from agent.transport.messages import (
    BLOCK_LIST_PAGE,
    BlockReplyHeader,
    BlockRequest,
    ErrorInfo,
    block_reply_length,
    encode_block_reply,
)
from agent.transport.session import (
    Connection,
    InboxItem,
    Incoming,
    MqttSettings,
    Session,
    publish_packet_size,
)
from agent.transport.topics import Topics

log = logging.getLogger("agent.fleet.server")

RESCAN_INTERVAL_S = 2.0
BACKLOG_PER_DEVICE = 4  # requests waiting for a device's bucket before new ones are refused
MAX_REQUEST_BYTES = 4096
MAX_BUCKETS = 100_000  # devices remembered by the rate limiter (least recently seen go first)
MIN_PACKET_LIMIT = 1024  # a smaller --max-packet-bytes leaves no room even for error frames
REPORT_INTERVAL_S = 30.0  # one log line per bundle asked for, this often (--report-interval)


def check_packet_limit(configured: int | None) -> None:
    """ConfigError for a configured packet limit too small to be kept to."""
    if configured is not None and configured < MIN_PACKET_LIMIT:
        raise ConfigError(
            f"a packet limit of {configured} bytes is below {MIN_PACKET_LIMIT}: "
            "not even an error reply fits"
        )


def packet_limit(announced: int | None, configured: int | None) -> int | None:
    """The packet limit the server keeps to: the smaller of the broker's and the configured one.

    A configured limit above the broker's announced one would only get the server dropped; one
    below it is kept (a bridge or a second broker behind this one may allow less).
    """
    limits = [n for n in (announced, configured) if n is not None]
    return min(limits) if limits else None


@dataclass(frozen=True)
class ServedBundle:
    path: Path
    sha256: str
    size: int
    block_size: int
    block_list: bytes  # the raw 32-byte digests, concatenated

    @property
    def block_count(self) -> int:
        return len(self.block_list) // 32

    @property
    def page_count(self) -> int:
        return -(-self.block_count // BLOCK_LIST_PAGE)

    def block_length(self, index: int) -> int:
        return min(self.block_size, self.size - index * self.block_size)


def index_bundle(path: Path, limits: BundleLimits | None = None) -> ServedBundle:
    """Read a bundle's block size from its manifest and hash it block by block."""
    try:
        with open(path, "rb", buffering=0) as f:
            index = read_index(f, limits)
            digests = digest_file(f, index.manifest.block_size)
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror or exc}") from None
    return ServedBundle(
        path=path,
        sha256=digests.sha256,
        size=digests.size,
        block_size=digests.block_size,
        block_list=digests.block_list,
    )


class BundleCatalog:
    """The bundles in one directory, by SHA-256. Files that are not bundles are skipped."""

    def __init__(
        self,
        directory: Path,
        limits: BundleLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.directory = Path(directory)
        self.limits = limits or BundleLimits()
        self._clock = clock
        self._by_sha: dict[str, ServedBundle] = {}
        self._seen: dict[Path, tuple[int, int]] = {}  # path -> (size, mtime_ns) indexed
        self._last_scan = float("-inf")
        self._lock = threading.Lock()

    def scan(self) -> list[ServedBundle]:
        """Index files that are new or changed since the last scan; return the new bundles."""
        added = []
        with self._lock:
            self._last_scan = self._clock()
            try:
                entries = sorted(p for p in self.directory.iterdir() if p.is_file())
            except OSError as exc:
                raise StorageError(f"cannot list {self.directory}: {exc.strerror}") from None
            for path in entries:
                if path.name.startswith(".") or path.suffix in (".dsse", ".tmp", ".json"):
                    continue
                try:
                    st = path.stat()
                except OSError:
                    continue  # removed while we looked
                key = (st.st_size, st.st_mtime_ns)
                if self._seen.get(path) == key:
                    continue
                self._seen[path] = key
                try:
                    bundle = index_bundle(path, self.limits)
                except EdgeAgentError as exc:
                    log.warning("skipping %s: not a usable bundle (%s)", path.name, exc)
                    continue
                # A file replaced under the same name: its old digest no longer names it.
                for sha in [k for k, b in self._by_sha.items() if b.path == path]:
                    del self._by_sha[sha]
                self._by_sha[bundle.sha256] = bundle
                added.append(bundle)
                log.info("serving %s as %s", path.name, bundle.sha256[:16])
        return added

    def get(self, sha256: str) -> ServedBundle | None:
        with self._lock:
            found = self._by_sha.get(sha256)
            stale = self._clock() - self._last_scan >= RESCAN_INTERVAL_S
        if found is None and stale:
            self.scan()
            with self._lock:
                found = self._by_sha.get(sha256)
        return found

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_sha)


@dataclass
class _Bucket:
    tokens: float
    stamp: float
    waiting: int = 0


@dataclass(order=True)
class _Deferred:
    ready: float
    seq: int
    request: BlockRequest = field(compare=False)
    cost: int = field(compare=False)


@dataclass
class BundleTally:
    """One bundle's requests since the last report (counters only: the hot path stays cheap)."""

    name: str | None  # the file that holds it; None: this server does not have the bundle
    requests: int = 0
    blocks: int = 0
    pages: int = 0
    bytes: int = 0
    refused: int = 0
    devices: set[str] = field(default_factory=set)

    def line(self, sha256: str, seconds: float) -> str:
        what = self.name or f"unknown bundle {sha256[:16]}"
        sent = f"{self.blocks} block(s), {self.pages} page(s), {size_text(self.bytes)}"
        refused = f", {self.refused} refused" if self.refused else ""
        return (
            f"{what}: {self.requests} request(s) from {len(self.devices)} device(s) in "
            f"{seconds:.3g} s: {sent}{refused}"
        )


@dataclass
class ServerStats:
    requests: int = 0
    blocks: int = 0
    pages: int = 0
    bytes: int = 0
    refused: int = 0
    deferred: int = 0
    connects: int = 0  # connections to the broker so far (more than one: it reconnected)


class BlockServer:
    """Answers block requests. Not thread-safe: one thread calls :meth:`handle` and :meth:`tick`."""

    def __init__(
        self,
        catalog: BundleCatalog,
        topics: Topics,
        publish: Callable[[str, bytes], object],
        *,
        rate_bytes_s: float = 32 << 20,
        burst_bytes: float | None = None,
        max_packet_bytes: Callable[[], int | None] = lambda: None,
        mqtt5: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``max_packet_bytes`` gives the packet limit now (it may change at a reconnect);
        ``mqtt5`` says how packets are counted (MQTT 5 adds a property length)."""
        self.catalog = catalog
        self.topics = topics
        self._publish = publish
        self._limit = max_packet_bytes
        self._v5 = mqtt5
        self._warned: set[tuple[str, int]] = set()  # (bundle, limit) already logged as too large
        self.rate = float(rate_bytes_s)
        self.burst = float(burst_bytes if burst_bytes is not None else max(rate_bytes_s, 4 << 20))
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._deferred: list[_Deferred] = []
        self._seq = 0
        self._fds: dict[str, int] = {}  # bundle sha256 -> an open descriptor of its file
        self.stats = ServerStats()
        self.tallies: dict[str, BundleTally] = {}  # bundle sha256 -> since the last report

    # -- input ------------------------------------------------------------------------------
    def handle(self, topic: str, payload: bytes) -> None:
        """One message from the request filter. Bad input is logged and dropped."""
        self.stats.requests += 1
        try:
            ref = self.topics.parse(topic)
            request = BlockRequest.from_bytes(payload, max_bytes=MAX_REQUEST_BYTES)
        except BadContentError as exc:
            self.stats.refused += 1
            log.warning("dropped a request on %s: %s", topic, exc)
            return
        if (
            ref.kind != "bundle"
            or ref.id != request.bundle_sha256
            or ref.device != request.device_id
        ):
            self.stats.refused += 1
            log.warning("dropped a request for %s on %s", request.bundle_sha256[:16], topic)
            return
        bundle = self.catalog.get(request.bundle_sha256)
        tally = self.tallies.get(request.bundle_sha256)
        if tally is None:
            tally = self.tallies[request.bundle_sha256] = BundleTally(
                bundle.path.name if bundle else None
            )
            if bundle is None:  # once per report interval, not once per request
                log.warning(
                    "no bundle %s in %s (asked for by %s)",
                    request.bundle_sha256[:16],
                    self.catalog.directory,
                    request.device_id,
                )
        tally.requests += 1
        tally.devices.add(request.device_id)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "%s asks for %s: %s, %d index(es)",
                request.device_id,
                tally.name or request.bundle_sha256[:16],
                request.kind,
                len(request.indexes),
            )
        if bundle is None:
            self._error(request, "unknown-bundle", "this server does not have the bundle")
            return
        cost = self._cost(bundle, request)
        if cost is None:
            self._error(
                request, "bad-index", f"index out of range (0..{self._total(bundle, request) - 1})"
            )
            return
        if self._refuse_too_large(bundle, request):  # at once: waiting would not make it fit
            return
        if self.rate <= 0:  # no limit
            self._answer(bundle, request)
            return
        now = self._clock()
        bucket = self._refill(request.device_id, now)
        if bucket.waiting == 0 and bucket.tokens >= min(cost, self.burst):
            bucket.tokens -= cost
            self._answer(bundle, request)
            return
        if bucket.waiting >= BACKLOG_PER_DEVICE:
            self._error(request, "rate-limited", "too many requests; ask again later")
            return
        # Wait until the bucket, after the requests already waiting, covers this one.
        bucket.waiting += 1
        bucket.tokens -= cost
        ready = now + max(0.0, -bucket.tokens) / self.rate
        self._seq += 1
        heapq.heappush(self._deferred, _Deferred(ready, self._seq, request, cost))
        self.stats.deferred += 1

    def report(self, seconds: float) -> list[str]:
        """A line per bundle asked for since the last report, ``seconds`` ago; counting starts
        again."""
        tallies, self.tallies = self.tallies, {}
        # Bundles served by name, then the unknown ones.
        ordered = sorted(tallies.items(), key=lambda t: (t[1].name is None, t[1].name, t[0]))
        return [tally.line(sha, seconds) for sha, tally in ordered]

    def tick(self) -> float | None:
        """Answer deferred requests that are due; return seconds until the next one, if any."""
        now = self._clock()
        while self._deferred and self._deferred[0].ready <= now:
            item = heapq.heappop(self._deferred)
            bucket = self._buckets.get(item.request.device_id)
            if bucket is not None:
                bucket.waiting -= 1
            bundle = self.catalog.get(item.request.bundle_sha256)
            if bundle is not None:
                self._answer(bundle, item.request)
        return self._deferred[0].ready - now if self._deferred else None

    # -- internals ----------------------------------------------------------------------------
    def _refill(self, device_id: str, now: float) -> _Bucket:
        bucket = self._buckets.get(device_id)
        if bucket is None:
            # Forget the device seen least recently, if it waits for nothing: a full bucket and
            # a forgotten one are the same, and a drained one is full again soon enough.
            while len(self._buckets) >= MAX_BUCKETS:
                oldest, old = next(iter(self._buckets.items()))
                if old.waiting:
                    self._buckets.move_to_end(oldest)
                    break
                del self._buckets[oldest]
            bucket = self._buckets[device_id] = _Bucket(self.burst, now)
        else:
            self._buckets.move_to_end(device_id)
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.stamp) * self.rate)
        bucket.stamp = now
        return bucket

    @staticmethod
    def _total(bundle: ServedBundle, request: BlockRequest) -> int:
        return bundle.block_count if request.kind == "blocks" else bundle.page_count

    @staticmethod
    def _data_length(bundle: ServedBundle, request: BlockRequest, index: int) -> int:
        if request.kind == "block-list":
            return 32 * min(BLOCK_LIST_PAGE, bundle.block_count - index * BLOCK_LIST_PAGE)
        return bundle.block_length(index)

    def _cost(self, bundle: ServedBundle, request: BlockRequest) -> int | None:
        total = self._total(bundle, request)
        if any(i >= total for i in request.indexes):
            return None
        return sum(self._data_length(bundle, request, i) for i in request.indexes)

    def _packet_size(self, topic: str, frame_length: int) -> int:
        return publish_packet_size(topic, frame_length, v5=self._v5)

    def _too_large(self, bundle: ServedBundle, request: BlockRequest) -> str | None:
        """Why the replies to ``request`` cannot pass the packet limit, or None if they can.

        Counted from above: the header of the highest index asked for with the longest data
        asked for, so no reply of the request is larger than the packet checked.
        """
        limit = self._limit()
        if limit is None:
            return None
        longest = max(self._data_length(bundle, request, i) for i in request.indexes)
        header = BlockReplyHeader(
            bundle_sha256=bundle.sha256,
            kind="block-list" if request.kind == "block-list" else "block",
            index=max(request.indexes),
            total=self._total(bundle, request),
        )
        topic = self.topics.device(request.device_id).blocks
        size = self._packet_size(topic, block_reply_length(header, longest))
        if size <= limit:
            return None
        if request.kind == "block-list":
            return (
                f"a block-list page of {longest} bytes makes a {size}-byte MQTT packet, over the "
                f"packet limit of {limit} bytes; the broker must allow larger packets"
            )
        return (
            f"a block of {bundle.block_size} bytes makes a {size}-byte MQTT packet, over the "
            f"packet limit of {limit} bytes; rebuild the bundle with a smaller --block-size"
        )

    def _refuse_too_large(self, bundle: ServedBundle, request: BlockRequest) -> bool:
        """Answer ``block-too-large`` if a reply to ``request`` would exceed the packet limit."""
        why = self._too_large(bundle, request)
        if why is None:
            return False
        limit = self._limit() or 0
        if (bundle.sha256, limit) not in self._warned:  # once, not once per device
            self._warned.add((bundle.sha256, limit))
            log.warning("cannot serve %s: %s", bundle.path.name, why)
        self._error(request, BlockTooLargeError.code, why)
        return True

    def _fd(self, bundle: ServedBundle) -> int:
        """A descriptor for the bundle's bytes, checked against the size it was indexed with."""
        fd = self._fds.get(bundle.sha256)
        if fd is None:
            fd = os.open(bundle.path, os.O_RDONLY)
            if os.fstat(fd).st_size != bundle.size:
                os.close(fd)
                raise OSError(f"{bundle.path} changed since it was indexed")
            self._fds[bundle.sha256] = fd
        return fd

    def _answer(self, bundle: ServedBundle, request: BlockRequest) -> None:
        # Again: a deferred request is answered later, perhaps after a reconnect to a broker
        # that allows less.
        if self._refuse_too_large(bundle, request):
            return
        topic = self.topics.device(request.device_id).blocks
        total = self._total(bundle, request)
        tally = self._tally(bundle.sha256)
        for index in dict.fromkeys(request.indexes):  # each index once, in the order asked
            kind: Literal["block", "block-list"]
            if request.kind == "block-list":
                start = index * BLOCK_LIST_PAGE * 32
                data = bundle.block_list[start : start + BLOCK_LIST_PAGE * 32]
                kind = "block-list"
            else:
                try:
                    data = os.pread(
                        self._fd(bundle), bundle.block_length(index), index * bundle.block_size
                    )
                except OSError as exc:
                    log.error("cannot read %s: %s", bundle.path, exc)
                    self._error(request, "server-storage", "the server cannot read the bundle")
                    return
                kind = "block"
            header = BlockReplyHeader(
                bundle_sha256=bundle.sha256, kind=kind, index=index, total=total
            )
            if not self._send(topic, encode_block_reply(header, data)):
                self._error(request, BlockTooLargeError.code, "the reply exceeds the packet limit")
                return
            if kind == "block":
                self.stats.blocks += 1
                tally.blocks += 1
            else:
                self.stats.pages += 1
                tally.pages += 1
            self.stats.bytes += len(data)
            tally.bytes += len(data)

    def _tally(self, sha256: str) -> BundleTally:
        """The bundle's tally (a request deferred past a report is counted in the next one)."""
        tally = self.tallies.get(sha256)
        if tally is None:
            found = self.catalog.get(sha256)
            tally = self.tallies[sha256] = BundleTally(found.path.name if found else None)
        return tally

    def _error(self, request: BlockRequest, code: str, message: str) -> None:
        self.stats.refused += 1
        self._tally(request.bundle_sha256).refused += 1
        header = BlockReplyHeader(
            bundle_sha256=request.bundle_sha256,
            kind="error",
            index=request.indexes[0],
            total=0,
            error=ErrorInfo(code=code, message=message),
        )
        self._send(self.topics.device(request.device_id).blocks, encode_block_reply(header))

    def _send(self, topic: str, payload: bytes) -> bool:
        """Publish one frame, unless its packet exceeds the limit (then nothing goes out)."""
        limit = self._limit()
        if limit is not None:
            size = self._packet_size(topic, len(payload))
            if size > limit:
                log.error("not sending a %d-byte packet on %s: the limit is %d", size, topic, limit)
                return False
        self._publish(topic, payload)
        return True

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def serve(
    bundles: Path,
    settings: MqttSettings,
    *,
    topics: Topics,
    client_id: str,
    rate_bytes_s: float,
    stop: threading.Event,
    burst_bytes: float | None = None,
    max_packet_bytes: int | None = None,
    on_status: Callable[[BlockServer], None] | None = None,
    report_interval_s: float = REPORT_INTERVAL_S,
) -> BlockServer:
    """Run a bundle server until ``stop`` is set. Returns the server (for its stats).

    ``max_packet_bytes``: the largest MQTT packet to send (None: what the broker announces on
    MQTT 5, no limit on 3.1.1); the smaller of it and the broker's applies.
    ``report_interval_s``: every so often, one log line (info) per bundle asked for since the
    last one (0: none).
    """
    check_packet_limit(max_packet_bytes)
    catalog = BundleCatalog(bundles)
    catalog.scan()
    inbox: queue.SimpleQueue[InboxItem] = queue.SimpleQueue()
    shared = settings.protocol == "5"
    session = Session(
        settings,
        client_id,
        inbox,
        subscriptions=[topics.bundle_requests_filter(shared=shared)],
        persistent=False,
    )
    server = BlockServer(
        catalog,
        topics,
        lambda t, p: session.publish(t, p),
        rate_bytes_s=rate_bytes_s,
        burst_bytes=burst_bytes,
        max_packet_bytes=lambda: packet_limit(session.max_packet_size, max_packet_bytes),
        mqtt5=session.v5,
    )
    if not session.v5 and max_packet_bytes is None:
        log.info("MQTT 3.1.1 announces no packet limit; give the broker's with --max-packet-bytes")
    session.start()
    last_status = 0.0
    last_report = time.monotonic()
    # Tallies are taken even when no report is wanted (every REPORT_INTERVAL_S): what they
    # hold stays bounded by one interval's requests.
    every = report_interval_s or REPORT_INTERVAL_S

    def report() -> None:
        nonlocal last_report
        lines = server.report(time.monotonic() - last_report)
        last_report = time.monotonic()
        if report_interval_s > 0:
            for line in lines:
                log.info("%s", line)

    try:
        while not stop.is_set():
            wait = server.tick()
            try:
                item = inbox.get(timeout=min(0.5, wait) if wait is not None else 0.5)
            except queue.Empty:
                item = None
            if isinstance(item, Incoming) and item.retain:
                # A request the broker kept from before this server subscribed (a device set
                # the retain flag): whatever it asked for is long answered or given up on. Live
                # requests never carry the flag (it is cleared for existing subscribers).
                server.stats.refused += 1
                log.warning("ignored a retained request on %s", item.topic)
            elif isinstance(item, Incoming):
                try:
                    server.handle(item.topic, item.payload)
                except (EdgeAgentError, OSError) as exc:  # one bad bundle file stops nothing
                    log.error("request on %s: %s", item.topic, exc)
            elif isinstance(item, Connection) and item.up:
                server.stats.connects = session.connects
                limit = packet_limit(session.max_packet_size, max_packet_bytes)
                log.info(
                    "serving %d bundle(s) from %s (%s)",
                    len(catalog),
                    bundles,
                    "no packet limit" if limit is None else f"packets up to {limit} bytes",
                )
            if on_status is not None and time.monotonic() - last_status >= 1.0:
                last_status = time.monotonic()
                on_status(server)
            if time.monotonic() - last_report >= every:
                report()
    finally:
        server.stats.connects = session.connects
        session.stop()
        server.close()
        report()  # the last interval, cut short
    return server
