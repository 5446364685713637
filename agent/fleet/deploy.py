"""Deployment documents: what a device or a group should run, signed by release keys."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta

from agent._strictjson import loads
from agent.errors import ConfigError
from agent.trust.envelope import sign_envelope
from agent.trust.keys import Signer
from agent.trust.metadata import (
    DEPLOYMENT_TYPE,
    MAX_METADATA_BYTES,
    DeploymentDocument,
    DeploymentTarget,
    ModelDeployment,
)


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
