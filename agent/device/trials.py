"""Trials: each version handed to the slot layer, from just before it gets it until it commits
(``trials/{name}.json``, agent.state.store.Trial), kept by the loop's thread.

A trial still on disk at start-up was cut short by the agent's death (a crash, a kill, a power
cut); a version that keeps taking the agent down with it is not started again for the same
deployment (:data:`MAX_TRIAL_STARTS`). A trial that ends with a verdict (a failed probation, or
too many interrupted starts) keeps it: that version is not tried again until a new document.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from agent.errors import DeploymentInterruptedError, EdgeAgentError
from agent.state.store import InstalledModel, StateStore, Trial, Verdict

log = logging.getLogger("agent")

# A version is handed to the slot layer at most this often for one deployment.
MAX_TRIAL_STARTS = 3


def verdict_of(exc: EdgeAgentError) -> Verdict:
    """What a trial records of the error that ended it (the reported ErrorInfo's fields)."""
    return Verdict(code=exc.code, message=str(exc)[:1024])


class Trials:
    """The trials on disk, by model, and the rules they keep."""

    def __init__(self, store: StateStore) -> None:
        self._store = store
        self._by_model: dict[str, Trial] = store.load_trials()

    def get(self, name: str) -> Trial | None:
        return self._by_model.get(name)

    def __iter__(self) -> Iterator[Trial]:
        return iter(list(self._by_model.values()))

    def save(self, trial: Trial) -> None:
        self._store.save_trial(trial)
        self._by_model[trial.model] = trial

    def end(self, name: str) -> None:
        if self._by_model.pop(name, None) is not None:
            self._store.remove_trial(name)

    def begin(
        self, draft: InstalledModel, *, deployment_sha256: str, deployment_id: str | None
    ) -> DeploymentInterruptedError | None:
        """Record the trial before the slot layer gets ``draft``; the error (recorded as its
        verdict) when this version took the agent down with it too often for this deployment."""
        name = draft.model
        prev = self._by_model.get(name)
        # The same bundle again, even for a newer document (the fleet publishes documents for
        # other models too): interrupted starts add up. A refused one starts afresh.
        again = (
            prev is not None and prev.verdict is None and prev.bundle_sha256 == draft.bundle_sha256
        )
        starts = prev.starts + 1 if again and prev is not None else 1
        trial = Trial(
            model=name,
            bundle_sha256=draft.bundle_sha256,
            version=draft.version,
            release=draft.release,
            deployment_sha256=deployment_sha256,
            deployment_id=deployment_id,
            starts=starts,
        )
        if starts > MAX_TRIAL_STARTS:
            exc = DeploymentInterruptedError(
                f"the agent stopped {starts - 1} times while deploying {name} "
                f"{draft.version} (a crash, a kill or a power cut each time); not trying it "
                "again for this deployment"
            )
            self.save(trial.model_copy(update={"starts": starts - 1, "verdict": verdict_of(exc)}))
            return exc
        if starts > 1:
            log.warning(
                "%s %s: deploying again after %d interrupted attempt(s)",
                name,
                draft.version,
                starts - 1,
            )
        self.save(trial)
        return None

    def failed_alone(self, name: str, draft: InstalledModel | None) -> None:
        """The slot layer failed ``draft`` by itself (a load, warm-up or self-test), with no
        verdict: the trial ends, and the version is tried again after a restart."""
        trial = self._by_model.get(name)
        if (
            draft is not None
            and trial is not None
            and trial.verdict is None
            and trial.bundle_sha256 == draft.bundle_sha256
        ):
            self.end(name)

    def refuse(
        self,
        name: str,
        bundle_sha256: str,
        error: EdgeAgentError,
        *,
        deployment_sha256: str | None,
        deployment_id: str | None,
    ) -> None:
        """The slot layer's verdict on a version's probation, before it rolls back; recorded
        for the document the model heads for now (``deployment_sha256``, when it has one: one
        naming the same bundle may have replaced the one the trial began with)."""
        trial = self._by_model.get(name)
        if trial is None or trial.bundle_sha256 != bundle_sha256:
            return  # not a version this agent handed over (cannot happen)
        verdict = verdict_of(error)
        update: dict[str, Any] = {"verdict": verdict}
        if deployment_sha256 is not None:
            update |= {"deployment_sha256": deployment_sha256, "deployment_id": deployment_id}
        refused = trial.model_copy(update=update)
        self._by_model[name] = refused  # even if the disk refuses: not ended on rollback
        log.info("%s %s refused: %s", name, trial.version, verdict.message)
        self._store.save_trial(refused)

    def release(self, name: str, loading: InstalledModel | None) -> None:
        """A clean stop does not count against the version the slot layer is still trying."""
        trial = self._by_model.get(name)
        if loading is None or trial is None or trial.verdict is not None:
            return
        if trial.bundle_sha256 == loading.bundle_sha256 and trial.starts > 0:
            try:
                self.save(trial.model_copy(update={"starts": trial.starts - 1}))
            except EdgeAgentError as exc:
                log.warning("%s", exc)
