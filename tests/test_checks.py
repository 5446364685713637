"""agent.checks, what ``edge-agent check-config`` checks, called as a library on a temp dir."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from agent.checks import (
    PLACEHOLDER_DEVICE_ID,
    check_config,
    check_state_dir,
    check_tls,
    check_trust,
)
from agent.config import load_config
from agent.testing.broker import make_certs
from agent.transport.session import MqttSettings
from tests.conftest import Keys

NO_ENV: dict[str, str] = {}


def write(path: Path, keys: Keys, *, device_id: str = "cam-01", keyring: bool = True) -> Path:
    ring = f'keyring = "{keys.dir / "keyring.json"}"\n' if keyring else ""
    path.write_text(
        f'device_id = "{device_id}"\nstate_dir = "{path.parent / "state"}"\n'
        '[mqtt]\nhost = "broker.example"\ntls = false\n'
        f'[trust]\nroot = "{keys.dir / "root.json"}"\n{ring}'
        '[api]\nport = 8000\nunix_socket = ""\n'
    )
    return path


def test_a_good_config_has_no_problem_and_a_summary(tmp_path: Path, keys: Keys) -> None:
    check = check_config(write(tmp_path / "agent.toml", keys), {"EDGE_AGENT_MQTT__PORT": "1884"})
    assert check.loaded
    assert check.ok
    assert check.problems == []
    assert check.warnings == []
    assert check.summary == {
        "device_id": "cam-01",
        "groups": [],
        "broker": "broker.example:1884",
        "protocol": "5",
        "tls": False,
        "state_dir": str(tmp_path / "state"),
        "api": ["http://127.0.0.1:8000"],
        "overrides": ["EDGE_AGENT_MQTT__PORT"],
        "files": [str(tmp_path / "agent.toml")],
    }


def test_a_file_that_does_not_load_gives_the_loaders_problems(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('device_id = "cam-01"\nno_such_key = 1\n')
    check = check_config(config, NO_ENV)
    assert not check.loaded
    assert not check.ok
    assert check.summary is None
    assert len(check.problems) >= 1
    assert any("no_such_key" in p for p in check.problems), check.problems


def test_every_problem_found_is_listed(tmp_path: Path, keys: Keys) -> None:
    """The placeholder id, an unreadable keyring and a state dir that is a file: all three."""
    config = write(tmp_path / "agent.toml", keys, device_id=PLACEHOLDER_DEVICE_ID)
    (tmp_path / "state").write_text("a file")
    (keys.dir / "keyring.json").write_bytes(b"{}")
    check = check_config(config, NO_ENV)
    assert check.loaded
    assert not check.ok
    assert [p.split(":", 1)[0] for p in check.problems] == [
        "device_id",
        "trust.keyring",
        "state_dir",
    ], check.problems
    assert check.summary is not None
    assert check.summary["device_id"] == PLACEHOLDER_DEVICE_ID


def test_no_keyring_is_a_warning_until_one_is_stored(tmp_path: Path, keys: Keys) -> None:
    config = load_config(write(tmp_path / "agent.toml", keys, keyring=False), NO_ENV)
    warnings: list[str] = []
    now = datetime.now(timezone.utc)
    assert check_trust(config, warnings, now) == []
    assert len(warnings) == 1
    assert warnings[0].startswith("trust: no keyring yet")
    stored = config.state_dir / "trust"
    stored.mkdir(parents=True)
    (stored / "keyring.json").write_bytes((keys.dir / "keyring.json").read_bytes())
    warnings = []
    assert check_trust(config, warnings, now) == []
    assert warnings == []


def test_a_missing_root_stops_the_other_trust_checks(tmp_path: Path, keys: Keys) -> None:
    config = load_config(write(tmp_path / "agent.toml", keys), NO_ENV)
    (keys.dir / "root.json").unlink()
    warnings: list[str] = []
    (problem,) = check_trust(config, warnings, datetime.now(timezone.utc))
    assert problem.startswith(f"trust.root: cannot read {keys.dir / 'root.json'}")
    assert warnings == []


def test_state_dir_checks(tmp_path: Path) -> None:
    assert check_state_dir(tmp_path) is None
    assert check_state_dir(tmp_path / "a" / "b") is None  # created by the agent
    (tmp_path / "file").write_text("")
    assert (
        check_state_dir(tmp_path / "file") == f"state_dir: {tmp_path / 'file'} is not a directory"
    )
    assert check_state_dir(tmp_path / "file" / "sub") == (
        f"state_dir: cannot create {tmp_path / 'file' / 'sub'}: {tmp_path / 'file'} is not a directory"
    )


def test_tls_checks(tmp_path: Path) -> None:
    assert check_tls(MqttSettings(host="h", tls=False, ca_file=tmp_path / "nope")) == []
    missing = check_tls(MqttSettings(host="h", tls=True, ca_file=tmp_path / "nope.crt"))
    assert missing == [f"mqtt.ca_file: {tmp_path / 'nope.crt'} does not exist"]
    certs = make_certs(tmp_path / "certs", "cam-01")
    good = MqttSettings(
        host="h",
        tls=True,
        ca_file=certs / "ca.crt",
        cert_file=certs / "cam-01.crt",
        key_file=certs / "cam-01.key",
    )
    assert check_tls(good) == []
    bad = MqttSettings(
        host="h",
        tls=True,
        ca_file=certs / "ca.crt",
        cert_file=certs / "cam-01.crt",
        key_file=certs / "ca.crt",  # not a key
    )
    (problem,) = check_tls(bad)
    assert problem.startswith("mqtt: cannot load the TLS files")
