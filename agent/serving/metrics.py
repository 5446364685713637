"""Prometheus metrics of the inference API and the model slots (text exposition format 0.0.4).

A few counters, gauges and one histogram, kept in memory and rendered on ``GET /metrics``; no
client library. One :class:`ApiMetrics` is shared by the API (which counts requests) and the slot
layer (which counts swaps and rollbacks through :meth:`ApiMetrics.on_swap`).

Threads: every method may be called from any thread (the API's event loop, its workers, a slot's
worker thread); one lock guards all values.

Series (``model`` is ``_unknown`` for a name the source does not know, so a client cannot grow
the label set):

* ``edge_agent_inference_requests_total{model,outcome}``: every inference request, by outcome:
  ``success``, ``bad_request`` (400, 413, 415), ``unauthorized``, ``not_found``, ``rejected``
  (503: queue full, memory, model not ready), ``error`` (500).
* ``edge_agent_inference_errors_total{model,reason}``: the unsuccessful ones by finer reason.
* ``edge_agent_inference_duration_seconds{model}``: histogram of the time from admission to the
  answer, for requests that ran on a worker.
* ``edge_agent_inference_queue_depth``, ``edge_agent_inference_queue_capacity``: admitted
  requests not yet answered, and how many may be.
* ``edge_agent_memory_used_ratio``: the last memory reading admission control made.
* ``edge_agent_model_active{model,version,platform}``: 1 for each model's active version (read
  from the source at scrape time).
* ``edge_agent_model_swaps_total{model}``, ``edge_agent_model_rollbacks_total{model}``.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
UNKNOWN_MODEL = "_unknown"

DEFAULT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

Labels = tuple[str, ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


class _Family:
    kind = "untyped"

    def __init__(self, lock: threading.Lock, name: str, help: str, labels: Sequence[str]) -> None:
        self._lock = lock
        self.name = name
        self.help = help
        self.labelnames = tuple(labels)

    def _key(self, values: Sequence[str]) -> Labels:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {tuple(values)}")
        return tuple(values)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

    def lines(self) -> list[str]:  # called with the lock held
        raise NotImplementedError


class Counter(_Family):
    kind = "counter"

    def __init__(self, lock: threading.Lock, name: str, help: str, labels: Sequence[str]) -> None:
        super().__init__(lock, name, help, labels)
        self._values: dict[Labels, float] = {}

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, *labels: str) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def lines(self) -> list[str]:
        return [
            f"{self.name}{_labels(self.labelnames, k)} {_number(v)}"
            for k, v in sorted(self._values.items())
        ]


class Gauge(Counter):
    kind = "gauge"

    def set(self, *labels: str, value: float) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = value


class Histogram(_Family):
    kind = "histogram"

    def __init__(
        self,
        lock: threading.Lock,
        name: str,
        help: str,
        labels: Sequence[str],
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> None:
        super().__init__(lock, name, help, labels)
        self.buckets = tuple(sorted(buckets))
        self._counts: dict[Labels, list[int]] = {}  # per bucket, not cumulative; last is +Inf
        self._sums: dict[Labels, float] = {}

    def observe(self, *labels: str, value: float) -> None:
        key = self._key(labels)
        index = next((i for i, b in enumerate(self.buckets) if value <= b), len(self.buckets))
        with self._lock:
            counts = self._counts.setdefault(key, [0] * (len(self.buckets) + 1))
            counts[index] += 1
            self._sums[key] = self._sums.get(key, 0.0) + value

    def count(self, *labels: str) -> int:
        with self._lock:
            return sum(self._counts.get(self._key(labels), []))

    def lines(self) -> list[str]:
        out = []
        for key, counts in sorted(self._counts.items()):
            total = 0
            for bound, n in zip([*self.buckets, math.inf], counts, strict=True):
                total += n
                le = f'le="{_number(bound)}"'
                out.append(f"{self.name}_bucket{_labels(self.labelnames, key, le)} {total}")
            out.append(f"{self.name}_sum{_labels(self.labelnames, key)} {_number(self._sums[key])}")
            out.append(f"{self.name}_count{_labels(self.labelnames, key)} {total}")
        return out


class ApiMetrics:
    """The API's and the slot layer's metrics; :meth:`render` writes them out."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        lock = self._lock
        self.requests = Counter(
            lock,
            "edge_agent_inference_requests_total",
            "Inference requests by model and outcome.",
            ("model", "outcome"),
        )
        self.errors = Counter(
            lock,
            "edge_agent_inference_errors_total",
            "Inference requests that did not succeed, by model and reason.",
            ("model", "reason"),
        )
        self.duration = Histogram(
            lock,
            "edge_agent_inference_duration_seconds",
            "Time from admission to the answer, for requests that ran on a worker.",
            ("model",),
        )
        self.queue_depth = Gauge(
            lock,
            "edge_agent_inference_queue_depth",
            "Admitted inference requests not yet answered.",
            (),
        )
        self.queue_capacity = Gauge(
            lock,
            "edge_agent_inference_queue_capacity",
            "How many inference requests may be admitted at once (workers plus queue).",
            (),
        )
        self.memory_used = Gauge(
            lock,
            "edge_agent_memory_used_ratio",
            "Fraction of memory in use at the last admission check (RAM or the cgroup limit).",
            (),
        )
        self.swaps = Counter(
            lock,
            "edge_agent_model_swaps_total",
            "Times a new version of the model became active.",
            ("model",),
        )
        self.rollbacks = Counter(
            lock,
            "edge_agent_model_rollbacks_total",
            "Times the model was rolled back to its last good version.",
            ("model",),
        )
        self._active = _ActiveGauge(
            lock,
            "edge_agent_model_active",
            "1 for the active version of each model.",
            ("model", "version", "platform"),
        )
        self._families: list[_Family] = [
            self.requests,
            self.errors,
            self.duration,
            self.queue_depth,
            self.queue_capacity,
            self.memory_used,
            self._active,
            self.swaps,
            self.rollbacks,
        ]

    # -- called by the slot layer ---------------------------------------------------------
    def record_swap(self, model: str) -> None:
        self.swaps.inc(model)

    def record_rollback(self, model: str) -> None:
        self.rollbacks.inc(model)

    def on_swap(self, model: str, version: str, rolled_back: bool) -> None:
        """The ``SlotManager(on_swap=...)`` callback: a swap, or a swap back on a rollback."""
        self.record_swap(model)
        if rolled_back:
            self.record_rollback(model)

    # -- called by the API ----------------------------------------------------------------
    def record_request(
        self, model: str, outcome: str, reason: str | None = None, seconds: float | None = None
    ) -> None:
        self.requests.inc(model, outcome)
        if reason is not None:
            self.errors.inc(model, reason)
        if seconds is not None:
            self.duration.observe(model, value=seconds)

    def render(self, active: Iterable[tuple[str, str, str]] = ()) -> str:
        """The exposition text; ``active`` lists (model, version, platform) of active versions."""
        snapshot = sorted(set(active))
        with self._lock:
            self._active.replace(snapshot)
            lines: list[str] = []
            for family in self._families:
                lines += family.header()
                lines += family.lines()
        return "\n".join(lines) + "\n"


class _ActiveGauge(Gauge):
    def replace(self, active: Iterable[Labels]) -> None:  # called with the lock held
        self._values = {key: 1.0 for key in active}
