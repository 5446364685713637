"""The daemon's log in a real journal: ``systemd-journald`` started by the test.

journald runs in a mount namespace of its own (``unshare``): a private /run/systemd for its
sockets, and the test's directory bind-mounted on /run/log, where it keeps its volatile journal.
``edge-agent run`` runs in the same namespace, so it finds the journal socket and logs through
``systemd.journal``; ``journalctl --directory`` reads the result from outside.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.testing.broker import Broker
from agent.testing.fleet import (
    REPO,
    TOPICS,
    WAIT,
    active,
    agent_config,
    bundle_server,
    deployment,
    serve_copy,
    watcher,
    write_agent_toml,
)
from tests.conftest import Keys

JOURNALD = Path("/lib/systemd/systemd-journald")

pytestmark = pytest.mark.skipif(
    not (JOURNALD.exists() and shutil.which("unshare") and shutil.which("journalctl"))
    or os.geteuid() != 0,
    reason="needs systemd-journald, unshare and journalctl, as root (a mount namespace)",
)


def _under_journald(journal: Path, command: list[str], log: Path) -> subprocess.Popen[bytes]:
    script = f"""
set -e
mount -t tmpfs tmpfs /run/systemd
mount --bind {shlex.quote(str(journal))} /run/log
{JOURNALD} &
for i in $(seq 100); do [ -S /run/systemd/journal/socket ] && break; sleep 0.05; done
exec {shlex.join(command)}
"""
    with open(log, "ab") as out:
        return subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "bash", "-c", script],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            start_new_session=True,  # journald and the agent: one process group to stop
        )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """The agent first (its last records go to the journal), then journald (it syncs)."""
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(WAIT) == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)


def _entries(journal: Path, *matches: str) -> list[dict[str, object]]:
    out = subprocess.run(
        [
            "journalctl",
            "--directory",
            str(journal / "journal"),
            "-o",
            "json",
            "--no-pager",
            *matches,
        ],
        capture_output=True,
        check=True,
        timeout=WAIT,
    ).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_the_daemon_logs_structured_fields_to_journald(
    tmp_path: Path, broker: Broker, keys: Keys, signed
) -> None:  # type: ignore[no-untyped-def]
    journal = tmp_path / "journal"
    journal.mkdir()
    served = tmp_path / "served"
    served.mkdir()
    envelope = serve_copy(signed("1.0.0"), served)
    config = agent_config(tmp_path / "cam-01", keys.dir, broker, "cam-01")
    toml = write_agent_toml(config, tmp_path / "agent.toml")
    edge_agent = str(Path(sys.executable).parent / "edge-agent")
    stderr = tmp_path / "stderr.log"
    with watcher(broker) as fleet, bundle_server(broker, served):
        doc = deployment({"tiny": envelope}, keys.release, device="cam-01")
        fleet.publish(TOPICS.device("cam-01").desired, doc)
        proc = _under_journald(journal, [edge_agent, "run", "--config", str(toml)], stderr)
        try:
            report = fleet.wait("cam-01", active("tiny", "1.0.0"))
        finally:
            _stop(proc)
    # Logging went to the journal, not to stderr (what journald would otherwise parse).
    assert "is active" not in stderr.read_text()
    assert "Traceback" not in stderr.read_text()  # e.g. a field systemd.journal cannot send
    deployment_id = report.deployment_id
    bundle = report.models["tiny"].bundle_sha256
    [done] = [
        e
        for e in _entries(journal, "MODEL=tiny", "PHASE=active")
        if "is active" in str(e["MESSAGE"])
    ]
    assert done["SYSLOG_IDENTIFIER"] == "edge-agent"
    assert done["PRIORITY"] == "6"
    assert done["MODEL_VERSION"] == "1.0.0"
    assert done["DEPLOYMENT_ID"] == deployment_id
    assert done["BUNDLE_ID"] == bundle
    assert done["CODE_FILE"].endswith("daemon.py")  # type: ignore[union-attr]
    assert int(str(done["CODE_LINE"])) > 0
    # Each phase of the deployment is there, findable by its fields.
    phases = [e["PHASE"] for e in _entries(journal, "MODEL=tiny")]
    for phase in ("pending", "downloading", "verifying", "unpacking", "loading", "active"):
        assert phase in phases, phases
    # A record without fields of its own goes there too, with its priority.
    stopping = _entries(journal, "SYSLOG_IDENTIFIER=edge-agent", "MESSAGE=stopping")
    assert stopping
    assert stopping[0]["PRIORITY"] == "6"
