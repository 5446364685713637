"""``edge-agent status``: the running agent's state, on a Unix socket.

The agent's loop publishes a snapshot (a JSON-able mapping) every tick with
:meth:`StatusServer.update`; it is serialised there, on the loop's thread, and kept as bytes, so
the server's thread never touches the agent's state. A client connects, reads one JSON document
(the latest snapshot) to end of file, and that is all: the server reads nothing from it. An idle
loop may sleep for most of a minute, so a client's connection first asks it for a fresh snapshot
(``refresh``: it wakes the loop) and is answered with that, or with the latest one if none comes
within ``fresh_wait_s``.

Bounded: at most ``max_clients`` connections are served at a time (one more is closed at once,
unanswered) and a send that cannot finish within ``send_timeout_s`` is dropped. The socket is
created with ``mode`` (0660: the agent's group may ask) under a temporary name and renamed into
place. A socket file nobody answers on (left by an agent that did not stop cleanly) is replaced;
one a live process answers on is refused. A clean stop removes the socket, unless another agent
has put a newer one there since.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from agent._strictjson import loads
from agent._unixsock import bind_unix
from agent.errors import EdgeAgentError, NotRunningError, StorageError

log = logging.getLogger("agent.status")

DEFAULT_SOCKET = Path("/run/edge-agent/status.sock")
MAX_STATUS_BYTES = 1 << 20  # a snapshot is a few KiB; a client reads at most this much


class StatusServer:
    """Serves the latest snapshot on ``path``; :meth:`start`, :meth:`update`, :meth:`stop`."""

    def __init__(
        self,
        path: Path,
        snapshot: Mapping[str, Any],
        *,
        mode: int = 0o660,
        max_clients: int = 8,
        send_timeout_s: float = 2.0,
        refresh: Callable[[], None] | None = None,
        fresh_wait_s: float = 1.0,
    ) -> None:
        self.path = path
        self.mode = mode
        self.send_timeout_s = send_timeout_s
        self.fresh_wait_s = fresh_wait_s
        self.served = 0  # connections answered
        self.refused = 0  # connections closed unanswered: max_clients were being served
        self._refresh = refresh
        self._lock = threading.Lock()
        self._updated = threading.Condition(self._lock)
        self._generation = 0  # updates so far
        self._data = _encode(snapshot)
        self._clients = threading.BoundedSemaphore(max_clients)
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._inode: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def update(self, snapshot: Mapping[str, Any]) -> None:
        """Make ``snapshot`` what the next client reads (thread-safe; serialised here)."""
        data = _encode(snapshot)
        with self._lock:
            self._data = data
            self._generation += 1
            self._updated.notify_all()

    def start(self) -> None:
        """Listen on the socket; StorageError or ConfigError if that cannot be done."""
        self._sock = bind_unix(self.path, self.mode, "status_socket")
        st = os.stat(self.path)
        self._inode = (st.st_dev, st.st_ino)
        self._sock.listen(16)
        self._stop.clear()
        self._thread = threading.Thread(target=self._serve, name="status-socket", daemon=True)
        self._thread.start()
        log.info("status socket listening on %s", self.path)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, wait for the accept loop, remove the socket file (if still ours)."""
        self._stop.set()
        if self._sock is not None:
            # Wakes the accept loop's blocking accept() (Linux: EINVAL), which then sees stop.
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        inode, self._inode = self._inode, None
        if inode is not None:
            with contextlib.suppress(OSError):
                st = os.lstat(self.path)
                if (st.st_dev, st.st_ino) == inode:  # not one a newer agent has put there
                    self.path.unlink()

    def __enter__(self) -> StatusServer:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def _serve(self) -> None:
        sock = self._sock
        assert sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError as exc:
                if not self._stop.is_set():
                    log.error("the status socket stopped accepting: %s", exc)
                return
            if not self._clients.acquire(blocking=False):
                with self._lock:
                    self.refused += 1
                conn.close()
                continue
            try:
                threading.Thread(
                    target=self._answer, args=(conn,), name="status-client", daemon=True
                ).start()
            except BaseException:
                conn.close()
                self._clients.release()
                raise

    def _fresh(self) -> bytes:
        """The snapshot taken after this call began (or the latest, after ``fresh_wait_s``)."""
        with self._lock:
            seen = self._generation
        if self._refresh is not None:
            self._refresh()
            with self._lock:
                self._updated.wait_for(lambda: self._generation > seen, self.fresh_wait_s)
        with self._lock:
            return self._data

    def _answer(self, conn: socket.socket) -> None:
        try:
            data = self._fresh()
            conn.settimeout(self.send_timeout_s)
            conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
            with self._lock:
                self.served += 1
        except OSError as exc:  # a client gone or too slow: its loss
            log.debug("status client dropped: %s", exc)
        finally:
            conn.close()
            self._clients.release()


def query(path: Path, timeout: float = 5.0) -> dict[str, Any]:
    """What the agent listening on ``path`` reports; NotRunningError if nothing answers."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(os.fsencode(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise NotRunningError(path) from None
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            size += len(chunk)
            if size > MAX_STATUS_BYTES:
                raise StorageError(f"the status on {path} is over {MAX_STATUS_BYTES} bytes")
            chunks.append(chunk)
    except TimeoutError:
        raise StorageError(f"the agent did not answer on {path} within {timeout:g} s") from None
    except OSError as exc:
        raise StorageError(f"cannot ask the agent on {path}: {exc.strerror or exc}") from None
    finally:
        sock.close()
    try:
        doc = loads(b"".join(chunks), what=f"the status on {path}", max_bytes=MAX_STATUS_BYTES)
    except EdgeAgentError as exc:
        raise StorageError(str(exc)) from None
    if not isinstance(doc, dict):
        raise StorageError(f"the agent's status on {path} is not a JSON object")
    return doc


def _encode(snapshot: Mapping[str, Any]) -> bytes:
    return json.dumps(snapshot, separators=(",", ":"), sort_keys=True).encode() + b"\n"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    s = int(seconds)
    d, h, m = s // 86400, s % 86400 // 3600, s % 3600 // 60
    if d:
        return f"{d}d {h}h"
    if h:
        return f"{h}h {m}m"
    return f"{m}m {s % 60}s"


def _text(value: object) -> str:
    return "-" if value is None or value == "" else str(value)


def render(doc: Mapping[str, Any]) -> str:
    """A snapshot for people: the agent, its broker and deployment, then one line per model."""
    broker = doc.get("broker") or {}
    uptime = doc.get("uptime_s")
    head = f"{_text(doc.get('device_id'))}: agent {_text(doc.get('agent_version'))}"
    if isinstance(uptime, (int, float)):
        head += f", up {_duration(float(uptime))}"
    head += ", ready" if doc.get("ready") else ", starting (restored models not loaded yet)"
    state = "connected" if broker.get("connected") else "not connected"
    connects = broker.get("connects")
    where = f"{_text(broker.get('host'))}:{_text(broker.get('port'))}"
    lines = [
        head,
        f"  broker      {where} {state}"
        + (f" ({connects} connect{'' if connects == 1 else 's'})" if connects else ""),
    ]
    dep = doc.get("deployment")
    if isinstance(dep, Mapping):
        lines.append(
            f"  deployment  {_text(dep.get('id'))} (sequence {_text(dep.get('sequence'))}"
            f", from {_text(dep.get('source'))})"
        )
    else:
        lines.append("  deployment  none")
    api = doc.get("api") or []
    lines.append(f"  api         {', '.join(str(a) for a in api) or 'off'}")
    error = doc.get("error")
    if isinstance(error, Mapping):
        lines.append(f"  last error  {_text(error.get('code'))}: {_text(error.get('message'))}")
    models = doc.get("models") or {}
    if not models:
        lines.append("no models")
        return "\n".join(lines)
    headers = ["MODEL", "VERSION", "VARIANT", "RUNTIME", "PHASE", "PROGRESS", "ERROR"]
    rows = []
    for name in sorted(models):
        m = models[name] if isinstance(models[name], Mapping) else {}
        err = m.get("error")
        progress = m.get("progress")
        rows.append(
            [
                str(name),
                _text(m.get("version")),
                _text(m.get("variant")),
                _text(m.get("runtime")),
                _text(m.get("phase")),
                f"{progress:.1f}%" if isinstance(progress, (int, float)) else "",
                f"{err.get('code')}: {err.get('message')}" if isinstance(err, Mapping) else "",
            ]
        )
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines.append("")
    lines.append("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)
