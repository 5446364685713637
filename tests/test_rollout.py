"""``edge-fleet rollout`` against a real mosquitto and real device agents.

Three ``edge-agent run`` processes follow group ``lobby`` and run tiny 1.0.0 from the group's
document. A rollout of
2.0.0 goes out in waves (a canary, then the rest) through the real CLI in a process of its
own, so that it can be killed as ``kill -9`` kills it; the fleet's view is a separate session.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pytest

from agent.fleet.keys import KeyStore
from agent.fleet.plan import parse_waves
from agent.testing.broker import Broker
from agent.testing.fleet import (
    REPO,
    TOPICS,
    Watcher,
    active,
    agent_config,
    agent_process,
    bundle_server,
    deployment,
    downloading_past,
    two_versions,
    watcher,
    write_agent_toml,
)
from agent.transport.messages import RolloutPlan, RolloutState
from tests.conftest import Keys

DEVICES = ("cam-a", "cam-b", "cam-c")
GROUP = "lobby"


@dataclass
class Fleet:
    tmp: Path
    broker: Broker
    keys: Keys
    watch: Watcher
    served: Path
    bundles: dict[str, Path]
    envelopes: dict[str, bytes]

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(*args), capture_output=True, text=True, timeout=timeout, cwd=REPO
        )

    def argv(self, *args: str) -> list[str]:
        broker = ["--broker", f"{self.broker.host}:{self.broker.port}", "--no-tls"]
        signed = []
        if args[0] in ("start", "resume", "rollback"):
            # The trust comes from the key's own directory (keys init's layout).
            signed = ["--key", str(self.keys.store.release_key_paths()[0])]
        if args[0] == "start":
            signed += ["--bundles", str(self.served)]
        return [sys.executable, "-m", "agent.cli", "rollout", *args, *signed, *broker]

    def retained(self, rollout: str) -> tuple[RolloutPlan, RolloutState]:
        plan = self.fetch(TOPICS.rollout(rollout, "plan"))
        state = self.fetch(TOPICS.rollout(rollout, "state"))
        assert plan is not None, f"no plan of {rollout} on the broker"
        assert state is not None, f"no state of {rollout} on the broker"
        return RolloutPlan.from_bytes(plan), RolloutState.from_bytes(state)

    def fetch(self, topic: str, timeout: float = 5.0) -> bytes | None:
        """What is retained on ``topic`` now (subscribed afresh); None if nothing."""
        self.watch.session.unsubscribe(topic)
        self.watch._drain(0.05)
        self.watch.raw = [m for m in self.watch.raw if m.topic != topic]
        self.watch.session.subscribe(topic)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.watch._drain(0.05)
            found = [m for m in self.watch.raw if m.topic == topic]
            if found:
                return found[-1].payload
        return None

    def desired_sha(self, device: str) -> str | None:
        """The SHA-256 of the retained document on the device's own topic (None: none)."""
        found = self.fetch(TOPICS.device(device).desired, timeout=2.0)
        return hashlib.sha256(found).hexdigest() if found else None


@pytest.fixture
def fleet(request, tmp_path: Path, broker: Broker, keys: Keys, signed) -> Iterator[Fleet]:  # type: ignore[no-untyped-def]
    rate = getattr(request, "param", 256 << 20)  # the bundle server's bytes/s per device
    two = two_versions(tmp_path, signed)
    with ExitStack() as stack:
        stack.enter_context(bundle_server(broker, two.served, rate_bytes_s=rate))
        watch = stack.enter_context(watcher(broker))
        for device in DEVICES:  # each a real `edge-agent run` process
            config = agent_config(tmp_path / device, keys.dir, broker, device, groups=(GROUP,))
            toml = write_agent_toml(config, tmp_path / f"{device}.toml")
            stack.enter_context(agent_process(toml, tmp_path / f"{device}.log"))
        watch.publish(
            TOPICS.group_desired(GROUP),
            deployment({"tiny": two.envelopes["1.0.0"]}, keys.release, group=GROUP),
        )
        for device in DEVICES:
            watch.wait(device, active("tiny", "1.0.0"), what="1.0.0 from the group")
        yield Fleet(tmp_path, broker, keys, watch, two.served, two.bundles, two.envelopes)


def test_a_rollout_in_waves_then_a_rollback_in_one_command(fleet: Fleet) -> None:
    done = fleet.cli(
        "start", str(fleet.bundles["2.0.0"]), "--group", GROUP, "--waves", "1,100%",
        "--wave-timeout", "60s", "--id", "ro-1",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "wave 1/2: publishing to 1 device(s)" in done.stderr
    assert "wave 2/2: publishing to 2 device(s)" in done.stderr
    for device in DEVICES:
        r = fleet.watch.wait(device, active("tiny", "2.0.0"), what="2.0.0 from the rollout")
        assert r.deployment_id == "ro-1"
    plan, state = fleet.retained("ro-1")
    assert state.status == "done"
    assert state.owner is None
    assert [len(w) for w in plan.waves] == [1, 2]
    assert {p.version for p in plan.prior["tiny"]} == {"1.0.0"}

    back = fleet.cli("rollback", "ro-1")
    assert back.returncode == 0, back.stderr
    for device in DEVICES:
        r = fleet.watch.wait(device, active("tiny", "1.0.0"), what="1.0.0 again")
        # 1.0.0's bytes, under a release above 2.0.0's: the floor only ever rose.
        assert r.models["tiny"].release == 2_000_001
        assert r.deployment_id == "ro-1-rollback"
    _, state = fleet.retained("ro-1")
    assert state.status == "rolled-back"
    assert not state.failures
    status = fleet.cli("status", "ro-1", "--json")
    assert status.returncode == 0
    assert json.loads(status.stdout)["status"] == "rolled-back"


def test_a_failing_canary_halts_before_the_second_wave(fleet: Fleet, signed) -> None:  # type: ignore[no-untyped-def]
    # More memory than any box has: every device refuses to load it (insufficient-memory).
    bad, _ = signed("3.0.0", min_memory_mb=10**8)
    halted = fleet.cli(
        "start", str(bad), "--group", GROUP, "--waves", "1,100%", "--wave-timeout", "60s",
        "--id", "ro-bad",
    )  # fmt: skip
    assert halted.returncode == 4, halted.stderr
    _, state = fleet.retained("ro-bad")
    assert state.status == "halted"
    assert state.published == 1
    assert [f.code for f in state.failures] == ["insufficient-memory"]
    canary = state.failures[0].device
    assert canary in (state.reason or "")
    # The canary still serves 1.0.0 (its slot says failed, for 3.0.0).
    r = fleet.watch.wait(canary, lambda r: r.models["tiny"].version == "1.0.0", what="1.0.0")
    assert r.models["tiny"].error is not None
    assert r.models["tiny"].error.code == "insufficient-memory"
    for device in set(DEVICES) - {canary}:
        # Never reached: still on the group's document, and nothing on its own topic.
        r = fleet.watch.wait(device, active("tiny", "1.0.0"), what="1.0.0 still")
        assert r.deployment_id != "ro-bad"
        assert fleet.desired_sha(device) is None
    status = fleet.cli("status", "ro-bad")
    assert status.returncode == 4
    assert "insufficient-memory" in status.stdout
    assert canary in status.stdout

    # Another rollout over the same devices is refused while this one is unfinished.
    clash = fleet.cli("start", str(fleet.bundles["2.0.0"]), "--group", GROUP, "--id", "ro-other")
    assert clash.returncode == 2, clash.stderr
    assert "rollout ro-bad drives" in clash.stderr

    # Rolled back: the canary returns to 1.0.0; the rest were never touched.
    back = fleet.cli("rollback", "ro-bad")
    assert back.returncode == 0, back.stderr
    r = fleet.watch.wait(canary, lambda r: r.deployment_id == "ro-bad-rollback", what="back")
    assert r.models["tiny"].version == "1.0.0"
    assert fleet.retained("ro-bad")[1].rollback is not None
    assert fleet.retained("ro-bad")[1].rollback.devices == [canary]  # type: ignore[union-attr]


@pytest.mark.parametrize("fleet", [4096], indirect=True)  # 4 KiB/s per device: slow
def test_a_controller_killed_mid_wave_carries_on_where_it_was(fleet: Fleet) -> None:
    argv = fleet.argv(
        "start", str(fleet.bundles["2.0.0"]), "--group", GROUP, "--waves", "1,100%",
        "--wave-timeout", "120s", "--id", "ro-k",
    )  # fmt: skip
    log = fleet.tmp / "controller.log"
    with log.open("w") as out:
        proc = subprocess.Popen(argv, cwd=REPO, stderr=out, stdout=out)
    try:
        plan, _ = fleet.retained("ro-k")
        canary = plan.waves[0][0]
        fleet.watch.wait(canary, downloading_past("tiny", 0), what="the canary downloading")
        before = fleet.desired_sha(canary)
        assert before is not None
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    except AssertionError:
        proc.kill()
        proc.wait(10)
        raise AssertionError(log.read_text()) from None
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
    state = fleet.retained("ro-k")[1]
    assert (state.status, state.wave, state.published) == ("running", 0, 1)
    assert state.owner is not None, "killed: it could not let go of the rollout"

    # No controller drives it now: an operator's pause changes the state at once.
    paused = fleet.cli("pause", "ro-k")
    assert paused.returncode == 0, paused.stderr
    assert fleet.retained("ro-k")[1].status == "paused"
    # Resumed (taking over from the dead controller): the wave goes on, then the next one.
    resumed = fleet.cli("resume", "ro-k")
    assert resumed.returncode == 0, resumed.stderr
    for device in DEVICES:
        fleet.watch.wait(device, active("tiny", "2.0.0"), what="2.0.0 after resume")
    assert fleet.retained("ro-k")[1].status == "done"
    # The canary's document was published again with the same bytes, or not at all.
    assert fleet.desired_sha(canary) == before


def test_waves_from_counts_and_percentages() -> None:
    assert parse_waves("1,10%,50%,100%", 1000) == [1, 100, 500, 1000]
    assert parse_waves("1,10%,50%,100%", 3) == [1, 2, 3]  # 10% of 3 rounds up to 1: merged
    assert parse_waves("2,100%", 1) == [1]


def _deploy(fleet: Fleet, *args: str) -> subprocess.CompletedProcess[str]:
    broker = ["--broker", f"{fleet.broker.host}:{fleet.broker.port}", "--no-tls"]
    argv = [sys.executable, "-m", "agent.cli", "deploy", *args, "--bundles", str(fleet.served)]
    return subprocess.run([*argv, *broker], capture_output=True, text=True, timeout=120, cwd=REPO)


def test_deploy_wait_sees_a_refusal_at_once(fleet: Fleet) -> None:
    # Another fleet's keys: its own trust vouches for them, the devices' does not.
    rogue = KeyStore.init(fleet.tmp / "rogue", now=datetime.now(timezone.utc))
    bundle = fleet.tmp / "rogue-2.0.0.emb"
    shutil.copyfile(fleet.bundles["2.0.0"], bundle)  # (its own .dsse: signed by the rogue)
    refused = _deploy(
        fleet, str(bundle), "--device", "cam-a", "--key", str(rogue.release_key_paths()[0]),
        "--wait", "300",
    )  # fmt: skip
    # 1 (refused), not 3 (the wait ran out): the refusal was seen as it came.
    assert refused.returncode == 1, refused.stderr
    assert "cam-a refused the deployment (untrusted-key)" in refused.stderr


def test_deploy_to_a_group_waits_for_every_member(fleet: Fleet) -> None:
    key = str(fleet.keys.store.release_key_paths()[0])
    done = _deploy(
        fleet, str(fleet.bundles["2.0.0"]), "--group", GROUP, "--key", key, "--wait", "120"
    )
    assert done.returncode == 0, done.stderr
    assert "group lobby: 3 active" in done.stderr
    for device in DEVICES:  # all of them, by the time the command returned
        view = fleet.watch.view.devices[device]
        fleet.watch._drain(0.1)
        assert view.reported is not None
        assert view.reported.models["tiny"].version == "2.0.0"
