"""Bounded waits: ask until a condition holds, and fail with what was last seen when it never does.

    report = wait_until(lambda: store.get("tiny"), timeout=20, message="tiny never stored")

The condition is asked at least once, and once more after the last sleep before the wait gives
up. Nothing here waits without a bound.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T | None],
    timeout: float,
    interval: float = 0.02,
    message: str | Callable[[], object] = "condition not reached",
) -> T:
    """Call ``predicate`` every ``interval`` seconds until it returns a true value; return that
    (so ``None`` for "not yet" leaves a plain ``T``).

    After ``timeout`` seconds, raise :class:`AssertionError` with ``message`` (a callable is
    called then, for a message drawn from the state at that moment) and the last value.
    ``interval`` 0 suits a predicate that itself blocks for a while (on a queue, say).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            what = message() if callable(message) else message
            raise AssertionError(f"{what} (within {timeout:g} s; last value {value!r})")
        time.sleep(interval)
