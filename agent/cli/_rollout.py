"""``edge-fleet rollout``: roll a version out in waves with gates; pause, resume, abort, roll
back; see how each stands."""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from agent.cli._common import (
    add_broker_options,
    add_bundles_dir,
    client_id,
    days,
    mqtt_settings,
    now_at,
    stop_on_signals,
)
from agent.cli._deploy import stage_descriptors
from agent.errors import ConfigError
from agent.transport.topics import Topics


def _progress(line: str) -> None:
    stamp = datetime.now(timezone.utc).strftime("%H:%M:%S")
    print(f"{stamp} {line}", file=sys.stderr, flush=True)


def _drive(controller: Any, args: argparse.Namespace) -> int:
    from agent.fleet.rollout import STOPPED, exit_code, render, summary

    stop = stop_on_signals()
    state = controller.run(stop.is_set)
    info = summary(controller.plan, state, controller.k)
    print(json.dumps(info) if args.json else render(info))
    if stop.is_set() and state.status not in STOPPED:
        print(
            f"stopped driving {state.rollout_id}; 'edge-fleet rollout resume "
            f"{state.rollout_id}' carries it on",
            file=sys.stderr,
        )
    return exit_code(state)


def _rollout_session(args: argparse.Namespace, command: str, trust: Any = None) -> Any:
    from agent.fleet.control import fleet_session
    from agent.fleet.plan import Knowledge

    topics = Topics(args.prefix)
    knowledge = Knowledge(topics, trust)
    cm = fleet_session(
        mqtt_settings(args),
        client_id(args, f"rollout-{command}"),
        subscriptions=knowledge.subscriptions,
    )
    return cm, knowledge


def _rollout_start(args: argparse.Namespace) -> int:
    from agent.fleet.deploy import parse_variants
    from agent.fleet.keys import fleet_trust, load_signer
    from agent.fleet.plan import Target, collect, parse_duration, parse_failures, plan_rollout
    from agent.fleet.rollout import Controller, begin
    from agent.transport.messages import Gate

    now = now_at()
    signers = [load_signer(k) for k in args.key]
    trust = fleet_trust(args.trust, args.key, now)
    count, pct = parse_failures(args.max_failures)
    try:
        gate = Gate(
            wave_timeout_s=parse_duration(args.wave_timeout, "--wave-timeout"),
            max_failures=count,
            max_failures_percent=pct,
            soak_s=parse_duration(args.soak, "--soak") if args.soak else 0.0,
            max_error_rate_increase=args.max_error_increase,
            max_p99_ratio=args.max_p99_ratio,
        )
    except ValueError as exc:
        raise ConfigError(f"gate: {exc}") from None
    if not args.group and not args.device:
        raise ConfigError("name the devices: --group G (narrowed with --where) or --device ID")
    rollout_id = args.id or f"ro-{int(now.timestamp())}"
    descriptors = stage_descriptors(args, signers, lambda: trust, now)
    target = Target(
        group=args.group,
        devices=args.device,
        selectors=args.where,
        include_offline=args.include_offline,
    )
    cm, knowledge = _rollout_session(args, "start", trust)
    with cm as (session, inbox):
        collect(inbox, knowledge)
        planned = plan_rollout(
            knowledge,
            rollout_id=rollout_id,
            descriptors=descriptors,
            target=target,
            waves=args.waves,
            gate=gate,
            now=now,
            days=args.days,
            variants=parse_variants(args.variant),
            created_by=client_id(args, "rollout"),
        )
        plan = planned.plan
        sizes = "/".join(str(len(w)) for w in plan.waves)
        print(
            f"rollout {rollout_id}: {len(plan.devices)} device(s) in {len(plan.waves)} wave(s) "
            f"({sizes})",
            file=sys.stderr,
        )
        for device, why in sorted(planned.left_out.items()):
            print(f"  left out {device}: {why}", file=sys.stderr)
        if args.dry_run:
            print(json.dumps(plan.model_dump(mode="json"), indent=2))
            return 0
        state = begin(session, inbox, knowledge, plan)
        controller = Controller(session, inbox, knowledge, plan, state, signers, progress=_progress)
        return _drive(controller, args)


def _rollout_resume(args: argparse.Namespace) -> int:
    from agent.fleet.keys import fleet_trust, load_signer
    from agent.fleet.plan import collect
    from agent.fleet.rollout import resume

    now = now_at()
    signers = [load_signer(k) for k in args.key]
    trust = fleet_trust(args.trust, args.key, now)
    cm, knowledge = _rollout_session(args, "resume", trust)
    with cm as (session, inbox):
        collect(inbox, knowledge)
        done = resume(
            session,
            inbox,
            knowledge,
            args.rollout,
            signers,
            by=client_id(args, "rollout"),
            progress=_progress,
        )
        if done.how == "taken":
            print(f"rollout {args.rollout}: resumed by {done.owner}")
            return 0
        if done.controller is None:
            print(f"rollout {args.rollout} is {done.status}: nothing to resume", file=sys.stderr)
            return 0 if done.status != "aborted" else 5
        return _drive(done.controller, args)


def _rollout_rollback(args: argparse.Namespace) -> int:
    from agent.fleet.keys import fleet_trust, load_signer
    from agent.fleet.plan import collect
    from agent.fleet.rollout import rollback

    now = now_at()
    signers = [load_signer(k) for k in args.key]
    trust = fleet_trust(args.trust, args.key, now)
    cm, knowledge = _rollout_session(args, "rollback", trust)
    with cm as (session, inbox):
        collect(inbox, knowledge)
        controller = rollback(
            session,
            inbox,
            knowledge,
            args.rollout,
            signers,
            trust,
            days=args.days,
            by=client_id(args, "rollout"),
            progress=_progress,
        )
        return _drive(controller, args)


def _rollout_control(args: argparse.Namespace) -> int:
    """pause, abort: a request the driving controller takes at its next tick; with none
    driving, the state is changed here."""
    from agent.fleet.plan import collect
    from agent.fleet.rollout import pause_or_abort

    action = args.action
    cm, knowledge = _rollout_session(args, action)
    with cm as (session, inbox):
        collect(inbox, knowledge)
        done = pause_or_abort(
            session, inbox, knowledge, args.rollout, action, client_id(args, "rollout")
        )
        if done.how == "set":
            print(f"rollout {args.rollout}: {done.status} (no controller was driving it)")
        elif done.how == "taken":
            print(f"rollout {args.rollout}: {action} taken by {done.owner}")
        else:
            print(f"rollout {args.rollout}: asked {done.owner} to {action}; no answer yet")
    return 0


def _rollout_status(args: argparse.Namespace) -> int:
    import queue as _queue

    from agent.fleet.plan import collect
    from agent.fleet.rollout import STOPPED, exit_code, load, render, summary
    from agent.transport.session import Incoming

    cm, knowledge = _rollout_session(args, "status")
    with cm as (_session, inbox):
        collect(inbox, knowledge)
        if not args.rollout:
            rows = [(rid, knowledge.states.get(rid)) for rid in sorted(knowledge.plans)]
            if args.json:
                print(json.dumps({rid: st.status if st else None for rid, st in rows}))
            for rid, st in rows if not args.json else ():
                plan = knowledge.plans[rid]
                models = ", ".join(f"{n} {m.version}" for n, m in sorted(plan.models.items()))
                print(
                    f"{rid}  {st.status if st else '?':12}  {len(plan.devices):>5} devices  {models}"
                )
            if not rows and not args.json:
                print("no rollout on the broker")
            return 0
        deadline = time.monotonic() + (args.watch_for or float("inf"))
        shown = ""
        while True:
            plan, state = load(knowledge, args.rollout)
            info = summary(plan, state, knowledge)
            text = json.dumps(info) if args.json else render(info)
            if text != shown:
                clear = (
                    "\x1b[H\x1b[2J" if args.watch and sys.stdout.isatty() and not args.json else ""
                )
                print(f"{clear}{text}", flush=True)
                shown = text
            if not args.watch or state.status in STOPPED:
                return exit_code(state)
            if time.monotonic() >= deadline:
                return exit_code(state)
            try:
                item = inbox.get(timeout=0.5)
            except _queue.Empty:
                continue
            except KeyboardInterrupt:
                return exit_code(state)
            if isinstance(item, Incoming):
                knowledge.update(item)


def add_parser(top: Any) -> None:
    ro = top.add_parser(
        "rollout",
        help="roll a version out in waves with gates; pause, resume, abort, roll back",
        description="Exit status of start, resume, rollback and status: 0 done (or rolled "
        "back), 4 halted by a gate, 5 aborted, 6 not finished (running, paused); 2 usage or a "
        "conflicting rollout, 3 broker or storage.",
    ).add_subparsers(title="rollout commands")

    def signed(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--key", type=Path, action="append", required=True, help="release private key"
        )
        p.add_argument(
            "--trust", type=Path, metavar="DIR", help="key directory (default: the --key's)"
        )
        p.add_argument("--days", type=days, default=30, help="days until the documents expire")

    r = ro.add_parser("start", help="plan a rollout and drive it to the end")
    r.add_argument("bundles_to_deploy", nargs="+", type=Path, metavar="BUNDLE")
    r.add_argument("--group", metavar="G", help="the devices that follow group G")
    r.add_argument(
        "--device", action="append", default=[], metavar="ID", help="these devices (repeatable)"
    )
    r.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="KEY=GLOB",
        help="narrow by what devices report: device, arch, accelerator, agent_version, "
        "runtime, variant, version, hardware.<detail> (KEY!=GLOB excludes; repeatable)",
    )
    r.add_argument("--include-offline", action="store_true", help="offline devices too")
    r.add_argument(
        "--waves",
        default="1,10%,50%,100%",
        help="devices reached by the end of each wave: counts or percentages "
        "(default 1,10%%,50%%,100%%)",
    )
    r.add_argument(
        "--wave-timeout", default="10m", help="each device of a wave active within (default 10m)"
    )
    r.add_argument(
        "--max-failures",
        default="0",
        help="failures allowed so far: a count or a percentage (default 0)",
    )
    r.add_argument("--soak", help="then watch the wave's telemetry this long (e.g. 10m)")
    r.add_argument(
        "--max-error-increase",
        type=float,
        default=0.01,
        metavar="FRACTION",
        help="with --soak: error rate allowed above the old version's (default 0.01)",
    )
    r.add_argument(
        "--max-p99-ratio",
        type=float,
        default=1.5,
        metavar="RATIO",
        help="with --soak: p99 latency allowed against the old version's (default 1.5)",
    )
    r.add_argument("--id", help="rollout id (default ro-<seconds since the epoch>)")
    r.add_argument("--variant", action="append", default=[], metavar="MODEL=VARIANT")
    add_bundles_dir(r)
    r.add_argument("--dry-run", action="store_true", help="print the plan; publish nothing")
    r.add_argument("--json", action="store_true", help="the final summary as JSON")
    signed(r)
    add_broker_options(r)
    r.set_defaults(handler=_rollout_start)

    for name, handler, text in (
        ("resume", _rollout_resume, "carry a rollout on (after a pause, a halt or a crash)"),
        ("rollback", _rollout_rollback, "return every device it reached to what it ran before"),
    ):
        r = ro.add_parser(name, help=text)
        r.add_argument("rollout", metavar="ID")
        r.add_argument("--json", action="store_true", help="the final summary as JSON")
        signed(r)
        add_broker_options(r)
        r.set_defaults(handler=handler)
    for action, text in (("pause", "start no further wave"), ("abort", "stop the rollout")):
        r = ro.add_parser(action, help=text)
        r.add_argument("rollout", metavar="ID")
        add_broker_options(r)
        r.set_defaults(handler=_rollout_control, action=action)
    r = ro.add_parser("status", help="waves, phases and failures (no ID: every rollout)")
    r.add_argument("rollout", nargs="?", metavar="ID")
    r.add_argument("--watch", action="store_true", help="follow until it ends (Ctrl-C stops)")
    r.add_argument("--watch-for", type=float, metavar="SECONDS", help=argparse.SUPPRESS)
    r.add_argument("--json", action="store_true")
    add_broker_options(r)
    r.set_defaults(handler=_rollout_status)
