"""A power cut in any phase of a deployment: ``edge-agent run`` dies as ``kill -9`` kills it, and
is started again on what it left on disk.

Each case runs 1.0.0, deploys 2.0.0 to a process with one failpoint armed (agent._failpoints:
the process SIGKILLs itself at that point, so the phase is hit exactly, not raced for), checks
what the crash left, then restarts the agent unarmed: it must restore the committed version
(READY with a verified model), take the deployment up where the disk says it stood, finish it,
report it, serve 2.0.0 on its API, and leave no partial state behind. The kill in ``downloading``
is tests/test_transfer.py's resume test.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agent._failpoints import ENV, NAMES
from agent.serving.api import ApiSettings
from agent.state.store import StateStore
from agent.testing.broker import Broker
from agent.testing.fleet import (
    TOPICS,
    WAIT,
    active,
    agent_config,
    agent_process,
    bundle_server,
    deployment,
    infer_unix,
    two_versions,
    watcher,
    write_agent_toml,
)
from agent.testing.models import reference
from agent.testing.wait import wait_until
from tests.conftest import Keys


def _infer(sock: Path, x: np.ndarray) -> tuple[str, np.ndarray]:
    status, data = infer_unix(sock, x)
    assert status == 200, data
    out = data["outputs"][0]
    return data["model_version"], np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(WAIT) == 0


def _what_the_crash_left(state: Path, phase: str, v1: str, v2: str) -> None:
    """The disk as the phase left it: the cases differ, or they test the same thing."""
    store = StateStore(state)
    installed = store.load_installed()["tiny"]
    assert installed.bundle_sha256 == v1, "2.0.0 was recorded before it was committed"
    stored = (state / "bundles" / f"{v2}.emb").exists()
    unpacked = state / "models" / "tiny"
    partial = [p.name for p in unpacked.iterdir() if p.name.endswith(".unpack")]
    if phase == "verifying":
        assert not stored
        assert (state / "downloads" / v2).is_dir(), "the finished download is gone"
    else:
        assert stored
    if phase == "unpacking":
        assert partial, "no half-unpacked copy: the kill came after the unpack"
        assert not (unpacked / v2).exists()
    if phase in ("loading", "probation", "committing"):
        assert (unpacked / v2 / "manifest.json").is_file()
    if phase == "committing":  # the floor went first: 1.0.0 is below it now, and still runs
        floor = store.load_floors().release_floor["tiny"]
        assert floor > installed.release


@pytest.mark.parametrize("phase", ["verifying", "unpacking", "loading", "probation", "committing"])
def test_killed_in_a_phase_the_restarted_agent_serves_and_finishes(
    tmp_path: Path, broker: Broker, keys: Keys, signed, phase: str
) -> None:  # type: ignore[no-untyped-def]
    assert phase in NAMES
    two = two_versions(tmp_path, signed)
    served = two.served
    e1, e2 = two.envelopes["1.0.0"], two.envelopes["2.0.0"]
    v1, v2 = (hashlib.sha256(two.bundles[v].read_bytes()).hexdigest() for v in ("1.0.0", "2.0.0"))
    state = tmp_path / "cam-01"
    sock = tmp_path / "api.sock"
    config = agent_config(state, keys.dir, broker, "cam-01").model_copy(
        update={"api": ApiSettings(port=None, unix_socket=sock)}
    )
    toml = write_agent_toml(config, tmp_path / "agent.toml")
    log = tmp_path / "agent.log"
    desired = TOPICS.device("cam-01").desired
    x = np.random.default_rng(3).standard_normal((2, 16)).astype(np.float32)
    with watcher(broker) as fleet, bundle_server(broker, served):
        fleet.publish(desired, deployment({"tiny": e1}, keys.release, device="cam-01"))
        with agent_process(toml, log) as proc:
            fleet.wait("cam-01", active("tiny", "1.0.0"))
            _stop(proc)

        fleet.publish(desired, deployment({"tiny": e2}, keys.release, device="cam-01"))
        with agent_process(toml, log, env={ENV: phase}) as proc:
            code = proc.wait(WAIT)
        assert code == -signal.SIGKILL, log.read_text()[-3000:]
        assert f"failpoint {phase}" in log.read_text()
        _what_the_crash_left(state, phase, v1, v2)

        mark = log.stat().st_size
        with agent_process(toml, log) as proc:
            fleet.wait(
                "cam-01", active("tiny", "2.0.0"), what=f"2.0.0 active after a kill in {phase}"
            )
            restart = log.read_text()[mark:]
            assert "restored tiny: active" in restart, restart[-3000:]
            version, y = _infer(sock, x)
            assert version == "2.0.0"
            np.testing.assert_allclose(y, reference(two.models["2.0.0"], x), rtol=1e-5, atol=1e-5)
            _wait_clean(state, keep={v1, v2})
            _stop(proc)
    assert "Traceback" not in log.read_text()


def _wait_clean(state: Path, keep: set[str]) -> None:
    """No partial download, half-unpacked copy or unwanted bundle once garbage is collected."""

    def left() -> list[str]:
        return sorted(
            str(p.relative_to(state))
            for p in [
                *(state / "downloads").iterdir(),
                *(state / "models" / "tiny").iterdir(),
                *(state / "bundles").iterdir(),
            ]
            if p.name.split(".")[0] not in keep or p.name.endswith(".unpack")
        )

    wait_until(lambda: not left(), WAIT, interval=0.1, message=lambda: f"left behind: {left()}")


def test_an_unknown_failpoint_name_is_said() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import agent._failpoints"],
        capture_output=True,
        text=True,
        env={**os.environ, ENV: "unpacking,unpackin"},
        check=True,
    )
    assert "unknown failpoints ['unpackin']" in done.stderr
