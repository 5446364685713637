"""The embedded broker `make demo` falls back to without mosquitto: a deployment end to end
over it (MQTT 3.1.1, plain TCP on loopback), as the demo runs it."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from agent.testing.broker import HOST, Broker, free_port
from agent.testing.fleet import (
    REPO,
    TOPICS,
    active,
    agent,
    agent_config,
    bundle_server,
    deployment,
    serve_copy,
    watcher,
)
from tests.conftest import Keys


@contextmanager
def embedded_broker(tmp_path: Path) -> Iterator[Broker]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.testing.embedded_broker", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=REPO,
    )
    try:
        assert proc.stdout is not None
        banner = proc.stdout.readline().decode()  # printed once it listens (b"" if it died)
        assert f"broker on {HOST}:{port}" in banner, banner + proc.stdout.read().decode()
        yield Broker(HOST, port, tmp_path, proc)
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
        if proc.stdout is not None:
            proc.stdout.close()


def test_a_deployment_goes_through_the_embedded_broker(tmp_path: Path, keys: Keys, signed) -> None:  # type: ignore[no-untyped-def]
    served = tmp_path / "served"
    served.mkdir()
    envelope = serve_copy(signed("1.0.0"), served)
    with embedded_broker(tmp_path) as broker:
        config = agent_config(tmp_path / "cam-01", keys.dir, broker, "cam-01", protocol="3.1.1")
        with (
            watcher(broker, protocol="3.1.1") as fleet,
            bundle_server(broker, served, protocol="3.1.1"),
            agent(config),
        ):
            fleet.publish(
                TOPICS.device("cam-01").desired,
                deployment({"tiny": envelope}, keys.release, device="cam-01"),
            )
            report = fleet.wait("cam-01", active("tiny", "1.0.0"))
            assert fleet.online("cam-01") is True
    assert report.models["tiny"].error is None
