"""What the device sends upstream besides its retained state: telemetry and events.

Both go through one bounded on-disk queue (:class:`agent.telemetry.StoreQueue`), so what is
recorded while the broker is unreachable is sent after the reconnect, in order; beyond the bound
the oldest go, and the count of what went is kept. One thread of its own (``upstream``) collects
telemetry every ``interval_s`` and drains the queue while connected; it waits for the broker's
acknowledgements, which the daemon's loop must never do.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from agent.serving.metrics import ApiMetrics
from agent.telemetry import (
    Forwarder,
    InferenceCollector,
    ModelStats,
    StoreQueue,
    acked_publish,
    bounded,
    collect_system,
    snapshot_from_metrics,
)
from agent.transport.messages import Telemetry
from agent.transport.session import Session

log = logging.getLogger("agent.telemetry")

RETRY_S = 1.0  # how soon the thread looks again at what waits to be written or sent


class TelemetrySettings(BaseModel):
    """The ``[telemetry]`` table of agent.toml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    interval_s: Annotated[float, Field(ge=1)] = 60.0
    queue_max_mb: Annotated[int, Field(ge=1)] = 16  # kept while the broker is unreachable
    queue_max_items: Annotated[int, Field(ge=10)] = 100_000


class Upstream:
    """The queue, its forwarder and the telemetry clock, on a thread of their own."""

    def __init__(
        self,
        settings: TelemetrySettings,
        *,
        state_dir: Path,
        device_id: str,
        telemetry_topic: str,
        session: Session,
        metrics: ApiMetrics,
        models: Callable[[], Iterable[str]] | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
    ) -> None:
        """``models``: the names of the models that run now (telemetry covers those alone; the
        API's counters keep a removed model's figures)."""
        self.settings = settings
        self.state_dir = state_dir
        self.device_id = device_id
        self.topic = telemetry_topic
        self.queue = StoreQueue(
            state_dir / "upstream.sqlite",
            max_bytes=settings.queue_max_mb << 20,
            max_items=settings.queue_max_items,
        )
        self.forwarder = Forwarder(
            self.queue,
            # Looked up at each call, not bound once: whatever publishes for the session now.
            acked_publish(lambda topic, payload: session.publish(topic, payload), timeout=5.0),
            session.connected.is_set,
        )

        def running() -> dict[str, ModelStats]:
            snapshot = snapshot_from_metrics(metrics)
            if models is None:
                return snapshot
            names = set(models())
            return {name: stats for name, stats in snapshot.items() if name in names}

        self.inference = InferenceCollector(running)
        self._clock = clock
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- any thread -------------------------------------------------------------------------
    def put(self, topic: str, payload: bytes) -> None:
        """Queue one message (an event) and have the thread send it soon."""
        self.queue.put(topic, payload)
        self._wake.set()

    def connected(self) -> None:
        """The session is up again: send what waited."""
        self._wake.set()

    # -- the upstream thread ----------------------------------------------------------------
    def _collect(self) -> None:
        try:
            metrics = bounded(collect_system(self.state_dir), self.inference.collect())
            message = Telemetry(device_id=self.device_id, at=self._clock(), metrics=metrics)
            self.queue.put(self.topic, message.to_bytes())
        except Exception:  # a sensor failing must not stop the thread
            log.exception("collecting telemetry")

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_at:
                self._collect()
                next_at = now + self.settings.interval_s
            try:
                self.forwarder.drain(limit=256)
                self.queue.tick()
            except Exception:
                log.exception("sending telemetry")
            self._wake.wait(self._sleep_s(next_at))
            self._wake.clear()

    def _sleep_s(self, next_at: float) -> float:
        """Until the next collection, or a second while something waits to be written or sent
        (a batch to commit, items the broker did not take); put, connected and stop wake it."""
        left = max(0.0, next_at - time.monotonic())
        busy = self.queue.unwritten() or (len(self.queue) > 0 and self.forwarder.connected())
        return min(RETRY_S, left) if busy else left

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="upstream", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)
        self.queue.close()
