"""Entry points: ``edge-agent`` (on the box) and ``edge-fleet`` (for fleet managers).

Thin: parse arguments, call the library, print. Only the project's own errors are caught; each
becomes one line a person can act on, and an exit status:

    0  done            1  content rejected (bad signature, tampered, unsafe, expired, ...)
    2  usage or config 3  storage or tool failure (disk, missing runtime)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import __version__
from agent._strictjson import loads
from agent._units import size_text as _size
from agent.errors import BadContentError, ConfigError, EdgeAgentError
from agent.transport.messages import COMMON_PACKET_LIMIT
from agent.transport.session import MqttSettings
from agent.transport.topics import DEFAULT_PREFIX, Topics

if TYPE_CHECKING:
    from agent.config import AgentConfig
    from agent.trust.keys import Signer

Handler = Callable[[argparse.Namespace], int]


def _now(value: str | None) -> datetime:
    if not value:
        return datetime.now(timezone.utc)
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"--at {value!r} is not an ISO 8601 time") from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def _days(value: str) -> int:
    """A ``--days`` value: a whole number from 1 up. What is signed for 0 days (or fewer) has
    expired when it is published, and every device refuses it."""
    try:
        days = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number of days") from None
    if days < 1:
        raise argparse.ArgumentTypeError(
            f"{days} days: must be at least 1 (what it signs would have expired when published)"
        )
    return days


def _run(prog: str, parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        code = handler(args)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # Read by `head` or `grep -q`, which stopped reading: not an error of ours. (Python's
        # advice: point stdout at devnull so that the flush at exit does not fail again.)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
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
    out, envelope = sign_bundle(
        args.bundle, signers, now=_now(None), days=args.days, out=args.output
    )
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
        now=_now(None),
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


# -- edge-fleet: broker connection, serve, deploy, status, trust publish ------------------------
def _mqtt_settings(args: argparse.Namespace) -> MqttSettings:
    from agent.fleet.control import check_settings

    host, _, port = args.broker.rpartition(":") if ":" in args.broker else (args.broker, "", "")
    try:
        settings = MqttSettings(
            host=host or "localhost",
            port=int(port) if port else (8883 if not args.no_tls else 1883),
            protocol=args.mqtt,
            tls=not args.no_tls,
            ca_file=args.ca,
            cert_file=args.cert,
            key_file=args.cert_key,
            client_id=args.client_id,
        )
    except ValueError as exc:
        raise ConfigError(f"broker settings: {exc}") from None
    check_settings(settings)
    return settings


def _add_broker_options(p: argparse.ArgumentParser) -> None:
    env = os.environ.get
    g = p.add_argument_group("broker (defaults from EDGE_FLEET_* environment variables)")
    g.add_argument(
        "--broker",
        default=env("EDGE_FLEET_BROKER", "localhost:8883"),
        metavar="HOST[:PORT]",
        help="MQTT broker (default $EDGE_FLEET_BROKER or localhost:8883)",
    )
    g.add_argument("--ca", type=Path, default=env("EDGE_FLEET_CA"), help="CA certificate")
    g.add_argument("--cert", type=Path, default=env("EDGE_FLEET_CERT"), help="client certificate")
    g.add_argument(
        "--cert-key", type=Path, default=env("EDGE_FLEET_CERT_KEY"), help="client certificate key"
    )
    g.add_argument("--mqtt", choices=["5", "3.1.1"], default=env("EDGE_FLEET_MQTT", "5"))
    g.add_argument(
        "--no-tls",
        action="store_true",
        default=env("EDGE_FLEET_TLS", "true").lower() in ("0", "false", "no", "off"),
        help="plain TCP, for a test broker on loopback (default: TLS unless $EDGE_FLEET_TLS=false)",
    )
    g.add_argument(
        "--prefix", default=env("EDGE_FLEET_PREFIX", DEFAULT_PREFIX), help="topic prefix"
    )
    g.add_argument("--client-id", help="MQTT client id (default edge-fleet-<command>-<pid>)")


def _client_id(args: argparse.Namespace, command: str) -> str:
    return args.client_id or f"edge-fleet-{command}-{os.getpid()}"


def _serve(args: argparse.Namespace) -> int:
    import logging
    import signal
    import threading

    from agent.fleet.server import BlockServer, check_packet_limit, serve

    settings = _mqtt_settings(args)
    check_packet_limit(args.max_packet_bytes)
    if not args.bundles.is_dir():
        raise ConfigError(f"--bundles {args.bundles} is not a directory")
    if args.report_interval < 0:
        raise ConfigError("--report-interval must be 0 (no reports) or more seconds")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
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
        client_id=_client_id(args, "serve"),
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


def _stage_bundles(
    bundles: Sequence[Path], descriptor_of: Callable[[Path], bytes], bundles_dir: Path
) -> dict[str, bytes]:
    """Each bundle's signed descriptor (``descriptor_of``), the bundle copied into the bundle
    server's directory: model -> descriptor envelope."""
    from agent._strictjson import parse_model
    from agent.fleet.control import stage_bundle
    from agent.trust.envelope import parse_envelope
    from agent.trust.metadata import MAX_METADATA_BYTES, BundleDescriptor

    descriptors: dict[str, bytes] = {}
    for bundle in bundles:
        data = descriptor_of(bundle)
        descriptor = parse_model(
            BundleDescriptor,
            parse_envelope(data).payload,
            what=f"the descriptor of {bundle}",
            max_bytes=MAX_METADATA_BYTES,
        )
        if descriptor.model in descriptors:
            raise ConfigError(f"two bundles of model {descriptor.model!r}")
        descriptors[descriptor.model] = data
        staged = stage_bundle(bundle, bundles_dir)
        print(f"{descriptor.model} {descriptor.version}: {staged} (served from {bundles_dir})")
    return descriptors


def _sha(descriptor_envelope: bytes) -> str:
    from agent.trust.envelope import parse_envelope
    from agent.trust.metadata import BundleDescriptor

    payload = parse_envelope(descriptor_envelope).payload
    return BundleDescriptor.model_validate_json(payload).bundle_sha256


def _variants(given: Sequence[str]) -> dict[str, str]:
    if any("=" not in v for v in given):
        raise ConfigError("--variant takes MODEL=VARIANT")
    return dict(v.split("=", 1) for v in given)


def _deploy(args: argparse.Namespace) -> int:
    from agent.fleet.control import fleet_session, publish_retained
    from agent.fleet.deploy import make_deployment
    from agent.fleet.keys import load_signer
    from agent.trust.envelope import parse_envelope
    from agent.trust.metadata import DeploymentTarget

    topics = Topics(args.prefix)
    now = _now(None)
    signers = [load_signer(k) for k in args.key]
    target = (
        DeploymentTarget(kind="device", id=args.device)
        if args.device
        else DeploymentTarget(kind="group", id=args.group)
    )
    topic = topics.device(args.device).desired if args.device else topics.group_desired(args.group)
    if args.follow_groups and (args.bundles_to_deploy or not args.device):
        raise ConfigError("--follow-groups hands a --device back to its groups: give no bundles")
    if not args.follow_groups and not args.bundles_to_deploy:
        raise ConfigError("name the bundles to deploy (or --follow-groups, with --device)")
    given = _given_descriptors(args.descriptor, args.bundles_to_deploy)
    descriptors = _stage_bundles(
        args.bundles_to_deploy,
        lambda b: given.get(b) or _deploy_descriptor(args, b, signers, now),
        args.bundles,
    )
    variants = _variants(args.variant)
    document = make_deployment(
        descriptors,
        target=target,
        signers=signers,
        now=now,
        days=args.days,
        sequence=args.sequence,
        deployment_id=args.id,
        variants=variants,
        follow_groups=args.follow_groups,
    )
    if args.output:
        args.output.write_bytes(document)
        print(f"wrote {args.output}")
        if args.no_publish:
            return 0
    settings = _mqtt_settings(args)
    dep_id = json.loads(parse_envelope(document).payload)["deployment_id"]
    with fleet_session(settings, _client_id(args, "deploy")) as (session, inbox):

        def publish() -> None:
            publish_retained(session, topic, document)
            print(f"published deployment {dep_id} to {topic}", flush=True)

        if not args.wait or args.follow_groups:
            publish()
            return 0
        return _wait_for(
            session,
            inbox,
            topics,
            publish,
            dep_id=dep_id,
            want={name: _sha(data) for name, data in descriptors.items()},
            timeout=args.wait,
            device=args.device,
            group=args.group,
        )


def _given_descriptors(paths: list[Path], bundles: list[Path]) -> dict[Path, bytes]:
    """``--descriptor`` envelopes by the BUNDLE each describes (the one with its manifest).

    A descriptor is matched to a bundle by the manifest digest it signs; the device checks the
    rest of the bytes against it.
    """
    from agent._strictjson import parse_model
    from agent.bundle.reader import read_index
    from agent.trust.envelope import parse_envelope
    from agent.trust.metadata import MAX_METADATA_BYTES, BundleDescriptor

    if not paths:
        return {}
    by_manifest: dict[str, Path] = {}
    for bundle in bundles:
        try:
            with open(bundle, "rb") as f:
                by_manifest[read_index(f).manifest_sha256] = bundle
        except OSError as exc:
            raise ConfigError(f"cannot read {bundle}: {exc.strerror}") from None
    given: dict[Path, bytes] = {}
    for path in paths:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read --descriptor {path}: {exc.strerror}") from None
        d = parse_model(
            BundleDescriptor,
            parse_envelope(data).payload,
            what=f"--descriptor {path}",
            max_bytes=MAX_METADATA_BYTES,
        )
        described = by_manifest.get(d.manifest_sha256)
        if described is None:
            raise ConfigError(
                f"--descriptor {path} describes {d.model} {d.version}, which is none of the "
                "bundles given: name its bundle too"
            )
        if described in given:
            raise ConfigError(f"two --descriptor envelopes for {described}")
        given[described] = data
    return given


def _deploy_descriptor(
    args: argparse.Namespace, bundle: Path, signers: list[Signer], now: datetime
) -> bytes:
    """BUNDLE.dsse as the fleet's trust accepts it now (signed again where its signatures no
    longer count): deploy publishes no descriptor that devices refuse for its signatures."""
    from agent.fleet.sign import signed_for

    data, note = signed_for(bundle, signers, _fleet_trust(args, now), now=now)
    if note is not None:
        print(f"edge-fleet: {note}", file=sys.stderr)
    return data


def _wait_for(
    session: Any,
    inbox: Any,
    topics: Topics,
    publish: Callable[[], None],
    *,
    dep_id: str,
    want: Mapping[str, str | None],
    timeout: float,
    device: str | None = None,
    group: str | None = None,
) -> int:
    """Publish, then follow a device (or every device of a group, as they report) until each
    is active on what was deployed, failed, or refused the document; progress on stderr.
    Subscribed and caught up with the retained state before the document goes out, so that
    a refusal that comes at once is seen as it comes.

    0: all active, 1: any failed or refused, 3: not all finished within ``timeout``.
    """
    import queue as _queue

    from agent.fleet.control import bar
    from agent.fleet.rollout import Follower, Knowledge, collect
    from agent.transport.session import Incoming

    knowledge = Knowledge(topics)
    if device:
        d = topics.device(device)
        filters = [d.reported, d.online, d.events]
    else:
        filters = knowledge.view.subscriptions
    for f in filters:
        session.subscribe(f)
    collect(inbox, knowledge, quiet=0.3)
    publish()
    follower = Follower(knowledge, dep_id, group=group)
    tty = sys.stderr.isatty()
    deadline = time.monotonic() + timeout
    last_line = ""
    while True:
        if device:
            follower.watching = {device}
        else:
            follower.watching = {
                dev
                for dev, view in knowledge.view.devices.items()
                if view.reported and group in view.reported.groups
            }
        outcomes = {dev: follower.outcome(dev, want) for dev in sorted(follower.watching)}
        if device and device in outcomes:
            r = (
                knowledge.view.devices[device].reported
                if device in knowledge.view.devices
                else None
            )
            parts = (
                [
                    f"{n} {m.phase.value} {bar(m.progress) if m.progress is not None else ''}".rstrip()
                    for n, m in sorted(r.models.items())
                ]
                if r is not None and r.deployment_id == dep_id
                else [outcomes[device].phase]
            )
            line = f"{device}: " + ", ".join(parts)
        else:
            counts: dict[str, int] = {}
            for o in outcomes.values():
                counts[o.phase] = counts.get(o.phase, 0) + 1
            line = f"group {group}: " + (
                ", ".join(f"{n} {p}" for p, n in sorted(counts.items())) or "no device reported"
            )
        if line != last_line:
            print(
                ("\r" + line.ljust(len(last_line))) if tty else line,
                end="" if tty else "\n",
                file=sys.stderr,
                flush=True,
            )
            last_line = line
        if outcomes and all(o.final for o in outcomes.values()):
            if tty:
                print(file=sys.stderr)
            bad = {dev: o for dev, o in outcomes.items() if not o.ok}
            for dev, o in bad.items():
                if o.model:
                    print(f"{dev}: {o.model}: {o.code}: {o.message}", file=sys.stderr)
                else:
                    print(f"{dev} refused the deployment ({o.code}): {o.message}", file=sys.stderr)
            return 1 if bad else 0
        if time.monotonic() >= deadline:
            waiting = [dev for dev, o in outcomes.items() if not o.final]
            shown = ", ".join(waiting[:10]) + (" ..." if len(waiting) > 10 else "")
            print(f"\nnot finished within {timeout:.0f} s: {shown or 'no device'}", file=sys.stderr)
            return 3
        end = time.monotonic() + 0.2
        while (left := end - time.monotonic()) > 0:
            try:
                item = inbox.get(timeout=left)
            except _queue.Empty:
                break
            if isinstance(item, Incoming):
                follower.update(item)


def _status(args: argparse.Namespace) -> int:
    import queue as _queue

    from agent.fleet.control import FleetView, collect, fleet_session, render_table
    from agent.transport.session import Incoming

    settings = _mqtt_settings(args)
    view = FleetView(Topics(args.prefix))
    with fleet_session(settings, _client_id(args, "status"), subscriptions=view.subscriptions) as (
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


def _trust_publish(args: argparse.Namespace) -> int:
    from agent.fleet.control import fleet_session, publish_retained
    from agent.fleet.keys import KeyStore
    from agent.transport.messages import TrustUpdate

    store = KeyStore(args.dir)
    history = sorted(
        (store.root / "history").glob("root.v*.json"), key=lambda p: int(p.stem.split(".v")[1])
    )
    roots = [loads(p.read_bytes(), what=str(p), max_bytes=1 << 20) for p in history[1:]]
    update = TrustUpdate(
        roots=roots, keyring=loads(store.keyring_bytes(), what="keyring", max_bytes=1 << 20)
    )
    topics = Topics(args.prefix)
    keyring = store.current_keyring()
    what = f"root chain v1..v{store.current_root().version} and keyring v{keyring.version}"
    if args.output:
        args.output.write_bytes(update.to_bytes())
        print(f"wrote {what} to {args.output}")
        if args.no_publish:
            return 0
    with fleet_session(_mqtt_settings(args), _client_id(args, "trust")) as (session, _inbox):
        publish_retained(session, topics.trust, update.to_bytes())
    print(f"published {what} to {topics.trust}")
    return 0


# -- edge-fleet rollout -------------------------------------------------------------------------
def _fleet_trust(args: argparse.Namespace, now: datetime) -> Any:
    """The fleet's trust (root and keyring): --trust, else the key directory --key is in."""
    from agent.fleet.keys import key_directory
    from agent.verify import load_trust

    trust = args.trust or next(filter(None, map(key_directory, args.key)), None)
    if trust is None:
        raise ConfigError(
            f"{args.key[0]} is not in a key directory (DIR/private/), so the bundles' signatures "
            "cannot be checked against the fleet's keyring: give --trust (the key directory, "
            "root.json or keyring.json)"
        )
    return load_trust(trust, now)


def _progress(line: str) -> None:
    stamp = datetime.now(timezone.utc).strftime("%H:%M:%S")
    print(f"{stamp} {line}", file=sys.stderr, flush=True)


def _drive(controller: Any, args: argparse.Namespace) -> int:
    import signal
    import threading

    from agent.fleet.rollout import exit_code, render, summary

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    state = controller.run(stop.is_set)
    info = summary(controller.plan, state, controller.k)
    print(json.dumps(info) if args.json else render(info))
    if stop.is_set() and state.status not in ("done", "halted", "aborted", "rolled-back"):
        print(
            f"stopped driving {state.rollout_id}; 'edge-fleet rollout resume "
            f"{state.rollout_id}' carries it on",
            file=sys.stderr,
        )
    return exit_code(state)


def _rollout_session(args: argparse.Namespace, command: str, trust: Any = None) -> Any:
    from agent.fleet.control import fleet_session
    from agent.fleet.rollout import Knowledge

    topics = Topics(args.prefix)
    knowledge = Knowledge(topics, trust)
    cm = fleet_session(
        _mqtt_settings(args),
        _client_id(args, f"rollout-{command}"),
        subscriptions=knowledge.subscriptions,
    )
    return cm, knowledge


def _rollout_start(args: argparse.Namespace) -> int:
    from agent.fleet.keys import load_signer
    from agent.fleet.rollout import (
        Controller,
        Target,
        begin,
        collect,
        parse_duration,
        parse_failures,
        plan_rollout,
    )
    from agent.transport.messages import Gate

    now = _now(None)
    signers = [load_signer(k) for k in args.key]
    trust = _fleet_trust(args, now)
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
    descriptors = _stage_bundles(
        args.bundles_to_deploy, lambda b: _deploy_descriptor(args, b, signers, now), args.bundles
    )
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
            variants=_variants(args.variant),
            created_by=_client_id(args, "rollout"),
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
    from agent.fleet.keys import load_signer
    from agent.fleet.rollout import (
        Controller,
        collect,
        lease_free,
        load,
        request,
        take_over,
        wait_applied,
    )

    now = _now(None)
    signers = [load_signer(k) for k in args.key]
    trust = _fleet_trust(args, now)
    cm, knowledge = _rollout_session(args, "resume", trust)
    with cm as (session, inbox):
        collect(inbox, knowledge)
        _, state = load(knowledge, args.rollout)
        if not lease_free(state, now) and state.status in ("paused", "halted"):
            # A live controller holds it (paused, it waits): ask it, and see it taken.
            control = request(
                session, knowledge.topics, args.rollout, "resume", _client_id(args, "rollout")
            )
            if wait_applied(knowledge, inbox, args.rollout, control):
                print(f"rollout {args.rollout}: resumed by {state.owner}")
                return 0
        plan, state = take_over(knowledge, inbox, args.rollout, progress=_progress)
        if state.status in ("done", "aborted", "rolled-back"):
            print(f"rollout {args.rollout} is {state.status}: nothing to resume", file=sys.stderr)
            return 0 if state.status != "aborted" else 5
        controller = Controller(session, inbox, knowledge, plan, state, signers, progress=_progress)
        if state.status in ("paused", "halted"):
            control = request(
                session, knowledge.topics, args.rollout, "resume", _client_id(args, "rollout")
            )
            controller.advance_if_halted(control.at)
        return _drive(controller, args)


def _rollout_rollback(args: argparse.Namespace) -> int:
    from agent.fleet.keys import load_signer
    from agent.fleet.rollout import Controller, collect, lease_free, load, request, take_over

    now = _now(None)
    signers = [load_signer(k) for k in args.key]
    trust = _fleet_trust(args, now)
    cm, knowledge = _rollout_session(args, "rollback", trust)
    with cm as (session, inbox):
        collect(inbox, knowledge)
        _, state = load(knowledge, args.rollout)
        if not lease_free(state, now):  # its controller stops at the next tick, then hands over
            request(session, knowledge.topics, args.rollout, "abort", _client_id(args, "rollout"))
        plan, state = take_over(knowledge, inbox, args.rollout, progress=_progress)
        controller = Controller(session, inbox, knowledge, plan, state, signers, progress=_progress)
        controller.start_rollback(trust, days=args.days)
        return _drive(controller, args)


def _rollout_control(args: argparse.Namespace) -> int:
    """pause, abort: a request the driving controller takes at its next tick; with none
    driving, the state is changed here."""
    from agent.fleet.control import publish_retained
    from agent.fleet.rollout import collect, lease_free, load, request, wait_applied

    action = args.action
    cm, knowledge = _rollout_session(args, action)
    with cm as (session, inbox):
        collect(inbox, knowledge)
        _, state = load(knowledge, args.rollout)
        if state.status in ("done", "aborted", "rolled-back"):
            raise ConfigError(f"rollout {args.rollout} is {state.status}")
        control = request(
            session, knowledge.topics, args.rollout, action, _client_id(args, "rollout")
        )
        if lease_free(state, control.at):
            status = "aborted" if action == "abort" else "paused"
            if action == "pause" and state.status != "running":
                status = state.status
            new = state.model_copy(
                update={"status": status, "control_at": control.at, "updated": control.at}
            )
            if action == "abort":
                new = new.model_copy(update={"reason": f"aborted by {control.by}"})
            publish_retained(
                session, knowledge.topics.rollout(args.rollout, "state"), new.to_bytes()
            )
            print(f"rollout {args.rollout}: {status} (no controller was driving it)")
        elif wait_applied(knowledge, inbox, args.rollout, control):
            print(f"rollout {args.rollout}: {action} taken by {state.owner}")
        else:
            print(f"rollout {args.rollout}: asked {state.owner} to {action}; no answer yet")
    return 0


def _rollout_status(args: argparse.Namespace) -> int:
    import queue as _queue

    from agent.fleet.rollout import collect, exit_code, load, render, summary
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
            if not args.watch or state.status in ("done", "halted", "aborted", "rolled-back"):
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


def _rollout_parser(top: Any) -> None:
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
        p.add_argument("--days", type=_days, default=30, help="days until the documents expire")

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
    r.add_argument(
        "--bundles",
        type=Path,
        default=Path(os.environ.get("EDGE_FLEET_BUNDLES", "bundles")),
        metavar="DIR",
        help="the bundle server's directory (default $EDGE_FLEET_BUNDLES or ./bundles)",
    )
    r.add_argument("--dry-run", action="store_true", help="print the plan; publish nothing")
    r.add_argument("--json", action="store_true", help="the final summary as JSON")
    signed(r)
    _add_broker_options(r)
    r.set_defaults(handler=_rollout_start)

    for name, handler, text in (
        ("resume", _rollout_resume, "carry a rollout on (after a pause, a halt or a crash)"),
        ("rollback", _rollout_rollback, "return every device it reached to what it ran before"),
    ):
        r = ro.add_parser(name, help=text)
        r.add_argument("rollout", metavar="ID")
        r.add_argument("--json", action="store_true", help="the final summary as JSON")
        signed(r)
        _add_broker_options(r)
        r.set_defaults(handler=handler)
    for action, text in (("pause", "start no further wave"), ("abort", "stop the rollout")):
        r = ro.add_parser(action, help=text)
        r.add_argument("rollout", metavar="ID")
        _add_broker_options(r)
        r.set_defaults(handler=_rollout_control, action=action)
    r = ro.add_parser("status", help="waves, phases and failures (no ID: every rollout)")
    r.add_argument("rollout", nargs="?", metavar="ID")
    r.add_argument("--watch", action="store_true", help="follow until it ends (Ctrl-C stops)")
    r.add_argument("--watch-for", type=float, metavar="SECONDS", help=argparse.SUPPRESS)
    r.add_argument("--json", action="store_true")
    _add_broker_options(r)
    r.set_defaults(handler=_rollout_status)


# -- edge-fleet simulate ------------------------------------------------------------------------
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
    import signal
    import tempfile
    import threading

    from agent.fleet.simulator import SimStats, Simulator, make_settings, version_metrics
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
    mqtt = _mqtt_settings(args)
    trust = load_trust(args.trust, _now(None))
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
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


def fleet_parser() -> argparse.ArgumentParser:
    from agent.bundle.manifest import DEFAULT_BLOCK_SIZE
    from agent.fleet.server import REPORT_INTERVAL_S

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
    k.add_argument("--root-days", type=_days, default=730)
    k.add_argument("--keyring-days", type=_days, default=365)
    k.add_argument("--release-days", type=_days, default=365)
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
    b.add_argument("--days", type=_days, default=90, help="days until the signature expires")
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
    b.add_argument("--days", type=_days, default=90, help="days until the signature expires")
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
    _add_broker_options(s)
    s.set_defaults(handler=_serve)

    d = top.add_parser("deploy", help="sign and publish a deployment to a device or a group")
    d.add_argument("bundles_to_deploy", nargs="*", type=Path, metavar="BUNDLE")
    where = d.add_mutually_exclusive_group(required=True)
    where.add_argument("--device", metavar="ID")
    where.add_argument("--group", metavar="G")
    d.add_argument(
        "--key", type=Path, action="append", required=True, help="release private key (repeatable)"
    )
    d.add_argument(
        "--bundles",
        type=Path,
        default=Path(os.environ.get("EDGE_FLEET_BUNDLES", "bundles")),
        metavar="DIR",
        help="the bundle server's directory (default $EDGE_FLEET_BUNDLES or ./bundles)",
    )
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
    d.add_argument("--days", type=_days, default=30, help="days until the deployment expires")
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
    _add_broker_options(d)
    d.set_defaults(handler=_deploy)

    st = top.add_parser("status", help="devices' reported state, from the retained topics")
    st.add_argument("--watch", action="store_true", help="keep following changes (Ctrl-C stops)")
    st.add_argument("--watch-for", type=float, metavar="SECONDS", help=argparse.SUPPRESS)
    st.add_argument("--json", action="store_true")
    _add_broker_options(st)
    st.set_defaults(handler=_status)

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
    _add_broker_options(sim)
    sim.set_defaults(handler=_simulate)

    t = keys.add_parser("publish", help="publish the root chain and keyring on the trust topic")
    t.add_argument("dir", type=Path)
    t.add_argument("-o", "--output", type=Path, help="also write the trust message here")
    t.add_argument("--no-publish", action="store_true", help="with -o: write only")
    _add_broker_options(t)
    t.set_defaults(handler=_trust_publish)
    _rollout_parser(top)
    return p


# Drain and close within this after SIGTERM: under the unit's TimeoutStopSec (30 s).
STOP_LIMIT_S = 25.0


def _agent_run(args: argparse.Namespace) -> int:
    import signal
    import threading

    from agent.config import load_config
    from agent.daemon import DeviceAgent
    from agent.logs import setup_logging
    from agent.notify import StopDeadline

    setup_logging(args.verbose)
    config = load_config(args.config)
    stop = threading.Event()
    agent = DeviceAgent(config, reload_config=lambda: load_config(args.config))
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: agent.request_reload())
    deadline = StopDeadline(stop, STOP_LIMIT_S)
    try:
        agent.run(stop)
    finally:
        deadline.done()
    return 0


def _agent_serve(args: argparse.Namespace) -> int:
    import logging
    import signal
    import threading

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
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
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


def _check_state_dir(state_dir: Path) -> str | None:
    """None when the agent can use (or create) ``state_dir``; else why not."""
    if state_dir.exists():
        if not state_dir.is_dir():
            return f"state_dir: {state_dir} is not a directory"
        if not os.access(state_dir, os.W_OK | os.X_OK):
            return f"state_dir: {state_dir} is not writable"
        return None
    parent = state_dir.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"state_dir: cannot create {state_dir}: {parent} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"state_dir: cannot create {state_dir}: {parent} is not writable"
    return None


def _check_trust(config: AgentConfig, warnings: list[str]) -> list[str]:
    """Problems with the trust files; ``warnings`` gets what does not stop the agent but
    stops it deploying (no keyring yet)."""
    from agent.trust.verifier import TrustedState

    problems = []
    now = _now(None)
    try:
        state = TrustedState.from_root(config.trust.root.read_bytes())
        state.check_root_fresh(now)
    except OSError as exc:
        return [f"trust.root: cannot read {config.trust.root}: {exc.strerror}"]
    except BadContentError as exc:
        return [f"trust.root: {config.trust.root} is not a usable root ({exc.code}): {exc}"]
    keyring = None
    if config.trust.keyring is not None:
        try:
            keyring = state.update_keyring(config.trust.keyring.read_bytes(), now).keyring
        except OSError as exc:
            problems.append(f"trust.keyring: cannot read {config.trust.keyring}: {exc.strerror}")
        except BadContentError as exc:
            problems.append(
                f"trust.keyring: {config.trust.keyring} does not verify against "
                f"{config.trust.root} ({exc.code}): {exc}"
            )
    if keyring is None and not problems:
        # One received since (the trust topic), kept in the state directory?
        stored = config.state_dir / "trust" / "keyring.json"
        try:
            keyring = state.update_keyring(stored.read_bytes(), now).keyring
        except (OSError, BadContentError):
            keyring = None
    if keyring is None and not problems:
        warnings.append(
            "trust: no keyring yet, so this box cannot verify any deployment: it takes one "
            "from the fleet's trust topic ('edge-fleet keys publish'), or set [trust] keyring"
        )
    return problems


def _check_tls(settings: MqttSettings) -> list[str]:
    from agent.transport.session import tls_context

    if not settings.tls:
        return []
    missing = [
        f"mqtt.{name}: {path} does not exist"
        for name, path in (
            ("ca_file", settings.ca_file),
            ("cert_file", settings.cert_file),
            ("key_file", settings.key_file),
        )
        if path is not None and not path.is_file()
    ]
    if missing:
        return missing
    try:
        tls_context(settings)
    except ConfigError as exc:
        return [f"mqtt: {exc}"]
    return []


def _config_summary(config: AgentConfig, overrides: list[str]) -> dict[str, Any]:
    api = config.api
    listeners = []
    if api.port is not None:
        listeners.append(f"http://{api.host}:{api.port}")
    if api.unix_socket is not None:
        listeners.append(f"unix:{api.unix_socket}")
    return {
        "device_id": config.device_id,
        "groups": list(config.groups),
        "broker": f"{config.mqtt.host}:{config.mqtt.port}",
        "protocol": config.mqtt.protocol,
        "tls": config.mqtt.tls,
        "state_dir": str(config.state_dir),
        "api": listeners,
        "overrides": overrides,
    }


# What the shipped agent.toml says until a technician sets it.
PLACEHOLDER_DEVICE_ID = "CHANGE-ME"


def _agent_check_config(args: argparse.Namespace) -> int:
    from agent.config import env_overrides, load_config
    from agent.errors import ConfigProblems

    problems: list[str] = []
    warnings: list[str] = []
    load_problems: tuple[str, ...] = ()
    summary: dict[str, Any] | None = None
    try:
        config = load_config(args.file)
    except ConfigProblems as exc:
        problems = exc.problems
        load_problems = tuple(problems)
    else:
        overrides = [o.variable for o in env_overrides(os.environ)]
        summary = _config_summary(config, overrides)
        if config.device_id == PLACEHOLDER_DEVICE_ID:
            problems.append(
                f"device_id: still {PLACEHOLDER_DEVICE_ID!r}; set this box's id "
                "(the name its certificate carries)"
            )
        problems += _check_trust(config, warnings)
        problems += _check_tls(config.mqtt)
        state_problem = _check_state_dir(config.state_dir)
        if state_problem:
            problems.append(state_problem)
    if args.json:
        doc = {
            "file": str(args.file),
            "ok": not problems,
            "problems": problems,
            "warnings": warnings,
            "config": summary,
        }
        print(json.dumps(doc, indent=2))
    if problems:
        for line in problems:
            # load_config's problems name their file or variable; the checks here, the file.
            where = "" if line.startswith(load_problems) else f"{args.file}: "
            print(f"edge-agent: error: {where}{line}", file=sys.stderr)
        return 2
    if not args.json:
        for line in warnings:
            print(f"edge-agent: warning: {args.file}: {line}", file=sys.stderr)
    if not args.json and summary is not None:
        s = summary
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
        if s["overrides"]:
            print(f"  overrides  {', '.join(s['overrides'])}")
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


def agent_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-agent", description="Edge Model Agent on the box.")
    p.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    top = p.add_subparsers(title="commands")
    r = top.add_parser("run", help="run the agent in the foreground")
    r.add_argument("--config", type=Path, default=Path("/etc/edge-agent/agent.toml"))
    r.add_argument("-v", "--verbose", action="store_true")
    r.set_defaults(handler=_agent_run)
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
    c = top.add_parser(
        "check-config",
        help="check agent.toml and EDGE_AGENT_* overrides, trust root, TLS files, state dir",
    )
    c.add_argument("file", type=Path, metavar="FILE", help="agent.toml")
    c.add_argument("--json", action="store_true")
    c.set_defaults(handler=_agent_check_config)
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
    return p


def fleet_main(argv: Sequence[str] | None = None) -> int:
    return _run("edge-fleet", fleet_parser(), argv)


def agent_main(argv: Sequence[str] | None = None) -> int:
    return _run("edge-agent", agent_parser(), argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(fleet_main())
