"""``edge-fleet device``: enrol a device (its certificate and enrolment file), revoke one."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from agent.cli._common import days, now_at
from agent.errors import ConfigError


def _device_broker(text: str | None) -> Any:
    from pydantic import ValidationError

    from agent.device.enrolment import BrokerAddress
    from agent.transport.session import parse_endpoint

    if not text:
        raise ConfigError(
            "--broker HOST[:PORT] (or $EDGE_FLEET_DEVICE_BROKER): where the device connects, "
            "the broker's device listener (8883)"
        )
    try:
        host, port = parse_endpoint(text, 8883)
        return BrokerAddress(host=host, port=port)
    except (ValueError, ValidationError) as exc:
        raise ConfigError(f"--broker {text!r}: {exc}") from None


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot read it: {exc.strerror}") from None


def _device_add(args: argparse.Namespace) -> int:
    from agent.fleet.devices import add_device, write_enrolment

    broker = _device_broker(args.broker).model_copy(update={"protocol": args.mqtt})
    csr = _read(args.csr, "--csr") if args.csr is not None else None
    out: Path = args.output or Path(f"{args.device_id}.enrol.json")
    if out.exists() and not args.force:
        raise ConfigError(f"{out} exists: give another -o FILE, or --force to replace it")
    issued = add_device(
        args.pki,
        args.device_id,
        broker=broker,
        trust_dir=args.trust,
        now=now_at(),
        groups=args.group,
        csr=csr,
        days=args.days,
        renew=args.renew,
        topic_prefix=args.prefix,
    )
    write_enrolment(out, issued.enrolment)
    e = issued.enrolment
    print(
        f"issued {e.device_id}'s certificate (serial {issued.serial}, valid to "
        f"{issued.not_after:%Y-%m-%d}): {issued.cert_path}"
    )
    print(
        f"wrote {out} (0600): broker {e.broker.host}:{e.broker.port}, "
        f"groups {', '.join(e.groups) or 'none'}, "
        + (
            "the device's key made here: keep the file secret, delete it once installed"
            if e.key
            else "no key: the box keeps its own"
        )
    )
    if issued.replaced is not None:
        print(
            f"the box's certificate so far (serial {issued.replaced}) is still valid: once it "
            f"runs the new one, 'edge-fleet device revoke {e.device_id} --serial "
            f"{issued.replaced} --pki {args.pki}'"
        )
    print(f"On the box: edge-agent enroll {out.name}, then systemctl start edge-agent")
    return 0


def _device_revoke(args: argparse.Namespace) -> int:
    from agent.fleet.devices import revoke_device

    done = revoke_device(args.pki, args.device_id, now=now_at(), serial=args.serial)
    if done.already:
        print(f"{done.device_id}'s certificate (serial {done.serial}) was revoked already")
    else:
        print(f"revoked {done.device_id}'s certificate (serial {done.serial})")
    print(f"wrote {done.crl} ({done.revoked_count} revoked)")
    print(
        "The broker reads its CRL when it starts: copy it to the broker's crlfile "
        "(/etc/mosquitto/certs/ca.crl in the shipped config) and 'systemctl restart mosquitto'; "
        "the device is refused from then on (a connection it holds ends with the restart)"
    )
    return 0


def add_parser(top: Any) -> None:
    env = os.environ.get
    d = top.add_parser("device", help="enrol a device (certificate, enrolment file) or revoke it")
    sub = d.add_subparsers(title="device commands")

    def pki(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--pki",
            type=Path,
            default=Path(env("EDGE_FLEET_PKI", "pki")),
            metavar="DIR",
            help="the fleet's CA, as config/broker/make-certs.sh made it "
            "(default $EDGE_FLEET_PKI or ./pki)",
        )

    a = sub.add_parser(
        "add",
        help="issue a device's certificate and write its enrolment file for edge-agent enroll",
    )
    a.add_argument("device_id", metavar="ID", help="the device id (its certificate's CN)")
    a.add_argument(
        "--group",
        action="append",
        default=[],
        metavar="GROUP",
        help="a group the device follows, in order of precedence (repeatable)",
    )
    a.add_argument(
        "--csr",
        type=Path,
        metavar="FILE",
        help="sign this CSR (edge-agent enroll --csr on the box): the key stays on the box",
    )
    pki(a)
    a.add_argument(
        "--trust",
        type=Path,
        default=Path(env("EDGE_FLEET_KEYS", "fleet-keys")),
        metavar="DIR",
        help="the fleet's key directory: its root.json and keyring.json go to the box "
        "(default $EDGE_FLEET_KEYS or ./fleet-keys)",
    )
    a.add_argument(
        "--broker",
        default=env("EDGE_FLEET_DEVICE_BROKER"),
        metavar="HOST[:PORT]",
        help="where the device connects: the device listener (default "
        "$EDGE_FLEET_DEVICE_BROKER; port 8883)",
    )
    a.add_argument("--mqtt", choices=["5", "3.1.1"], default=env("EDGE_FLEET_MQTT", "5"))
    a.add_argument("--prefix", default=env("EDGE_FLEET_PREFIX", "ema/v1"), help="topic prefix")
    a.add_argument("--days", type=days, default=825, help="certificate validity (default 825)")
    a.add_argument(
        "--renew",
        action="store_true",
        help="the device has a certificate: issue a new one (the old one stays valid until revoked)",
    )
    a.add_argument(
        "-o",
        "--output",
        type=Path,
        metavar="FILE",
        help="the enrolment file (default ID.enrol.json)",
    )
    a.add_argument("--force", action="store_true", help="replace an existing -o FILE")
    a.set_defaults(handler=_device_add)

    r = sub.add_parser("revoke", help="revoke a device's certificate: the CA's CRL anew")
    r.add_argument("device_id", metavar="ID")
    r.add_argument(
        "--serial",
        metavar="HEX",
        help="the certificate of this serial (an earlier one, after --renew); default the current",
    )
    pki(r)
    r.set_defaults(handler=_device_revoke)
