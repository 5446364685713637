"""Bundle format: manifest, aligned ustar archive, strict reading, safe unpack, verification."""

from agent.bundle.blocks import FileDigests, digest_file
from agent.bundle.limits import BundleLimits
from agent.bundle.manifest import DEFAULT_BLOCK_SIZE, MANIFEST_NAME, Manifest, Variant
from agent.bundle.reader import BundleIndex, read_index
from agent.bundle.unpack import unpack_bundle
from agent.bundle.verify import Vouched, check_bundle, check_bundle_file

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "MANIFEST_NAME",
    "BundleIndex",
    "BundleLimits",
    "FileDigests",
    "Manifest",
    "Variant",
    "Vouched",
    "check_bundle",
    "check_bundle_file",
    "digest_file",
    "read_index",
    "unpack_bundle",
]
