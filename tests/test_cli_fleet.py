"""edge-fleet serve, deploy, status and keys publish, as processes, against a real mosquitto.

TLS with client certificates and the shipped ACL; the fleet tools use the "fleet" identity
through the EDGE_FLEET_* environment variables, as an operator's shell would.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import pytest

from agent import __version__
from agent.cli import fleet_parser
from agent.cli._common import mqtt_settings
from agent.testing.broker import Broker
from agent.testing.fleet import agent, agent_config, watcher
from agent.testing.models import make_onnx
from agent.transport.messages import Phase
from tests.conftest import Keys, broker_fixture

FLEET = str(Path(sys.executable).parent / "edge-fleet")


broker = broker_fixture(tls=True)


def _env(broker: Broker, identity: str = "fleet") -> dict[str, str]:
    assert broker.certs is not None
    return {
        **os.environ,
        "EDGE_FLEET_BROKER": f"{broker.host}:{broker.port}",
        "EDGE_FLEET_CA": str(broker.certs / "ca.crt"),
        "EDGE_FLEET_CERT": str(broker.certs / f"{identity}.crt"),
        "EDGE_FLEET_CERT_KEY": str(broker.certs / f"{identity}.key"),
    }


def _fleet(
    *args: str, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FLEET, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@contextmanager
def _serving(tmp_path: Path, broker: Broker, *options: str) -> Iterator[tuple[Path, list[str]]]:
    """``edge-fleet serve --bundles DIR OPTIONS`` as a process; yields DIR and a list that holds
    its banner, then (once it stopped) everything else it printed."""
    bundles = tmp_path / "served"
    bundles.mkdir()
    proc = subprocess.Popen(
        [FLEET, "serve", "--bundles", str(bundles), *options],
        env=_env(broker),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    banner = proc.stdout.readline()  # printed once it handles SIGTERM and is about to connect
    assert banner.startswith("edge-fleet serve:"), banner
    printed = [banner]
    try:
        yield bundles, printed
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
        printed.append(out)
        assert proc.returncode == 0, out
        assert "stopped:" in out


@pytest.fixture
def server(tmp_path: Path, broker: Broker) -> Iterator[Path]:
    """``edge-fleet serve --bundles DIR`` as a process; yields DIR."""
    with _serving(tmp_path, broker) as (bundles, _):
        yield bundles


def test_deploy_wait_and_status(
    tmp_path: Path, broker: Broker, keys: Keys, build, server: Path
) -> None:
    bundle = build("1.0.0", block_size=4096).path
    key = keys.store.release_key_paths()[0]
    config = agent_config(tmp_path / "cam-01", keys.dir, broker, "cam-01")
    env = _env(broker)
    with agent(config):
        done = _fleet(
            "deploy",
            str(bundle),
            "--device",
            "cam-01",
            "--key",
            str(key),
            "--bundles",
            str(server),
            "--wait",
            "60",
            env=env,
        )
        assert done.returncode == 0, done.stderr
        assert "published deployment dep-" in done.stdout
        assert (server / bundle.name).is_file(), "the bundle was staged for the server"
        assert Path(f"{bundle}.dsse").is_file(), "signed on the way"
        assert "tiny active" in done.stderr

        status = _fleet("status", "--json", env=env)
        assert status.returncode == 0, status.stderr
        state = json.loads(status.stdout)["cam-01"]
        assert state["online"] is True
        assert state["agent_version"] == __version__
        seen = datetime.fromisoformat(state["last_seen"])
        reported_at = datetime.fromisoformat(state["reported"]["at"])
        assert reported_at <= seen <= datetime.now(timezone.utc), "the newest the device sent"
        model = state["reported"]["models"]["tiny"]
        assert (model["phase"], model["version"], model["variant"]) == (
            "active",
            "1.0.0",
            "onnx-fp32",
        )
        assert model["runtime"].startswith("onnxruntime ")

        table = _fleet("status", env=env)
        assert table.returncode == 0, table.stderr
        header, row = table.stdout.splitlines()[:2]
        assert header.split() == [
            "DEVICE",
            "ONLINE",
            "SEEN",
            "AGENT",
            "MODEL",
            "VERSION",
            "VARIANT",
            "RUNTIME",
            "PHASE",
            "ERROR",
        ]
        device, online, age, version, *rest = row.split()
        assert (device, online, version) == ("cam-01", "yes", __version__)
        assert re.fullmatch(r"\d+[smhd]", age), age
        assert rest == ["tiny", "1.0.0", "onnx-fp32", "onnxruntime", "CPU", "active"]
        assert len(row) <= 100, "readable in 100 columns"


def test_deploy_to_a_group_reaches_its_members(
    tmp_path: Path, broker: Broker, keys: Keys, build, server: Path
) -> None:
    bundle = build("1.0.0", block_size=4096).path
    key = keys.store.release_key_paths()[0]
    env = _env(broker)
    configs = [
        agent_config(tmp_path / d, keys.dir, broker, d, groups=("lobby",))
        for d in ("cam-01", "cam-02")
    ]
    with watcher(broker) as fleet, agent(configs[0]), agent(configs[1]):
        done = _fleet(
            "deploy",
            str(bundle),
            "--group",
            "lobby",
            "--key",
            str(key),
            "--bundles",
            str(server),
            env=env,
        )
        assert done.returncode == 0, done.stderr
        for device in ("cam-01", "cam-02"):
            fleet.wait(
                device,
                lambda r: (
                    r.models.get("tiny") is not None and r.models["tiny"].phase == Phase.ACTIVE
                ),
            )


def test_deploy_refused_by_the_broker_acl_is_an_error(
    tmp_path: Path, broker: Broker, keys: Keys, build
) -> None:
    """With a device's certificate the deploy cannot publish a desired document (MQTT 5 0x87)."""
    bundle = build("1.0.0", block_size=4096).path
    key = keys.store.release_key_paths()[0]
    done = _fleet(
        "deploy",
        str(bundle),
        "--device",
        "cam-02",
        "--key",
        str(key),
        "--bundles",
        str(tmp_path / "b"),
        env=_env(broker, identity="cam-01"),
    )
    assert done.returncode == 3
    assert "refused" in done.stderr
    assert "ACL" in done.stderr


def test_cannot_reach_the_broker_is_a_clear_error(tmp_path: Path, broker: Broker) -> None:
    env = _env(broker)
    env["EDGE_FLEET_BROKER"] = f"{broker.host}:1"  # nothing listens on port 1
    done = _fleet("status", env=env, timeout=60)
    assert done.returncode == 3
    assert "cannot connect" in done.stderr


def test_keys_publish_reaches_devices(
    tmp_path: Path, broker: Broker, keys: Keys, build, server: Path
) -> None:
    """A rotated release key reaches devices on the trust topic; its signatures then verify."""
    config = agent_config(tmp_path / "cam-01", keys.dir, broker, "cam-01")
    shutil.copytree(keys.dir, tmp_path / "shipped")  # the device keeps the keyring it shipped with
    config = config.model_copy(
        update={
            "trust": config.trust.model_copy(
                update={
                    "root": tmp_path / "shipped" / "root.json",
                    "keyring": tmp_path / "shipped" / "keyring.json",
                }
            )
        }
    )
    keys.store.rotate_release(now=datetime.now(timezone.utc))  # the old release key is revoked
    new_key = keys.store.release_key_paths()[0]
    bundle = build("1.0.0", block_size=4096).path
    env = _env(broker)
    with agent(config) as device:
        published = _fleet("keys", "publish", str(keys.dir), env=env)
        assert published.returncode == 0, published.stderr
        assert "keyring v2" in published.stdout
        done = _fleet(
            "deploy",
            str(bundle),
            "--device",
            "cam-01",
            "--key",
            str(new_key),
            "--bundles",
            str(server),
            "--wait",
            "60",
            env=env,
        )
        assert done.returncode == 0, done.stderr + done.stdout
        assert device.trusted.keyring is not None
        assert device.trusted.keyring.version == 2
    floors = json.loads((tmp_path / "cam-01" / "trust" / "floors.json").read_text())
    assert floors["keyring_floor"] == 2


@pytest.mark.parametrize(
    ("value", "tls"), [(None, True), ("false", False), ("0", False), ("1", True)]
)
def test_edge_fleet_tls_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, value: str | None, tls: bool
) -> None:
    if value is None:
        monkeypatch.delenv("EDGE_FLEET_TLS", raising=False)
    else:
        monkeypatch.setenv("EDGE_FLEET_TLS", value)
    args = fleet_parser().parse_args(["status", "--broker", "127.0.0.1:1883"])
    settings = mqtt_settings(args) if not tls else None
    assert args.no_tls is (not tls)
    if settings is not None:
        assert settings.tls is False
        assert settings.port == 1883


def test_serve_keeps_to_max_packet_bytes(tmp_path: Path, broker: Broker, keys: Keys, build) -> None:  # type: ignore[no-untyped-def]
    """A limit below a 64 KiB block's packet: the device reports block-too-large, the server
    stays connected. (The broker here announces no limit: the configured one alone applies.)"""
    model = make_onnx(tmp_path / "wide.onnx", inputs=256, outputs=128)  # 128 KiB of weights
    bundle = build("1.0.0", models=[model], block_size=65536, samples="none").path
    assert bundle.stat().st_size > 65536, "at least one full block"
    key = keys.store.release_key_paths()[0]
    config = agent_config(tmp_path / "cam-01", keys.dir, broker, "cam-01")
    with (
        _serving(tmp_path, broker, "--max-packet-bytes", "32768") as (served, printed),
        agent(config),
    ):
        assert "packets up to 32768 bytes" in printed[0]
        done = _fleet(
            "deploy",
            str(bundle),
            "--device",
            "cam-01",
            "--key",
            str(key),
            "--bundles",
            str(served),
            "--wait",
            "60",
            env=_env(broker),
        )
    assert done.returncode == 1, done.stderr
    assert "tiny: block-too-large:" in done.stderr
    assert "block of 65536 bytes" in done.stderr
    assert "limit of 32768 bytes" in done.stderr
    assert "reconnect" not in printed[-1], printed[-1]


def test_serve_reports_each_bundle_and_with_verbose_each_request(
    tmp_path: Path, broker: Broker, keys: Keys, build
) -> None:
    """Per-bundle lines (the last, cut short, when it stops) whose blocks add up to what it
    sent; -v adds a debug line per request."""
    bundle = build("1.0.0", block_size=4096).path
    key = keys.store.release_key_paths()[0]
    config = agent_config(tmp_path / "cam-01", keys.dir, broker, "cam-01")
    options = ("-v", "--report-interval", "1")
    with _serving(tmp_path, broker, *options) as (served, printed), agent(config):
        done = _fleet(
            "deploy",
            str(bundle),
            "--device",
            "cam-01",
            "--key",
            str(key),
            "--bundles",
            str(served),
            "--wait",
            "60",
            env=_env(broker),
        )
        assert done.returncode == 0, done.stderr
    out = printed[-1]
    reports = re.findall(
        rf"INFO agent.fleet.server: {re.escape(bundle.name)}: (\d+) request\(s\) from (\d) "
        r"device\(s\) in [\d.]+ s: (\d+) block\(s\), (\d+) page\(s\)",
        out,
    )
    assert reports, out
    assert {devices for _, devices, _, _ in reports} <= {"0", "1"}
    stopped = re.search(r"stopped: (\d+) blocks and (\d+) block-list pages", out)
    assert stopped is not None, out
    assert sum(int(r[2]) for r in reports) == int(stopped[1]) > 0
    assert sum(int(r[3]) for r in reports) == int(stopped[2])
    asked = re.findall(
        rf"DEBUG agent.fleet.server: cam-01 asks for {re.escape(bundle.name)}: ", out
    )
    assert len(asked) == sum(int(r[0]) for r in reports)


def test_serve_refuses_a_packet_limit_no_reply_fits(tmp_path: Path) -> None:
    served = tmp_path / "served"
    served.mkdir()
    env = {**os.environ, "EDGE_FLEET_BROKER": "127.0.0.1:9", "EDGE_FLEET_TLS": "false"}
    done = _fleet("serve", "--bundles", str(served), "--max-packet-bytes", "512", env=env)
    assert done.returncode == 2, done.stderr
    assert "below 1024" in done.stderr
    assert "edge-fleet serve:" not in done.stderr, "refused before it starts"


def test_serve_help_explains_max_packet_bytes(capsys) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit):
        fleet_parser().parse_args(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--max-packet-bytes N" in text
    assert "MQTT 3.1.1 announces none" in text


def test_keys_publish_writes_the_trust_message_for_mosquitto_pub(
    tmp_path: Path, keys: Keys
) -> None:
    from agent.transport.messages import TrustUpdate

    out = tmp_path / "trust.json"
    env = {**os.environ, "EDGE_FLEET_BROKER": "127.0.0.1:1"}  # never reached: --no-publish
    done = _fleet("keys", "publish", str(keys.dir), "-o", str(out), "--no-publish", env=env)
    assert done.returncode == 0, done.stderr
    assert f"wrote root chain v1..v1 and keyring v1 to {out}" in done.stdout
    update = TrustUpdate.from_bytes(out.read_bytes())
    assert update.roots == []
    assert keys.state().update_keyring(
        json.dumps(update.keyring).encode(), datetime.now(timezone.utc)
    )


def test_deploy_follow_groups_signs_a_hand_back(tmp_path: Path, keys: Keys) -> None:
    from agent.trust.envelope import parse_envelope

    key = keys.store.release_key_paths()[0]
    out = tmp_path / "back.json"
    env = {**os.environ, "EDGE_FLEET_BROKER": "127.0.0.1:1"}
    args = ["--key", str(key), "-o", str(out), "--no-publish"]
    done = _fleet("deploy", "--device", "cam-01", "--follow-groups", *args, env=env)
    assert done.returncode == 0, done.stderr
    doc = json.loads(parse_envelope(out.read_bytes()).payload)
    assert doc["follow_groups"] is True
    assert doc["models"] == {}
    assert doc["target"] == {"kind": "device", "id": "cam-01"}
    # Only for a device, and with no bundles; and an ordinary document does not carry the field.
    group = _fleet("deploy", "--group", "lobby", "--follow-groups", *args, env=env)
    assert group.returncode == 2
    assert "--follow-groups hands a --device back" in group.stderr
    nothing = _fleet("deploy", "--device", "cam-01", *args, env=env)
    assert nothing.returncode == 2
    assert "name the bundles to deploy" in nothing.stderr


def _release_key_of(keys: Keys, keyid: str) -> Path:
    return keys.dir / "private" / f"release-{keyid[:16]}.pem"


def _signature_keyids(bundle: Path) -> set[str]:
    from agent.trust.envelope import parse_envelope

    return {s.keyid for s in parse_envelope(Path(f"{bundle}.dsse").read_bytes()).signatures}


def test_deploy_after_a_release_rotation_signs_the_descriptor_again(
    tmp_path: Path, broker: Broker, keys: Keys, build, server: Path
) -> None:
    """The bundle was signed before `keys rotate --release` revoked its key: deploy with the new
    key signs the descriptor again (the revoked signature dropped), and the device takes it."""
    bundle = build("1.0.0", block_size=4096).path
    env = _env(broker)
    old = keys.release.keyid
    signed = _fleet(
        "bundle", "sign", str(bundle), "--key", str(_release_key_of(keys, old)), env=env
    )
    assert signed.returncode == 0, signed.stderr
    rotated = _fleet("keys", "rotate", str(keys.dir), "--release", env=env)
    assert rotated.returncode == 0, rotated.stderr
    (new,) = keys.store.current_keyring().release_keys
    config = agent_config(tmp_path / "cam-01", keys.dir, broker, "cam-01")
    with agent(config):
        published = _fleet("keys", "publish", str(keys.dir), env=env)
        assert published.returncode == 0, published.stderr
        done = _fleet(
            "deploy",
            str(bundle),
            "--device",
            "cam-01",
            "--key",
            str(_release_key_of(keys, new)),
            "--bundles",
            str(server),
            "--wait",
            "60",
            env=env,
        )
        assert done.returncode == 0, done.stderr + done.stdout
        assert "tiny active" in done.stderr
    notes = [line for line in done.stderr.splitlines() if "signed again" in line]
    assert notes == [
        f"edge-fleet: {bundle.name}.dsse: its signatures do not satisfy keyring v2 (threshold 1); "
        f"signed again with {new[:16]}, dropped 1 that no longer count ({old[:16]})"
    ]
    assert _signature_keyids(bundle) == {new}
    assert _signature_keyids(server / bundle.name) == {new}, "the staged copy too"


def _deploy_out(
    bundle: Path, key: Path, out: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EDGE_FLEET_BROKER": "127.0.0.1:1"}  # never reached: --no-publish
    args = ["--key", str(key), "--bundles", str(out.parent / "served"), "-o", str(out)]
    return _fleet(
        "deploy", str(bundle), "--device", "cam-01", *args, "--no-publish", *extra, env=env
    )


def _two_release_keys(keys: Keys) -> str:
    """Keyring v2: the first release key and a second one, and two signatures required.
    Returns the second key's id."""
    from agent.fleet.keys import _public
    from agent.trust.keys import Signer
    from agent.trust.metadata import ReleaseKey

    store = keys.store
    second = Signer.generate()
    store._write_private("release", second)
    old = store.current_keyring()
    expires = old.release_keys[keys.release.keyid].expires
    keyring = old.model_copy(
        update={
            "version": old.version + 1,
            "threshold": 2,
            "release_keys": {
                **old.release_keys,
                second.keyid: ReleaseKey(key=_public(second), expires=expires, models=["*"]),
            },
        }
    )
    store._publish_keyring(keyring, store._root_signers(store.current_root()))
    return second.keyid


def test_deploy_keeps_the_signatures_that_still_count(tmp_path: Path, keys: Keys, build) -> None:
    """Two signatures required; one of the two signers is revoked: the other one's signature
    stays, the revoked one goes, the new key adds its own, and the document verifies."""
    from agent.trust.envelope import parse_envelope
    from agent.trust.metadata import DeploymentTarget

    first, second = keys.release.keyid, _two_release_keys(keys)
    bundle = build("1.0.0", block_size=4096).path
    env = {**os.environ}
    both = ["--key", str(_release_key_of(keys, first)), "--key", str(_release_key_of(keys, second))]
    signed = _fleet("bundle", "sign", str(bundle), *both, env=env)
    assert signed.returncode == 0, signed.stderr
    payload = parse_envelope(Path(f"{bundle}.dsse").read_bytes()).payload
    rotated = _fleet("keys", "rotate", str(keys.dir), "--release", "--keep", first[:16], env=env)
    assert rotated.returncode == 0, rotated.stderr
    keyring = keys.store.current_keyring()
    assert keyring.threshold == 2
    (new,) = set(keyring.release_keys) - {first}

    out = tmp_path / "doc.json"
    done = _deploy_out(bundle, _release_key_of(keys, first), out)
    assert done.returncode == 2, done.stderr
    assert "asks for 2 release signatures; 1 of its own still count and --key adds 0" in (
        done.stderr
    )
    assert not out.exists(), "nothing written"
    assert _signature_keyids(bundle) == {first, second}, "the envelope left as it was"

    done = _deploy_out(
        bundle, _release_key_of(keys, new), out, "--key", str(_release_key_of(keys, first))
    )
    assert done.returncode == 0, done.stderr
    assert f"dropped 1 that no longer count ({second[:16]}), kept 1 that still count" in done.stderr
    envelope = parse_envelope(Path(f"{bundle}.dsse").read_bytes())
    assert {s.keyid for s in envelope.signatures} == {first, new}
    assert envelope.payload == payload, "the terms the kept signature vouches for"
    now = datetime.now(timezone.utc)
    verified = keys.store.state(now).verify_deployment(
        out.read_bytes(), now, targets=[DeploymentTarget(kind="device", id="cam-01")]
    )
    assert verified.bundles["tiny"].signers == {first, new}


def test_deploy_refuses_keys_the_keyring_does_not_allow(tmp_path: Path, keys: Keys, build) -> None:
    """A revoked key, a key for other models, a key outside any key directory: each refused
    before anything is written."""
    bundle = build("1.0.0", block_size=4096).path
    old = keys.release.keyid
    revoked = tmp_path / "revoked.pem"
    shutil.copyfile(_release_key_of(keys, old), revoked)
    env = {**os.environ}
    rotated = _fleet("keys", "rotate", str(keys.dir), "--release", "--models", "other", env=env)
    assert rotated.returncode == 0, rotated.stderr
    (scoped,) = keys.store.current_keyring().release_keys
    out = tmp_path / "doc.json"

    done = _deploy_out(bundle, revoked, out, "--trust", str(keys.dir))
    assert done.returncode == 2, done.stderr
    assert f"release key {old[:16]} is not in keyring v2 (revoked, or never added)" in done.stderr
    done = _deploy_out(bundle, _release_key_of(keys, scoped), out)
    assert done.returncode == 2, done.stderr
    assert f"release key {scoped[:16]} may not sign model 'tiny' (it signs other)" in done.stderr
    done = _deploy_out(bundle, revoked, out)
    assert done.returncode == 2, done.stderr
    assert "is not in a key directory" in done.stderr
    assert "give --trust" in done.stderr
    assert not out.exists()
    assert not Path(f"{bundle}.dsse").exists(), "nothing signed"
    assert not (tmp_path / "served").exists(), "nothing staged"


@pytest.mark.parametrize("days", ["0", "-3"])
def test_days_that_expire_at_once_are_a_usage_error(
    tmp_path: Path, keys: Keys, build, days: str
) -> None:
    """A document valid for no day has expired when it is published: refused, nothing written."""
    bundle = build("1.0.0", block_size=4096).path
    key = str(keys.store.release_key_paths()[0])
    out = tmp_path / "doc.json"
    env = {**os.environ, "EDGE_FLEET_BROKER": "127.0.0.1:1"}
    for argv in (
        ["deploy", str(bundle), "--device", "cam-01", "--key", key, "-o", str(out), "--days", days],
        ["bundle", "sign", str(bundle), "--key", key, "--days", days],
        ["keys", "init", str(tmp_path / "k"), "--keyring-days", days],
    ):
        done = _fleet(*argv, env=env)
        assert done.returncode == 2, (argv, done.stderr)
        flag = argv[-2]
        assert f"error: argument {flag}: {days} days: " in done.stderr, done.stderr
        assert "at least 1" in done.stderr
    assert not out.exists()
    assert not Path(f"{bundle}.dsse").exists()
    assert not (tmp_path / "k").exists()
    assert not (tmp_path / "bundles").exists()
