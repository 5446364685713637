"""``edge-agent loadtest``: drive a model's API as perf_analyzer does; see
agent.serving.loadtest."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from agent.cli._common import stop_on_signals
from agent.errors import ConfigError

TOKEN_ENV = "EDGE_AGENT_API_TOKEN"  # noqa: S105 - the variable's name, not a token


def _loadtest(args: argparse.Namespace) -> int:
    from agent.serving.loadtest import Progress, Target, make_request, read_metadata, render, run

    if args.batch < 1:
        raise ConfigError("--batch must be 1 or more")
    target = Target(
        url=args.url,
        socket=args.socket,
        token=os.environ.get(TOKEN_ENV) or None,
    ) if args.url or args.socket else Target(url="http://127.0.0.1:8000")  # fmt: skip
    metadata = read_metadata(target, args.model, args.model_version)
    request = make_request(
        metadata, batch=args.batch, binary=not args.json_inputs, version=args.model_version
    )
    tty = sys.stderr.isatty()

    def progress(p: Progress) -> None:
        p99 = "-" if p.p99_ms is None else f"{p.p99_ms:.2f} ms"
        line = (
            f"{p.elapsed_s:6.1f} s  {p.answered:8d} answered  {p.rps:8.1f}/s  p99 {p99}  "
            f"errors {p.errors}  503 {p.busy}"
        )
        print(("\r\x1b[K" + line) if tty else line, end="" if tty else "\n", file=sys.stderr,
              flush=True)  # fmt: skip

    stop = stop_on_signals()
    print(
        f"edge-agent loadtest: {args.model} at {target.where}, {args.concurrency} at once for "
        f"{args.duration:g} s" + (f" or {args.requests} requests" if args.requests else ""),
        file=sys.stderr,
        flush=True,
    )
    result = run(
        target,
        request,
        concurrency=args.concurrency,
        duration_s=args.duration,
        max_requests=args.requests,
        stop=stop,
        on_progress=None if args.quiet else progress,
    )
    if tty and not args.quiet:
        print(file=sys.stderr)
    print(json.dumps(result) if args.format == "json" else render(result))
    return 0 if result["ok"] else 1


def add_parser(top: Any) -> None:
    lt = top.add_parser(
        "loadtest",
        help="drive a model's inference API and print throughput and latency",
        description="Reads the model's metadata, makes inputs of the right shapes and types, "
        "and sends them from --concurrency connections in a closed loop for --duration "
        f"seconds (or --requests requests). A token is read from ${TOKEN_ENV}. Exit status 0 "
        "when any request was answered 200, 1 when none was.",
    )
    where = lt.add_mutually_exclusive_group()
    where.add_argument("--url", help="the API's base URL (default http://127.0.0.1:8000)")
    where.add_argument("--socket", type=Path, metavar="PATH", help="the API's Unix socket")
    lt.add_argument("--model", required=True, metavar="NAME")
    lt.add_argument("--model-version", metavar="V", help="a version of the model (default: any)")
    lt.add_argument("--concurrency", type=int, default=4, metavar="N", help="default 4")
    lt.add_argument("--duration", type=float, default=10.0, metavar="S", help="default 10")
    lt.add_argument("--requests", type=int, metavar="N", help="stop after this many")
    lt.add_argument("--batch", type=int, default=1, metavar="B", help="rows per request")
    enc = lt.add_mutually_exclusive_group()
    enc.add_argument(
        "--binary", action="store_false", dest="json_inputs", help="binary tensors (default)"
    )
    enc.add_argument("--json", action="store_true", dest="json_inputs", help="JSON tensors")
    lt.add_argument(
        "--format", choices=["text", "json"], default="text", help="the summary (json: one line)"
    )
    lt.add_argument("-q", "--quiet", action="store_true", help="no live progress")
    lt.set_defaults(handler=_loadtest, json_inputs=False)
