"""Rollouts over forty simulated devices (the agent's protocol code, only the runtime simulated)
against a real mosquitto and a real bundle server; the controller is the real CLI, in a process.

Every device starts on tiny 1.0.0 from its group's document; 2.0.0 goes out in waves.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from agent.fleet.plan import _order
from agent.fleet.simulator_settings import LoadFailure
from agent.testing.broker import Broker
from agent.testing.fleet import (
    REPO,
    TOPICS,
    Watcher,
    active,
    bundle_server,
    deployment,
    failed,
    simulated,
    two_versions,
    watcher,
)
from agent.testing.wait import wait_until
from agent.transport.messages import Reported, RolloutState
from tests.conftest import Keys

GROUP = "hall"
DEVICES = 40
CANARY = 10  # --waves 25%,100%


def canaries(rollout: str, ids: list[str]) -> list[str]:
    """The first wave's devices: the planner orders devices by this hash."""
    return sorted(ids, key=lambda d: _order(rollout, d))[:CANARY]


@contextmanager
def hall(
    tmp_path: Path, broker: Broker, keys: Keys, signed: Callable[..., Any], **sim: Any
) -> Iterator[tuple[Watcher, Any, Path]]:
    """Forty simulated devices on 1.0.0; yields the fleet's view, the simulator and 2.0.0."""
    v = two_versions(tmp_path, signed)
    with ExitStack() as stack:
        stack.enter_context(bundle_server(broker, v.served))
        fleet = stack.enter_context(watcher(broker))
        devices = stack.enter_context(
            simulated(broker, keys, tmp_path / "sim", group=GROUP, devices=DEVICES, **sim)
        )
        fleet.publish(
            TOPICS.group_desired(GROUP),
            deployment({"tiny": v.envelopes["1.0.0"]}, keys.release, group=GROUP),
        )
        for d in devices.devices:
            fleet.wait(d.id, active("tiny", "1.0.0"), what="1.0.0 from the group")
        yield fleet, devices, v.bundles["2.0.0"]


def rollout(broker: Broker, keys: Keys, *args: str) -> list[str]:
    argv = [sys.executable, "-m", "agent.cli", "rollout", *args]
    if args[0] in ("start", "resume", "rollback"):
        argv += ["--key", str(keys.store.release_key_paths()[0])]
    return [*argv, "--broker", f"{broker.host}:{broker.port}", "--no-tls"]


def run(argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def state_of(fleet: Watcher, rollout_id: str) -> RolloutState:
    found = retained_state(fleet, rollout_id)
    assert found is not None, f"no state of {rollout_id}"
    return found


def retained_state(fleet: Watcher, rollout_id: str) -> RolloutState | None:
    topic = TOPICS.rollout(rollout_id, "state")
    fleet.session.unsubscribe(topic)
    fleet._drain(0.05)
    fleet.raw = [m for m in fleet.raw if m.topic != topic]
    fleet.session.subscribe(topic)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        fleet._drain(0.05)
        found = [m for m in fleet.raw if m.topic == topic]
        if found:
            return RolloutState.from_bytes(found[-1].payload)
    return None


def on(deployment_id: str) -> Callable[[Reported], bool]:
    return lambda r: r.deployment_id == deployment_id


def test_a_fifth_of_the_canaries_failing_halts_before_the_second_wave(
    tmp_path: Path, broker: Broker, keys: Keys, signed: Callable[..., Any]
) -> None:
    ids = [f"sim-{i:05d}" for i in range(DEVICES)]
    bad = canaries("ro-20", ids)[:2]  # 2 of the 10 canaries fail 2.0.0's self-test
    failure = LoadFailure(version="2.0.0", devices=frozenset(bad))
    with hall(tmp_path, broker, keys, signed, failures=[failure]) as (fleet, sim, v2):
        assert sorted(d.id for d in sim.devices) == ids
        done = run(
            rollout(
                broker, keys, "start", str(v2), "--group", GROUP, "--waves", "25%,100%",
                "--max-failures", "10%", "--wave-timeout", "60s", "--id", "ro-20",
                "--bundles", str(tmp_path / "served"),
            )
        )  # fmt: skip
        assert done.returncode == 4, done.stderr
        state = state_of(fleet, "ro-20")
        assert state.status == "halted"
        assert state.published == 1
        assert sorted((f.device, f.code) for f in state.failures) == [(d, "self-test") for d in bad]
        assert "2 of 10 devices failed (at most 1 may)" in (state.reason or "")
        for device in bad:
            fleet.wait(device, failed("tiny", "self-test"), what="the failed canary")
        for device in set(canaries("ro-20", ids)) - set(bad):
            fleet.wait(device, active("tiny", "2.0.0"), what="a canary on 2.0.0")
        for device in set(ids) - set(canaries("ro-20", ids)):  # the second wave: untouched
            r = fleet.wait(device, active("tiny", "1.0.0"), what="1.0.0 still")
            assert r.deployment_id != "ro-20"

        back = run(rollout(broker, keys, "rollback", "ro-20"))
        assert back.returncode == 0, back.stderr
        for device in canaries("ro-20", ids):
            r = fleet.wait(device, on("ro-20-rollback"), what="the rollback's document")
            r = fleet.wait(device, active("tiny", "1.0.0"), what="1.0.0 again")
            assert r.models["tiny"].release == 2_000_001  # above 2.0.0's: the floor only rose
        assert state_of(fleet, "ro-20").status == "rolled-back"


def test_a_soak_halts_a_version_whose_error_rate_is_worse(
    tmp_path: Path, broker: Broker, keys: Keys, signed: Callable[..., Any]
) -> None:
    metrics = {
        "1.0.0": {"rps": 20.0, "error_rate": 0.0, "p99_ms": 20.0},
        "2.0.0": {"rps": 20.0, "error_rate": 0.1, "p99_ms": 22.0},
    }
    with hall(tmp_path, broker, keys, signed, telemetry_interval_s=0.5, metrics=metrics) as (
        fleet,
        _sim,
        v2,
    ):
        done = run(
            rollout(
                broker, keys, "start", str(v2), "--group", GROUP, "--waves", "25%,100%",
                "--soak", "3s", "--id", "ro-soak", "--bundles", str(tmp_path / "served"),
            )
        )  # fmt: skip
        assert done.returncode == 4, done.stderr
        state = state_of(fleet, "ro-soak")
        assert state.status == "halted"
        assert state.published == 1
        assert not state.failures, "every canary is active: the telemetry halted it"
        assert "error rate above the old version's" in (state.reason or "")


def test_an_operator_pauses_a_running_rollout_and_resumes_it(
    tmp_path: Path, broker: Broker, keys: Keys, signed: Callable[..., Any]
) -> None:
    metrics = {v: {"rps": 20.0, "error_rate": 0.0, "p99_ms": 20.0} for v in ("1.0.0", "2.0.0")}
    with hall(tmp_path, broker, keys, signed, telemetry_interval_s=0.5, metrics=metrics) as (
        fleet,
        _sim,
        v2,
    ):
        argv = rollout(
            broker, keys, "start", str(v2), "--group", GROUP, "--waves", "25%,100%",
            "--soak", "8s", "--id", "ro-p", "--bundles", str(tmp_path / "served"),
        )  # fmt: skip
        log = tmp_path / "controller.log"
        with log.open("w") as out:
            controller = subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=out)
        try:

            def soaking() -> RolloutState | None:  # the canaries' soak has begun
                st = retained_state(fleet, "ro-p")
                return st if st is not None and st.soak_started is not None else None

            st = wait_until(soaking, 30, interval=0, message=log.read_text)
            paused = run(rollout(broker, keys, "pause", "ro-p"))
            assert paused.returncode == 0, paused.stderr
            assert "pause taken by" in paused.stdout
            # Past the end of the soak: a paused rollout starts no wave.
            assert st.soak_started is not None
            while (datetime.now(timezone.utc) - st.soak_started).total_seconds() < 9:
                time.sleep(0.2)
            state = state_of(fleet, "ro-p")
            assert state.status == "paused"
            assert state.published == 1
            resumed = run(rollout(broker, keys, "resume", "ro-p"))
            assert resumed.returncode == 0, resumed.stderr
            assert "resumed by" in resumed.stdout
            assert controller.wait(60) == 0, log.read_text()
        finally:
            if controller.poll() is None:
                controller.kill()
                controller.wait(10)
        assert state_of(fleet, "ro-p").status == "done"
        for i in range(DEVICES):
            fleet.wait(f"sim-{i:05d}", active("tiny", "2.0.0"), what="2.0.0 everywhere")
