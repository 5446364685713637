"""``edge-fleet simulate``: many simulated devices that speak the real protocol."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from agent import __version__
from agent.cli._common import add_broker_options, mqtt_settings, now_at, stop_on_signals
from agent.errors import ConfigError
from agent.transport.topics import Topics


def _pairs(values: list[str], option: str) -> dict[str, float]:
    """``KEY=NUMBER`` options into a dict."""
    out: dict[str, float] = {}
    for value in values:
        key, sep, number = value.partition("=")
        try:
            out[key] = float(number)
        except ValueError:
            sep = ""
        if not sep or not key:
            raise ConfigError(f"{option} takes KEY=NUMBER, not {value!r}")
    return out


def _simulate(args: argparse.Namespace) -> int:
    import contextlib
    import logging
    import tempfile

    from agent.fleet.simulator import SimStats, Simulator
    from agent.fleet.simulator_settings import make_settings, version_metrics
    from agent.verify import load_trust

    failures = []
    if args.fail_load or args.fail_device or args.fail_fraction is not None:
        failures.append(
            {
                "version": None if args.fail_load in (None, "*") else args.fail_load,
                "devices": args.fail_device,
                "fraction": args.fail_fraction,
                "code": args.fail_code,
                "times": args.fail_times,
            }
        )
    settings = make_settings(
        {
            "devices": args.devices,
            "first": args.first,
            "id_prefix": args.id_prefix,
            "groups": args.group,
            "hardware": _pairs(args.hardware, "--hardware") or {"cpu": 1.0},
            "agent_version": args.agent_version or __version__,
            "runtime": args.runtime,
            "load_s": args.load_s,
            "report_interval_s": args.report_interval,
            "telemetry_interval_s": args.telemetry_s,
            "metrics": version_metrics(
                args.rps, _pairs(args.error_rate, "--error-rate"), _pairs(args.p99_ms, "--p99-ms")
            ),
            "failures": failures,
            "transfer": {"window": args.window},
        }
    )
    mqtt = mqtt_settings(args)
    trust = load_trust(args.trust, now_at())
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    stop = stop_on_signals()
    tty = sys.stderr.isatty()
    shown = [0.0]

    def status(sim: Simulator) -> None:
        if not tty or time.monotonic() - shown[0] < 1.0:
            return
        shown[0] = time.monotonic()
        print(f"\r{sim.stats.summary()} ", end="", file=sys.stderr)

    state = (
        contextlib.nullcontext(str(args.state_dir))
        if args.state_dir is not None
        else tempfile.TemporaryDirectory(prefix="edge-fleet-simulate-")
    )
    with state as state_dir:
        sim = Simulator(
            settings,
            mqtt,
            trust,
            topics=Topics(args.prefix),
            state_dir=Path(state_dir),
            cert_dir=args.cert_dir,
        )
        ids = f"{sim.devices[0].id}..{sim.devices[-1].id}"
        groups = f" following {', '.join(settings.groups)}" if settings.groups else ""
        print(
            f"edge-fleet simulate: {len(sim.devices)} devices {ids}{groups} on "
            f"{mqtt.host}:{mqtt.port} (MQTT {mqtt.protocol}); Ctrl-C stops",
            file=sys.stderr,
            flush=True,
        )
        stats: SimStats = sim.run(stop, duration=args.duration, on_poll=status)
    print(f"{chr(10) if tty else ''}stopped: {stats.summary()}", file=sys.stderr)
    if args.json:
        print(json.dumps(vars(stats)))
    return 0


def add_parser(top: Any) -> None:
    sim = top.add_parser(
        "simulate",
        help="simulated devices that speak the protocol (to size brokers and bundle servers)",
        description="Run many simulated devices in this process, each with its own MQTT "
        "connection: they verify deployments with the trust given, fetch and check bundles "
        "block by block, report and send telemetry as the agent does; only the runtime is "
        "simulated (loading a model takes --load-s). Run several processes (--first) for more "
        "devices than one core keeps up with.",
    )
    sim.add_argument(
        "--trust",
        type=Path,
        required=True,
        metavar="ROOT_OR_KEYRING",
        help="key directory, root.json or keyring.json: what the devices trust",
    )
    sim.add_argument("--devices", type=int, default=100, metavar="N", help="default 100")
    sim.add_argument("--id-prefix", default="sim", help="device ids are PREFIX-NNNNN (default sim)")
    sim.add_argument("--first", type=int, default=0, metavar="N", help="the first device's NNNNN")
    sim.add_argument(
        "--group", action="append", default=[], metavar="G", help="a group to follow (repeatable)"
    )
    sim.add_argument(
        "--hardware",
        action="append",
        default=[],
        metavar="PROFILE=SHARE",
        help="hardware profiles and their shares (repeatable): cpu, jetson, nvidia-gpu, "
        "intel-gpu (default cpu=1)",
    )
    sim.add_argument("--agent-version", help=f"reported agent version (default {__version__})")
    sim.add_argument("--runtime", help="reported runtime string (default: the profile's)")
    sim.add_argument("--load-s", type=float, default=0.5, help="seconds a model takes to load")
    sim.add_argument("--report-interval", type=float, default=1.0, metavar="SECONDS")
    sim.add_argument(
        "--telemetry-s", type=float, default=10.0, metavar="SECONDS", help="0: no telemetry"
    )
    sim.add_argument(
        "--rps", type=float, default=10.0, help="requests per second each model reports"
    )
    sim.add_argument(
        "--error-rate",
        action="append",
        default=[],
        metavar="VERSION=FRACTION",
        help="share of requests a version answers with an error (repeatable; VERSION * for any)",
    )
    sim.add_argument(
        "--p99-ms",
        action="append",
        default=[],
        metavar="VERSION=MS",
        help="the p99 latency a version reports (repeatable; VERSION * for any; default 25)",
    )
    sim.add_argument(
        "--fail-load", metavar="VERSION", help="the version that fails to load (* for every one)"
    )
    sim.add_argument(
        "--fail-device", action="append", default=[], metavar="ID", help="a device that fails"
    )
    sim.add_argument(
        "--fail-fraction",
        type=float,
        metavar="F",
        help="the share of devices that fail, chosen by id (default: all, unless --fail-device)",
    )
    sim.add_argument(
        "--fail-code",
        default="self-test",
        help="the error a failed load reports: self-test, load-timeout, insufficient-memory, "
        "tool, interrupted, probation (default self-test)",
    )
    sim.add_argument(
        "--fail-times", type=int, metavar="N", help="only the first N loads fail (default: all)"
    )
    sim.add_argument(
        "--cert-dir",
        type=Path,
        metavar="DIR",
        help="each device's TLS certificate, DIR/ID.crt and DIR/ID.key (as make-certs.sh "
        "writes them), for a broker whose ACL binds topics to the certificate; default: "
        "every device presents --cert",
    )
    sim.add_argument("--window", type=int, default=32, help="blocks asked for at once")
    sim.add_argument(
        "--state-dir", type=Path, help="where downloads are written (default: a temporary one)"
    )
    sim.add_argument("--duration", type=float, metavar="SECONDS", help="stop after this long")
    sim.add_argument("--json", action="store_true", help="print the counts as JSON at the end")
    sim.add_argument("-v", "--verbose", action="store_true")
    add_broker_options(sim)
    sim.set_defaults(handler=_simulate)
