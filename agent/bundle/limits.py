"""Caps on what a bundle may make the device read, hold or write (bytes and counts)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

GiB = 1 << 30
MiB = 1 << 20


class BundleLimits(BaseModel):
    """Hard caps, applied before anything is read into memory or written to disk.

    They bound endless-data attacks even when the signed sizes are large: whichever of the signed
    size and the cap is smaller wins.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_bundle_bytes: Annotated[int, Field(ge=1)] = 16 * GiB
    # ustar size fields hold at most 8 GiB - 1; base-256 sizes are refused.
    max_member_bytes: Annotated[int, Field(ge=1, lt=8 * GiB)] = 4 * GiB
    max_unpacked_bytes: Annotated[int, Field(ge=1)] = 16 * GiB
    max_members: Annotated[int, Field(ge=2)] = 4096
    max_manifest_bytes: Annotated[int, Field(ge=1024)] = 1 * MiB
    # pax headers only pad members to block boundaries: two blocks of the largest size suffice.
    max_pax_header_bytes: Annotated[int, Field(ge=512)] = 2 * MiB + 4096
