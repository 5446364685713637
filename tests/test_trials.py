"""agent.device.trials on a real state directory, without a broker or a runtime: how starts add
up, when a version that keeps taking the agent down is given up on, and what a verdict keeps."""

from __future__ import annotations

from pathlib import Path

from agent.device.trials import MAX_TRIAL_STARTS, Trials
from agent.errors import ProbationError
from agent.state.store import InstalledModel, StateStore

DOC_A, DOC_B = "a" * 64, "b" * 64


def _draft(sha: str = "1" * 64, version: str = "1.2.0") -> InstalledModel:
    return InstalledModel(
        model="tiny", bundle_sha256=sha, version=version, release=3, path=Path("/nowhere")
    )


def test_interrupted_starts_add_up_until_the_version_is_given_up(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    for start in range(1, MAX_TRIAL_STARTS + 1):
        # Each restart reads the trials the agent's death left on disk.
        trials = Trials(store)
        assert trials.begin(_draft(), deployment_sha256=DOC_A, deployment_id="d1") is None
        trial = Trials(store).get("tiny")
        assert trial is not None
        assert trial.starts == start
    refused = Trials(store).begin(_draft(), deployment_sha256=DOC_A, deployment_id="d1")
    assert refused is not None
    assert refused.code == "interrupted"
    trial = Trials(store).get("tiny")
    assert trial is not None
    assert trial.verdict is not None
    assert trial.verdict.code == "interrupted"
    assert trial.starts == MAX_TRIAL_STARTS


def test_another_bundle_or_a_refused_one_starts_afresh(tmp_path: Path) -> None:
    trials = Trials(StateStore(tmp_path))
    trials.begin(_draft(), deployment_sha256=DOC_A, deployment_id="d1")
    trials.begin(_draft(), deployment_sha256=DOC_A, deployment_id="d1")
    trials.begin(_draft("2" * 64, "1.3.0"), deployment_sha256=DOC_A, deployment_id="d1")
    assert trials.get("tiny").starts == 1  # type: ignore[union-attr]
    trials.refuse(
        "tiny", "2" * 64, ProbationError("errors"), deployment_sha256=DOC_B, deployment_id="d2"
    )
    trials.begin(_draft("2" * 64, "1.3.0"), deployment_sha256=DOC_B, deployment_id="d3")
    trial = trials.get("tiny")
    assert trial is not None
    assert (trial.starts, trial.verdict, trial.deployment_id) == (1, None, "d3")


def test_a_verdict_is_on_disk_for_the_document_the_model_heads_for(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    trials = Trials(store)
    trials.begin(_draft(), deployment_sha256=DOC_A, deployment_id="d1")
    trials.refuse(
        "tiny",
        "1" * 64,
        ProbationError("p99 too high"),
        deployment_sha256=DOC_B,
        deployment_id="d2",
    )
    trial = Trials(store).get("tiny")
    assert trial is not None
    assert trial.verdict is not None
    assert (trial.verdict.code, trial.deployment_sha256, trial.deployment_id) == (
        "probation",
        DOC_B,
        "d2",
    )
    # A verdict on a version this agent never handed over changes nothing.
    trials.refuse("tiny", "9" * 64, ProbationError("?"), deployment_sha256=DOC_A, deployment_id="x")
    assert Trials(store).get("tiny") == trial


def test_a_clean_stop_and_a_failure_on_its_own_do_not_count(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    trials = Trials(store)
    trials.begin(_draft(), deployment_sha256=DOC_A, deployment_id="d1")
    trials.begin(_draft(), deployment_sha256=DOC_A, deployment_id="d1")
    trials.release("tiny", _draft())
    assert Trials(store).get("tiny").starts == 1  # type: ignore[union-attr]
    trials.release("tiny", None)  # nothing loading: nothing to give back
    assert Trials(store).get("tiny").starts == 1  # type: ignore[union-attr]
    trials.failed_alone("tiny", _draft())
    assert Trials(store).get("tiny") is None
    assert list(Trials(store)) == []
