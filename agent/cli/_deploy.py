"""``edge-fleet deploy`` and ``edge-fleet status``: publish what devices should run, and see
what they report."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.cli._common import (
    add_broker_options,
    add_bundles_dir,
    client_id,
    days,
    mqtt_settings,
    now_at,
)
from agent.transport.topics import Topics

if TYPE_CHECKING:
    import queue

    from agent.transport.session import InboxItem, Session
    from agent.trust.keys import Signer
    from agent.trust.verifier import TrustedState


def _deploy(args: argparse.Namespace) -> int:
    import functools

    from agent.fleet.control import fleet_session, publish_retained
    from agent.fleet.deploy import (
        bundle_sha256,
        check_bundles,
        deployment_target,
        given_descriptors,
        make_deployment,
        parse_variants,
    )
    from agent.fleet.keys import fleet_trust, load_signer
    from agent.trust.envelope import parse_envelope

    topics = Topics(args.prefix)
    now = now_at()
    signers = [load_signer(k) for k in args.key]
    target = deployment_target(args.device, args.group)
    topic = topics.device(args.device).desired if args.device else topics.group_desired(args.group)
    check_bundles(args.bundles_to_deploy, device=args.device, follow_groups=args.follow_groups)
    descriptors = stage_descriptors(
        args,
        signers,
        functools.cache(lambda: fleet_trust(args.trust, args.key, now)),
        now,
        given=given_descriptors(args.descriptor, args.bundles_to_deploy),
    )
    document = make_deployment(
        descriptors,
        target=target,
        signers=signers,
        now=now,
        days=args.days,
        sequence=args.sequence,
        deployment_id=args.id,
        variants=parse_variants(args.variant),
        follow_groups=args.follow_groups,
    )
    if args.output:
        args.output.write_bytes(document)
        print(f"wrote {args.output}")
        if args.no_publish:
            return 0
    settings = mqtt_settings(args)
    dep_id = json.loads(parse_envelope(document).payload)["deployment_id"]
    with fleet_session(settings, client_id(args, "deploy")) as (session, inbox):

        def publish() -> None:
            publish_retained(session, topic, document)
            print(f"published deployment {dep_id} to {topic}", flush=True)

        if not args.wait or args.follow_groups:
            publish()
            return 0
        return _wait(
            session,
            inbox,
            topics,
            publish,
            dep_id=dep_id,
            want={name: bundle_sha256(data) for name, data in descriptors.items()},
            timeout=args.wait,
            device=args.device,
            group=args.group,
        )


def stage_descriptors(
    args: argparse.Namespace,
    signers: Sequence[Signer],
    trust: Callable[[], TrustedState],
    now: datetime,
    given: Mapping[Path, bytes] | None = None,
) -> dict[str, bytes]:
    """The BUNDLEs' descriptors, the bundles staged in --bundles (as deploy and rollout start
    do it), each step said: model -> descriptor envelope."""
    from agent.fleet import deploy

    return deploy.stage_descriptors(
        args.bundles_to_deploy,
        args.bundles,
        signers=signers,
        trust=trust,
        now=now,
        given=given,
        on_signed_again=lambda note: print(f"edge-fleet: {note}", file=sys.stderr),
        on_staged=lambda d, staged: print(
            f"{d.model} {d.version}: {staged} (served from {args.bundles})"
        ),
    )


def _wait(
    session: Session,
    inbox: queue.SimpleQueue[InboxItem],
    topics: Topics,
    publish: Callable[[], None],
    *,
    dep_id: str,
    want: Mapping[str, str | None],
    timeout: float,
    device: str | None,
    group: str | None,
) -> int:
    """Publish, then follow the devices with progress on stderr (one line redrawn on a
    terminal). 0: all active, 1: any failed or refused, 3: not all finished within ``timeout``."""
    from agent.fleet.watch import watch_deployment

    tty = sys.stderr.isatty()
    last_line = ""

    def show(line: str) -> None:
        nonlocal last_line
        print(
            ("\r" + line.ljust(len(last_line))) if tty else line,
            end="" if tty else "\n",
            file=sys.stderr,
            flush=True,
        )
        last_line = line

    watched = watch_deployment(
        session,
        inbox,
        topics,
        publish,
        deployment_id=dep_id,
        want=want,
        timeout=timeout,
        device=device,
        group=group,
        on_line=show,
    )
    if not watched.finished:
        waiting = watched.waiting
        shown = ", ".join(waiting[:10]) + (" ..." if len(waiting) > 10 else "")
        print(f"\nnot finished within {timeout:.0f} s: {shown or 'no device'}", file=sys.stderr)
        return 3
    if tty:
        print(file=sys.stderr)
    for dev, o in watched.failed.items():
        if o.model:
            print(f"{dev}: {o.model}: {o.code}: {o.message}", file=sys.stderr)
        else:
            print(f"{dev} refused the deployment ({o.code}): {o.message}", file=sys.stderr)
    return 1 if watched.failed else 0


def _status(args: argparse.Namespace) -> int:
    import queue as _queue

    from agent.fleet.control import FleetView, collect, fleet_session, render_table
    from agent.transport.session import Incoming

    settings = mqtt_settings(args)
    view = FleetView(Topics(args.prefix))
    with fleet_session(settings, client_id(args, "status"), subscriptions=view.subscriptions) as (
        _session,
        inbox,
    ):
        collect(inbox, view)
        if not args.watch:
            print(json.dumps(view.as_json(), indent=2) if args.json else render_table(view))
            return 0
        deadline = time.monotonic() + args.watch_for if args.watch_for else float("inf")
        shown = ""
        tty = sys.stdout.isatty()
        try:
            while time.monotonic() < deadline:
                state = json.dumps(view.as_json(), separators=(",", ":"))
                if args.json:
                    if state != shown:
                        print(state, flush=True)
                    shown = state
                else:
                    # The table's ages change every second: a terminal shows them move; a pipe
                    # gets a new table only when the devices' state changes.
                    text = render_table(view)
                    key = text if tty else state
                    if key != shown:
                        clear = "\x1b[H\x1b[2J" if tty else "\n"
                        print(f"{clear}{text}", flush=True)
                    shown = key
                try:
                    item = inbox.get(timeout=0.5)
                except _queue.Empty:
                    continue
                if isinstance(item, Incoming):
                    view.update(item)
        except KeyboardInterrupt:
            pass
    return 0


def add_parser(top: Any) -> None:
    d = top.add_parser("deploy", help="sign and publish a deployment to a device or a group")
    d.add_argument("bundles_to_deploy", nargs="*", type=Path, metavar="BUNDLE")
    where = d.add_mutually_exclusive_group(required=True)
    where.add_argument("--device", metavar="ID")
    where.add_argument("--group", metavar="G")
    d.add_argument(
        "--key", type=Path, action="append", required=True, help="release private key (repeatable)"
    )
    add_bundles_dir(d)
    d.add_argument(
        "--descriptor",
        type=Path,
        action="append",
        default=[],
        metavar="ENVELOPE",
        help="deploy this signed descriptor for the BUNDLE it describes, in place of "
        "BUNDLE.dsse (e.g. one 'bundle reissue' wrote; repeatable)",
    )
    d.add_argument(
        "--trust",
        type=Path,
        metavar="ROOT_OR_KEYRING",
        help="the fleet's trust to check the bundles' signatures against: key directory, "
        "root.json or keyring.json (default: the key directory --key is in)",
    )
    d.add_argument("--days", type=days, default=30, help="days until the deployment expires")
    d.add_argument("--sequence", type=int, help="default: milliseconds since the epoch")
    d.add_argument("--id", help="deployment id (default dep-<sequence>)")
    d.add_argument("--variant", action="append", default=[], metavar="MODEL=VARIANT")
    d.add_argument(
        "--follow-groups",
        action="store_true",
        help="with --device and no bundles: hand the device back to its groups' deployments",
    )
    d.add_argument("-o", "--output", type=Path, help="also write the signed document here")
    d.add_argument("--no-publish", action="store_true", help="with -o: write only")
    d.add_argument(
        "--wait",
        type=float,
        nargs="?",
        const=600.0,
        metavar="SECONDS",
        help="follow the device until every model is active or failed",
    )
    add_broker_options(d)
    d.set_defaults(handler=_deploy)

    st = top.add_parser("status", help="devices' reported state, from the retained topics")
    st.add_argument("--watch", action="store_true", help="keep following changes (Ctrl-C stops)")
    st.add_argument("--watch-for", type=float, metavar="SECONDS", help=argparse.SUPPRESS)
    st.add_argument("--json", action="store_true")
    add_broker_options(st)
    st.set_defaults(handler=_status)
