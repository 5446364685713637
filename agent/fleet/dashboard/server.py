"""``edge-fleet dashboard``: the broker session that feeds the model, and the web server.

Threads: the broker session's network thread (``mqtt-{client id}``, which feeds the inbox),
``dashboard-collect`` (takes the inbox into the :class:`FleetModel`), ``dashboard`` (uvicorn's
event loop, serving the pages), and one ``drive-{rollout}`` per rollout a button resumed or
rolled back (agent.fleet.dashboard.actions).

The dashboard starts whether or not the broker answers: the page says it is not connected,
and the session keeps trying (with the backoff every session has).
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import os
import queue
import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from agent.errors import ConfigError
from agent.fleet.dashboard.actions import Actions, Signing
from agent.fleet.dashboard.app import Access, DashboardApp
from agent.fleet.dashboard.history import History
from agent.fleet.dashboard.model import FleetModel
from agent.serving.api import ApiSettings
from agent.serving.server import ApiServer
from agent.transport.session import InboxItem, MqttSettings, Session
from agent.transport.topics import Topics

log = logging.getLogger("agent.fleet.dashboard")

DEFAULT_LISTEN = "127.0.0.1:8600"
MIN_TOKEN = 16


@dataclass(frozen=True)
class DashboardSettings:
    """Where the dashboard listens and who may use it."""

    host: str = "127.0.0.1"
    port: int = 8600
    token: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    client_ca: Path | None = None  # TLS client certificates signed by this CA are required
    history_minutes: float = 60.0
    access_log: bool = False  # every request to the log (edge-fleet dashboard -v)

    @classmethod
    def parse_listen(cls, text: str) -> tuple[str, int]:
        """``HOST:PORT``, ``[V6]:PORT`` or ``PORT``."""
        host, _, port = text.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        if not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ConfigError(f"--listen {text!r}: give HOST:PORT (e.g. {DEFAULT_LISTEN})")
        return host, int(port)

    @functools.cached_property
    def loopback(self) -> bool:
        """Every address the host resolves to is a loopback one (looked up once)."""
        try:
            infos = socket.getaddrinfo(self.host, None, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise ConfigError(f"--listen host {self.host!r} does not resolve: {exc}") from None
        return all(ipaddress.ip_address(str(i[4][0]).split("%")[0]).is_loopback for i in infos)

    def check(self) -> None:
        """Refuse a listener beyond loopback that anyone could use, and half-set TLS."""
        if self.token is not None and len(self.token) < MIN_TOKEN:
            raise ConfigError(f"the dashboard's token must be at least {MIN_TOKEN} characters")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("--tls-cert and --tls-key go together")
        if self.client_ca is not None and self.tls_cert is None:
            raise ConfigError("--client-ca needs --tls-cert and --tls-key (TLS)")
        for name in ("tls_cert", "tls_key", "client_ca"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"--{name.replace('_', '-')} {path} does not exist")
        if not self.loopback and self.token is None and self.client_ca is None:
            raise ConfigError(
                f"the dashboard would listen on {self.host}, beyond this box, open to anyone: "
                "give --token-file (or $EDGE_FLEET_DASHBOARD_TOKEN) or TLS client certificates "
                "(--tls-cert, --tls-key, --client-ca)"
            )

    def uvicorn_tls(self) -> dict[str, Any]:
        if self.tls_cert is None:
            return {}
        tls: dict[str, Any] = {"ssl_certfile": str(self.tls_cert), "ssl_keyfile": str(self.tls_key)}
        if self.client_ca is not None:
            tls["ssl_ca_certs"] = str(self.client_ca)
            tls["ssl_cert_reqs"] = ssl.CERT_REQUIRED
        return tls


class Dashboard:
    """The running dashboard; ``with Dashboard(...) as d: print(d.url)``."""

    def __init__(
        self,
        mqtt: MqttSettings,
        topics: Topics,
        settings: DashboardSettings,
        signing: Signing | None = None,
        *,
        client_id: str | None = None,
    ) -> None:
        settings.check()
        if signing is not None and settings.token is None:
            raise ConfigError(
                "with --key the page's buttons sign with the release key, so the dashboard "
                "needs a token too (--token-file or $EDGE_FLEET_DASHBOARD_TOKEN), even on "
                "loopback: anyone on this box could use the key through it otherwise"
            )
        if settings.token is not None and settings.tls_cert is None and not settings.loopback:
            log.warning(
                "the dashboard listens on %s over plain HTTP: its token and login cookie "
                "travel in clear text (give --tls-cert and --tls-key)",
                settings.host,
            )
        self.settings = settings
        self.client_id = client_id or f"edge-fleet-dashboard-{os.getpid()}"
        self.model = FleetModel(topics, history=History(window_s=settings.history_minutes * 60))
        self.actions = Actions(mqtt, topics, signing, by=self.client_id)
        access = Access(settings.token, settings.loopback, settings.tls_cert is not None)
        self.app = DashboardApp(self.model, self.actions, access)
        self.inbox: queue.SimpleQueue[InboxItem] = queue.SimpleQueue()
        self.session = Session(
            mqtt,
            self.client_id,
            self.inbox,
            subscriptions=self.model.subscriptions,
            persistent=False,
        )
        api = ApiSettings(
            host=settings.host, port=settings.port, unix_socket=None, access_log=settings.access_log
        )
        self.server = ApiServer(self.app, api, name="the dashboard", tls=settings.uvicorn_tls())
        self._stop = threading.Event()
        self._collector = threading.Thread(
            target=self._collect, name="dashboard-collect", daemon=True
        )

    @property
    def url(self) -> str:
        return self.server.url

    def start(self) -> None:
        self.session.start()
        self._collector.start()
        try:
            self.server.start()
        except BaseException:
            self.stop()
            raise

    def _collect(self) -> None:
        while not self._stop.is_set():
            try:
                item = self.inbox.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                self.model.take(item)
            except Exception:  # one bad message must not stop the dashboard
                log.exception("dashboard: a message could not be taken")

    def stop(self) -> None:
        self.app.close()
        self.actions.close()
        self.server.stop()
        self._stop.set()
        if self._collector.is_alive():
            self._collector.join(5)
        self.session.stop()

    def __enter__(self) -> Dashboard:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
