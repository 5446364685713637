"""The verification core: trusted state plus bytes plus a reference time in, a verdict out.

Like python-tuf's ``TrustedMetadataSet`` it never touches the network or the disk: callers load
bytes, pass the time, and persist the new state they get back. :class:`TrustedState` is
immutable; every update returns a new one or raises a
:class:`~agent.errors.BadContentError` subclass and leaves the old one as it was.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from types import MappingProxyType

from agent._strictjson import parse_model
from agent.errors import (
    ExpiredError,
    FormatError,
    KeyNotAllowedError,
    RollbackError,
    VerificationError,
    WrongTargetError,
)
from agent.trust.envelope import Envelope, count_signatures, parse_envelope, require_threshold
from agent.trust.metadata import (
    DEPLOYMENT_TYPE,
    DESCRIPTOR_TYPE,
    KEYRING_TYPE,
    MAX_METADATA_BYTES,
    ROOT_TYPE,
    BundleDescriptor,
    DeploymentDocument,
    DeploymentTarget,
    KeyringMetadata,
    RootMetadata,
)


def _aware(now: datetime) -> datetime:
    if now.tzinfo is None:
        raise ValueError("the reference time must be timezone-aware")
    return now


def _open(data: bytes, payload_type: str, what: str) -> Envelope:
    envelope = parse_envelope(data)
    if envelope.payload_type != payload_type:
        raise FormatError(
            f"{what}: payload type is {envelope.payload_type!r}, not {payload_type!r}"
        )
    return envelope


@dataclass(frozen=True)
class VerifiedDescriptor:
    """A descriptor whose signatures, expiry and release counter have been checked."""

    descriptor: BundleDescriptor
    signers: frozenset[str]
    envelope_sha256: str


@dataclass(frozen=True)
class SequencePoint:
    """The deployment last accepted from one topic: its sequence and envelope digest."""

    sequence: int
    envelope_sha256: str


@dataclass(frozen=True)
class VerifiedDeployment:
    document: DeploymentDocument
    signers: frozenset[str]
    envelope_sha256: str
    bundles: Mapping[str, VerifiedDescriptor]  # model name -> its verified descriptor

    @property
    def point(self) -> SequencePoint:
        return SequencePoint(self.document.sequence, self.envelope_sha256)


@dataclass(frozen=True)
class TrustedState:
    """What a device trusts: a root, a keyring, and the highest release seen per model."""

    root: RootMetadata
    root_bytes: bytes
    keyring: KeyringMetadata | None = None
    keyring_bytes: bytes | None = None
    # The version of the last keyring trusted. It outlives a keyring dropped by a root rotation,
    # so an older keyring (one that still trusted a since-revoked key) cannot come back.
    keyring_floor: int = 0
    release_floor: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))

    # -- bootstrap ------------------------------------------------------------------------------
    @classmethod
    def from_root(cls, data: bytes) -> TrustedState:
        """Load a root trusted out of band (shipped in the package, pinned by the operator).

        TUF 5.2: the trusted root is checked against its own keys; its expiry is checked when it
        is used, so that an expired root can still be updated.
        """
        envelope = _open(data, ROOT_TYPE, "root")
        # Verify, then parse: the keys come from the payload, so check the self-signature with
        # the parsed keys, but accept nothing from the payload before that check passes.
        root = parse_model(
            RootMetadata, envelope.payload, what="root", max_bytes=MAX_METADATA_BYTES
        )
        require_threshold(
            count_signatures(envelope, root.public_keys()), root.threshold, what="root"
        )
        return cls(root=root, root_bytes=data)

    # -- root rotation (TUF 5.3) ----------------------------------------------------------------
    def update_root(self, data: bytes) -> TrustedState:
        """Accept root version N+1, signed by the threshold of root N and of itself."""
        envelope = _open(data, ROOT_TYPE, "root")
        # 5.3.4: signed by the threshold of the trusted root's keys.
        require_threshold(
            count_signatures(envelope, self.root.public_keys()),
            self.root.threshold,
            what=f"root (checked with the keys of root v{self.root.version})",
        )
        new = parse_model(RootMetadata, envelope.payload, what="root", max_bytes=MAX_METADATA_BYTES)
        # 5.3.5: and by the threshold of its own keys.
        require_threshold(
            count_signatures(envelope, new.public_keys()),
            new.threshold,
            what=f"root v{new.version} (checked with its own keys)",
        )
        # 5.3.6: the version is exactly one more.
        if new.version <= self.root.version:
            raise RollbackError(
                f"root v{new.version} is not newer than trusted v{self.root.version}"
            )
        if new.version != self.root.version + 1:
            raise VerificationError(
                f"root v{new.version} skips versions; the next must be v{self.root.version + 1}"
            )
        state = replace(self, root=new, root_bytes=data)
        # Root keys changed: a keyring signed only by the old keys is trusted no longer.
        if self.keyring_bytes is not None:
            try:
                state._check_keyring_signatures(_open(self.keyring_bytes, KEYRING_TYPE, "keyring"))
            except VerificationError:
                state = replace(state, keyring=None, keyring_bytes=None)
        return state

    def check_root_fresh(self, now: datetime) -> None:
        # 5.3.10: freeze attack on root.
        if self.root.expires <= _aware(now):
            raise ExpiredError(
                f"root v{self.root.version} expired at {self.root.expires:%Y-%m-%d %H:%M}Z"
            )

    # -- keyring ----------------------------------------------------------------------------
    def _check_keyring_signatures(self, envelope: Envelope) -> None:
        require_threshold(
            count_signatures(envelope, self.root.public_keys()),
            self.root.threshold,
            what="keyring",
        )

    def update_keyring(self, data: bytes, now: datetime) -> TrustedState:
        """Accept a keyring signed by the root threshold, not older and not expired."""
        self.check_root_fresh(now)
        envelope = _open(data, KEYRING_TYPE, "keyring")
        self._check_keyring_signatures(envelope)
        keyring = parse_model(
            KeyringMetadata, envelope.payload, what="keyring", max_bytes=MAX_METADATA_BYTES
        )
        current = self.keyring
        if current is None and keyring.version <= self.keyring_floor:
            raise RollbackError(
                f"keyring v{keyring.version} is not newer than v{self.keyring_floor}, "
                "the last one trusted"
            )
        if current is not None:
            if keyring.version < current.version:
                raise RollbackError(
                    f"keyring v{keyring.version} is older than trusted v{current.version}"
                )
            if keyring.version == current.version and keyring != current:
                raise RollbackError(
                    f"keyring v{keyring.version} differs from the trusted keyring of the same version"
                )
        if keyring.expires <= now:
            raise ExpiredError(
                f"keyring v{keyring.version} expired at {keyring.expires:%Y-%m-%d %H:%M}Z"
            )
        return replace(self, keyring=keyring, keyring_bytes=data, keyring_floor=keyring.version)

    # -- documents signed by release keys ---------------------------------------------------
    def _release_signed(
        self, data: bytes, payload_type: str, now: datetime, what: str
    ) -> tuple[Envelope, frozenset[str], KeyringMetadata]:
        """Open an envelope and check its release-key signatures (threshold, key expiry)."""
        self.check_root_fresh(now)
        keyring = self.keyring
        if keyring is None:
            raise VerificationError("no trusted keyring: load one before verifying releases")
        if keyring.expires <= now:
            raise ExpiredError(
                f"keyring v{keyring.version} expired at {keyring.expires:%Y-%m-%d %H:%M}Z"
            )
        envelope = _open(data, payload_type, what)
        every_key = {k: v.key.raw for k, v in keyring.release_keys.items()}
        count = count_signatures(envelope, keyring.usable_keys(now))
        if len(count.valid) < keyring.threshold:
            # Would the expired keys have made up the difference? Then say so: freeze, not forgery.
            with_expired = count_signatures(envelope, every_key)
            if len(with_expired.valid) >= keyring.threshold:
                expired = sorted(with_expired.valid - count.valid)
                raise ExpiredError(f"release key {expired[0][:16]} has expired")
        require_threshold(count, keyring.threshold, what=what)
        return envelope, count.valid, keyring

    @staticmethod
    def _allowed(
        keyring: KeyringMetadata, signers: frozenset[str], models: list[str]
    ) -> frozenset[str]:
        """The signers that may sign every one of ``models``; KeyNotAllowedError if too few.

        A document that names no model (one that removes every model, or hands a device back
        to its groups) touches every model a device runs: only unscoped keys may sign it.
        """
        if models:
            allowed = frozenset(
                k for k in signers if all(keyring.release_keys[k].may_sign(m) for m in models)
            )
        else:
            allowed = frozenset(k for k in signers if keyring.release_keys[k].may_sign_any())
        if len(allowed) < keyring.threshold:
            ids = ", ".join(sorted(k[:16] for k in signers - allowed))
            if not models:
                raise KeyNotAllowedError(
                    f"key(s) {ids} may not sign a deployment that names no model (it affects "
                    "every model: only keys for '*' may)"
                )
            names = ", ".join(repr(m) for m in models)
            raise KeyNotAllowedError(f"key(s) {ids} may not sign model {names}")
        return allowed

    def verify_descriptor(self, data: bytes, now: datetime) -> VerifiedDescriptor:
        """Check a signed bundle descriptor against the keyring, the clock and the release floor."""
        descriptor, signers = self._descriptor_signed(data, now)
        if descriptor.expires <= now:
            raise ExpiredError(
                f"descriptor of {descriptor.model} {descriptor.version} expired at "
                f"{descriptor.expires:%Y-%m-%d %H:%M}Z"
            )
        # The floor compares the descriptor's release: a re-issued descriptor's, never the
        # release its bundle was built with (``bundle_release``).
        floor = self.release_floor.get(descriptor.model, 0)
        if descriptor.release < floor:
            raise RollbackError(
                f"{descriptor.model} release {descriptor.release} is older than the trusted "
                f"release {floor}"
            )
        return VerifiedDescriptor(
            descriptor=descriptor,
            signers=signers,
            envelope_sha256=hashlib.sha256(data).hexdigest(),
        )

    def descriptor_once_signed(self, data: bytes, now: datetime) -> BundleDescriptor:
        """A descriptor that release keys trusted *now* signed, whatever its own expiry and the
        release floor: for a fleet that re-issues it (``edge-fleet bundle reissue``).

        Its expiry protects devices from being held on old metadata (freeze); what a re-issue
        takes from it are the hashes that pin a bundle's bytes, which do not go stale, and the
        re-issued descriptor gets an expiry of its own. The keys are judged as a device judges
        them today: the root and keyring must be current, and a key since revoked, expired or
        not allowed the model counts for nothing, so a descriptor signed by a key a thief holds
        cannot be laundered into a fresh signature.
        """
        return self._descriptor_signed(data, now)[0]

    def _descriptor_signed(
        self, data: bytes, now: datetime
    ) -> tuple[BundleDescriptor, frozenset[str]]:
        envelope, signers, keyring = self._release_signed(
            data, DESCRIPTOR_TYPE, now, "bundle descriptor"
        )
        # Signatures hold: now parse.
        descriptor = parse_model(
            BundleDescriptor,
            envelope.payload,
            what="bundle descriptor",
            max_bytes=MAX_METADATA_BYTES,
        )
        return descriptor, self._allowed(keyring, signers, [descriptor.model])

    def verify_deployment(
        self,
        data: bytes,
        now: datetime,
        *,
        targets: Collection[DeploymentTarget],
        last: SequencePoint | None = None,
    ) -> VerifiedDeployment:
        """Check a deployment document and every bundle descriptor it carries.

        ``targets`` are the addresses this device answers to (itself and its groups); ``last`` is
        the sequence point of the document last accepted from the same topic. The same document
        again (a retained message redelivered) passes; another one must carry a higher sequence.
        """
        envelope, signers, keyring = self._release_signed(data, DEPLOYMENT_TYPE, now, "deployment")
        document = parse_model(
            DeploymentDocument, envelope.payload, what="deployment", max_bytes=MAX_METADATA_BYTES
        )
        allowed = self._allowed(keyring, signers, sorted(document.models))
        if document.target not in targets:
            raise WrongTargetError(
                f"deployment {document.deployment_id} is for {document.target.kind} "
                f"{document.target.id!r}"
            )
        if document.expires <= now:
            raise ExpiredError(
                f"deployment {document.deployment_id} expired at {document.expires:%Y-%m-%d %H:%M}Z"
            )
        digest = hashlib.sha256(data).hexdigest()
        if last is not None and (
            document.sequence < last.sequence
            or (document.sequence == last.sequence and digest != last.envelope_sha256)
        ):
            raise RollbackError(
                f"deployment {document.deployment_id} has sequence {document.sequence}; "
                f"sequence {last.sequence} was already accepted"
            )
        bundles = {}
        for name, entry in document.models.items():
            inner = json.dumps(entry.descriptor).encode()
            verified = self.verify_descriptor(inner, now)
            if verified.descriptor.model != name:
                raise VerificationError(
                    f"deployment entry {name!r} carries the descriptor of "
                    f"{verified.descriptor.model!r}"
                )
            bundles[name] = verified
        return VerifiedDeployment(
            document=document,
            signers=allowed,
            envelope_sha256=digest,
            bundles=MappingProxyType(bundles),
        )

    def with_release(self, model: str, release: int) -> TrustedState:
        """Raise the release floor of ``model`` (after a deployment commits)."""
        floor = dict(self.release_floor)
        floor[model] = max(floor.get(model, 0), release)
        return replace(self, release_floor=MappingProxyType(floor))
