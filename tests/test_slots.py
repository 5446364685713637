"""Model slots on real ONNX Runtime sessions: swap under load, failed loads, probation rollback.

Bundles are built and unpacked by the tests (tiny models from tests/models.py). Where a failure
cannot be produced by a real model on this machine (a runtime that raises or hangs inside its
load call), the backend's ``load`` is wrapped for that test only, and the test says so.
"""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from agent.errors import FormatError, InputShapeError, ToolError
from agent.runtime.base import get_backend
from agent.serving.slots import Candidate, SlotManager, SlotSettings, Version
from agent.testing.models import (
    make_batch_of_one,
    make_onnx,
    make_two_inputs,
    reference,
    slot_candidate,
)
from agent.transport.messages import Phase

# Latency is not judged here: on a shared test machine a p99 says more about the neighbours.
FAST = SlotSettings(
    probation_s=0.3,
    probation_min_requests=5,
    drain_timeout_s=5,
    load_timeout_s=30,
    max_p99_ratio=None,
)


class Phases:
    def __init__(self) -> None:
        self.seen: list[tuple[str, Phase, str | None]] = []
        self._lock = threading.Lock()

    def __call__(self, name: str, phase: Phase, error: object, progress: float | None) -> None:
        with self._lock:
            self.seen.append((name, phase, getattr(error, "code", None)))

    def phases(self, name: str) -> list[Phase]:
        """The phases in order; progress reports within one phase count once."""
        with self._lock:
            found = [p for n, p, _ in self.seen if n == name]
        return [p for i, p in enumerate(found) if i == 0 or found[i - 1] != p]

    def last_error(self, name: str) -> str | None:
        with self._lock:
            return next((c for n, _, c in reversed(self.seen) if n == name and c), None)


@pytest.fixture
def candidate(tmp_path: Path) -> Callable[..., Candidate]:
    """candidate(version, model=None, seed=1) -> a Candidate from a built and unpacked bundle."""

    def make(version: str, model: Path | None = None, seed: int = 1) -> Candidate:
        model = model or make_onnx(tmp_path / f"m-{version}.onnx", seed=seed)
        return slot_candidate(model, tmp_path, version=version)

    return make


@pytest.fixture
def slots() -> Iterator[tuple[SlotManager, Phases]]:
    phases = Phases()
    manager = SlotManager(FAST, on_phase=phases)
    yield manager, phases
    manager.close()


def _infer(manager: SlotManager, x: np.ndarray) -> tuple[str, np.ndarray]:
    with manager.lease("tiny") as version:
        assert version is not None
        return version.version, version.infer({"x": x})["y"]


def test_deploy_serves_the_model(slots, candidate) -> None:  # type: ignore[no-untyped-def]
    manager, phases = slots
    v1 = candidate("1.0.0")
    assert manager.deploy(v1).result(timeout=30) == Phase.ACTIVE
    x = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    version, y = _infer(manager, x)
    assert version == "1.0.0"
    np.testing.assert_allclose(
        y, reference(v1.directory / v1.variant.entrypoint, x), rtol=1e-5, atol=1e-5
    )
    assert phases.phases("tiny") == [
        Phase.LOADING,
        Phase.WARMING,
        Phase.SELF_TESTING,
        Phase.PROBATION,
        Phase.ACTIVE,
    ]
    assert manager.names() == ["tiny"]


def test_swap_under_a_request_stream_fails_no_request(slots, candidate) -> None:  # type: ignore[no-untyped-def]
    """Every response comes from exactly one version: its output is that version's reference."""
    manager, _ = slots
    v1, v2 = candidate("1.0.0", seed=1), candidate("2.0.0", seed=2)
    manager.deploy(v1).result(timeout=30)
    x = np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32)
    want = {
        "1.0.0": reference(v1.directory / v1.variant.entrypoint, x),
        "2.0.0": reference(v2.directory / v2.variant.entrypoint, x),
    }
    assert not np.allclose(want["1.0.0"], want["2.0.0"])
    stop = threading.Event()
    results: list[tuple[str, bool]] = []
    failures: list[BaseException] = []

    def client() -> None:
        for _ in range(100_000):
            if stop.is_set():
                return
            try:
                version, y = _infer(manager, x)
            except BaseException as exc:
                failures.append(exc)
                return
            results.append((version, bool(np.allclose(y, want[version], rtol=1e-5, atol=1e-5))))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        assert manager.deploy(v2).result(timeout=30) == Phase.ACTIVE
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert failures == []
    assert all(ok for _, ok in results), "a response did not match its version's model"
    versions = {v for v, _ in results}
    assert versions == {"1.0.0", "2.0.0"}, "the stream ran across the swap"
    assert _infer(manager, x)[0] == "2.0.0", "once swapped, requests go to the new version"


def _assert_untouched(manager: SlotManager) -> None:
    x = np.ones((1, 16), dtype=np.float32)
    version, _ = _infer(manager, x)
    assert version == "1.0.0"


def test_failed_self_test_leaves_the_active_model(slots, candidate) -> None:  # type: ignore[no-untyped-def]
    manager, phases = slots
    v1 = candidate("1.0.0", seed=1)
    manager.deploy(v1).result(timeout=30)
    v2 = candidate("2.0.0", seed=2)
    # The expected outputs of v2's samples replaced by v1's: v2's model cannot match them.
    assert v2.manifest.samples is not None
    for case in v2.manifest.samples.cases:
        for path in case.outputs.values():
            shutil.copyfile(v1.directory / path, v2.directory / path)
    assert manager.deploy(v2).result(timeout=30) == Phase.FAILED
    assert phases.last_error("tiny") == "self-test"
    assert Phase.PROBATION not in phases.phases("tiny")[5:]
    _assert_untouched(manager)


def test_exception_at_load_leaves_the_active_model(
    slots, candidate, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """The runtime raising inside its load call is injected (a real model that loads on this
    machine cannot be made to raise there on demand)."""
    manager, phases = slots
    manager.deploy(candidate("1.0.0")).result(timeout=30)
    backend = get_backend("onnxruntime")

    def explode(*args: object, **kw: object) -> object:
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(backend, "load", explode)
    assert manager.deploy(candidate("2.0.0", seed=2)).result(timeout=30) == Phase.FAILED
    assert phases.last_error("tiny") == "tool"
    monkeypatch.undo()
    _assert_untouched(manager)


def test_hang_at_load_times_out_and_leaves_the_active_model(
    candidate, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """A load that never returns is injected (a TensorRT build that hangs cannot run here)."""
    phases = Phases()
    manager = SlotManager(FAST.model_copy(update={"load_timeout_s": 0.5}), on_phase=phases)
    try:
        manager.deploy(candidate("1.0.0")).result(timeout=30)
        backend = get_backend("onnxruntime")
        real_load = backend.load
        release = threading.Event()

        def hang(*args: object, **kw: object) -> object:
            release.wait(30)
            return real_load(*args, **kw)  # type: ignore[arg-type]

        monkeypatch.setattr(backend, "load", hang)
        assert manager.deploy(candidate("2.0.0", seed=2)).result(timeout=30) == Phase.FAILED
        assert phases.last_error("tiny") == "load-timeout"
        _assert_untouched(manager)
        release.set()
    finally:
        manager.close()


def test_probation_failure_rolls_back_to_the_last_good_model(candidate, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # A long window: the verdict comes as soon as enough requests failed, however slow the box.
    phases = Phases()
    manager = SlotManager(FAST.model_copy(update={"probation_s": 20.0}), on_phase=phases)
    try:
        _probation_rollback(manager, phases, candidate, tmp_path)
    finally:
        manager.close()


def _probation_rollback(manager: SlotManager, phases: Phases, candidate, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # The running version as after a restart: committed before, served without a probation.
    assert manager.restore(candidate("1.0.0")).result(timeout=30) == Phase.ACTIVE
    bad = candidate("2.0.0", model=make_batch_of_one(tmp_path / "one-row.onnx"))
    x = np.ones((2, 16), dtype=np.float32)
    stop = threading.Event()
    outcomes: list[str] = []

    def traffic() -> None:
        for _ in range(100_000):
            if stop.is_set():
                return
            try:
                version, _ = _infer(manager, x)
                outcomes.append(version)
            except Exception as exc:
                outcomes.append(type(exc).__name__)

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        assert manager.deploy(bad).result(timeout=60) == Phase.ROLLED_BACK
    finally:
        stop.set()
        thread.join(10)
    assert phases.last_error("tiny") == "probation"
    assert phases.phases("tiny")[-1] == Phase.ROLLED_BACK
    _assert_untouched(manager)
    assert "ToolError" in outcomes, "the new version failed the stream's batches"


# -- the slot layer's own races ------------------------------------------------------------------
class _SlowToClose:
    """A loaded model whose close takes a while: two closers overlap inside it."""

    runtime = "stand-in"

    def __init__(self) -> None:
        self.inputs: list[object] = []
        self.outputs: list[object] = []
        self.closes = 0
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self.closes += 1
        time.sleep(0.2)


def test_a_retired_version_frees_its_model_once(candidate) -> None:  # type: ignore[no-untyped-def]
    """The drain thread and the last lease both close a retired version; the runtime is freed
    once. (A stand-in model: the overlap needs a close that takes time.)"""
    loaded = _SlowToClose()
    version = Version(candidate("1.0.0"), loaded)  # type: ignore[arg-type]
    start = threading.Barrier(2)

    def closer() -> None:
        start.wait(5)
        version.close()

    threads = [threading.Thread(target=closer) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert version.closed.is_set()
    assert loaded.closes == 1


@contextlib.contextmanager
def _held_load(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[threading.Event, list[object]]]:
    """Loads wait for the event; the models they made are listed. (Injected: a real load cannot
    be held at will.)"""
    backend = get_backend("onnxruntime")
    real_load = backend.load
    release = threading.Event()
    made: list[object] = []

    def held(*args: object, **kw: object) -> object:
        release.wait(30)
        model = real_load(*args, **kw)  # type: ignore[arg-type]
        made.append(model)
        return model

    monkeypatch.setattr(backend, "load", held)
    try:
        yield release, made
    finally:
        release.set()


def test_restore_waits_its_turn_behind_a_deployment(
    slots, candidate, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    manager, _ = slots
    v1, v2 = candidate("1.0.0"), candidate("2.0.0", seed=2)
    with _held_load(monkeypatch) as (release, _):
        job = manager.deploy(v2)
        with pytest.raises(ToolError, match="being deployed already"):
            manager.restore(v1)
        release.set()
        assert job.result(timeout=30) == Phase.ACTIVE
    version, _ = _infer(manager, np.ones((1, 16), dtype=np.float32))
    assert version == "2.0.0"


@pytest.mark.parametrize("how", ["remove", "close"])
def test_a_model_removed_while_it_loads_is_freed_not_served(
    candidate, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:  # type: ignore[no-untyped-def]
    phases = Phases()
    manager = SlotManager(FAST, on_phase=phases)
    try:
        with _held_load(monkeypatch) as (release, made):
            job = manager.deploy(candidate("1.0.0"))
            manager.remove("tiny") if how == "remove" else manager.close()
            release.set()
            assert job.result(timeout=30) == Phase.FAILED
        assert manager.names() == []
        assert manager.describe("tiny") is None
        assert len(made) == 1
        assert made[0]._closed  # type: ignore[attr-defined]
        if how == "close":
            with pytest.raises(ToolError, match="closed"):
                manager.deploy(candidate("2.0.0", seed=2))
    finally:
        manager.close()


# -- client errors and probation -------------------------------------------------------------

MISMATCHED = {"x": np.ones((2, 4), np.float32), "y": np.ones((3, 4), np.float32)}
CONSISTENT = {"x": np.ones((2, 4), np.float32), "y": np.ones((2, 4), np.float32)}


def _pair(tmp_path: Path, version: str) -> Candidate:
    """z = x + y, x and y [N, 4] sharing the symbolic batch N (tests/models.py)."""
    model = make_two_inputs(tmp_path / f"pair-{version}.onnx")
    return slot_candidate(model, tmp_path, version=version, name="pair")


def test_a_client_error_is_not_counted_for_probation(slots, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    manager, _ = slots
    assert manager.restore(_pair(tmp_path, "1.0.0")).result(timeout=30) == Phase.ACTIVE
    with manager.lease("pair") as version:
        assert version is not None
        with pytest.raises(InputShapeError, match="disagree on dimension 'N'"):
            version.infer(MISMATCHED)
        with pytest.raises(FormatError, match="is FP64"):
            version.infer({"x": np.ones((1, 4)), "y": np.ones((1, 4), np.float32)})
        assert version.stats.snapshot() == (0, 0, None)  # neither an error nor a request
        np.testing.assert_array_equal(version.infer(CONSISTENT)["z"], np.full((2, 4), 2.0))
        requests, errors, _ = version.stats.snapshot()
        assert (requests, errors) == (1, 0)


def _stream(manager: SlotManager, name: str, feeds: list[dict[str, np.ndarray]]):  # type: ignore[no-untyped-def]
    """Run ``feeds`` round and round on ``name`` on a thread: (stop event, thread, outcomes),
    each outcome (version, exception type name or "ok")."""
    stop = threading.Event()
    outcomes: list[tuple[str, str]] = []

    def run() -> None:
        for i in range(1_000_000):
            if stop.is_set():
                return
            with manager.lease(name) as version:
                assert version is not None
                try:
                    version.infer(feeds[i % len(feeds)])
                    outcomes.append((version.version, "ok"))
                except Exception as exc:
                    outcomes.append((version.version, type(exc).__name__))

    thread = threading.Thread(target=run)
    thread.start()
    return stop, thread, outcomes


def test_a_stream_of_bad_requests_does_not_roll_back_a_good_version(tmp_path: Path) -> None:
    """An application sending mismatched batches all through a good release's probation: the
    release stays, its probation counted none of them."""
    phases = Phases()
    manager = SlotManager(FAST.model_copy(update={"probation_s": 1.0}), on_phase=phases)
    try:
        assert manager.restore(_pair(tmp_path, "1.0.0")).result(timeout=30) == Phase.ACTIVE
        stop, thread, outcomes = _stream(manager, "pair", [MISMATCHED])
        try:
            assert manager.deploy(_pair(tmp_path, "2.0.0")).result(timeout=60) == Phase.ACTIVE
        finally:
            stop.set()
            thread.join(10)
        on_new = [kind for version, kind in outcomes if version == "2.0.0"]
        assert len(on_new) >= FAST.probation_min_requests
        assert set(on_new) == {"InputShapeError"}
        assert phases.phases("pair")[-1] == Phase.ACTIVE
        assert phases.last_error("pair") is None
        served = manager.describe("pair")
        assert served is not None
        assert served.version == "2.0.0"
        assert served.stats.snapshot()[:2] == (0, 0)
    finally:
        manager.close()


def test_client_errors_do_not_hide_a_failing_version(candidate, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Twenty wrong-shape requests for each batch the new version fails on: counted as
    requests, they would put its error rate under 5% and keep it; they are not counted."""
    phases = Phases()
    manager = SlotManager(FAST.model_copy(update={"probation_s": 20.0}), on_phase=phases)
    try:
        assert manager.restore(candidate("1.0.0")).result(timeout=30) == Phase.ACTIVE
        bad = candidate("2.0.0", model=make_batch_of_one(tmp_path / "one-row.onnx"))
        wrong = {"x": np.ones((2, 15), np.float32)}  # the client's mistake
        feeds = [wrong] * 20 + [{"x": np.ones((2, 16), np.float32)}]  # then the model's failure
        stop, thread, outcomes = _stream(manager, "tiny", feeds)
        try:
            assert manager.deploy(bad).result(timeout=60) == Phase.ROLLED_BACK
        finally:
            stop.set()
            thread.join(10)
        kinds = {kind for version, kind in outcomes if version == "2.0.0"}
        assert kinds == {"InputShapeError", "ToolError"}
        assert phases.last_error("tiny") == "probation"
    finally:
        manager.close()
