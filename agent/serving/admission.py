"""Admission control for inference requests: a bounded queue and a memory threshold.

A request is admitted when fewer than ``capacity`` requests (those running on a worker plus
those waiting for one) are in flight and memory use is below the threshold; otherwise the API
answers 503 with Retry-After. Memory use is a fraction in [0, 1] from a :data:`MemoryReader`:

* :class:`SystemMemory` (the default) reads RAM from ``/proc/meminfo`` (``1 - MemAvailable /
  MemTotal``) and, where the agent runs in a cgroup v2 with a memory limit below the RAM size
  (its own ``memory.max`` or an ancestor's), the cgroup's working set (``memory.current`` less
  ``inactive_file``) over that limit. The higher of the two counts.
* GPU memory is the runtime layer's to measure; the API takes an optional reader for it and
  applies the same threshold.

A reader that fails (returns None or raises OSError) admits: admission control sheds load, it
does not stop a box whose /proc is unusual from serving.

Threads: :meth:`Admission.check` and :meth:`Admission.try_acquire` run on the API's event-loop
thread; :meth:`Admission.release` runs on whichever thread finishes the request (a worker).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("agent.serving.api")

MemoryReader = Callable[[], float | None]


def _read_kv(path: Path) -> dict[str, int]:
    """``key value [kB]`` lines (``/proc/meminfo``, ``memory.stat``) as integers."""
    out: dict[str, int] = {}
    for line in path.read_text().splitlines():
        parts = line.replace(":", " ").split()
        if len(parts) >= 2 and parts[1].isdigit():
            out[parts[0]] = int(parts[1]) * (1024 if parts[2:3] == ["kB"] else 1)
    return out


class SystemMemory:
    """Fraction of memory in use: RAM, or the cgroup v2 limit where that is lower.

    Readings are cached for ``ttl_s`` so a burst of requests reads the files once.
    """

    def __init__(
        self,
        *,
        proc: Path = Path("/proc"),
        cgroup_root: Path = Path("/sys/fs/cgroup"),
        ttl_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._proc = proc
        self._cgroup_root = cgroup_root
        self._ttl = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._cached: tuple[float, float | None] | None = None

    def __call__(self) -> float | None:
        now = self._clock()
        with self._lock:
            if self._cached is not None and now - self._cached[0] < self._ttl:
                return self._cached[1]
        value = self.read()
        with self._lock:
            self._cached = (now, value)
        return value

    def read(self) -> float | None:
        """Read the files now (no cache)."""
        try:
            meminfo = _read_kv(self._proc / "meminfo")
            total, available = meminfo["MemTotal"], meminfo["MemAvailable"]
        except (OSError, KeyError, ValueError):
            return None
        if total <= 0:
            return None
        used = 1.0 - available / total
        cgroup = self._cgroup_usage(total)
        return max(used, cgroup) if cgroup is not None else used

    def _cgroup_dir(self) -> Path | None:
        try:
            lines = (self._proc / "self" / "cgroup").read_text().splitlines()
        except OSError:
            return None
        for line in lines:
            if line.startswith("0::"):
                rel = line[3:].strip().lstrip("/")
                return self._cgroup_root / rel if rel else self._cgroup_root
        return None  # cgroup v1 only: RAM alone counts

    def _cgroup_usage(self, ram_total: int) -> float | None:
        own = self._cgroup_dir()
        if own is None:
            return None
        limit: int | None = None
        d = own
        while True:  # the tightest memory.max from the agent's cgroup up to the root
            try:
                text = (d / "memory.max").read_text().strip()
            except OSError:
                text = "max"
            if text.isdigit() and (limit is None or int(text) < limit):
                limit = int(text)
            if d == self._cgroup_root or d.parent == d:
                break
            d = d.parent
        if limit is None or limit <= 0 or limit >= ram_total:
            return None
        try:
            current = int((own / "memory.current").read_text().strip())
            inactive = _read_kv(own / "memory.stat").get("inactive_file", 0)
        except (OSError, ValueError):
            return None
        return max(0, current - inactive) / limit


@dataclass(frozen=True)
class Refusal:
    reason: str  # "queue-full", "memory", "gpu-memory"
    message: str


class Admission:
    """The in-flight count and the memory checks; see the module docstring."""

    def __init__(
        self,
        capacity: int,
        *,
        threshold: float,
        memory: MemoryReader,
        gpu_memory: MemoryReader | None = None,
    ) -> None:
        self.capacity = capacity
        self.threshold = threshold
        self._memory = memory
        self._gpu_memory = gpu_memory
        self._lock = threading.Lock()
        self._in_flight = 0
        self.last_memory: float | None = None

    @property
    def depth(self) -> int:
        with self._lock:
            return self._in_flight

    def check(self) -> Refusal | None:
        """Why a request would be refused now, or None (reserves nothing)."""
        if self.depth >= self.capacity:
            return Refusal("queue-full", f"the inference queue is full ({self.capacity} requests)")
        used = _reading(self._memory, "memory")
        self.last_memory = used
        if used is not None and used >= self.threshold:
            return Refusal(
                "memory", f"memory use {used:.0%} is above the threshold {self.threshold:.0%}"
            )
        if self._gpu_memory is not None:
            gpu = _reading(self._gpu_memory, "GPU memory")
            if gpu is not None and gpu >= self.threshold:
                return Refusal(
                    "gpu-memory",
                    f"GPU memory use {gpu:.0%} is above the threshold {self.threshold:.0%}",
                )
        return None

    def try_acquire(self) -> bool:
        with self._lock:
            if self._in_flight >= self.capacity:
                return False
            self._in_flight += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._in_flight -= 1


def _reading(reader: MemoryReader, what: str) -> float | None:
    try:
        return reader()
    except OSError as exc:
        log.warning("cannot read %s use: %s", what, exc)
        return None
