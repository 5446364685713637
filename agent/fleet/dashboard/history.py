"""Telemetry over the last hour, per device and metric, in memory and bounded.

Each series holds at most ``points`` values, one per ``window_s / points`` seconds (a newer
value in the same slot replaces the older one), so an hour of telemetry every second costs the
same as an hour of telemetry every ten. Only the metrics a chart shows are kept
(:data:`CHARTED`), at most ``series`` per device and ``devices`` devices; the fleet's clock
stamps the points (a device's clock may be wrong), and points older than the window go.

Worst case: ``devices * series * points * 16`` bytes: 118 MiB with the defaults (1000 devices,
32 series, 240 points of 15 s); a device with one model reports about ten charted series.
"""

from __future__ import annotations

import re
import threading
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Mapping

# The metrics a chart shows (agent.transport.messages.METRICS names them all).
CHARTED = re.compile(
    r"^(cpu\.percent|mem\.percent|mem\.used_mb|proc\.rss_mb|proc\.cpu_percent"
    r"|gpu\d+\.(util_pct|mem_used_mb|temp_c)|jetson\.gpu_util_pct|temp\.[A-Za-z0-9_-]+_c"
    r"|model\.[A-Za-z0-9_-]+\.(rps|errors_per_s|p50_ms|p99_ms))$"
)


class _Series:
    __slots__ = ("t", "v")

    def __init__(self) -> None:
        self.t = array("d")
        self.v = array("d")


class History:
    """Charted telemetry of the last ``window_s`` seconds; see the module docstring."""

    def __init__(
        self,
        *,
        window_s: float = 3600.0,
        points: int = 240,
        series: int = 32,
        devices: int = 1000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if window_s <= 0 or points < 2 or series < 1 or devices < 1:
            raise ValueError("history bounds must be positive")
        self.window_s = window_s
        self.points = points
        self.slot_s = window_s / points
        self.max_series = series
        self.max_devices = devices
        self.clock = clock
        self._lock = threading.Lock()
        # device -> metric -> series; least recently reporting device first
        self._data: OrderedDict[str, dict[str, _Series]] = OrderedDict()

    def add(self, device: str, metrics: Mapping[str, float], at: float | None = None) -> None:
        """Record one telemetry message of ``device`` (stamped now unless ``at``)."""
        now = self.clock() if at is None else at
        with self._lock:
            per = self._data.get(device)
            if per is None:
                per = self._data[device] = {}
                while len(self._data) > self.max_devices:
                    self._data.popitem(last=False)
            else:
                self._data.move_to_end(device)
            for name, value in metrics.items():
                if not CHARTED.match(name) or value != value:  # NaN: nothing to draw
                    continue
                s = per.get(name)
                if s is None:
                    if len(per) >= self.max_series:
                        continue
                    s = per[name] = _Series()
                if s.t and int(s.t[-1] // self.slot_s) == int(now // self.slot_s):
                    s.t[-1], s.v[-1] = now, float(value)
                else:
                    s.t.append(now)
                    s.v.append(float(value))
                self._trim(s, now)

    def _trim(self, s: _Series, now: float) -> None:
        cut = 0
        while cut < len(s.t) and (now - s.t[cut] > self.window_s or len(s.t) - cut > self.points):
            cut += 1
        if cut:
            del s.t[:cut]
            del s.v[:cut]

    def series(self, device: str) -> dict[str, list[tuple[float, float]]]:
        """Every charted series of ``device`` within the window: metric -> [(time, value)]."""
        now = self.clock()
        with self._lock:
            per = self._data.get(device, {})
            out = {}
            for name, s in sorted(per.items()):
                self._trim(s, now)
                if s.t:
                    out[name] = list(zip(s.t, s.v, strict=True))
            return out

    def size(self) -> tuple[int, int, int]:
        """Devices, series and points held now (for tests and for the page's footer)."""
        with self._lock:
            series = [s for per in self._data.values() for s in per.values()]
            return len(self._data), len(series), sum(len(s.t) for s in series)
