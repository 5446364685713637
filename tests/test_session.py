"""The MQTT session: the descriptors it gives back, the broker nodes it tries in turn."""

from __future__ import annotations

import os
import queue
from pathlib import Path

import pytest
from pydantic import ValidationError

from agent.testing.broker import plain_broker
from agent.testing.fleet import WAIT, mqtt_settings
from agent.testing.wait import wait_until
from agent.transport.session import MqttSettings, Session


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_a_stopped_session_leaves_no_socket_open(tmp_path: Path) -> None:
    with plain_broker(tmp_path) as broker:
        before = _open_fds()
        for n in range(3):  # an agent reconnects and restarts sessions for years
            session = Session(
                mqtt_settings(broker), f"fd-{n}", queue.SimpleQueue(), subscriptions=[]
            )
            session.start()
            assert session.connected.wait(WAIT)
            session.stop()
        assert _open_fds() - before == set()


def test_a_session_moves_on_to_the_next_node_when_its_own_is_gone(tmp_path: Path) -> None:
    with plain_broker(tmp_path / "a") as a, plain_broker(tmp_path / "b") as b:
        session = Session(mqtt_settings(a, failover=[b]), "failover", queue.SimpleQueue())
        session.start()
        try:
            assert session.connected.wait(WAIT)
            assert session.endpoint == (a.host, a.port)
            a.stop()
            wait_until(
                lambda: session.connects == 2, WAIT, message=f"not connected to b\n{b.log()}"
            )
            assert session.endpoint == (b.host, b.port)
            a.start()
            b.stop()
            wait_until(lambda: session.connects == 3, WAIT, message=f"not back on a\n{a.log()}")
            assert session.endpoint == (a.host, a.port)
        finally:
            session.stop()


def test_failover_nodes_take_the_port_of_host_unless_they_name_one() -> None:
    settings = MqttSettings(host="n1", port=8884, failover=["n2", "n3:1884", "[::1]:1885", "::1"])
    assert settings.endpoints == [
        ("n1", 8884),
        ("n2", 8884),
        ("n3", 1884),
        ("::1", 1885),
        ("::1", 8884),
    ]


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ("node 2", "is not HOST, HOST:PORT or \\[IPv6\\]:PORT"),
        ("node2:", "the port must be a number"),
        ("node2:70000", "the port must be a number"),
        ("[::1", "write an IPv6 address as \\[ADDRESS\\]:PORT"),
        ("", "is not HOST"),
    ],
)
def test_a_failover_entry_that_is_no_address_is_refused(entry: str, problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        MqttSettings(failover=[entry])
