"""Entry points: ``edge-agent`` (on the box) and ``edge-fleet`` (for fleet managers).

Thin: parse arguments, call the library, print. Only the project's own errors are caught; each
becomes one line a person can act on, and an exit status:

    0  done            1  content rejected (bad signature, tampered, unsafe, expired, ...)
    2  usage or config 3  storage or tool failure (disk, missing runtime)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from agent import __version__
from agent._strictjson import loads
from agent.errors import BadContentError, ConfigError, EdgeAgentError

Handler = Callable[[argparse.Namespace], int]


def _now(value: str | None) -> datetime:
    if not value:
        return datetime.now(timezone.utc)
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"--at {value!r} is not an ISO 8601 time") from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    raise AssertionError


def _run(prog: str, parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return handler(args)
    except BadContentError as exc:
        print(f"{prog}: rejected ({exc.code}): {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except EdgeAgentError as exc:
        print(f"{prog}: error ({exc.code}): {exc}", file=sys.stderr)
        return 3


# -- edge-fleet keys ----------------------------------------------------------------------------
def _keys_init(args: argparse.Namespace) -> int:
    from agent.fleet.keys import KeyStore

    store = KeyStore.init(
        args.dir,
        now=_now(None),
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
    now = _now(None)
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

    keyring = KeyStore(args.dir).revoke_release(args.keyids, now=_now(None))
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


# -- edge-fleet bundle --------------------------------------------------------------------------
def _bundle_build(args: argparse.Namespace) -> int:
    from agent.bundle.manifest import Tolerance
    from agent.fleet.build import BuildOptions, build_bundle

    options = BuildOptions(
        name=args.name,
        version=args.version,
        release=args.release,
        samples=args.samples,
        sample_count=args.sample_count,
        quantize=args.quantize,
        openvino=args.openvino,
        block_size=args.block_size,
        description=args.description,
        tolerance=Tolerance(atol=args.atol, rtol=args.rtol),
        min_memory_mb=args.min_memory_mb,
        architectures=tuple(args.arch),
    )
    result = build_bundle(args.models, args.output, options)
    m = result.manifest
    print(f"built {result.path}: {m.name} {m.version} (release {m.release}), {_size(result.size)}")
    for v in m.variants:
        line = f"  {v.id:<16} {v.format:<12} {v.precision:<5}"
        if v.accuracy:
            line += f" max |error| {v.accuracy.max_abs_error:.3g} vs {v.accuracy.reference} on {v.accuracy.samples} samples"
        print(line)
    print(f"  self-test: {len(m.samples.cases) if m.samples else 0} sample(s)")
    print(f"  sha256 {result.sha256}")
    return 0


def _bundle_sign(args: argparse.Namespace) -> int:
    from agent.fleet.keys import load_signer
    from agent.fleet.sign import sign_bundle

    signers = [load_signer(k) for k in args.key]
    out, envelope = sign_bundle(
        args.bundle, signers, now=_now(None), days=args.days, out=args.output
    )
    print(f"signed {args.bundle}: {out} ({len(envelope.signatures)} signature(s))")
    return 0


def _bundle_verify(args: argparse.Namespace) -> int:
    from agent.fleet.sign import verify_file

    verified = verify_file(
        args.bundle,
        args.trust,
        now=_now(args.at),
        envelope=args.envelope,
        keyring=args.keyring,
        min_release=args.min_release,
    )
    d = verified.descriptor
    if args.json:
        print(
            json.dumps(
                {
                    "verified": True,
                    "descriptor": d.model_dump(mode="json"),
                    "signers": sorted(verified.signers),
                },
                indent=2,
            )
        )
    else:
        signers = ", ".join(k[:16] for k in sorted(verified.signers))
        print(
            f"verified {args.bundle}: {d.model} {d.version} (release {d.release}), "
            f"{_size(d.bundle_size)}, signed by {signers}, expires {d.expires:%Y-%m-%d}"
        )
    return 0


def _bundle_inspect(args: argparse.Namespace) -> int:
    from agent.bundle.reader import read_index
    from agent.fleet.sign import envelope_path
    from agent.trust.envelope import parse_envelope

    try:
        with open(args.bundle, "rb") as f:
            index = read_index(f)
    except OSError as exc:
        raise ConfigError(f"cannot read {args.bundle}: {exc.strerror}") from None
    m = index.manifest
    env_info: dict[str, Any] | None = None
    sidecar = envelope_path(args.bundle)
    if sidecar.exists():
        try:
            env = parse_envelope(sidecar.read_bytes())
            env_info = {
                "path": str(sidecar),
                "payload_type": env.payload_type,
                "verified": False,
                "keyids": [s.keyid for s in env.signatures],
                "descriptor": loads(env.payload, what="descriptor", max_bytes=1 << 20),
            }
        except BadContentError as exc:
            env_info = {"path": str(sidecar), "verified": False, "error": str(exc)}
    if args.json:
        print(
            json.dumps(
                {
                    "path": str(args.bundle),
                    "size": index.file_size,
                    "manifest_sha256": index.manifest_sha256,
                    "manifest": m.model_dump(mode="json"),
                    "envelope": env_info,
                },
                indent=2,
            )
        )
        return 0
    blocks = -(-index.file_size // m.block_size)
    print(
        f"bundle     {args.bundle}  ({_size(index.file_size)}, {blocks} blocks of {_size(m.block_size)})"
    )
    print(
        f"model      {m.name} {m.version} (release {m.release})"
        + (f" -- {m.description}" if m.description else "")
    )
    for v in m.variants:
        size = sum(f.size for f in v.files)
        io = "  ".join(f"{t.name}:{t.datatype}{t.shape}" for t in v.inputs)
        oo = "  ".join(f"{t.name}:{t.datatype}{t.shape}" for t in v.outputs)
        print(
            f"variant    {v.id:<16} {v.format:<12} {v.precision:<5} {len(v.files)} file(s), {_size(size)}"
        )
        print(f"             in  {io}\n             out {oo}")
        print(
            f"             self-test tolerance atol {v.tolerance.atol:g} rtol {v.tolerance.rtol:g}"
        )
        if v.accuracy:
            print(
                f"             accuracy: max |error| {v.accuracy.max_abs_error:.3g}, mean {v.accuracy.mean_abs_error:.3g} vs {v.accuracy.reference}"
            )
        c = v.constraints
        if c.accelerators or c.architectures or c.min_memory_mb:
            print(
                f"             needs {', '.join(c.accelerators) or 'any accelerator'}; "
                f"{', '.join(c.architectures) or 'any arch'}; {c.min_memory_mb} MB"
            )
    print(f"self-test  {len(m.samples.cases) if m.samples else 0} sample(s)")
    if env_info and "error" in env_info:
        print(f"signature  {sidecar}: unreadable ({env_info['error']})")
    elif env_info:
        print(
            f"signature  {sidecar}: {len(env_info['keyids'])} signature(s), not verified here "
            f"(use 'edge-fleet bundle verify')"
        )
    else:
        print("signature  none (use 'edge-fleet bundle sign')")
    return 0


def fleet_parser() -> argparse.ArgumentParser:
    from agent.bundle.manifest import DEFAULT_BLOCK_SIZE

    p = argparse.ArgumentParser(
        prog="edge-fleet", description="Build, sign and verify model bundles."
    )
    p.add_argument("--version", action="version", version=f"edge-fleet {__version__}")
    top = p.add_subparsers(title="commands")

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
    k.add_argument("--root-days", type=int, default=730)
    k.add_argument("--keyring-days", type=int, default=365)
    k.add_argument("--release-days", type=int, default=365)
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

    bundle = top.add_parser("bundle", help="model bundles").add_subparsers(title="bundle commands")
    b = bundle.add_parser("build", help="build a bundle from model files")
    b.add_argument(
        "models", nargs="+", type=Path, metavar="MODEL", help=".onnx, .xml (+.bin) or .tflite"
    )
    b.add_argument("--name", required=True)
    b.add_argument("--version", required=True)
    b.add_argument("--release", type=int, help="release counter (default: from the version)")
    b.add_argument(
        "--samples",
        default="auto",
        metavar="auto|none|DIR",
        help="self-test samples: random inputs, none, or a directory of .npz files",
    )
    b.add_argument("--sample-count", type=int, default=4)
    b.add_argument(
        "--quantize",
        choices=["int8"],
        help="add an int8 variant (ONNX Runtime dynamic quantization)",
    )
    b.add_argument(
        "--openvino",
        action="store_true",
        help="add an OpenVINO IR variant converted from the ONNX model",
    )
    b.add_argument(
        "--block-size", type=int, default=DEFAULT_BLOCK_SIZE, help="transfer block size in bytes"
    )
    b.add_argument("--description", default="")
    b.add_argument("--atol", type=float, default=1e-3, help="self-test absolute tolerance")
    b.add_argument("--rtol", type=float, default=1e-3, help="self-test relative tolerance")
    b.add_argument(
        "--min-memory-mb",
        type=int,
        help="memory each variant needs (default: estimated from its files)",
    )
    b.add_argument(
        "--arch",
        nargs="+",
        default=[],
        choices=["x86_64", "aarch64", "armv7l"],
        help="CPU architectures the bundle is for (default: any)",
    )
    b.add_argument("-o", "--output", type=Path, required=True)
    b.set_defaults(handler=_bundle_build)
    b = bundle.add_parser("sign", help="sign a bundle's descriptor with release key(s)")
    b.add_argument("bundle", type=Path)
    b.add_argument(
        "--key", type=Path, action="append", required=True, help="release private key (repeatable)"
    )
    b.add_argument("--days", type=int, default=90, help="days until the signature expires")
    b.add_argument("-o", "--output", type=Path, help="envelope path (default BUNDLE.dsse)")
    b.set_defaults(handler=_bundle_sign)
    b = bundle.add_parser("verify", help="verify a bundle as a device would")
    b.add_argument("bundle", type=Path)
    b.add_argument(
        "--trust",
        type=Path,
        required=True,
        metavar="ROOT_OR_KEYRING",
        help="key directory, root.json or keyring.json",
    )
    b.add_argument("--envelope", type=Path, help="default BUNDLE.dsse")
    b.add_argument("--keyring", type=Path, help="keyring, when --trust names a root elsewhere")
    b.add_argument("--min-release", type=int, default=0, help="refuse releases below this counter")
    b.add_argument("--at", metavar="TIME", help="reference time, ISO 8601 (default now)")
    b.add_argument("--json", action="store_true")
    b.set_defaults(handler=_bundle_verify)
    b = bundle.add_parser("inspect", help="show what a bundle holds")
    b.add_argument("bundle", type=Path)
    b.add_argument("--json", action="store_true")
    b.set_defaults(handler=_bundle_inspect)
    return p


def agent_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-agent", description="Edge Model Agent on the box.")
    p.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    return p


def fleet_main(argv: Sequence[str] | None = None) -> int:
    return _run("edge-fleet", fleet_parser(), argv)


def agent_main(argv: Sequence[str] | None = None) -> int:
    return _run("edge-agent", agent_parser(), argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(fleet_main())
