"""Telemetry and events from a running agent through a broker outage: stored, then sent in order."""

from __future__ import annotations

import queue
import time
from datetime import datetime, timezone
from pathlib import Path

from agent.testing.broker import Broker
from agent.testing.fleet import TOPICS, WAIT, agent, agent_config, mqtt_settings
from agent.transport.messages import Telemetry
from agent.transport.session import InboxItem, Incoming, Session
from agent.upstream import TelemetrySettings
from tests.conftest import Keys, broker_fixture

# Persistence on: the listener's session (and subscription) outlives the broker's restart,
# so what the agent sends before the listener is back still reaches it.
broker = broker_fixture(persistent=True)


def _telemetry(inbox: queue.SimpleQueue[InboxItem], got: list[Telemetry], until: float) -> None:
    while time.monotonic() < until:
        try:
            item = inbox.get(timeout=0.1)
        except queue.Empty:
            continue
        if isinstance(item, Incoming):
            got.append(Telemetry.from_bytes(item.payload))


def test_telemetry_recorded_while_the_broker_is_down_arrives_in_order(
    tmp_path: Path, broker: Broker, keys: Keys
) -> None:
    config = agent_config(tmp_path / "cam-01", keys.dir, broker, "cam-01").model_copy(
        update={"telemetry": TelemetrySettings(interval_s=1)}
    )
    inbox: queue.SimpleQueue[InboxItem] = queue.SimpleQueue()
    listener = Session(
        mqtt_settings(broker),
        "telemetry-listener",
        inbox,
        subscriptions=[TOPICS.device("cam-01").telemetry],
        persistent=True,  # the broker keeps what arrives for it while it reconnects
    )
    listener.start()
    got: list[Telemetry] = []
    try:
        assert listener.connected.wait(WAIT)
        with agent(config):
            _telemetry(inbox, got, time.monotonic() + 2.5)
            assert got, "telemetry flows while connected"
            broker.stop()
            down = datetime.now(timezone.utc)
            time.sleep(3.5)  # the agent keeps measuring, every second, into its queue
            up = datetime.now(timezone.utc)
            broker.start()
            deadline = time.monotonic() + WAIT
            while time.monotonic() < deadline and not any(t.at > up for t in got):
                _telemetry(inbox, got, time.monotonic() + 0.5)
    finally:
        listener.stop()
    stamps = [t.at for t in got]
    assert stamps == sorted(stamps), "in the order they were taken"
    during = [t for t in got if down < t.at < up]
    assert len(during) >= 2, "what was measured during the outage arrived afterwards"
    assert all("cpu.percent" in t.metrics and "mem.used_mb" in t.metrics for t in got)
    assert (tmp_path / "cam-01" / "upstream.sqlite").exists()
