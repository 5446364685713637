"""Which bundle variant and backend to run on this box.

:func:`choose` picks a variant of a bundle and the backend that runs it, by a default order that
:class:`ChoicePolicy` (config) can override, and says why: for the chosen variant, and for each
other one why it was skipped or ranked lower. :func:`check_memory` refuses a variant whose
``min_memory_mb`` exceeds the free GPU memory or available RAM, before anything is loaded. Both
take the :class:`~agent.runtime.probe.HostProfile` that :func:`agent.runtime.probe.probe` returns.

Default order, best first:

1. where it runs: an NVIDIA GPU or Jetson (ONNX Runtime with the CUDA or TensorRT provider), an
   Intel GPU, an Intel NPU (OpenVINO, device AUTO), then the CPU;
2. the format: on Intel boxes with OpenVINO installed ``openvino-ir`` before ``onnx``, elsewhere
   ``onnx`` before ``openvino-ir``; ``tflite`` last (it is what a small CPU box without ONNX Runtime
   runs);
3. the precision: fp16 on GPUs and NPUs, fp32 on the CPU; int8 last unless the policy prefers it
   (dynamic int8 trades accuracy for speed, a choice for the fleet manager to make);
4. the order of the variants in the bundle.

Everything here is pure and runs on the caller's thread.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator

from agent.bundle.manifest import Manifest, Variant
from agent.errors import BadContentError, EdgeAgentError, InsufficientMemoryError
from agent.runtime.base import (
    REGISTRY,
    AnySettings,
    LiteRtSettings,
    OnnxRuntimeSettings,
    OpenVinoSettings,
    default_settings,
    get_backend,
)
from agent.runtime.probe import HostProfile

Format = Literal["onnx", "openvino-ir", "tflite"]

# The backend that runs each format unless the policy names another.
FORMAT_BACKENDS: Mapping[str, str] = {
    "onnx": "onnxruntime",
    "openvino-ir": "openvino",
    "tflite": "litert",
}


# -- the choice ---------------------------------------------------------------------------------
class ChoicePolicy(BaseModel):
    """How config overrides the default choice (``[runtime.policy]`` in agent.toml)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Variant ids, formats or precisions, best first; a variant matching one of them is chosen
    # before any that matches none (among those that fit the box).
    prefer: list[str] = []
    # Variant ids, formats or precisions never to run here.
    forbid: list[str] = []
    # The backend for a format, where it is not the default (onnx: onnxruntime, openvino-ir:
    # openvino, tflite: litert); e.g. {"onnx" = "openvino"} runs ONNX variants on OpenVINO.
    backends: dict[Format, str] = {}
    # Rank int8 variants first rather than last.
    prefer_int8: bool = False

    @field_validator("backends")
    @classmethod
    def _known_backends(cls, value: dict[str, str]) -> dict[str, str]:
        for fmt, key in value.items():
            if key not in REGISTRY:
                raise ValueError(f"no backend {key!r}; known: {', '.join(REGISTRY)}")
            if fmt not in get_backend(key).formats:
                raise ValueError(f"backend {key} does not run {fmt} models")
        return value

    def backend_for(self, fmt: str) -> str:
        chosen: str | None = self.backends.get(fmt)  # type: ignore[call-overload]
        return chosen or FORMAT_BACKENDS[fmt]


class RuntimeConfig(BaseModel):
    """A ``[runtime]`` table for agent.toml: the choice policy and each backend's settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: ChoicePolicy = ChoicePolicy()
    onnxruntime: OnnxRuntimeSettings = OnnxRuntimeSettings()
    openvino: OpenVinoSettings = OpenVinoSettings()
    litert: LiteRtSettings = LiteRtSettings()

    def settings_for(self, backend: str) -> AnySettings:
        """The settings to pass to ``get_backend(backend).load``."""
        settings: AnySettings = getattr(self, backend, None) or default_settings(backend)
        return settings


class Choice(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    variant_id: str
    backend: str  # a REGISTRY key
    accelerator: str  # where it is expected to run: cpu, nvidia-gpu, jetson, intel-gpu, intel-npu
    reasons: list[str]  # why this variant
    skipped: dict[str, str]  # every other variant -> why not

    def lines(self) -> list[str]:
        out = [f"choice        {self.variant_id} with {self.backend} on {self.accelerator}"]
        out.extend(f"  because     {r}" for r in self.reasons)
        out.extend(f"  not {v:<9} {why}" for v, why in self.skipped.items())
        return out


_TARGET_RANK = {"jetson": 0, "nvidia-gpu": 0, "intel-gpu": 1, "intel-npu": 2, "cpu": 3}
_PRECISION_RANK = {
    "accelerator": {"fp16": 0, "mixed": 1, "fp32": 2, "bf16": 3, "int8": 4},
    "cpu": {"fp32": 0, "mixed": 1, "bf16": 2, "fp16": 3, "int8": 4},
}


def _version(cc: str) -> tuple[int, ...]:
    return tuple(int(p) for p in cc.split("."))


def _target(variant: Variant, backend: str, profile: HostProfile) -> str:
    """Where ``backend`` would run ``variant`` on this box."""
    allowed = variant.constraints.accelerators

    def ok(acc: str) -> bool:
        return not allowed or acc in allowed

    if backend == "onnxruntime" and variant.precision != "int8" and profile.cuda_providers:
        if profile.jetson and ok("jetson"):
            return "jetson"
        if profile.nvidia_gpus and ok("nvidia-gpu"):
            return "nvidia-gpu"
    if backend == "openvino":
        for acc in ("intel-gpu", "intel-npu"):
            if acc in profile.accelerators and ok(acc):
                return acc
    return "cpu"


def _compute(target: str, profile: HostProfile) -> str | None:
    if target == "jetson" and profile.jetson:
        return profile.jetson.compute_capability
    if target == "nvidia-gpu" and profile.nvidia_gpus:
        return profile.nvidia_gpus[0].compute_capability
    return None


def _budget(target: str, profile: HostProfile) -> tuple[int, str]:
    """(free MB, what that memory is) where the variant would run."""
    if target == "nvidia-gpu" and profile.nvidia_gpus:
        gpu = profile.nvidia_gpus[0]  # device 0: the one ONNX Runtime's providers use
        return gpu.memory_free_mb, f"GPU memory free on {gpu.name}"
    if target == "jetson":
        return profile.memory_available_mb, "RAM available (shared with the GPU)"
    return profile.memory_available_mb, "RAM available"


def _matches(entry: str, variant: Variant) -> bool:
    return entry in (variant.id, variant.format, variant.precision)


def _misfit(
    variant: Variant, backend: str, target: str, profile: HostProfile, policy: ChoicePolicy
) -> tuple[str, bool] | None:
    """Why ``variant`` cannot run here (and whether memory is the reason), or None."""
    c = variant.constraints
    banned = next((e for e in policy.forbid if _matches(e, variant)), None)
    if banned is not None:
        return f"forbidden by the policy (forbid: {banned})", False
    if c.architectures and profile.architecture not in c.architectures:
        return f"built for {', '.join(c.architectures)}; this box is {profile.architecture}", False
    if not profile.installed(backend):
        return f"needs {backend}, which is not installed", False
    if variant.format not in get_backend(backend).formats:
        return f"{backend} does not run {variant.format} models", False
    if c.accelerators and target not in c.accelerators:
        return (
            f"built for {', '.join(c.accelerators)}; with {backend} it would run on {target} here",
            False,
        )
    if c.min_cuda_compute:
        have = _compute(target, profile)
        if target not in ("nvidia-gpu", "jetson"):
            return (
                f"needs a CUDA GPU (compute {c.min_cuda_compute}); it would run on {target}",
                False,
            )
        if have is None or _version(have) < _version(c.min_cuda_compute):
            return (
                f"needs CUDA compute capability {c.min_cuda_compute}; this GPU has "
                f"{have or 'unknown'}",
                False,
            )
    free, what = _budget(target, profile)
    if c.min_memory_mb > free:
        return f"needs {c.min_memory_mb} MB; {free} MB of {what}", True
    return None


def check_memory(variant: Variant, profile: HostProfile, backend: str | None = None) -> None:
    """Refuse, before loading, a variant that needs more memory than is free where it would run
    (GPU memory on an NVIDIA GPU, else available RAM). Pass a fresh :func:`refresh_memory`."""
    backend = backend or FORMAT_BACKENDS[variant.format]
    target = _target(variant, backend, profile)
    free, what = _budget(target, profile)
    need = variant.constraints.min_memory_mb
    if need > free:
        raise InsufficientMemoryError(
            f"variant {variant.id} needs {need} MB; only {free} MB of {what}"
        )


@dataclass(frozen=True)
class _Candidate:
    variant: Variant
    backend: str
    target: str
    key: tuple[int, ...]


def _format_order(profile: HostProfile) -> tuple[list[str], str]:
    if profile.intel and profile.installed("openvino"):
        return ["openvino-ir", "onnx", "tflite"], "on an Intel box with OpenVINO"
    return ["onnx", "openvino-ir", "tflite"], "where there is no Intel device with OpenVINO"


def _rank(
    variant: Variant,
    index: int,
    target: str,
    profile: HostProfile,
    policy: ChoicePolicy,
) -> tuple[int, ...]:
    """The sort key, best first: policy preference, where it runs, int8 (last unless the policy
    prefers it), format, precision, the bundle's order."""
    prefer = next(
        (i for i, e in enumerate(policy.prefer) if _matches(e, variant)), len(policy.prefer)
    )
    int8 = 1 if variant.precision != "int8" else (0 if policy.prefer_int8 else 2)
    formats, _ = _format_order(profile)
    table = _PRECISION_RANK["cpu" if target == "cpu" else "accelerator"]
    return (
        prefer,
        _TARGET_RANK[target],
        int8,
        formats.index(variant.format),
        table[variant.precision],
        index,
    )


def _where(target: str, backend: str, profile: HostProfile) -> str:
    if target == "nvidia-gpu":
        gpu = profile.nvidia_gpus[0]
        return (
            f"runs on GPU 0, {gpu.name} (compute {gpu.compute_capability or '?'}), "
            f"with {backend} ({', '.join(profile.cuda_providers)})"
        )
    if target == "jetson" and profile.jetson:
        return (
            f"runs on the {profile.jetson.model} GPU with {backend} "
            f"({', '.join(profile.cuda_providers)})"
        )
    if target in ("intel-gpu", "intel-npu"):
        return f"runs on the {target.replace('-', ' ').replace('intel', 'Intel')} with {backend}"
    return f"runs on the CPU with {backend}"


def _step(other: _Candidate, best: _Candidate) -> int:
    """Which part of the sort key put ``best`` before ``other``."""
    return next(i for i, (x, y) in enumerate(zip(other.key, best.key, strict=True)) if x != y)


def _why_lower(
    other: _Candidate, best: _Candidate, profile: HostProfile, policy: ChoicePolicy
) -> str:
    v, b = other.variant, best.variant
    step = _step(other, best)
    if step == 0:
        return f"ranked lower: the policy prefers {policy.prefer[best.key[0]]}"
    if step == 1:
        return f"ranked lower: it would run on {other.target}, {b.id} on {best.target}"
    if step == 2:
        if v.precision == "int8":
            return "ranked lower: int8 is chosen first only when the policy says prefer_int8"
        return "ranked lower: the policy prefers int8"
    if step == 3:
        _, why = _format_order(profile)
        return f"ranked lower: {b.format} comes before {v.format} {why}"
    if step == 4:
        return f"ranked lower: {b.precision} comes before {v.precision} on {other.target}"
    return f"ranked lower: listed after {b.id} in the bundle"


def _why_chosen(best: _Candidate, others: list[_Candidate], profile: HostProfile) -> list[str]:
    """One reason for each part of the sort key that put ``best`` before another variant."""
    v = best.variant
    steps = {_step(o, best) for o in others}
    out = []
    if 2 in steps:
        out.append(
            "int8: the policy prefers int8"
            if v.precision == "int8"
            else "not int8: int8 is chosen first only when the policy says prefer_int8"
        )
    if 3 in steps:
        _, why = _format_order(profile)
        out.append(f"{v.format} comes first {why}")
    if 4 in steps:
        if best.target == "cpu":
            out.append(f"{v.precision}: on the CPU, full precision comes first")
        else:
            out.append(f"{v.precision}: on {best.target}, fp16 comes first")
    if 5 in steps:
        out.append("listed first in the bundle among equals")
    return out


def choose(
    manifest: Manifest,
    profile: HostProfile,
    policy: ChoicePolicy | None = None,
    *,
    variant: str | None = None,
) -> Choice:
    """The variant to run here and its backend, with the reasons.

    ``variant`` is one the deployment names: it is checked against the box, not ranked.
    Raises InsufficientMemoryError when memory is the only reason nothing fits, and
    BadContentError (a bundle for other hardware) when nothing fits for any other reason.
    """
    policy = policy or ChoicePolicy()
    fits: list[_Candidate] = []
    skipped: dict[str, str] = {}
    memory_only = True
    if variant is not None and variant not in [v.id for v in manifest.variants]:
        raise BadContentError(
            f"the deployment names variant {variant!r}; {manifest.name} {manifest.version} has "
            f"{', '.join(v.id for v in manifest.variants)}"
        )
    for index, v in enumerate(manifest.variants):
        backend = policy.backend_for(v.format)
        target = _target(v, backend, profile)
        if variant is not None and v.id != variant:
            skipped[v.id] = f"the deployment names {variant}"
            continue
        misfit = _misfit(v, backend, target, profile, policy)
        if misfit is not None and variant is not None:
            error: type[EdgeAgentError] = InsufficientMemoryError if misfit[1] else BadContentError
            raise error(
                f"variant {variant} of {manifest.name} {manifest.version} cannot run on this box: "
                f"{misfit[0]}"
            )
        if misfit is not None:
            skipped[v.id] = misfit[0]
            memory_only = memory_only and misfit[1]
            continue
        fits.append(_Candidate(v, backend, target, _rank(v, index, target, profile, policy)))
    if not fits:
        why = "; ".join(f"{k}: {r}" for k, r in skipped.items())
        error = InsufficientMemoryError if memory_only else BadContentError
        raise error(f"no variant of {manifest.name} {manifest.version} runs on this box: {why}")
    fits.sort(key=lambda c: c.key)
    best = fits[0]
    v = best.variant
    reasons = []
    if variant is not None:
        reasons.append("the deployment names this variant")
    elif best.key[0] < len(policy.prefer):
        reasons.append(f"the policy prefers {policy.prefer[best.key[0]]}")
    reasons.append(_where(best.target, best.backend, profile))
    reasons.extend(_why_chosen(best, fits[1:], profile))
    free, what = _budget(best.target, profile)
    reasons.append(f"needs {v.constraints.min_memory_mb} MB; {free} MB of {what}")
    for other in fits[1:]:
        skipped[other.variant.id] = _why_lower(other, best, profile, policy)
    order = [x.id for x in manifest.variants if x.id != v.id]
    return Choice(
        variant_id=v.id,
        backend=best.backend,
        accelerator=best.target,
        reasons=reasons,
        skipped={k: skipped[k] for k in order},
    )
