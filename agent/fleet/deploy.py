"""Deployment documents: what a device or a group should run, signed by release keys; and
what goes into one: which descriptor each bundle is deployed with (the one given, else its
own, signed again where the fleet's keys rotated away from it), staged for the bundle server.
"""

from __future__ import annotations

import filecmp
import shutil
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path

from agent._strictjson import loads, parse_model
from agent.bundle.reader import read_index
from agent.errors import ConfigError, StorageError
from agent.fleet.sign import signed_for
from agent.trust.envelope import parse_envelope, sign_envelope
from agent.trust.keys import Signer
from agent.trust.metadata import (
    DEPLOYMENT_TYPE,
    MAX_METADATA_BYTES,
    BundleDescriptor,
    DeploymentDocument,
    DeploymentTarget,
    ModelDeployment,
)
from agent.trust.verifier import TrustedState


def default_sequence(now: datetime) -> int:
    """Milliseconds since the epoch: grows from one deploy to the next without shared state."""
    return int(now.timestamp() * 1000)


def make_deployment(
    descriptors: Mapping[str, bytes],
    *,
    target: DeploymentTarget,
    signers: Sequence[Signer],
    now: datetime,
    days: int = 30,
    sequence: int | None = None,
    deployment_id: str | None = None,
    variants: Mapping[str, str] | None = None,
    follow_groups: bool = False,
) -> bytes:
    """Sign a deployment of ``descriptors`` (model name -> descriptor envelope bytes).

    ``follow_groups``: a device's document that hands the device back to its groups (no
    descriptors): it follows their documents again, and its own older ones stay refused.
    """
    if not signers:
        raise ConfigError("give at least one release key")
    sequence = sequence or default_sequence(now)
    variants = variants or {}
    models = {
        name: ModelDeployment(
            descriptor=loads(envelope, what=f"descriptor of {name}", max_bytes=MAX_METADATA_BYTES),
            variant=variants.get(name),
        )
        for name, envelope in descriptors.items()
    }
    try:
        document = DeploymentDocument(
            deployment_id=deployment_id or f"dep-{sequence}",
            target=target,
            sequence=sequence,
            issued=now.replace(microsecond=0),
            expires=(now + timedelta(days=days)).replace(microsecond=0),
            models=models,
            follow_groups=follow_groups,
        )
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise ConfigError(f"the deployment would be invalid: {exc}") from None
    return sign_envelope(DEPLOYMENT_TYPE, document.to_payload(), signers).to_bytes()


def deployment_target(device: str | None, group: str | None) -> DeploymentTarget:
    """The target of a deployment to ``device``, else to ``group``."""
    if device:
        return DeploymentTarget(kind="device", id=device)
    return DeploymentTarget(kind="group", id=group or "")


def check_bundles(bundles: Sequence[Path], *, device: str | None, follow_groups: bool) -> None:
    """A deployment names bundles, or (a device's only) hands the device back to its groups."""
    if follow_groups and (bundles or not device):
        raise ConfigError("--follow-groups hands a --device back to its groups: give no bundles")
    if not follow_groups and not bundles:
        raise ConfigError("name the bundles to deploy (or --follow-groups, with --device)")


def parse_variants(given: Sequence[str]) -> dict[str, str]:
    """``MODEL=VARIANT`` pins: model -> variant."""
    if any("=" not in v for v in given):
        raise ConfigError("--variant takes MODEL=VARIANT")
    return dict(v.split("=", 1) for v in given)


def _descriptor(data: bytes, what: str) -> BundleDescriptor:
    return parse_model(
        BundleDescriptor, parse_envelope(data).payload, what=what, max_bytes=MAX_METADATA_BYTES
    )


def bundle_sha256(descriptor_envelope: bytes) -> str:
    """The digest of the bundle a descriptor envelope describes."""
    payload = parse_envelope(descriptor_envelope).payload
    return BundleDescriptor.model_validate_json(payload).bundle_sha256


def given_descriptors(paths: Sequence[Path], bundles: Sequence[Path]) -> dict[Path, bytes]:
    """``--descriptor`` envelopes by the BUNDLE each describes (the one with its manifest).

    A descriptor is matched to a bundle by the manifest digest it signs; the device checks the
    rest of the bytes against it.
    """
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
        d = _descriptor(data, f"--descriptor {path}")
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


def stage_descriptors(
    bundles: Sequence[Path],
    bundles_dir: Path,
    *,
    signers: Sequence[Signer],
    trust: Callable[[], TrustedState],
    now: datetime,
    given: Mapping[Path, bytes] | None = None,
    on_signed_again: Callable[[str], None] | None = None,
    on_staged: Callable[[BundleDescriptor, Path], None] | None = None,
) -> dict[str, bytes]:
    """Each bundle's signed descriptor, the bundle copied into the bundle server's directory:
    model -> descriptor envelope.

    A bundle's descriptor is the one ``given`` for it (:func:`given_descriptors`), else
    BUNDLE.dsse as the fleet's ``trust`` accepts it now, signed again by ``signers`` where its
    signatures no longer count (``on_signed_again`` hears why): a deployment carries no
    descriptor that devices refuse for its signatures. ``trust`` is called only for those.
    """
    given = given or {}
    descriptors: dict[str, bytes] = {}
    for bundle in bundles:
        data = given.get(bundle)
        if not data:
            data, note = signed_for(bundle, signers, trust(), now=now)
            if note is not None and on_signed_again is not None:
                on_signed_again(note)
        descriptor = _descriptor(data, f"the descriptor of {bundle}")
        if descriptor.model in descriptors:
            raise ConfigError(f"two bundles of model {descriptor.model!r}")
        descriptors[descriptor.model] = data
        staged = stage_bundle(bundle, bundles_dir)
        if on_staged is not None:
            on_staged(descriptor, staged)
    return descriptors


def stage_bundle(bundle: Path, bundles_dir: Path) -> Path:
    """Copy ``bundle`` (and its ``.dsse``) into the server's directory unless it is there."""
    bundles_dir.mkdir(parents=True, exist_ok=True)
    target = bundles_dir / bundle.name
    try:
        if target.resolve() == bundle.resolve():
            return target
        if target.exists() and filecmp.cmp(target, bundle, shallow=False):
            return target
        tmp = bundles_dir / f".{bundle.name}.tmp"
        shutil.copyfile(bundle, tmp)
        tmp.replace(target)
        dsse = bundle.with_name(bundle.name + ".dsse")
        if dsse.exists():
            shutil.copyfile(dsse, target.with_name(target.name + ".dsse"))
    except OSError as exc:
        raise StorageError(f"cannot copy {bundle} into {bundles_dir}: {exc.strerror}") from None
    return target
