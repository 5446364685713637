"""The MQTT session gives back every descriptor it opened when it stops."""

from __future__ import annotations

import os
import queue
from pathlib import Path

from agent.transport.session import Session
from tests.broker import plain_broker
from tests.fleet import WAIT, mqtt_settings


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
