"""The dashboard's buttons: pause, resume, abort and roll back a rollout, as the CLI does.

Each action opens a session of its own, reads the rollouts from the broker afresh and calls
what ``edge-fleet rollout pause|resume|abort|rollback`` calls (agent.fleet.rollout). Pause and
abort end there. Resume and rollback may need a controller to drive the rollout on: that
controller runs on a thread of the dashboard (``drive-{rollout}``) until the rollout stops, as
``edge-fleet rollout resume`` would in a terminal; stopping the dashboard stops it cleanly (it
hands the rollout back, and ``edge-fleet rollout resume`` carries it on from anywhere).

Every action needs the fleet's release key (``--key``), like the CLI's signed commands: without
it, :class:`Actions` refuses them all, and says so.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from agent.errors import ConfigError, EdgeAgentError
from agent.fleet.control import fleet_session
from agent.fleet.keys import fleet_trust, load_signer
from agent.fleet.plan import Knowledge, collect
from agent.fleet.rollout import Controller, pause_or_abort, resume, rollback
from agent.transport.session import MqttSettings
from agent.transport.topics import Topics
from agent.trust import Signer, TrustedState

log = logging.getLogger("agent.fleet.dashboard")

Action = Literal["pause", "resume", "abort", "rollback"]
ACTIONS: tuple[Action, ...] = ("pause", "resume", "abort", "rollback")
ANSWER_S = 60.0  # a resume or rollback says within this long whether it was taken


@dataclass(frozen=True)
class Signing:
    """The release keys the actions sign with, and where the fleet's trust is."""

    keys: Sequence[Path]
    trust: Path | None = None
    days: int = 30
    signers: list[Signer] = field(default_factory=list)

    @classmethod
    def load(cls, keys: Sequence[Path], trust: Path | None = None, days: int = 30) -> Signing:
        """Read the keys (and check the trust loads) now, so that a bad file stops the start."""
        signing = cls(list(keys), trust, days, [load_signer(k) for k in keys])
        signing.trusted()
        return signing

    def trusted(self) -> TrustedState:
        return fleet_trust(self.trust, self.keys, datetime.now(timezone.utc))


@dataclass(frozen=True)
class Done:
    """An action's outcome, for the page: what happened, in a sentence."""

    action: str
    rollout: str
    message: str
    driving: bool = False  # a controller runs on here now


class Actions:
    """Rollout actions on ``mqtt``'s broker; see the module docstring."""

    def __init__(
        self,
        mqtt: MqttSettings,
        topics: Topics,
        signing: Signing | None,
        *,
        by: str = "edge-fleet-dashboard",
    ) -> None:
        self.mqtt = mqtt
        self.topics = topics
        self.signing = signing
        self.by = by[:128]
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[tuple[str, threading.Thread]] = []  # (rollout, its driver)
        self._count = 0

    @property
    def available(self) -> bool:
        return self.signing is not None

    @property
    def why_not(self) -> str:
        if self.signing is None:
            return "actions need the fleet's release key: start the dashboard with --key"
        return ""

    def driving(self) -> list[str]:
        """The rollouts a controller of this dashboard drives now."""
        with self._lock:
            return sorted({r for r, t in self._threads if t.is_alive()})

    def _client_id(self, action: str) -> str:
        with self._lock:
            self._count += 1
            return f"{self.by}-{action}-{self._count}"[:128]

    def run(self, rollout_id: str, action: str) -> Done:
        """Do ``action`` to ``rollout_id``; ConfigError if it is refused (with the reason),
        BrokerError if the broker cannot be reached. Blocks for up to a minute."""
        if action not in ACTIONS:
            raise ConfigError(f"no such action {action!r} (one of {', '.join(ACTIONS)})")
        if self.signing is None:
            raise ConfigError(self.why_not)
        if self._stop.is_set():
            raise ConfigError("the dashboard is stopping")
        if action in ("pause", "abort"):
            return self._pause_or_abort(rollout_id, action)
        return self._drive(rollout_id, action)

    def _pause_or_abort(self, rollout_id: str, action: Literal["pause", "abort"]) -> Done:
        knowledge = Knowledge(self.topics)
        with fleet_session(
            self.mqtt, self._client_id(action), subscriptions=knowledge.subscriptions
        ) as (session, inbox):
            collect(inbox, knowledge)
            done = pause_or_abort(session, inbox, knowledge, rollout_id, action, self.by)
        if done.how == "set":
            text = f"{done.status} (no controller was driving it)"
        elif done.how == "taken":
            text = f"{action} taken by {done.owner}"
        else:
            text = f"asked {done.owner} to {action}; no answer yet"
        log.info("rollout %s: %s", rollout_id, text)
        return Done(action, rollout_id, text)

    def _drive(self, rollout_id: str, action: str) -> Done:
        answer: queue.SimpleQueue[Done | BaseException] = queue.SimpleQueue()
        thread = threading.Thread(
            target=self._driver,
            args=(rollout_id, action, answer),
            name=f"drive-{rollout_id}"[:64],
            daemon=True,
        )
        with self._lock:
            if self._stop.is_set():  # close() took its list already: nothing would join this
                raise ConfigError("the dashboard is stopping")
            # A controller of ours already driving it is asked to hand over, like any other.
            self._threads = [(r, t) for r, t in self._threads if t.is_alive()]
            self._threads.append((rollout_id, thread))
            thread.start()
        try:
            got = answer.get(timeout=ANSWER_S)
        except queue.Empty:
            return Done(action, rollout_id, f"{action} asked; still taking the rollout over")
        if isinstance(got, BaseException):
            raise got
        return got

    def _driver(
        self, rollout_id: str, action: str, answer: queue.SimpleQueue[Done | BaseException]
    ) -> None:
        assert self.signing is not None
        answered = False

        def progress(line: str) -> None:
            log.info("rollout %s: %s", rollout_id, line)

        try:
            trust = self.signing.trusted()
            knowledge = Knowledge(self.topics, trust)
            with fleet_session(
                self.mqtt, self._client_id(action), subscriptions=knowledge.subscriptions
            ) as (session, inbox):
                collect(inbox, knowledge)
                controller: Controller
                if action == "resume":
                    done = resume(
                        session,
                        inbox,
                        knowledge,
                        rollout_id,
                        self.signing.signers,
                        by=self.by,
                        progress=progress,
                    )
                    if done.how == "taken":
                        answer.put(Done(action, rollout_id, f"resumed by {done.owner}"))
                        return
                    if done.controller is None:
                        text = f"it is {done.status}: nothing to resume"
                        answer.put(Done(action, rollout_id, text))
                        return
                    controller = done.controller
                else:
                    controller = rollback(
                        session,
                        inbox,
                        knowledge,
                        rollout_id,
                        self.signing.signers,
                        trust,
                        days=self.signing.days,
                        by=self.by,
                        progress=progress,
                    )
                text = "rolling back" if action == "rollback" else "resumed"
                answer.put(Done(action, rollout_id, f"{text}, driven from the dashboard", True))
                answered = True
                state = controller.run(self._stop.is_set)
                progress(f"{state.status}" + (f": {state.reason}" if state.reason else ""))
        except EdgeAgentError as exc:
            if not answered:
                answer.put(exc)
            log.error("rollout %s: %s: %s", rollout_id, action, exc)
        except Exception as exc:  # a bug: the page hears of it, the dashboard keeps serving
            log.exception("rollout %s: %s failed", rollout_id, action)
            if not answered:
                answer.put(EdgeAgentError(f"{action} failed: {exc!r}"))

    def close(self, timeout: float = 15.0) -> None:
        """Stop every controller driving from here (each hands its rollout back)."""
        with self._lock:
            self._stop.set()
            threads = list(self._threads)
        for _, t in threads:
            t.join(timeout)
