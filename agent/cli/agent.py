"""``edge-agent``: the agent on the box -- run it, serve one bundle, show the hardware, check
agent.toml, enrol the box, ask the running agent how it stands. Exit status as ``agent.cli``
says."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent import __version__
from agent.cli import _loadtest
from agent.cli._common import run, stop_on_signals
from agent.errors import ConfigError, EdgeAgentError

# The system config (agent.config.DEFAULT_CONFIG, not imported here: the CLI starts light).
DEFAULT_CONFIG_PATH = Path("/etc/edge-agent/agent.toml")

# Drain and close within this after SIGTERM: under the unit's TimeoutStopSec (30 s).
STOP_LIMIT_S = 25.0


def _agent_run(args: argparse.Namespace) -> int:
    import signal

    from agent.config import load_config
    from agent.daemon import DeviceAgent
    from agent.logs import setup_logging
    from agent.notify import StopDeadline

    setup_logging(args.verbose)
    config = load_config(args.config)
    agent = DeviceAgent(config, reload_config=lambda: load_config(args.config))
    stop = stop_on_signals()
    signal.signal(signal.SIGHUP, lambda *_: agent.request_reload())
    agent.wake_on_signals()
    deadline = StopDeadline(stop, STOP_LIMIT_S)
    try:
        agent.run(stop)
    finally:
        deadline.done()
    return 0


def _agent_serve(args: argparse.Namespace) -> int:
    import logging

    from pydantic import ValidationError

    from agent.config import read_toml
    from agent.runtime.hardware import RuntimeConfig
    from agent.serving.api import ApiSettings
    from agent.standalone import serve_bundle

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    # serve's defaults (the daemon's, but no Unix socket unless asked), then the [api] and
    # [runtime] tables of --config FILE (its other tables are not read), then the flags.
    api_table: dict[str, Any] = {"unix_socket": None}
    runtime_table: dict[str, Any] = {}
    if args.config is not None:
        data = read_toml(args.config)
        for key, table in (("api", api_table), ("runtime", runtime_table)):
            value = data.get(key, {})
            if not isinstance(value, dict):
                raise ConfigError(f"{args.config}: {key} is not a table")
            table.update(value)
    flags = {
        "host": args.host,
        "port": args.port,
        "unix_socket": args.socket,
        "token": args.token,
        "workers": args.workers,
        "max_queue": args.max_queue,
        "max_batch_size": args.max_batch_size,
        "max_body_bytes": args.max_body_bytes,
        "memory_threshold": args.memory_threshold,
    }
    given = {k: v for k, v in flags.items() if v is not None}
    api_table.update(given)

    def problems(exc: ValidationError, table: str) -> str:
        out = []
        for e in exc.errors():
            key = str(e["loc"][0]) if e["loc"] else ""
            dotted = ".".join(str(part) for part in e["loc"])
            msg = e["msg"].removeprefix("Value error, ")
            if table == "api" and key in given:
                flag = "socket" if key == "unix_socket" else key.replace("_", "-")
                out.append(f"--{flag}: {msg}")
            else:
                out.append(f"{args.config or 'serve'}: {table}.{dotted}: {msg}")
        return "; ".join(out)

    try:
        api = ApiSettings.model_validate(api_table)
    except ValidationError as exc:
        raise ConfigError(problems(exc, "api")) from None
    try:
        runtime = RuntimeConfig.model_validate(runtime_table)
    except ValidationError as exc:
        raise ConfigError(problems(exc, "runtime")) from None
    stop = stop_on_signals()
    served = serve_bundle(args.bundle, args.trust, api, runtime=runtime, variant=args.variant)
    c = served.candidate
    print(
        f"verified {args.bundle}: {c.name} {c.version}, variant {c.variant.id} on {served.runtime}"
    )
    for line in served.choice.lines()[1:]:
        print(line)
    if served.server.tcp_address is not None:
        host, port = served.server.tcp_address
        print(f"serving on http://{host}:{port}/v2/models/{c.name}", flush=True)
    if served.server.unix_socket is not None:
        print(f"serving on unix:{served.server.unix_socket}", flush=True)
    try:
        stop.wait()
    finally:
        served.close()
    return 0


def _agent_hardware(args: argparse.Namespace) -> int:
    from agent.bundle.reader import read_index
    from agent.config import DEFAULT_CONFIG, load_config
    from agent.runtime.hardware import choose, probe

    policy = None
    config_file = args.config
    if config_file is None and DEFAULT_CONFIG.is_file():
        config_file = DEFAULT_CONFIG
    if config_file is not None:
        policy = load_config(config_file).runtime.policy
    profile = probe()
    doc: dict[str, Any] = {"profile": profile.model_dump(mode="json")}
    if config_file is not None:
        doc["config"] = str(config_file)
    doc["profile"]["accelerators"] = profile.accelerators
    failure: EdgeAgentError | None = None
    manifest = None
    choice = None
    if args.bundle:
        try:
            with open(args.bundle, "rb") as f:
                manifest = read_index(f).manifest
        except OSError as exc:
            raise ConfigError(f"cannot read {args.bundle}: {exc.strerror}") from None
        doc["bundle"] = {
            "name": manifest.name,
            "version": manifest.version,
            "release": manifest.release,
            "variants": [v.id for v in manifest.variants],
        }
        try:
            choice = choose(manifest, profile, policy)
            doc["choice"] = choice.model_dump(mode="json")
        except EdgeAgentError as exc:
            failure = exc
            doc["choice"] = None
            doc["error"] = {"code": exc.code, "message": str(exc)}
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print("\n".join(profile.lines()))
        if manifest is not None:
            print(
                f"bundle        {manifest.name} {manifest.version} (release {manifest.release}): "
                f"{', '.join(v.id for v in manifest.variants)}; manifest not verified here"
            )
            if choice is not None:
                print("\n".join(choice.lines()))
    if failure is not None:
        raise failure
    return 0


def _agent_check_config(args: argparse.Namespace) -> int:
    from agent.checks import check_config

    check = check_config(args.file)
    files = check.summary["files"] if check.summary is not None else []
    if args.json:
        doc = {
            "file": str(args.file),
            "ok": check.ok,
            "problems": check.problems,
            "warnings": check.warnings,
            "config": check.summary,
        }
        print(json.dumps(doc, indent=2))
    if check.problems:
        # load_config's problems name their file or variable; the checks', the file.
        where = f"{args.file}: " if check.loaded else ""
        for line in check.problems:
            print(f"edge-agent: error: {where}{line}", file=sys.stderr)
        return 2
    if not args.json:
        for line in check.warnings:
            print(f"edge-agent: warning: {args.file}: {line}", file=sys.stderr)
    if not args.json and check.summary is not None:
        s = check.summary
        print(f"{args.file}: ok")
        print(
            f"  device     {s['device_id']}"
            + (f" (groups {', '.join(s['groups'])})" if s["groups"] else "")
        )
        print(
            f"  broker     {s['broker']}, MQTT {s['protocol']}, {'TLS' if s['tls'] else 'no TLS'}"
        )
        print(f"  state dir  {s['state_dir']}")
        print(f"  api        {', '.join(s['api']) or 'off'}")
        print(f"  read       {files[0]}")
        for name in files[1:]:
            print(f"             {name}")
        if s["overrides"]:
            print(f"  overrides  {', '.join(s['overrides'])}")
    return 0


def _agent_enroll(args: argparse.Namespace) -> int:
    # Lazily: the daemon never imports the enrolment code.
    from agent.enrol import Layout, install, make_csr

    layout = Layout(args.config_dir)
    if args.csr:
        if args.file is not None:
            raise ConfigError("--csr makes a CSR; give no FILE with it")
        if not args.device_id:
            raise ConfigError("--csr needs --device-id ID: the name the certificate will carry")
        pem = make_csr(args.device_id, layout, args.group)
        if args.output is not None:
            from agent._fsutil import atomic_write_bytes

            atomic_write_bytes(args.output, pem, 0o644)
            print(f"wrote {args.output}", file=sys.stderr)
        else:
            sys.stdout.write(pem.decode())
        print(
            f"kept the new key at {layout.pending_key}; on the fleet side: "
            f"edge-fleet device add {args.device_id} --csr FILE, then here: edge-agent enroll "
            f"{args.device_id}.enrol.json",
            file=sys.stderr,
        )
        return 0
    if args.file is None:
        raise ConfigError("give the enrolment FILE ('edge-fleet device add' makes it), or --csr")
    if args.device_id:
        raise ConfigError("--device-id goes with --csr; the enrolment file names the device")
    from datetime import datetime, timezone

    try:
        data = args.file.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {args.file}: {exc.strerror}") from None
    done = install(
        data, layout, now=datetime.now(timezone.utc), group=args.group, what=str(args.file)
    )
    print(
        f"enrolled {done.device_id}"
        + (f" (groups {', '.join(done.groups)})" if done.groups else "")
        + f": certificate valid to {done.not_after:%Y-%m-%d}, key from the {done.key_from}"
    )
    for path in done.files:
        print(f"  wrote {path}")
    print(
        f"Check with 'edge-agent check-config {layout.root / 'agent.toml'}', then "
        "'systemctl start edge-agent' (a running agent takes the new certificate by itself)"
    )
    return 0


def _status_socket(args: argparse.Namespace) -> Path:
    """--socket, else the config's status_socket (--config, else the default file if there is
    one; a default file that cannot be read falls back), else the default socket."""
    from agent.config import DEFAULT_CONFIG, load_config
    from agent.statusd import DEFAULT_SOCKET

    if args.socket is not None:
        return Path(args.socket)
    file: Path | None = args.config
    if file is None and not DEFAULT_CONFIG.is_file():
        return DEFAULT_SOCKET
    try:
        config = load_config(file or DEFAULT_CONFIG)
    except ConfigError:
        if file is not None:
            raise
        return DEFAULT_SOCKET
    if config.status_socket is None:
        raise ConfigError(f'{file or DEFAULT_CONFIG}: status_socket is off ("")')
    return config.status_socket


def _agent_status(args: argparse.Namespace) -> int:
    from agent.errors import NotRunningError
    from agent.statusd import query, render

    path = _status_socket(args)
    try:
        doc = query(path, timeout=args.timeout)
    except NotRunningError as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return 3
    print(json.dumps(doc, indent=2) if args.json else render(doc))
    return 0


def _add_run(top: Any) -> None:
    r = top.add_parser("run", help="run the agent in the foreground")
    r.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG_PATH,
        help="agent.toml, read with its drop-ins FILE.d/*.toml (default %(default)s)",
    )
    r.add_argument("-v", "--verbose", action="store_true")
    r.set_defaults(handler=_agent_run)


def _add_serve(top: Any) -> None:
    sv = top.add_parser(
        "serve", help="verify one bundle and serve it on the local API (no broker, no state)"
    )
    sv.add_argument("--bundle", type=Path, required=True, metavar="FILE")
    sv.add_argument(
        "--trust",
        type=Path,
        required=True,
        metavar="ROOT_OR_KEYRING",
        help="key directory, root.json or keyring.json",
    )
    sv.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="read the [api] and [runtime] tables of this agent.toml; flags override them",
    )
    sv.add_argument("--host", help="TCP address (default 127.0.0.1: loopback only)")
    sv.add_argument(
        "--port", type=int, metavar="N", help="TCP port (default 8000; 0: any free port)"
    )
    sv.add_argument(
        "--socket", metavar="PATH", help='also listen on this Unix socket ("": none, the default)'
    )
    sv.add_argument(
        "--token",
        help="require Authorization: Bearer TOKEN (16+ characters; other users see a flag in "
        "ps: on a shared box put it in the --config file instead)",
    )
    sv.add_argument("--workers", type=int, metavar="N", help="requests run at once (default 2)")
    sv.add_argument(
        "--max-queue",
        type=int,
        metavar="N",
        help="admitted requests waiting for a worker (default 16)",
    )
    sv.add_argument(
        "--max-batch-size",
        type=int,
        metavar="N",
        help="most rows in a request's dynamic leading dimension (default 1024)",
    )
    sv.add_argument(
        "--max-body-bytes", type=int, metavar="N", help="largest request body (default 64 MiB)"
    )
    sv.add_argument(
        "--memory-threshold",
        type=float,
        metavar="F",
        help="memory use (0-1) above which requests get 503 (default 0.8)",
    )
    sv.add_argument("--variant", help="run this variant instead of the one chosen")
    sv.add_argument("-v", "--verbose", action="store_true")
    sv.set_defaults(handler=_agent_serve)


def _add_hardware(top: Any) -> None:
    h = top.add_parser(
        "hardware", help="show what this box has and, with a bundle, which variant it would run"
    )
    h.add_argument("--bundle", type=Path, metavar="FILE", help="a bundle (.emb) to choose for")
    h.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="choose with this agent.toml's [runtime.policy] "
        "(default /etc/edge-agent/agent.toml where it exists)",
    )
    h.add_argument("--json", action="store_true")
    h.set_defaults(handler=_agent_hardware)


def _add_check_config(top: Any) -> None:
    c = top.add_parser(
        "check-config",
        help="check agent.toml, its drop-ins and EDGE_AGENT_* overrides, trust root, TLS files, "
        "state dir",
    )
    c.add_argument(
        "file",
        type=Path,
        nargs="?",
        default=DEFAULT_CONFIG_PATH,
        metavar="FILE",
        help="agent.toml, read with its drop-ins FILE.d/*.toml "
        "(default /etc/edge-agent/agent.toml)",
    )
    c.add_argument("--json", action="store_true")
    c.set_defaults(handler=_agent_check_config)


def _add_enroll(top: Any) -> None:
    e = top.add_parser(
        "enroll",
        help="install an enrolment file from 'edge-fleet device add' (certificates, trust, "
        "agent.toml.d/50-enrolment.toml), or with --csr make this box's key and a CSR",
    )
    e.add_argument("file", type=Path, nargs="?", metavar="FILE", help="the enrolment file")
    e.add_argument(
        "--csr",
        action="store_true",
        help="make a new key (kept on the box) and print its certificate request",
    )
    e.add_argument("--device-id", metavar="ID", help="with --csr: the box's id")
    e.add_argument(
        "-o", "--output", type=Path, metavar="FILE", help="with --csr: write the CSR here"
    )
    e.add_argument(
        "--config-dir",
        type=Path,
        default=Path("/etc/edge-agent"),
        metavar="DIR",
        help="where agent.toml lies (default %(default)s)",
    )
    e.add_argument(
        "--group",
        default="edge-agent",
        help="the group that may read the key: the service's (default %(default)s)",
    )
    e.set_defaults(handler=_agent_enroll)


def _add_status(top: Any) -> None:
    st = top.add_parser("status", help="ask the running agent how it stands (its status socket)")
    where = st.add_mutually_exclusive_group()
    where.add_argument("--socket", type=Path, metavar="PATH", help="the agent's status socket")
    where.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="take status_socket from this agent.toml (default /etc/edge-agent/agent.toml)",
    )
    st.add_argument("--json", action="store_true")
    st.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for an answer")
    st.set_defaults(handler=_agent_status)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-agent", description="Edge Model Agent on the box.")
    p.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    top = p.add_subparsers(title="commands")
    for add in (_add_run, _add_serve, _add_hardware, _add_check_config, _add_enroll, _add_status):
        add(top)
    _loadtest.add_parser(top)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run("edge-agent", build_parser(), argv)
