"""The deployment documents a device follows and the trust that verifies them, as the loop keeps
them (agent.daemon), on disk too.

A device follows its own ``desired`` topic and its groups' (the *sources*, in precedence:
``device``, then ``group-{g}`` in the order of ``groups``). Each document is verified by the trust
core against the address its topic stands for, the clock, and the sequence point last accepted
from that topic; what is accepted is kept (``desired/``, and the points with the trust state), so
that a restart resumes it. The effective document is the device's own, unless it hands the device
back to its groups, else the first group's that has one.

A document refused for want of trust material (no keyring yet, a key the keyring does not list,
an expired keyring) is kept aside and verified again as soon as new trust is accepted.

Nothing here reports or logs a refusal: :meth:`Documents.receive` says what became of a message
and the loop tells the fleet.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import Enum

from agent.errors import BadContentError, SizeLimitError
from agent.logs import log_fields
from agent.state.store import StateStore
from agent.transport.messages import TrustUpdate
from agent.transport.session import Incoming
from agent.trust.metadata import MAX_METADATA_BYTES, DeploymentTarget
from agent.trust.verifier import SequencePoint, TrustedState, VerifiedDeployment

log = logging.getLogger("agent")

# Refusals that new trust material (a keyring, a root) may turn around: such a document is kept
# and verified again when trust changes.
TRUST_CODES = frozenset(
    {"verification", "untrusted-key", "expired", "key-not-allowed", "threshold"}
)


class Received(Enum):
    """What became of a message on a desired topic."""

    WITHDRAWN = "withdrawn"  # the topic was emptied: what runs stays
    REFUSED = "refused"  # not accepted; nothing changed
    AGAIN = "again"  # the document already accepted (a retained message on reconnect)
    RESUMED = "resumed"  # accepted before, dropped since (trust at start-up), good again
    ACCEPTED = "accepted"  # a new document from that topic


@dataclass(frozen=True)
class Receipt:
    kind: Received
    error: BadContentError | None = None  # REFUSED: why
    verified: VerifiedDeployment | None = None


class Documents:
    """The accepted documents by source, their envelopes, the sequence points and the trust."""

    def __init__(
        self, store: StateStore, trusted: TrustedState, *, device_id: str, groups: Sequence[str]
    ) -> None:
        self._store = store
        self.trusted = trusted
        self.points: dict[str, SequencePoint] = store.sequence_points()
        self.by_source: dict[str, VerifiedDeployment] = {}
        self._payloads: dict[str, bytes] = {}  # the envelopes behind ``by_source``
        # The last document refused on each topic for want of trust material.
        self._untrusted: dict[str, Incoming] = {}
        self._device_id = device_id
        self._groups = tuple(groups)

    # -- the sources ------------------------------------------------------------------------
    def sources(self) -> list[str]:
        """The desired topics followed, by the names documents are kept under, in precedence."""
        return ["device", *(f"group-{g}" for g in self._groups)]

    def target(self, source: str) -> DeploymentTarget:
        """The one address a document on ``source``'s topic must be for.

        A group's document replayed on the device's topic (or another group's) is refused:
        sequence floors are kept per topic, so accepting it there would reopen rollback.
        """
        if source == "device":
            return DeploymentTarget(kind="device", id=self._device_id)
        return DeploymentTarget(kind="group", id=source.removeprefix("group-"))

    def _verify(self, source: str, payload: bytes, now: datetime) -> VerifiedDeployment:
        return self.trusted.verify_deployment(
            payload, now, targets=[self.target(source)], last=self.points.get(source)
        )

    # -- documents ---------------------------------------------------------------------------
    def restore(self, now: datetime) -> None:
        """The documents accepted before the restart, each verified again with today's trust."""
        for source, data in self._store.load_desired().items():
            try:
                verified = self._verify(source, data, now)
            except BadContentError as exc:
                log.warning("not resuming the stored %s deployment: %s", source, exc)
                continue
            self.by_source[source] = verified
            self._payloads[source] = data

    def receive(self, source: str, item: Incoming, now: datetime) -> Receipt:
        """Verify what arrived on ``source``'s topic; an accepted document is on disk on return."""
        if not item.payload:
            self._untrusted.pop(source, None)  # a document refused earlier is withdrawn
            return Receipt(Received.WITHDRAWN)
        try:
            if len(item.payload) > MAX_METADATA_BYTES:
                raise SizeLimitError(
                    f"deployment of {len(item.payload)} bytes; the limit is {MAX_METADATA_BYTES}"
                )
            verified = self._verify(source, item.payload, now)
        except BadContentError as exc:
            if exc.code in TRUST_CODES:  # new trust material may change the verdict
                self._untrusted[source] = item
            else:  # what the topic holds now is refused for good
                self._untrusted.pop(source, None)
            return Receipt(Received.REFUSED, error=exc)
        self._untrusted.pop(source, None)
        if self.points.get(source) == verified.point:
            if source in self.by_source:
                return Receipt(Received.AGAIN, verified=verified)
            self.by_source[source] = verified
            self._payloads[source] = item.payload
            return Receipt(Received.RESUMED, verified=verified)
        log.info(
            "accepted deployment %s (sequence %d) from %s",
            verified.document.deployment_id,
            verified.document.sequence,
            item.topic,
            extra=log_fields(deployment_id=verified.document.deployment_id),
        )
        self._store.save_desired(source, item.payload)
        self.points[source] = verified.point
        self._store.save_trust(self.trusted, self.points)
        self.by_source[source] = verified
        self._payloads[source] = item.payload
        return Receipt(Received.ACCEPTED, verified=verified)

    def effective(
        self, current: VerifiedDeployment | None, now: datetime
    ) -> tuple[VerifiedDeployment | None, list[tuple[str, BadContentError]]]:
        """The device's own document, unless it hands the device back; else its first group's;
        and the documents found no longer to hold on the way.

        A document that takes over from ``current`` (a group's, once the device is handed back)
        may have been accepted long ago: it is verified again first, against the floors and
        the clock of now, and passed over (and forgotten) if it no longer holds.
        """
        lapsed: list[tuple[str, BadContentError]] = []
        for source in self.sources():
            doc = self.by_source.get(source)
            if doc is None or (source == "device" and doc.document.follow_groups):
                continue
            payload = self._payloads.get(source)
            if doc is not current and payload is not None:
                try:
                    doc = self._verify(source, payload, now)
                except BadContentError as exc:
                    log.warning("the %s deployment no longer holds: %s", source, exc)
                    del self.by_source[source]
                    lapsed.append((source, exc))
                    continue
                self.by_source[source] = doc
            return doc, lapsed
        return None, lapsed

    # -- trust -------------------------------------------------------------------------------
    def update_trust(self, payload: bytes, now: datetime) -> dict[str, Incoming] | None:
        """Accept a trust update (newer roots, each signed by the old and the new threshold, and
        a keyring): None when it is what the device trusts already, else the documents refused
        for want of trust, to be verified again. BadContentError when it is refused."""
        update = TrustUpdate.from_bytes(payload, max_bytes=MAX_METADATA_BYTES)
        state = self.trusted
        for root in update.roots:
            data = json.dumps(root).encode()
            if data == state.root_bytes:
                continue
            try:
                state = state.update_root(data)
            except BadContentError as exc:
                if exc.code == "rollback":
                    continue  # a version the device already has
                raise
        state = state.update_keyring(json.dumps(update.keyring).encode(), now)
        if state.root == self.trusted.root and state.keyring == self.trusted.keyring:
            return None  # (the retained message, again)
        log.info(
            "trust updated: root v%d, keyring v%d",
            state.root.version,
            state.keyring.version if state.keyring else 0,
        )
        self.trusted = state
        self._store.save_trust(state, self.points)
        waiting, self._untrusted = self._untrusted, {}
        return waiting

    def assume_floor(self, model: str, release: int) -> None:
        """At start-up: what runs is never above the floor (a crash between the two writes of
        a commit); written with the next change of trust."""
        self.trusted = self.trusted.with_release(model, release)

    def raise_floor(self, model: str, release: int) -> None:
        """A version committed under ``release``: the floor moves, on disk first."""
        trusted = self.trusted.with_release(model, release)
        self._store.save_trust(trusted, self.points)
        self.trusted = trusted
