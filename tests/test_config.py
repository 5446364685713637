"""config/agent.toml, the commented defaults shipped to /etc/edge-agent, and config errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import AgentConfig, load_config
from agent.errors import ConfigError

SHIPPED = Path(__file__).resolve().parent.parent / "config" / "agent.toml"


def test_the_shipped_file_loads_and_states_the_defaults() -> None:
    config = load_config(SHIPPED)
    defaults = AgentConfig(device_id=config.device_id)
    for table in ("transfer", "serving", "api", "runtime", "limits"):
        assert getattr(config, table) == getattr(defaults, table), table
    assert config.topic_prefix == defaults.topic_prefix
    assert config.state_dir == defaults.state_dir
    assert config.mqtt.port == 8883
    assert config.mqtt.tls


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ('device_id = "cam/01"', "device_id"),
        ('device_id = "cam-01"\n[transfer]\nwindow = 0', "transfer.window"),
        ('device_id = "cam-01"\n[api]\nunix_socket = "relative.sock"', "api.unix_socket"),
        (
            'device_id = "cam-01"\n[runtime.openvino]\nprecision = "auto"',
            "runtime.openvino.precision",
        ),
        ('device_id = "cam-01"\nsurprise = 1', "surprise"),
        ("device_id = ", "not valid TOML"),
    ],
)
def test_a_bad_setting_names_itself(tmp_path: Path, text: str, names: str) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=names.replace(".", r"\.")):
        load_config(path)


def test_listeners_can_be_turned_off(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('device_id = "cam-01"\n[api]\nport = false\nunix_socket = ""\n')
    config = load_config(path)
    assert config.api.port is None
    assert config.api.unix_socket is None
