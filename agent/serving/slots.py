"""Model slots: load a candidate beside the active model, self-test it, swap, watch, commit or roll back.

One :class:`Slot` per model name. Requests take a *lease* on the slot's active version
(:meth:`SlotManager.lease`); the swap replaces the active pointer under the slot's lock, so every
request runs start to end on exactly one version, and the old version is closed only once its
last lease has ended (or after ``drain_timeout_s``).

A deployment of a new version runs on a worker thread of its own (``slot-<name>``), while the
active version keeps serving:

    loading -> warming -> self-testing -> (swap) -> probation -> active
         \\          \\            \\                     \\-> rolled-back (the last good version
          `----------`------------`-> failed                   is loaded again and swapped back)

A load that raises, hangs past ``load_timeout_s`` or fails its self-test never touches the active
version. Phase changes go to the ``on_phase`` callback (called on the worker thread: the daemon
passes one that only queues them for its own loop).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout  # not the builtin before 3.11
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

from agent._failpoints import failpoint
from agent._lazy import lazy_module
from agent.bundle.manifest import Manifest, TensorSpec, Variant
from agent.errors import (
    BadContentError,
    EdgeAgentError,
    LoadTimeoutError,
    ProbationError,
    SelfTestError,
    ToolError,
    unexpected,
)
from agent.runtime.base import BackendSettings, LoadedModel, get_backend
from agent.values import Phase

if TYPE_CHECKING:
    import numpy as np
else:
    np = lazy_module("numpy")  # imported on first use: an idle daemon does without

log = logging.getLogger("agent.serving")

# Requests on each side before p99s are compared: fewer, and one slow request is the p99.
LATENCY_SAMPLES = 200

PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "openvino": "openvino", "litert": "litert"}


class SlotSettings(BaseModel):
    """The ``[serving]`` table of agent.toml (swap and probation)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    load_timeout_s: Annotated[float, Field(gt=0)] = 900.0  # a TensorRT engine build takes minutes
    drain_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    probation_s: Annotated[float, Field(ge=0)] = 60.0
    probation_min_requests: Annotated[int, Field(ge=1)] = 20  # fewer: judged on what came
    max_error_rate: Annotated[float, Field(ge=0, le=1)] = 0.05
    max_p99_ms: Annotated[float, Field(gt=0)] | None = None  # an absolute bound, if any
    # The new version's p99 against the one it replaced (when that one served enough requests).
    max_p99_ratio: Annotated[float, Field(gt=1)] | None = 3.0

    @field_validator("max_p99_ms", "max_p99_ratio", mode="before")
    @classmethod
    def _off(cls, value: object) -> object:
        """TOML has no null: ``false`` turns a latency check off."""
        return None if value is False else value


@dataclass(frozen=True)
class Candidate:
    """What to load: an unpacked, verified bundle and the variant and backend chosen for it."""

    name: str
    version: str
    # The release it was deployed under: the signed descriptor's, which a re-issue raises
    # above the manifest's.
    release: int
    bundle_sha256: str
    directory: Path  # the unpacked bundle
    manifest: Manifest
    variant: Variant
    backend: str
    settings: BackendSettings


class _Stats:
    """Outcomes and latencies of one version's requests (any thread; own lock)."""

    def __init__(self, keep: int = 4096) -> None:
        self._lock = threading.Lock()
        self.requests = 0
        self.errors = 0
        self._latencies: deque[float] = deque(maxlen=keep)

    def record(self, seconds: float, ok: bool) -> None:
        with self._lock:
            self.requests += 1
            self.errors += 0 if ok else 1
            self._latencies.append(seconds)

    def snapshot(self) -> tuple[int, int, float | None]:
        with self._lock:
            lat = sorted(self._latencies)
            p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else None
            return self.requests, self.errors, p99


class Version:
    """One loaded version of a model; what a lease hands to a request (the API's ServedModel)."""

    def __init__(self, candidate: Candidate, loaded: LoadedModel) -> None:
        self.candidate = candidate
        self.loaded = loaded
        self.name = candidate.name
        self.version = candidate.version
        self.platform = PLATFORMS.get(candidate.backend, candidate.backend)
        self.runtime = loaded.runtime
        self.inputs: list[TensorSpec] = list(loaded.inputs)
        self.outputs: list[TensorSpec] = list(loaded.outputs)
        self.stats = _Stats()
        self.leases = 0
        self.retired = False
        self.closed = threading.Event()
        # The drain thread and the last lease may both close a retired version: once only.
        self._close_lock = threading.Lock()

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one request; its outcome counts for probation unless it was the client's fault.

        A BadContentError (FormatError, InputShapeError, ...) says the request was wrong: it is
        not recorded at all, neither as an error nor as a request, so that a client sending
        bad input can neither fail a good version nor dilute a bad version's error rate.
        """
        start = time.perf_counter()
        try:
            result = self.loaded.infer(inputs)
        except BadContentError:
            raise
        except BaseException:
            self.stats.record(time.perf_counter() - start, False)
            raise
        self.stats.record(time.perf_counter() - start, True)
        return result

    def close(self) -> None:
        with self._close_lock:
            if self.closed.is_set():
                return
            try:
                self.loaded.close()
            except Exception:  # a runtime failing to free must not take the slot down
                log.exception("closing %s %s", self.name, self.version)
            self.closed.set()


@dataclass
class Slot:
    name: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    active: Version | None = None
    last_good: Candidate | None = None  # what a rollback loads again
    job: Future[Phase] | None = None
    removed: bool = False  # no longer the manager's: a version its job loads is closed at once


PhaseCallback = Callable[[str, Phase, "EdgeAgentError | None", float | None], None]
# (model, bundle sha256, why): a version failed its probation. Called on the slot's worker
# thread before the last good version is swapped back in; it may block until the verdict is
# recorded (the daemon's waits for its loop to write it to disk).
VerdictCallback = Callable[[str, str, EdgeAgentError], None]


class SlotManager:
    """Every model slot of the box; implements the API's ``ModelSource``."""

    def __init__(
        self,
        settings: SlotSettings | None = None,
        *,
        on_phase: PhaseCallback | None = None,
        on_swap: Callable[[str, str, bool], None] | None = None,
        on_verdict: VerdictCallback | None = None,
    ) -> None:
        self.settings = settings or SlotSettings()
        self._slots: dict[str, Slot] = {}
        self._lock = threading.Lock()
        self._on_phase = on_phase or (lambda *_: None)
        self._on_swap = on_swap or (lambda *_: None)
        self._on_verdict = on_verdict or (lambda *_: None)
        self._closed = False

    # -- the API's ModelSource --------------------------------------------------------------
    def names(self) -> list[str]:
        with self._lock:
            return sorted(n for n, s in self._slots.items() if s.active is not None)

    def ready(self, name: str) -> bool:
        slot = self._slot(name)
        return slot is not None and slot.active is not None

    def describe(self, name: str) -> Version | None:
        slot = self._slot(name)
        return None if slot is None else slot.active

    @contextlib.contextmanager
    def lease(self, name: str) -> Iterator[Version | None]:
        """Pin the active version of ``name`` for one request."""
        slot = self._slot(name)
        if slot is None:
            yield None
            return
        with slot.lock:
            version = slot.active
            if version is not None:
                version.leases += 1
        try:
            yield version
        finally:
            if version is not None:
                with slot.lock:
                    version.leases -= 1
                    done = version.retired and version.leases == 0
                if done:
                    version.close()

    def _slot(self, name: str) -> Slot | None:
        with self._lock:
            return self._slots.get(name)

    # -- deployments ----------------------------------------------------------------------
    def deploy(self, candidate: Candidate) -> Future[Phase]:
        """Load ``candidate`` beside the active version and swap it in; returns the final phase."""
        future: Future[Phase] = Future()
        with self._lock:
            slot = self._claim(candidate.name, future)
        thread = threading.Thread(
            target=self._run,
            args=(slot, candidate, future),
            name=f"slot-{candidate.name}",
            daemon=True,
        )
        thread.start()
        return future

    def restore(self, candidate: Candidate) -> Future[Phase]:
        """Serve a version that was committed before (at start-up): load and warm it, no
        self-test, no probation. Phases go to ``on_phase`` as for :meth:`deploy`."""
        future: Future[Phase] = Future()
        with self._lock:
            slot = self._claim(candidate.name, future)

        def run() -> None:
            try:
                version = self._prepare(candidate, self_test=False)
            except Exception as exc:
                err = unexpected(exc)
                log.error("%s %s cannot be served: %s", candidate.name, candidate.version, err)
                self._phase(candidate.name, Phase.FAILED, err)
                future.set_result(Phase.FAILED)
                return
            if not self._swap(slot, version):
                self._phase(candidate.name, Phase.FAILED, _removed(candidate))
                future.set_result(Phase.FAILED)
                return
            slot.last_good = candidate
            self._phase(candidate.name, Phase.ACTIVE)
            future.set_result(Phase.ACTIVE)

        threading.Thread(target=run, name=f"slot-{candidate.name}", daemon=True).start()
        return future

    def _claim(self, name: str, job: Future[Phase]) -> Slot:
        """The slot of ``name`` with ``job`` as its deployment (under ``self._lock``)."""
        if self._closed:
            raise ToolError(f"cannot deploy {name}: the slot manager is closed")
        slot = self._slots.setdefault(name, Slot(name))
        if slot.job is not None and not slot.job.done():
            raise ToolError(f"{name} is being deployed already")
        slot.job = job
        return slot

    def busy(self, name: str) -> bool:
        """A deployment of ``name`` is under way (a new one must wait for it)."""
        slot = self._slot(name)
        return slot is not None and slot.job is not None and not slot.job.done()

    def remove(self, name: str) -> None:
        """Stop serving ``name``; its version closes once its last request ends."""
        with self._lock:
            slot = self._slots.pop(name, None)
        if slot is None:
            return
        with slot.lock:
            old, slot.active = slot.active, None
            slot.removed = True
        if old is not None:
            self._retire(slot, old)

    def close(self) -> None:
        """Stop serving every model; deployments still loading close what they load."""
        with self._lock:
            self._closed = True
            names = list(self._slots)
        for name in names:
            self.remove(name)

    def _phase(
        self,
        name: str,
        phase: Phase,
        error: EdgeAgentError | None = None,
        progress: float | None = None,
    ) -> None:
        try:
            self._on_phase(name, phase, error, progress)
        except Exception:
            log.exception("phase callback")

    def _run(self, slot: Slot, candidate: Candidate, future: Future[Phase]) -> None:
        """The worker thread of one deployment."""
        try:
            version = self._prepare(candidate)
        except EdgeAgentError as exc:
            log.error("%s %s not loaded: %s", candidate.name, candidate.version, exc)
            self._phase(candidate.name, Phase.FAILED, exc)
            future.set_result(Phase.FAILED)
            return
        except Exception as exc:  # a runtime's own exception: the active version stays
            log.exception("%s %s not loaded", candidate.name, candidate.version)
            err = unexpected(exc)
            self._phase(candidate.name, Phase.FAILED, err)
            future.set_result(Phase.FAILED)
            return
        previous = slot.last_good
        with slot.lock:
            replaced = slot.active
        baseline = replaced.stats.snapshot() if replaced is not None else None
        if not self._swap(slot, version):
            self._phase(candidate.name, Phase.FAILED, _removed(candidate))
            future.set_result(Phase.FAILED)
            return
        self._phase(candidate.name, Phase.PROBATION)
        failpoint("probation")
        steady = baseline[2] if baseline is not None and baseline[0] >= LATENCY_SAMPLES else None
        problem = self._probation(version, steady)
        if problem is None:
            slot.last_good = candidate
            self._on_swap(candidate.name, candidate.version, False)
            self._phase(candidate.name, Phase.ACTIVE)
            future.set_result(Phase.ACTIVE)
            return
        log.error("%s %s failed probation: %s", candidate.name, candidate.version, problem)
        error = ProbationError(problem)
        # The verdict is recorded before anything is swapped back, so that a restart at any
        # later instant knows this version failed and does not try it again.
        self._verdict(candidate, error)
        failpoint("rolling-back")
        self._rollback(slot, version, previous, error)
        future.set_result(Phase.ROLLED_BACK)

    def _verdict(self, candidate: Candidate, error: EdgeAgentError) -> None:
        try:
            self._on_verdict(candidate.name, candidate.bundle_sha256, error)
        except Exception:
            log.exception("verdict callback")

    def _prepare(self, candidate: Candidate, *, self_test: bool = True) -> Version:
        self._phase(candidate.name, Phase.LOADING)
        loaded = self._load_with_timeout(candidate)
        if self_test:  # a new version's load (not a restore or a rollback's)
            failpoint("loading")
        try:
            self._phase(candidate.name, Phase.WARMING)
            loaded.warm_up(lambda p: self._phase(candidate.name, Phase.WARMING, None, p))
            version = Version(candidate, loaded)
            if self_test:
                self._phase(candidate.name, Phase.SELF_TESTING)
                self_test_version(version, candidate)
        except BaseException:
            loaded.close()
            raise
        return version

    def _load_with_timeout(self, candidate: Candidate) -> LoadedModel:
        """Load on a thread of its own; a load that hangs is abandoned (its thread is a daemon)."""
        result: Future[LoadedModel] = Future()

        def load() -> None:
            try:
                backend = get_backend(candidate.backend)
                result.set_result(
                    backend.load(candidate.directory, candidate.variant, candidate.settings)
                )
            except BaseException as exc:
                result.set_exception(exc)

        threading.Thread(target=load, name=f"load-{candidate.name}", daemon=True).start()
        try:
            return result.result(timeout=self.settings.load_timeout_s)
        except FutureTimeout:
            # The runtime cannot be interrupted; when it returns at last, close what it made.
            def close_late(f: Future[LoadedModel]) -> None:
                if f.exception() is None:
                    f.result().close()

            result.add_done_callback(close_late)
            raise LoadTimeoutError(
                f"loading {candidate.name} {candidate.version} took more than "
                f"{self.settings.load_timeout_s:.0f} s"
            ) from None

    def _swap(self, slot: Slot, version: Version) -> bool:
        """Make ``version`` the active one; False (and ``version`` closed) if the slot is gone."""
        with slot.lock:
            removed = slot.removed
            if not removed:
                old, slot.active = slot.active, version
        if removed:  # removed (or the manager closed) while this version loaded
            log.info("%s was removed: closing %s unused", slot.name, version.version)
            version.close()
            return False
        log.info(
            "%s now serves %s (%s)%s",
            slot.name,
            version.version,
            version.runtime,
            f", was {old.version}" if old else "",
        )
        if old is not None:
            self._retire(slot, old)
        return True

    def _retire(self, slot: Slot, old: Version) -> None:
        """Close ``old`` once its in-flight requests end (bounded by the drain timeout)."""
        with slot.lock:
            old.retired = True
            idle = old.leases == 0
        if idle:
            old.close()
            return

        def drain() -> None:
            if not old.closed.wait(self.settings.drain_timeout_s):
                log.warning(
                    "%s %s: requests still running after the drain timeout", old.name, old.version
                )
                old.close()

        threading.Thread(target=drain, name=f"drain-{old.name}", daemon=True).start()

    def _probation(self, version: Version, steady_p99: float | None) -> str | None:
        """Watch the new version; the reason to roll back, or None to commit."""
        s = self.settings
        deadline = time.monotonic() + s.probation_s
        while time.monotonic() < deadline:
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
            problem = self._judge(version, steady_p99, final=False)
            if problem is not None:
                return problem
        return self._judge(version, steady_p99, final=True)

    def _judge(self, version: Version, steady_p99: float | None, *, final: bool) -> str | None:
        s = self.settings
        requests, errors, p99 = version.stats.snapshot()
        enough = requests >= s.probation_min_requests
        if requests and (enough or final) and errors / requests > s.max_error_rate:
            return (
                f"{errors} of {requests} requests failed "
                f"({100 * errors / requests:.0f}% > {100 * s.max_error_rate:.0f}%)"
            )
        if s.max_p99_ms is not None and p99 is not None and enough and p99 * 1000 > s.max_p99_ms:
            return f"p99 latency {p99 * 1000:.1f} ms > {s.max_p99_ms:.1f} ms"
        if (
            s.max_p99_ratio is not None
            and steady_p99
            and p99 is not None
            and requests >= LATENCY_SAMPLES
            and final
            and p99 > s.max_p99_ratio * steady_p99
        ):
            return (
                f"p99 latency {p99 * 1000:.1f} ms is {p99 / steady_p99:.1f}x the replaced "
                f"version's {steady_p99 * 1000:.1f} ms (limit {s.max_p99_ratio:g}x)"
            )
        return None

    def _rollback(
        self, slot: Slot, failed: Version, previous: Candidate | None, error: ProbationError
    ) -> None:
        why = str(error)
        if previous is None:
            # Nothing to go back to: keep serving the new version rather than nothing.
            log.error(
                "%s: no earlier version to roll back to; keeping %s", slot.name, failed.version
            )
            self._phase(slot.name, Phase.FAILED, error)
            return
        try:
            restored = self._prepare(previous, self_test=False)
        except Exception as exc:
            log.exception("%s: rolling back to %s failed", slot.name, previous.version)
            self._phase(slot.name, Phase.FAILED, ProbationError(f"{why}; rollback failed: {exc}"))
            return
        if not self._swap(slot, restored):
            return
        failpoint("rolled-back")
        self._on_swap(slot.name, previous.version, True)
        self._phase(slot.name, Phase.ROLLED_BACK, error)


def _removed(candidate: Candidate) -> ToolError:
    return ToolError(f"{candidate.name} was removed while {candidate.version} loaded")


def self_test_version(version: Version, candidate: Candidate) -> None:
    """Run the bundle's samples; SelfTestError unless every output is within tolerance."""
    samples = candidate.manifest.samples
    if samples is None:
        return
    tol = candidate.variant.tolerance
    for case in samples.cases:
        inputs = {k: _npy(candidate.directory / p) for k, p in case.inputs.items()}
        try:
            got = version.loaded.infer(inputs)
        except EdgeAgentError as exc:
            raise SelfTestError(f"sample {case.name}: {exc}") from None
        for tensor, path in case.outputs.items():
            want = _npy(candidate.directory / path)
            have = got.get(tensor)
            if have is None:
                raise SelfTestError(f"sample {case.name}: no output {tensor!r}")
            if have.shape != want.shape or not np.allclose(
                have.astype(np.float64), want.astype(np.float64), atol=tol.atol, rtol=tol.rtol
            ):
                diff = (
                    float(np.max(np.abs(have.astype(np.float64) - want.astype(np.float64))))
                    if have.shape == want.shape
                    else float("nan")
                )
                raise SelfTestError(
                    f"sample {case.name}: output {tensor!r} differs from the reference "
                    f"(max |error| {diff:.3g}; tolerance atol {tol.atol:g}, rtol {tol.rtol:g})"
                )


def _npy(path: Path) -> np.ndarray:
    try:
        value: np.ndarray = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise SelfTestError(f"cannot read sample {path.name}: {exc}") from None
    return value
