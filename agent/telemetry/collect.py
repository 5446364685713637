"""Metrics of the box and of the models it serves, as short dotted names with finite float values.

:func:`collect_system` reads the machine: CPU, load, memory, this process, the state directory's
disk, temperatures (psutil's sensors, then the kernel's thermal zones), NVIDIA GPUs through NVML
(``pynvml`` from nvidia-ml-py, when installed) and a Jetson's integrated GPU through sysfs. Each
source is optional: one that is absent or fails is left out, never an error, so a reading on a
bare container is just shorter. :func:`collect_inference` turns per-model counters and latencies
into rates and percentiles between two readings.

Names (what :class:`agent.transport.messages.Telemetry` carries; at most :data:`MAX_METRICS`, each
at most :data:`MAX_NAME` characters; :func:`bounded` enforces both; each with its unit in
:data:`agent.transport.messages.METRICS`, the table docs/protocol.md shows):

* ``cpu.percent``, ``cpu.load1``, ``cpu.load5``, ``cpu.load15``
* ``mem.used_mb``, ``mem.available_mb``, ``mem.percent``
* ``proc.rss_mb``, ``proc.cpu_percent``, ``proc.threads``
* ``disk.state_free_mb``, ``disk.state_used_mb``, ``disk.state_percent``
* ``temp.<sensor>_c``: the hottest reading of each sensor group or thermal zone type
  (``coretemp``, ``k10temp``, ``cpu_thermal``, ``CPU-therm`` ... all read as ``temp.cpu_c``)
* ``gpu<i>.util_pct``, ``gpu<i>.mem_used_mb``, ``gpu<i>.mem_total_mb``, ``gpu<i>.temp_c`` (NVML)
* ``jetson.gpu_util_pct`` (``/sys/devices/.../gpu.0/load``, per mille in the kernel)
* ``model.<name>.rps``, ``model.<name>.errors_per_s``, ``model.<name>.requests``,
  ``model.<name>.errors``, ``model.<name>.p50_ms``, ``model.<name>.p99_ms``

Threads: :func:`collect_system` may be called from any thread; the CPU percentages are measured
since the previous call in this process (psutil keeps that state), so the first is 0.
:class:`InferenceCollector` keeps the previous reading and belongs to one thread.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import psutil  # type: ignore[import-untyped]  # no stubs; pyproject has no override for it

log = logging.getLogger("agent.telemetry")

MAX_METRICS = 256
MAX_NAME = 128
MAX_LABEL = 64  # a model or sensor name inside a metric name
MB = 1024 * 1024

# Where a Jetson's integrated GPU reports its load (per mille), relative to the sysfs root:
# Nano/TX2/Xavier (gpu.0), and Orin's ga10b / Xavier's gv11b under platform devices.
JETSON_GPU_LOAD = (
    "devices/gpu.0/load",
    "devices/platform/gpu.0/load",
    "devices/platform/*.ga10b/load",
    "devices/platform/*.gv11b/load",
    "devices/platform/*.gpu/load",
)

# Sensor groups and thermal zone types that mean "the CPU" (x86 hwmon drivers, Raspberry Pi,
# Jetson thermal zones), reported as ``temp.cpu_c``.
_CPU_SENSORS = {"coretemp", "k10temp", "zenpower", "cpu_thermal", "cpu", "soc_thermal", "x86_pkg"}
_THERM_SUFFIX = re.compile(r"[-_]?therm(al)?$", re.IGNORECASE)
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")

_PROCESS_LOCK = threading.Lock()
_PROCESS: psutil.Process | None = None


def label(name: str) -> str:
    """A model or sensor name made safe to sit between dots in a metric name."""
    cleaned = _UNSAFE.sub("_", name).strip("_")[:MAX_LABEL]
    return cleaned or "_"


def sensor_label(name: str) -> str:
    """``CPU-therm``, ``cpu_thermal``, ``coretemp`` -> ``cpu``; others cleaned and lowercased."""
    base = _THERM_SUFFIX.sub("", name.strip()).lower()
    if name.strip().lower() in _CPU_SENSORS or base in _CPU_SENSORS:
        return "cpu"
    return label(base or name.lower())


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


class _Metrics:
    """A dict of metrics that takes only finite numbers and keeps the maximum under one name."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}

    def set(self, name: str, value: Any) -> None:
        number = _finite(value)
        if number is not None:
            self.values[name] = number

    def high(self, name: str, value: Any) -> None:
        number = _finite(value)
        if number is not None and number > self.values.get(name, -math.inf):
            self.values[name] = number


@contextlib.contextmanager
def _source(what: str) -> Iterator[None]:
    """One optional source: an error reading it leaves its metrics out (and is logged once)."""
    try:
        yield
    except Exception as exc:  # any failure of an optional source is non-fatal
        log.debug("telemetry: %s not read: %s", what, exc)


def _process() -> psutil.Process:
    global _PROCESS
    with _PROCESS_LOCK:
        if _PROCESS is None or _PROCESS.pid != os.getpid():
            _PROCESS = psutil.Process()
        return _PROCESS


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return None


def _nvml_module() -> ModuleType | None:
    try:
        return importlib.import_module("pynvml")
    except ImportError:
        return None


def collect_system(
    state_dir: str | Path,
    *,
    sysfs: str | Path = "/sys",
    nvml: ModuleType | Any | None = None,
) -> dict[str, float]:
    """One reading of the box (see the module docstring for the names).

    ``sysfs`` is the root that ``class/thermal`` and the Jetson GPU load are read under (tests
    point it at a tree of their own); ``nvml`` is the ``pynvml`` module (default: imported when
    installed; tests pass a stand-in, as no GPU is here).
    """
    out = _Metrics()
    with _source("cpu"):
        out.set("cpu.percent", psutil.cpu_percent(interval=None))
    with _source("load average"):
        load1, load5, load15 = os.getloadavg()
        out.set("cpu.load1", load1)
        out.set("cpu.load5", load5)
        out.set("cpu.load15", load15)
    with _source("memory"):
        memory = psutil.virtual_memory()
        out.set("mem.used_mb", (memory.total - memory.available) / MB)
        out.set("mem.available_mb", memory.available / MB)
        out.set("mem.percent", memory.percent)
    with _source("process"):
        process = _process()
        with process.oneshot():
            out.set("proc.rss_mb", process.memory_info().rss / MB)
            out.set("proc.cpu_percent", process.cpu_percent(interval=None))
            out.set("proc.threads", process.num_threads())
    with _source("state dir disk"):
        disk = psutil.disk_usage(str(state_dir))
        out.set("disk.state_free_mb", disk.free / MB)
        out.set("disk.state_used_mb", disk.used / MB)
        out.set("disk.state_percent", disk.percent)
    with _source("psutil temperatures"):
        sensors: Callable[[], Mapping[str, Sequence[Any]]] | None = getattr(
            psutil, "sensors_temperatures", None
        )
        for group, readings in (sensors() if sensors is not None else {}).items():
            for reading in readings:
                out.high(f"temp.{sensor_label(group)}_c", reading.current)
    root = Path(sysfs)
    with _source("thermal zones"):
        _thermal_zones(root / "class" / "thermal", out)
    with _source("jetson gpu"):
        _jetson_gpu(root, out)
    with _source("nvml"):
        module = nvml if nvml is not None else _nvml_module()
        if module is not None:
            _nvml(module, out)
    return out.values


def _thermal_zones(thermal: Path, out: _Metrics) -> None:
    if not thermal.is_dir():
        return
    for zone in sorted(thermal.glob("thermal_zone*")):
        kind = _read_text(zone / "type")
        raw = _read_text(zone / "temp")
        value = _finite(raw) if raw is not None else None
        # Millidegrees Celsius; a disabled zone reads an error or a negative sentinel.
        if kind and value is not None and value > -40_000:
            out.high(f"temp.{sensor_label(kind)}_c", value / 1000.0)


def _jetson_gpu(root: Path, out: _Metrics) -> None:
    for pattern in JETSON_GPU_LOAD:
        for path in sorted(root.glob(pattern)):
            raw = _read_text(path)
            value = _finite(raw) if raw is not None else None
            if value is not None:
                out.set("jetson.gpu_util_pct", value / 10.0)  # per mille -> percent
                return


def _nvml(pynvml: Any, out: _Metrics) -> None:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:  # no driver, or no GPU: nothing to report
        log.debug("telemetry: NVML not initialised: %s", exc)
        return
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            with _source(f"gpu{i} utilisation"):
                out.set(f"gpu{i}.util_pct", pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            with _source(f"gpu{i} memory"):
                memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
                out.set(f"gpu{i}.mem_used_mb", memory.used / MB)
                out.set(f"gpu{i}.mem_total_mb", memory.total / MB)
            with _source(f"gpu{i} temperature"):
                out.set(
                    f"gpu{i}.temp_c",
                    pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU),
                )
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


# -- inference ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelStats:
    """What the serving layer counted for one model, since it started (cumulative).

    Latencies come either as recent raw samples (``latencies_s``, e.g. a slot's window) or as a
    cumulative histogram (``buckets``: (upper bound in seconds, cumulative count) in ascending
    order, as Prometheus writes it); with both, the raw samples are used.
    """

    requests: int
    errors: int
    latencies_s: Sequence[float] = ()
    buckets: Sequence[tuple[float, int]] = field(default=())


InferenceSnapshot = Mapping[str, ModelStats]


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest rank, as the slot layer's probation check computes its p99."""
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * q))]


def histogram_quantile(buckets: Sequence[tuple[float, int]], q: float) -> float | None:
    """The ``q`` quantile of a cumulative histogram, interpolated linearly inside its bucket.

    As Prometheus' ``histogram_quantile``: a quantile in the +Inf bucket answers the highest
    finite bound.
    """
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                count - lower_count
            )
        lower_bound, lower_count = bound, count
    return lower_bound


def _bucket_delta(
    now: Sequence[tuple[float, int]], before: Sequence[tuple[float, int]]
) -> Sequence[tuple[float, int]]:
    if [b for b, _ in now] != [b for b, _ in before]:
        return now
    delta = [(b, c - p) for (b, c), (_, p) in zip(now, before, strict=True)]
    return now if any(c < 0 for _, c in delta) else delta  # a counter reset: the whole history


def collect_inference(
    snapshot: InferenceSnapshot,
    previous: InferenceSnapshot | None = None,
    elapsed_s: float | None = None,
) -> dict[str, float]:
    """Per-model metrics from ``snapshot``; rates and histogram percentiles since ``previous``.

    Without ``previous`` (or a positive ``elapsed_s``) there are no rates. A model whose counts
    went down (its serving layer restarted) is read as if ``previous`` had none of it.
    """
    out = _Metrics()
    for model, stats in sorted(snapshot.items()):
        prefix = f"model.{label(model)}"
        out.set(f"{prefix}.requests", stats.requests)
        out.set(f"{prefix}.errors", stats.errors)
        before = previous.get(model) if previous is not None else None
        if before is not None and (
            stats.requests < before.requests or stats.errors < before.errors
        ):
            before = None
        if previous is not None and elapsed_s is not None and elapsed_s > 0:
            out.set(
                f"{prefix}.rps", (stats.requests - (before.requests if before else 0)) / elapsed_s
            )
            out.set(
                f"{prefix}.errors_per_s",
                (stats.errors - (before.errors if before else 0)) / elapsed_s,
            )
        if stats.latencies_s:
            ordered = sorted(stats.latencies_s)
            p50, p99 = percentile(ordered, 0.50), percentile(ordered, 0.99)
        else:
            buckets = stats.buckets
            if before is not None and before.buckets:
                buckets = _bucket_delta(buckets, before.buckets)
            p50, p99 = histogram_quantile(buckets, 0.50), histogram_quantile(buckets, 0.99)
        if p50 is not None:
            out.set(f"{prefix}.p50_ms", p50 * 1000.0)
        if p99 is not None:
            out.set(f"{prefix}.p99_ms", p99 * 1000.0)
    return out.values


class InferenceCollector:
    """Keeps the previous snapshot so each :meth:`collect` gives rates over the interval."""

    def __init__(
        self,
        read: Callable[[], InferenceSnapshot],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._read = read
        self._clock = clock
        self._previous: InferenceSnapshot | None = None
        self._at = 0.0

    def collect(self) -> dict[str, float]:
        snapshot, now = self._read(), self._clock()
        previous, elapsed = self._previous, now - self._at
        self._previous, self._at = snapshot, now
        return collect_inference(snapshot, previous, elapsed if previous is not None else None)


# -- reading the inference API's metrics --------------------------------------------------------

_SAMPLE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)$"
)
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}
REQUESTS_TOTAL = "edge_agent_inference_requests_total"
DURATION_BUCKET = "edge_agent_inference_duration_seconds_bucket"
SUCCESS = "success"
UNKNOWN_MODEL = "_unknown"  # the API's label for names it does not know: not a model


class RendersMetrics(Protocol):
    """What :func:`snapshot_from_metrics` needs: ``agent.serving.metrics.ApiMetrics`` has it."""

    def render(self, active: Iterable[tuple[str, str, str]] = ...) -> str: ...


def _labels(text: str | None) -> dict[str, str]:
    if not text:
        return {}
    return {
        k: re.sub(r"\\[\\\"n]", lambda m: _UNESCAPE[m.group(0)], v) for k, v in _LABEL.findall(text)
    }


def snapshot_from_exposition(text: str) -> dict[str, ModelStats]:
    """Per-model counts and latency histograms from the API's ``/metrics`` text.

    Every request outcome other than ``success`` counts as an error (the API counts a refused
    or bad request there too; the finer reasons stay on ``/metrics``).
    """
    requests: dict[str, int] = {}
    errors: dict[str, int] = {}
    buckets: dict[str, list[tuple[float, int]]] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line.strip())
        if match is None or line.startswith("#"):
            continue
        name, labels = match.group("name"), _labels(match.group("labels"))
        value = _finite(match.group("value").replace("+Inf", "inf"))
        model = labels.get("model")
        if value is None or model is None or model == UNKNOWN_MODEL:
            continue
        if name == REQUESTS_TOTAL:
            requests[model] = requests.get(model, 0) + int(value)
            if labels.get("outcome") != SUCCESS:
                errors[model] = errors.get(model, 0) + int(value)
        elif name == DURATION_BUCKET and "le" in labels:
            bound = float(labels["le"].replace("+Inf", "inf"))
            buckets.setdefault(model, []).append((bound, int(value)))
    return {
        model: ModelStats(
            requests=requests.get(model, 0),
            errors=errors.get(model, 0),
            buckets=tuple(sorted(buckets.get(model, ()))),
        )
        for model in sorted(set(requests) | set(buckets))
    }


def snapshot_from_metrics(metrics: RendersMetrics) -> dict[str, ModelStats]:
    """The adapter for the serving layer's ``ApiMetrics`` (through its public ``render``).

    ``render()`` without the active list leaves the ``model_active`` gauge empty until the next
    ``/metrics`` scrape, which sets it again before it renders: no scrape sees the difference.
    """
    return snapshot_from_exposition(metrics.render())


def bounded(*parts: Mapping[str, float]) -> dict[str, float]:
    """Merge readings into what one Telemetry message may carry.

    Names over :data:`MAX_NAME` characters and non-finite values are left out; beyond
    :data:`MAX_METRICS` names, the later parts' (the per-model ones, given last) are cut,
    in name order, and the cut is logged.
    """
    merged: dict[str, float] = {}
    cut = 0
    for part in parts:
        for name in sorted(part):
            value = part[name]
            if len(name) > MAX_NAME or not math.isfinite(value) or name in merged:
                continue
            if len(merged) >= MAX_METRICS:
                cut += 1
                continue
            merged[name] = float(value)
    if cut:
        log.warning("telemetry: %d metrics over the limit of %d left out", cut, MAX_METRICS)
    return merged
