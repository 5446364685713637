"""What ``edge-agent`` and ``edge-fleet`` share: running a handler with the project's errors
turned into a line and an exit status, times and ``--days``, the broker options."""

from __future__ import annotations

import argparse
import os
import sys
import threading
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

from agent.errors import BadContentError, ConfigError, EdgeAgentError
from agent.transport.session import MqttSettings
from agent.transport.topics import DEFAULT_PREFIX

Handler = Callable[[argparse.Namespace], int]


def now_at(value: str | None = None) -> datetime:
    """``--at TIME`` (ISO 8601; UTC unless it says otherwise), else now."""
    if not value:
        return datetime.now(timezone.utc)
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"--at {value!r} is not an ISO 8601 time") from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def days(value: str) -> int:
    """A ``--days`` value: a whole number from 1 up. What is signed for 0 days (or fewer) has
    expired when it is published, and every device refuses it."""
    try:
        count = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number of days") from None
    if count < 1:
        raise argparse.ArgumentTypeError(
            f"{count} days: must be at least 1 (what it signs would have expired when published)"
        )
    return count


def stop_on_signals() -> threading.Event:
    """An event that SIGINT or SIGTERM sets."""
    import signal

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def run(prog: str, parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse ``argv`` and run its handler. Only the project's own errors are caught; each
    becomes one line a person can act on, and the exit status of its kind."""
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        code = handler(args)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # Read by `head` or `grep -q`, which stopped reading: not an error of ours. (Python's
        # advice: point stdout at devnull so that the flush at exit does not fail again.)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except BadContentError as exc:
        print(f"{prog}: rejected ({exc.code}): {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except EdgeAgentError as exc:
        print(f"{prog}: error ({exc.code}): {exc}", file=sys.stderr)
        return 3


# -- edge-fleet's broker connection ------------------------------------------------------------
def add_broker_options(p: argparse.ArgumentParser) -> None:
    env = os.environ.get
    g = p.add_argument_group("broker (defaults from EDGE_FLEET_* environment variables)")
    g.add_argument(
        "--broker",
        default=env("EDGE_FLEET_BROKER", "localhost:8883"),
        metavar="HOST[:PORT]",
        help="MQTT broker (default $EDGE_FLEET_BROKER or localhost:8883)",
    )
    g.add_argument("--ca", type=Path, default=env("EDGE_FLEET_CA"), help="CA certificate")
    g.add_argument("--cert", type=Path, default=env("EDGE_FLEET_CERT"), help="client certificate")
    g.add_argument(
        "--cert-key", type=Path, default=env("EDGE_FLEET_CERT_KEY"), help="client certificate key"
    )
    g.add_argument("--mqtt", choices=["5", "3.1.1"], default=env("EDGE_FLEET_MQTT", "5"))
    g.add_argument(
        "--no-tls",
        action="store_true",
        default=env("EDGE_FLEET_TLS", "true").lower() in ("0", "false", "no", "off"),
        help="plain TCP, for a test broker on loopback (default: TLS unless $EDGE_FLEET_TLS=false)",
    )
    g.add_argument(
        "--prefix", default=env("EDGE_FLEET_PREFIX", DEFAULT_PREFIX), help="topic prefix"
    )
    g.add_argument("--client-id", help="MQTT client id (default edge-fleet-<command>-<pid>)")


def add_bundles_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--bundles",
        type=Path,
        default=Path(os.environ.get("EDGE_FLEET_BUNDLES", "bundles")),
        metavar="DIR",
        help="the bundle server's directory (default $EDGE_FLEET_BUNDLES or ./bundles)",
    )


def mqtt_settings(args: argparse.Namespace) -> MqttSettings:
    """The broker options' settings, checked."""
    from agent.fleet.control import check_settings

    host, _, port = args.broker.rpartition(":") if ":" in args.broker else (args.broker, "", "")
    try:
        settings = MqttSettings(
            host=host or "localhost",
            port=int(port) if port else (8883 if not args.no_tls else 1883),
            protocol=args.mqtt,
            tls=not args.no_tls,
            ca_file=args.ca,
            cert_file=args.cert,
            key_file=args.cert_key,
            client_id=args.client_id,
        )
    except ValueError as exc:
        raise ConfigError(f"broker settings: {exc}") from None
    check_settings(settings)
    return settings


def client_id(args: argparse.Namespace, command: str) -> str:
    return args.client_id or f"edge-fleet-{command}-{os.getpid()}"
