"""One model's rollout on the device: where it stands, the table of its moves, and the rules that
decide what a late result still means. No I/O: the loop (agent.daemon) asks, then acts.

A :class:`ModelRollout` is the loop's record of one model: what it runs (``installed``), what
it is asked to run (``target``), and the phase of that. It moves only through
:meth:`ModelRollout.step`, by a :class:`Trigger`, along :data:`TRANSITIONS`:

=====================  ==========================================  ==================  =====
trigger                from                                        to                  force
=====================  ==========================================  ==================  =====
``restore-failed``     loading                                     failed
``runs-it``            any                                         active
``dropped``            any                                         active
``new-target``         any                                         pending             yes
``refused``            any                                         failed              yes
``refused-rolled-bk``  any                                         rolled-back         yes
``retry``              failed                                      pending
``fetch``              pending                                     downloading
``found-stored``       pending                                     verifying
``downloaded``         downloading                                 verifying
``unpack``             verifying                                   unpacking
``load``               unpacking                                   loading
``fail``               pending ... loading, failed                 failed
``slot-layer``         any                                         the slot layer's
=====================  ==========================================  ==================  =====

``runs-it``: the effective document names the bundle the model already runs (and serves).
``dropped``: the document no longer names the model, which runs an older version; its fetch
stops. ``new-target``: a bundle to fetch (forced: a new document is a new attempt, reported even
where the phase stays). ``refused``/``refused-rolled-bk``: this very document was tried before
and refused. ``slot-layer``: a phase the slot layer (agent.serving.slots) reports for the version
it loads: loading, warming, self-testing, probation, active, failed or rolled-back.

A step not forced into the phase the model is in already changes nothing (and reports nothing).
A step from a phase its row does not list is logged as an error and taken all the same: the table
says what the loop does, and a step outside it is a bug to see, not a reason to stop a rollout.

Late results are told apart by two rules:

* **prepare results** (:meth:`ModelRollout.is_current`): every job handed to the prepare worker
  and every cancel bumps ``attempt``; a result counts only if it carries the attempt the model is
  at and the bundle it heads for. Anything else is for a deployment that moved on.
* **slot-layer events** (:meth:`ModelRollout.is_stale`): an event while the model heads for a
  bundle (``target``) is stale when it is about another version: a restore, no version handed
  over, or a draft of other bytes. Its outcome (a commit, a failure) is recorded all the same;
  the phase reported stays the newer deployment's.

What the loop does about a document is :func:`plan` (for each model it names) and
:func:`plan_unnamed` (for each it no longer names).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from agent.device.transfer import Transfer
from agent.errors import EdgeAgentError, ProbationError
from agent.serving.slots import Version
from agent.state.store import InstalledModel, Trial
from agent.transport.messages import ErrorInfo, ModelStatus, Phase, VersionRef
from agent.trust.verifier import VerifiedDescriptor

log = logging.getLogger("agent")

FINAL = (Phase.ACTIVE, Phase.FAILED, Phase.ROLLED_BACK)
# The phases the slot layer reports for a version it was handed (or restores).
SLOT_LAYER_PHASES = frozenset(
    {
        Phase.LOADING,
        Phase.WARMING,
        Phase.SELF_TESTING,
        Phase.PROBATION,
        Phase.ACTIVE,
        Phase.FAILED,
        Phase.ROLLED_BACK,
    }
)


def error_info(exc: EdgeAgentError) -> ErrorInfo:
    """What a report says of ``exc``: its code and (the start of) its message."""
    return ErrorInfo(code=exc.code, message=str(exc)[:1024])


class Trigger(str, Enum):
    """What moves a model from one phase to the next (the rows of :data:`TRANSITIONS`)."""

    RESTORE_FAILED = "restore-failed"
    RUNS_IT = "runs-it"
    DROPPED = "dropped"
    NEW_TARGET = "new-target"
    REFUSED = "refused"
    REFUSED_ROLLED_BACK = "refused-rolled-bk"
    RETRY = "retry"
    FETCH = "fetch"
    FOUND_STORED = "found-stored"
    DOWNLOADED = "downloaded"
    UNPACK = "unpack"
    LOAD = "load"
    FAIL = "fail"
    SLOT_LAYER = "slot-layer"


@dataclass(frozen=True)
class Transition:
    """One row: the phases it starts from (None: any), the phase it enters (None: the one the
    slot layer reports), and whether it is entered (and reported) again when already there."""

    sources: frozenset[Phase] | None
    to: Phase | None
    force: bool = False


_PREPARING = frozenset(
    {Phase.PENDING, Phase.DOWNLOADING, Phase.VERIFYING, Phase.UNPACKING, Phase.LOADING}
)

TRANSITIONS: dict[Trigger, Transition] = {
    Trigger.RESTORE_FAILED: Transition(frozenset({Phase.LOADING}), Phase.FAILED),
    Trigger.RUNS_IT: Transition(None, Phase.ACTIVE),
    Trigger.DROPPED: Transition(None, Phase.ACTIVE),
    Trigger.NEW_TARGET: Transition(None, Phase.PENDING, force=True),
    Trigger.REFUSED: Transition(None, Phase.FAILED, force=True),
    Trigger.REFUSED_ROLLED_BACK: Transition(None, Phase.ROLLED_BACK, force=True),
    Trigger.RETRY: Transition(frozenset({Phase.FAILED}), Phase.PENDING),
    Trigger.FETCH: Transition(frozenset({Phase.PENDING}), Phase.DOWNLOADING),
    Trigger.FOUND_STORED: Transition(frozenset({Phase.PENDING}), Phase.VERIFYING),
    Trigger.DOWNLOADED: Transition(frozenset({Phase.DOWNLOADING}), Phase.VERIFYING),
    Trigger.UNPACK: Transition(frozenset({Phase.VERIFYING}), Phase.UNPACKING),
    Trigger.LOAD: Transition(frozenset({Phase.UNPACKING}), Phase.LOADING),
    Trigger.FAIL: Transition(_PREPARING | {Phase.FAILED}, Phase.FAILED),
    Trigger.SLOT_LAYER: Transition(None, None),
}


@dataclass(frozen=True)
class SlotEvent:
    """A phase change of the slot layer, queued for the loop (from a slot worker thread)."""

    name: str
    phase: Phase
    error: EdgeAgentError | None
    progress: float | None


class Heard(str, Enum):
    """What a slot-layer event did to the phase (:meth:`ModelRollout.hear`)."""

    STALE = "stale"  # about another version: the phase stays the newer deployment's
    ENTERED = "entered"  # the phase the slot layer reports is entered
    SAME = "same"  # already there


@dataclass
class ModelRollout:
    """One model: what it runs, what it is asked to run, and where that stands."""

    name: str
    installed: InstalledModel | None = None
    phase: Phase = Phase.PENDING
    target: VerifiedDescriptor | None = None
    variant: str | None = None
    deployment_id: str | None = None
    deployment_sha256: str | None = None  # the envelope digest of that deployment document
    transfer: Transfer | None = None
    opening: bool = False  # the prepare worker is opening the transfer
    error: ErrorInfo | None = None
    retry_at: float | None = None  # monotonic time of the next attempt after a transient failure
    loading: InstalledModel | None = None  # the record to write once the slot layer commits it
    waiting: Path | None = None  # a verified bundle waiting for the model's current deployment
    warm_progress: float | None = None
    attempt: int = 0  # bumped by every prepare job and every cancel: older results are stale

    # -- moves -------------------------------------------------------------------------------
    def step(self, trigger: Trigger, phase: Phase | None = None) -> bool:
        """Move by ``trigger`` (``phase``: the slot layer's, for ``slot-layer``); True when the
        phase is entered, which the loop then logs and reports."""
        row = TRANSITIONS[trigger]
        to = row.to
        if to is None:
            if phase not in SLOT_LAYER_PHASES:
                raise ValueError(f"{phase} is not a phase of the slot layer")
            to = phase
        elif phase is not None and phase != to:
            raise ValueError(f"{trigger.value} enters {to.value}, not {phase.value}")
        if row.sources is not None and self.phase not in row.sources:
            log.error(
                "%s: %s from %s is not in the rollout table",
                self.name,
                trigger.value,
                self.phase.value,
            )
        if self.phase == to and not row.force:
            return False
        self.phase = to
        return True

    def fail(self, exc: EdgeAgentError, *, retry_at: float | None) -> bool:
        """The deployment failed with ``exc``; ``retry_at``: when to try again (a transient
        failure), or None. True when ``failed`` is entered."""
        self.error = error_info(exc)
        self.transfer = None
        if retry_at is not None:
            self.retry_at = retry_at
        return self.step(Trigger.FAIL)

    def cancel(self) -> Transfer | None:
        """Stop heading for the target: what any job still running for it does is stale from
        now on. Returns the transfer the loop must pause (one still downloading); one being
        opened, or past downloading, is the prepare worker's."""
        t = self.transfer
        pause = (
            t if t is not None and self.phase == Phase.DOWNLOADING and not self.opening else None
        )
        self.transfer = None
        self.opening = False
        self.target = None
        self.waiting = None
        self.attempt += 1
        return pause

    def follow(self, deployment_id: str, deployment_sha256: str) -> None:
        """The model heads for what that document names (or runs it already)."""
        self.deployment_id = deployment_id
        self.deployment_sha256 = deployment_sha256

    def next_attempt(self) -> int:
        """A job for the prepare worker begins: the attempt its result must carry."""
        self.attempt += 1
        return self.attempt

    def draft(self, dest: Path) -> InstalledModel:
        """The record the target becomes once the slot layer commits it, unpacked at ``dest``;
        the bundle it replaces is kept as the one before it (a reload keeps that one)."""
        assert self.target is not None
        d = self.target.descriptor
        i = self.installed
        return InstalledModel(
            model=self.name,
            bundle_sha256=d.bundle_sha256,
            version=d.version,
            release=d.release,
            variant=self.variant,
            deployment_id=self.deployment_id,
            path=dest,
            previous_sha256=(
                None
                if i is None
                else i.previous_sha256
                if i.bundle_sha256 == d.bundle_sha256  # loaded again
                else i.bundle_sha256
            ),
        )

    # -- what late results mean --------------------------------------------------------------
    def heads_for(self, bundle_sha256: str) -> bool:
        return self.target is not None and self.target.descriptor.bundle_sha256 == bundle_sha256

    def is_current(self, attempt: int, bundle_sha256: str) -> bool:
        """A prepare result still counts: the attempt it was for, and the bundle headed for."""
        return self.attempt == attempt and self.heads_for(bundle_sha256)

    def is_stale(self, draft: InstalledModel | None, *, restoring: bool) -> bool:
        """A slot-layer event is about a version this model no longer heads for: a restore,
        none handed over (``draft``, what was in ``loading``), or one of other bytes."""
        if self.target is None:
            return False
        return (
            restoring
            or draft is None
            or draft.bundle_sha256 != self.target.descriptor.bundle_sha256
        )

    def hear(
        self, event: SlotEvent, draft: InstalledModel | None, *, restoring: bool, serves: bool
    ) -> Heard:
        """The phase part of a slot-layer event, once its outcome (a commit, a failure) is
        recorded. ``draft``: what was in ``loading`` when it came; ``serves``: a version serves
        after it. A stale event's failure is noted only where nothing serves now."""
        failed = event.phase in (Phase.FAILED, Phase.ROLLED_BACK) and event.error is not None
        if self.is_stale(draft, restoring=restoring):
            if failed and not serves:
                assert event.error is not None
                self.error = error_info(event.error)
            return Heard.STALE
        if event.phase == Phase.ACTIVE:
            self.error = None
        elif failed:
            assert event.error is not None
            self.error = error_info(event.error)
        return Heard.ENTERED if self.step(Trigger.SLOT_LAYER, event.phase) else Heard.SAME

    # -- what it reports ---------------------------------------------------------------------
    def status(self, served: Version | None = None) -> ModelStatus:
        """What the model serves (``served``, the slot layer's active version; else the record
        of the committed one, which then does not serve: no runtime) and where its deployment
        stands. While a new version serves on
        probation, ``fallback`` names the committed one a failed probation returns to."""
        i = self.installed
        progress = None
        if self.phase == Phase.DOWNLOADING and self.transfer:
            progress = self.transfer.progress
        elif self.phase == Phase.WARMING and self.warm_progress is not None:
            progress = round(100 * self.warm_progress, 1)
        fallback = None
        version: str | None
        release: int | None
        variant: str | None
        sha: str | None
        runtime: str | None
        if served is not None:
            c = served.candidate
            version, variant, sha = c.version, c.variant.id, c.bundle_sha256
            # The signed release, never the manifest's: the record's while it is the version
            # served (a re-issued descriptor raises that one in place), else the candidate's.
            release = i.release if i is not None and i.bundle_sha256 == sha else c.release
            runtime = served.runtime
            if i is not None and i.bundle_sha256 != sha:
                fallback = VersionRef(
                    version=i.version, release=i.release, bundle_sha256=i.bundle_sha256
                )
        else:
            version, release = (i.version, i.release) if i else (None, None)
            variant, sha = (i.variant, i.bundle_sha256) if i else (None, None)
            runtime = None
        return ModelStatus(
            phase=self.phase,
            version=version,
            release=release,
            variant=variant,
            runtime=runtime[:64] if runtime else None,
            bundle_sha256=sha,
            progress=progress,
            error=self.error,
            fallback=fallback,
        )


# -- what a document asks of each model -------------------------------------------------------
class Plan(str, Enum):
    """What the loop does about a model the effective document names."""

    RUNS_IT = "runs-it"  # it runs (and serves) those bytes: cancel any fetch, follow the document
    ON_ITS_WAY = "on-its-way"  # already heading for those bytes (or failed at them)
    REFUSED = "refused"  # tried for this very document before, and refused
    FETCH = "fetch"  # a new target: cancel what it did, head for the new bytes


def plan(
    rollout: ModelRollout,
    bundle_sha256: str,
    *,
    serving: bool,
    trial: Trial | None,
    deployment_sha256: str,
) -> Plan:
    """``serving``: the slot layer serves the model, or is restoring it."""
    installed = rollout.installed
    if installed is not None and installed.bundle_sha256 == bundle_sha256 and serving:
        return Plan.RUNS_IT
    if rollout.heads_for(bundle_sha256):
        return Plan.ON_ITS_WAY
    if (
        trial is not None
        and trial.verdict is not None
        and trial.for_deployment(bundle_sha256, deployment_sha256)
    ):
        return Plan.REFUSED
    return Plan.FETCH


def refused_trigger(rollout: ModelRollout, trial: Trial) -> Trigger:
    """A failed probation of a model that still runs its committed version was rolled back;
    any other refusal is a failure."""
    assert trial.verdict is not None
    if trial.verdict.code == ProbationError.code and rollout.installed is not None:
        return Trigger.REFUSED_ROLLED_BACK
    return Trigger.REFUSED


class Leftover(str, Enum):
    """What the loop does about a model the effective document no longer names."""

    FORGET = "forget"  # never ran here: nothing to keep, nothing to wait for
    STOP_FETCHING = "stop-fetching"  # runs an older version: stop fetching the new one
    KEEP = "keep"  # runs what it ran; removed once every named model is active


def plan_unnamed(rollout: ModelRollout) -> Leftover:
    if rollout.installed is None:
        return Leftover.FORGET
    if rollout.target is not None:
        return Leftover.STOP_FETCHING
    return Leftover.KEEP
