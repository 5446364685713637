"""Resuming a large download never starves the watchdog.

A restarted agent finds 2 GiB of a bundle on disk, every block marked in its bitmap; before it
counts them it reads each one back and checks it against the signed block list (a power cut may
have written the bitmap before the data). That takes seconds here and minutes on a small box,
longer than systemd's watchdog allows: it must happen off the agent's loop, while READY=1 and
then WATCHDOG=1 keep arriving on a real NOTIFY_SOCKET.

The part file is sparse and the "bundle" is all zeros (its block list, the digests of zero
blocks, is signed like any other): once every block checks out, the archive check refuses it,
which ends the test.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from agent._strictjson import dump_model
from agent.state.store import StateStore
from agent.testing.broker import Broker
from agent.testing.fleet import (
    TOPICS,
    WAIT,
    agent_config,
    agent_process,
    deployment,
    failed,
    watcher,
    write_agent_toml,
)
from agent.trust.envelope import sign_envelope
from agent.trust.metadata import DESCRIPTOR_TYPE, BundleDescriptor
from tests.conftest import Keys

DEVICE = "cam-01"
BLOCK = 1 << 20
SIZE = 2 << 30
WATCHDOG_S = 2.0  # WATCHDOG_USEC: the agent pings every second


class Manager:
    """The service manager's end of NOTIFY_SOCKET, with the time each message came."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="eaw-")  # short: sun_path holds 108 bytes
        self.address = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.address)
        self.sock.settimeout(0.1)
        self.got: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.got.append((time.monotonic(), data.decode()))

    def when(self, message: str) -> list[float]:
        return [t for t, m in list(self.got) if m == message]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _downloaded_on_disk(state: Path, keys: Keys) -> bytes:
    """A signed descriptor of 2 GiB of zeros, and its download, complete, left by a kill."""
    zero = hashlib.sha256(bytes(BLOCK)).digest()
    block_list = zero * (SIZE // BLOCK)
    now = datetime.now(timezone.utc).replace(microsecond=0)
    descriptor = BundleDescriptor(
        model="tiny",
        version="9.0.0",
        release=9,
        bundle_sha256="ab" * 32,  # names the download; the bytes are checked block by block
        bundle_size=SIZE,
        block_size=BLOCK,
        block_list_sha256=hashlib.sha256(block_list).hexdigest(),
        manifest_sha256="cd" * 32,
        created=now,
        expires=now + timedelta(days=1),
    )
    download = state / "downloads" / descriptor.bundle_sha256
    download.mkdir(parents=True)
    (download / "blocklist").write_bytes(block_list)
    with open(download / "bundle.part", "wb") as f:
        f.truncate(SIZE)  # sparse: nothing is written
    (download / "bitmap").write_bytes(b"\xff" * (SIZE // BLOCK // 8))
    return sign_envelope(DESCRIPTOR_TYPE, dump_model(descriptor), [keys.release]).to_bytes()


def test_watchdog_pings_go_on_while_a_large_download_is_checked_again(
    tmp_path: Path, broker: Broker, keys: Keys
) -> None:
    state = tmp_path / "state"
    envelope = _downloaded_on_disk(state, keys)
    # The document the killed agent had accepted, as it left it on disk.
    document = deployment({"tiny": envelope}, keys.release, device=DEVICE)
    StateStore(state).save_desired("device", document)
    toml = write_agent_toml(agent_config(state, keys.dir, broker, DEVICE), tmp_path / "agent.toml")
    log = tmp_path / "agent.log"
    manager = Manager()
    try:
        with watcher(broker) as fleet:
            fleet.publish(TOPICS.device(DEVICE).desired, document)
            env = {"NOTIFY_SOCKET": manager.address, "WATCHDOG_USEC": str(int(WATCHDOG_S * 1e6))}
            with agent_process(toml, log, env=env) as proc:
                # Every block checks out; then the archive check refuses all zeros.
                fleet.wait(DEVICE, failed("tiny", "archive"), timeout=120, what="checked")
                done = time.monotonic()
                assert proc.poll() is None
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(WAIT) == 0
    finally:
        manager.close()
    text = log.read_text()
    assert "2048 of 2048 blocks on disk check out" in text, text[-3000:]
    ready = manager.when("READY=1")
    assert len(ready) == 1, manager.got
    assert ready[0] < done - 2 * WATCHDOG_S, "the check outlasted the watchdog's timeout"
    pings = [t for t in manager.when("WATCHDOG=1") if ready[0] <= t <= done]
    gaps = [b - a for a, b in zip([ready[0], *pings], [*pings, done], strict=True)]
    assert max(gaps) < WATCHDOG_S, f"the loop went {max(gaps):.1f} s without a ping"
