"""What this box has: the hardware probe.

:func:`probe` reads the hardware: a Jetson (``/etc/nv_tegra_release``, ``/proc/device-tree/model``),
NVIDIA GPUs through NVML (``pynvml`` from nvidia-ml-py, when installed), Intel devices through
OpenVINO (``Core().available_devices``), the CPU (``/proc/cpuinfo``: cores, vendor, instruction
sets), RAM (``/proc/meminfo``, lowered by a cgroup memory limit), and which backends are installed.
Every source is injectable through :class:`Probes` (a root directory for the files, callables for
the libraries), so a Jetson or an NVIDIA box can be described where none exists. The result is a
:class:`HostProfile`; :mod:`agent.runtime.choice` picks a variant and a backend for it.

Everything here runs on the caller's thread; :func:`probe` may take a second (it imports
OpenVINO and ONNX Runtime to ask them for devices), so call it once at start-up and
:func:`refresh_memory` before each load.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import platform
import re
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from agent.errors import ToolError
from agent.runtime.base import REGISTRY, get_backend

_CUDA_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")

# /proc/cpuinfo flags (x86 "flags", Arm "Features") -> the names reported.
_CPU_FEATURES: Mapping[str, tuple[str, ...]] = {
    "avx2": ("avx2",),
    "fma": ("fma",),
    "f16c": ("f16c",),
    "avx512f": ("avx512f",),
    "avx512_bf16": ("avx512_bf16",),
    "avx512_vnni": ("avx512_vnni",),
    "avx_vnni": ("avx_vnni",),
    "amx_tile": ("amx",),
    "amx_bf16": ("amx",),
    "amx_int8": ("amx",),
    "neon": ("neon",),
    "asimd": ("asimd", "neon"),
    "asimdhp": ("fp16",),
    "asimddp": ("dotprod",),
    "i8mm": ("i8mm",),
    "bf16": ("bf16",),
    "sve": ("sve",),
}
_ARM_IMPLEMENTERS = {
    "0x41": "ARM",
    "0x42": "Broadcom",
    "0x48": "HiSilicon",
    "0x4e": "NVIDIA",
    "0x51": "Qualcomm",
    "0x61": "Apple",
}
# Jetson modules by their device-tree model name -> CUDA compute capability.
_JETSON_COMPUTE = (
    ("orin", "8.7"),
    ("xavier", "7.2"),
    ("tx2", "6.2"),
    ("nano", "5.3"),
    ("tx1", "5.3"),
)


# -- the profile --------------------------------------------------------------------------------
class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GpuInfo(_Frozen):
    index: int
    name: str
    memory_total_mb: int
    memory_free_mb: int
    compute_capability: str | None = None  # "8.6"


class JetsonInfo(_Frozen):
    model: str  # "NVIDIA Jetson AGX Orin Developer Kit"
    l4t: str | None = None  # "35.4.1"
    compute_capability: str | None = None


class HostProfile(_Frozen):
    architecture: str  # platform.machine(): x86_64, aarch64, armv7l
    cpu_vendor: str
    cpu_model: str
    cpu_cores: int
    cpu_features: list[str] = []
    memory_total_mb: int
    memory_available_mb: int
    memory_limit_mb: int | None = None  # the cgroup's memory limit, when there is one
    jetson: JetsonInfo | None = None
    nvidia_gpus: list[GpuInfo] = []
    openvino_devices: dict[str, str] = {}  # "GPU.0" -> "Intel(R) Iris(R) Xe Graphics"
    runtimes: dict[str, str | None] = {}  # backend key -> version; None: not installed
    onnxruntime_providers: list[str] = []
    notes: list[str] = []  # probes that found nothing, and why

    @property
    def accelerators(self) -> list[str]:
        """What the box offers, in the manifest's vocabulary (``Constraints.accelerators``)."""
        out = ["cpu"]
        if self.jetson:
            out.append("jetson")
        if self.nvidia_gpus:
            out.append("nvidia-gpu")
        if any(d.split(".")[0] == "GPU" for d in self.openvino_devices):
            out.append("intel-gpu")
        if any(d.split(".")[0] == "NPU" for d in self.openvino_devices):
            out.append("intel-npu")
        return out

    @property
    def cuda_providers(self) -> list[str]:
        """ONNX Runtime's GPU providers on this box (none with the CPU wheel)."""
        return [p for p in self.onnxruntime_providers if p in _CUDA_PROVIDERS]

    @property
    def intel(self) -> bool:
        return (
            self.cpu_vendor == "GenuineIntel"
            or "intel-gpu" in self.accelerators
            or "intel-npu" in self.accelerators
        )

    def installed(self, backend: str) -> bool:
        return self.runtimes.get(backend) is not None

    def details(self) -> dict[str, str]:
        """Short strings for the reported hardware profile."""
        out = {
            "cpu": f"{self.cpu_model} ({', '.join(self.cpu_features) or 'no listed features'})",
            "memory": f"{self.memory_available_mb} of {self.memory_total_mb} MB available",
        }
        if self.jetson:
            out["jetson"] = f"{self.jetson.model} (L4T {self.jetson.l4t or 'unknown'})"
        for gpu in self.nvidia_gpus:
            out[f"gpu{gpu.index}"] = (
                f"{gpu.name} (compute {gpu.compute_capability or '?'}, {gpu.memory_total_mb} MB)"
            )
        if self.openvino_devices:
            out["openvino"] = ", ".join(self.openvino_devices)
        out["runtimes"] = ", ".join(f"{k} {v}" for k, v in self.runtimes.items() if v) or "none"
        return out

    def lines(self) -> list[str]:
        """The profile for people, one fact a line."""
        limit = f", cgroup limit {self.memory_limit_mb} MB" if self.memory_limit_mb else ""
        out = [
            f"cpu           {self.architecture}, {self.cpu_cores} cores, {self.cpu_model} "
            f"({self.cpu_vendor})",
            f"cpu features  {' '.join(self.cpu_features) or 'none of note'}",
            f"memory        {self.memory_total_mb} MB total, {self.memory_available_mb} MB "
            f"available{limit}",
        ]
        if self.jetson:
            out.append(
                f"jetson        {self.jetson.model}, L4T {self.jetson.l4t or 'unknown'}, "
                f"compute {self.jetson.compute_capability or 'unknown'}"
            )
        for gpu in self.nvidia_gpus:
            out.append(
                f"nvidia gpu {gpu.index}  {gpu.name}, compute {gpu.compute_capability or '?'}, "
                f"{gpu.memory_free_mb} of {gpu.memory_total_mb} MB free"
            )
        if self.openvino_devices:
            out.append(
                "openvino      "
                + ", ".join(f"{d} ({n})" if n else d for d, n in self.openvino_devices.items())
            )
        out.append(
            "runtimes      "
            + ", ".join(f"{k} {v or 'not installed'}" for k, v in self.runtimes.items())
        )
        if self.onnxruntime_providers:
            out.append(f"onnxruntime   {', '.join(self.onnxruntime_providers)}")
        out.append(f"accelerators  {', '.join(self.accelerators)}")
        out.extend(f"note          {n}" for n in self.notes)
        return out


# -- probes -------------------------------------------------------------------------------------
def nvml_gpus() -> list[GpuInfo]:
    """NVIDIA GPUs through NVML; ToolError when NVML is not installed or finds no driver."""
    try:
        pynvml = importlib.import_module("pynvml")
    except ImportError:
        raise ToolError("NVIDIA GPUs not probed: nvidia-ml-py (pynvml) is not installed") from None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        raise ToolError(f"NVIDIA GPUs not probed: NVML did not start ({exc})") from None
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            try:
                major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
                compute: str | None = f"{major}.{minor}"
            except pynvml.NVMLError:
                compute = None
            gpus.append(
                GpuInfo(
                    index=i,
                    name=name.decode() if isinstance(name, bytes) else str(name),
                    memory_total_mb=int(memory.total) >> 20,
                    memory_free_mb=int(memory.free) >> 20,
                    compute_capability=compute,
                )
            )
        return gpus
    except pynvml.NVMLError as exc:
        raise ToolError(f"NVIDIA GPUs: NVML failed ({exc})") from None
    finally:
        pynvml.nvmlShutdown()


def openvino_devices() -> dict[str, str]:
    """OpenVINO's devices (``CPU``, ``GPU.0``, ``NPU``) with their full names."""
    if importlib.util.find_spec("openvino") is None:
        raise ToolError("Intel devices not probed: OpenVINO is not installed")
    ov = importlib.import_module("openvino")
    try:
        core = ov.Core()
        out = {}
        for device in core.available_devices:
            try:
                out[device] = str(core.get_property(device, "FULL_DEVICE_NAME"))
            except RuntimeError:
                out[device] = ""
        return out
    except RuntimeError as exc:
        raise ToolError(f"Intel devices: OpenVINO failed ({exc})") from None


def onnxruntime_providers() -> list[str]:
    if importlib.util.find_spec("onnxruntime") is None:
        return []
    providers: list[str] = importlib.import_module("onnxruntime").get_available_providers()
    return providers


def runtime_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for key in REGISTRY:
        backend = get_backend(key)
        out[key] = (backend.version() or "unknown version") if backend.available() else None
    return out


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))  # honours cpusets and taskset
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Probes:
    """Where :func:`probe` looks. Tests point ``root`` at a fake filesystem and replace the
    library probes; a library probe raises ToolError to say why it found nothing."""

    root: Path = Path("/")
    machine: Callable[[], str] = platform.machine
    cpu_count: Callable[[], int] = _cpu_count
    nvml: Callable[[], list[GpuInfo]] = nvml_gpus
    openvino: Callable[[], dict[str, str]] = openvino_devices
    onnxruntime: Callable[[], list[str]] = onnxruntime_providers
    runtimes: Callable[[], dict[str, str | None]] = runtime_versions

    def file(self, path: str) -> Path:
        """``path`` (absolute, as on a real box) below ``root``."""
        return self.root / path.lstrip("/")

    def read(self, path: str | Path) -> str | None:
        try:
            return self.file(str(path)).read_text(errors="replace")
        except OSError:
            return None


def _cpuinfo(text: str) -> tuple[str, str, list[str]]:
    """(vendor, model, features) from /proc/cpuinfo."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip().lower(), value.strip())
    vendor = fields.get("vendor_id") or _ARM_IMPLEMENTERS.get(
        fields.get("cpu implementer", ""), "unknown"
    )
    model = fields.get("model name") or fields.get("hardware") or fields.get("model") or ""
    flags = (fields.get("flags") or fields.get("features") or "").split()
    features = sorted({name for f in flags for name in _CPU_FEATURES.get(f, ())})
    return vendor, model, features


def _meminfo(text: str) -> tuple[int, int]:
    """(total, available) in MB from /proc/meminfo."""
    kb: dict[str, int] = {}
    for line in text.splitlines():
        m = re.match(r"^(\w+):\s+(\d+)", line)
        if m:
            kb[m.group(1)] = int(m.group(2))
    total = kb.get("MemTotal", 0)
    available = kb.get("MemAvailable", kb.get("MemFree", 0))
    return total // 1024, available // 1024


def _cgroup_memory(probes: Probes) -> tuple[int | None, int | None]:
    """(limit, free below the limit) in MB, the tightest over this cgroup and its ancestors.

    cgroup v2 (``memory.max``, ``memory.current``), else the v1 memory controller
    (``memory.limit_in_bytes``, ``memory.usage_in_bytes``). None, None without a limit.
    """
    text = probes.read("/proc/self/cgroup") or "0::/\n"
    # (mount point, this process's cgroup below it, limit file, usage file)
    places: list[tuple[Path, str, str, str]] = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        rel = parts[2].strip().lstrip("/")
        if parts[0] == "0" and parts[1] == "":
            places.append((Path("/sys/fs/cgroup"), rel, "memory.max", "memory.current"))
        elif "memory" in parts[1].split(","):
            places.append(
                (
                    Path("/sys/fs/cgroup/memory"),
                    rel,
                    "memory.limit_in_bytes",
                    "memory.usage_in_bytes",
                )
            )
    limit: int | None = None
    free: int | None = None
    for mount, rel, max_name, current_name in places:
        # The limits of every ancestor apply too; inside a container the path may not exist
        # below the mount, and the container's own limit sits at the mount point.
        leaf = Path(rel) if rel else Path()
        for sub in [leaf, *leaf.parents]:
            directory = mount / sub
            raw = (probes.read(directory / max_name) or "").strip()
            if not raw.isdigit():
                continue  # absent, or "max": no limit at this level
            value = int(raw)
            if value >= 1 << 60:  # v1 writes "no limit" as a page-rounded 2^63
                continue
            used_raw = (probes.read(directory / current_name) or "").strip()
            used = int(used_raw) if used_raw.isdigit() else 0
            mb, free_mb = value >> 20, max(0, value - used) >> 20
            limit = mb if limit is None else min(limit, mb)
            free = free_mb if free is None else min(free, free_mb)
    return limit, free


def _jetson(probes: Probes) -> JetsonInfo | None:
    release = probes.read("/etc/nv_tegra_release")
    model = (probes.read("/proc/device-tree/model") or "").replace("\x00", "").strip()
    if release is None and "jetson" not in model.lower():
        return None
    l4t = None
    if release:
        m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", release)
        if m:
            l4t = f"{m.group(1)}.{m.group(2)}"
    compute = next((cc for key, cc in _JETSON_COMPUTE if key in model.lower()), None)
    return JetsonInfo(model=model or "NVIDIA Jetson", l4t=l4t, compute_capability=compute)


def _memory(probes: Probes) -> tuple[int, int, int | None]:
    total, available = _meminfo(probes.read("/proc/meminfo") or "")
    limit, free = _cgroup_memory(probes)
    if limit is not None and limit < total:
        total_seen = limit
    else:
        total_seen, limit = total, None
    if free is not None:
        available = min(available, free)
    return total_seen, available, limit


def _optional(notes: list[str], fn: Callable[[], object], default: object) -> object:
    try:
        return fn()
    except ToolError as exc:
        notes.append(str(exc))
        return default


def probe(probes: Probes | None = None) -> HostProfile:
    """Describe this box (or the fake one ``probes`` describes)."""
    probes = probes or Probes()
    notes: list[str] = []
    vendor, model, features = _cpuinfo(probes.read("/proc/cpuinfo") or "")
    jetson = _jetson(probes)
    if not model:
        model = (probes.read("/proc/device-tree/model") or "").replace("\x00", "").strip()
    total, available, limit = _memory(probes)
    gpus = _optional(notes, probes.nvml, [])
    devices = _optional(notes, probes.openvino, {})
    return HostProfile(
        architecture=probes.machine() or "unknown",
        cpu_vendor=vendor,
        cpu_model=model or "unknown",
        cpu_cores=max(1, probes.cpu_count()),
        cpu_features=features,
        memory_total_mb=total,
        memory_available_mb=available,
        memory_limit_mb=limit,
        jetson=jetson,
        nvidia_gpus=gpus,  # type: ignore[arg-type]
        openvino_devices=devices,  # type: ignore[arg-type]
        runtimes=probes.runtimes(),
        onnxruntime_providers=probes.onnxruntime(),
        notes=notes,
    )


def probe_isolated(timeout: float = 120.0) -> HostProfile:
    """:func:`probe` in a child process, for the daemon.

    Probing imports OpenVINO (its device list) and ONNX Runtime (its providers); in the daemon
    they would stay mapped for good, some 45 MiB, before any model needs them. The child's
    answer is the same profile; if the child fails, the probe runs here after all.
    """
    code = "from agent.runtime.probe import probe; print(probe().model_dump_json())"
    try:
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, timeout=timeout, check=True
        )
        return HostProfile.model_validate_json(done.stdout.splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        logging.getLogger("agent.runtime").warning(
            "probing in a child failed (%s); probing here", exc
        )
        return probe()


def refresh_memory(profile: HostProfile, probes: Probes | None = None) -> HostProfile:
    """The profile with free RAM and GPU memory read again (call before each load)."""
    probes = probes or Probes()
    total, available, limit = _memory(probes)
    update: dict[str, object] = {
        "memory_total_mb": total,
        "memory_available_mb": available,
        "memory_limit_mb": limit,
    }
    if profile.nvidia_gpus:
        with contextlib.suppress(ToolError):  # on failure, keep the last reading
            update["nvidia_gpus"] = probes.nvml()
    return profile.model_copy(update=update)


def gpu_memory_used(probes: Probes | None = None) -> float | None:
    """The fraction of GPU 0's memory in use (NVML), None where there is no NVIDIA GPU; a
    reader for the serving layer's admission control. Each call starts and stops NVML."""
    try:
        gpus = (probes or Probes()).nvml()
    except ToolError:
        return None
    if not gpus or gpus[0].memory_total_mb <= 0:
        return None
    return 1.0 - gpus[0].memory_free_mb / gpus[0].memory_total_mb
