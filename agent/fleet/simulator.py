"""Simulated devices that speak the real protocol: ``edge-fleet simulate``.

For sizing a broker and its bundle servers, and for trying rollouts on many devices at once.
Each simulated device has its own MQTT connection (client id = device id, a persistent
session, the retained ``online`` message and the ``offline`` will) and does with the
project's own code what the agent (agent.daemon) does:

* verifies every deployment document with :meth:`TrustedState.verify_deployment` against the
  trust given (``--trust``), the sequence point last accepted on the same topic, and its own
  release floor per model (raised when a version commits, as the agent does);
* follows the effective document: its own, unless it has none or the document hands it back
  to its groups (``follow_groups``), else the first of its groups' in the order given;
* pulls each new bundle with :class:`~agent.device.transfer.Transfer` (the block list and
  every block checked against the signed hashes, written to a part file under the state
  directory), checks the finished file with :func:`check_bundle`, and chooses the variant for
  its hardware profile with :func:`agent.runtime.choice.choose`;
* reports ``reported`` (retained), ``events`` and ``telemetry`` in the schemas of
  agent.transport.messages, with the error codes of agent.errors for refused documents.

What is simulated: the runtime. Loading a model takes ``load_s`` and then it is active (no
runtime is imported, nothing answers requests), or it fails with an injected error
(:class:`~agent.fleet.simulator_settings.LoadFailure`). Telemetry says what the settings' ``metrics`` for the running version
says. A bundle fetched once is kept as "stored" (its SHA-256, in memory; the bytes are removed
once checked) for as long as the agent would keep it (what runs, what ran before it, what the
model heads for), and is not fetched again meanwhile. Not simulated: the trust topic (trust is
what ``--trust`` gives at start), probation, crash recovery, the per-second limit on
``rejected`` events (each refusal is one) and anything the local inference API does.

Threads: one. Every device, every connection (agent.transport.multiplex) and every timer runs
on the thread that calls :meth:`Simulator.run`; nothing here takes a lock.
"""

from __future__ import annotations

import logging
import random
import resource
import shutil
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.bundle.manifest import Manifest
from agent.bundle.reader import BundleIndex
from agent.bundle.verify import check_bundle, check_index
from agent.device.reporting import reported_hardware
from agent.device.transfer import Transfer
from agent.errors import (
    BadContentError,
    ConfigError,
    EdgeAgentError,
    FormatError,
    ProbationError,
    RollbackError,
    SizeLimitError,
    StorageError,
    TransferError,
)
from agent.fleet.simulator_settings import (
    FAILURES,
    HARDWARE,
    DeviceSpec,
    SimulatorSettings,
    device_specs,
    device_unit,
)
from agent.runtime.base import get_backend
from agent.runtime.choice import FORMAT_BACKENDS, choose
from agent.transport.messages import (
    ErrorInfo,
    Event,
    ModelStatus,
    Online,
    Phase,
    Reported,
    Telemetry,
    TrustStatus,
    decode_block_reply,
)
from agent.transport.multiplex import Multiplexer, Timer
from agent.transport.session import (
    MqttSettings,
    Will,
    backoff_delay,
    connect,
    new_client,
    tls_context,
)
from agent.transport.topics import Topics
from agent.trust.metadata import MAX_METADATA_BYTES, BundleDescriptor, DeploymentTarget
from agent.trust.verifier import SequencePoint, TrustedState, VerifiedDeployment

log = logging.getLogger("agent.fleet.simulator")

FINAL = (Phase.ACTIVE, Phase.FAILED, Phase.ROLLED_BACK)
POLL_S = 0.2  # the longest the loop waits for sockets and timers
TICK_S = 0.5  # how often a transfer looks for timed-out requests
STOP_S = 5.0  # the longest stop() waits for the offline messages and the DISCONNECTs
CONNECTS_PER_POLL = 25  # connections opened per pass of the loop while starting up


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class SimStats:
    """What the simulated fleet did, for ``--json`` and benchmarks."""

    devices: int = 0
    connected: int = 0
    connects: int = 0
    disconnects: int = 0
    documents: int = 0  # deployment documents accepted
    refused: int = 0  # deployment documents refused
    transfers: int = 0  # bundle downloads started
    fetched_bytes: int = 0  # block bytes received, checked and written
    not_fetched: int = 0  # deployments of a bundle the device had stored already
    activated: int = 0  # versions that became active
    failed: int = 0  # deployments that failed
    reported: int = 0
    events: int = 0
    telemetry: int = 0

    def summary(self) -> str:
        return (
            f"{self.connected}/{self.devices} connected  {self.documents} documents  "
            f"{self.transfers} downloads ({self.fetched_bytes / (1 << 20):.1f} MiB)  "
            f"{self.not_fetched} not fetched  {self.activated} active  {self.failed} failed  "
            f"{self.refused} refused"
        )


# -- one connection ---------------------------------------------------------------------------
class _Link:
    """A device's MQTT connection on the simulator's multiplexer: what a Session does (connect,
    subscribe, say online, reconnect with jittered backoff), on the simulator's one thread."""

    def __init__(
        self,
        sim: Simulator,
        client_id: str,
        subscriptions: list[str],
        online: tuple[str, bytes],
        on_message: Callable[[str, bytes], None],
        on_connection: Callable[[bool], None],
    ) -> None:
        self._sim = sim
        self._subscriptions = subscriptions
        self._online_topic, self._online = online
        self._on_message_cb = on_message
        self._on_connection = on_connection
        self._rng = random.Random(client_id)  # noqa: S311 - jitter, not secrecy
        self._timer: Timer | None = None
        self._stopping = False
        self.id = client_id
        self.connected = False
        self.attempts = 0  # since the last connect
        self.connects = 0
        # Broker nodes in the order tried (failover): an attempt that does not get through
        # moves on to the next; a connection that was up is tried again where it was.
        self._endpoints = sim.mqtt.endpoints
        self._endpoint = 0
        self._connects_before = 0
        offline = Will(self._online_topic, Online(state="offline").to_bytes())
        self.client = new_client(sim.mqtt, client_id, will=offline, tls=sim.tls_for(client_id))
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        sim.mux.attach(self.client)

    def start(self) -> None:
        self._connect()

    def _connect(self) -> None:
        self._timer = None
        if self._stopping:
            return
        self._connects_before = self.connects
        try:
            connect(self.client, self._sim.mqtt, endpoint=self._endpoints[self._endpoint])
        except (OSError, ssl.SSLError) as exc:
            self._sim.cannot_connect(self.id, self._endpoints[self._endpoint], exc)
            self._retry()

    def _retry(self) -> None:
        if self._stopping or self._timer is not None:
            return
        if self.connects == self._connects_before:  # never got through: the next node next
            self._endpoint = (self._endpoint + 1) % len(self._endpoints)
        s = self._sim.mqtt
        delay = backoff_delay(self.attempts, s.backoff_initial_s, s.backoff_max_s, self._rng)
        self.attempts += 1
        self._timer = self._sim.mux.call_later(delay, self._connect)

    # paho callbacks: on the simulator's thread, inside Multiplexer.poll().
    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:  # the broker closes the connection next: tried again then
            log.warning("the broker refused %s: %s", self.id, reason_code)
            return
        client.subscribe([(t, 1) for t in self._subscriptions])
        client.publish(self._online_topic, self._online, qos=1, retain=True)
        self.connected = True
        self.attempts = 0
        self.connects += 1
        self._sim.stats.connects += 1
        self._sim.stats.connected += 1
        self._on_connection(True)

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if self.connected:
            self.connected = False
            self._sim.stats.connected -= 1
            self._sim.stats.disconnects += 1
            self._on_connection(False)
        self._retry()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self._on_message_cb(message.topic, bytes(message.payload))

    # -- on the simulator's thread ----------------------------------------------------------
    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> mqtt.MQTTMessageInfo:
        """Queue a QoS 1 message; paho sends it now if connected, else after the next connect."""
        return self.client.publish(topic, payload, qos=1, retain=retain)

    def say_offline(self) -> mqtt.MQTTMessageInfo | None:
        """Stop reconnecting; say offline (a clean DISCONNECT suppresses the will)."""
        self._stopping = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.connected:
            return None
        return self.publish(self._online_topic, Online(state="offline").to_bytes(), retain=True)

    def disconnect(self) -> None:
        self.client.disconnect()


# -- one device -----------------------------------------------------------------------------------
@dataclass
class _Installed:
    descriptor: BundleDescriptor
    variant: str
    runtime: str
    previous: str | None = None  # the bundle that ran before: the last good one, kept


@dataclass
class _SimulatedModel:
    """One model: what it runs, what it is asked to run, and where that stands."""

    name: str
    phase: Phase = Phase.PENDING
    installed: _Installed | None = None
    target: BundleDescriptor | None = None
    variant: str | None = None  # the one the document names
    deployment_id: str | None = None
    transfer: Transfer | None = None
    error: ErrorInfo | None = None
    attempt: int = 0  # bumped by each load and cancel: a timer of an older one does nothing
    reported_progress: float = -1.0

    def status(self) -> ModelStatus:
        i = self.installed
        progress = None
        if self.phase == Phase.DOWNLOADING and self.transfer is not None:
            progress = self.transfer.progress
        return ModelStatus(
            phase=self.phase,
            version=i.descriptor.version if i else None,
            release=i.descriptor.release if i else None,
            variant=i.variant if i else None,
            runtime=i.runtime if i else None,
            bundle_sha256=i.descriptor.bundle_sha256 if i else None,
            progress=progress,
            error=self.error,
        )


def _error(exc: EdgeAgentError) -> ErrorInfo:
    return ErrorInfo(code=exc.code, message=str(exc)[:1024])


class SimulatedDevice:
    """The agent's protocol behaviour with a stub for a runtime (see the module docstring)."""

    def __init__(self, spec: DeviceSpec, sim: Simulator) -> None:
        self.spec = spec
        self.id = spec.device_id
        self._sim = sim
        self._hardware = HARDWARE[spec.kind]
        self.hardware = reported_hardware(self._hardware.probe)
        self._me = sim.topics.device(self.id)
        self._dir = sim.state_dir / self.id
        self.trusted = sim.trust
        self.points: dict[str, SequencePoint] = {}
        self.documents: dict[str, VerifiedDeployment] = {}
        self._payloads: dict[str, bytes] = {}  # the envelopes behind ``documents``
        self.deployment: VerifiedDeployment | None = None
        self.doc_error: ErrorInfo | None = None
        self.slots: dict[str, _SimulatedModel] = {}
        self.stored: dict[str, BundleIndex] = {}  # bundles fetched and checked, by SHA-256
        self._failed_loads: Counter[str] = Counter()  # version -> injected failures so far
        self._event_seq = time.time_ns() // 1000  # grows across runs, as the agent's does
        self._reported_dirty = True
        self._last_reported = float("-inf")
        self._report_timer: Timer | None = None
        self._rng = random.Random(self.id)  # noqa: S311 - telemetry jitter
        online = Online(
            state="online", agent_version=spec.agent_version, since=_utcnow().replace(microsecond=0)
        )
        self.link = _Link(
            sim,
            self.id,
            [
                self._me.desired,
                *(sim.topics.group_desired(g) for g in spec.groups),
                self._me.blocks,
            ],
            (self._me.online, online.to_bytes()),
            self._on_message,
            self._on_connection,
        )
        interval = sim.settings.telemetry_interval_s
        if interval > 0:  # spread over the interval, so the fleet does not report in step
            sim.mux.call_later(interval * device_unit("telemetry", self.id), self._telemetry)

    # -- input ----------------------------------------------------------------------------------
    def _on_message(self, topic: str, payload: bytes) -> None:
        try:
            ref = self._sim.topics.parse(topic)
        except FormatError:
            return
        try:
            if ref.channel == "desired":
                if ref.kind == "device" and ref.id == self.id:
                    self._on_desired("device", topic, payload)
                elif ref.kind == "group" and ref.id in self.spec.groups:
                    self._on_desired(f"group-{ref.id}", topic, payload)
            elif ref.kind == "device" and ref.channel == "blocks" and ref.id == self.id:
                self._on_blocks(payload)
        except (EdgeAgentError, OSError) as exc:  # the disk refused: said, and the device goes on
            err = exc if isinstance(exc, EdgeAgentError) else StorageError(str(exc))
            log.error("%s: %s", self.id, err)
            self.doc_error = _error(err)
            self._report()

    def _on_connection(self, up: bool) -> None:
        now = self._sim.mux.now
        for slot in self.slots.values():
            if slot.transfer is None:
                continue
            if not up:
                slot.transfer.suspend(now)  # nothing is asked for while offline
            elif self.link.connects > 1:
                # Replies may have been lost with the connection. (On the first connect,
                # requests made before it are in paho's queue and go out now.)
                slot.transfer.resend(now)
        if up:
            self._report()

    # -- desired --------------------------------------------------------------------------------
    def _target(self, source: str) -> DeploymentTarget:
        if source == "device":
            return DeploymentTarget(kind="device", id=self.id)
        return DeploymentTarget(kind="group", id=source.removeprefix("group-"))

    def _on_desired(self, source: str, topic: str, payload: bytes) -> None:
        if not payload:
            return  # the document was removed from the broker: keep what runs
        try:
            if len(payload) > MAX_METADATA_BYTES:
                raise SizeLimitError(
                    f"deployment of {len(payload)} bytes; the limit is {MAX_METADATA_BYTES}"
                )
            verified = self.trusted.verify_deployment(
                payload,
                self._sim.clock(),
                targets=[self._target(source)],
                last=self.points.get(source),
            )
        except BadContentError as exc:
            self._reject(topic, exc)
            return
        if self.points.get(source) == verified.point:  # the same document again
            if self.doc_error is not None:
                self.doc_error = None
                self._report()
            return
        self._sim.stats.documents += 1
        self.points[source] = verified.point
        self.documents[source] = verified
        self._payloads[source] = payload
        self.doc_error = None
        self._report()
        for slot in self.slots.values():  # a new document is a new attempt
            if slot.phase in (Phase.FAILED, Phase.ROLLED_BACK):
                slot.target = None
        self._reconcile()

    def _effective(self) -> VerifiedDeployment | None:
        """The device's own document, unless it hands the device back; else its first group's.
        One that takes over from another is verified again first (floors and clock of now)."""
        for source in ["device", *(f"group-{g}" for g in self.spec.groups)]:
            doc = self.documents.get(source)
            if doc is None or (source == "device" and doc.document.follow_groups):
                continue
            if doc is not self.deployment:
                try:
                    doc = self.trusted.verify_deployment(
                        self._payloads[source],
                        self._sim.clock(),
                        targets=[self._target(source)],
                        last=self.points.get(source),
                    )
                except BadContentError as exc:
                    del self.documents[source]
                    self._reject(self._desired_topic(source), exc)
                    continue
                self.documents[source] = doc
            return doc
        return None

    def _desired_topic(self, source: str) -> str:
        if source == "device":
            return self._me.desired
        return self._sim.topics.group_desired(source.removeprefix("group-"))

    def _reconcile(self) -> None:
        doc = self._effective()
        if doc is None:
            return
        self.deployment = doc
        dep_id = doc.document.deployment_id
        for name, verified in doc.bundles.items():
            slot = self.slots.setdefault(name, _SimulatedModel(name))
            want = verified.descriptor.bundle_sha256
            moved_on = slot.deployment_id != dep_id
            slot.deployment_id = dep_id
            if slot.installed is not None and slot.installed.descriptor.bundle_sha256 == want:
                if slot.target is not None:
                    self._cancel(slot)
                if verified.descriptor.release > slot.installed.descriptor.release:
                    # The bytes it runs, re-issued under a higher release: nothing is fetched
                    # or loaded; the release moves as a commit moves it (the floor first).
                    self.trusted = self.trusted.with_release(name, verified.descriptor.release)
                    slot.installed.descriptor = verified.descriptor
                    self._report()
                if slot.phase != Phase.ACTIVE or moved_on:
                    slot.error = None
                    self._phase(slot, Phase.ACTIVE)
                continue
            if slot.target is not None and slot.target.bundle_sha256 == want:
                # Already on its way (or failed: a new document is needed). The bytes are the
                # same; the release is the newer document's (it may be a re-issue).
                slot.target = verified.descriptor
                continue
            self._cancel(slot)
            slot.target, slot.variant = verified.descriptor, doc.document.models[name].variant
            slot.error = None
            self._phase(slot, Phase.PENDING, force=True)
        for name in [n for n in self.slots if n not in doc.bundles]:
            slot = self.slots[name]
            if slot.installed is None:  # never ran here: nothing to keep
                self._cancel(slot)
                del self.slots[name]
                self._report()
            elif slot.target is not None:  # runs an older version: stop fetching the new one
                self._cancel(slot)
                slot.error = None
                self._phase(slot, Phase.ACTIVE)
        self._start_next()

    def _cancel(self, slot: _SimulatedModel) -> None:
        if slot.transfer is not None:
            slot.transfer.discard()
        slot.transfer = None
        slot.target = None
        slot.attempt += 1

    def _start_next(self) -> None:
        """One download at a time; models the document no longer names go once the rest runs."""
        if any(s.phase == Phase.DOWNLOADING for s in self.slots.values()):
            return
        for slot in self.slots.values():
            if slot.phase == Phase.PENDING and slot.target is not None:
                self._start(slot)
                return
        doc = self.deployment
        if doc is None:
            return
        wanted = doc.document.models
        if any(self.slots[n].phase != Phase.ACTIVE for n in wanted if n in self.slots):
            return
        for name in [n for n in self.slots if n not in wanted]:
            del self.slots[name]
            self._event("info", model=name)
            self._report()
            self._collect_garbage()

    def _collect_garbage(self) -> None:
        """Forget stored bundles as the agent removes them: it keeps, per model, what runs, the
        one that ran before it and the one it heads for."""
        keep = set()
        for slot in self.slots.values():
            if slot.installed is not None:
                keep |= {slot.installed.descriptor.bundle_sha256, slot.installed.previous}
            if slot.target is not None:
                keep.add(slot.target.bundle_sha256)
        for sha in [s for s in self.stored if s not in keep]:
            del self.stored[sha]

    # -- download -------------------------------------------------------------------------------
    def _start(self, slot: _SimulatedModel) -> None:
        assert slot.target is not None
        d = slot.target
        cap = self._sim.settings.limits.max_bundle_bytes
        if d.bundle_size > cap:
            self._fail(
                slot, SizeLimitError(f"the bundle is {d.bundle_size} bytes; the limit is {cap}")
            )
            return
        stored = self.stored.get(d.bundle_sha256)
        if stored is not None:  # fetched before: not again
            self._sim.stats.not_fetched += 1
            self._phase(slot, Phase.VERIFYING)
            try:
                # Checked against the descriptor it came with; this one may be another for the
                # same bytes (named again, or re-issued under a higher release).
                check_index(stored, d)
            except BadContentError as exc:
                self._fail(slot, exc)  # the descriptor's fault: the stored bytes stay
                return
            self._load(slot, stored.manifest)
            return
        self._sim.stats.transfers += 1
        slot.transfer = Transfer(
            d,
            self._dir / "downloads" / d.bundle_sha256,
            device_id=self.id,
            topics=self._sim.topics,
            publish=self.link.publish,
            settings=self._sim.settings.transfer,
        )
        slot.reported_progress = -1.0
        self._phase(slot, Phase.DOWNLOADING)
        slot.transfer.start(self._sim.mux.now)  # opens it here: a part file of this bundle's size
        self._after_transfer(slot)

    def _on_blocks(self, payload: bytes) -> None:
        try:
            header, data = decode_block_reply(payload)
        except BadContentError as exc:
            log.warning("%s: a bad block reply: %s", self.id, exc)
            return
        for slot in self.slots.values():
            t = slot.transfer
            if t is not None and t.descriptor.bundle_sha256 == header.bundle_sha256:
                before = t.fetched_bytes
                try:
                    t.on_reply(header, data, self._sim.mux.now)
                except EdgeAgentError as exc:
                    t.fail(exc)
                self._sim.stats.fetched_bytes += t.fetched_bytes - before
                self._after_transfer(slot)
                return

    def tick(self, now: float) -> None:
        """Ask again for blocks whose requests timed out (on the simulator's tick)."""
        if not self.link.connected:
            return
        for slot in list(self.slots.values()):
            if slot.transfer is not None and slot.phase == Phase.DOWNLOADING:
                try:
                    slot.transfer.tick(now)
                except EdgeAgentError as exc:
                    slot.transfer.fail(exc)
                self._after_transfer(slot)

    def _after_transfer(self, slot: _SimulatedModel) -> None:
        t = slot.transfer
        if t is None or slot.phase != Phase.DOWNLOADING:
            return
        if t.state not in ("done", "failed"):
            if t.progress - slot.reported_progress >= 1.0:
                slot.reported_progress = t.progress
                self._report(soon=False)
            return
        slot.transfer = None
        try:
            if t.error is not None:
                self._fail(slot, t.error)
                return
            self._phase(slot, Phase.VERIFYING)
            d = t.descriptor
            try:
                index = check_bundle(t.part_path, d, self._sim.settings.limits, bytes_checked=True)
            except EdgeAgentError as exc:
                self._fail(slot, exc)
                return
            self.stored[d.bundle_sha256] = index  # kept by its hash and index alone
            self._load(slot, index.manifest)
        finally:
            t.discard()
            self._start_next()  # the next model's download, if one waits

    # -- the runtime stub -------------------------------------------------------------------------
    def _load(self, slot: _SimulatedModel, manifest: Manifest) -> None:
        assert slot.target is not None
        d = slot.target
        self._phase(slot, Phase.LOADING)
        floor = self.trusted.release_floor.get(slot.name, 0)
        if d.release < floor:  # checked when the document came; the floor may have moved since
            self._fail(
                slot,
                RollbackError(f"{slot.name} release {d.release} is older than release {floor}"),
            )
            return
        try:
            choice = choose(manifest, self._hardware.probe, variant=slot.variant)
        except EdgeAgentError as exc:
            self._fail(slot, exc)
            return
        runtime = self.spec.runtime or self._hardware.runtimes.get(
            choice.backend, f"{choice.backend} (simulated)"
        )
        slot.attempt += 1
        attempt = slot.attempt
        installed = _Installed(d, choice.variant_id, runtime[:64])
        self._sim.mux.call_later(
            self._sim.settings.load_s, lambda: self._loaded(slot.name, attempt, installed)
        )

    def _loaded(self, name: str, attempt: int, installed: _Installed) -> None:
        slot = self.slots.get(name)
        d = installed.descriptor
        if slot is None or slot.attempt != attempt or slot.target is None:
            return  # the deployment moved on meanwhile
        failure = self._sim.settings.failure_for(self.id, d.version, self._failed_loads[d.version])
        if failure is not None:
            self._failed_loads[d.version] += 1
            error = FAILURES[failure.code](
                f"{name} {d.version}: simulated {failure.code} failure (edge-fleet simulate)"
            )
            rolled_back = failure.code == ProbationError.code and slot.installed is not None
            self._fail(slot, error, Phase.ROLLED_BACK if rolled_back else Phase.FAILED)
        else:
            # The floor first, then the record: as the agent commits.
            self.trusted = self.trusted.with_release(name, d.release)
            before = slot.installed
            if before is not None:
                same = before.descriptor.bundle_sha256 == d.bundle_sha256
                installed.previous = before.previous if same else before.descriptor.bundle_sha256
            slot.installed, slot.target = installed, None
            self._collect_garbage()
            slot.error = None
            self._sim.stats.activated += 1
            self._phase(slot, Phase.ACTIVE)
        self._reconcile()  # the document may have moved on while the version loaded

    def _fail(
        self, slot: _SimulatedModel, exc: EdgeAgentError, phase: Phase = Phase.FAILED
    ) -> None:
        log.debug("%s: %s failed: %s", self.id, slot.name, exc)
        slot.error = _error(exc)
        slot.transfer = None
        self._sim.stats.failed += 1
        # A transfer that timed out or found no server, or a full disk, may work later.
        if isinstance(exc, (TransferError, StorageError)):
            attempt = slot.attempt
            retry = self._sim.settings.transfer.retry_after_s
            self._sim.mux.call_later(retry, lambda: self._retry(slot.name, attempt))
        self._phase(slot, phase)

    def _retry(self, name: str, attempt: int) -> None:
        slot = self.slots.get(name)
        if slot is None or slot.attempt != attempt or slot.phase != Phase.FAILED:
            return
        if slot.target is None:
            return
        slot.error = None
        self._phase(slot, Phase.PENDING)
        self._start_next()

    # -- output ---------------------------------------------------------------------------------
    def _reject(self, topic: str, exc: BadContentError) -> None:
        log.info("%s refused a document on %s (%s): %s", self.id, topic, exc.code, exc)
        self._sim.stats.refused += 1
        self.doc_error = _error(exc)
        self._report()
        self._event("rejected", topic=topic, error=self.doc_error)

    def _phase(self, slot: _SimulatedModel, phase: Phase, *, force: bool = False) -> None:
        if slot.phase == phase and not force:
            return
        slot.phase = phase
        self._report()
        self._event("phase", model=slot.name, phase=phase, error=slot.error)

    def _event(
        self,
        kind: Literal["phase", "rejected", "info"],
        *,
        model: str | None = None,
        phase: Phase | None = None,
        topic: str | None = None,
        error: ErrorInfo | None = None,
    ) -> None:
        slot = self.slots.get(model) if model is not None else None
        event = Event(
            device_id=self.id,
            seq=self._event_seq,
            at=self._sim.clock(),
            kind=kind,
            model=model,
            deployment_id=slot.deployment_id if slot is not None else None,
            phase=phase,
            topic=topic[:256] if topic else None,
            error=error,
        )
        self._event_seq += 1
        self._sim.stats.events += 1
        self.link.publish(self._me.events, event.to_bytes())

    def _report(self, *, soon: bool = True) -> None:
        """The reported state changed: it goes out at once (``soon``: a phase change, a refused
        document) or within ``report_interval_s`` (progress), never more often than that."""
        self._reported_dirty = True
        if soon:
            self._last_reported = float("-inf")
        self._sim.due(self)

    def publish_reported(self, now: float) -> None:
        if not self._reported_dirty:
            return
        wait = self._last_reported + self._sim.settings.report_interval_s - now
        if wait > 0:
            if self._report_timer is None:
                self._report_timer = self._sim.mux.call_later(wait, self._report_due)
            return
        doc = self.deployment
        names = sorted(self.slots, key=lambda n: (doc is None or n not in doc.bundles, n))[:16]
        keyring = self.trusted.keyring
        reported = Reported(
            device_id=self.id,
            agent_version=self.spec.agent_version,
            at=self._sim.clock(),
            hardware=self.hardware,
            groups=list(self.spec.groups),
            deployment_id=doc.document.deployment_id if doc else None,
            sequence=doc.document.sequence if doc else None,
            models={n: self.slots[n].status() for n in sorted(names)},
            error=self.doc_error,
            trust=TrustStatus(
                root_version=self.trusted.root.version,
                keyring_version=keyring.version if keyring is not None else None,
                keyring_expires=keyring.expires if keyring is not None else None,
            ),
        )
        self.link.publish(self._me.reported, reported.to_bytes(), retain=True)
        self._sim.stats.reported += 1
        self._reported_dirty = False
        self._last_reported = now

    def close(self) -> None:
        """Remove what the device wrote (part files of downloads cut short)."""
        for slot in self.slots.values():
            if slot.transfer is not None:
                slot.transfer.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def _report_due(self) -> None:
        self._report_timer = None
        self._sim.due(self)

    def _telemetry(self) -> None:
        settings = self._sim.settings
        self._sim.mux.call_later(settings.telemetry_interval_s, self._telemetry)
        metrics: dict[str, float] = {}
        for name, slot in sorted(self.slots.items()):
            if slot.installed is None:
                continue
            m = settings.metrics_for(slot.installed.descriptor.version)
            rps = m.rps * self._rng.uniform(0.9, 1.1)
            metrics[f"model.{name}.rps"] = round(rps, 3)
            metrics[f"model.{name}.errors_per_s"] = round(rps * m.error_rate, 3)
            metrics[f"model.{name}.p99_ms"] = round(m.p99_ms * self._rng.uniform(0.95, 1.05), 3)
        if not metrics or not self.link.connected:
            return
        message = Telemetry(device_id=self.id, at=self._sim.clock(), metrics=metrics)
        self.link.publish(self._me.telemetry, message.to_bytes())
        self._sim.stats.telemetry += 1


# -- the fleet ------------------------------------------------------------------------------------
class Simulator:
    """Many simulated devices in this process, on one thread (see the module docstring)."""

    def __init__(
        self,
        settings: SimulatorSettings,
        mqtt_settings: MqttSettings,
        trust: TrustedState,
        *,
        topics: Topics,
        state_dir: Path,
        cert_dir: Path | None = None,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        """``cert_dir``: each device's own TLS client certificate, ``<id>.crt`` and ``<id>.key``
        (config/broker/make-certs.sh writes them so), for a broker whose ACL binds each
        device's topics to its certificate; without it every device presents the one of
        ``mqtt_settings`` (if any)."""
        self.settings = settings
        self.mqtt = mqtt_settings
        self.trust = trust
        self.topics = topics
        self.state_dir = Path(state_dir)
        self.clock = clock
        self.stats = SimStats()
        if cert_dir is not None and not mqtt_settings.tls:
            raise ConfigError("device certificates need TLS: leave out --no-tls")
        if cert_dir is not None and not cert_dir.is_dir():
            raise ConfigError(f"{cert_dir} is not a directory of device certificates")
        self._cert_dir = cert_dir
        self._tls = tls_context(mqtt_settings) if mqtt_settings.tls else None  # shared by all
        self.mux = Multiplexer()
        # The backends' modules (never their runtimes), imported now: choosing a variant needs
        # them, and a first deployment should not wait for imports in the middle of it.
        for backend in sorted(set(FORMAT_BACKENDS.values())):
            get_backend(backend)
        self._due: dict[str, SimulatedDevice] = {}
        self._connect_warned: set[tuple[str, int]] = set()
        self.devices = [SimulatedDevice(spec, self) for spec in device_specs(settings)]
        self.stats.devices = len(self.devices)

    def tls_for(self, device: str) -> ssl.SSLContext | None:
        if self._tls is None or self._cert_dir is None:
            return self._tls
        own = self.mqtt.model_copy(
            update={
                "cert_file": self._cert_dir / f"{device}.crt",
                "key_file": self._cert_dir / f"{device}.key",
            }
        )
        return tls_context(own)

    def cannot_connect(self, device: str, endpoint: tuple[str, int], exc: Exception) -> None:
        """Said once per broker node for the whole fleet (every device would say the same)."""
        if endpoint in self._connect_warned:
            log.debug("%s cannot connect to %s:%d: %s", device, *endpoint, exc)
            return
        self._connect_warned.add(endpoint)
        log.warning("cannot connect to %s:%d: %s (trying again, with backoff)", *endpoint, exc)

    def due(self, device: SimulatedDevice) -> None:
        """``device`` has a reported state to send (see :meth:`SimulatedDevice.publish_reported`)."""
        self._due[device.id] = device

    def run(
        self,
        stop: threading.Event,
        *,
        duration: float | None = None,
        on_poll: Callable[[Simulator], None] | None = None,
    ) -> SimStats:
        """Connect every device and run until ``stop`` is set (or ``duration`` seconds passed);
        then say offline, disconnect and return the counts. ``on_poll`` runs after every pass."""
        _raise_file_limit(3 * len(self.devices) + 64)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        waiting = list(reversed(self.devices))
        end = None if duration is None else self.mux.now + duration
        next_tick = self.mux.now
        try:
            while not stop.is_set() and (end is None or self.mux.now < end):
                for _ in range(min(CONNECTS_PER_POLL, len(waiting))):  # a ramp, not a flood
                    waiting.pop().link.start()
                self.mux.poll(0.0 if waiting else POLL_S)
                now = self.mux.now
                if now >= next_tick:
                    next_tick = now + TICK_S
                    for d in self.devices:
                        d.tick(now)
                self._flush(now)
                if on_poll is not None:
                    on_poll(self)
        finally:
            self._stop()
        return self.stats

    def _flush(self, now: float) -> None:
        due, self._due = self._due, {}
        for device in due.values():
            device.publish_reported(now)

    def _stop(self) -> None:
        """Offline messages out, then DISCONNECTs, each waited for at most STOP_S."""
        infos = [i for i in (d.link.say_offline() for d in self.devices) if i is not None]
        deadline = time.monotonic() + STOP_S
        while time.monotonic() < deadline and not all(i.is_published() for i in infos):
            self.mux.poll(0.05)
        for d in self.devices:
            d.link.disconnect()
        while time.monotonic() < deadline and any(
            d.link.client.socket() is not None for d in self.devices
        ):
            self.mux.poll(0.05)
        for d in self.devices:
            sock = d.link.client.socket()
            if sock is not None:
                sock.close()
            d.close()
        self.mux.close()


def _raise_file_limit(needed: int) -> None:
    """Each device holds a socket and, while downloading, two files: raise the soft limit of
    open files to what the fleet needs, or say why it cannot be done."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise ConfigError(
                f"{needed} open files are needed and the hard limit is {hard}: simulate fewer "
                "devices per process (or raise the limit: ulimit -Hn, LimitNOFILE=)"
            )
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
