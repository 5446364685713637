"""Listeners for the inference API: uvicorn on TCP (loopback by default) and on a Unix socket.

One uvicorn server runs both listeners in one asyncio event loop, on a thread of its own
(``edge-agent-api``); the daemon's threads only call :meth:`ApiServer.start` and
:meth:`ApiServer.stop`::

    api = InferenceApi(slots, settings, metrics=metrics)
    server = serve_api(api, settings)     # returns once both listeners accept connections
    ...
    server.stop()                         # stop accepting, let requests finish, close the app

The sockets are bound by :meth:`ApiServer.start` on the caller's thread, so a port in use or a
socket path that cannot be created raises there, before anything runs. The Unix socket is bound
under a temporary name, given its mode (0660 by default), then renamed into place, so it never
exists at its path with wider permissions; a stale socket left by a killed agent is replaced,
one another process still listens on is not.

uvicorn is given no logging configuration of its own (its records go to the agent's handlers)
and installs no signal handlers (it only does so on the main thread).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from email.utils import formatdate
from pathlib import Path
from types import TracebackType
from typing import Any

import uvicorn

from agent._unixsock import bind_unix
from agent.errors import ConfigError, EdgeAgentError
from agent.serving.api import ApiSettings
from agent.serving.replies import Receive, Scope, Send

log = logging.getLogger("agent.serving.api")

ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class _Server(uvicorn.Server):
    """uvicorn's server, telling the starting thread once it listens, and sleeping while idle.

    uvicorn's own main loop wakes every 0.1 s to look at ``should_exit`` and, each second, to
    renew the Date header. This one sleeps until :meth:`wake` (from :meth:`ApiServer.stop`);
    it renews the Date header when a connection is made, and each second only while there
    are connections.
    """

    def __init__(self, config: uvicorn.Config, started: threading.Event) -> None:
        super().__init__(config)
        self._listening = started
        self._loop: asyncio.AbstractEventLoop | None = None
        self._woken: asyncio.Event | None = None
        self._date_at = -1

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        protocol = self.config.http_protocol_class

        def connection(*args: Any, **kwargs: Any) -> asyncio.Protocol:
            self._renew_date()
            if self._woken is not None:
                self._woken.set()  # on the loop's thread: a tick each second while connected
            return protocol(*args, **kwargs)

        self.config.http_protocol_class = connection  # type: ignore[assignment]
        await super().startup(sockets=sockets)
        self._listening.set()

    async def main_loop(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._woken = woken = asyncio.Event()
        while not self.should_exit:
            self._renew_date()
            timeout = 1.0 if self.server_state.connections else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(woken.wait(), timeout)
            woken.clear()

    def wake(self) -> None:
        """From any thread: have the main loop look at ``should_exit`` now."""
        loop, woken = self._loop, self._woken
        if loop is not None and woken is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed already
                loop.call_soon_threadsafe(woken.set)

    def _renew_date(self) -> None:
        now = int(time.time())
        if now != self._date_at:
            self._date_at = now
            date = [(b"date", formatdate(now, usegmt=True).encode())]
            headers = self.config.encoded_headers
            self.server_state.default_headers = (
                date + headers if self.config.date_header else list(headers)
            )


class ApiServer:
    """Runs ``app`` on the listeners ``settings`` names; see the module docstring."""

    def __init__(
        self,
        app: ASGIApp,
        settings: ApiSettings,
        *,
        name: str = "the inference API",
        tls: Mapping[str, Any] | None = None,
    ) -> None:
        if settings.port is None and settings.unix_socket is None:
            raise ConfigError(f"{name} needs a TCP port or a Unix socket (or both)")
        self.app = app
        self.settings = settings
        self.name = name  # for the log and the errors: "the inference API", "the dashboard"
        self.tls = dict(tls or {})  # uvicorn's ssl_* settings (certificate, key, client CAs)
        self.tcp_address: tuple[str, int] | None = None  # (host, port) once started
        self.unix_socket: Path | None = None
        self._sockets: list[socket.socket] = []
        self._unix_inode: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None
        self._server: _Server | None = None
        self._listening = threading.Event()
        self._failure: BaseException | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, timeout: float = 30.0) -> None:
        """Bind the listeners and start serving; returns once connections are accepted."""
        if self._thread is not None:
            raise RuntimeError(f"{self.name} is started already")
        s = self.settings
        try:
            if s.port is not None:
                tcp = _bind_tcp(s.host, s.port, self.name)
                self._sockets.append(tcp)
                self.tcp_address = (s.host, tcp.getsockname()[1])
            if s.unix_socket is not None:
                self._sockets.append(
                    bind_unix(s.unix_socket, s.unix_socket_mode, "api.unix_socket")
                )
                st = os.stat(s.unix_socket)
                self._unix_inode = (st.st_dev, st.st_ino)
                self.unix_socket = s.unix_socket
        except BaseException:
            self._close_sockets()
            raise

        config = uvicorn.Config(
            self.app,
            lifespan="off",
            log_config=None,
            access_log=s.access_log,
            proxy_headers=False,
            server_header=False,
            ws="none",
            limit_concurrency=s.max_connections,
            timeout_graceful_shutdown=math.ceil(s.drain_timeout_s),
            **self.tls,
        )
        self._listening.clear()
        self._failure = None
        self._server = _Server(config, self._listening)
        self._thread = threading.Thread(target=self._run, name="edge-agent-api", daemon=True)
        self._thread.start()
        if not self._listening.wait(timeout) or self._failure is not None:
            failure = self._failure
            self.stop()
            raise EdgeAgentError(f"{self.name} did not start: {failure!r}") from failure
        where = []
        if self.tcp_address:
            where.append(self.url)
        if self.unix_socket:
            where.append(f"unix:{self.unix_socket}")
        log.info("%s listening on %s", self.name, " and ".join(where))

    @property
    def url(self) -> str:
        """``http(s)://host:port/`` of the TCP listener (empty before it listens)."""
        if self.tcp_address is None:
            return ""
        scheme = "https" if self.tls.get("ssl_certfile") else "http"
        return f"{scheme}://{_url_host(self.tcp_address[0])}:{self.tcp_address[1]}"

    def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (``drain_timeout_s``), close the app.

        Safe to call more than once, and from any thread but the server's own.
        """
        thread, server = self._thread, self._server
        if thread is not None and server is not None:
            server.should_exit = True
            server.wake()
            thread.join(self.settings.drain_timeout_s + 10)
            if thread.is_alive():
                log.warning("%s did not stop in time; closing its connections", self.name)
                server.force_exit = True
                thread.join(5)
        self._close_sockets()
        self._remove_unix_socket()
        self._thread = None
        self._server = None

    def __enter__(self) -> ApiServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- the server thread ----------------------------------------------------------------
    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # uvicorn ends a failed startup with SystemExit
            self._failure = exc
            log.exception("%s stopped on an error", self.name)
        finally:
            self._listening.set()  # wakes start() if it still waits

    async def _serve(self) -> None:
        assert self._server is not None
        try:
            await self._server.serve(sockets=self._sockets)
        finally:
            close: Any = getattr(self.app, "close", None)
            if callable(close):
                # The worker pool drains here, while this loop can still take its answers.
                await asyncio.to_thread(close)

    # -- sockets --------------------------------------------------------------------------
    def _close_sockets(self) -> None:
        for sock in self._sockets:
            sock.close()
        self._sockets = []

    def _remove_unix_socket(self) -> None:
        path, inode = self.unix_socket, self._unix_inode
        self._unix_inode = None
        if path is None or inode is None:
            return
        with contextlib.suppress(OSError):
            st = os.lstat(path)
            if (st.st_dev, st.st_ino) == inode:  # not one a newer agent has put there
                path.unlink()


def serve_api(
    app: ASGIApp,
    settings: ApiSettings,
    timeout: float = 30.0,
    *,
    name: str = "the inference API",
    tls: Mapping[str, Any] | None = None,
) -> ApiServer:
    """Start an :class:`ApiServer` for ``app`` and return it once it listens."""
    server = ApiServer(app, settings, name=name, tls=tls)
    server.start(timeout)
    return server


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _bind_tcp(host: str, port: int, name: str = "the inference API") -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"{name}: host {host!r} does not resolve: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"{name} cannot listen on {host}:{port}: {exc.strerror}") from None
    if not ipaddress.ip_address(str(address[0]).split("%")[0]).is_loopback:
        log.warning("%s listens on %s: reachable from the network, not only this box", name, host)
    return sock
