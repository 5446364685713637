"""What is done to a bundle between its blocks and the slot layer: open a transfer's files, check
and store a download, unpack a stored bundle, choose what the slot layer loads, and remove what no
record names. The disk work runs on one worker thread (``prepare``), one job at a time, so that
the loop, and with it the watchdog, never waits on a disk; its results come back to the loop's
inbox as :class:`Prepared` and :class:`Removed`.

Every method is called from the loop's thread; only the jobs themselves run on the worker, and
they touch no state of the loop (only the files of the bundle they were given, and the
:class:`~agent.device.transfer.Transfer` handed over with them).
"""

from __future__ import annotations

import logging
import queue
import shutil
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from agent._failpoints import failpoint
from agent.bundle.blocks import BlockSource
from agent.bundle.limits import BundleLimits
from agent.bundle.manifest import MANIFEST_NAME, Manifest
from agent.bundle.unpack import unpack_bundle
from agent.bundle.verify import check_bundle, check_bundle_structure
from agent.device.machine import ModelRollout
from agent.device.transfer import Transfer
from agent.errors import BadContentError, EdgeAgentError, StorageError, unexpected
from agent.runtime import hardware
from agent.runtime.choice import RuntimeConfig
from agent.runtime.probe import HostProfile
from agent.serving.slots import Candidate, Version
from agent.state.store import InstalledModel, StateStore, Trial, bundle_sha
from agent.trust.metadata import BundleDescriptor

log = logging.getLogger("agent")

Stage = Literal["opened", "stored", "unpacked"]


@dataclass(frozen=True)
class Job:
    """What a job of the worker is for: a model, the bundle it heads for, and the attempt it
    is at (agent.device.machine: a result of an older attempt is stale)."""

    name: str
    bundle_sha256: str
    attempt: int


@dataclass(frozen=True)
class Prepared:
    """A step the ``prepare`` worker finished for a bundle: a transfer opened (its part file
    and the blocks on disk checked), the download checked and stored, or the bundle unpacked."""

    name: str
    bundle_sha256: str
    attempt: int  # the model's attempt it was for: a result of an older one is dropped
    stage: Stage
    path: Path | None  # the stored bundle, or the unpacked directory
    error: EdgeAgentError | None
    transfer: Transfer | None = None  # the transfer opened


@dataclass(frozen=True)
class Removed:
    """Garbage the ``prepare`` worker removed; ``shas`` were busy until now."""

    shas: tuple[str, ...]


class Worker:
    """One daemon thread that runs jobs in order. A daemon: a job still running when the agent
    exits is cut short (an unpack leaves only its temporary directory, collected later), so it
    never holds the process past its stop deadline."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], None]) -> None:
        self._jobs.put(job)

    def stop(self) -> None:
        self._jobs.put(None)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job()  # jobs report their own errors; this is for what they did not expect
            except Exception:
                log.exception("a job of the %s worker failed", self._thread.name)


class Pipeline:
    """The ``prepare`` worker and the steps it runs; ``put`` hands results to the loop."""

    def __init__(
        self,
        store: StateStore,
        *,
        limits: BundleLimits,
        runtime: RuntimeConfig,
        profile: HostProfile,
        put: Callable[[Prepared | Removed], None],
    ) -> None:
        self._store = store
        self._limits = limits
        self._runtime = runtime
        self._profile = profile
        self._put = put
        self.worker = Worker("prepare")
        self.in_flight: dict[str, int] = {}  # bundle sha -> jobs queued or running

    def stop(self) -> None:
        self.worker.stop()  # a job still running is cut short at exit (see Worker)

    # -- what the worker works on --------------------------------------------------------------
    def busy(self, sha: str) -> None:
        """A job of the worker works on ``sha``'s files (see :meth:`done_with`)."""
        self.in_flight[sha] = self.in_flight.get(sha, 0) + 1

    def done_with(self, sha: str) -> None:
        left = self.in_flight.pop(sha, 1) - 1
        if left:
            self.in_flight[sha] = left

    def _submit(
        self,
        job: Job,
        stage: Stage,
        step: Callable[..., Path | None],
        *args: Any,
        transfer: Transfer | None = None,
    ) -> None:
        """Run ``step`` on the worker; its result comes back as a :class:`Prepared`."""
        self.busy(job.bundle_sha256)

        def run() -> None:
            path: Path | None = None
            error: EdgeAgentError | None = None
            try:
                path = step(*args)
            except EdgeAgentError as exc:
                error = exc
            except OSError as exc:
                error = StorageError(str(exc))
            except Exception as exc:  # a bug must fail the deployment, not leave it hanging
                log.exception("%s of %s", stage, job.name)
                error = unexpected(exc)
            self._put(
                Prepared(job.name, job.bundle_sha256, job.attempt, stage, path, error, transfer)
            )

        self.worker.submit(run)

    # -- the steps -----------------------------------------------------------------------------
    def open(self, job: Job, t: Transfer) -> None:
        """Read what is on disk for ``t`` already (a resumed part file, re-checked block by
        block; blocks of other bundles)."""
        self._submit(job, "opened", _open_transfer, t, transfer=t)

    def store(self, job: Job, t: Transfer) -> None:
        self._submit(job, "stored", self._check_and_store, t)

    def unpack(self, job: Job, bundle: Path, dest: Path, d: BundleDescriptor) -> None:
        self._submit(job, "unpacked", self._unpack, bundle, dest, d)

    def pause(self, t: Transfer) -> None:
        """Sync ``t``'s part file to disk and close it, on the worker."""
        self.worker.submit(t.pause)

    def local_blocks(self, block_size: int) -> BlockSource:
        """Blocks of stored bundles a new download may reuse (read while a transfer opens)."""
        try:
            return self._store.local_blocks(block_size)
        except (EdgeAgentError, OSError) as exc:
            log.warning("not reusing blocks of stored bundles: %s", exc)
            return {}

    def _check_and_store(self, t: Transfer) -> Path:
        """The bytes are the signed ones (each block was checked on arrival): check the archive
        and its members against the signed manifest, then move it to ``bundles/``."""
        d = t.descriptor
        t.finish()  # on disk before it counts as stored
        check_bundle(t.part_path, d, self._limits, bytes_checked=True)
        failpoint("verifying")
        stored = self._store.store_bundle(t.part_path, d.bundle_sha256, t.block_list)
        try:
            t.discard()
        except OSError as exc:
            log.warning("cannot remove %s: %s", t.dir, exc)
        return stored

    def _unpack(self, bundle: Path, dest: Path, d: BundleDescriptor) -> Path:
        # A stored bundle was checked against the descriptor it came with; this one may be
        # another for the same bytes (named again, or re-issued under a higher release), so its
        # manifest terms are checked again. A refusal is the descriptor's fault: the stored
        # bytes are the signed ones and stay.
        check_bundle_structure(bundle, d, self._limits)
        if dest.exists():  # left by a run that stopped before recording it
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            unpack_bundle(bundle, dest, manifest_sha256=d.manifest_sha256, limits=self._limits)
        except BadContentError:
            bundle.unlink(missing_ok=True)  # the stored copy is bad: fetch it again next time
            raise
        return dest

    # -- garbage -------------------------------------------------------------------------------
    def collect_garbage(
        self,
        rollouts: Mapping[str, ModelRollout],
        trials: Iterable[Trial],
        *,
        served: Callable[[str], Version | None],
        sources: Sequence[str],
    ) -> None:
        """Find what no record names (here, on the loop, where the state is whole) and have the
        worker remove it: an unpacked model of gigabytes takes a while to delete. ``served``:
        the version the slot layer serves for a model."""
        keep: set[str] = set()
        downloading: set[str] = set()
        for rollout in rollouts.values():
            if rollout.installed is not None:
                keep.add(rollout.installed.bundle_sha256)
                if rollout.installed.previous_sha256:
                    keep.add(rollout.installed.previous_sha256)
            if rollout.target is not None:
                sha = rollout.target.descriptor.bundle_sha256
                keep.add(sha)
                if rollout.transfer is not None or not self._store.bundle_path(sha).exists():
                    downloading.add(sha)  # a download in progress, or one to resume
            if rollout.loading is not None:  # with the slot layer (loading ... probation)
                keep.add(rollout.loading.bundle_sha256)
            version = served(rollout.name)
            if version is not None:  # what serves now (on probation: not committed yet)
                keep.add(version.candidate.bundle_sha256)
        for trial in trials:
            # Being tried, or refused for one document (another may name it again).
            keep.add(trial.bundle_sha256)
        try:
            found = self._store.garbage(
                keep,
                busy=self.in_flight,
                downloading=downloading,
                models=rollouts,
                sources=sources,
            )
        except (EdgeAgentError, OSError) as exc:
            log.warning("garbage collection: %s", exc)
            return
        if found:
            self.remove(found)

    def remove(self, found: Iterable[Path]) -> None:
        """Remove ``found`` on the worker; nothing may start on those bundles' files before they
        are gone (they are busy until the :class:`Removed` comes back)."""
        paths = list(found)
        shas = tuple(sorted({bundle_sha(p) for p in paths} - {""}))
        for sha in shas:
            self.busy(sha)

        def remove() -> None:
            try:
                for path in self._store.remove(paths):
                    log.debug("removed %s", path)
            finally:
                self._put(Removed(shas))

        self.worker.submit(remove)

    # -- load ----------------------------------------------------------------------------------
    def candidate(self, name: str, installed: InstalledModel) -> Candidate:
        """What the slot layer loads for an installed (unpacked, verified) bundle."""
        manifest = Manifest.from_bytes(
            (installed.path / MANIFEST_NAME).read_bytes(),
            max_bytes=self._limits.max_manifest_bytes,
        )
        backend = installed.backend
        variant_id = installed.variant
        if backend is None or variant_id is None:
            choice = hardware.choose(
                manifest, self._profile, self._runtime.policy, variant=variant_id
            )
            backend, variant_id = choice.backend, choice.variant_id
        return Candidate(
            name=name,
            version=installed.version,
            release=installed.release,
            bundle_sha256=installed.bundle_sha256,
            directory=installed.path,
            manifest=manifest,
            variant=manifest.variant(variant_id),
            backend=backend,
            settings=self._runtime.settings_for(backend),
        )

    def loadable(self, draft: InstalledModel) -> Candidate:
        """The candidate for ``draft``, once there is memory enough to load it (GPU or RAM)."""
        candidate = self.candidate(draft.model, draft)
        hardware.check_memory(
            candidate.variant, hardware.refresh_memory(self._profile), candidate.backend
        )
        return candidate


def _open_transfer(t: Transfer) -> None:
    t.open()  # its own errors are kept for start()
