"""The device agent: desired state in, bundles pulled, reported state out.

One loop on one thread (:meth:`DeviceAgent.run`) owns all state. The MQTT session's network
thread only puts what arrives on the inbox queue; the loop takes it from there, so nothing here
needs a lock. The agent is wired from parts that each do one job:

* agent.device.machine: each model's rollout (:class:`~agent.device.machine.ModelRollout`),
  its table of phases and the rules that tell a late result from a current one; no I/O.
* agent.device.pipeline: the ``prepare`` worker and the steps it runs on a bundle (open a
  transfer's files, check and store the download, unpack it), the choice of what the slot layer
  loads, and the removal of garbage.
* agent.device.reporting: the reported state, the events, ``edge-agent status`` and STATUS=.
* agent.device.trials: each version handed to the slot layer until it commits, on disk, and the
  rules that stop a version that keeps taking the agent down with it.
* agent.device.documents: the deployment documents followed and the trust that verifies them:
  verified, kept on disk, the effective one chosen, refusals for want of trust tried again.
* this module: the loop, what each topic means, reload, the watchdog and systemd notifications.

What the loop does with each topic:

* ``devices/{id}/desired`` and ``groups/{g}/desired``: verify the deployment (trust core:
  release-key signatures, target, expiry, a sequence above the last one accepted from that topic);
  keep it, on disk too. The effective document is the device's own if it has one, else the first
  of its groups' (in the order of ``groups`` in agent.toml) that has one.
* ``trust``: newer roots (each signed by the old and the new threshold) and a keyring.
* ``devices/{id}/blocks``: frames for the bundle being fetched.

Anything refused changes no state: the reason goes to ``Reported.error`` (machine-readable code
and a message) and to a ``rejected`` event.

Each model named by the effective document has its own rollout that moves through the phases
(``pending``, ``downloading``, ``verifying``, ``unpacking``, ``loading``, ..., ``active`` or
``failed``) on its own; one bundle is downloaded at a time. A model the document no longer names
is removed once every model it does name is active. After the download the bundle's structure is
checked and it is unpacked on a worker thread (``prepare``: the loop, and with it the watchdog,
never waits on a disk), then handed to the slot layer (agent.serving.slots), which loads the
chosen variant beside the running one, warms it up, self-tests it, swaps it in and watches it.
Both report back through the inbox.

What is on disk after a crash in any phase is enough to go on: a partial download resumes from
its bitmap, a stored bundle is unpacked again, a half-unpacked copy is thrown away, and a version
not yet committed is deployed again from its stored bundle after the last committed one is
restored (the crash-recovery tests kill the process in each phase through agent._failpoints).

Threads: who owns what, and what each may touch
-------------------------------------------------
``main`` (``edge-agent run``; a test's thread in tests)
    Runs :meth:`DeviceAgent.run`: the loop. Owns every attribute of :class:`DeviceAgent` (the
    rollouts, documents, trust state, trials, the reporter, the transfers while they download)
    and is the only thread that writes the state directory's records (installed models,
    trials, deployment documents, trust, event numbers). Its signal handlers
    (agent.cli) only set ``stop`` (SIGTERM, SIGINT) or the reload flag (SIGHUP,
    :meth:`DeviceAgent.request_reload`); the loop does the work.
``mqtt-{device id}`` (agent.transport.session)
    The network thread: connects, reconnects with backoff, runs paho's loop. Its callbacks only
    put :class:`~agent.transport.session.Incoming` and ``Connection`` items on the inbox. It
    owns the paho client; ``Session.publish`` is called from the loop and ``upstream``.
``prepare`` (agent.device.pipeline)
    One job at a time: opens a transfer's files, checks and stores a download (into
    ``bundles/``), unpacks a bundle (into ``models/``), removes garbage. A job touches only the
    files of the bundle it was given and the transfer handed over with it (which the loop leaves
    alone until the result comes back: ``opening``, or past ``downloading``); results go to the
    inbox as ``Prepared`` and ``Removed``. Hashing a file may use a short-lived ``sha256-file``
    helper thread (agent.bundle.blocks).
``slot-{model}``, ``load-{model}``, ``drain-{model}`` (agent.serving.slots)
    The slot layer's: load, warm up, self-test and swap a version (``slot-``), a load with its
    timeout (``load-``), draining the version swapped out (``drain-``). They own the runtimes
    and the slots under the slot manager's lock; they tell the loop through the inbox only
    (``SlotEvent``; ``VerdictItem``, which they wait on until the loop has it on disk).
``edge-agent-api`` and ``edge-agent-infer-*`` (agent.serving.server, agent.serving.api)
    The local inference API's event loop, and the pool that runs inferences. They read the
    slot manager's active versions (under its lock) and the API metrics; never the loop's state.
``status-socket`` and ``status-client`` (agent.statusd)
    Accept ``edge-agent status`` connections and answer each with the last snapshot the loop
    handed over (:meth:`~agent.statusd.StatusServer.update`, under the server's lock).
``upstream`` (agent.upstream)
    Collects telemetry and sends what is queued (events, telemetry; its queue is on disk, under
    the state directory, and its own) whenever connected.
    ``put`` (from the loop) and ``connected`` are its only entry points from other threads.
``stop-deadline`` (agent.notify, started by agent.cli)
    Waits for ``stop``; if the agent has not finished draining in time, logs every thread's
    stack and exits the process.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from agent import __version__
from agent._failpoints import failpoint
from agent._lazy import release_free_memory
from agent.config import AgentConfig
from agent.device.documents import Documents, Received
from agent.device.machine import (
    FINAL,
    Heard,
    Leftover,
    ModelRollout,
    Plan,
    SlotEvent,
    Trigger,
    error_info,
    plan,
    plan_unnamed,
    refused_trigger,
)
from agent.device.pipeline import Job, Pipeline, Prepared, Removed
from agent.device.reporting import Reporter, reported_hardware
from agent.device.transfer import Transfer
from agent.device.trials import Trials
from agent.errors import (
    BadContentError,
    ConfigError,
    EdgeAgentError,
    FormatError,
    RollbackError,
    SizeLimitError,
    StorageError,
    TransferError,
)
from agent.logs import log_fields
from agent.notify import Notifier
from agent.runtime import hardware
from agent.serving.api import InferenceApi
from agent.serving.metrics import ApiMetrics
from agent.serving.server import ApiServer, serve_api
from agent.serving.slots import SlotManager
from agent.state.store import (
    InstalledModel,
    StateStore,
)
from agent.statusd import StatusServer
from agent.transport.messages import (
    ErrorInfo,
    Online,
    Phase,
    decode_block_reply,
)
from agent.transport.session import Connection, InboxItem, Incoming, Session, Will
from agent.trust.verifier import TrustedState, VerifiedDeployment
from agent.upstream import Upstream

log = logging.getLogger("agent")

VERDICT_WAIT_S = 10.0  # a slot worker waits this long for the loop to record a verdict
# How often the loop looks at its timers while something runs that has no event of its own to
# wake it (a download's windows and timeouts, an install waiting for its slot, a restore).
BUSY_WAKE_S = 0.2
# The longest the loop sleeps when nothing is due: an idle box wakes for messages, slot events,
# signals and its own timers (report interval, watchdog, retries), not to poll.
IDLE_WAKE_S = 60.0


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class VerdictItem:
    """A slot worker's verdict on a version's probation, to be recorded before it rolls back;
    the loop sets ``done`` once it is on disk (or could not be written)."""

    name: str
    bundle_sha256: str
    error: EdgeAgentError
    done: threading.Event


@dataclass(frozen=True)
class Wake:
    """Nothing to do but look again: stop was asked for, or a reload."""


WAKE = Wake()

LoopItem = InboxItem | SlotEvent | Prepared | Removed | VerdictItem | Wake


class DeviceAgent:
    """The device side of the protocol. Build, then :meth:`run` until ``stop`` is set."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        clock: Callable[[], datetime] = _utcnow,
        monotonic: Callable[[], float] = time.monotonic,
        reload_config: Callable[[], AgentConfig] | None = None,
    ) -> None:
        self.config = config
        self._reload_config = reload_config
        self._reload = threading.Event()
        self._restoring: set[str] = set()  # restored at start, not yet active or failed
        self.topics = config.topics
        self.me = self.topics.device(config.device_id)
        self._now = clock
        self._mono = monotonic
        self.store = StateStore(config.state_dir)
        self.trials = Trials(self.store)
        self.docs = Documents(
            self.store, self._load_trust(), device_id=config.device_id, groups=config.groups
        )
        self.rollouts: dict[str, ModelRollout] = {}
        self.deployment: VerifiedDeployment | None = None
        self.profile = hardware.probe_isolated()
        self.inbox: queue.SimpleQueue[LoopItem] = queue.SimpleQueue()
        # Checks and unpacks bundles, one at a time, off the loop.
        self.pipeline = Pipeline(
            self.store,
            limits=config.limits,
            runtime=config.runtime,
            profile=self.profile,
            put=self.inbox.put,
        )
        self.metrics = ApiMetrics()
        self.models = SlotManager(
            config.serving,
            on_phase=self._slot_phase,
            on_swap=self.metrics.on_swap,
            on_verdict=self._slot_verdict,
        )
        self.api: ApiServer | None = None
        self.session = Session(
            config.mqtt,
            config.device_id,
            self.inbox,  # type: ignore[arg-type]  # the session puts only its own items
            subscriptions=[
                self.me.desired,
                *(self.topics.group_desired(g) for g in config.groups),
                self.topics.trust,
                self.me.blocks,
            ],
            will=Will(self.me.online, Online(state="offline").to_bytes()),
            online_payload=Online(
                state="online", agent_version=__version__, since=self._now().replace(microsecond=0)
            ).to_bytes(),
        )
        # Events and telemetry go through a queue on disk: nothing recorded offline is lost.
        self.upstream = Upstream(
            config.telemetry,
            state_dir=self.store.root,
            device_id=config.device_id,
            telemetry_topic=self.me.telemetry,
            session=self.session,
            metrics=self.metrics,
            models=self.models.names,
            clock=self._now,
        )
        self.report = Reporter(
            self,
            device_id=config.device_id,
            groups=config.groups,
            hardware=reported_hardware(self.profile),
            topics=self.me,
            store=self.store,
            session=self.session,
            models=self.models,
            put_event=self.upstream.put,
            tls=config.mqtt.tls,
            report_interval_s=config.report_interval_s,
            clock=self._now,
            monotonic=self._mono,
        )
        self._restore()

    @property
    def trusted(self) -> TrustedState:
        return self.docs.trusted

    @property
    def documents(self) -> dict[str, VerifiedDeployment]:
        return self.docs.by_source

    # -- start-up -----------------------------------------------------------------------------
    def _load_trust(self) -> TrustedState:
        cfg = self.config.trust
        try:
            shipped = cfg.root.read_bytes()
            shipped_keyring = cfg.keyring.read_bytes() if cfg.keyring else None
        except FileNotFoundError as exc:
            # Not set up yet (a fresh install): a config problem, which no restart fixes.
            raise ConfigError(
                f"trust: {exc.filename} does not exist (copy the fleet's root.json there)"
            ) from None
        except OSError as exc:
            raise StorageError(f"cannot read the trusted root: {exc}") from None
        return self.store.load_trust(shipped, shipped_keyring, self._now())

    def _restore(self) -> None:
        for name, installed in self.store.load_installed().items():
            rollout = self.rollouts[name] = ModelRollout(
                name, installed=installed, phase=Phase.LOADING
            )
            # What runs is never above the floor (a crash between the two writes).
            self.docs.assume_floor(name, installed.release)
            try:
                candidate = self.pipeline.candidate(name, installed)
                self.models.restore(candidate)
                self._restoring.add(name)
            except (EdgeAgentError, OSError) as exc:
                err = exc if isinstance(exc, EdgeAgentError) else StorageError(str(exc))
                log.error("cannot serve %s %s: %s", name, installed.version, err)
                rollout.error = error_info(err)
                rollout.step(Trigger.RESTORE_FAILED)
        self.docs.restore(self._now())
        self._reconcile()
        # Downloads and bundles of deployments replaced while the agent was down.
        self._collect_garbage()

    # -- the loop -----------------------------------------------------------------------------
    def _start_api(self) -> None:
        """The local inference API; the agent goes on without it if it cannot listen."""
        settings = self.config.api
        if settings.port is None and settings.unix_socket is None:
            return
        app = InferenceApi(
            self.models,
            settings,
            metrics=self.metrics,
            gpu_memory=hardware.gpu_memory_used if self.profile.nvidia_gpus else None,
        )
        try:
            self.api = serve_api(app, settings)
        except EdgeAgentError as exc:
            log.error("the local inference API cannot listen: %s", exc)
            self.report.error = error_info(exc)
            app.close()

    # -- edge-agent status ---------------------------------------------------------------------
    def _start_status(self) -> StatusServer | None:
        """The status socket (agent.statusd); the agent goes on without it if it cannot listen."""
        self.report.run_since = self._mono()
        path = self.config.status_socket
        if path is None:
            return None
        server = StatusServer(
            path, self.report.status_snapshot(), refresh=lambda: self.inbox.put(WAKE)
        )
        try:
            server.start()
        except EdgeAgentError as exc:
            log.error("the status socket cannot listen: %s", exc)
            return None
        return server

    def _publish_status(self, server: StatusServer, ready: bool) -> None:
        server.update(self.report.status_snapshot(ready=ready))

    def run(self, stop: threading.Event, notifier: Notifier | None = None) -> None:
        """Serve until ``stop`` is set, telling systemd how it stands (``notifier``; by default
        from ``$NOTIFY_SOCKET``): READY=1 once every model restored at start is active or
        failed, STATUS= lines, WATCHDOG=1 from this loop while healthy, STOPPING=1 at the end."""
        notify = notifier if notifier is not None else Notifier()
        notify.status("starting")
        self._start_api()
        status = self._start_status()
        self.session.start()
        self.upstream.start()

        # stop may be set from anywhere (a signal handler, another thread): wake the loop then.
        def wake_on_stop() -> None:
            stop.wait()
            self.inbox.put(WAKE)

        threading.Thread(target=wake_on_stop, name="stop-wake", daemon=True).start()
        ready = False
        try:
            while not stop.is_set():
                try:
                    item: LoopItem | None = self.inbox.get(timeout=self._sleep_s(notify))
                except queue.Empty:
                    item = None
                while item is not None:
                    self._guarded(self.handle, item)
                    self._ping(notify)
                    try:
                        item = self.inbox.get_nowait()
                    except queue.Empty:
                        item = None
                if self._reload.is_set():
                    self._reload.clear()
                    self._apply_reload(notify)
                self._guarded(self.tick)
                if not ready and not self._restoring:
                    ready = True
                    log.info("ready: %s", self.report.status_line())
                    notify.ready()
                    release_free_memory()  # what start-up allocated and freed, back to the system
                notify.status(self.report.status_line())
                if status is not None:
                    self._guarded(self._publish_status, status, ready)
                self._ping(notify)
        finally:
            if status is not None:
                status.stop()
            notify.stopping()
            notify.status("stopping: draining")
            log.info("stopping")
            self._record_verdicts()
            self._release_trials()
            for rollout in self.rollouts.values():
                t = rollout.transfer
                if t is not None and not t.finished and not rollout.opening:
                    t.pause()  # (one being opened is the worker's, cut short at exit)
            self.upstream.stop()  # what it could not send stays queued on disk for next time
            self.session.stop(offline_payload=Online(state="offline").to_bytes())
            if self.api is not None:
                self.api.stop()
            self.pipeline.stop()
            self.models.close()

    def _record_verdicts(self) -> None:
        """Verdicts the slot layer sent while the loop was stopping: recorded all the same."""
        left: list[LoopItem] = []
        while True:
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, VerdictItem):
                self._guarded(self._on_verdict, item)
            else:
                left.append(item)
        for item in left:
            self.inbox.put(item)

    def _release_trials(self) -> None:
        """A clean stop does not count against the versions the slot layer is still trying."""
        for rollout in self.rollouts.values():
            self.trials.release(rollout.name, rollout.loading)

    # -- service manager hooks ----------------------------------------------------------------
    def wake_on_signals(self) -> None:
        """Have every signal wake the loop; call it on the main thread, before :meth:`run`.

        Python runs signal handlers on the main thread, between two bytecodes, but the kernel
        may deliver the signal to any thread: the main thread, asleep in the inbox until its
        next timer, would only see a SIGTERM then. The C handler also writes the signal's
        number to a wakeup fd (whichever thread took it); a thread reading that fd wakes the
        loop, which then runs the handlers.
        """
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        os.set_blocking(r, True)
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)

        def relay() -> None:
            while os.read(r, 64):
                self.inbox.put(WAKE)

        threading.Thread(target=relay, name="signal-wake", daemon=True).start()

    def request_reload(self) -> None:
        """Ask the loop to re-read the config (safe from a signal handler: sets a flag, and
        wakes the loop with SimpleQueue.put, which is reentrant)."""
        self._reload.set()
        self.inbox.put(WAKE)

    def _sleep_s(self, notify: Notifier) -> float:
        """How long the loop may wait for its inbox before a timer of its own is due: between
        BUSY_WAKE_S (never sooner, as before) and IDLE_WAKE_S."""
        if self._restoring or self._reload.is_set():
            return BUSY_WAKE_S
        now = self._mono()
        due = [IDLE_WAKE_S]
        for rollout in self.rollouts.values():
            if rollout.waiting is not None or (
                rollout.transfer is not None and rollout.phase == Phase.DOWNLOADING
            ):
                return BUSY_WAKE_S
            if rollout.phase == Phase.FAILED and rollout.retry_at is not None:
                due.append(rollout.retry_at - now)
        if (report := self.report.due_in()) is not None:
            due.append(report)
        if (ping := notify.watchdog_in()) is not None:
            due.append(ping)
        return min(IDLE_WAKE_S, max(BUSY_WAKE_S, min(due)))

    def _apply_reload(self, notify: Notifier) -> None:
        """Re-read the config; ``report_interval_s`` and ``[transfer]`` apply at once (to the
        next download), anything else changed is logged as waiting for a restart. The MQTT
        session looks at its TLS files again: a renewed certificate is used at once."""
        log.info("reload requested")
        # Renewed TLS files (edge-agent enroll): taken up with a reconnect, whatever the config.
        self.session.reload_tls()
        if self._reload_config is None:
            log.info("no config source to re-read: nothing reloaded")
            return
        notify.reloading()
        try:
            try:
                new = self._reload_config()
            except (EdgeAgentError, OSError) as exc:
                log.error("reload failed, keeping the running config: %s", exc)
                return
            live = {"report_interval_s": new.report_interval_s, "transfer": new.transfer}
            old = self.config.model_dump()
            after = new.model_dump()
            later = sorted(k for k in after if k not in live and after[k] != old.get(k))
            if later:
                log.warning("config changes that take effect on restart: %s", ", ".join(later))
            self.config = self.config.model_copy(update=live)
            self.report.report_interval_s = new.report_interval_s
            self.report.changed()
            log.info(
                "reloaded: report_interval_s=%s, transfer window=%d",
                new.report_interval_s,
                new.transfer.window,
            )
        finally:
            notify.ready()

    def healthy(self) -> bool:
        """What WATCHDOG=1 vouches for besides the loop itself: the MQTT session's thread is
        alive and the inference API, when it was started, still serves."""
        if not self.session.alive:
            return False
        return self.api is None or self.api.running

    def _ping(self, notify: Notifier) -> None:
        if notify.watchdog_due() and self.healthy():
            notify.watchdog()

    def _slot_phase(
        self, name: str, phase: Phase, error: EdgeAgentError | None, progress: float | None
    ) -> None:
        """Called on a slot worker thread: hand the change to the loop."""
        self.inbox.put(SlotEvent(name, phase, error, progress))

    def _on_slot_event(self, event: SlotEvent) -> None:
        restoring = event.name in self._restoring
        if restoring and event.phase in FINAL:
            self._restoring.discard(event.name)
            log.info(
                "restored %s: %s",
                event.name,
                event.phase.value,
                extra=log_fields(model=event.name, phase=event.phase),
            )
        rollout = self.rollouts.get(event.name)
        if rollout is None:
            return
        if event.progress is not None:
            rollout.warm_progress = event.progress
            self.report.changed()
        draft = rollout.loading
        if event.phase == Phase.ACTIVE and draft is not None:
            self._commit(rollout, draft)
        elif event.phase in (Phase.FAILED, Phase.ROLLED_BACK):
            rollout.loading = None
            # Failed on its own (a load, warm-up or self-test): tried again after a restart.
            self.trials.failed_alone(rollout.name, draft)
        served = self.models.describe(rollout.name) if event.phase in FINAL else None
        heard = rollout.hear(event, draft, restoring=restoring, serves=served is not None)
        if heard == Heard.STALE:
            # The event is about a version the rollout no longer heads for (a restore, or one a
            # newer document replaced while the slot layer had it): its outcome is recorded
            # above; the phase reported stays the newer deployment's.
            if event.phase in (Phase.FAILED, Phase.ROLLED_BACK) and event.error is not None:
                log.error("%s: %s", rollout.name, event.error)
            self.report.changed()
            return
        if heard == Heard.ENTERED:
            self.report.phase(rollout)
        if event.phase in FINAL:
            self._reconcile()  # the document may have moved on while the slot layer worked

    def _commit(self, rollout: ModelRollout, installed: InstalledModel) -> None:
        """The slot layer committed a new version: the floor first, then the record."""
        self.docs.raise_floor(rollout.name, installed.release)
        failpoint("committing")
        self.store.save_installed(installed)
        self.trials.end(rollout.name)
        rollout.installed, rollout.loading = installed, None
        if rollout.target is not None and rollout.target.descriptor.bundle_sha256 == (
            installed.bundle_sha256
        ):
            rollout.target, rollout.waiting = None, None
        log.info(
            "%s %s (%s) is active",
            rollout.name,
            installed.version,
            installed.bundle_sha256[:16],
            extra=log_fields(
                model=rollout.name,
                version=installed.version,
                deployment_id=installed.deployment_id,
                bundle_id=installed.bundle_sha256,
                phase=Phase.ACTIVE,
            ),
        )
        self._collect_garbage()

    def _raise_release(self, rollout: ModelRollout, release: int) -> None:
        """The effective document names the bytes the rollout runs, under a higher release (a
        re-issued descriptor): nothing is fetched or loaded, and the release moves as a commit
        moves it, the floor first, then the record."""
        assert rollout.installed is not None
        self.docs.raise_floor(rollout.name, release)
        installed = rollout.installed.model_copy(
            update={"release": release, "deployment_id": rollout.deployment_id}
        )
        self.store.save_installed(installed)
        rollout.installed = installed
        self.report.changed()
        log.info(
            "%s %s runs on as release %d",
            rollout.name,
            installed.version,
            release,
            extra=log_fields(
                model=rollout.name,
                version=installed.version,
                deployment_id=installed.deployment_id,
                bundle_id=installed.bundle_sha256,
            ),
        )

    def _guarded(self, step: Callable[..., None], *args: object) -> None:
        """Run one step of the loop; a failure is logged and reported, and the loop goes on.

        A full or failing disk must not stop the agent: it keeps serving what it runs, and says
        why it cannot go further.
        """
        try:
            step(*args)
        except (EdgeAgentError, OSError) as exc:
            err = exc if isinstance(exc, EdgeAgentError) else StorageError(str(exc))
            log.error("%s", err)
            self.report.fault(error_info(err))

    def handle(self, item: LoopItem) -> None:
        if isinstance(item, Wake):
            return
        if isinstance(item, SlotEvent):
            self._on_slot_event(item)
            return
        if isinstance(item, Prepared):
            self._on_prepared(item)
            return
        if isinstance(item, VerdictItem):
            self._on_verdict(item)
            return
        if isinstance(item, Removed):
            self._on_removed(item)
            return
        if isinstance(item, Connection):
            if item.up:
                self.upstream.connected()
            now = self._mono()
            for rollout in self.rollouts.values():
                if rollout.transfer is None:
                    continue
                if not item.up:
                    rollout.transfer.suspend(now)  # nothing is asked for while offline
                elif self.session.connects > 1:
                    # Replies may have been lost with the connection. (On the first connect,
                    # requests made before it are in paho's queue and go out now.)
                    rollout.transfer.resend(now)
            if item.up:
                self.report.changed()
            return
        try:
            ref = self.topics.parse(item.topic)
        except FormatError:
            log.warning("ignoring a message on %s", item.topic)
            return
        if ref.channel == "desired":
            if ref.kind == "device" and ref.id != self.config.device_id:
                return  # another device's topic: a subscription left from another config
            if ref.kind == "group" and ref.id not in self.config.groups:
                return  # a group this device no longer belongs to
            source = "device" if ref.kind == "device" else f"group-{ref.id}"
            self._on_desired(source, item)
        elif ref.kind == "trust":
            self._on_trust(item)
        elif ref.kind == "device" and ref.channel == "blocks" and ref.id == self.config.device_id:
            self._on_blocks(item)

    def tick(self) -> None:
        now = self._mono()
        online = self.session.connected.is_set()
        for rollout in list(self.rollouts.values()):
            if rollout.waiting is not None and not self.models.busy(rollout.name):
                bundle, rollout.waiting = rollout.waiting, None
                self._install(rollout, bundle)
            if (
                rollout.phase == Phase.FAILED
                and rollout.retry_at is not None
                and now >= rollout.retry_at
            ):
                log.info("trying the download of %s again", rollout.name)
                rollout.retry_at = None
                rollout.error = None
                self._move(rollout, Trigger.RETRY)
            if online and rollout.transfer is not None and rollout.phase == Phase.DOWNLOADING:
                try:
                    rollout.transfer.tick(now)
                except EdgeAgentError as exc:
                    rollout.transfer.fail(exc)
                self._after_transfer(rollout)
        self._start_next()
        self.report.flush_rejects(now)
        self.report.publish()

    # -- desired ------------------------------------------------------------------------------
    def _on_desired(self, source: str, item: Incoming) -> None:
        receipt = self.docs.receive(source, item, self._now())
        if receipt.kind is Received.WITHDRAWN:
            log.info("the %s deployment was removed from the broker; keeping what runs", source)
            return
        if receipt.error is not None:
            self.report.reject(item.topic, receipt.error)
            return
        if receipt.kind is not Received.ACCEPTED:
            # The same document again: the topic holds a valid document, so an error about an
            # earlier refused message is over.
            if self.report.error is not None:
                self.report.clear_error()
            if receipt.kind is Received.RESUMED:
                self._reconcile()
            return
        self.report.clear_error()
        for rollout in self.rollouts.values():  # a new document is a new attempt
            if rollout.phase in (Phase.FAILED, Phase.ROLLED_BACK):
                rollout.target = None
        self._reconcile()

    def _desired_topic(self, source: str) -> str:
        if source == "device":
            return self.me.desired
        return self.topics.group_desired(source.removeprefix("group-"))

    def _reconcile(self) -> None:
        doc, lapsed = self.docs.effective(self.deployment, self._now())
        for source, exc in lapsed:
            self.report.reject(self._desired_topic(source), exc)
        if doc is None:
            return
        self.deployment = doc
        for name, verified in doc.bundles.items():
            rollout = self.rollouts.setdefault(name, ModelRollout(name))
            want = verified.descriptor.bundle_sha256
            restoring = name in self._restoring
            trial = self.trials.get(name)
            todo = plan(
                rollout,
                want,
                serving=restoring or self.models.describe(name) is not None,
                trial=trial,
                deployment_sha256=doc.envelope_sha256,
            )
            if todo == Plan.RUNS_IT:
                assert rollout.installed is not None
                if rollout.target is not None:
                    self._cancel(rollout)
                moved_on = rollout.deployment_id != doc.document.deployment_id
                rollout.follow(doc.document.deployment_id, doc.envelope_sha256)
                if restoring:  # loading what it ran before: the slot layer says when
                    continue
                if verified.descriptor.release > rollout.installed.release:
                    self._raise_release(rollout, verified.descriptor.release)
                if rollout.phase != Phase.ACTIVE or moved_on:
                    rollout.error = None
                    self._move(rollout, Trigger.RUNS_IT)
                continue
            if todo == Plan.ON_ITS_WAY:
                # Already on its way (or failed: a new document is needed). The bytes are the
                # same; the release is the newer document's (it may be a re-issue).
                rollout.target = verified
                rollout.follow(doc.document.deployment_id, doc.envelope_sha256)
                continue
            self._cancel(rollout)
            rollout.target, rollout.variant = verified, doc.document.models[name].variant
            rollout.follow(doc.document.deployment_id, doc.envelope_sha256)
            rollout.retry_at = None
            if todo == Plan.REFUSED:
                # Tried before for this very document, and refused (a failed probation, or a
                # version that kept taking the agent down): not again until a new document.
                assert trial is not None
                assert trial.verdict is not None
                rollout.error = ErrorInfo(code=trial.verdict.code, message=trial.verdict.message)
                self._move(rollout, refused_trigger(rollout, trial))
                continue
            rollout.error = None
            self._move(rollout, Trigger.NEW_TARGET)
        for name in [n for n in self.rollouts if n not in doc.bundles]:
            rollout = self.rollouts[name]
            leftover = plan_unnamed(rollout)
            if leftover == Leftover.FORGET:
                self._cancel(rollout)
                del self.rollouts[name]
                self.report.changed()
            elif leftover == Leftover.STOP_FETCHING:
                self._cancel(rollout)
                rollout.error = None
                self._move(rollout, Trigger.DROPPED)
        self._start_next()

    def _cancel(self, rollout: ModelRollout) -> None:
        t = rollout.cancel()
        if t is not None:
            # Its part file is synced to disk on the worker; the download is garbage from now
            # on, unless a document names the bundle again before it is collected.
            t.suspend(self._mono())
            self.pipeline.pause(t)

    # -- transfers ----------------------------------------------------------------------------
    def _start_next(self) -> None:
        if any(s.phase == Phase.DOWNLOADING for s in self.rollouts.values()):
            return
        for rollout in self.rollouts.values():
            if rollout.phase == Phase.PENDING and rollout.target is not None:
                self._start_transfer(rollout)
                return
        self._drop_unwanted()

    def _start_transfer(self, rollout: ModelRollout) -> None:
        assert rollout.target is not None
        d = rollout.target.descriptor
        cap = self.config.limits.max_bundle_bytes
        if d.bundle_size > cap:
            self._fail(
                rollout, SizeLimitError(f"the bundle is {d.bundle_size} bytes; the limit is {cap}")
            )
            return
        if d.bundle_sha256 in self.pipeline.in_flight:
            return  # a stale job still moves or unpacks these bytes: start once it is done
        stored = self.store.bundle_path(d.bundle_sha256)
        if stored.exists():  # fetched before (an earlier deployment, then rolled forward again)
            self._move(rollout, Trigger.FOUND_STORED)
            self._install(rollout, stored)
            return
        transfer = Transfer(
            d,
            self.store.download_dir(d.bundle_sha256),
            device_id=self.config.device_id,
            topics=self.topics,
            publish=lambda t, p: self.session.publish(t, p),
            settings=self.config.transfer,
            reuse=lambda: self.pipeline.local_blocks(d.block_size),
            inline_open=False,  # opened on the prepare worker: see _after_transfer
        )
        rollout.transfer = transfer
        self._move(rollout, Trigger.FETCH)
        self._after_transfer(rollout)

    def _on_blocks(self, item: Incoming) -> None:
        try:
            header, data = decode_block_reply(item.payload)
        except BadContentError as exc:
            self.report.reject(item.topic, exc, report=False)
            return
        for rollout in self.rollouts.values():
            t = rollout.transfer
            if t is not None and t.descriptor.bundle_sha256 == header.bundle_sha256:
                try:
                    t.on_reply(header, data, self._mono())
                except EdgeAgentError as exc:
                    t.fail(exc)
                self._after_transfer(rollout)
                return
        log.debug("ignoring a block of %s (not being fetched)", header.bundle_sha256[:16])

    def _after_transfer(self, rollout: ModelRollout) -> None:
        t = rollout.transfer
        if t is None or rollout.phase != Phase.DOWNLOADING:
            return
        if t.opening:
            # New, or its block list just arrived: what is on disk already (a resumed part file,
            # re-checked block by block; blocks of other bundles) is read on the worker.
            if not rollout.opening:
                rollout.opening = True
                self.pipeline.open(self._job(rollout), t)
            return
        if t.state == "failed":
            assert t.error is not None
            self._fail(rollout, t.error)
            return
        if t.state != "done":
            self.report.progress(rollout.name, t.progress)
            return
        self._move(rollout, Trigger.DOWNLOADED)
        self.pipeline.store(self._job(rollout), t)

    # -- the prepare worker's steps -----------------------------------------------------------
    @staticmethod
    def _job(rollout: ModelRollout) -> Job:
        """A job for the prepare worker, for what ``rollout`` heads for now."""
        assert rollout.target is not None
        return Job(rollout.name, rollout.target.descriptor.bundle_sha256, rollout.next_attempt())

    def _on_prepared(self, item: Prepared) -> None:
        self.pipeline.done_with(item.bundle_sha256)
        rollout = self.rollouts.get(item.name)
        if rollout is None or not rollout.is_current(item.attempt, item.bundle_sha256):
            # The deployment moved on meanwhile; what was written is collected as garbage.
            log.info(
                "%s of %s %s: no longer wanted", item.stage, item.name, item.bundle_sha256[:16]
            )
            if item.transfer is not None:  # opened for nothing: its files are closed there
                self.pipeline.pause(item.transfer)
            return
        if item.stage == "opened":
            rollout.opening = False
            t = item.transfer
            if t is not None and rollout.transfer is t and rollout.phase == Phase.DOWNLOADING:
                if item.error is not None:  # open() raised what it does not keep for start()
                    t.fail(item.error)
                else:
                    t.start(self._mono())
                self._after_transfer(rollout)
            return
        if item.stage == "stored":
            rollout.transfer = None
        if item.error is not None:
            self._fail(rollout, item.error)
            return
        assert item.path is not None
        if item.stage == "stored":
            self._install(rollout, item.path)
        else:
            self._load(rollout, item.path)

    def _install(self, rollout: ModelRollout, bundle: Path) -> None:
        """Unpack the verified bundle (on the prepare worker), then :meth:`_load` it."""
        assert rollout.target is not None
        if self.models.busy(rollout.name):  # the previous version is still on probation
            rollout.waiting = bundle
            return
        d = rollout.target.descriptor
        dest = self.store.model_dir(rollout.name, d.bundle_sha256)
        # Unpacked again even where it is the installed version's directory: loading that one
        # again means its copy did not serve (its restore failed), so the copy is suspect.
        self._move(rollout, Trigger.UNPACK)
        self.pipeline.unpack(self._job(rollout), bundle, dest, d)

    def _load(self, rollout: ModelRollout, dest: Path) -> None:
        """Choose the unpacked bundle's variant and runtime, and hand it to the slot layer."""
        assert rollout.target is not None
        d = rollout.target.descriptor
        self._move(rollout, Trigger.LOAD)
        floor = self.trusted.release_floor.get(rollout.name, 0)
        if d.release < floor:  # checked when the document came; the floor may have moved since
            self._fail(
                rollout,
                RollbackError(f"{rollout.name} release {d.release} is older than release {floor}"),
            )
            return
        draft = rollout.draft(dest)
        try:
            candidate = self.pipeline.loadable(draft)
        except (EdgeAgentError, OSError) as exc:
            err = exc if isinstance(exc, EdgeAgentError) else StorageError(str(exc))
            self._fail(rollout, err)
            return
        interrupted = self.trials.begin(
            draft,
            deployment_sha256=rollout.deployment_sha256 or "",
            deployment_id=rollout.deployment_id,
        )
        if interrupted is not None:
            self._fail(rollout, interrupted)
            return
        rollout.loading = draft.model_copy(
            update={"variant": candidate.variant.id, "backend": candidate.backend}
        )
        self.models.deploy(candidate)

    # -- trials: a version handed to the slot layer, until it commits (agent.device.trials) -----
    def _slot_verdict(self, name: str, bundle_sha256: str, error: EdgeAgentError) -> None:
        """Called on a slot worker: have the loop record the verdict, and wait until it has."""
        item = VerdictItem(name, bundle_sha256, error, threading.Event())
        self.inbox.put(item)
        if not item.done.wait(VERDICT_WAIT_S):
            log.error("%s: the verdict could not be recorded in time; rolling back anyway", name)

    def _on_verdict(self, item: VerdictItem) -> None:
        try:
            rollout = self.rollouts.get(item.name)
            self.trials.refuse(
                item.name,
                item.bundle_sha256,
                item.error,
                deployment_sha256=None if rollout is None else rollout.deployment_sha256,
                deployment_id=None if rollout is None else rollout.deployment_id,
            )
        finally:
            item.done.set()

    def _fail(self, rollout: ModelRollout, exc: EdgeAgentError) -> None:
        log.error(
            "deployment of %s failed: %s",
            rollout.name,
            exc,
            extra=log_fields(
                model=rollout.name, deployment_id=rollout.deployment_id, phase=Phase.FAILED
            ),
        )
        # A transfer that timed out or found no server, or a full disk, may work later.
        transient = isinstance(exc, (TransferError, StorageError))
        retry_at = self._mono() + self.config.transfer.retry_after_s if transient else None
        if rollout.fail(exc, retry_at=retry_at):
            self.report.phase(rollout)

    def _drop_unwanted(self) -> None:
        """Unload models the document no longer names, once every named one is active."""
        doc = self.deployment
        if doc is None:
            return
        wanted = doc.document.models
        if any(self.rollouts[n].phase != Phase.ACTIVE for n in wanted if n in self.rollouts):
            return
        for name in [n for n in self.rollouts if n not in wanted]:
            log.info("removing %s: the deployment no longer names it", name)
            self._cancel(self.rollouts[name])
            self._restoring.discard(name)  # (READY waits for no model that is gone)
            self.models.remove(name)
            self.store.remove_installed(name)
            self.trials.end(name)
            del self.rollouts[name]
            self.report.event("info", model=name, phase=None)
            self.report.changed()
            self._collect_garbage()

    def _collect_garbage(self) -> None:
        self.pipeline.collect_garbage(
            self.rollouts,
            list(self.trials),
            served=self.models.describe,
            sources=self.docs.sources(),
        )

    def _on_removed(self, item: Removed) -> None:
        for sha in item.shas:
            self.pipeline.done_with(sha)

    # -- trust ----------------------------------------------------------------------------
    def _on_trust(self, item: Incoming) -> None:
        if not item.payload:
            return
        try:
            waiting = self.docs.update_trust(item.payload, self._now())
        except BadContentError as exc:
            self.report.reject(item.topic, exc)
            return
        if waiting is None:
            return
        self.report.clear_error()
        # Documents refused for want of this trust (no keyring yet, a key it did not list):
        # what the topics hold is verified again, with no restart and no new message.
        for source, refused in waiting.items():
            log.info("verifying the %s deployment again with the new trust", source)
            self._on_desired(source, refused)

    def _move(self, rollout: ModelRollout, trigger: Trigger, phase: Phase | None = None) -> None:
        """Move ``rollout`` along the table (agent.device.machine); a phase entered is logged
        and reported."""
        if rollout.step(trigger, phase):
            self.report.phase(rollout)
