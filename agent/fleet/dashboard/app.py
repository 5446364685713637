"""The dashboard's web application: a static page, its JSON, live changes, the actions and
Prometheus' ``/metrics``, as one ASGI app on uvicorn (the stack the agent's API runs on).

Routes::

    GET  /                       the page (static HTML, plain JavaScript, no build step)
    GET  /static/{file}          its script and style sheet
    GET  /login, POST /login     the token form, when a token is configured
    POST /logout
    GET  /api/fleet              every device and rollout, the counts, the newest events
    GET  /api/devices/{id}       one device: models, hardware, events, telemetry over the hour
    GET  /api/rollouts           every rollout, with what may be asked of it now
    POST /api/rollouts/{id}/{action}   pause | resume | abort | rollback; body {"confirm": id}
    GET  /api/stream             server-sent events: a snapshot, then the changes
    GET  /metrics                the Prometheus exposition
    GET  /healthz                200 while serving, with the broker's state

Security (see :class:`Access`): with a token configured, every route but ``/healthz`` and the
login form needs it, as ``Authorization: Bearer`` (Prometheus, curl) or as the session cookie
the login form sets (HttpOnly, SameSite=Strict; it holds a value derived from the token, never
the token). On a loopback listener only loopback host names are served, so a web page elsewhere
cannot reach it through DNS rebinding. A POST must carry ``X-Edge-Fleet: dashboard`` (which a
cross-site form cannot send) and name the rollout again in its body (the confirmation). Every
answer forbids framing and inline script (Content-Security-Policy); device-supplied text only
ever reaches the page as data, which the script writes with ``textContent``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
import time
import urllib.parse
from dataclasses import dataclass
from importlib import resources
from typing import Any

from agent.errors import BrokerError, ConfigError, EdgeAgentError
from agent.fleet.dashboard import prometheus
from agent.fleet.dashboard.actions import ACTIONS, Actions
from agent.fleet.dashboard.model import FleetModel
from agent.serving.replies import (
    Receive,
    Reply,
    Scope,
    Send,
    dumps,
    encode_headers,
    error_reply,
    json_reply,
    request_headers,
    send_reply,
)

log = logging.getLogger("agent.fleet.dashboard")

STATIC = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
COOKIE = "edge_fleet_dashboard"
SESSION_S = 12 * 3600  # a login lasts this long
LOGIN_FAILED = b'<p class="error">That is not the dashboard\'s token.</p>\n    <label'
MAX_STREAMS = 64  # live pages at once; beyond: 503
MAX_BODY = 16 * 1024
STREAM_TICK_S = 0.5  # a live page hears of changes this often at most
KEEPALIVE_S = 15.0
SECURITY_HEADERS = (
    (
        "content-security-policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "no-referrer"),
    ("cache-control", "no-store"),
)


@dataclass(frozen=True)
class Access:
    """Who may use the dashboard: anyone who reaches it (``token`` None), or holders of the
    token. ``loopback``: the listener is on a loopback address (the Host check applies).

    A login cookie is ``EXPIRY.MAC``: the time it runs out and an HMAC of that time keyed with
    the token, so it is checked without state, dies at its time whatever the browser does, and
    every cookie dies when the token changes.
    """

    token: str | None = None
    loopback: bool = True
    tls: bool = False

    def _mac(self, expiry: int) -> str:
        assert self.token is not None
        msg = f"edge-fleet dashboard session {expiry}".encode()
        return hmac.new(self.token.encode(), msg, "sha256").hexdigest()

    def session_value(self, now: float | None = None) -> str:
        expiry = int((time.time() if now is None else now) + SESSION_S)
        return f"{expiry}.{self._mac(expiry)}"

    def allowed(self, headers: dict[str, str]) -> bool:
        if self.token is None:
            return True
        auth = headers.get("authorization", "")
        if auth[:7].lower() == "bearer " and hmac.compare_digest(
            auth[7:].strip().encode(), self.token.encode()
        ):
            return True
        cookie = _cookies(headers.get("cookie", "")).get(COOKIE, "")
        expiry, _, mac = cookie.partition(".")
        if not expiry.isdigit() or int(expiry) < time.time():
            return False
        return hmac.compare_digest(mac.encode(), self._mac(int(expiry)).encode())

    def host_ok(self, headers: dict[str, str]) -> bool:
        """On a loopback listener: the Host is ``localhost`` or a loopback address."""
        if not self.loopback:
            return True
        host = headers.get("host", "")
        name = host.rsplit(":", 1)[0] if not host.startswith("[") else host[1:].split("]")[0]
        if name == "localhost":
            return True
        try:
            return ipaddress.ip_address(name).is_loopback
        except ValueError:
            return False


def _cross_site(path: str, headers: dict[str, str]) -> bool:
    """A browser says another site asks for data (``Sec-Fetch-Site``); a link to the page
    itself from elsewhere is fine."""
    data = path.startswith("/api/") or path == "/metrics"
    return data and headers.get("sec-fetch-site") == "cross-site"


def _cookies(text: str) -> dict[str, str]:
    out = {}
    for part in text.split(";"):
        name, _, value = part.strip().partition("=")
        if name:
            out[name] = value
    return out


def _asset(name: str) -> bytes:
    return (resources.files("agent.fleet.dashboard") / "static" / name).read_bytes()


class DashboardApp:
    """The ASGI application; see the module docstring."""

    def __init__(self, model: FleetModel, actions: Actions, access: Access) -> None:
        self.model = model
        self.actions = actions
        self.access = access
        self.instance = secrets.token_hex(4)  # stream ids from an older dashboard mean nothing
        self.closing = False
        self.streams = 0
        self._assets = {name: _asset(name) for name in (*STATIC, "index.html", "login.html")}

    def close(self) -> None:
        """Live streams end (called as the server stops)."""
        self.closing = True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        headers = request_headers(scope)
        path, method = scope["path"], scope["method"]
        try:
            if not self.access.host_ok(headers):
                reply = error_reply(421, "this dashboard answers only to loopback host names")
            elif _cross_site(path, headers):
                reply = error_reply(403, "the dashboard's data is not served to other sites")
            elif path == "/api/stream" and method == "GET" and self.access.allowed(headers):
                await self._stream(scope, receive, send, headers)
                return
            else:
                reply = await self._route(method, path, scope, receive, headers)
        except ConfigError as exc:
            reply = error_reply(400, str(exc))
        except EdgeAgentError as exc:
            reply = error_reply(502 if isinstance(exc, BrokerError) else 500, str(exc))
        except Exception:
            log.exception("dashboard: %s %s failed", method, path)
            reply = error_reply(500, "internal error (the dashboard's log says why)")
        await send_reply(send, reply, head=method == "HEAD", extra=SECURITY_HEADERS)

    async def _route(
        self, method: str, path: str, scope: Scope, receive: Receive, headers: dict[str, str]
    ) -> Reply:
        get = method in ("GET", "HEAD")
        if path == "/favicon.ico" and get:
            return Reply(204, b"", "image/x-icon")
        if path == "/static/style.css" and get:
            return Reply(200, self._assets["style.css"], STATIC["style.css"])
        if path == "/healthz" and get:
            return json_reply(200, {"ok": True, "broker": self.model.connected})
        if path == "/login":
            if self.access.token is None:
                return Reply(303, b"", headers=(("location", "/"),))
            if get:
                page = self._assets["login.html"]
                if b"failed" in scope.get("query_string", b""):
                    page = page.replace(b"<label", LOGIN_FAILED, 1)
                return Reply(200, page, "text/html; charset=utf-8")
            if method == "POST":
                return await self._login(receive, headers)
        if not self.access.allowed(headers):
            if path == "/" and get:
                return Reply(303, b"", headers=(("location", "/login"),))
            return json_reply(
                401, {"error": "a token is needed"}, ("www-authenticate", 'Bearer realm="fleet"')
            )
        if get:
            return await self._get(path, scope)
        if method == "POST":
            if path == "/logout":
                return Reply(
                    303,
                    b"",
                    headers=(("location", "/login"), ("set-cookie", self._cookie("", 0))),
                )
            parts = path.strip("/").split("/")
            if len(parts) == 4 and parts[:2] == ["api", "rollouts"]:
                return await self._action(parts[2], parts[3], receive, headers)
            return error_reply(404, "no such route")
        return error_reply(405, f"{method} is not allowed here")

    async def _get(self, path: str, scope: Scope) -> Reply:
        if path in ("/", "/index.html"):
            return Reply(200, self._assets["index.html"], "text/html; charset=utf-8")
        if path.startswith("/static/") and path[8:] in STATIC:
            return Reply(200, self._assets[path[8:]], STATIC[path[8:]])
        if path == "/api/fleet":
            snap = await asyncio.to_thread(self.model.snapshot)
            return json_reply(200, {**snap, **self._meta()})
        if path == "/api/rollouts":
            return json_reply(200, {"rollouts": await asyncio.to_thread(self.model.rollouts)})
        if path.startswith("/api/devices/"):
            device = urllib.parse.unquote(path[len("/api/devices/") :])
            detail = await asyncio.to_thread(self.model.device_detail, device)
            if detail is None:
                return error_reply(404, f"no device {device!r} has been heard of")
            return json_reply(200, detail)
        if path == "/metrics":
            text = await asyncio.to_thread(prometheus.render, self.model)
            return Reply(200, text.encode(), "text/plain; version=0.0.4; charset=utf-8")
        return error_reply(404, "no such page")

    def _meta(self) -> dict[str, Any]:
        a = self.actions
        return {
            "actions": {"available": a.available, "why_not": a.why_not, "driving": a.driving()},
            "stream": f"{self.instance}:{self.model.version}",
            "auth": self.access.token is not None,
        }

    # -- actions -------------------------------------------------------------------------
    def _post_ok(self, headers: dict[str, str]) -> str:
        """Why a POST is refused as cross-site ("" if it is not)."""
        if headers.get("x-edge-fleet") != "dashboard":
            return "the X-Edge-Fleet: dashboard header is missing"
        origin = headers.get("origin")
        if origin and origin != "null":
            host = urllib.parse.urlsplit(origin).netloc
            if host != headers.get("host"):
                return f"a request from {origin} is refused"
        return ""

    async def _action(
        self, rollout: str, action: str, receive: Receive, headers: dict[str, str]
    ) -> Reply:
        why = self._post_ok(headers)
        if why:
            return error_reply(403, why)
        if action not in ACTIONS:
            return error_reply(404, f"no such action {action!r} (one of {', '.join(ACTIONS)})")
        if not self.actions.available:
            return error_reply(403, self.actions.why_not)
        body = await _read(receive)
        try:
            doc = json.loads(body or b"{}")
        except ValueError:
            return error_reply(400, "the body is not JSON")
        if not isinstance(doc, dict) or doc.get("confirm") != rollout:
            return error_reply(400, f'confirm the {action}: send {{"confirm": "{rollout}"}}')
        log.info("dashboard: %s of rollout %s asked", action, rollout)
        try:
            done = await asyncio.to_thread(self.actions.run, rollout, action)
        except ConfigError as exc:
            return error_reply(409, str(exc))
        return json_reply(
            200,
            {
                "action": done.action,
                "rollout": done.rollout,
                "message": done.message,
                "driving": done.driving,
            },
        )

    # -- login ---------------------------------------------------------------------------
    def _cookie(self, value: str, max_age: int) -> str:
        secure = "; Secure" if self.access.tls else ""
        return f"{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}"

    async def _login(self, receive: Receive, headers: dict[str, str]) -> Reply:
        origin = headers.get("origin")
        if (
            origin
            and origin != "null"
            and urllib.parse.urlsplit(origin).netloc != headers.get("host")
        ):
            return error_reply(403, f"a login from {origin} is refused")
        form = urllib.parse.parse_qs((await _read(receive)).decode("utf-8", "replace"))
        token = (form.get("token") or [""])[0].strip()
        assert self.access.token is not None
        if not hmac.compare_digest(token.encode(), self.access.token.encode()):
            await asyncio.sleep(0.5)  # a guess costs time
            return Reply(303, b"", headers=(("location", "/login?failed=1"),))
        return Reply(
            303,
            b"",
            headers=(
                ("location", "/"),
                ("set-cookie", self._cookie(self.access.session_value(), SESSION_S)),
            ),
        )

    # -- live changes --------------------------------------------------------------------
    async def _stream(
        self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str]
    ) -> None:
        if self.streams >= MAX_STREAMS:
            await send_reply(
                send,
                error_reply(503, f"{MAX_STREAMS} live pages are open already"),
                extra=SECURITY_HEADERS,
            )
            return
        self.streams += 1
        gone = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        watcher = asyncio.create_task(watch())
        started = False
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": encode_headers(
                        [
                            ("content-type", "text/event-stream"),
                            ("x-accel-buffering", "no"),
                            *SECURITY_HEADERS,
                        ]
                    ),
                }
            )
            started = True
            since = self._resume_from(headers, scope)
            beat = time.monotonic()
            while not gone.is_set() and not self.closing:
                if since is None:
                    doc: dict[str, Any] | None = await asyncio.to_thread(self.model.snapshot)
                    kind = "snapshot"
                else:
                    doc = await asyncio.to_thread(self.model.changes, since)
                    kind = "changes"
                if doc is not None:
                    doc.update(self._meta())
                    since = doc["version"]
                    data = dumps(doc)
                    chunk = f"id: {self.instance}:{since}\nevent: {kind}\ndata: {data}\n\n"
                    await send(
                        {"type": "http.response.body", "body": chunk.encode(), "more_body": True}
                    )
                    beat = time.monotonic()
                elif time.monotonic() - beat > KEEPALIVE_S:
                    await send(
                        {
                            "type": "http.response.body",
                            "body": b": keep-alive\n\n",
                            "more_body": True,
                        }
                    )
                    beat = time.monotonic()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(gone.wait(), STREAM_TICK_S)
            if not gone.is_set():
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass  # the page went away mid-write
        except Exception:  # a bug: this page's stream ends, the page reconnects
            log.exception("dashboard: a live stream failed")
            if not started:
                await send_reply(
                    send,
                    error_reply(500, "internal error (the dashboard's log says why)"),
                    extra=SECURITY_HEADERS,
                )
        finally:
            self.streams -= 1
            watcher.cancel()

    def _resume_from(self, headers: dict[str, str], scope: Scope) -> int | None:
        """The version a reconnecting page saw last (Last-Event-ID or ``?since=``), if it came
        from this dashboard; None: send a snapshot."""
        query = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1"))
        last = headers.get("last-event-id") or (query.get("since") or [""])[0]
        instance, _, version = last.partition(":")
        if instance == self.instance and version.isdigit():
            return int(version)
        return None


async def _read(receive: Receive) -> bytes:
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return bytes(body)
        body += message.get("body", b"")
        if len(body) > MAX_BODY:
            raise ConfigError(f"the request body is over {MAX_BODY} bytes")
        if not message.get("more_body"):
            return bytes(body)


def fingerprint(token: str) -> str:
    """A short, safe way to name a token in the log: the first 8 hex digits of its SHA-256."""
    return hashlib.sha256(token.encode()).hexdigest()[:8]
