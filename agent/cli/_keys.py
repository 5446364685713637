"""``edge-fleet keys``: the fleet's key directory, and its trust published to devices."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from agent.cli._common import add_broker_options, client_id, days, mqtt_settings, now_at


def _keys_init(args: argparse.Namespace) -> int:
    from agent.fleet.keys import KeyStore

    store = KeyStore.init(
        args.dir,
        now=now_at(),
        root_keys=args.root_keys,
        threshold=args.threshold,
        models=args.models,
        root_days=args.root_days,
        keyring_days=args.keyring_days,
        release_days=args.release_days,
    )
    root, keyring = store.current_root(), store.current_keyring()
    print(
        f"created {args.dir}: root v1 ({args.threshold} of {args.root_keys} root keys), keyring v1"
    )
    for keyid in root.keys:
        print(f"  root key     {keyid[:16]}  private/root-{keyid[:16]}.pem")
    for keyid in keyring.release_keys:
        print(
            f"  release key  {keyid[:16]}  private/release-{keyid[:16]}.pem  (signs: {', '.join(args.models)})"
        )
    print("Ship root.json and keyring.json to devices; move the root private keys offline.")
    return 0


def _keys_rotate(args: argparse.Namespace) -> int:
    from agent.fleet.keys import KeyStore

    store = KeyStore(args.dir)
    now = now_at()
    if args.root:
        root = store.rotate_root(now=now, root_keys=args.root_keys, threshold=args.threshold)
        print(
            f"root v{root.version}: {root.threshold} of {len(root.keys)} new root keys; "
            f"signed by the old and the new threshold; keyring re-signed"
        )
    else:
        keyring, signer = store.rotate_release(now=now, models=args.models, keep=args.keep)
        print(
            f"keyring v{keyring.version}: new release key {signer.keyid[:16]} "
            f"(private/release-{signer.keyid[:16]}.pem); "
            f"{len(keyring.release_keys) - 1} old key(s) kept, the rest revoked"
        )
    return 0


def _keys_revoke(args: argparse.Namespace) -> int:
    from agent.fleet.keys import KeyStore

    keyring = KeyStore(args.dir).revoke_release(args.keyids, now=now_at())
    print(f"keyring v{keyring.version}: {len(keyring.release_keys)} release key(s) remain")
    return 0


def _keys_show(args: argparse.Namespace) -> int:
    from agent.fleet.keys import KeyStore

    store = KeyStore(args.dir)
    root, keyring = store.current_root(), store.current_keyring()
    if args.json:
        print(
            json.dumps(
                {"root": root.model_dump(mode="json"), "keyring": keyring.model_dump(mode="json")},
                indent=2,
            )
        )
        return 0
    print(
        f"root v{root.version}, expires {root.expires:%Y-%m-%d}, threshold {root.threshold} of {len(root.keys)}"
    )
    for keyid in root.keys:
        have = (store.private / f"root-{keyid[:16]}.pem").exists()
        print(f"  root     {keyid[:16]}  {'private key here' if have else 'offline'}")
    print(
        f"keyring v{keyring.version}, expires {keyring.expires:%Y-%m-%d}, threshold {keyring.threshold}"
    )
    for keyid, key in keyring.release_keys.items():
        print(
            f"  release  {keyid[:16]}  expires {key.expires:%Y-%m-%d}  models {', '.join(key.models)}"
        )
    return 0


def _keys_publish(args: argparse.Namespace) -> int:
    from agent.fleet.control import fleet_session, publish_retained
    from agent.fleet.keys import KeyStore
    from agent.transport.topics import Topics

    store = KeyStore(args.dir)
    update = store.trust_update()
    topics = Topics(args.prefix)
    keyring = store.current_keyring()
    what = f"root chain v1..v{store.current_root().version} and keyring v{keyring.version}"
    if args.output:
        args.output.write_bytes(update.to_bytes())
        print(f"wrote {what} to {args.output}")
        if args.no_publish:
            return 0
    with fleet_session(mqtt_settings(args), client_id(args, "trust")) as (session, _inbox):
        publish_retained(session, topics.trust, update.to_bytes())
    print(f"published {what} to {topics.trust}")
    return 0


def add_parser(top: Any) -> None:
    keys = top.add_parser("keys", help="root and release keys").add_subparsers(
        title="keys commands"
    )
    k = keys.add_parser("init", help="create root keys, a release key and a signed keyring")
    k.add_argument("dir", type=Path)
    k.add_argument(
        "--root-keys", type=int, default=3, metavar="N", help="root keys to create (default 3)"
    )
    k.add_argument(
        "--threshold", type=int, default=2, metavar="K", help="root signatures required (default 2)"
    )
    k.add_argument(
        "--models",
        nargs="+",
        default=["*"],
        metavar="PATTERN",
        help="model names the release key may sign (globs; default '*')",
    )
    k.add_argument("--root-days", type=days, default=730)
    k.add_argument("--keyring-days", type=days, default=365)
    k.add_argument("--release-days", type=days, default=365)
    k.set_defaults(handler=_keys_init)
    k = keys.add_parser("rotate", help="rotate the release key (default) or the root keys")
    k.add_argument("dir", type=Path)
    which = k.add_mutually_exclusive_group()
    which.add_argument(
        "--release", action="store_true", help="new release key; old ones revoked (default)"
    )
    which.add_argument("--root", action="store_true", help="new root keys, chained to the old root")
    k.add_argument("--models", nargs="+", default=["*"], metavar="PATTERN")
    k.add_argument(
        "--keep", nargs="+", default=[], metavar="KEYID", help="old release keys to keep trusting"
    )
    k.add_argument("--root-keys", type=int, metavar="N")
    k.add_argument("--threshold", type=int, metavar="K")
    k.set_defaults(handler=_keys_rotate)
    k = keys.add_parser("revoke", help="drop release keys from the keyring")
    k.add_argument("dir", type=Path)
    k.add_argument("keyids", nargs="+", metavar="KEYID", help="key ids or unique prefixes")
    k.set_defaults(handler=_keys_revoke)
    k = keys.add_parser("show", help="list root and release keys")
    k.add_argument("dir", type=Path)
    k.add_argument("--json", action="store_true")
    k.set_defaults(handler=_keys_show)
    t = keys.add_parser("publish", help="publish the root chain and keyring on the trust topic")
    t.add_argument("dir", type=Path)
    t.add_argument("-o", "--output", type=Path, help="also write the trust message here")
    t.add_argument("--no-publish", action="store_true", help="with -o: write only")
    add_broker_options(t)
    t.set_defaults(handler=_keys_publish)
