"""The hardware probe and the choice of variant, under their old import path.

The probe lives in :mod:`agent.runtime.probe` (:func:`probe`, :class:`HostProfile`) and the choice
in :mod:`agent.runtime.choice` (:func:`choose`, :class:`RuntimeConfig`); new code imports from
those. This module only re-exports them.
"""

from __future__ import annotations

from agent.runtime.choice import (
    FORMAT_BACKENDS,
    Choice,
    ChoicePolicy,
    Format,
    RuntimeConfig,
    check_memory,
    choose,
)
from agent.runtime.probe import (
    GpuInfo,
    HostProfile,
    JetsonInfo,
    Probes,
    gpu_memory_used,
    nvml_gpus,
    onnxruntime_providers,
    openvino_devices,
    probe,
    probe_isolated,
    refresh_memory,
    runtime_versions,
)

__all__ = [
    "FORMAT_BACKENDS",
    "Choice",
    "ChoicePolicy",
    "Format",
    "GpuInfo",
    "HostProfile",
    "JetsonInfo",
    "Probes",
    "RuntimeConfig",
    "check_memory",
    "choose",
    "gpu_memory_used",
    "nvml_gpus",
    "onnxruntime_providers",
    "openvino_devices",
    "probe",
    "probe_isolated",
    "refresh_memory",
    "runtime_versions",
]
