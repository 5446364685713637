"""sd_notify: the Notifier's datagrams on a real socket, and the daemon's READY/WATCHDOG/STOPPING.

Every wait is bounded; the socket is a real AF_UNIX datagram socket as systemd would pass it.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.cli import STOP_LIMIT_S
from agent.daemon import DeviceAgent
from agent.device.machine import SlotEvent
from agent.notify import Notifier, StopDeadline, watchdog_interval
from agent.testing.broker import Broker
from agent.testing.fleet import (
    REPO,
    TOPICS,
    WAIT,
    active,
    agent_config,
    agent_process,
    bundle_server,
    deployment,
    watcher,
    write_agent_toml,
)
from agent.testing.wait import wait_until
from agent.transport.messages import Phase
from tests.conftest import Keys
from tests.sdnotify import Listener

SYS_TGKILL = {"x86_64": 234, "aarch64": 131}[os.uname().machine]


@pytest.fixture
def listener() -> Iterator[Listener]:
    # A short path: sun_path holds 108 bytes and pytest's tmp_path can be longer.
    directory = tempfile.mkdtemp(prefix="ean-")
    path = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    try:
        yield Listener(sock, path)
    finally:
        sock.close()
        shutil.rmtree(directory, ignore_errors=True)


def test_notifier_sends_exact_messages(listener: Listener) -> None:
    n = Notifier({"NOTIFY_SOCKET": listener.address})
    assert n.enabled
    assert n.ready()
    assert n.status("serving tiny 1.0.0;\n downloading detector 42%")
    assert not n.status("serving tiny 1.0.0; downloading detector 42%")  # unchanged: not sent
    assert n.watchdog()
    assert n.reloading()
    assert n.stopping()
    assert listener.drain() == [
        "READY=1",
        "STATUS=serving tiny 1.0.0; downloading detector 42%",
        "WATCHDOG=1",
        "RELOADING=1",
        "STOPPING=1",
    ]


def test_notifier_uses_systemd_python_from_the_environment(
    listener: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", listener.address)
    n = Notifier()
    assert n._module is not None  # systemd.daemon.notify is installed in the venv
    assert n.ready()
    assert n.stopping()
    assert listener.drain() == ["READY=1", "STOPPING=1"]


def test_notifier_writes_to_an_abstract_socket() -> None:
    name = f"edge-agent-test-{os.getpid()}-{threading.get_ident()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).ready()
        assert sock.recv(64) == b"READY=1"


def test_notifier_without_socket_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    for n in (Notifier(), Notifier({"WATCHDOG_USEC": "1000000"})):
        assert not n.enabled
        assert not n.ready()
        assert not n.watchdog_due()
        assert not n.watchdog()


def test_notifier_survives_a_missing_manager(tmp_path: Path) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert not n.ready()
    assert not n.stopping()


def test_watchdog_interval_is_half_the_timeout() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "x"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}) is None
    own = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    assert watchdog_interval(own) == 1.0


def test_watchdog_due_follows_the_clock(listener: Listener) -> None:
    now = [100.0]
    env = {"NOTIFY_SOCKET": listener.address, "WATCHDOG_USEC": "4000000"}
    n = Notifier(env, monotonic=lambda: now[0])
    assert n.watchdog_interval == 2.0
    assert n.watchdog_due()
    n.watchdog()
    now[0] += 1.9
    assert not n.watchdog_due()
    now[0] += 0.1
    assert n.watchdog_due()
    assert listener.drain() == ["WATCHDOG=1"]


# -- the daemon ---------------------------------------------------------------------------------
def test_daemon_process_ready_after_restore_watchdog_and_stopping(
    tmp_path: Path,
    broker: Broker,
    keys: Keys,
    signed: Callable[..., tuple[Path, bytes]],
    listener: Listener,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path, envelope = signed("1.0.0")
    served = tmp_path / "served"
    served.mkdir()
    shutil.copyfile(path, served / path.name)
    config = agent_config(tmp_path / "cam-01", keys.dir, broker, "cam-01")
    toml = write_agent_toml(config, tmp_path / "agent.toml")
    log = tmp_path / "agent.log"
    with watcher(broker) as fleet, bundle_server(broker, served):
        fleet.publish(
            TOPICS.device("cam-01").desired,
            deployment({"tiny": envelope}, keys.release, device="cam-01"),
        )
        with agent_process(toml, log) as proc:  # not under systemd: no NOTIFY_SOCKET
            fleet.wait("cam-01", active("tiny", "1.0.0"), what="tiny active")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(10) == 0
        assert listener.drain() == []
        first_run = log.read_text()

        monkeypatch.setenv("NOTIFY_SOCKET", listener.address)
        monkeypatch.setenv("WATCHDOG_USEC", "1000000")
        with agent_process(toml, log) as proc:
            before_ready = listener.wait_for("READY=1", timeout=60)
            second_run = log.read_text()[len(first_run) :]
            # READY=1 only once the restored model serves (logged before the datagram).
            assert "restored tiny: active" in second_run, second_run[-3000:]
            assert before_ready[0] == "STATUS=starting", before_ready
            listener.wait_for("WATCHDOG=1", timeout=5)
            listener.wait_for("WATCHDOG=1", timeout=5)
            assert "STATUS=serving tiny 1.0.0" in listener.messages, listener.messages
            proc.send_signal(signal.SIGTERM)
            stopped = time.monotonic()
            listener.wait_for("STOPPING=1", timeout=5)
            assert proc.wait(10) == 0
            assert time.monotonic() - stopped < 10
        assert listener.messages.count("READY=1") == 1


def _tgkill(pid: int, tid: int, sig: int) -> None:
    """Send ``sig`` to one thread of another process (Linux's tgkill; os.kill picks a thread)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(SYS_TGKILL, pid, tid, sig) != 0:
        raise OSError(ctypes.get_errno(), f"tgkill {pid} {tid}")


def test_a_signal_taken_by_any_thread_wakes_the_idle_loop(
    tmp_path: Path, broker: Broker, keys: Keys
) -> None:
    """The idle loop sleeps until its next timer (up to a minute); a SIGHUP or SIGTERM that the
    kernel hands to another of its threads (paho's, uvicorn's, ...) is acted on at once all the
    same."""
    config = agent_config(tmp_path / "cam-03", keys.dir, broker, "cam-03")
    toml = write_agent_toml(config, tmp_path / "agent.toml")
    log = tmp_path / "agent.log"
    with watcher(broker) as fleet, agent_process(toml, log) as proc:
        wait_until(lambda: "ready:" in log.read_text(), WAIT, message="the agent ready")
        wait_until(lambda: fleet.online("cam-03") is True, WAIT, message="cam-03 online")
        threads = [int(t) for t in os.listdir(f"/proc/{proc.pid}/task") if int(t) != proc.pid]
        assert threads, "the agent runs threads besides its main one"
        _tgkill(proc.pid, threads[-1], signal.SIGHUP)
        wait_until(
            lambda: "reload requested" in log.read_text(), 10, message="the reload, within 10 s"
        )
        _tgkill(proc.pid, threads[0], signal.SIGTERM)
        try:
            code = proc.wait(10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"SIGTERM on a thread: still running 10 s later\n{log.read_text()[-3000:]}")
        assert code == 0
        assert "stopping" in log.read_text()


def test_wedged_loop_sends_no_watchdog(
    tmp_path: Path, broker: Broker, keys: Keys, listener: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    device = DeviceAgent(agent_config(tmp_path / "cam-02", keys.dir, broker, "cam-02"))
    env = {"NOTIFY_SOCKET": listener.address, "WATCHDOG_USEC": "200000"}  # a ping every 0.1 s
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            device.run(stop, Notifier(env))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, name="agent-cam-02", daemon=True)
    thread.start()
    entered, release = threading.Event(), threading.Event()
    real_handle = device.handle

    def wedged(item: object) -> None:
        if isinstance(item, SlotEvent) and item.name == "wedge":
            entered.set()
            release.wait(WAIT)
            return
        real_handle(item)  # type: ignore[arg-type]

    try:
        listener.wait_for("READY=1", timeout=WAIT)  # no models: ready at once
        listener.wait_for("WATCHDOG=1", timeout=5)
        monkeypatch.setattr(device, "handle", wedged)
        device.inbox.put(SlotEvent("wedge", Phase.LOADING, None, None))
        assert entered.wait(5)
        listener.drain()  # what was sent before the loop wedged
        deadline = time.monotonic() + 1.0  # ten watchdog intervals
        during: list[str] = []
        while (left := deadline - time.monotonic()) > 0:
            m = listener.receive(left)
            if m is not None:
                during.append(m)
        assert "WATCHDOG=1" not in during, during
        release.set()
        listener.wait_for("WATCHDOG=1", timeout=5)  # the control: pings resume
    finally:
        release.set()
        stop.set()
        thread.join(15)
    assert not thread.is_alive()
    assert not errors, errors
    assert "STOPPING=1" in listener.drain()


def test_a_stop_that_hangs_past_the_deadline_exits_with_1() -> None:
    exits: list[int] = []
    stop = threading.Event()
    deadline = StopDeadline(stop, 0.2, exit=exits.append)
    stop.set()
    deadline.thread.join(5)
    assert exits == [1]


def test_a_stop_that_finishes_in_time_does_not_exit() -> None:
    exits: list[int] = []
    stop = threading.Event()
    deadline = StopDeadline(stop, 0.5, exit=exits.append)
    stop.set()
    deadline.done()
    deadline.thread.join(5)
    assert not deadline.thread.is_alive()
    assert exits == []


def test_the_stop_limit_is_below_the_units_stop_timeout() -> None:
    unit = (REPO / "systemd" / "edge-agent.service").read_text()
    timeout = float(re.search(r"^TimeoutStopSec=(\d+)", unit, re.M).group(1))  # type: ignore[union-attr]
    assert timeout > STOP_LIMIT_S
