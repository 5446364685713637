"""``edge-agent status``: a real agent's status socket, asked by the real command.

A DeviceAgent on a thread against a plain mosquitto, a bundle server, one deployed model; the
command runs as a subprocess. Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.config import AgentConfig, load_config
from agent.errors import ConfigError, NotRunningError, StorageError
from agent.serving.api import ApiSettings
from agent.statusd import StatusServer, query, render
from agent.testing.broker import Broker
from agent.testing.fleet import (
    REPO,
    TOPICS,
    WAIT,
    agent,
    agent_config,
    bundle_server,
    deployment,
    watcher,
    write_agent_toml,
)
from agent.testing.wait import wait_until
from agent.transport.messages import Phase, Reported
from tests.conftest import Keys

EDGE_AGENT = str(Path(sys.executable).parent / "edge-agent")


def _status(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [EDGE_AGENT, "status", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        check=False,
    )


def _config(tmp_path: Path, keys: Keys, broker: Broker) -> AgentConfig:
    return agent_config(tmp_path / "cam-01", keys.dir, broker, "cam-01").model_copy(
        update={"status_socket": tmp_path / "run" / "status.sock"}
    )


def _until(path: Path, check: Any, what: str) -> dict[str, Any]:
    """Ask the socket until ``check(doc)`` holds (the loop publishes a snapshot every tick)."""
    last: dict[str, Any] | None = None

    def reached() -> dict[str, Any] | None:
        nonlocal last
        try:
            last = query(path, timeout=2.0)
        except NotRunningError:
            last = None
        return last if last is not None and check(last) else None

    return wait_until(
        reached, WAIT, interval=0.05, message=lambda: f"{what} not reached; last status {last}"
    )


def _active(r: Reported) -> bool:
    m = r.models.get("tiny")
    return m is not None and m.phase == Phase.ACTIVE and m.version == "1.0.0"


def test_status_shows_the_running_agent_and_its_deployed_model(
    tmp_path: Path, broker: Broker, keys: Keys, signed: Callable[..., tuple[Path, bytes]]
) -> None:
    served = tmp_path / "served"
    served.mkdir()
    bundle, envelope = signed("1.0.0", block_size=4096)
    shutil.copyfile(bundle, served / bundle.name)
    config = _config(tmp_path, keys, broker)
    sock = config.status_socket
    assert sock is not None
    toml = write_agent_toml(config, tmp_path / "agent.toml")
    with watcher(broker) as fleet, bundle_server(broker, served), agent(config):
        fleet.publish(
            TOPICS.device("cam-01").desired,
            deployment({"tiny": envelope}, keys.release, device="cam-01", sequence=7),
        )
        fleet.wait("cam-01", _active, what="tiny 1.0.0 active")
        _until(
            sock,
            lambda d: d["models"].get("tiny", {}).get("phase") == "active" and d["ready"],
            "tiny active on the status socket",
        )
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660

        result = _status("--socket", str(sock), "--json")
        assert result.returncode == 0, result.stderr
        doc = json.loads(result.stdout)
        assert doc["device_id"] == "cam-01"
        assert doc["uptime_s"] > 0
        assert doc["ready"] is True
        assert doc["broker"] == {
            "host": broker.host,
            "port": broker.port,
            "tls": False,
            "connected": True,
            "connects": 1,
        }
        tiny = doc["models"]["tiny"]
        assert tiny["phase"] == "active"
        assert tiny["version"] == "1.0.0"
        assert tiny["variant"]
        assert tiny["runtime"].startswith("onnxruntime")
        assert tiny["error"] is None
        assert doc["deployment"]["sequence"] == 7
        assert doc["deployment"]["id"] == tiny["deployment_id"]
        assert doc["error"] is None
        assert doc["api"] == []

        readable = _status("--socket", str(sock))
        assert readable.returncode == 0, readable.stderr
        lines = readable.stdout.splitlines()
        assert lines[0].startswith("cam-01: agent ")
        assert ", ready" in lines[0]
        assert f"{broker.host}:{broker.port} connected" in readable.stdout
        row = next(line for line in lines if line.startswith("tiny "))
        assert row.split()[:2] == ["tiny", "1.0.0"]
        assert "active" in row.split()
        assert tiny["variant"] in row.split()

        by_config = _status("--config", str(toml), "--json")
        assert by_config.returncode == 0, by_config.stderr
        assert json.loads(by_config.stdout)["models"]["tiny"]["phase"] == "active"

    assert not sock.exists(), "a clean stop removes the socket"
    gone = _status("--socket", str(sock))
    assert gone.returncode == 3
    assert gone.stdout == ""
    assert gone.stderr == f"edge-agent: the agent is not running (no {sock})\n"


def test_an_idle_agent_answers_with_a_fresh_status(
    tmp_path: Path, broker: Broker, keys: Keys
) -> None:
    """An idle loop sleeps until its next timer (up to a minute); a client's question wakes it,
    so the answer is taken then, not at the last tick."""
    config = _config(tmp_path, keys, broker)
    sock = config.status_socket
    assert sock is not None
    with agent(config):
        first = _until(sock, lambda d: d["ready"], "ready on the status socket")
        time.sleep(2.0)
        second = query(sock, timeout=5.0)
    assert second["uptime_s"] - first["uptime_s"] >= 1.5, (first, second)
    assert second["at"] > first["at"]


def test_status_names_the_broker_beside_an_api_on_tcp(
    tmp_path: Path, broker: Broker, keys: Keys
) -> None:
    """The ``broker`` block is the MQTT node connected to, whatever address the API listens on."""
    config = _config(tmp_path, keys, broker).model_copy(
        update={"api": ApiSettings(host="127.0.0.1", port=0, unix_socket=None)}
    )
    sock = config.status_socket
    assert sock is not None
    with agent(config) as dev:
        doc = _until(sock, lambda d: d["ready"] and d["broker"]["connected"], "connected")
        assert dev.api is not None
        assert dev.api.tcp_address is not None
        api_host, api_port = dev.api.tcp_address
        assert api_port != broker.port
        assert doc["api"] == [f"http://{api_host}:{api_port}"]
        assert (doc["broker"]["host"], doc["broker"]["port"]) == (broker.host, broker.port)


def test_status_without_a_running_agent_says_so(tmp_path: Path) -> None:
    missing = tmp_path / "nothing.sock"
    result = _status("--socket", str(missing), "--json")
    assert result.returncode == 3
    assert result.stdout == ""
    assert result.stderr == f"edge-agent: the agent is not running (no {missing})\n"

    # A socket file a killed agent left behind: nobody answers on it.
    stale = tmp_path / "stale.sock"
    _stale_socket(stale)
    result = _status("--socket", str(stale))
    assert result.returncode == 3
    assert result.stderr == f"edge-agent: the agent is not running (no {stale})\n"

    # --config names the socket; a config that turns it off is a usage error.
    off = tmp_path / "off.toml"
    off.write_text('device_id = "cam-01"\nstatus_socket = ""\n')
    result = _status("--config", str(off))
    assert result.returncode == 2
    assert "status_socket is off" in result.stderr
    on = tmp_path / "on.toml"
    on.write_text(f'device_id = "cam-01"\nstatus_socket = "{missing}"\n')
    result = _status("--config", str(on))
    assert result.returncode == 3
    assert result.stderr == f"edge-agent: the agent is not running (no {missing})\n"


def _stale_socket(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(os.fsencode(path))
    s.close()  # the file stays; nothing listens
    assert stat.S_ISSOCK(os.lstat(path).st_mode)


def test_a_stale_socket_is_replaced_on_start(tmp_path: Path, broker: Broker, keys: Keys) -> None:
    config = _config(tmp_path, keys, broker)
    sock = config.status_socket
    assert sock is not None
    _stale_socket(sock)
    os.chmod(sock, 0o600)
    with agent(config):
        doc = _until(sock, lambda d: d["broker"]["connected"], "connected on the status socket")
        assert doc["models"] == {}
        assert doc["deployment"] is None
        assert stat.S_IMODE(os.lstat(sock).st_mode) == 0o660  # the agent's own socket
        assert "no models" in render(doc)
    assert not sock.exists()


def test_a_live_socket_is_not_taken_over(tmp_path: Path) -> None:
    path = tmp_path / "status.sock"
    with StatusServer(path, {"who": "first"}):
        second = StatusServer(path, {"who": "second"})
        with pytest.raises(ConfigError, match="another process answers"):
            second.start()
        assert query(path) == {"who": "first"}
    assert not path.exists()
    path.write_text("not a socket")
    with pytest.raises(ConfigError, match="not a socket"):
        StatusServer(path, {}).start()


def test_update_and_bounded_connections(tmp_path: Path) -> None:
    path = tmp_path / "status.sock"
    # More than the socket buffers: a client that reads nothing holds its connection.
    big = {"pad": "x" * (4 << 20)}
    server = StatusServer(path, big, max_clients=1, send_timeout_s=2.0)
    with server:
        slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        slow.connect(os.fsencode(path))
        try:
            deadline = time.monotonic() + WAIT
            while server.refused == 0 and time.monotonic() < deadline:
                other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                other.settimeout(5.0)
                other.connect(os.fsencode(path))
                assert other.recv(16) == b"", "a client over the bound gets nothing"
                other.close()
            assert server.refused >= 1
        finally:
            slow.close()
        server.update({"n": 2})  # the slow client is dropped after its send timeout
        got: dict[str, Any] | None = None

        def updated() -> bool:
            nonlocal got
            try:
                got = query(path, timeout=2.0)
            except StorageError:
                got = None
            return got == {"n": 2}

        wait_until(updated, WAIT, interval=0.05, message=lambda: f"last status {got}")
        assert got == {"n": 2}


def test_status_socket_setting(tmp_path: Path) -> None:
    toml = tmp_path / "agent.toml"
    toml.write_text('device_id = "cam-01"\n')
    assert load_config(toml).status_socket == Path("/run/edge-agent/status.sock")
    toml.write_text('device_id = "cam-01"\nstatus_socket = ""\n')
    assert load_config(toml).status_socket is None
    toml.write_text('device_id = "cam-01"\nstatus_socket = "relative.sock"\n')
    with pytest.raises(ConfigError, match="status_socket"):
        load_config(toml)
