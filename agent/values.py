"""Shared value types: the one module every layer may import.

Hashes, names, versions, block sizes and ids as pydantic annotated types, the strict base model
of signed and wire documents, and the wire phase of a model's deployment. Nothing here imports
anything else of the agent but :mod:`agent.errors`' neighbours in this base layer.
"""

from __future__ import annotations

import re
from enum import Enum
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

__all__ = [
    "ID_PATTERN",
    "BlockSize",
    "Hex64",
    "ModelName",
    "ModelPattern",
    "Phase",
    "SemVer",
    "StrictModel",
    "TargetId",
]

_SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)

Hex64 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
ModelName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")]
ModelPattern = Annotated[str, Field(pattern=r"^[a-z0-9._*?\[\]-]{1,64}$")]


def _check_semver(value: str) -> str:
    if len(value) > 64 or not _SEMVER.fullmatch(value):
        raise ValueError(f"{value!r} is not a semantic version (MAJOR.MINOR.PATCH)")
    return value


SemVer = Annotated[str, AfterValidator(_check_semver)]


def _check_block_size(value: int) -> int:
    if value & (value - 1):
        raise ValueError("block size must be a power of two")
    return value


BlockSize = Annotated[int, Field(ge=4096, le=1 << 20), AfterValidator(_check_block_size)]

# A device, group or deployment id: one MQTT topic level, so no '/', '+' or '#'.
ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
TargetId = Annotated[str, Field(pattern=f"^{ID_PATTERN}$")]


class StrictModel(BaseModel):
    """Signed and wire documents: no unknown fields, no coercion, immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Phase(str, Enum):
    """Where a model's deployment stands. ``active``, ``failed`` and ``rolled-back`` are final."""

    PENDING = "pending"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    UNPACKING = "unpacking"
    LOADING = "loading"
    WARMING = "warming"
    SELF_TESTING = "self-testing"
    PROBATION = "probation"
    ACTIVE = "active"
    FAILED = "failed"
    ROLLED_BACK = "rolled-back"
