"""``edge-fleet serve``: the bundle server, answering devices' block requests."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from agent._units import size_text as _size
from agent.cli._common import add_broker_options, client_id, mqtt_settings, stop_on_signals
from agent.errors import ConfigError
from agent.transport.topics import Topics


def _serve(args: argparse.Namespace) -> int:
    import logging

    from agent.fleet.server import BlockServer, check_packet_limit, serve

    settings = mqtt_settings(args)
    check_packet_limit(args.max_packet_bytes)
    if not args.bundles.is_dir():
        raise ConfigError(f"--bundles {args.bundles} is not a directory")
    if args.report_interval < 0:
        raise ConfigError("--report-interval must be 0 (no reports) or more seconds")
    stop = stop_on_signals()
    tty = sys.stderr.isatty()
    # On a terminal a log line first clears the status line that is redrawn every second.
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format=("\r\x1b[K" if tty else "") + "%(levelname)s %(name)s: %(message)s",
    )
    started = time.monotonic()

    def status(server: BlockServer) -> None:
        if not tty:
            return
        st = server.stats
        rate = st.bytes / max(1e-9, time.monotonic() - started) / (1 << 20)
        print(
            f"\r{len(server.catalog)} bundle(s)  {st.blocks} blocks  {_size(st.bytes)} sent  "
            f"{rate:6.1f} MiB/s  {st.deferred} deferred  {st.refused} refused ",
            end="",
            file=sys.stderr,
        )

    if args.max_packet_bytes is not None:
        limit = f"packets up to {args.max_packet_bytes} bytes"
    elif settings.protocol == "5":
        limit = "packet limit from the broker"
    else:
        limit = "no packet limit"
    print(
        f"edge-fleet serve: {args.bundles} on {settings.host}:{settings.port} "
        f"(MQTT {settings.protocol}, {'shared subscription' if settings.protocol == '5' else 'single server'}, "
        f"{args.rate_limit_mib:g} MiB/s per device, {limit})",
        file=sys.stderr,
        flush=True,
    )
    server = serve(
        args.bundles,
        settings,
        topics=Topics(args.prefix),
        client_id=client_id(args, "serve"),
        rate_bytes_s=args.rate_limit_mib * (1 << 20),
        stop=stop,
        max_packet_bytes=args.max_packet_bytes,
        on_status=status,
        report_interval_s=args.report_interval,
    )
    st = server.stats
    reconnects = f", {st.connects - 1} reconnect(s)" if st.connects > 1 else ""
    print(
        f"{chr(10) if tty else ''}stopped: {st.blocks} blocks and {st.pages} block-list pages "
        f"({_size(st.bytes)}) sent, {st.refused} request(s) refused{reconnects}",
        file=sys.stderr,
    )
    return 0


def add_parser(top: Any) -> None:
    from agent.fleet.server import REPORT_INTERVAL_S

    s = top.add_parser(
        "serve", help="answer devices' block requests for the bundles in a directory"
    )
    s.add_argument("--bundles", type=Path, required=True, metavar="DIR")
    s.add_argument(
        "--rate-limit-mib", type=float, default=32.0, help="per-device limit in MiB/s (0: none)"
    )
    s.add_argument(
        "--max-packet-bytes",
        type=int,
        metavar="N",
        help="the largest MQTT packet to send, counted whole (header, topic, payload). A reply "
        "that would be larger is refused with a block-too-large error, which the device "
        "reports; a broker would drop the server for it. On MQTT 5 the broker announces its "
        "limit when the server connects, and the smaller of the two applies; MQTT 3.1.1 "
        "announces none, so give the broker's limit here (e.g. 131072 for mosquitto's "
        "max_packet_size 131072). Default: none on 3.1.1, the broker's on 5",
    )
    s.add_argument(
        "--report-interval",
        type=float,
        default=REPORT_INTERVAL_S,
        metavar="SECONDS",
        help="log a line per bundle asked for in each interval: requests, devices, blocks and "
        f"bytes sent (default {REPORT_INTERVAL_S:g}; 0: none)",
    )
    s.add_argument("-v", "--verbose", action="store_true", help="log every request")
    add_broker_options(s)
    s.set_defaults(handler=_serve)
