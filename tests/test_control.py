"""Desired and reported state end to end: a real mosquitto, a bundle server and device agents.

TLS with client certificates and the shipped ACL (identity = certificate CN) unless a test says
otherwise; devices cam-01 and cam-02 in group "lobby", the fleet identity "fleet".
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from agent.fleet.control import FleetView, age, render_table
from agent.testing.broker import Broker
from agent.testing.fleet import (
    TOPICS,
    active,
    agent,
    agent_config,
    bundle_server,
    deployment,
    serve_copy,
    watcher,
)
from agent.transport.messages import ErrorInfo, Event, ModelStatus, Online, Phase, Reported
from agent.transport.session import Incoming
from tests.conftest import Keys, broker_fixture

SECOND, MINUTE, HOUR, DAY = (timedelta(seconds=n) for n in (1, 60, 3600, 86400))


broker = broker_fixture(tls=True)


@pytest.fixture
def bundles(tmp_path: Path) -> Path:
    d = tmp_path / "served"
    d.mkdir()
    return d


def test_device_converges_on_its_desired_document(
    tmp_path: Path, broker: Broker, keys: Keys, signed, bundles: Path
) -> None:
    envelope = serve_copy(signed("1.0.0", block_size=4096), bundles)
    config = agent_config(tmp_path / "cam-01", keys.dir, broker, "cam-01")
    with watcher(broker) as fleet, bundle_server(broker, bundles), agent(config):
        fleet.publish(
            TOPICS.device("cam-01").desired,
            deployment({"tiny": envelope}, keys.release, device="cam-01"),
        )
        reported = fleet.wait("cam-01", active("tiny", "1.0.0"), what="tiny 1.0.0 active")
        assert fleet.online("cam-01") is True
    assert reported.error is None
    phases = [e.phase for e in fleet.events if e.kind == "phase" and e.model == "tiny"]
    assert phases[:2] == [Phase.PENDING, Phase.DOWNLOADING]
    assert phases[-1] == Phase.ACTIVE
    assert Phase.VERIFYING in phases
    installed = json.loads((tmp_path / "cam-01" / "slots" / "tiny.json").read_text())
    assert installed["version"] == "1.0.0"
    assert (Path(installed["path"]) / "manifest.json").is_file()


def test_offline_device_converges_when_it_comes_back(
    tmp_path: Path, broker: Broker, keys: Keys, signed, bundles: Path
) -> None:
    """Desired documents are retained: a device that was away picks up the latest on connect."""
    env1 = serve_copy(signed("1.0.0", block_size=4096), bundles)
    env2 = serve_copy(signed("1.1.0", block_size=4096), bundles)
    desired = TOPICS.device("cam-01").desired
    config = agent_config(tmp_path / "cam-01", keys.dir, broker, "cam-01")
    with watcher(broker) as fleet, bundle_server(broker, bundles):
        fleet.publish(
            desired, deployment({"tiny": env1}, keys.release, device="cam-01", sequence=1)
        )
        with agent(config):  # first boot: only the retained document tells it what to run
            fleet.wait("cam-01", active("tiny", "1.0.0"))
        assert fleet.online("cam-01") is False, "a clean stop says offline"
        fleet.publish(
            desired, deployment({"tiny": env2}, keys.release, device="cam-01", sequence=2)
        )
        with agent(config):
            reported = fleet.wait("cam-01", active("tiny", "1.1.0"))
    assert reported.sequence == 2


def test_device_document_overrides_its_groups(
    tmp_path: Path, broker: Broker, keys: Keys, signed, bundles: Path
) -> None:
    env1 = serve_copy(signed("1.0.0", block_size=4096), bundles)
    env2 = serve_copy(signed("2.0.0", block_size=4096), bundles)
    env3 = serve_copy(signed("3.0.0", block_size=4096), bundles)
    config = agent_config(tmp_path / "cam-01", keys.dir, broker, "cam-01", groups=("lobby",))
    group, device = TOPICS.group_desired("lobby"), TOPICS.device("cam-01").desired
    with watcher(broker) as fleet, bundle_server(broker, bundles), agent(config):
        fleet.publish(group, deployment({"tiny": env1}, keys.release, group="lobby", sequence=1))
        fleet.wait("cam-01", active("tiny", "1.0.0"), what="the group's model")
        fleet.publish(device, deployment({"tiny": env2}, keys.release, device="cam-01", sequence=2))
        fleet.wait("cam-01", active("tiny", "2.0.0"), what="the device's own model")
        fleet.publish(group, deployment({"tiny": env3}, keys.release, group="lobby", sequence=3))
        # A control message after the group document: the device's own document still wins.
        fleet.publish(device, deployment({"tiny": env2}, keys.release, device="cam-01", sequence=4))
        reported = fleet.wait("cam-01", lambda r: r.sequence == 4, what="sequence 4 seen")
    assert reported.models["tiny"].version == "2.0.0"
    assert reported.models["tiny"].phase == Phase.ACTIVE


def test_two_models_side_by_side_and_a_dropped_model_is_removed(
    tmp_path: Path, broker: Broker, keys: Keys, signed, bundles: Path
) -> None:
    detector = serve_copy(signed("1.0.0", name="detector", block_size=4096), bundles)
    classifier = serve_copy(signed("1.0.0", name="classifier", block_size=4096), bundles)
    classifier2 = serve_copy(signed("1.1.0", name="classifier", block_size=4096), bundles)
    config = agent_config(tmp_path / "cam-01", keys.dir, broker, "cam-01")
    desired = TOPICS.device("cam-01").desired
    both = {"detector": detector, "classifier": classifier}
    with watcher(broker) as fleet, bundle_server(broker, bundles), agent(config):
        fleet.publish(desired, deployment(both, keys.release, device="cam-01", sequence=1))
        fleet.wait(
            "cam-01",
            lambda r: active("detector", "1.0.0")(r) and active("classifier", "1.0.0")(r),
            what="both active",
        )
        fleet.publish(
            desired,
            deployment({"classifier": classifier2}, keys.release, device="cam-01", sequence=2),
        )
        reported = fleet.wait(
            "cam-01",
            lambda r: "detector" not in r.models and active("classifier", "1.1.0")(r),
            what="detector dropped, classifier updated",
        )
    assert set(reported.models) == {"classifier"}
    assert not (tmp_path / "cam-01" / "slots" / "detector.json").exists()
    assert not (tmp_path / "cam-01" / "models" / "detector").exists()
    # The classifier's earlier bundle stays for a rollback; the detector's is gone.
    assert len(list((tmp_path / "cam-01" / "bundles").glob("*.emb"))) == 2


def test_mqtt_311_end_to_end(
    tmp_path: Path, broker: Broker, keys: Keys, signed, bundles: Path
) -> None:
    """Device, bundle server and fleet all on MQTT 3.1.1 (no shared subscription)."""
    envelope = serve_copy(signed("1.0.0", block_size=4096), bundles)
    config = agent_config(tmp_path / "cam-02", keys.dir, broker, "cam-02", protocol="3.1.1")
    with (
        watcher(broker, protocol="3.1.1") as fleet,
        bundle_server(broker, bundles, protocol="3.1.1") as served,
        agent(config) as device,
    ):
        assert not device.session.v5
        fleet.publish(
            TOPICS.device("cam-02").desired,
            deployment({"tiny": envelope}, keys.release, device="cam-02"),
        )
        fleet.wait("cam-02", active("tiny", "1.0.0"))
    assert served[0].stats.blocks > 0
    log = broker.log()
    assert "ema/v1/bundles/+/request/+" in log, "the server subscribed to the plain filter"
    assert "$share/" not in log, "no shared subscription on a 3.1.1 server"


def test_a_refused_document_and_a_models_own_error_both_show() -> None:
    view = FleetView(TOPICS)
    reported = Reported(
        device_id="cam-01",
        agent_version="0.1.0",
        at=datetime.now(timezone.utc),
        models={
            "tiny": ModelStatus(
                phase=Phase.ROLLED_BACK,
                version="1.1.0",
                error=ErrorInfo(code="probation", message="51% failed"),
            ),
            "other": ModelStatus(phase=Phase.ACTIVE, version="2.0.0"),
        },
        error=ErrorInfo(code="untrusted-key", message="signed by an unknown key"),
    )
    view.update(Incoming(TOPICS.device("cam-01").reported, reported.to_bytes(), True))
    errors = {row["model"]: row["error"] for row in view.rows()}
    assert errors == {"tiny": "untrusted-key; probation", "other": "untrusted-key"}


def test_the_table_shows_runtime_variant_agent_and_last_seen_in_short_forms() -> None:
    """A mixed fleet at a glance in under 100 columns: the newest of reported, online and the
    last event sets SEEN; a device that never reported shows its online message's agent."""
    now = datetime(2025, 6, 1, 12, 0, tzinfo=timezone.utc)
    view = FleetView(TOPICS)

    def send(device: str, channel: str, message: Reported | Online | Event) -> None:
        topics = TOPICS.device(device)
        view.update(Incoming(getattr(topics, channel), message.to_bytes(), True))

    send("cam-01", "online", Online(state="online", agent_version="0.3.0", since=now - 3 * HOUR))
    send(
        "cam-01",
        "reported",
        Reported(
            device_id="cam-01",
            agent_version="0.3.0",
            at=now - 5 * MINUTE,
            models={
                "classifier": ModelStatus(
                    phase=Phase.DOWNLOADING,
                    version="1.1.0",
                    variant="onnx-fp32",
                    runtime="onnxruntime 1.20.1 CUDAExecutionProvider",
                    progress=45.3,
                )
            },
        ),
    )
    send(
        "cam-01",
        "events",
        Event(device_id="cam-01", seq=7, at=now - 12 * SECOND, kind="phase", phase=Phase.PENDING),
    )
    send(
        "box-02",
        "reported",
        Reported(
            device_id="box-02",
            agent_version="0.2.1",
            at=now - 2 * DAY - 3 * HOUR,
            models={
                "classifier": ModelStatus(
                    phase=Phase.FAILED,
                    version="1.0.0",
                    variant="tflite-fp32",
                    runtime="litert 1.2.0 xnnpack 4 threads",
                    progress=80.0,
                    error=ErrorInfo(code="transfer-timeout", message="no block arrived"),
                )
            },
        ),
    )
    send("box-02", "online", Online(state="offline"))
    send("new-03", "online", Online(state="online", agent_version="0.3.0", since=now - 40 * SECOND))
    lines = render_table(view, now).splitlines()
    assert [line.split() for line in lines] == [
        [
            "DEVICE",
            "ONLINE",
            "SEEN",
            "AGENT",
            "MODEL",
            "VERSION",
            "VARIANT",
            "RUNTIME",
            "PHASE",
            "ERROR",
        ],
        [
            "box-02",
            "no",
            "2d",
            "0.2.1",
            "classifier",
            "1.0.0",
            "tflite-fp32",
            "litert",
            "xnnpack",
            "failed",
            "transfer-timeout",
        ],
        [
            "cam-01",
            "yes",
            "12s",
            "0.3.0",
            "classifier",
            "1.1.0",
            "onnx-fp32",
            "onnxruntime",
            "CUDA",
            "downloading",
            "45%",
        ],
        ["new-03", "yes", "40s", "0.3.0", "-", "-", "-", "-", "-"],
    ]
    # ERROR comes last: only a row with an error code runs past 100 columns here.
    assert [len(line) <= 100 for line in lines[1:]] == [False, True, True]
    doc = view.as_json()
    assert doc["new-03"] == {
        "online": True,
        "agent_version": "0.3.0",
        "last_seen": (now - 40 * SECOND).isoformat(),
        "reported": None,
    }
    assert doc["cam-01"]["last_seen"] == (now - 12 * SECOND).isoformat()  # type: ignore[index]


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(-3, "0s"), (0, "0s"), (59, "59s"), (60, "1m"), (3599, "59m"), (3600, "1h"), (86400, "1d")],
)
def test_ages_are_short(seconds: float, shown: str) -> None:
    assert age(seconds) == shown
