"""config/agent.toml, the commented defaults shipped to /etc/edge-agent, and config errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import AgentConfig, config_files, load_config
from agent.errors import ConfigError, ConfigProblems

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


# -- environment overrides: EDGE_AGENT_<TABLE>__<KEY>=value -------------------------------------
@pytest.fixture
def minimal(tmp_path: Path) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text('device_id = "cam-01"\n[transfer]\nwindow = 8\n')
    return path


def test_overrides_set_nested_list_bool_number_and_string_values(minimal: Path) -> None:
    config = load_config(
        minimal,
        {
            "EDGE_AGENT_DEVICE_ID": "cam-02",
            "EDGE_AGENT_MQTT__HOST": "broker.local",
            "EDGE_AGENT_MQTT__PORT": "1884",
            "EDGE_AGENT_MQTT__TLS": "false",
            "EDGE_AGENT_TRANSFER__WINDOW": "16",
            "EDGE_AGENT_REPORT_INTERVAL_S": "2.5",
            "EDGE_AGENT_RUNTIME__OPENVINO__PRECISION": "f16",
            "EDGE_AGENT_GROUPS": '["a", "b"]',
            "EDGE_AGENT_TOPIC_PREFIX": '"site/v1"',
            "EDGE_FLEET_BROKER": "elsewhere:1",  # not ours: ignored
            "PATH": "/usr/bin",
        },
    )
    assert config.device_id == "cam-02"
    assert (config.mqtt.host, config.mqtt.port, config.mqtt.tls) == ("broker.local", 1884, False)
    assert config.transfer.window == 16  # the variable wins over the file
    assert config.report_interval_s == 2.5
    assert config.runtime.openvino.precision == "f16"
    assert config.groups == ["a", "b"]
    assert config.topic_prefix == "site/v1"


def test_a_number_given_to_a_text_setting_stays_text(minimal: Path) -> None:
    config = load_config(
        minimal, {"EDGE_AGENT_MQTT__PROTOCOL": "5", "EDGE_AGENT_MQTT__CLIENT_ID": "1234"}
    )
    assert config.mqtt.protocol == "5"
    assert config.mqtt.client_id == "1234"


def test_an_override_can_turn_a_listener_off(minimal: Path) -> None:
    config = load_config(minimal, {"EDGE_AGENT_API__PORT": "false"})
    assert config.api.port is None


def test_overrides_come_from_the_process_environment_by_default(
    minimal: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGE_AGENT_MQTT__HOST", "from-env.local")
    assert load_config(minimal).mqtt.host == "from-env.local"


@pytest.mark.parametrize(
    ("variable", "message"),
    [
        (
            "EDGE_AGENT_MQTT__HOTS",
            "EDGE_AGENT_MQTT__HOTS: mqtt.hots: Extra inputs are not permitted",
        ),
        ("EDGE_AGENT_NOPE__X", "EDGE_AGENT_NOPE__X: nope.x: Extra inputs are not permitted"),
        ("EDGE_AGENT_SURPRISE", "EDGE_AGENT_SURPRISE: surprise: Extra inputs are not permitted"),
        (
            "EDGE_AGENT_RUNTIME__OPENVINO__PRECISON",
            "EDGE_AGENT_RUNTIME__OPENVINO__PRECISON: runtime.openvino.precison: Extra inputs",
        ),
        (
            "EDGE_AGENT_DEVICE_ID__X",
            "EDGE_AGENT_DEVICE_ID__X: device_id.x: device_id is not a table",
        ),
        ("EDGE_AGENT_MQTT____HOST", "EDGE_AGENT_MQTT____HOST: not a setting"),
    ],
)
def test_an_unknown_override_is_refused_naming_the_variable(
    minimal: Path, variable: str, message: str
) -> None:
    with pytest.raises(ConfigProblems) as info:
        load_config(minimal, {variable: "1"})
    assert str(info.value).startswith(message)
    assert len(info.value.problems) == 1
    assert "\n" not in str(info.value)


def test_a_bad_override_value_names_the_variable_and_the_key(minimal: Path) -> None:
    with pytest.raises(ConfigProblems) as info:
        load_config(minimal, {"EDGE_AGENT_TRANSFER__WINDOW": "0", "EDGE_AGENT_MQTT__PROTOCOL": "4"})
    assert info.value.problems == [
        "EDGE_AGENT_MQTT__PROTOCOL: mqtt.protocol: Input should be '5' or '3.1.1'",
        "EDGE_AGENT_TRANSFER__WINDOW: transfer.window: Input should be greater than or equal to 1",
    ]


def test_a_bad_value_in_the_file_names_the_file_and_the_key(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('device_id = "cam-01"\n[transfer]\nwindow = 0\n[mqtt]\nport = 70000\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert str(info.value) == (
        f"{path}: mqtt.port: Input should be less than or equal to 65535; "
        f"{path}: transfer.window: Input should be greater than or equal to 1"
    )


def test_an_override_does_not_hide_a_bad_value_elsewhere_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('device_id = "cam-01"\n[transfer]\nwindow = 0\n')
    with pytest.raises(ConfigProblems) as info:
        load_config(path, {"EDGE_AGENT_MQTT__HOST": "broker.local"})
    assert info.value.problems == [
        f"{path}: transfer.window: Input should be greater than or equal to 1"
    ]


def test_a_missing_file_is_one_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigProblems) as info:
        load_config(tmp_path / "nope.toml", {})
    assert info.value.problems == [f"{tmp_path / 'nope.toml'} does not exist"]


# -- drop-ins: agent.toml.d/*.toml -------------------------------------------------------------
def _dropins(tmp_path: Path, **files: str) -> Path:
    """agent.toml (a device id, an [mqtt] table) and drop-ins named ``files`` (``_`` for ``-``)."""
    path = tmp_path / "agent.toml"
    path.write_text('device_id = "CHANGE-ME"\n[mqtt]\nhost = "shipped"\nport = 8883\n')
    directory = tmp_path / "agent.toml.d"
    directory.mkdir()
    for name, text in files.items():
        (directory / name.replace("_", "-")).write_text(text)
    return path


def test_dropins_are_read_after_the_file_in_lexical_order_table_by_table(tmp_path: Path) -> None:
    path = _dropins(
        tmp_path,
        **{
            "50_enrolment.toml": 'device_id = "cam-01"\ngroups = ["lobby"]\n[mqtt]\nhost = "b1"\n',
            "90_local.toml": 'groups = ["site-a"]\n[mqtt]\nkeepalive_s = 15\n',
            "10_early.toml": '[mqtt]\nhost = "loses"\nport = 1884\n',
            "README": "not toml, not read\n",
            ".60-half-written.toml": "device_id = ",
            "70_notes.toml.dpkg-old": "device_id = ",
        },
    )
    config = load_config(path, {})
    assert config.device_id == "cam-01"
    assert config.groups == ["site-a"]  # a list is replaced, not merged
    assert (config.mqtt.host, config.mqtt.port, config.mqtt.keepalive_s) == ("b1", 1884, 15)
    d = tmp_path / "agent.toml.d"
    assert config_files(path) == [
        path,
        d / "10-early.toml",
        d / "50-enrolment.toml",
        d / "90-local.toml",
    ]


def test_an_environment_override_wins_over_the_dropins(tmp_path: Path) -> None:
    path = _dropins(tmp_path, **{"50_a.toml": 'device_id = "cam-01"\n'})
    assert load_config(path, {"EDGE_AGENT_DEVICE_ID": "cam-09"}).device_id == "cam-09"


def test_a_bad_value_in_a_dropin_names_the_dropin(tmp_path: Path) -> None:
    path = _dropins(tmp_path, **{"50_a.toml": "[mqtt]\nport = 70000\n", "60_b.toml": "x = 1\n"})
    d = tmp_path / "agent.toml.d"
    with pytest.raises(ConfigProblems) as info:
        load_config(path, {})
    assert info.value.problems == [
        f"{d / '50-a.toml'}: mqtt.port: Input should be less than or equal to 65535",
        f"{d / '60-b.toml'}: x: Extra inputs are not permitted",
    ]


def test_a_dropin_that_is_not_toml_is_one_problem_naming_it(tmp_path: Path) -> None:
    path = _dropins(tmp_path, **{"50_a.toml": "device_id = \n"})
    with pytest.raises(ConfigProblems) as info:
        load_config(path, {})
    [problem] = info.value.problems
    assert problem.startswith(f"{tmp_path / 'agent.toml.d' / '50-a.toml'} is not valid TOML")


def test_a_dropin_path_that_is_a_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('device_id = "cam-01"\n')
    (tmp_path / "agent.toml.d").write_text("")
    with pytest.raises(ConfigProblems) as info:
        load_config(path, {})
    assert info.value.problems == [f"{tmp_path / 'agent.toml.d'} is not a directory"]


def test_the_shipped_file_with_an_enrolment_dropin_sets_only_what_the_dropin_says(
    tmp_path: Path,
) -> None:
    path = tmp_path / "agent.toml"
    path.write_bytes(SHIPPED.read_bytes())
    (tmp_path / "agent.toml.d").mkdir()
    (tmp_path / "agent.toml.d" / "50-enrolment.toml").write_text(
        'device_id = "cam-01"\n[mqtt]\nhost = "broker.example"\n'
    )
    config = load_config(path, {})
    shipped = load_config(SHIPPED, {})
    assert config.device_id == "cam-01"
    assert config.mqtt == shipped.mqtt.model_copy(update={"host": "broker.example"})
    assert config.model_dump(exclude={"device_id", "mqtt"}) == shipped.model_dump(
        exclude={"device_id", "mqtt"}
    )
