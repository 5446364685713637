"""``edge-agent check-config`` as an operator runs it: exit codes, one-line reasons, a summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.testing.broker import make_certs
from tests.conftest import Keys

AGENT = str(Path(sys.executable).parent / "edge-agent")


def check(config: Path, *flags: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    return subprocess.run(
        [AGENT, "check-config", str(config), *flags],
        capture_output=True,
        text=True,
        env={**clean, **env},
        timeout=60,
    )


def write(path: Path, keys: Keys, top: str = "", mqtt: str = "tls = false") -> Path:
    """A config with the test's keys, a state dir under ``path``'s folder and no Unix socket."""
    path.write_text(
        f'device_id = "cam-01"\nstate_dir = "{path.parent / "state" / "agent"}"\n{top}\n'
        f'[mqtt]\nhost = "broker.example"\n{mqtt}\n'
        f'[trust]\nroot = "{keys.dir / "root.json"}"\nkeyring = "{keys.dir / "keyring.json"}"\n'
        '[api]\nport = 8000\nunix_socket = ""\n'
    )
    return path


def assert_refused(result: subprocess.CompletedProcess[str], *reasons: str) -> None:
    """Exit 2; one line per problem, each naming what is wrong; no traceback."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == len(reasons), lines
    for line, reason in zip(lines, reasons, strict=True):
        assert line.startswith("edge-agent: error: "), line
        assert reason in line, line
    assert "Traceback" not in result.stderr


def test_a_good_config_prints_ok_and_a_summary(tmp_path: Path, keys: Keys) -> None:
    config = write(tmp_path / "agent.toml", keys)
    result = check(
        config,
        EDGE_AGENT_MQTT__HOST="broker.local",
        EDGE_AGENT_MQTT__PORT="1884",
        EDGE_AGENT_MQTT__PROTOCOL="3.1.1",
        EDGE_AGENT_GROUPS='["line-1", "site-a"]',
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0] == f"{config}: ok"
    text = result.stdout
    assert "cam-01 (groups line-1, site-a)" in text
    assert "broker.local:1884, MQTT 3.1.1, no TLS" in text
    assert str(tmp_path / "state" / "agent") in text
    assert "http://127.0.0.1:8000" in text
    assert "EDGE_AGENT_GROUPS, EDGE_AGENT_MQTT__HOST" in text


def test_json_output_states_the_config(tmp_path: Path, keys: Keys) -> None:
    result = check(write(tmp_path / "agent.toml", keys), "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["ok"] is True
    assert doc["problems"] == []
    assert doc["config"]["device_id"] == "cam-01"
    assert doc["config"]["broker"] == "broker.example:8883"
    assert doc["config"]["api"] == ["http://127.0.0.1:8000"]


def test_tls_files_that_load_pass(tmp_path: Path, keys: Keys) -> None:
    certs = make_certs(tmp_path / "certs", "cam-01")
    config = write(
        tmp_path / "agent.toml",
        keys,
        mqtt=f'ca_file = "{certs / "ca.crt"}"\n'
        f'cert_file = "{certs / "cam-01.crt"}"\nkey_file = "{certs / "cam-01.key"}"',
    )
    result = check(config)
    assert result.returncode == 0, result.stderr
    assert "broker.example:8883, MQTT 5, TLS" in result.stdout


def test_an_unknown_key_in_the_file_names_the_file_and_the_key(tmp_path: Path, keys: Keys) -> None:
    config = write(tmp_path / "agent.toml", keys, "surprise = 1\nreport_interval_s = 0")
    result = check(config)
    assert_refused(
        result,
        f"{config}: report_interval_s: Input should be greater than 0",
        f"{config}: surprise: Extra inputs are not permitted",
    )
    assert result.stdout == ""


def test_an_unknown_override_names_the_variable(tmp_path: Path, keys: Keys) -> None:
    result = check(write(tmp_path / "agent.toml", keys), EDGE_AGENT_MQTT__HOTS="x")
    assert_refused(result, "EDGE_AGENT_MQTT__HOTS: mqtt.hots: Extra inputs are not permitted")


def test_every_problem_the_checks_find_is_one_line(tmp_path: Path, keys: Keys) -> None:
    (tmp_path / "state").write_text("a file where the state dir's parent should be")
    garbage = tmp_path / "garbage.crt"
    garbage.write_text("not a certificate")
    config = write(tmp_path / "agent.toml", keys, mqtt=f'ca_file = "{garbage}"')
    result = check(config, EDGE_AGENT_TRUST__ROOT=str(tmp_path / "missing-root.json"))
    assert_refused(
        result,
        f"{config}: trust.root: cannot read {tmp_path / 'missing-root.json'}",
        f"{config}: mqtt: cannot load the TLS files",
        f"{config}: state_dir: cannot create {tmp_path / 'state' / 'agent'}",
    )


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        (
            {"EDGE_AGENT_TRUST__ROOT": "{keys}/keyring.json"},
            "trust.root: {keys}/keyring.json is not a usable root (format)",
        ),
        (
            {"EDGE_AGENT_TRUST__KEYRING": "{keys}/root.json"},
            "trust.keyring: {keys}/root.json does not verify",
        ),
        (
            {
                "EDGE_AGENT_MQTT__TLS": "true",
                "EDGE_AGENT_MQTT__CERT_FILE": "{keys}/none.crt",
                "EDGE_AGENT_MQTT__KEY_FILE": "{keys}/none.key",
            },
            "mqtt.cert_file: {keys}/none.crt does not exist",
        ),
    ],
)
def test_a_root_or_tls_file_that_does_not_check_out_is_refused(
    tmp_path: Path, keys: Keys, overrides: dict[str, str], reason: str
) -> None:
    env = {k: v.format(keys=keys.dir) for k, v in overrides.items()}
    result = check(write(tmp_path / "agent.toml", keys), **env)
    assert result.returncode == 2
    assert reason.format(keys=keys.dir) in result.stderr.splitlines()[0]


def test_a_missing_config_file_exits_2(tmp_path: Path) -> None:
    result = check(tmp_path / "nope.toml", "--json")
    assert_refused(result, f"{tmp_path / 'nope.toml'} does not exist")
    doc = json.loads(result.stdout)
    assert doc == {
        "file": str(tmp_path / "nope.toml"),
        "ok": False,
        "problems": [f"{tmp_path / 'nope.toml'} does not exist"],
        "warnings": [],
        "config": None,
    }


def test_the_shipped_placeholder_device_id_is_refused(tmp_path: Path, keys: Keys) -> None:
    config = write(tmp_path / "agent.toml", keys)
    config.write_text(config.read_text().replace('"cam-01"', '"CHANGE-ME"'))
    assert_refused(check(config), "device_id: still 'CHANGE-ME'")


def test_run_without_a_trust_root_exits_2_so_systemd_does_not_restart_it(
    tmp_path: Path, keys: Keys
) -> None:
    """A fresh install before a technician copied root.json: a config problem (exit 2, which the
    unit's RestartPreventExitStatus= keeps from a restart loop), in one line."""
    config = write(tmp_path / "agent.toml", keys)
    missing = tmp_path / "nowhere" / "root.json"
    result = subprocess.run(
        [AGENT, "run", "--config", str(config)],
        capture_output=True,
        text=True,
        env={**os.environ, "EDGE_AGENT_TRUST__ROOT": str(missing), "EDGE_AGENT_TRUST__KEYRING": ""},
        timeout=60,
    )
    assert_refused(result, f"trust: {missing} does not exist")
    unit = (Path(__file__).parent.parent / "systemd" / "edge-agent.service").read_text()
    assert "RestartPreventExitStatus=2" in unit.splitlines()


def test_a_box_with_a_root_and_no_keyring_is_flagged(tmp_path: Path, keys: Keys) -> None:
    """It starts, but cannot verify a deployment until a keyring arrives: said, not refused."""
    config = write(tmp_path / "agent.toml", keys)
    text = config.read_text().replace(f'keyring = "{keys.dir / "keyring.json"}"\n', "")
    config.write_text(text)
    result = check(config)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{config}: ok\n")
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"edge-agent: warning: {config}: trust: no keyring yet"), line
    assert "cannot verify any deployment" in line
    assert "edge-fleet keys publish" in line
    doc = json.loads(check(config, "--json").stdout)
    assert doc["ok"] is True
    assert doc["warnings"] == [line.split(f"{config}: ", 1)[1]]
    # A keyring the agent received since (kept in its state directory) is enough.
    stored = tmp_path / "state" / "agent" / "trust"
    stored.mkdir(parents=True)
    (stored / "keyring.json").write_bytes((keys.dir / "keyring.json").read_bytes())
    again = check(config)
    assert again.returncode == 0, again.stderr
    assert again.stderr == ""


def test_check_config_lists_the_files_it_read_dropins_after_the_file(
    tmp_path: Path, keys: Keys
) -> None:
    config = write(tmp_path / "agent.toml", keys)
    dropins = tmp_path / "agent.toml.d"
    dropins.mkdir()
    (dropins / "50-enrolment.toml").write_text('device_id = "cam-07"\ngroups = ["lobby"]\n')
    (dropins / "90-local.toml").write_text('[mqtt]\nhost = "broker.local"\n')
    result = check(config)
    assert result.returncode == 0, result.stderr
    assert "cam-07 (groups lobby)" in result.stdout
    assert "broker.local:8883" in result.stdout
    lines = result.stdout.splitlines()
    read = next(i for i, line in enumerate(lines) if line.startswith("  read "))
    assert [line.split()[-1] for line in lines[read : read + 3]] == [
        str(config),
        str(dropins / "50-enrolment.toml"),
        str(dropins / "90-local.toml"),
    ]
    doc = json.loads(check(config, "--json").stdout)
    assert doc["config"]["files"] == [
        str(config),
        str(dropins / "50-enrolment.toml"),
        str(dropins / "90-local.toml"),
    ]

    (dropins / "60-bad.toml").write_text("[mqtt]\nport = 0\n")
    assert_refused(check(config), f"{dropins / '60-bad.toml'}: mqtt.port")


def test_check_config_without_a_file_reads_the_system_config() -> None:
    result = subprocess.run(
        [AGENT, "check-config", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    assert "default /etc/edge-agent/agent.toml" in " ".join(result.stdout.split())
