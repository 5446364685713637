"""The systemd notification protocol (``sd_notify``): READY, STATUS, WATCHDOG, STOPPING.

Sent through systemd-python (``systemd.daemon.notify``) when it is installed; otherwise the
datagram goes to ``$NOTIFY_SOCKET`` from here (a path, or an abstract name written ``@name``).
Without ``$NOTIFY_SOCKET`` (not started by systemd, or ``Type=`` other than notify) every call
does nothing. A failed send is logged and never raised: the agent goes on without the manager.

The watchdog interval is half of ``$WATCHDOG_USEC`` (what sd_watchdog_enabled(3) advises), and
only when ``$WATCHDOG_PID`` is unset or names this process.
"""

from __future__ import annotations

import faulthandler
import importlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

log = logging.getLogger("agent.notify")

MAX_STATUS_CHARS = 200

NotifyFn = Callable[[str], object]


def _module_notify() -> NotifyFn | None:
    # Imported by name: mypy would take the repository's systemd/ folder (the unit) for it.
    try:
        daemon = importlib.import_module("systemd.daemon")
    except ImportError:
        return None
    fn: NotifyFn = daemon.notify
    return fn


def watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Seconds between WATCHDOG=1 pings (half the manager's timeout), or None when it is off."""
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2e6 if value > 0 else None


def send_datagram(address: str, message: str) -> None:
    """One notification datagram to ``address`` (``@name``: the abstract socket ``name``)."""
    target = "\0" + address[1:] if address.startswith("@") else address
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(target)
        sock.sendall(message.encode())


class Notifier:
    """Tells the service manager how the agent stands.

    ``env`` defaults to the process environment; with an explicit ``env`` the datagram is always
    written here (systemd-python reads only ``os.environ``). ``use_module=False`` forces that too.
    """

    def __init__(
        self,
        env: Mapping[str, str] | None = None,
        *,
        use_module: bool = True,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        environ: Mapping[str, str] = os.environ if env is None else env
        self.socket: str | None = environ.get("NOTIFY_SOCKET") or None
        self.watchdog_interval = watchdog_interval(environ) if self.socket else None
        self._module = _module_notify() if use_module and env is None else None
        self._mono = monotonic
        self._last_watchdog = float("-inf")
        self._last_status: str | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.socket is not None

    def send(self, message: str) -> bool:
        """Send ``message`` (``KEY=VALUE`` lines); False when nothing was sent."""
        if self.socket is None:
            return False
        try:
            if self._module is not None:
                self._module(message)
            else:
                send_datagram(self.socket, message)
        except (OSError, ValueError) as exc:
            if not self._warned:
                self._warned = True
                log.warning("cannot notify the service manager at %s: %s", self.socket, exc)
            return False
        return True

    def ready(self) -> bool:
        return self.send("READY=1")

    def status(self, text: str) -> bool:
        """STATUS=text; a repeat of the last status is not sent again."""
        line = _one_line(text)
        if line == self._last_status:
            return False
        self._last_status = line
        return self.send(f"STATUS={line}")

    def watchdog_due(self) -> bool:
        """The watchdog is on and its last ping is at least half its timeout ago."""
        if self.watchdog_interval is None:
            return False
        return self._mono() - self._last_watchdog >= self.watchdog_interval

    def watchdog_in(self) -> float | None:
        """Seconds until the next ping is due (<= 0: now), or None with the watchdog off."""
        if self.watchdog_interval is None:
            return None
        return self._last_watchdog + self.watchdog_interval - self._mono()

    def watchdog(self) -> bool:
        self._last_watchdog = self._mono()
        return self.send("WATCHDOG=1")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def reloading(self) -> bool:
        return self.send("RELOADING=1")


def _one_line(text: str) -> str:
    return " ".join(text.split())[:MAX_STATUS_CHARS]


class StopDeadline:
    """Once ``stop`` is set, the agent has ``limit_s`` to drain and close (:meth:`done`); past
    that, it logs where every thread stands and exits with 1, before the service manager's
    SIGKILL (TimeoutStopSec) would end it without a word. Runs on a daemon thread."""

    def __init__(
        self, stop: threading.Event, limit_s: float, *, exit: Callable[[int], object] = os._exit
    ) -> None:
        self._stop, self._limit, self._exit = stop, limit_s, exit
        self._finished = threading.Event()
        self.thread = threading.Thread(target=self._guard, name="stop-deadline", daemon=True)
        self.thread.start()

    def done(self) -> None:
        self._finished.set()
        self._stop.set()  # wakes the guard, which then sees the stop finished

    def _guard(self) -> None:
        self._stop.wait()
        if self._finished.wait(self._limit):
            return
        log.error("stopping took more than %.0f s; exiting now (threads below)", self._limit)
        faulthandler.dump_traceback(all_threads=True)
        self._exit(1)
