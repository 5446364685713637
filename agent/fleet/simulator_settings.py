"""What a simulated fleet is, for ``edge-fleet simulate`` (:mod:`agent.fleet.simulator` runs it).

The hardware profiles a simulated box can have (:data:`HARDWARE`), what a version's telemetry
says (:class:`VersionMetrics`), the load failures to inject (:class:`LoadFailure`), the settings
of one simulator process (:class:`SimulatorSettings`) and the devices drawn from them
(:func:`device_specs`). Every draw is fixed by the device's id (:func:`device_unit`), so the same
device is the same box, and fails the same way, in every process and every run.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agent import __version__
from agent._strictjson import describe_validation_error
from agent.bundle.limits import BundleLimits
from agent.errors import (
    ConfigError,
    DeploymentInterruptedError,
    EdgeAgentError,
    InsufficientMemoryError,
    LoadTimeoutError,
    ProbationError,
    SelfTestError,
    ToolError,
)
from agent.runtime.probe import GpuInfo, HostProfile, JetsonInfo
from agent.transport.fetch import TransferSettings
from agent.transport.topics import check_id


def device_unit(salt: str, device_id: str) -> float:
    """A number in [0, 1) fixed by ``device_id``: the same device draws the same in every
    process and every run, whichever other devices there are."""
    digest = hashlib.sha256(f"{salt}/{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


# -- hardware -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SimulatedHardware:
    """What a simulated box is, as the hardware probe would find it, and what runs models."""

    probe: HostProfile
    runtimes: dict[str, str]  # backend key -> the runtime string reported for it


_ORT = "onnxruntime 1.20.1"
HARDWARE: dict[str, SimulatedHardware] = {
    "cpu": SimulatedHardware(
        HostProfile(
            architecture="x86_64",
            cpu_vendor="GenuineIntel",
            cpu_model="simulated x86-64 CPU",
            cpu_cores=4,
            cpu_features=["avx2", "fma"],
            memory_total_mb=8192,
            memory_available_mb=6144,
            runtimes={"onnxruntime": "1.20.1"},
            onnxruntime_providers=["CPUExecutionProvider"],
        ),
        {"onnxruntime": f"{_ORT} CPUExecutionProvider"},
    ),
    "jetson": SimulatedHardware(
        HostProfile(
            architecture="aarch64",
            cpu_vendor="ARM",
            cpu_model="simulated ARMv8 (Cortex-A78AE)",
            cpu_cores=8,
            cpu_features=["asimd"],
            memory_total_mb=16384,
            memory_available_mb=12288,
            jetson=JetsonInfo(
                model="NVIDIA Jetson Orin NX 16GB (simulated)",
                l4t="36.4.0",
                compute_capability="8.7",
            ),
            runtimes={"onnxruntime": "1.20.1"},
            onnxruntime_providers=[
                "TensorrtExecutionProvider",
                "CUDAExecutionProvider",
                "CPUExecutionProvider",
            ],
        ),
        {"onnxruntime": f"{_ORT} TensorrtExecutionProvider"},
    ),
    "nvidia-gpu": SimulatedHardware(
        HostProfile(
            architecture="x86_64",
            cpu_vendor="AuthenticAMD",
            cpu_model="simulated x86-64 CPU",
            cpu_cores=8,
            cpu_features=["avx2", "fma"],
            memory_total_mb=32768,
            memory_available_mb=24576,
            nvidia_gpus=[
                GpuInfo(
                    index=0,
                    name="NVIDIA RTX A2000 (simulated)",
                    memory_total_mb=6144,
                    memory_free_mb=5632,
                    compute_capability="8.6",
                )
            ],
            runtimes={"onnxruntime": "1.20.1"},
            onnxruntime_providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
        ),
        {"onnxruntime": f"{_ORT} CUDAExecutionProvider"},
    ),
    "intel-gpu": SimulatedHardware(
        HostProfile(
            architecture="x86_64",
            cpu_vendor="GenuineIntel",
            cpu_model="simulated Intel Core i5",
            cpu_cores=4,
            cpu_features=["avx2", "fma"],
            memory_total_mb=16384,
            memory_available_mb=12288,
            openvino_devices={
                "CPU": "simulated Intel Core i5",
                "GPU.0": "Intel Iris Xe (simulated)",
            },
            runtimes={"onnxruntime": "1.20.1", "openvino": "2024.6"},
            onnxruntime_providers=["CPUExecutionProvider"],
        ),
        {"onnxruntime": f"{_ORT} CPUExecutionProvider", "openvino": "openvino 2024.6 GPU.0 FP16"},
    ),
}


# -- settings -----------------------------------------------------------------------------------
class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VersionMetrics(_Settings):
    """What a model version's telemetry says on every device that runs it."""

    rps: Annotated[float, Field(ge=0)] = 10.0  # requests per second
    error_rate: Annotated[float, Field(ge=0, le=1)] = 0.0  # of those, answered with an error
    p99_ms: Annotated[float, Field(ge=0)] = 25.0


# What an injected load failure raises: errors the agent's slot layer reports for a version
# that did not load (a probation failure: one that served and was rolled back).
FAILURES: dict[str, type[EdgeAgentError]] = {
    e.code: e
    for e in (
        SelfTestError,
        LoadTimeoutError,
        InsufficientMemoryError,
        ToolError,
        DeploymentInterruptedError,
        ProbationError,
    )
}


class LoadFailure(_Settings):
    """Devices that fail to load ``version`` (every version: None) with error ``code``: those
    named in ``devices`` and a ``fraction`` of all, chosen by device id (the same devices in
    every run and whichever process simulates them); with neither, every device. ``times``:
    only the first loads of the version on each device fail (a flaky self-test); None: all."""

    version: Annotated[str, Field(max_length=64)] | None = None
    devices: frozenset[Annotated[str, Field(max_length=64)]] = frozenset()
    fraction: Annotated[float, Field(ge=0, le=1)] | None = None
    code: str = SelfTestError.code
    times: Annotated[int, Field(ge=1)] | None = None

    @field_validator("code")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in FAILURES:
            raise ValueError(f"{value!r} is not one of {', '.join(sorted(FAILURES))}")
        return value

    def hits(self, device_id: str, version: str) -> bool:
        if self.version is not None and self.version != version:
            return False
        if device_id in self.devices:
            return True
        fraction = self.fraction if self.fraction is not None else 0.0 if self.devices else 1.0
        return device_unit("fail", device_id) < fraction


class SimulatorSettings(_Settings):
    """One simulator process: which devices, what they are, how they behave."""

    devices: Annotated[int, Field(ge=1, le=100_000)] = 100
    first: Annotated[int, Field(ge=0)] = 0  # the index of the first device (ids are prefix-NNNNN)
    id_prefix: Annotated[str, Field(max_length=48)] = "sim"
    groups: list[Annotated[str, Field(max_length=64)]] = Field(default=[], max_length=32)
    # Hardware profile (a key of HARDWARE) -> its share of the devices.
    hardware: dict[str, Annotated[float, Field(gt=0)]] = Field(default={"cpu": 1.0}, min_length=1)
    agent_version: Annotated[str, Field(min_length=1, max_length=64)] = __version__
    runtime: Annotated[str, Field(min_length=1, max_length=64)] | None = None  # overrides
    load_s: Annotated[float, Field(ge=0)] = 0.5  # from loading to active
    report_interval_s: Annotated[float, Field(gt=0)] = 1.0
    telemetry_interval_s: Annotated[float, Field(ge=0)] = 10.0  # 0: no telemetry
    # Telemetry by version ("*": every version not named).
    metrics: dict[str, VersionMetrics] = {}
    failures: list[LoadFailure] = []
    transfer: TransferSettings = TransferSettings()
    limits: BundleLimits = BundleLimits()

    @field_validator("hardware")
    @classmethod
    def _profiles(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(value) - set(HARDWARE))
        if unknown:
            raise ValueError(
                f"no hardware profile {', '.join(unknown)} (there are {', '.join(HARDWARE)})"
            )
        return value

    @model_validator(mode="after")
    def _ids(self) -> SimulatorSettings:
        try:
            for group in self.groups:
                check_id(group, "group")
            check_id(device_id(self, self.first + self.devices - 1), "device id")
            check_id(device_id(self, self.first), "device id")
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return self

    def metrics_for(self, version: str) -> VersionMetrics:
        return self.metrics.get(version) or self.metrics.get("*") or VersionMetrics()

    def failure_for(self, device: str, version: str, failed: int) -> LoadFailure | None:
        """The failure for ``device`` loading ``version`` after ``failed`` failed loads of it."""
        for f in self.failures:
            if f.hits(device, version) and (f.times is None or failed < f.times):
                return f
        return None


def device_id(settings: SimulatorSettings, index: int) -> str:
    return f"{settings.id_prefix}-{index:05d}"


@dataclass(frozen=True)
class DeviceSpec:
    """One simulated device: who it is, what it follows, what it is."""

    device_id: str
    groups: tuple[str, ...]
    kind: str  # a key of HARDWARE
    runtime: str | None  # the runtime string it reports (None: the profile's for the backend)
    agent_version: str


def device_specs(settings: SimulatorSettings) -> list[DeviceSpec]:
    """The devices of ``settings``; each one's hardware drawn by its id from the shares."""
    specs = []
    for index in range(settings.first, settings.first + settings.devices):
        ident = device_id(settings, index)
        kind = _draw(settings.hardware, device_unit("hardware", ident))
        specs.append(
            DeviceSpec(
                ident, tuple(settings.groups), kind, settings.runtime, settings.agent_version
            )
        )
    return specs


def _draw(shares: dict[str, float], unit: float) -> str:
    """The key whose share of the whole ``unit`` (in [0, 1)) falls into."""
    point = unit * sum(shares.values())
    for key, share in shares.items():
        if point < share:
            return key
        point -= share
    return next(reversed(shares))  # (rounding)


def make_settings(fields: dict[str, Any]) -> SimulatorSettings:
    """Settings from options; ConfigError names what is wrong."""
    try:
        return SimulatorSettings.model_validate(fields)
    except ValidationError as exc:
        raise ConfigError(f"simulate: {describe_validation_error(exc)}") from None


def version_metrics(
    rps: float, error_rate: dict[str, float], p99_ms: dict[str, float]
) -> dict[str, dict[str, float]]:
    """``metrics`` from per-version error rates and p99s ("*": any other version)."""
    default = VersionMetrics()
    return {
        version: {
            "rps": rps,
            "error_rate": error_rate.get(version, error_rate.get("*", default.error_rate)),
            "p99_ms": p99_ms.get(version, p99_ms.get("*", default.p99_ms)),
        }
        for version in sorted({"*", *error_rate, *p99_ms})
    }
