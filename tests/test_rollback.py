"""A rollback sticks: a version that failed its probation does not come back after a restart.

1.1.0 serves; 1.2.0 passes its self-test (one-row samples) and fails every request with a
batch above one. Deployed under such traffic, probation rolls it back. ``edge-agent run`` is
killed as ``kill -9`` kills it at each moment around that rollback (agent._failpoints, or a
SIGKILL from the test once the rollback is reported) and started again with no traffic at all:
it must serve 1.1.0, report 1.2.0 rolled back for that deployment, never load 1.2.0 again for
it, and keep the release floor at 1.1.0's. A new document naming 1.2.0 tries it again.
"""

from __future__ import annotations

import http.client
import re
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from agent._failpoints import ENV
from agent.serving.api import ApiSettings
from agent.serving.slots import SlotSettings
from agent.state.store import StateStore
from agent.testing.broker import Broker
from agent.testing.fleet import (
    TOPICS,
    WAIT,
    Watcher,
    active,
    agent_config,
    agent_process,
    bundle_server,
    deployment,
    failed,
    infer_unix,
    watcher,
    write_agent_toml,
)
from agent.testing.models import make_batch_of_one, make_onnx
from agent.transport.messages import Event, Phase, Reported
from tests.conftest import Keys

DEVICE = "cam-01"
DESIRED = TOPICS.device(DEVICE).desired
Check = Callable[[Reported], bool]


@dataclass
class Box:
    toml: Path
    log: Path
    sock: Path
    state: Path
    good: bytes  # tiny 1.1.0's descriptor envelope
    bad: bytes  # tiny 1.2.0's
    broker: Broker | None = None


@pytest.fixture
def box(tmp_path: Path, keys: Keys, signed) -> Box:  # type: ignore[no-untyped-def]
    served = tmp_path / "served"
    served.mkdir()
    envelopes = {}
    for version, model in (
        ("1.1.0", make_onnx(tmp_path / "good.onnx", seed=1)),
        ("1.2.0", make_batch_of_one(tmp_path / "one-row.onnx")),
    ):
        path, envelopes[version] = signed(version, models=[model], block_size=4096)
        (served / path.name).write_bytes(path.read_bytes())
    state = tmp_path / "state"
    sock = tmp_path / "api.sock"
    return Box(
        toml=tmp_path / "agent.toml",
        log=tmp_path / "agent.log",
        sock=sock,
        state=state,
        good=envelopes["1.1.0"],
        bad=envelopes["1.2.0"],
    )


def _write_toml(box: Box, keys: Keys, broker: Broker, probation_s: float = 30.0) -> None:
    # A long window: the verdict comes once enough requests failed, however slow the box.
    config = agent_config(box.state, keys.dir, broker, DEVICE).model_copy(
        update={
            "api": ApiSettings(port=None, unix_socket=box.sock),
            "serving": SlotSettings(
                probation_s=probation_s, probation_min_requests=5, max_p99_ratio=None
            ),
        }
    )
    write_agent_toml(config, box.toml)
    box.broker = broker


def _infer(sock: Path, rows: int) -> tuple[int, str | None]:
    status, data = infer_unix(sock, np.ones((rows, 16), dtype=np.float32))
    return status, data.get("model_version")


class Traffic:
    """Batches of two, one after another, until stopped (bounded); what each got."""

    def __init__(self, sock: Path) -> None:
        self.sock = sock
        self.stop = threading.Event()
        self.statuses: list[int] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        for _ in range(20_000):
            if self.stop.is_set():
                return
            try:
                status, _ = _infer(self.sock, 2)
            except (OSError, http.client.HTTPException, ValueError):
                # The agent died (a failpoint), or is not listening yet.
                time.sleep(0.02)
                continue
            self.statuses.append(status)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self._thread.join(WAIT)


def on_probation(version: str, fallback: str | None, since: float = 0.0) -> Check:
    def check(r: Reported) -> bool:
        m = r.models.get("tiny")
        return (
            r.at.timestamp() >= since
            and m is not None
            and m.phase == Phase.PROBATION
            and m.version == version
            and (m.fallback.version if m.fallback else None) == fallback
        )

    return check


def rolled_back_to(version: str, since: float = 0.0) -> Check:
    def check(r: Reported) -> bool:
        m = r.models.get("tiny")
        return (
            r.at.timestamp() >= since
            and m is not None
            and m.phase == Phase.ROLLED_BACK
            and m.version == version
            and m.runtime is not None  # it serves (not only restored on paper)
            and m.error is not None
            and m.error.code == "probation"
        )

    return check


def _first_run(box: Box, keys: Keys, fleet: Watcher) -> None:
    """1.1.0 deployed and committed (a short probation); the agent stopped cleanly."""
    assert box.broker is not None
    _write_toml(box, keys, box.broker, probation_s=0.2)
    fleet.publish(DESIRED, deployment({"tiny": box.good}, keys.release, device=DEVICE, sequence=1))
    with agent_process(box.toml, box.log) as proc:
        fleet.wait(DEVICE, active("tiny", "1.1.0"))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(WAIT) == 0
    _write_toml(box, keys, box.broker)


def _events_since(fleet: Watcher, t0: float) -> list[Event]:
    fleet._drain(0.2)
    return [e for e in fleet.events if e.at.timestamp() >= t0]


def _restarted_serves_the_last_good(box: Box, keys: Keys, fleet: Watcher) -> None:
    """Started again with no traffic: 1.1.0 serves, 1.2.0 stays rolled back, the floor holds."""
    t0 = time.time()
    mark = box.log.stat().st_size
    with agent_process(box.toml, box.log) as proc:
        reported = fleet.wait(
            DEVICE, rolled_back_to("1.1.0", since=t0), what="1.2.0 still rolled back"
        )
        assert reported.models["tiny"].fallback is None
        assert _infer(box.sock, 2) == (200, "1.1.0")
        # Longer than the agent needs to restore 1.1.0 and hand 1.2.0 to the slot layer: it
        # must not. (With no traffic a probation would have nothing to judge.)
        time.sleep(3.0)
        loads = [e for e in _events_since(fleet, t0) if e.phase in (Phase.LOADING, Phase.PROBATION)]
        assert loads == [], [e.model_dump(mode="json") for e in loads]
        assert _infer(box.sock, 2) == (200, "1.1.0")
        assert "restored tiny: active" in box.log.read_text()[mark:]
        store = StateStore(box.state)
        assert store.load_floors().release_floor["tiny"] == store.load_installed()["tiny"].release
        assert store.load_installed()["tiny"].version == "1.1.0"
        trial = store.load_trials()["tiny"]
        assert trial.version == "1.2.0"
        assert trial.verdict is not None
        assert trial.verdict.code == "probation"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(WAIT) == 0


@pytest.mark.parametrize("moment", ["rolling-back", "rolled-back", "reported"])
def test_killed_around_a_rollback_the_restarted_agent_keeps_the_last_good_version(
    tmp_path: Path, broker: Broker, keys: Keys, box: Box, moment: str
) -> None:
    _write_toml(box, keys, broker)
    with watcher(broker) as fleet, bundle_server(broker, tmp_path / "served"):
        _first_run(box, keys, fleet)
        fleet.publish(
            DESIRED, deployment({"tiny": box.bad}, keys.release, device=DEVICE, sequence=2)
        )
        env = {ENV: moment} if moment != "reported" else {}
        with agent_process(box.toml, box.log, env=env) as proc:
            # What serves during the probation: the new version, and what it would fall back to.
            fleet.wait(DEVICE, on_probation("1.2.0", "1.1.0"), what="1.2.0 on probation")
            assert _infer(box.sock, 1) == (200, "1.2.0")
            with Traffic(box.sock) as traffic:
                if moment == "reported":
                    fleet.wait(DEVICE, rolled_back_to("1.1.0"), what="rolled back")
                    proc.send_signal(signal.SIGKILL)
                code = proc.wait(WAIT)
            assert code == -signal.SIGKILL, box.log.read_text()[-3000:]
            assert 500 in traffic.statuses
        if moment != "reported":
            assert f"failpoint {moment}" in box.log.read_text()
        _restarted_serves_the_last_good(box, keys, fleet)

        # A new document naming 1.2.0 is a new attempt (and fails under traffic again).
        fleet.publish(
            DESIRED, deployment({"tiny": box.bad}, keys.release, device=DEVICE, sequence=3)
        )
        t1 = time.time()
        with agent_process(box.toml, box.log) as proc:
            fleet.wait(DEVICE, on_probation("1.2.0", "1.1.0", since=t1), what="1.2.0 tried again")
            with Traffic(box.sock):
                fleet.wait(DEVICE, rolled_back_to("1.1.0", since=t1), what="rolled back again")
            # And 1.1.0 itself can still be named (the floor is its release).
            fleet.publish(
                DESIRED, deployment({"tiny": box.good}, keys.release, device=DEVICE, sequence=4)
            )
            fleet.wait(DEVICE, active("tiny", "1.1.0"), what="1.1.0 named again")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(WAIT) == 0
    # (The broken version's failures are logged with their tracebacks; the agent's own code
    # raised nothing.)
    assert re.search(r'agent/(daemon|device/\w+)\.py", line', box.log.read_text()) is None


def test_killed_on_probation_before_a_verdict_the_version_is_tried_again(
    tmp_path: Path, broker: Broker, keys: Keys, box: Box
) -> None:
    """No verdict reached the disk: the restarted agent tries 1.2.0 once more (its trial says
    it was cut short once), the traffic rolls it back, and from then on it stays back."""
    _write_toml(box, keys, broker)
    with watcher(broker) as fleet, bundle_server(broker, tmp_path / "served"):
        _first_run(box, keys, fleet)
        fleet.publish(
            DESIRED, deployment({"tiny": box.bad}, keys.release, device=DEVICE, sequence=2)
        )
        with agent_process(box.toml, box.log, env={ENV: "probation"}) as proc:
            assert proc.wait(WAIT) == -signal.SIGKILL
        trial = StateStore(box.state).load_trials()["tiny"]
        assert (trial.version, trial.starts, trial.verdict) == ("1.2.0", 1, None)
        t1 = time.time()
        with agent_process(box.toml, box.log) as proc:
            fleet.wait(DEVICE, on_probation("1.2.0", "1.1.0", since=t1), what="1.2.0 tried again")
            assert "after 1 interrupted attempt(s)" in box.log.read_text()
            with Traffic(box.sock):
                fleet.wait(DEVICE, rolled_back_to("1.1.0", since=t1), what="rolled back")
            proc.send_signal(signal.SIGKILL)
            proc.wait(WAIT)
        _restarted_serves_the_last_good(box, keys, fleet)


def test_a_version_that_keeps_killing_the_agent_is_not_started_again(
    tmp_path: Path, broker: Broker, keys: Keys, box: Box
) -> None:
    """The agent dies each time it loads 1.2.0 (the ``loading`` failpoint stands in for a
    runtime that crashes the process: a segfault, an out-of-memory kill). After three starts
    it is refused for this deployment, and 1.1.0 serves."""
    _write_toml(box, keys, broker)
    with watcher(broker) as fleet, bundle_server(broker, tmp_path / "served"):
        _first_run(box, keys, fleet)
        fleet.publish(
            DESIRED, deployment({"tiny": box.bad}, keys.release, device=DEVICE, sequence=2)
        )
        for start in (1, 2, 3):
            with agent_process(box.toml, box.log, env={ENV: "loading"}) as proc:
                assert proc.wait(WAIT) == -signal.SIGKILL, f"start {start}"
            assert StateStore(box.state).load_trials()["tiny"].starts == start
        t1 = time.time()
        with agent_process(box.toml, box.log, env={ENV: "loading"}) as proc:
            reported = fleet.wait(DEVICE, _since(failed("tiny", "interrupted"), t1), what="refused")
            assert reported.models["tiny"].version == "1.1.0"
            assert _infer(box.sock, 2) == (200, "1.1.0")
            assert proc.poll() is None
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(WAIT) == 0
        # It is remembered: started again, the agent does not try it.
        t2 = time.time()
        with agent_process(box.toml, box.log, env={ENV: "loading"}) as proc:
            fleet.wait(DEVICE, _since(failed("tiny", "interrupted"), t2), what="still refused")
            time.sleep(1.0)
            assert proc.poll() is None
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(WAIT) == 0


def test_a_clean_stop_does_not_count_as_an_interrupted_start(
    tmp_path: Path, broker: Broker, keys: Keys, box: Box
) -> None:
    _write_toml(box, keys, broker)
    with watcher(broker) as fleet, bundle_server(broker, tmp_path / "served"):
        _first_run(box, keys, fleet)
        fleet.publish(
            DESIRED, deployment({"tiny": box.bad}, keys.release, device=DEVICE, sequence=2)
        )
        for _ in range(4):
            t0 = time.time()
            with agent_process(box.toml, box.log) as proc:
                fleet.wait(DEVICE, on_probation("1.2.0", "1.1.0", since=t0), what="on probation")
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(WAIT) == 0
            assert StateStore(box.state).load_trials()["tiny"].starts == 0


def _since(check: Check, t0: float) -> Check:
    return lambda r: r.at.timestamp() >= t0 and check(r)
