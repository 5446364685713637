"""The systemd unit (verified and scored by systemd-analyze) and the daemon's logging."""

from __future__ import annotations

import io
import logging
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.logs import JournalHandler, PriorityFormatter, log_fields, setup_logging
from agent.transport.messages import Phase

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "edge-agent.service"
EXEC = "/usr/bin/edge-agent"


def _unit_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart on a stub that exists (verify checks the binary is executable)."""
    stub = tmp_path / "bin" / "edge-agent"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    text = UNIT.read_text()
    assert f"ExecStart={EXEC} run --config /etc/edge-agent/agent.toml\n" in text
    unit = tmp_path / "edge-agent.service"
    unit.write_text(text.replace(f"ExecStart={EXEC} ", f"ExecStart={stub} "))
    return unit


def _analyze(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("systemd-analyze")
    assert tool is not None, "systemd-analyze is needed"
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=60)


def test_unit_verifies_clean(tmp_path: Path) -> None:
    done = _analyze("verify", str(_unit_copy(tmp_path)))
    assert done.returncode == 0, done.stderr
    assert (done.stdout + done.stderr).strip() == "", done.stdout + done.stderr


def test_unit_exposure_is_at_most_2(tmp_path: Path) -> None:
    done = _analyze("security", "--offline=true", str(_unit_copy(tmp_path)))
    found = re.search(r"Overall exposure level for edge-agent\.service: ([0-9.]+)", done.stdout)
    assert found is not None, done.stdout[-2000:] + done.stderr
    assert float(found.group(1)) <= 2.0, done.stdout


def _settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def test_unit_keeps_accelerators_and_jit() -> None:
    s = _settings()
    assert s["Type"] == ["notify"]
    assert s["NotifyAccess"] == ["main"]
    assert s["WatchdogSec"] == ["30"]
    assert s["Restart"] == ["on-failure"]
    assert s["User"] == ["edge-agent"]
    assert s["CapabilityBoundingSet"] == [""]
    assert s["DevicePolicy"] == ["closed"]
    allowed = {v.split()[0] for v in s["DeviceAllow"]}
    assert {"char-nvidia*", "char-nvidia-uvm", "char-drm", "char-accel"} <= allowed
    assert "MemoryDenyWriteExecute" not in s  # the runtimes' JIT needs W+X memory
    assert "PrivateDevices" not in s  # it would hide the accelerators
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]


# -- logging ------------------------------------------------------------------------------------
def test_log_fields_names_the_journal_fields() -> None:
    assert log_fields(
        model="tiny", version="1.0.0", deployment_id="d-1", bundle_id="ab", phase=Phase.ACTIVE
    ) == {
        "MODEL": "tiny",
        "MODEL_VERSION": "1.0.0",
        "DEPLOYMENT_ID": "d-1",
        "BUNDLE_ID": "ab",
        "PHASE": "active",
    }
    assert log_fields(model="tiny") == {"MODEL": "tiny"}


@pytest.fixture
def root_logging() -> Iterator[logging.Logger]:
    """The root logger, its handlers and level put back afterwards (pytest's capture too)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield root
    root.handlers[:] = handlers
    root.setLevel(level)


def test_stderr_lines_carry_syslog_priorities(tmp_path: Path, root_logging: logging.Logger) -> None:
    out = io.StringIO()
    handler = setup_logging(False, journal_socket=tmp_path / "no-journal", stream=out)
    assert isinstance(handler.formatter, PriorityFormatter)
    log = logging.getLogger("agent.test")
    log.debug("hidden")
    log.info("tiny 1.0.0 is active", extra=log_fields(model="tiny"))
    log.warning("slow")
    log.error("two\nlines")
    assert out.getvalue().splitlines() == [
        "<6>INFO agent.test: tiny 1.0.0 is active",
        "<4>WARNING agent.test: slow",
        "<3>ERROR agent.test: two",
        "<3>lines",
    ]


def test_journal_handler_sends_structured_fields() -> None:
    sent: list[tuple[str, dict[str, str]]] = []
    handler = JournalHandler(send=lambda message, **fields: sent.append((message, fields)))
    log = logging.getLogger("agent.test.journal")
    log.propagate = False
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    try:
        log.info(
            "deployment of %s failed",
            "tiny",
            extra=log_fields(model="tiny", deployment_id="d-1", phase=Phase.FAILED),
        )
    finally:
        log.removeHandler(handler)
        log.propagate = True
    [(message, fields)] = sent
    assert message == "deployment of tiny failed"
    assert fields["PRIORITY"] == "6"
    assert fields["SYSLOG_IDENTIFIER"] == "edge-agent"
    assert fields["MODEL"] == "tiny"
    assert fields["DEPLOYMENT_ID"] == "d-1"
    assert fields["PHASE"] == "failed"
    assert "MODEL_VERSION" not in fields


def test_setup_logging_prefers_journald(tmp_path: Path, root_logging: logging.Logger) -> None:
    socket_file = tmp_path / "journal-socket"
    socket_file.touch()  # only its existence is checked
    assert isinstance(setup_logging(True, journal_socket=socket_file), JournalHandler)
    assert logging.getLogger().level == logging.DEBUG
