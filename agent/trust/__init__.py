"""Trust core: keys, DSSE envelopes, signed metadata and their verification (pure, no I/O)."""

from agent.trust.envelope import Envelope, parse_envelope, sign_envelope
from agent.trust.keys import Signer, keyid_for
from agent.trust.metadata import (
    DESCRIPTOR_TYPE,
    KEYRING_TYPE,
    ROOT_TYPE,
    BundleDescriptor,
    KeyringMetadata,
    PublicKey,
    ReleaseKey,
    RootMetadata,
)
from agent.trust.verifier import TrustedState, VerifiedDescriptor

__all__ = [
    "DESCRIPTOR_TYPE",
    "KEYRING_TYPE",
    "ROOT_TYPE",
    "BundleDescriptor",
    "Envelope",
    "KeyringMetadata",
    "PublicKey",
    "ReleaseKey",
    "RootMetadata",
    "Signer",
    "TrustedState",
    "VerifiedDescriptor",
    "keyid_for",
    "parse_envelope",
    "sign_envelope",
]
