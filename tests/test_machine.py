"""One model's rollout (agent.device.machine): the phase table, the stale-result rules and what a
document asks of each model. No broker, no disk: the records are built in memory."""

from __future__ import annotations

import logging
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, cast

import pytest

import agent.device.machine as machine
from agent.device.machine import (
    FINAL,
    SLOT_LAYER_PHASES,
    TRANSITIONS,
    Heard,
    Leftover,
    ModelRollout,
    Plan,
    SlotEvent,
    Trigger,
    plan,
    plan_unnamed,
    refused_trigger,
)
from agent.device.transfer import Transfer
from agent.errors import ProbationError, StorageError, TransferError
from agent.state.store import InstalledModel, Trial, Verdict
from agent.trust.metadata import BundleDescriptor
from agent.trust.verifier import VerifiedDescriptor
from agent.values import Phase

OLD, NEW, OTHER = "a" * 64, "b" * 64, "c" * 64
DOC_1, DOC_2 = "1" * 64, "2" * 64


def _target(sha: str = NEW, release: int = 2) -> VerifiedDescriptor:
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    d = BundleDescriptor(
        model="tiny",
        version="2.0.0",
        release=release,
        bundle_sha256=sha,
        bundle_size=8192,
        block_size=4096,
        block_list_sha256="d" * 64,
        manifest_sha256="e" * 64,
        created=now,
        expires=now + timedelta(days=30),
    )
    return VerifiedDescriptor(
        descriptor=d, signers=frozenset({"release"}), envelope_sha256="f" * 64
    )


def _installed(sha: str = OLD, version: str = "1.0.0") -> InstalledModel:
    return InstalledModel(
        model="tiny", bundle_sha256=sha, version=version, release=1, path=Path("/nowhere")
    )


def _trial(sha: str = NEW, doc: str = DOC_1, code: str | None = "probation") -> Trial:
    verdict = Verdict(code=code, message="refused") if code is not None else None
    return Trial(
        model="tiny",
        bundle_sha256=sha,
        version="2.0.0",
        release=2,
        deployment_sha256=doc,
        verdict=verdict,
    )


def _transfer() -> Transfer:
    return cast(Transfer, object())  # only its identity matters to the rollout


def _event(phase: Phase, error: Any = None) -> SlotEvent:
    return SlotEvent("tiny", phase, error, None)


def _rows() -> list[tuple[Trigger, Phase]]:
    """Every row of the table, from each phase it lists (any: from every phase)."""
    rows = []
    for trigger, row in TRANSITIONS.items():
        sources = row.sources if row.sources is not None else frozenset(Phase)
        rows.extend((trigger, source) for source in sorted(sources, key=list(Phase).index))
    return rows


# -- the table --------------------------------------------------------------------------------
def test_every_trigger_has_one_row() -> None:
    assert set(TRANSITIONS) == set(Trigger)


def test_the_documented_table_is_the_table() -> None:
    doc = machine.__doc__
    assert doc is not None
    written = {
        m.group(1): (m.group(3), m.group(4) == "yes")
        for m in re.finditer(
            r"^``([a-z-]+)``\s{2,}(.+?)\s{2,}([a-z' -]+?)(?:\s{2,}(yes))?\s*$", doc, re.M
        )
    }
    assert set(written) == {t.value for t in Trigger}
    for trigger, row in TRANSITIONS.items():
        to, force = written[trigger.value]
        assert to == (row.to.value if row.to is not None else "the slot layer's"), trigger
        assert force == row.force, trigger


@pytest.mark.parametrize(("trigger", "source"), _rows())
def test_each_row_enters_its_phase(
    trigger: Trigger, source: Phase, caplog: pytest.LogCaptureFixture
) -> None:
    row = TRANSITIONS[trigger]
    to = row.to if row.to is not None else Phase.PROBATION
    r = ModelRollout("tiny", phase=source)
    with caplog.at_level(logging.ERROR, logger="agent"):
        entered = r.step(trigger, None if row.to is not None else to)
    assert r.phase == to
    assert entered == (row.force or source != to)
    assert not caplog.records, "a step the table lists is not an error"


def test_a_forced_row_is_entered_again() -> None:
    r = ModelRollout("tiny", phase=Phase.PENDING)
    assert r.step(Trigger.NEW_TARGET) is True  # a new document: reported although still pending
    r = ModelRollout("tiny", phase=Phase.FAILED)
    assert r.step(Trigger.REFUSED) is True


def test_an_unforced_row_into_the_same_phase_changes_nothing() -> None:
    r = ModelRollout("tiny", phase=Phase.ACTIVE)
    assert r.step(Trigger.RUNS_IT) is False
    assert r.step(Trigger.SLOT_LAYER, Phase.ACTIVE) is False
    assert r.phase == Phase.ACTIVE


@pytest.mark.parametrize("phase", sorted(SLOT_LAYER_PHASES, key=list(Phase).index))
def test_the_slot_layer_row_takes_each_phase_the_slot_layer_reports(phase: Phase) -> None:
    r = ModelRollout("tiny", phase=Phase.UNPACKING)
    assert r.step(Trigger.SLOT_LAYER, phase) is (phase != Phase.UNPACKING)
    assert r.phase == phase


@pytest.mark.parametrize("phase", [Phase.PENDING, Phase.DOWNLOADING, Phase.VERIFYING, None])
def test_the_slot_layer_row_refuses_a_phase_the_slot_layer_never_reports(
    phase: Phase | None,
) -> None:
    r = ModelRollout("tiny", phase=Phase.LOADING)
    with pytest.raises(ValueError, match="not a phase of the slot layer"):
        r.step(Trigger.SLOT_LAYER, phase)
    assert r.phase == Phase.LOADING


def test_a_row_given_another_phase_than_its_own_is_refused() -> None:
    r = ModelRollout("tiny", phase=Phase.PENDING)
    with pytest.raises(ValueError, match="fetch enters downloading"):
        r.step(Trigger.FETCH, Phase.ACTIVE)
    assert r.phase == Phase.PENDING


def test_a_step_the_table_does_not_list_is_logged_and_taken(
    caplog: pytest.LogCaptureFixture,
) -> None:
    r = ModelRollout("tiny", phase=Phase.ACTIVE)
    with caplog.at_level(logging.ERROR, logger="agent"):
        assert r.step(Trigger.UNPACK) is True
    assert r.phase == Phase.UNPACKING
    assert "unpack from active is not in the rollout table" in caplog.text


def test_a_whole_rollout_walks_the_table(caplog: pytest.LogCaptureFixture) -> None:
    r = ModelRollout("tiny", installed=_installed(), phase=Phase.ACTIVE)
    path = [
        (Trigger.NEW_TARGET, None),
        (Trigger.FETCH, None),
        (Trigger.DOWNLOADED, None),
        (Trigger.UNPACK, None),
        (Trigger.LOAD, None),
        (Trigger.SLOT_LAYER, Phase.LOADING),
        (Trigger.SLOT_LAYER, Phase.WARMING),
        (Trigger.SLOT_LAYER, Phase.SELF_TESTING),
        (Trigger.SLOT_LAYER, Phase.PROBATION),
        (Trigger.SLOT_LAYER, Phase.ACTIVE),
    ]
    seen = []
    with caplog.at_level(logging.ERROR, logger="agent"):
        for trigger, phase in path:
            if r.step(trigger, phase):
                seen.append(r.phase)
    assert seen == [
        Phase.PENDING,
        Phase.DOWNLOADING,
        Phase.VERIFYING,
        Phase.UNPACKING,
        Phase.LOADING,  # the slot layer's own `loading` is the same phase: not entered twice
        Phase.WARMING,
        Phase.SELF_TESTING,
        Phase.PROBATION,
        Phase.ACTIVE,
    ]
    assert not caplog.records


# -- failures ---------------------------------------------------------------------------------
def test_a_transient_failure_is_retried_later() -> None:
    t = _transfer()
    r = ModelRollout("tiny", phase=Phase.DOWNLOADING, target=_target(), transfer=t)
    assert r.fail(TransferError("no server answered"), retry_at=30.0) is True
    assert r.phase == Phase.FAILED
    assert r.transfer is None
    assert r.retry_at == 30.0
    assert r.error is not None
    assert r.error.code == TransferError.code
    assert r.step(Trigger.RETRY) is True
    assert r.phase == Phase.PENDING


def test_a_failure_when_failed_already_is_not_entered_again() -> None:
    r = ModelRollout("tiny", phase=Phase.PENDING, target=_target())
    assert r.fail(StorageError("disk full"), retry_at=None) is True
    assert r.retry_at is None
    assert r.fail(StorageError("disk still full"), retry_at=None) is False
    assert r.error is not None
    assert r.error.message == "disk still full"


# -- cancel and the prepare worker's results --------------------------------------------------
def test_a_cancel_during_the_transfer_hands_it_back_to_be_paused() -> None:
    t = _transfer()
    r = ModelRollout("tiny", phase=Phase.DOWNLOADING, target=_target(), transfer=t)
    r.waiting = Path("/bundle")
    attempt = r.next_attempt()
    assert r.cancel() is t
    assert (r.transfer, r.target, r.waiting, r.opening) == (None, None, None, False)
    assert not r.is_current(attempt, NEW), "what the worker still does for it is stale"


def test_a_transfer_being_opened_stays_the_workers_on_cancel() -> None:
    r = ModelRollout("tiny", phase=Phase.DOWNLOADING, target=_target(), transfer=_transfer())
    r.opening = True
    assert r.cancel() is None
    assert r.transfer is None
    assert r.opening is False


def test_a_transfer_past_downloading_is_not_paused_on_cancel() -> None:
    r = ModelRollout("tiny", phase=Phase.VERIFYING, target=_target(), transfer=_transfer())
    assert r.cancel() is None


def test_a_result_for_the_current_attempt_and_bundle_counts() -> None:
    r = ModelRollout("tiny", phase=Phase.VERIFYING, target=_target())
    attempt = r.next_attempt()
    assert r.is_current(attempt, NEW)


def test_a_result_of_an_older_attempt_is_stale() -> None:
    r = ModelRollout("tiny", phase=Phase.VERIFYING, target=_target())
    first = r.next_attempt()
    second = r.next_attempt()
    assert not r.is_current(first, NEW)
    assert r.is_current(second, NEW)


def test_a_result_for_bytes_a_newer_document_replaced_is_stale() -> None:
    r = ModelRollout("tiny", phase=Phase.VERIFYING, target=_target(NEW))
    attempt = r.next_attempt()
    r.target = _target(OTHER)  # same attempt number, other bytes
    assert not r.is_current(attempt, NEW)
    r.target = None
    assert not r.is_current(attempt, NEW)


# -- slot-layer events ------------------------------------------------------------------------
def test_an_event_with_no_target_is_never_stale() -> None:
    r = ModelRollout("tiny", installed=_installed())
    assert not r.is_stale(None, restoring=True)


@pytest.mark.parametrize(
    ("draft", "restoring"),
    [(None, False), (_installed(OTHER), False), (_installed(NEW), True)],
    ids=["nothing-handed-over", "other-bytes", "a-restore"],
)
def test_an_event_about_another_version_is_stale(
    draft: InstalledModel | None, restoring: bool
) -> None:
    r = ModelRollout("tiny", target=_target(NEW))
    assert r.is_stale(draft, restoring=restoring)


def test_an_event_about_the_draft_headed_for_is_not_stale() -> None:
    r = ModelRollout("tiny", target=_target(NEW))
    assert not r.is_stale(_installed(NEW), restoring=False)


def test_a_stale_failure_keeps_the_newer_phase_and_says_nothing_serves() -> None:
    r = ModelRollout("tiny", phase=Phase.DOWNLOADING, target=_target(NEW))
    event = _event(Phase.FAILED, ProbationError("older version failed"))
    assert r.hear(event, _installed(OLD), restoring=False, serves=False) == Heard.STALE
    assert r.phase == Phase.DOWNLOADING
    assert r.error is not None
    assert r.error.code == ProbationError.code


def test_a_stale_failure_while_a_version_serves_leaves_the_error_alone() -> None:
    r = ModelRollout("tiny", phase=Phase.DOWNLOADING, target=_target(NEW))
    event = _event(Phase.ROLLED_BACK, ProbationError("older version rolled back"))
    assert r.hear(event, _installed(OLD), restoring=False, serves=True) == Heard.STALE
    assert r.error is None
    assert r.phase == Phase.DOWNLOADING


def test_the_current_version_going_active_clears_the_error() -> None:
    r = ModelRollout("tiny", phase=Phase.PROBATION, target=None)
    r.error = machine.error_info(StorageError("earlier"))
    assert r.hear(_event(Phase.ACTIVE), None, restoring=False, serves=True) == Heard.ENTERED
    assert r.phase == Phase.ACTIVE
    assert r.error is None


def test_the_current_version_failing_is_reported_with_its_error() -> None:
    r = ModelRollout("tiny", phase=Phase.WARMING, target=_target(NEW))
    event = _event(Phase.FAILED, StorageError("out of memory"))
    assert r.hear(event, _installed(NEW), restoring=False, serves=True) == Heard.ENTERED
    assert r.phase == Phase.FAILED
    assert r.error is not None
    assert r.error.message == "out of memory"


def test_a_repeated_phase_of_the_slot_layer_is_heard_but_not_entered() -> None:
    r = ModelRollout("tiny", phase=Phase.WARMING, target=_target(NEW))
    assert r.hear(_event(Phase.WARMING), _installed(NEW), restoring=False, serves=False) == (
        Heard.SAME
    )


def test_final_phases_are_the_ones_the_slot_layer_ends_in() -> None:
    assert set(FINAL) == {Phase.ACTIVE, Phase.FAILED, Phase.ROLLED_BACK}
    assert set(FINAL) <= SLOT_LAYER_PHASES


# -- what a document asks ---------------------------------------------------------------------
def test_a_model_that_runs_and_serves_the_named_bytes_runs_it() -> None:
    r = ModelRollout("tiny", installed=_installed(NEW), target=_target(NEW))
    assert plan(r, NEW, serving=True, trial=None, deployment_sha256=DOC_1) == Plan.RUNS_IT


def test_named_bytes_that_are_installed_but_do_not_serve_are_fetched_again() -> None:
    r = ModelRollout("tiny", installed=_installed(NEW))
    assert plan(r, NEW, serving=False, trial=None, deployment_sha256=DOC_1) == Plan.FETCH


def test_a_model_heading_for_the_named_bytes_is_on_its_way() -> None:
    r = ModelRollout("tiny", installed=_installed(OLD), target=_target(NEW))
    assert plan(r, NEW, serving=True, trial=None, deployment_sha256=DOC_1) == Plan.ON_ITS_WAY


def test_bytes_refused_for_this_very_document_are_not_tried_again() -> None:
    r = ModelRollout("tiny", installed=_installed(OLD))
    trial = _trial(NEW, DOC_1)
    assert plan(r, NEW, serving=True, trial=trial, deployment_sha256=DOC_1) == Plan.REFUSED
    # A new document is a new attempt; a trial without a verdict is still being tried.
    assert plan(r, NEW, serving=True, trial=trial, deployment_sha256=DOC_2) == Plan.FETCH
    pending = _trial(NEW, DOC_1, code=None)
    assert plan(r, NEW, serving=True, trial=pending, deployment_sha256=DOC_1) == Plan.FETCH


def test_a_refused_probation_over_a_committed_version_is_a_rollback() -> None:
    trial = _trial(code=ProbationError.code)
    assert refused_trigger(ModelRollout("tiny", installed=_installed()), trial) == (
        Trigger.REFUSED_ROLLED_BACK
    )
    assert refused_trigger(ModelRollout("tiny"), trial) == Trigger.REFUSED
    other = _trial(code="interrupted")
    assert refused_trigger(ModelRollout("tiny", installed=_installed()), other) == Trigger.REFUSED


def test_what_becomes_of_a_model_the_document_no_longer_names() -> None:
    assert plan_unnamed(ModelRollout("tiny", target=_target())) == Leftover.FORGET
    r = ModelRollout("tiny", installed=_installed(), target=_target())
    assert plan_unnamed(r) == Leftover.STOP_FETCHING
    assert plan_unnamed(ModelRollout("tiny", installed=_installed())) == Leftover.KEEP


# -- what it reports --------------------------------------------------------------------------
def test_status_without_a_served_version_names_the_record_and_no_runtime() -> None:
    r = ModelRollout("tiny", installed=_installed(OLD), phase=Phase.WARMING)
    r.warm_progress = 0.4567
    status = r.status(None)
    assert (status.version, status.bundle_sha256, status.runtime) == ("1.0.0", OLD, None)
    assert status.progress == 45.7
    assert status.fallback is None


# -- the record a version becomes -----------------------------------------------------------
def test_a_draft_keeps_the_version_it_replaces_for_rollback() -> None:
    r = ModelRollout("tiny", installed=_installed(OLD), target=_target(NEW), variant="cpu")
    r.follow("dep-2", DOC_2)
    draft = r.draft(Path("/models/tiny/new"))
    assert (draft.bundle_sha256, draft.version, draft.release) == (NEW, "2.0.0", 2)
    assert (draft.variant, draft.deployment_id) == ("cpu", "dep-2")
    assert draft.previous_sha256 == OLD


def test_a_draft_of_the_bytes_installed_keeps_the_earlier_fallback() -> None:
    installed = _installed(NEW).model_copy(update={"previous_sha256": OLD})
    r = ModelRollout("tiny", installed=installed, target=_target(NEW))
    assert r.draft(Path("/models/tiny/new")).previous_sha256 == OLD  # loaded again
    first = ModelRollout("tiny", target=_target(NEW))
    assert first.draft(Path("/models/tiny/new")).previous_sha256 is None
