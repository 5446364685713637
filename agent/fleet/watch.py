"""Following one deployment to its end: ``edge-fleet deploy --wait``.

A device (or every device of a group, as they report) is followed until each is active on what
was deployed, failed, or refused the document. Nothing is printed here: each change of the
one-line progress goes to a callback, and the outcomes come back.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from agent.fleet.control import bar
from agent.fleet.gate import Follower, Outcome
from agent.fleet.plan import Knowledge, collect
from agent.transport.session import InboxItem, Incoming, Session
from agent.transport.topics import Topics

# Each look at the devices' state waits this long for messages.
POLL_S = 0.2


@dataclass(frozen=True)
class Watched:
    """The outcome of each device followed; ``finished``: every one final (else time ran out)."""

    outcomes: dict[str, Outcome]
    finished: bool

    @property
    def failed(self) -> dict[str, Outcome]:
        """The devices that failed or refused the document."""
        return {dev: o for dev, o in self.outcomes.items() if o.final and not o.ok}

    @property
    def waiting(self) -> list[str]:
        """The devices not finished yet, in order."""
        return [dev for dev, o in self.outcomes.items() if not o.final]


def watch_deployment(
    session: Session,
    inbox: queue.SimpleQueue[InboxItem],
    topics: Topics,
    publish: Callable[[], None],
    *,
    deployment_id: str,
    want: Mapping[str, str | None],
    timeout: float,
    device: str | None = None,
    group: str | None = None,
    on_line: Callable[[str], None] | None = None,
) -> Watched:
    """Subscribe, catch up with the retained state, ``publish`` the document, then follow
    ``device`` (else ``group``) until every device is final or ``timeout`` seconds pass.

    Subscribed and caught up before the document goes out, so that a refusal that comes at once
    is seen as it comes. ``want``: model -> the bundle digest it must run (None: removed).
    ``on_line`` hears the progress line each time it changes.
    """
    knowledge = Knowledge(topics)
    if device:
        d = topics.device(device)
        filters = [d.reported, d.online, d.events]
    else:
        filters = knowledge.view.subscriptions
    for f in filters:
        session.subscribe(f)
    collect(inbox, knowledge, quiet=0.3)
    publish()
    follower = Follower(knowledge, deployment_id, group=group)
    deadline = time.monotonic() + timeout
    last_line = ""
    while True:
        if device:
            follower.watching = {device}
        else:
            follower.watching = {
                dev
                for dev, view in knowledge.view.devices.items()
                if view.reported and group in view.reported.groups
            }
        outcomes = {dev: follower.outcome(dev, want) for dev in sorted(follower.watching)}
        line = progress_line(knowledge, outcomes, deployment_id, device=device, group=group)
        if line != last_line:
            if on_line is not None:
                on_line(line)
            last_line = line
        if outcomes and all(o.final for o in outcomes.values()):
            return Watched(outcomes, finished=True)
        if time.monotonic() >= deadline:
            return Watched(outcomes, finished=False)
        end = time.monotonic() + POLL_S
        while (left := end - time.monotonic()) > 0:
            try:
                item = inbox.get(timeout=left)
            except queue.Empty:
                break
            if isinstance(item, Incoming):
                follower.update(item)


def progress_line(
    knowledge: Knowledge,
    outcomes: Mapping[str, Outcome],
    deployment_id: str,
    *,
    device: str | None = None,
    group: str | None = None,
) -> str:
    """One line: the device's models and their phases (progress bars where there is
    progress), else how many of the group's devices are in each phase."""
    if device and device in outcomes:
        view = knowledge.view.devices.get(device)
        r = view.reported if view is not None else None
        parts = (
            [
                f"{n} {m.phase.value} {bar(m.progress) if m.progress is not None else ''}".rstrip()
                for n, m in sorted(r.models.items())
            ]
            if r is not None and r.deployment_id == deployment_id
            else [outcomes[device].phase]
        )
        return f"{device}: " + ", ".join(parts)
    counts: dict[str, int] = {}
    for o in outcomes.values():
        counts[o.phase] = counts.get(o.phase, 0) + 1
    return f"group {group}: " + (
        ", ".join(f"{n} {p}" for p, n in sorted(counts.items())) or "no device reported"
    )
