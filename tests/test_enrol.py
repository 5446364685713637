"""Enrolment as a fleet and a technician do it: ``edge-fleet device add`` on make-certs.sh's CA,
``edge-agent enroll`` into a config directory (real files, their modes and group checked), the
agent running on what it installed against mosquitto with the shipped config and TLS; a
certificate renewed under a running agent (SIGHUP), and under an MQTT session by its file watch
alone; a revoked device refused by the broker through the shipped config's CRL.

The config directory is a tmp copy of /etc/edge-agent (``--config-dir``): the shipped agent.toml,
the drop-in enrolment writes, and a ``90-local.toml`` with this test's state directory.
"""

from __future__ import annotations

import grp
import json
import logging
import os
import queue
import re
import shutil
import signal
import ssl
import stat
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from paho.mqtt.enums import CallbackAPIVersion

from agent.config import load_config
from agent.fleet.keys import KeyStore
from agent.testing.broker import Broker, make_certs, shipped_broker
from agent.testing.fleet import REPO, WAIT, agent_process
from agent.testing.wait import wait_until
from agent.transport.session import InboxItem, Session

BIN = Path(sys.executable).parent
SHIPPED = REPO / "config" / "agent.toml"


def _group() -> str:
    """The group enrolment gives the key: one other than ours where we may choose (root)."""
    if os.geteuid() == 0:
        for name in ("daemon", "nogroup", "users"):
            try:
                return grp.getgrnam(name).gr_name
            except KeyError:
                continue
    return grp.getgrgid(os.getgid()).gr_name


GROUP = _group()


def run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGE_AGENT_", "EDGE_FLEET_"))}
    return subprocess.run(
        [str(a) for a in args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
    )


def ok(*args: str | Path, cwd: Path | None = None) -> str:
    done = run(*args, cwd=cwd)
    assert done.returncode == 0, f"{args}\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fleet's CA (make-certs.sh): no device yet; an operator for watching."""
    return make_certs(tmp_path_factory.mktemp("pki"), operators=["operator"])


@pytest.fixture(scope="module")
def fleet_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return KeyStore.init(
        tmp_path_factory.mktemp("keys") / "fleet-keys", now=datetime.now(timezone.utc)
    ).root


def box(tmp_path: Path, name: str = "etc", tls_check_s: float = 0.5) -> Path:
    """A fresh box's /etc/edge-agent: the shipped agent.toml and a local drop-in (state dir,
    no local API, quick reconnects, the TLS files looked at every ``tls_check_s``)."""
    etc = tmp_path / name
    (etc / "agent.toml.d").mkdir(parents=True)
    shutil.copyfile(SHIPPED, etc / "agent.toml")
    (etc / "agent.toml.d" / "90-local.toml").write_text(
        f'state_dir = "{tmp_path / (name + "-state")}"\nstatus_socket = ""\n'
        "[mqtt]\nkeepalive_s = 5\nbackoff_initial_s = 0.2\nbackoff_max_s = 1.0\n"
        'tls_check_s = 0.5\n[api]\nport = false\nunix_socket = ""\n'
    )
    return etc


def add(pki: Path, keys: Path, device: str, out: Path, *extra: str, port: int = 8883) -> Path:
    ok(
        BIN / "edge-fleet", "device", "add", device, "--pki", pki, "--trust", keys,
        "--broker", f"127.0.0.1:{port}", "-o", out, *extra,
    )  # fmt: skip
    return out


def enroll(etc: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return run(BIN / "edge-agent", "enroll", *args, "--config-dir", etc, "--group", GROUP)


def mode(path: Path) -> tuple[int, int]:
    st = path.stat()
    return stat.S_IMODE(st.st_mode), st.st_gid


def hexs(serial: int) -> str:
    """A serial as openssl and edge-fleet write it: upper-case hex of whole bytes."""
    text = f"{serial:X}"
    return text if len(text) % 2 == 0 else "0" + text


def tree(etc: Path) -> dict[str, bytes | None]:
    """Every path under ``etc`` with its bytes (None: a directory)."""
    return {
        str(p.relative_to(etc)): None if p.is_dir() else p.read_bytes()
        for p in sorted(etc.rglob("*"))
    }


# -- installing ---------------------------------------------------------------------------------
def test_device_add_then_enroll_installs_each_file_with_its_mode_and_check_config_passes(
    tmp_path: Path, pki: Path, fleet_keys: Path
) -> None:
    enrolment = add(
        pki,
        fleet_keys,
        "cam-10",
        tmp_path / "cam-10.enrol.json",
        "--group",
        "lobby",
        "--group",
        "site-a",
    )
    assert stat.S_IMODE(enrolment.stat().st_mode) == 0o600  # it holds the device's key
    doc = json.loads(enrolment.read_text())
    assert (doc["format"], doc["version"], doc["device_id"]) == (
        "edge-model-agent-enrolment",
        1,
        "cam-10",
    )
    assert doc["root"] == (fleet_keys / "root.json").read_text()
    assert doc["key"].startswith("-----BEGIN PRIVATE KEY-----")
    assert (pki / "cam-10.crt").read_text() == doc["cert"]  # make-certs.sh --revoke finds it

    etc = box(tmp_path)
    done = enroll(etc, enrolment)
    assert done.returncode == 0, done.stderr
    gid = grp.getgrnam(GROUP).gr_gid
    tls = etc / "tls"
    assert mode(tls) == (0o750, gid)
    assert mode(tls / "device.key") == (0o640, gid)
    for public in (tls / "ca.crt", tls / "device.crt", etc / "root.json", etc / "keyring.json"):
        assert stat.S_IMODE(public.stat().st_mode) == 0o644, public
        assert public.stat().st_uid == os.geteuid()
    assert (tls / "device.crt").read_text() == doc["cert"]
    assert (tls / "ca.crt").read_bytes() == (pki / "ca.crt").read_bytes()
    assert (etc / "keyring.json").read_bytes() == (fleet_keys / "keyring.json").read_bytes()
    assert not [p for p in etc.rglob(".*")]  # no temp file left
    listed = (etc / "enrolment.files").read_text().split()
    assert set(listed) == {
        str(p)
        for p in (
            tls / "ca.crt", tls / "device.crt", tls / "device.key", etc / "root.json",
            etc / "keyring.json", etc / "agent.toml.d" / "50-enrolment.toml", etc / "enrolment.files",
        )
    }  # fmt: skip

    # The shipped file is untouched; the drop-in says what this box is.
    assert (etc / "agent.toml").read_bytes() == SHIPPED.read_bytes()
    config = load_config(etc / "agent.toml", {})
    assert (config.device_id, config.groups) == ("cam-10", ["lobby", "site-a"])
    assert (config.mqtt.host, config.mqtt.port, config.mqtt.tls) == ("127.0.0.1", 8883, True)
    assert (config.mqtt.cert_file, config.mqtt.key_file) == (tls / "device.crt", tls / "device.key")
    assert (config.trust.root, config.trust.keyring) == (etc / "root.json", etc / "keyring.json")

    check = run(BIN / "edge-agent", "check-config", etc / "agent.toml")
    assert check.returncode == 0, check.stderr
    assert check.stderr == ""  # no warning either: the keyring came with it
    assert check.stdout.startswith(f"{etc / 'agent.toml'}: ok\n")
    assert str(etc / "agent.toml.d" / "50-enrolment.toml") in check.stdout


def test_with_a_csr_the_key_never_leaves_the_box(
    tmp_path: Path, pki: Path, fleet_keys: Path
) -> None:
    etc = box(tmp_path)
    csr = tmp_path / "cam-11.csr"
    done = enroll(etc, "--csr", "--device-id", "cam-11", "-o", csr)
    assert done.returncode == 0, done.stderr
    pending = etc / "tls" / "device.key.new"
    assert mode(pending) == (0o640, grp.getgrnam(GROUP).gr_gid)
    key_pem = pending.read_bytes()
    request = x509.load_pem_x509_csr(csr.read_bytes())
    assert request.subject.rfc4514_string() == "CN=cam-11"

    enrolment = add(pki, fleet_keys, "cam-11", tmp_path / "cam-11.enrol.json", "--csr", str(csr))
    assert json.loads(enrolment.read_text())["key"] is None
    assert b"PRIVATE KEY" not in enrolment.read_bytes()
    done = enroll(etc, enrolment)
    assert done.returncode == 0, done.stderr
    assert "key made by enroll --csr" in done.stdout
    assert (etc / "tls" / "device.key").read_bytes() == key_pem
    assert not pending.exists()
    assert run(BIN / "edge-agent", "check-config", etc / "agent.toml").returncode == 0

    # A CSR for another name is refused by the fleet side before anything is issued.
    before = (pki / "private" / "ca" / "index.txt").read_bytes()
    wrong = run(
        BIN / "edge-fleet", "device", "add", "cam-12", "--pki", pki, "--trust", fleet_keys,
        "--broker", "127.0.0.1", "--csr", csr, "-o", tmp_path / "x.json",
    )  # fmt: skip
    assert wrong.returncode == 1, wrong.stderr
    assert "the CSR is for 'cam-11', not 'cam-12'" in wrong.stderr
    assert (pki / "private" / "ca" / "index.txt").read_bytes() == before
    assert not (pki / "cam-12.crt").exists()
    assert not (tmp_path / "x.json").exists()


def _spoil(doc: dict[str, object], how: str, pki: Path, other: dict[str, object]) -> None:
    if how == "key":
        doc["key"] = other["key"]
    elif how == "ca":
        doc["ca_cert"] = (pki / "operator-ca.crt").read_text()
    elif how == "device-id":
        doc["device_id"] = "cam-99"
    elif how == "version":
        doc["version"] = 2
    elif how == "root":
        doc["root"] = doc["keyring"]  # signed, but not a root


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("key", "its key is not the key of its certificate"),
        ("ca", "is not signed by the CA"),
        ("device-id", "is for device 'cam-99' but its certificate is 'cam-13''s"),
        ("version", "is of version 2; this agent reads version 1"),
        ("root", "its trust root or keyring does not verify"),
    ],
)
def test_a_bad_enrolment_file_is_refused_with_a_reason_and_nothing_written(
    tmp_path: Path, pki: Path, fleet_keys: Path, how: str, reason: str
) -> None:
    good = json.loads(add(pki, fleet_keys, "cam-13", tmp_path / "a.json", "--renew").read_text())
    other = json.loads(add(pki, fleet_keys, "cam-14", tmp_path / "b.json", "--renew").read_text())
    _spoil(good, how, pki, other)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(good))
    etc = box(tmp_path)
    before = tree(etc)
    done = enroll(etc, bad)
    assert done.returncode == 1, done.stdout + done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith("edge-agent: rejected ("), line
    assert reason in line, line
    assert str(bad) in line, line
    assert tree(etc) == before


def test_an_existing_device_needs_renew_and_revoke_writes_the_crl(
    tmp_path: Path, pki: Path, fleet_keys: Path
) -> None:
    first = add(pki, fleet_keys, "cam-15", tmp_path / "a.json")
    again = run(
        BIN / "edge-fleet", "device", "add", "cam-15", "--pki", pki, "--trust", fleet_keys,
        "--broker", "127.0.0.1", "-o", tmp_path / "b.json",
    )  # fmt: skip
    assert again.returncode == 2
    assert "cam-15 has a certificate already" in again.stderr
    assert "--renew" in again.stderr
    old_serial = x509.load_pem_x509_certificate(
        json.loads(first.read_text())["cert"].encode()
    ).serial_number
    renewed = ok(
        BIN / "edge-fleet", "device", "add", "cam-15", "--pki", pki, "--trust", fleet_keys,
        "--broker", "127.0.0.1", "-o", tmp_path / "b.json", "--renew",
    )  # fmt: skip
    assert f"device revoke cam-15 --serial {hexs(old_serial)}" in renewed

    said = ok(
        BIN / "edge-fleet", "device", "revoke", "cam-15", "--serial", hexs(old_serial), "--pki", pki
    )
    assert "systemctl restart mosquitto" in said
    crl = x509.load_pem_x509_crl((pki / "ca.crl").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(old_serial) is not None
    new_serial = x509.load_pem_x509_certificate((pki / "cam-15.crt").read_bytes()).serial_number
    assert crl.get_revoked_certificate_by_serial_number(new_serial) is None
    # make-certs.sh makes the CRL from the same database: it keeps what was revoked here.
    make_certs(pki, "cam-16")
    crl = x509.load_pem_x509_crl((pki / "ca.crl").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(old_serial) is not None
    assert "revoked already" in ok(
        BIN / "edge-fleet",
        "device",
        "revoke",
        "cam-15",
        "--serial",
        f"{old_serial:X}",
        "--pki",
        pki,
    )


# -- on the broker --------------------------------------------------------------------------------
@pytest.fixture
def broker(tmp_path: Path, pki: Path) -> Iterator[Broker]:
    with shipped_broker(tmp_path / "broker", pki) as b:
        yield b


def connections(broker: Broker, device: str, since: int = 0) -> int:
    """How often ``device`` connected, in the broker's log after its first ``since`` chars."""
    found = re.findall(
        rf"New client connected from \S+ as {re.escape(device)} ", broker.log()[since:]
    )
    return len(found)


def restart(broker: Broker) -> int:
    """Restart mosquitto (it reads its CRL at start); where its log goes on from."""
    broker.stop()
    mark = len(broker.log())
    broker.start()
    return mark


def can_connect(broker: Broker, ca: Path, cert: Path, key: Path) -> bool:
    """A plain paho client with these files: whether the broker lets it in."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="probe", protocol=mqtt.MQTTv5)
    client.tls_set(
        ca_certs=str(ca), certfile=str(cert), keyfile=str(key), cert_reqs=ssl.CERT_REQUIRED
    )
    try:
        client.connect(broker.host, broker.port, keepalive=5)
        for _ in range(200):
            client.loop(timeout=0.05)
            if client.is_connected():
                return True
    except (OSError, ssl.SSLError):
        return False
    finally:
        client.disconnect()
    return False


def test_a_renewed_certificate_is_taken_up_by_the_running_agent_and_a_revoked_one_refused(
    tmp_path: Path, pki: Path, fleet_keys: Path, broker: Broker
) -> None:
    etc = box(tmp_path, tls_check_s=0)  # no file watch: the reload alone takes them up
    first = add(pki, fleet_keys, "cam-20", tmp_path / "cam-20.json", port=broker.port)
    assert enroll(etc, first).returncode == 0
    old_serial = x509.load_pem_x509_certificate(
        (etc / "tls" / "device.crt").read_bytes()
    ).serial_number
    log = tmp_path / "agent.log"
    with agent_process(etc / "agent.toml", log) as proc:
        wait_until(lambda: connections(broker, "cam-20") >= 1, WAIT, 0.1, lambda: log.read_text())

        # Renewal with a key made on the box, taken up on SIGHUP (systemctl reload).
        csr = tmp_path / "renew.csr"
        assert enroll(etc, "--csr", "--device-id", "cam-20", "-o", csr).returncode == 0
        renewed = add(
            pki,
            fleet_keys,
            "cam-20",
            tmp_path / "renew.json",
            "--renew",
            "--csr",
            str(csr),
            port=broker.port,
        )
        done = enroll(etc, renewed)
        assert done.returncode == 0, done.stderr
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: connections(broker, "cam-20") >= 2, WAIT, 0.1, lambda: broker.log())
        assert "reconnecting with the new certificate" in log.read_text()

        # The old certificate revoked, the broker restarted with the new CRL: the agent is
        # let in again (it uses the new certificate), the old pair is refused.
        old_pair = tmp_path / "old"
        old_pair.mkdir()
        first_doc = json.loads(first.read_text())
        (old_pair / "c.crt").write_text(first_doc["cert"])
        (old_pair / "c.key").write_text(first_doc["key"])
        ok(
            BIN / "edge-fleet",
            "device",
            "revoke",
            "cam-20",
            "--serial",
            hexs(old_serial),
            "--pki",
            pki,
        )
        mark = restart(broker)
        wait_until(
            lambda: connections(broker, "cam-20", mark) >= 1, WAIT, 0.1, lambda: log.read_text()
        )
        assert not can_connect(broker, pki / "ca.crt", old_pair / "c.crt", old_pair / "c.key")

        assert proc.poll() is None, log.read_text()

        # A revoked device: refused by the shipped config's CRL once the broker has it.
        assert can_connect(
            broker, pki / "ca.crt", etc / "tls" / "device.crt", etc / "tls" / "device.key"
        )
        ok(BIN / "edge-fleet", "device", "revoke", "cam-20", "--pki", pki)
        mark = restart(broker)
        assert not can_connect(
            broker, pki / "ca.crt", etc / "tls" / "device.crt", etc / "tls" / "device.key"
        )
        # The agent keeps trying, and is refused each time in the TLS handshake (the same
        # certificate that got in before the CRL named it).
        wait_until(
            lambda: broker.log()[mark:].count("certificate verify failed") >= 3,
            WAIT,
            0.1,
            lambda: broker.log()[mark:],
        )
        assert connections(broker, "cam-20", mark) == 0


def test_the_session_takes_up_renewed_files_by_itself_and_not_a_pair_that_does_not_load(
    tmp_path: Path, pki: Path, fleet_keys: Path, broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    etc = box(tmp_path)
    assert enroll(etc, add(pki, fleet_keys, "cam-21", tmp_path / "a.json")).returncode == 0
    settings = load_config(etc / "agent.toml", {}).mqtt.model_copy(
        update={"host": broker.host, "port": broker.port, "tls_check_s": 0.2}
    )
    inbox: queue.SimpleQueue[InboxItem] = queue.SimpleQueue()
    session = Session(settings, "cam-21", inbox)
    caplog.set_level(logging.INFO, logger="agent.transport")
    session.start()
    try:
        wait_until(lambda: session.connected.is_set(), WAIT, message=broker.log)
        # A key written before its certificate: the pair does not load; the connection stays.
        renewed = json.loads(
            add(pki, fleet_keys, "cam-21", tmp_path / "b.json", "--renew").read_text()
        )
        (etc / "tls" / "device.key").write_text(renewed["key"])
        wait_until(lambda: "do not load" in caplog.text, WAIT, message=lambda: caplog.text)
        assert (session.connects, session.tls_reloads) == (1, 0)
        assert session.connected.is_set()
        # Its certificate follows: taken up, with a reconnect the broker sees.
        (etc / "tls" / "device.crt").write_text(renewed["cert"])
        wait_until(lambda: session.connects == 2, WAIT, message=broker.log)
        assert session.tls_reloads == 1
        assert connections(broker, "cam-21") == 2
        assert "reconnecting with the new certificate" in caplog.text
    finally:
        session.stop()
