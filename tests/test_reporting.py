"""What a device says upstream: refusals counted not dropped, event numbers that never go back,
telemetry of the models that run, and a device handed back to its group.
"""

from __future__ import annotations

import queue
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from agent.fleet.deploy import make_deployment
from agent.serving.api import ApiSettings
from agent.testing.broker import Broker
from agent.testing.fleet import (
    TOPICS,
    WAIT,
    active,
    agent,
    agent_config,
    bundle_server,
    deployment,
    hand_back,
    infer_unix,
    mqtt_settings,
    serve_copy,
    watcher,
)
from agent.testing.wait import wait_until
from agent.transport.messages import Event, Telemetry
from agent.transport.session import InboxItem, Incoming, Session
from agent.trust.metadata import DeploymentTarget
from agent.upstream import TelemetrySettings
from tests.conftest import Keys

DEVICE = "cam-01"
DESIRED = TOPICS.device(DEVICE).desired


def _rejected(events: list[Event], code: str) -> list[Event]:
    return [
        e for e in events if e.kind == "rejected" and e.error is not None and e.error.code == code
    ]


def test_refusals_in_a_burst_are_counted_into_events_never_dropped(
    tmp_path: Path, broker: Broker, keys: Keys
) -> None:
    config = agent_config(tmp_path / "state", keys.dir, broker, DEVICE)
    garbage, stranger = 7, 3
    with watcher(broker) as fleet, agent(config):
        fleet.wait(DEVICE, lambda r: True, what="a first report")
        for i in range(garbage):  # not JSON: "format"
            fleet.publish(DESIRED, b"not a document %d" % i, retain=False)
        other = make_deployment(
            {},
            target=DeploymentTarget(kind="device", id="cam-02"),
            signers=[keys.release],
            now=datetime.now(timezone.utc),
        )
        for _ in range(stranger):  # for another device: "wrong-target"
            fleet.publish(DESIRED, other, retain=False)

        def counted(code: str) -> int:
            return sum(e.count for e in _rejected(fleet.events, code))

        def all_counted() -> bool:
            if counted("format") < garbage or counted("wrong-target") < stranger:
                fleet._drain(0.1)
                return False
            return True

        wait_until(
            all_counted,
            WAIT,
            interval=0,
            message=lambda: str([e.model_dump(mode="json") for e in fleet.events]),
        )
        time.sleep(1.5)  # nothing more arrives: each refusal was counted once
        fleet._drain(0.2)
        assert counted("format") == garbage
        assert counted("wrong-target") == stranger
        formats = _rejected(fleet.events, "format")
        assert len(formats) < garbage, "the burst was coalesced"
        assert formats[0].count == 1, "the first refusal goes out at once"
        assert all(e.topic == DESIRED for e in formats)


def test_event_numbers_grow_across_restarts(tmp_path: Path, broker: Broker, keys: Keys) -> None:
    config = agent_config(tmp_path / "state", keys.dir, broker, DEVICE)
    seen: list[list[int]] = []
    with watcher(broker) as fleet:
        for run in range(3):
            started = datetime.now(timezone.utc)
            with agent(config):
                fleet.wait(DEVICE, lambda r, t=started: r.at >= t, what="subscribed")
                before = len(fleet.events)
                fleet.publish(DESIRED, b"refused %d" % run, retain=False)
                fleet.wait_event(
                    lambda e, n=before: e.kind == "rejected" and fleet.events.index(e) >= n,
                    what=f"the refusal of run {run}",
                )
            seen.append([e.seq for e in fleet.events])
    seqs = [e.seq for e in fleet.events]
    assert seqs == sorted(seqs), seqs
    assert len(set(seqs)) == len(seqs), seqs
    assert len(seen[0]) < len(seen[1]) < len(seen[2])


def _infer(sock: Path, model: str) -> None:
    status, data = infer_unix(sock, np.full((1, 16), 0.5, dtype=np.float32), model)
    assert status == 200, data


def test_telemetry_stops_naming_a_removed_model(
    tmp_path: Path, broker: Broker, keys: Keys, signed
) -> None:  # type: ignore[no-untyped-def]
    served = tmp_path / "served"
    served.mkdir()
    tiny = serve_copy(signed("1.0.0"), served)
    other = serve_copy(signed("1.0.0", name="other"), served)
    sock = tmp_path / "api.sock"
    config = agent_config(tmp_path / "state", keys.dir, broker, DEVICE).model_copy(
        update={
            "telemetry": TelemetrySettings(interval_s=1),
            "api": ApiSettings(port=None, unix_socket=sock),
        }
    )
    inbox: queue.SimpleQueue[InboxItem] = queue.SimpleQueue()
    listener = Session(
        mqtt_settings(broker), "telemetry", inbox, subscriptions=[TOPICS.device(DEVICE).telemetry]
    )
    listener.start()
    got: list[Telemetry] = []

    def until(predicate, what: str) -> None:  # type: ignore[no-untyped-def]
        def seen() -> bool:
            if any(predicate(t) for t in got):
                return True
            try:
                item = inbox.get(timeout=0.1)
            except queue.Empty:
                return False
            if isinstance(item, Incoming):
                got.append(Telemetry.from_bytes(item.payload))
            return False

        wait_until(seen, WAIT, interval=0, message=f"no telemetry {what}")

    try:
        assert listener.connected.wait(WAIT)
        with watcher(broker) as fleet, bundle_server(broker, served), agent(config):
            both = deployment({"tiny": tiny, "other": other}, keys.release, device=DEVICE)
            fleet.publish(DESIRED, both)
            fleet.wait(DEVICE, lambda r: active("tiny", "1.0.0")(r) and active("other", "1.0.0")(r))
            _infer(sock, "tiny")
            _infer(sock, "other")
            until(lambda t: "model.other.requests" in t.metrics, "of other")
            fleet.publish(DESIRED, deployment({"tiny": tiny}, keys.release, device=DEVICE))
            fleet.wait(DEVICE, lambda r: "other" not in r.models, what="other removed")
            removed = datetime.now(timezone.utc)
            _infer(sock, "tiny")
            until(lambda t: t.at > removed and "model.tiny.requests" in t.metrics, "after")
    finally:
        listener.stop()
    after = [t for t in got if t.at > removed]
    assert after
    assert not [k for t in after for k in t.metrics if k.startswith("model.other.")]
    assert all(t.metrics.get("model.tiny.requests", 0) >= 1 for t in after)


def test_a_device_handed_back_follows_its_group_again(
    tmp_path: Path, broker: Broker, keys: Keys, signed
) -> None:  # type: ignore[no-untyped-def]
    served = tmp_path / "served"
    served.mkdir()
    v1 = serve_copy(signed("1.0.0"), served)
    v2 = serve_copy(signed("2.0.0"), served)
    v3 = serve_copy(signed("3.0.0"), served)
    # (Going back to the group's 1.0.0 would be below the floor 2.0.0 set: test_daemon_edges.)
    group = TOPICS.group_desired("lobby")
    config = agent_config(tmp_path / "state", keys.dir, broker, DEVICE, groups=("lobby",))
    with watcher(broker) as fleet, bundle_server(broker, served), agent(config):
        fleet.publish(group, deployment({"tiny": v1}, keys.release, group="lobby", sequence=1))
        fleet.wait(DEVICE, active("tiny", "1.0.0"), what="the group's 1.0.0")
        own = deployment({"tiny": v2}, keys.release, device=DEVICE, sequence=10)
        fleet.publish(DESIRED, own)
        fleet.wait(DEVICE, active("tiny", "2.0.0"), what="its own 2.0.0")
        # The group moves on meanwhile; the device follows its own document ...
        fleet.publish(group, deployment({"tiny": v3}, keys.release, group="lobby", sequence=2))
        fleet.publish(DESIRED, own)  # (the same document again: a redelivery, nothing changes)
        assert fleet.wait(DEVICE, active("tiny", "2.0.0")).sequence == 10
        # ... until it is handed back, and then runs the group's.
        fleet.publish(DESIRED, hand_back(keys.release, DEVICE, sequence=11))
        fleet.wait(DEVICE, active("tiny", "3.0.0"), what="handed back: the group's 3.0.0")
        # Its own older document cannot be replayed to take it back.
        t0 = datetime.now(timezone.utc)
        fleet.publish(DESIRED, own)
        event = fleet.wait_event(lambda e: e.kind == "rejected" and e.at >= t0, what="replay")
        assert event.error is not None
        assert event.error.code == "rollback"
        reported = fleet.wait(DEVICE, active("tiny", "3.0.0"))
        assert reported.sequence == 2
