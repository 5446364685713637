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

:class:`InferenceStatistics` keeps per model version what Triton's statistics extension reports
(``GET /v2/models/stats``): request counts and cumulative nanoseconds by phase, and by batch size.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

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


# -- per-model statistics (Triton's statistics extension) ------------------------------------


# Indexes into _VersionStats.ns and a batch's row: one list of integers each, so that recording a
# request is a few additions under the lock (it runs once per request).
SUCCESS, QUEUE, INPUT, INFER, OUTPUT = range(5)


@dataclass
class _VersionStats:
    last_inference_ms: int = 0
    inference_count: int = 0  # successful inferences, each row of a batch counted
    execution_count: int = 0  # successful runs of the model (also the count of each duration)
    ns: list[int] = field(default_factory=lambda: [0] * 5)  # summed durations (see the indexes)
    fail_count: int = 0
    fail_ns: int = 0
    batches: dict[int, list[int]] = field(default_factory=dict)  # size -> [count, in, infer, out]


def _duration(count: int, ns: int) -> dict[str, int]:
    return {"count": count, "ns": ns}


class InferenceStatistics:
    """Per (model, version): what Triton's ``model_stats`` entries say (any thread; own lock).

    Only the last ``keep_versions`` versions of each model are kept, so a box that swaps for
    months holds a bounded amount. ``batch`` is the number of inferences one request carried
    (its batch size for a batched model, else 1); batch sizes are bounded by the API's
    ``max_batch_size``, so the per-batch table is too.
    """

    def __init__(self, keep_versions: int = 4) -> None:
        self._lock = threading.Lock()
        self._keep = keep_versions
        self._stats: dict[tuple[str, str], _VersionStats] = {}

    def _entry(self, model: str, version: str) -> _VersionStats:  # called with the lock held
        key = (model, version)
        entry = self._stats.get(key)
        if entry is None:
            entry = self._stats[key] = _VersionStats()
            versions = [k for k in self._stats if k[0] == model]
            for old in versions[: max(0, len(versions) - self._keep)]:
                del self._stats[old]  # dicts keep insertion order: the oldest first
        return entry

    def record_success(
        self,
        model: str,
        version: str,
        *,
        batch: int,
        queue: int,
        compute_input: int,
        compute_infer: int,
        compute_output: int,
        now_ms: int,
    ) -> None:
        """One request answered: its rows (``batch``) and where its time went, in ns
        (``time.perf_counter_ns`` differences)."""
        with self._lock:
            e = self._stats.get((model, version)) or self._entry(model, version)
            e.last_inference_ms = now_ms
            e.inference_count += batch
            e.execution_count += 1
            ns = e.ns
            ns[SUCCESS] += queue + compute_input + compute_infer + compute_output
            ns[QUEUE] += queue
            ns[INPUT] += compute_input
            ns[INFER] += compute_infer
            ns[OUTPUT] += compute_output
            row = e.batches.get(batch)
            if row is None:
                row = e.batches[batch] = [0, 0, 0, 0]
            row[0] += 1
            row[1] += compute_input
            row[2] += compute_infer
            row[3] += compute_output

    def record_failure(self, model: str, version: str, *, total_ns: int, now_ms: int) -> None:
        with self._lock:
            e = self._entry(model, version)
            e.last_inference_ms = now_ms
            e.fail_count += 1
            e.fail_ns += max(0, total_ns)

    def model_stats(self, model: str, version: str) -> dict[str, Any]:
        """One entry of Triton's ``model_stats`` list (zeros for a version not used yet)."""
        with self._lock:
            e = self._stats.get((model, version)) or _VersionStats()
            n, ns = e.execution_count, e.ns
            return {
                "name": model,
                "version": version,
                "last_inference": e.last_inference_ms,
                "inference_count": e.inference_count,
                "execution_count": n,
                "inference_stats": {
                    "success": _duration(n, ns[SUCCESS]),
                    "fail": _duration(e.fail_count, e.fail_ns),
                    "queue": _duration(n, ns[QUEUE]),
                    "compute_input": _duration(n, ns[INPUT]),
                    "compute_infer": _duration(n, ns[INFER]),
                    "compute_output": _duration(n, ns[OUTPUT]),
                    "cache_hit": _duration(0, 0),  # no response cache here
                    "cache_miss": _duration(0, 0),
                },
                "batch_stats": [
                    {
                        "batch_size": size,
                        "compute_input": _duration(row[0], row[1]),
                        "compute_infer": _duration(row[0], row[2]),
                        "compute_output": _duration(row[0], row[3]),
                    }
                    for size, row in sorted(e.batches.items())
                ],
                "memory_usage": [],
            }
