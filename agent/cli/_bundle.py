"""``edge-fleet bundle``: build, sign, re-issue, verify and inspect model bundles."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from agent._strictjson import loads
from agent._units import size_text as _size
from agent.cli._common import days, now_at
from agent.errors import BadContentError, ConfigError
from agent.transport.messages import COMMON_PACKET_LIMIT


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
    for warning in result.warnings:
        print(f"edge-fleet: warning: {warning}", file=sys.stderr)
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
    out, envelope = sign_bundle(args.bundle, signers, now=now_at(), days=args.days, out=args.output)
    print(f"signed {args.bundle}: {out} ({len(envelope.signatures)} signature(s))")
    return 0


def _bundle_reissue(args: argparse.Namespace) -> int:
    from agent.fleet.keys import load_signer
    from agent.fleet.sign import reissue_bundle

    signers = [load_signer(k) for k in args.key]
    out, envelope = reissue_bundle(
        args.bundle,
        signers,
        release=args.release,
        now=now_at(),
        days=args.days,
        out=args.output,
    )
    print(
        f"re-issued {args.bundle} as release {args.release}: {out} "
        f"({len(envelope.signatures)} signature(s))"
    )
    return 0


def _bundle_verify(args: argparse.Namespace) -> int:
    from agent.verify import verify_file

    verified = verify_file(
        args.bundle,
        args.trust,
        now=now_at(args.at),
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
        reissue = "" if d.bundle_release is None else f", built as {d.bundle_release}"
        print(
            f"verified {args.bundle}: {d.model} {d.version} (release {d.release}{reissue}), "
            f"{_size(d.bundle_size)}, signed by {signers}, expires {d.expires:%Y-%m-%d}"
        )
    return 0


def _bundle_inspect(args: argparse.Namespace) -> int:
    from agent.bundle.manifest import tensors_text
    from agent.bundle.reader import read_index
    from agent.trust.envelope import parse_envelope
    from agent.verify import envelope_path

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
    mismatch = m.input_mismatch()
    if args.json:
        print(
            json.dumps(
                {
                    "path": str(args.bundle),
                    "size": index.file_size,
                    "manifest_sha256": index.manifest_sha256,
                    "manifest": m.model_dump(mode="json"),
                    "envelope": env_info,
                    "input_mismatch": mismatch,
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
        io, oo = tensors_text(v.inputs), tensors_text(v.outputs)
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
    if mismatch:
        print(
            f"inputs     differ between variants: {mismatch} (a request that fits one gets a "
            "400 from devices that run another)"
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


def add_parser(top: Any) -> None:
    from agent.bundle.manifest import DEFAULT_BLOCK_SIZE

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
        "--block-size",
        type=int,
        default=DEFAULT_BLOCK_SIZE,
        help=f"transfer block size in bytes (default {DEFAULT_BLOCK_SIZE}); from "
        f"{COMMON_PACKET_LIMIT} up, blocks do not pass brokers that allow {COMMON_PACKET_LIMIT} "
        "bytes per packet (the build warns)",
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
    b.add_argument("--days", type=days, default=90, help="days until the signature expires")
    b.add_argument("-o", "--output", type=Path, help="envelope path (default BUNDLE.dsse)")
    b.set_defaults(handler=_bundle_sign)
    b = bundle.add_parser(
        "reissue",
        help="sign an earlier bundle's descriptor afresh under a higher release (a rollback)",
        description="Sign BUNDLE's descriptor again under release N, above every release the "
        "devices have run: devices go back to the bundle's bytes (blocks they kept are not "
        "fetched again) while their release floor only rises. Deploy it with "
        "'edge-fleet deploy BUNDLE --descriptor OUT'.",
    )
    b.add_argument("bundle", type=Path)
    b.add_argument(
        "--release", type=int, required=True, metavar="N", help="the new release counter"
    )
    b.add_argument(
        "--key", type=Path, action="append", required=True, help="release private key (repeatable)"
    )
    b.add_argument("--days", type=days, default=90, help="days until the signature expires")
    b.add_argument(
        "-o",
        "--output",
        type=Path,
        help="envelope path (default BUNDLE.rN.dsse; BUNDLE.dsse stays)",
    )
    b.set_defaults(handler=_bundle_reissue)
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
