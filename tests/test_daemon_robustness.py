"""The device agent keeps going: odd model names, crowded reports, outages, storage failures.

A real mosquitto (plain loopback listener), a bundle server and a DeviceAgent on a thread. What
the agent publishes is recorded where it is published (its session's ``publish``), so events and
block requests are seen even while the broker is away.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from agent.bundle.limits import BundleLimits
from agent.daemon import DeviceAgent
from agent.device.reporting import MAX_REPORTED_MODELS
from agent.testing.broker import Broker
from agent.testing.fleet import (
    TOPICS,
    WAIT,
    active,
    agent,
    agent_config,
    bundle_server,
    deployment,
    downloading_past,
    failed,
    serve_copy,
    watcher,
)
from agent.testing.models import make_onnx
from agent.testing.wait import wait_until
from agent.transport.fetch import TransferSettings
from agent.transport.messages import Event, Phase
from tests.conftest import Keys

BLOCK = 4096
DEVICE = "cam-01"
DESIRED = TOPICS.device(DEVICE).desired
# Short timeouts: a stalled transfer fails within a second or two.
QUICK = TransferSettings(window=8, request_timeout_s=0.3, stall_timeout_s=1.0)


@pytest.fixture
def bundles(tmp_path: Path) -> Path:
    d = tmp_path / "served"
    d.mkdir()
    return d


@pytest.fixture
def big_model(tmp_path: Path) -> Path:
    """About 1 MiB of weights: some 260 blocks of 4 KiB, four seconds at 256 KiB/s."""
    return make_onnx(tmp_path / "big.onnx", inputs=512, outputs=512, seed=7)


class Published:
    """Everything a device agent publishes, in order, with block requests and events parsed."""

    def __init__(self, device: DeviceAgent) -> None:
        self.log: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        publish = device.session.publish

        def recording(topic: str, payload: bytes, **kw: object) -> object:
            with self._lock:
                self.log.append((topic, payload))
            return publish(topic, payload, **kw)

        device.session.publish = recording  # type: ignore[method-assign]

    def _items(self) -> list[tuple[str, bytes]]:
        with self._lock:
            return list(self.log)

    def requests(self) -> list[str]:
        return [t for t, _ in self._items() if "/bundles/" in t]

    def events(self, model: str | None = None) -> list[Event]:
        found = [Event.from_bytes(p) for t, p in self._items() if t.endswith("/events") and p]
        return [e for e in found if model is None or e.model == model]

    def phases(self, model: str) -> list[Phase | None]:
        return [e.phase for e in self.events(model) if e.kind == "phase"]


def test_a_model_named_like_a_json_file_survives_a_restart(
    tmp_path: Path, broker: Broker, keys: Keys, signed, bundles: Path
) -> None:
    envelope = serve_copy(signed("1.0.0", name="x.json", block_size=BLOCK, samples="none"), bundles)
    state = tmp_path / DEVICE
    config = agent_config(state, keys.dir, broker, DEVICE)
    with watcher(broker) as fleet, bundle_server(broker, bundles):
        with agent(config):
            fleet.publish(DESIRED, deployment({"x.json": envelope}, keys.release, device=DEVICE))
            fleet.wait(DEVICE, active("x.json", "1.0.0"), what="x.json active")
        assert (state / "models" / "x.json").is_dir(), "the unpacked bundle's directory"
        restarted = datetime.now(timezone.utc)
        with agent(config) as dev:
            assert "x.json" in dev.rollouts, "the record was read back"
            reported = fleet.wait(
                DEVICE,
                lambda r: r.at >= restarted and active("x.json", "1.0.0")(r),
                what="x.json active after the restart",
            )
    assert reported.error is None
    assert json.loads((state / "slots" / "x.json.json").read_text())["model"] == "x.json"


def test_a_report_holds_the_deployments_models_first_when_old_ones_linger(
    tmp_path: Path, broker: Broker, keys: Keys, signed, bundles: Path
) -> None:
    """One model installed, then a document naming 16 others: 17 slots, a report holds 16."""
    old = serve_copy(signed("1.0.0", name="a-old", block_size=BLOCK, samples="none"), bundles)
    names = [f"m{i:02d}" for i in range(MAX_REPORTED_MODELS)]
    unserved = names[-1]  # never served: its failure keeps the old model installed
    new = {}
    for name in names:
        built = signed("1.0.0", name=name, block_size=BLOCK, samples="none")
        new[name] = built[1] if name == unserved else serve_copy(built, bundles)
    state = tmp_path / DEVICE
    config = agent_config(state, keys.dir, broker, DEVICE, transfer=QUICK)
    with watcher(broker) as fleet, bundle_server(broker, bundles), agent(config) as dev:
        fleet.publish(DESIRED, deployment({"a-old": old}, keys.release, device=DEVICE, sequence=1))
        fleet.wait(DEVICE, active("a-old", "1.0.0"), what="a-old active")
        fleet.publish(DESIRED, deployment(new, keys.release, device=DEVICE, sequence=2))
        reported = fleet.wait(
            DEVICE,
            lambda r: (
                r.sequence == 2
                and all(active(n, "1.0.0")(r) for n in names[:-1])
                and failed(unserved, "bundle-unavailable")(r)
            ),
            what="15 new models active and the unserved one failed",
        )
        assert len(dev.rollouts) == MAX_REPORTED_MODELS + 1
        assert dev.rollouts["a-old"].installed is not None
    assert len(reported.models) == MAX_REPORTED_MODELS
    assert set(reported.models) == set(names), "the deployment's models come first"
    assert (state / "slots" / "a-old.json").is_file(), "the old model still runs"


def test_a_broker_outage_longer_than_the_stall_timeout_does_not_fail_the_transfer(
    tmp_path: Path, broker: Broker, keys: Keys, signed, big_model: Path, bundles: Path
) -> None:
    envelope = serve_copy(
        signed("1.0.0", models=[big_model], block_size=BLOCK, samples="none"), bundles
    )
    settings = TransferSettings(window=8, request_timeout_s=0.3, stall_timeout_s=1.5)
    config = agent_config(tmp_path / DEVICE, keys.dir, broker, DEVICE, transfer=settings)
    with (
        watcher(broker) as fleet,
        bundle_server(broker, bundles, rate_bytes_s=256 << 10),
        agent(config) as dev,
    ):
        published = Published(dev)
        fleet.publish(DESIRED, deployment({"tiny": envelope}, keys.release, device=DEVICE))
        fleet.wait(DEVICE, downloading_past("tiny", 20), what="a fifth downloaded")
        broker.stop()
        transfer = dev.rollouts["tiny"].transfer
        assert transfer is not None
        assert 0 < transfer.have_count < transfer.count, "cut mid-transfer"
        time.sleep(2 * settings.stall_timeout_s)  # the outage
        broker.start()
        fleet.wait(DEVICE, active("tiny", "1.0.0"), what="tiny active after the outage")
    assert Phase.FAILED not in published.phases("tiny")


def test_a_model_dropped_while_it_downloads_is_never_installed(
    tmp_path: Path, broker: Broker, keys: Keys, signed, big_model: Path, bundles: Path
) -> None:
    slow = serve_copy(
        signed("1.0.0", name="aaa", models=[big_model], block_size=BLOCK, samples="none"),
        bundles,
    )
    other = serve_copy(signed("1.0.0", name="bbb", block_size=BLOCK, samples="none"), bundles)
    state = tmp_path / DEVICE
    config = agent_config(state, keys.dir, broker, DEVICE)
    with (
        watcher(broker) as fleet,
        bundle_server(broker, bundles, rate_bytes_s=256 << 10),
        agent(config) as dev,
    ):
        published = Published(dev)
        fleet.publish(DESIRED, deployment({"aaa": slow}, keys.release, device=DEVICE, sequence=1))
        fleet.wait(DEVICE, downloading_past("aaa", 5), what="aaa downloading")
        fleet.publish(DESIRED, deployment({"bbb": other}, keys.release, device=DEVICE, sequence=2))
        reported = fleet.wait(
            DEVICE,
            lambda r: r.sequence == 2 and active("bbb", "1.0.0")(r) and "aaa" not in r.models,
            what="bbb active, aaa gone",
        )
        assert "aaa" not in dev.rollouts
    assert set(reported.models) == {"bbb"}
    floors = json.loads((state / "trust" / "floors.json").read_text())
    assert "aaa" not in floors["release_floor"], floors
    assert floors["release_floor"]["bbb"] == reported.models["bbb"].release
    assert not {Phase.VERIFYING, Phase.UNPACKING, Phase.LOADING, Phase.ACTIVE} & set(
        published.phases("aaa")
    )
    assert not (state / "slots" / "aaa.json").exists()
    assert not (state / "models" / "aaa").exists()


def test_a_storage_failure_is_reported_and_the_agent_goes_on(
    tmp_path: Path, broker: Broker, keys: Keys, signed, bundles: Path
) -> None:
    envelope = serve_copy(signed("1.0.0", block_size=BLOCK, samples="none"), bundles)
    state = tmp_path / DEVICE
    config = agent_config(state, keys.dir, broker, DEVICE)
    desired = state / "desired"
    with watcher(broker) as fleet, bundle_server(broker, bundles), agent(config):
        # A directory the agent cannot write in (root ignores permissions: a file in its place).
        shutil.rmtree(desired)
        desired.write_bytes(b"")
        fleet.publish(
            DESIRED, deployment({"tiny": envelope}, keys.release, device=DEVICE, sequence=1)
        )
        reported = fleet.wait(
            DEVICE,
            lambda r: r.error is not None and r.error.code == "storage",
            what="a storage error reported",
        )
        assert reported.sequence is None, "the document was not taken"
        assert fleet.online(DEVICE) is True
        desired.unlink()
        desired.mkdir()
        fleet.publish(
            DESIRED, deployment({"tiny": envelope}, keys.release, device=DEVICE, sequence=2)
        )
        reported = fleet.wait(
            DEVICE,
            lambda r: r.sequence == 2 and active("tiny", "1.0.0")(r),
            what="the next document taken",
        )
        assert fleet.online(DEVICE) is True
    assert reported.error is None
    assert (desired / "device.dsse").is_file()


def test_a_bundle_above_the_size_limit_fails_before_any_request(
    tmp_path: Path, broker: Broker, keys: Keys, signed, bundles: Path
) -> None:
    path, envelope = signed("1.0.0", block_size=BLOCK, samples="none")
    shutil.copyfile(path, bundles / path.name)
    limit = path.stat().st_size - 1
    config = agent_config(tmp_path / DEVICE, keys.dir, broker, DEVICE).model_copy(
        update={"limits": BundleLimits(max_bundle_bytes=limit)}
    )
    with watcher(broker) as fleet, bundle_server(broker, bundles) as served, agent(config) as dev:
        published = Published(dev)
        fleet.publish(DESIRED, deployment({"tiny": envelope}, keys.release, device=DEVICE))
        reported = fleet.wait(DEVICE, failed("tiny", "size-limit"), what="size-limit")
        assert dev.rollouts["tiny"].transfer is None
    error = reported.models["tiny"].error
    assert error is not None
    assert str(limit) in error.message
    assert published.requests() == [], "no block request published"
    assert served[0].stats.blocks == 0
    assert not list((tmp_path / DEVICE).rglob("bundle.part"))


def test_a_transfer_that_timed_out_is_tried_again_without_a_new_document(
    tmp_path: Path, broker: Broker, keys: Keys, signed, bundles: Path
) -> None:
    envelope = serve_copy(signed("1.0.0", block_size=BLOCK, samples="none"), bundles)
    settings = QUICK.model_copy(update={"retry_after_s": 1.0})
    config = agent_config(tmp_path / DEVICE, keys.dir, broker, DEVICE, transfer=settings)
    with watcher(broker) as fleet, agent(config) as dev:
        published = Published(dev)
        fleet.publish(DESIRED, deployment({"tiny": envelope}, keys.release, device=DEVICE))
        timed_out = fleet.wait(
            DEVICE, failed("tiny", "transfer-timeout"), what="no server: timed out"
        )
        with bundle_server(broker, bundles):
            reported = fleet.wait(DEVICE, active("tiny", "1.0.0"), what="tiny active on a retry")
    assert reported.sequence == timed_out.sequence, "no new document was needed"
    phases = published.phases("tiny")
    assert phases.index(Phase.FAILED) < phases.index(Phase.ACTIVE)


def test_a_failed_deployment_is_tried_again_when_a_new_document_names_it(
    tmp_path: Path, broker: Broker, keys: Keys, signed, bundles: Path
) -> None:
    envelope = serve_copy(signed("1.0.0", block_size=BLOCK, samples="none"), bundles)
    config = agent_config(tmp_path / DEVICE, keys.dir, broker, DEVICE, transfer=QUICK)
    assert QUICK.retry_after_s >= 60, "no retry by the clock within the test"
    with watcher(broker) as fleet, agent(config):
        fleet.publish(
            DESIRED, deployment({"tiny": envelope}, keys.release, device=DEVICE, sequence=1)
        )
        fleet.wait(DEVICE, failed("tiny", "transfer-timeout"), what="no server: timed out")
        with bundle_server(broker, bundles):
            fleet.publish(
                DESIRED, deployment({"tiny": envelope}, keys.release, device=DEVICE, sequence=2)
            )
            reported = fleet.wait(
                DEVICE,
                lambda r: r.sequence == 2 and active("tiny", "1.0.0")(r),
                what="tiny active after the new document",
            )
    assert reported.models["tiny"].error is None


def test_downloads_and_bundles_nothing_wants_are_collected_at_start(
    tmp_path: Path, broker: Broker, keys: Keys, signed, bundles: Path
) -> None:
    """A deployment replaced while the agent was down leaves a partial download and a stored
    bundle behind: they go at the next start; what runs and what it replaced stay."""
    envelope = serve_copy(signed("1.0.0", block_size=BLOCK, samples="none"), bundles)
    state = tmp_path / DEVICE
    config = agent_config(state, keys.dir, broker, DEVICE)
    with watcher(broker) as fleet, bundle_server(broker, bundles):
        with agent(config):
            fleet.publish(DESIRED, deployment({"tiny": envelope}, keys.release, device=DEVICE))
            fleet.wait(DEVICE, active("tiny", "1.0.0"))
        [kept] = [p.name for p in (state / "bundles").glob("*.emb")]
        stale = "ab" * 32
        (state / "downloads" / stale).mkdir(parents=True)
        (state / "downloads" / stale / "part").write_bytes(b"x" * 1000)
        (state / "bundles" / f"{stale}.emb").write_bytes(b"old")
        (state / "models" / "tiny" / stale).mkdir()
        with agent(config):
            wait_until(
                lambda: (
                    not any(
                        p.exists()
                        for p in (
                            state / "downloads" / stale,
                            state / "bundles" / f"{stale}.emb",
                            state / "models" / "tiny" / stale,
                        )
                    )
                ),
                WAIT,
                interval=0.05,
                message="stale state not collected",
            )
            assert [p.name for p in (state / "bundles").glob("*.emb")] == [kept]
            assert (state / "models" / "tiny" / kept.removesuffix(".emb")).is_dir()
