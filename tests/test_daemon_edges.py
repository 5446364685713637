"""Edges of the device agent's loop, without a broker (as tests/test_daemon_races.py drives it):
what the slot layer still holds is never collected, a restore cut short still lets the agent say
READY, a state directory that refuses to write does not stop it, a failing job does not stop its
worker, a handed-back device does not run a group document that no longer holds.
"""

from __future__ import annotations

import hashlib
import threading
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from agent.daemon import DeviceAgent
from agent.device.transfer import Transfer
from agent.runtime.base import get_backend
from agent.serving.slots import SlotSettings
from agent.testing.fleet import TOPICS, WAIT, agent_config, deployment, hand_back
from agent.testing.models import make_onnx
from agent.transport.messages import Phase
from agent.transport.session import Incoming
from tests.conftest import Keys
from tests.test_daemon_races import DEVICE, publish, run_until, runs, stored


@contextmanager
def offline(tmp_path: Path, keys: Keys, **update: object) -> Iterator[DeviceAgent]:
    nowhere = types.SimpleNamespace(host="127.0.0.1", port=1, certs=None)
    config = agent_config(tmp_path / "state", keys.dir, nowhere, DEVICE, groups=("lobby",))  # type: ignore[arg-type]
    dev = DeviceAgent(config.model_copy(update=update))
    try:
        yield dev
    finally:
        dev.pipeline.stop()
        dev.models.close()


def test_what_is_on_probation_is_not_collected_when_the_document_moves_on(
    tmp_path: Path, keys: Keys, signed
) -> None:  # type: ignore[no-untyped-def]
    with offline(tmp_path, keys) as dev:
        e1, _ = stored(dev, tmp_path, signed, "1.0.0", 1)
        publish(dev, keys, e1, 1)
        run_until(dev, runs(dev, "1.0.0"), "1.0.0 active")
        run_until(dev, lambda: not dev.pipeline.in_flight, "1.0.0's garbage collected")
        e2, sha2 = stored(dev, tmp_path, signed, "2.0.0", 2)
        e3, _ = stored(dev, tmp_path, signed, "3.0.0", 3)
        # 2.0.0's probation lasts: long enough for the document to move on meanwhile.
        dev.models.settings = SlotSettings(probation_s=30.0, max_p99_ratio=None)
        publish(dev, keys, e2, 2)
        run_until(dev, lambda: dev.rollouts["tiny"].phase == Phase.PROBATION, "2.0.0 on probation")
        publish(dev, keys, e3, 3)  # the target moves on; 2.0.0 is still on probation
        assert dev.rollouts["tiny"].loading is not None
        dev._collect_garbage()
        run_until(dev, lambda: not dev.pipeline.in_flight, "the worker done")
        assert dev.store.bundle_path(sha2).exists()
        assert dev.store.model_dir("tiny", sha2).is_dir()
        served = dev.models.describe("tiny")
        assert served is not None
        assert served.version == "2.0.0"


def test_a_restore_cut_short_by_a_removal_lets_the_agent_be_ready(
    tmp_path: Path, keys: Keys, signed, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """Two models restored; the stored document names one: the other, still loading (held
    here: a real load cannot be made slow on demand), is removed, and READY does not wait."""
    with offline(tmp_path, keys) as dev:
        a, _ = stored(dev, tmp_path, signed, "1.0.0", 1)
        path, b = signed("1.0.0", name="other", models=[make_onnx(tmp_path / "o.onnx", seed=5)])
        dev.store.bundle_path(hashlib.sha256(path.read_bytes()).hexdigest()).write_bytes(
            path.read_bytes()
        )
        both = deployment({"tiny": a, "other": b}, keys.release, device=DEVICE, sequence=1)
        dev.handle(Incoming(TOPICS.device(DEVICE).desired, both, True))
        run_until(
            dev,
            lambda: runs(dev, "1.0.0")() and dev.rollouts["other"].phase == Phase.ACTIVE,
            "both",
        )
    only = deployment({"tiny": a}, keys.release, device=DEVICE, sequence=2)
    backend = get_backend("onnxruntime")
    real_load = backend.load
    release = threading.Event()

    def held(directory: Path, variant: object, settings: object) -> object:
        if "other" in str(directory):
            release.wait(WAIT)
        return real_load(directory, variant, settings)  # type: ignore[arg-type]

    monkeypatch.setattr(backend, "load", held)
    from agent.state.store import StateStore

    StateStore(tmp_path / "state").save_desired("device", only)
    with offline(tmp_path, keys) as again:
        assert again._restoring == {"tiny", "other"}
        try:
            run_until(again, lambda: "other" not in again.rollouts, "other removed")
            assert not again._restoring, "READY would wait for a model that is gone"
        finally:
            release.set()
        run_until(again, lambda: again.models.describe("other") is None, "other not served")
        assert again.models.describe("tiny") is not None


def test_a_state_directory_that_refuses_event_numbers_does_not_stop_the_agent(
    tmp_path: Path, keys: Keys
) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "events.seq").mkdir()  # unreadable as a file: the disk refuses
    with offline(tmp_path, keys) as dev:
        first = dev.report.outbox.event_seq
        dev.handle(Incoming(TOPICS.device(DEVICE).desired, b"garbage", False))
        assert dev.report.outbox.event_seq == first + 1
        assert dev.report.error is not None
        assert dev.report.error.code == "format"


def test_a_job_that_fails_does_not_stop_the_worker(tmp_path: Path, keys: Keys) -> None:
    with offline(tmp_path, keys) as dev:
        ran = threading.Event()
        dev.pipeline.worker.submit(lambda: 1 / 0)  # type: ignore[func-returns-value]
        dev.pipeline.worker.submit(ran.set)
        assert ran.wait(WAIT)


def test_an_open_that_raises_fails_the_deployment_and_the_loop_goes_on(
    tmp_path: Path, keys: Keys, signed, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """(The failure is injected: open() raising what it does not expect is a bug's doing.)"""
    _, envelope = signed("1.0.0")

    def broken(self: Transfer) -> None:
        raise ValueError("a bug in open()")

    monkeypatch.setattr(Transfer, "open", broken)
    with offline(tmp_path, keys) as dev:
        publish(dev, keys, envelope, 1)
        run_until(dev, lambda: dev.rollouts["tiny"].phase == Phase.FAILED, "failed")
        assert dev.rollouts["tiny"].error is not None
        assert dev.rollouts["tiny"].error.code == "tool"
        dev.tick()


def test_a_group_document_below_the_floor_is_not_run_after_a_hand_back(
    tmp_path: Path, keys: Keys, signed
) -> None:  # type: ignore[no-untyped-def]
    """The lobby's document (1.0.0) was accepted long ago; the device's own (2.0.0) committed
    since. Handed back, the device verifies the lobby's again: below the floor, it is refused,
    and 2.0.0 keeps serving."""
    with offline(tmp_path, keys) as dev:
        e1, _ = stored(dev, tmp_path, signed, "1.0.0", 1)
        group = deployment({"tiny": e1}, keys.release, group="lobby", sequence=1)
        dev.handle(Incoming(TOPICS.group_desired("lobby"), group, True))
        run_until(dev, runs(dev, "1.0.0"), "the lobby's 1.0.0")
        run_until(dev, lambda: not dev.pipeline.in_flight, "1.0.0's garbage collected")
        e2, _ = stored(dev, tmp_path, signed, "2.0.0", 2)
        publish(dev, keys, e2, 5)
        run_until(dev, runs(dev, "2.0.0"), "its own 2.0.0")
        back = hand_back(keys.release, DEVICE, sequence=6)
        dev.handle(Incoming(TOPICS.device(DEVICE).desired, back, True))  # verified at once
        dev.tick()
        assert dev.report.error is not None
        assert dev.report.error.code == "rollback"
        assert "group-lobby" not in dev.documents
        served = dev.models.describe("tiny")
        assert served is not None
        assert served.version == "2.0.0"
