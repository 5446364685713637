"""Failpoints: named places where the agent can be made to die as ``kill -9`` would kill it.

Off unless ``EDGE_FAILPOINTS`` names them (comma-separated), read once at import. The
crash-recovery tests arm one, start ``edge-agent run``, and restart it after it died, to show
that a power cut in any phase of a deployment leaves a box that serves and finishes the job.

    verifying   the download is complete, its structure checked, not yet moved to bundles/
    unpacking   the first member of the bundle is written, the rest not yet
    loading     the runtime has loaded the new version, warm-up not yet begun
    probation   the new version serves, on probation, not yet committed
    rolling-back  the new version failed probation and that verdict is on disk; it still
                serves, the last good version is not loaded again yet
    rolled-back the last good version serves again; the loop has not heard of it yet
    committing  the new release floor is on disk, the slot record not yet
"""

from __future__ import annotations

import logging
import os
import signal
import sys

ENV = "EDGE_FAILPOINTS"  # not EDGE_AGENT_*: those are config overrides
NAMES = frozenset(
    {"verifying", "unpacking", "loading", "probation", "rolling-back", "rolled-back", "committing"}
)

_ARMED = frozenset(n.strip() for n in os.environ.get(ENV, "").split(",") if n.strip())
if _ARMED - NAMES:  # a typo would arm nothing, and the test that set it would prove nothing
    print(
        f"{ENV}: unknown failpoints {sorted(_ARMED - NAMES)}; known: {sorted(NAMES)}",
        file=sys.stderr,
    )

log = logging.getLogger("agent")


def failpoint(name: str) -> None:
    """Die at once (SIGKILL: no cleanup, no flush) when ``name`` is armed."""
    assert name in NAMES, name
    if name in _ARMED:
        log.critical("failpoint %s: killing the process", name)
        os.kill(os.getpid(), signal.SIGKILL)
