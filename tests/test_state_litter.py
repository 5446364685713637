"""After convergence the state directory holds exactly what its records name.

A kill -9 can leave, besides what the crash-recovery tests check: a finished download beside the
bundle it became (killed between storing and removing it), temporary files of atomic writes
(``desired/.device.dsse.*.tmp``), half-unpacked copies, block lists of bundles never stored,
copies of models no longer deployed. Start-up and garbage collection remove whatever no record
refers to.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
from pathlib import Path

from agent._failpoints import ENV
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
    downloading_past,
    two_versions,
    watcher,
    write_agent_toml,
)
from agent.testing.models import make_onnx
from agent.testing.wait import wait_until
from tests.conftest import Keys

DEVICE = "cam-01"


def named(state: Path) -> set[str]:
    """Every path the records name (relative to ``state``), directories included."""
    store = StateStore(state)
    out = {
        ".",
        *(sub for sub in ("trust", "desired", "downloads", "bundles", "models", "slots", "trials")),
        "trust/root.json",
        "trust/keyring.json",
        "trust/floors.json",
        "events.seq",
        "upstream.sqlite",
        "upstream.sqlite-wal",
        "upstream.sqlite-shm",
        "desired/device.dsse",
    }
    shas: set[str] = set()
    for name, installed in store.load_installed().items():
        out.add(f"slots/{name}.json")
        out.add(f"models/{name}")
        for sha in (installed.bundle_sha256, installed.previous_sha256):
            if sha:
                shas.add(sha)
                unpacked = state / "models" / name / sha
                out.update(str(p.relative_to(state)) for p in [unpacked, *unpacked.rglob("*")])
    for name, trial in store.load_trials().items():
        out.add(f"trials/{name}.json")
        if trial.verdict is not None:
            shas.add(trial.bundle_sha256)
    for sha in shas:
        out |= {f"bundles/{sha}.emb", f"bundles/{sha}.blocks"}
    return out


def unnamed(state: Path) -> list[str]:
    found = {"."} | {str(p.relative_to(state)) for p in state.rglob("*")}
    return sorted(found - named(state))


def wait_clean(state: Path) -> None:
    wait_until(
        lambda: not unnamed(state),
        WAIT,
        interval=0.1,
        message=lambda: f"left behind: {unnamed(state)}",
    )


def test_start_up_removes_what_no_record_names(
    tmp_path: Path, broker: Broker, keys: Keys, signed
) -> None:  # type: ignore[no-untyped-def]
    two = two_versions(tmp_path, signed)
    state = tmp_path / "state"
    toml = write_agent_toml(agent_config(state, keys.dir, broker, DEVICE), tmp_path / "agent.toml")
    log = tmp_path / "agent.log"
    desired = TOPICS.device(DEVICE).desired
    v1 = hashlib.sha256(two.bundles["1.0.0"].read_bytes()).hexdigest()
    with watcher(broker) as fleet, bundle_server(broker, two.served):
        fleet.publish(
            desired, deployment({"tiny": two.envelopes["1.0.0"]}, keys.release, device=DEVICE)
        )
        with agent_process(toml, log) as proc:
            fleet.wait(DEVICE, active("tiny", "1.0.0"))
            wait_clean(state)
            proc.send_signal(signal.SIGKILL)
            proc.wait(WAIT)
        # What kills at other moments leave behind.
        other = "ab" * 32
        litter = {
            f"downloads/{v1}/blocklist": b"x",  # killed between storing and removing it
            f"downloads/{v1}/bitmap": b"\xff",
            f"downloads/{other}/bundle.part": b"partial",  # a deployment replaced since
            "desired/.device.dsse.k2j3h4.tmp": b"half a document",
            "trust/.floors.json.a8sd7f.tmp": b"{",
            "slots/.tiny.json.0a9s8d.tmp": b"",
            "trials/.tiny.json.q9w8e7.tmp": b"",
            ".events.seq.z1x2c3.tmp": b"",
            f"bundles/{other}.blocks": b"\0" * 32,  # its bundle never stored
            f"bundles/.{other}.emb.p0o9i8.tmp": b"",
            f"models/tiny/.{v1}.a1b2c3.unpack/model.onnx": b"half",
            f"models/tiny/{other}/model.onnx": b"an older copy",
            f"models/gone/{other}/model.onnx": b"a model no longer deployed",
            "trials/gone.json": b"{}",
            "desired/group-left.dsse": b"a group this box left",
        }
        for rel, data in litter.items():
            path = state / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        assert set(unnamed(state)) >= set(litter)
        with agent_process(toml, log) as proc:
            fleet.wait(DEVICE, active("tiny", "1.0.0"))
            wait_clean(state)
            # Still serving, and nothing it needs was taken.
            assert StateStore(state).load_installed()["tiny"].bundle_sha256 == v1
            assert (state / "bundles" / f"{v1}.emb").is_file()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(WAIT) == 0


def test_kills_while_downloading_then_verifying_leave_nothing_behind(
    tmp_path: Path, broker: Broker, keys: Keys, signed
) -> None:  # type: ignore[no-untyped-def]
    two = two_versions(tmp_path, signed)
    # 2.0.0 large enough (1 MiB of weights) to be cut in the middle of its download.
    big = make_onnx(tmp_path / "big.onnx", inputs=512, outputs=512, seed=2)
    path, two.envelopes["2.0.0"] = signed("2.0.0", models=[big], block_size=4096, samples="none")
    shutil.copyfile(path, two.served / path.name)
    state = tmp_path / "state"
    toml = write_agent_toml(agent_config(state, keys.dir, broker, DEVICE), tmp_path / "agent.toml")
    log = tmp_path / "agent.log"
    desired = TOPICS.device(DEVICE).desired
    with watcher(broker) as fleet:
        with bundle_server(broker, two.served):
            fleet.publish(
                desired, deployment({"tiny": two.envelopes["1.0.0"]}, keys.release, device=DEVICE)
            )
            with agent_process(toml, log) as proc:
                fleet.wait(DEVICE, active("tiny", "1.0.0"))
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(WAIT) == 0
        fleet.publish(
            desired, deployment({"tiny": two.envelopes["2.0.0"]}, keys.release, device=DEVICE)
        )
        # Slowly served: killed in the middle of the download.
        slow = 256 << 10  # four seconds or so
        with bundle_server(broker, two.served, rate_bytes_s=slow), agent_process(toml, log) as proc:
            fleet.wait(DEVICE, downloading_past("tiny", 10.0), what="downloading")
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(WAIT)
        with bundle_server(broker, two.served):
            with agent_process(toml, log, env={ENV: "verifying"}) as proc:
                assert proc.wait(WAIT) == -signal.SIGKILL
            with agent_process(toml, log) as proc:
                fleet.wait(DEVICE, active("tiny", "2.0.0"), what="2.0.0 after two kills")
                wait_clean(state)
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(WAIT) == 0
    assert not list((state / "downloads").iterdir())
