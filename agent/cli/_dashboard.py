"""``edge-fleet dashboard``: the fleet in a browser (devices, rollouts, telemetry), and the same
as Prometheus series; see agent.fleet.dashboard."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from agent.cli._common import add_broker_options, client_id, days, mqtt_settings, stop_on_signals
from agent.errors import ConfigError, StorageError
from agent.transport.topics import Topics

TOKEN_ENV = "EDGE_FLEET_DASHBOARD_TOKEN"  # noqa: S105 - the variable's name, not a token


def _token(args: argparse.Namespace) -> str | None:
    if args.token_file is not None:
        try:
            return args.token_file.read_text().strip() or None
        except OSError as exc:
            raise StorageError(
                f"cannot read --token-file {args.token_file}: {exc.strerror}"
            ) from None
    return os.environ.get(TOKEN_ENV) or None


def _dashboard(args: argparse.Namespace) -> int:
    import logging

    from agent.fleet.dashboard import Dashboard, DashboardSettings
    from agent.fleet.dashboard.actions import Signing

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    host, port = DashboardSettings.parse_listen(args.listen)
    if args.history_minutes <= 0:
        raise ConfigError("--history-minutes must be above 0")
    settings = DashboardSettings(
        host=host,
        port=port,
        token=_token(args),
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        client_ca=args.client_ca,
        history_minutes=args.history_minutes,
        access_log=args.verbose,
    )
    signing = Signing.load(args.key, args.trust, args.days) if args.key else None
    stop = stop_on_signals()
    dashboard = Dashboard(
        mqtt_settings(args), Topics(args.prefix), settings, signing,
        client_id=client_id(args, "dashboard"),
    )  # fmt: skip
    with dashboard:
        actions = (
            "actions signed with " + ", ".join(str(k) for k in args.key)
            if args.key
            else ("read-only (no --key: the buttons are refused)")
        )
        access = "token required" if settings.token else "no token"
        if settings.client_ca:
            access += ", TLS client certificates required"
        print(
            f"edge-fleet dashboard: {dashboard.url}/ ({access}; {actions}); "
            f"Prometheus: {dashboard.url}/metrics",
            file=sys.stderr,
            flush=True,
        )
        stop.wait()
    return 0


def add_parser(top: Any) -> None:
    p = top.add_parser(
        "dashboard",
        help="the fleet in a browser: devices, rollouts, telemetry; Prometheus /metrics",
        description="Serve a web page of the fleet from the broker alone. Loopback by default; "
        "beyond loopback a token (--token-file or $EDGE_FLEET_DASHBOARD_TOKEN) or TLS client "
        "certificates are required. Rollout buttons need the release key (--key) and a token.",
    )
    p.add_argument(
        "--listen", default="127.0.0.1:8600", metavar="HOST:PORT", help="default 127.0.0.1:8600"
    )
    p.add_argument("--token-file", type=Path, help=f"the access token (else ${TOKEN_ENV})")
    p.add_argument("--tls-cert", type=Path, help="serve HTTPS with this certificate")
    p.add_argument("--tls-key", type=Path, help="and this key")
    p.add_argument("--client-ca", type=Path, help="require TLS client certificates of this CA")
    p.add_argument(
        "--key", type=Path, action="append", default=[], help="release private key (actions)"
    )
    p.add_argument("--trust", type=Path, metavar="DIR", help="key directory (default: the --key's)")
    p.add_argument("--days", type=days, default=30, help="days until rollback documents expire")
    p.add_argument(
        "--history-minutes", type=float, default=60.0, help="telemetry kept for charts (60)"
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log every request")
    add_broker_options(p)
    p.set_defaults(handler=_dashboard)
