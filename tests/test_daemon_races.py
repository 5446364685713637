"""Documents that change while a bundle is being checked, unpacked, loaded or watched.

The agent here has no broker (its session is never started): the test feeds documents to its
loop step by step (``handle`` and ``tick``, as ``run`` would) with the bundles already stored,
and holds the prepare worker with a gate job where the order of events matters.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import queue
import shutil
import threading
import time
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from agent.daemon import DeviceAgent
from agent.testing.fleet import TOPICS, WAIT, agent_config, deployment
from agent.testing.models import make_onnx
from agent.testing.wait import wait_until
from agent.transport.messages import Phase
from agent.transport.session import Incoming
from tests.conftest import Keys

DEVICE = "cam-01"


@contextmanager
def offline_agent(tmp_path: Path, keys: Keys) -> Iterator[DeviceAgent]:
    """An agent on ``tmp_path``/state whose session is never started; closed on exit."""
    nowhere = types.SimpleNamespace(host="127.0.0.1", port=1, certs=None)
    dev = DeviceAgent(agent_config(tmp_path / "state", keys.dir, nowhere, DEVICE))  # type: ignore[arg-type]
    try:
        yield dev
    finally:
        dev.pipeline.stop()
        dev.models.close()


@pytest.fixture
def device(tmp_path: Path, keys: Keys) -> Iterator[DeviceAgent]:
    with offline_agent(tmp_path, keys) as dev:
        yield dev


def stored(dev: DeviceAgent, tmp_path: Path, signed, version: str, seed: int) -> tuple[bytes, str]:  # type: ignore[no-untyped-def]
    """A signed bundle of ``tiny`` ``version``, already in the agent's bundles/."""
    path, envelope = signed(version, models=[make_onnx(tmp_path / f"m{seed}.onnx", seed=seed)])
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    shutil.copyfile(path, dev.store.bundle_path(sha))
    return envelope, sha


def publish(dev: DeviceAgent, keys: Keys, envelope: bytes, sequence: int) -> None:
    doc = deployment({"tiny": envelope}, keys.release, device=DEVICE, sequence=sequence)
    dev.handle(Incoming(TOPICS.device(DEVICE).desired, doc, True))


def gate(dev: DeviceAgent) -> threading.Event:
    """Hold the prepare worker until the event is set."""
    opened = threading.Event()
    dev.pipeline.worker.submit(lambda: opened.wait(WAIT) and None)
    return opened


def run_until(dev: DeviceAgent, done: Callable[[], bool], what: str) -> list[Phase]:
    """Drive the loop until ``done``; return the phases tiny went through."""
    phases: list[Phase] = []
    deadline = time.monotonic() + WAIT
    while not done():
        assert time.monotonic() < deadline, f"{what}: not reached; phases {phases}"
        with contextlib.suppress(queue.Empty):
            dev.handle(dev.inbox.get(timeout=0.05))
        dev.tick()
        slot = dev.rollouts.get("tiny")
        if slot is not None and (not phases or phases[-1] != slot.phase):
            phases.append(slot.phase)
    return phases


def runs(dev: DeviceAgent, version: str) -> Callable[[], bool]:
    def check() -> bool:
        slot = dev.rollouts["tiny"]
        return (
            slot.phase == Phase.ACTIVE
            and slot.installed is not None
            and slot.installed.version == version
            and slot.target is None
        )

    return check


def test_a_document_that_arrives_during_probation_is_deployed_after_it(
    device: DeviceAgent, tmp_path: Path, keys: Keys, signed
) -> None:  # type: ignore[no-untyped-def]
    e1, _ = stored(device, tmp_path, signed, "1.0.0", 1)
    e2, _ = stored(device, tmp_path, signed, "2.0.0", 2)
    publish(device, keys, e1, 1)
    run_until(
        device, lambda: device.rollouts["tiny"].phase == Phase.PROBATION, "1.0.0 on probation"
    )
    publish(device, keys, e2, 2)  # 1.0.0 is still on probation: 2.0.0 waits for it
    phases = run_until(device, runs(device, "2.0.0"), "2.0.0 active")
    assert device.report.error is None
    assert device.models.describe("tiny").version == "2.0.0"  # type: ignore[union-attr]
    # 1.0.0 committed on the way (it passed), and the phase said 2.0.0's the whole time.
    assert device.rollouts["tiny"].installed.previous_sha256 is not None  # type: ignore[union-attr]
    assert Phase.ACTIVE not in phases[:-1], phases


def test_a_b_a_while_a_is_unpacked_deploys_a_once(
    device: DeviceAgent, tmp_path: Path, keys: Keys, signed
) -> None:  # type: ignore[no-untyped-def]
    """A, then B, then A again while A's first unpack is queued: the stale unpack's result is
    dropped; A is unpacked and loaded once more, and nothing reports a failure."""
    ea, sha_a = stored(device, tmp_path, signed, "1.0.0", 1)
    eb, _ = stored(device, tmp_path, signed, "2.0.0", 2)
    opened = gate(device)
    publish(device, keys, ea, 1)
    assert device.rollouts["tiny"].phase == Phase.UNPACKING
    publish(device, keys, eb, 2)
    publish(device, keys, ea, 3)
    assert device.pipeline.in_flight[sha_a] == 1
    opened.set()
    phases = run_until(device, runs(device, "1.0.0"), "1.0.0 active")
    assert device.report.error is None
    assert device.rollouts["tiny"].error is None
    assert phases.count(Phase.LOADING) == 1, phases
    # What the worker still has is the removal of B's bundle, the garbage 1.0.0's commit left.
    run_until(device, lambda: not device.pipeline.in_flight, "the worker done")
    assert device.models.describe("tiny").version == "1.0.0"  # type: ignore[union-attr]


def test_garbage_collection_leaves_a_bundle_the_worker_still_has(
    device: DeviceAgent, tmp_path: Path, keys: Keys, signed
) -> None:  # type: ignore[no-untyped-def]
    ea, sha_a = stored(device, tmp_path, signed, "1.0.0", 1)
    eb, sha_b = stored(device, tmp_path, signed, "2.0.0", 2)
    opened = gate(device)
    publish(device, keys, ea, 1)  # A's unpack is queued behind the gate ...
    publish(device, keys, eb, 2)  # ... and no longer wanted
    device._collect_garbage()
    assert device.store.bundle_path(sha_a).exists(), "collected under the worker"
    opened.set()
    run_until(device, runs(device, "2.0.0"), "2.0.0 active")
    # Once the worker is done with it, the next collection (B's commit) takes it.
    # (The worker removes it: wait for the bundle and its unpacked copy to be gone.)
    unpacked = device.store.root / "models" / "tiny"

    def collected() -> bool:
        if device.store.bundle_path(sha_a).exists() or list(unpacked.glob(f"*{sha_a}*")):
            device._collect_garbage()
            return False
        return True

    wait_until(collected, WAIT, interval=0.05, message="A's bundle not collected")
    assert device.store.bundle_path(sha_b).exists()


def test_a_model_whose_restore_failed_is_reported_and_loaded_again(
    tmp_path: Path, keys: Keys, signed, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    with offline_agent(tmp_path, keys) as dev:
        e1, _ = stored(dev, tmp_path, signed, "1.0.0", 1)
        publish(dev, keys, e1, 1)
        run_until(dev, runs(dev, "1.0.0"), "1.0.0 active")
    # The unpacked model loses its weights (a bad sector): the restore fails ...
    installed = dev.rollouts["tiny"].installed
    assert installed is not None
    for onnx_file in installed.path.rglob("*.onnx"):
        onnx_file.write_bytes(b"not a model")
    with offline_agent(tmp_path, keys) as again:
        run_until(
            again,
            lambda: (
                again.models.describe("tiny") is not None
                and again.rollouts["tiny"].phase == Phase.ACTIVE
            ),
            "served again",
        )
        # The failed restore was said (not reported as active), then the stored bundle was
        # unpacked and loaded again.
        failed = [r for r in caplog.records if r.getMessage() == "tiny: failed"]
        assert failed, [r.getMessage() for r in caplog.records]
        assert failed[0].levelno == logging.WARNING
        assert again.rollouts["tiny"].error is None
