"""Signed metadata: root, keyring and bundle descriptor (pydantic models, strict, no extras).

Roles, after TUF:

* **root** -- root keys with a threshold; signs itself and the keyring. A new root must be signed
  by the threshold of the old root *and* of the new one (TUF spec 5.3.4 and 5.3.5).
* **keyring** -- release keys, each with an expiry and the model names it may sign (glob
  patterns), and how many release signatures a descriptor needs. Versioned; signed by root.
* **bundle descriptor** -- what a release key vouches for: the bundle's SHA-256 and size, its
  block size and the hash of its block-hash list, the manifest's digest, the model name, version
  and release counter, and an expiry. The release counter belongs to the descriptor, not to the
  bytes (as TUF's and Uptane's counters belong to their metadata): a *re-issued* descriptor
  names an earlier bundle under a new, higher release, and ``bundle_release`` keeps the release
  its manifest was built with.
* **deployment** -- what a device or a group should run: for each model, the bundle's signed
  descriptor. Signed by release keys allowed to sign every model in it; bound to its target; a
  sequence number that only grows, so an older retained document cannot be replayed; an expiry.
"""

from __future__ import annotations

import fnmatch
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, Field, model_validator

from agent._strictjson import canonical
from agent.trust.keys import is_weak_public_key, keyid_for
from agent.values import (
    BlockSize,
    Hex64,
    ModelName,
    ModelPattern,
    SemVer,
    StrictModel,
    TargetId,
)

ROOT_TYPE = "application/vnd.ema.root+json"
KEYRING_TYPE = "application/vnd.ema.keyring+json"
DESCRIPTOR_TYPE = "application/vnd.ema.bundle-descriptor+json"
DEPLOYMENT_TYPE = "application/vnd.ema.deployment+json"

MAX_METADATA_BYTES = 1 << 20


class PublicKey(StrictModel):
    keytype: Literal["ed25519"] = "ed25519"
    public: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]

    @model_validator(mode="after")
    def _strong(self) -> PublicKey:
        if is_weak_public_key(self.raw):
            raise ValueError("not a usable Ed25519 public key (small order or non-canonical)")
        return self

    @property
    def raw(self) -> bytes:
        return bytes.fromhex(self.public)

    @property
    def keyid(self) -> str:
        return keyid_for(self.raw)


def _keys_match_ids(keys: dict[str, PublicKey]) -> None:
    for keyid, key in keys.items():
        if key.keyid != keyid:
            raise ValueError(f"key id {keyid[:16]} does not match its public key")


class RootMetadata(StrictModel):
    type: Literal["root"] = "root"
    spec_version: Literal[1] = 1
    version: Annotated[int, Field(ge=1)]
    expires: AwareDatetime
    keys: dict[Hex64, PublicKey] = Field(min_length=1, max_length=32)
    threshold: Annotated[int, Field(ge=1)]

    @model_validator(mode="after")
    def _consistent(self) -> RootMetadata:
        _keys_match_ids(self.keys)
        if self.threshold > len(self.keys):
            raise ValueError(f"threshold {self.threshold} exceeds the {len(self.keys)} root keys")
        return self

    def public_keys(self) -> dict[str, bytes]:
        return {k: v.raw for k, v in self.keys.items()}


class ReleaseKey(StrictModel):
    key: PublicKey
    expires: AwareDatetime
    models: list[ModelPattern] = Field(min_length=1, max_length=64)
    label: Annotated[str, Field(max_length=128)] = ""

    def may_sign(self, model: str) -> bool:
        return any(fnmatch.fnmatchcase(model, p) for p in self.models)

    def may_sign_any(self) -> bool:
        """Unscoped: it may sign every model name (``*``)."""
        return "*" in self.models


class KeyringMetadata(StrictModel):
    type: Literal["keyring"] = "keyring"
    spec_version: Literal[1] = 1
    version: Annotated[int, Field(ge=1)]
    expires: AwareDatetime
    release_keys: dict[Hex64, ReleaseKey] = Field(max_length=256)
    threshold: Annotated[int, Field(ge=1)] = 1

    @model_validator(mode="after")
    def _consistent(self) -> KeyringMetadata:
        _keys_match_ids({k: v.key for k, v in self.release_keys.items()})
        return self

    def usable_keys(self, now: datetime) -> dict[str, bytes]:
        return {k: v.key.raw for k, v in self.release_keys.items() if v.expires > now}


class BundleDescriptor(StrictModel):
    type: Literal["bundle-descriptor"] = "bundle-descriptor"
    spec_version: Literal[1] = 1
    model: ModelName
    version: SemVer
    release: Annotated[int, Field(ge=1, le=2**53)]
    bundle_sha256: Hex64
    bundle_size: Annotated[int, Field(ge=1024)]
    block_size: BlockSize
    block_list_sha256: Hex64
    manifest_sha256: Hex64
    created: AwareDatetime
    expires: AwareDatetime
    # Only on a re-issued descriptor (an earlier bundle, signed afresh under a higher release):
    # the release in the bundle's manifest. Written only when set, so that every other
    # descriptor's bytes are what they were and agents that predate the field read them.
    bundle_release: Annotated[int, Field(ge=1, le=2**53)] | None = None

    @model_validator(mode="after")
    def _reissued_higher(self) -> BundleDescriptor:
        if self.bundle_release is not None and self.bundle_release >= self.release:
            raise ValueError(
                f"bundle_release {self.bundle_release} must be below release {self.release}: "
                "a re-issued descriptor raises the release"
            )
        return self

    @property
    def block_count(self) -> int:
        return -(-self.bundle_size // self.block_size)

    @property
    def manifest_release(self) -> int:
        """The release the bundle's manifest says: ``bundle_release`` once re-issued."""
        return self.release if self.bundle_release is None else self.bundle_release

    def to_payload(self) -> bytes:
        """The canonical bytes to sign (``bundle_release`` only when set)."""
        return _payload(self, bundle_release=None)


class DeploymentTarget(StrictModel):
    kind: Literal["device", "group"]
    id: TargetId


class ModelDeployment(StrictModel):
    # The bundle descriptor's DSSE envelope, embedded as its JSON object; verified on its own.
    descriptor: dict[str, Any]
    variant: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,31}$")] | None = None


class DeploymentDocument(StrictModel):
    type: Literal["deployment"] = "deployment"
    spec_version: Literal[1] = 1
    deployment_id: TargetId
    target: DeploymentTarget
    sequence: Annotated[int, Field(ge=1, le=2**53)]
    issued: AwareDatetime
    expires: AwareDatetime
    # Empty: the device (or group) runs no model; each one it ran is removed.
    models: dict[ModelName, ModelDeployment] = Field(max_length=16)
    # On a device's own topic: the device follows its groups' documents again (models must be
    # empty). The document's sequence still counts, so older device documents stay refused.
    # Written only when true, so that agents that predate the field read every other document.
    follow_groups: bool = False

    @model_validator(mode="after")
    def _follow_groups(self) -> DeploymentDocument:
        if self.follow_groups and (self.target.kind != "device" or self.models):
            raise ValueError("follow_groups is for a device's own document, with no models")
        return self

    def to_payload(self) -> bytes:
        """The canonical bytes to sign (``follow_groups`` only when set)."""
        return _payload(self, follow_groups=False)


def _payload(model: BaseModel, **unset: object) -> bytes:
    """``model``'s canonical bytes without the fields that hold their ``unset`` value: fields
    added after the first agents shipped, left out when unused so those agents read the rest."""
    data = model.model_dump(mode="json")
    for name, value in unset.items():
        if data[name] == value:
            del data[name]
    return canonical(data)
