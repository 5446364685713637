"""The hardware probe, the choice of variant and backend, the memory check, ``edge-agent hardware``.

This machine is an x86 CPU box: no Jetson, no NVIDIA GPU, no NVML (nvidia-ml-py is not installed),
no Intel GPU or NPU. Those cannot exist here, so the tests describe them with fakes, and say so:
a fake root directory holding the files a Jetson has (``/etc/nv_tegra_release``,
``/proc/device-tree/model``, ``/proc/cpuinfo``, ``/proc/meminfo``, cgroup files), a fake ``pynvml``
module for the NVML adapter, and stand-in callables for OpenVINO's device list. The probe of this
machine itself is real.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from agent.bundle.manifest import Constraints, FileEntry, Manifest, Variant
from agent.cli import agent_main
from agent.errors import BadContentError, InsufficientMemoryError, ToolError
from agent.fleet.build import BuildOptions, build_bundle
from agent.runtime.base import LiteRtSettings, OnnxRuntimeSettings, OpenVinoSettings
from agent.runtime.choice import (
    FORMAT_BACKENDS,
    ChoicePolicy,
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
    probe,
    refresh_memory,
)
from agent.testing.models import make_onnx, make_tflite

GiB = 1 << 30
TRT, CUDA, CPU = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
ALL_RUNTIMES = {"onnxruntime": "1.20.1", "openvino": "2024.6.0", "litert": "1.2.0"}

JETSON_CPUINFO = """\
processor\t: 0
model name\t: ARMv8 Processor rev 1 (v8l)
BogoMIPS\t: 62.50
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU architecture: 8

processor\t: 1
model name\t: ARMv8 Processor rev 1 (v8l)
Features\t: fp asimd
CPU implementer\t: 0x41
"""
INTEL_CPUINFO = """\
processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Core(TM) Ultra 7 155H
flags\t\t: fpu sse2 avx fma f16c avx2 avx_vnni avx512f avx512_bf16 amx_tile amx_bf16 amx_int8
"""


def meminfo(total_mb: int, available_mb: int) -> str:
    return (
        f"MemTotal:       {total_mb * 1024} kB\nMemFree:         1000 kB\n"
        f"MemAvailable:   {available_mb * 1024} kB\n"
    )


def fake_root(root: Path, files: dict[str, str | bytes]) -> Path:
    for name, content in files.items():
        path = root / name.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return root


def no_nvml() -> list[GpuInfo]:
    raise ToolError("NVIDIA GPUs not probed: nvidia-ml-py (pynvml) is not installed")


def no_openvino() -> dict[str, str]:
    raise ToolError("Intel devices not probed: OpenVINO is not installed")


def jetson_probes(root: Path) -> Probes:
    """An Orin running JetPack 5 in a systemd service with MemoryMax=4G (faked: no Jetson here)."""
    fake_root(
        root,
        {
            "/etc/nv_tegra_release": "# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64\n",
            "/proc/device-tree/model": b"NVIDIA Jetson AGX Orin Developer Kit\x00",
            "/proc/cpuinfo": JETSON_CPUINFO,
            "/proc/meminfo": meminfo(30_000, 20_000),
            "/proc/self/cgroup": "0::/system.slice/edge-agent.service\n",
            "/sys/fs/cgroup/system.slice/edge-agent.service/memory.max": f"{4 * GiB}\n",
            "/sys/fs/cgroup/system.slice/edge-agent.service/memory.current": f"{1 * GiB}\n",
            "/sys/fs/cgroup/system.slice/memory.max": "max\n",
        },
    )
    return Probes(
        root=root,
        machine=lambda: "aarch64",
        cpu_count=lambda: 12,
        nvml=no_nvml,  # NVML does not work on JetPack 5's integrated GPU
        openvino=no_openvino,
        onnxruntime=lambda: [TRT, CUDA, CPU],
        runtimes=lambda: {"onnxruntime": "1.16.0", "openvino": None, "litert": None},
    )


def test_a_jetson_is_recognised(tmp_path: Path) -> None:
    profile = probe(jetson_probes(tmp_path))
    assert profile.jetson == JetsonInfo(
        model="NVIDIA Jetson AGX Orin Developer Kit", l4t="35.4.1", compute_capability="8.7"
    )
    assert profile.architecture == "aarch64"
    assert profile.cpu_vendor == "ARM"
    assert profile.cpu_cores == 12
    assert profile.cpu_features == ["asimd", "dotprod", "fp16", "neon"]
    # The cgroup limit (4 GiB, 1 GiB used) is below the RAM: it counts.
    assert (profile.memory_total_mb, profile.memory_available_mb) == (4096, 3072)
    assert profile.memory_limit_mb == 4096
    assert profile.accelerators == ["cpu", "jetson"]
    assert profile.cuda_providers == [TRT, CUDA]
    assert profile.notes == [
        "NVIDIA GPUs not probed: nvidia-ml-py (pynvml) is not installed",
        "Intel devices not probed: OpenVINO is not installed",
    ]
    assert "jetson" in profile.details()
    assert any(line.startswith("jetson        NVIDIA Jetson AGX Orin") for line in profile.lines())


def test_jetson_from_the_device_tree_alone(tmp_path: Path) -> None:
    probes = jetson_probes(tmp_path)
    (tmp_path / "etc/nv_tegra_release").unlink()
    (tmp_path / "proc/device-tree/model").write_bytes(b"NVIDIA Jetson Xavier NX Developer Kit\x00")
    jetson = probe(probes).jetson
    assert jetson == JetsonInfo(
        model="NVIDIA Jetson Xavier NX Developer Kit", compute_capability="7.2"
    )


def test_cgroup_limits_v2_ancestors_and_v1(tmp_path: Path) -> None:
    probes = jetson_probes(tmp_path)
    # A tighter limit on an ancestor applies too.
    (tmp_path / "sys/fs/cgroup/system.slice/memory.max").write_text(f"{2 * GiB}\n")
    (tmp_path / "sys/fs/cgroup/system.slice/memory.current").write_text(f"{GiB + GiB // 2}\n")
    profile = probe(probes)
    assert (profile.memory_limit_mb, profile.memory_available_mb) == (2048, 512)
    # cgroup v1: the memory controller's limit_in_bytes; 2^63 rounded to pages means "none".
    v1 = fake_root(
        tmp_path / "v1",
        {
            "/proc/meminfo": meminfo(8000, 6000),
            "/proc/self/cgroup": "4:memory:/docker/abc\n1:cpu:/\n",
            "/sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712\n",
            "/sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes": f"{GiB}\n",
            "/sys/fs/cgroup/memory/docker/abc/memory.usage_in_bytes": f"{GiB // 4}\n",
        },
    )
    profile = probe(Probes(root=v1, nvml=no_nvml, openvino=no_openvino, runtimes=dict))
    assert (profile.memory_total_mb, profile.memory_available_mb, profile.memory_limit_mb) == (
        1024,
        768,
        1024,
    )
    # A limit above the RAM is no limit.
    none = fake_root(
        tmp_path / "none",
        {
            "/proc/meminfo": meminfo(8000, 6000),
            "/sys/fs/cgroup/memory.max": f"{64 * GiB}\n",
        },
    )
    profile = probe(Probes(root=none, nvml=no_nvml, openvino=no_openvino, runtimes=dict))
    assert (profile.memory_total_mb, profile.memory_available_mb, profile.memory_limit_mb) == (
        8000,
        6000,
        None,
    )


class FakeNvml(types.ModuleType):
    """Stands in for pynvml (nvidia-ml-py is not installed and no NVIDIA GPU exists here)."""

    class NVMLError(Exception):
        pass

    def __init__(self, gpus: list[dict[str, Any]], fail_init: bool = False) -> None:
        super().__init__("pynvml")
        self.gpus, self.fail_init, self.open = gpus, fail_init, 0

    def nvmlInit(self) -> None:
        if self.fail_init:
            raise self.NVMLError("Driver Not Loaded")
        self.open += 1

    def nvmlShutdown(self) -> None:
        self.open -= 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> dict[str, Any]:
        return self.gpus[i]

    def nvmlDeviceGetName(self, h: dict[str, Any]) -> Any:
        return h["name"]

    def nvmlDeviceGetMemoryInfo(self, h: dict[str, Any]) -> Any:
        return types.SimpleNamespace(total=h["total"], free=h["free"], used=h["total"] - h["free"])

    def nvmlDeviceGetCudaComputeCapability(self, h: dict[str, Any]) -> tuple[int, int]:
        if h.get("cc") is None:
            raise self.NVMLError("Not Supported")
        return h["cc"]


def test_nvml_adapter(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml(
        [
            {"name": b"NVIDIA RTX A2000 12GB", "total": 12 * GiB, "free": 10 * GiB, "cc": (8, 6)},
            {"name": "Tesla T4", "total": 16 * GiB, "free": 16 * GiB, "cc": None},
        ]
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert nvml_gpus() == [
        GpuInfo(
            index=0,
            name="NVIDIA RTX A2000 12GB",
            memory_total_mb=12288,
            memory_free_mb=10240,
            compute_capability="8.6",
        ),
        GpuInfo(index=1, name="Tesla T4", memory_total_mb=16384, memory_free_mb=16384),
    ]
    assert fake.open == 0  # shut down again
    assert gpu_memory_used() == pytest.approx(2 / 12)
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml([], fail_init=True))
    with pytest.raises(ToolError, match=r"NVML did not start \(Driver Not Loaded\)"):
        nvml_gpus()
    assert gpu_memory_used() is None
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed
    with pytest.raises(ToolError, match="nvidia-ml-py"):
        nvml_gpus()


def test_this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real probe: /proc, OpenVINO's CPU device, the three installed runtimes."""
    monkeypatch.setitem(sys.modules, "pynvml", None)
    profile = probe()
    assert profile.architecture == platform.machine()
    assert profile.cpu_cores >= 1
    assert 0 < profile.memory_available_mb <= profile.memory_total_mb
    assert "CPU" in profile.openvino_devices
    assert all(profile.runtimes[k] for k in ("onnxruntime", "openvino", "litert"))
    assert CPU in profile.onnxruntime_providers
    assert profile.nvidia_gpus == []
    assert any("nvidia-ml-py" in n for n in profile.notes)
    assert "cpu" in profile.accelerators


def test_refresh_memory_reads_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    probes = jetson_probes(tmp_path)
    profile = probe(probes)
    (tmp_path / "sys/fs/cgroup/system.slice/edge-agent.service/memory.current").write_text(
        f"{3 * GiB}\n"
    )
    assert refresh_memory(profile, probes).memory_available_mb == 1024
    assert refresh_memory(profile, probes).jetson == profile.jetson


# -- the choice ---------------------------------------------------------------------------------
def variant(vid: str, fmt: str, precision: str, *, memory: int = 64, **constraints: Any) -> Variant:
    entry = FileEntry(path=f"variants/{vid}/model", size=1, sha256="0" * 64)
    spec = {"name": "x", "datatype": "FP32", "shape": [-1, 16]}
    return Variant(
        id=vid,
        format=fmt,  # type: ignore[arg-type]
        precision=precision,  # type: ignore[arg-type]
        entrypoint=entry.path,
        files=[entry],
        inputs=[spec],  # type: ignore[list-item]
        outputs=[spec],  # type: ignore[list-item]
        constraints=Constraints(min_memory_mb=memory, **constraints),
    )


def bundle(*variants: Variant) -> Manifest:
    return Manifest(
        name="det", version="1.0.0", release=1, block_size=65536, variants=list(variants)
    )


# As `edge-fleet bundle build --quantize int8 --openvino` makes them, plus an fp16 ONNX and a TFLite.
FULL = bundle(
    variant("onnx-fp32", "onnx", "fp32"),
    variant("onnx-fp16", "onnx", "fp16"),
    variant("onnx-int8", "onnx", "int8", accelerators=["cpu"]),
    variant("openvino-fp32", "openvino-ir", "fp32", accelerators=["cpu", "intel-gpu", "intel-npu"]),
    variant("tflite-fp32", "tflite", "fp32", accelerators=["cpu"]),
)


def box(**kw: Any) -> HostProfile:
    base: dict[str, Any] = {
        "architecture": "x86_64",
        "cpu_vendor": "AuthenticAMD",
        "cpu_model": "AMD Ryzen 7",
        "cpu_cores": 8,
        "memory_total_mb": 16000,
        "memory_available_mb": 12000,
        "runtimes": dict(ALL_RUNTIMES),
        "onnxruntime_providers": [CPU],
    }
    base.update(kw)
    return HostProfile(**base)


RTX = GpuInfo(index=0, name="NVIDIA RTX A2000", memory_total_mb=12288, memory_free_mb=10000, compute_capability="8.6")  # fmt: skip
NVIDIA_BOX = box(nvidia_gpus=[RTX], onnxruntime_providers=[TRT, CUDA, CPU])
ORIN = JetsonInfo(model="NVIDIA Jetson Orin Nano", l4t="36.3.0", compute_capability="8.7")
JETSON_BOX = box(architecture="aarch64", cpu_vendor="ARM", jetson=ORIN, onnxruntime_providers=[TRT, CUDA, CPU])  # fmt: skip
INTEL_GPU_BOX = box(cpu_vendor="GenuineIntel", openvino_devices={"CPU": "Intel Core Ultra", "GPU.0": "Intel Arc", "NPU": "Intel AI Boost"})  # fmt: skip
INTEL_CPU_BOX = box(cpu_vendor="GenuineIntel", openvino_devices={"CPU": "Intel Xeon"})
SMALL_ARM = box(architecture="armv7l", cpu_vendor="ARM", cpu_cores=4, memory_total_mb=1000, memory_available_mb=600, runtimes={"onnxruntime": None, "openvino": None, "litert": "1.2.0"}, onnxruntime_providers=[])  # fmt: skip


@pytest.mark.parametrize(
    ("profile", "chosen", "backend", "accelerator"),
    [
        pytest.param(NVIDIA_BOX, "onnx-fp16", "onnxruntime", "nvidia-gpu", id="nvidia"),
        pytest.param(JETSON_BOX, "onnx-fp16", "onnxruntime", "jetson", id="jetson"),
        pytest.param(INTEL_GPU_BOX, "openvino-fp32", "openvino", "intel-gpu", id="intel-gpu"),
        pytest.param(INTEL_CPU_BOX, "openvino-fp32", "openvino", "cpu", id="intel-cpu"),
        pytest.param(box(), "onnx-fp32", "onnxruntime", "cpu", id="amd-cpu"),
        pytest.param(box(nvidia_gpus=[RTX]), "onnx-fp32", "onnxruntime", "cpu", id="nvidia-cpu-wheel"),
        pytest.param(SMALL_ARM, "tflite-fp32", "litert", "cpu", id="small-arm"),
    ],
)  # fmt: skip
def test_default_choice(profile: HostProfile, chosen: str, backend: str, accelerator: str) -> None:
    choice = choose(FULL, profile)
    assert (choice.variant_id, choice.backend, choice.accelerator) == (chosen, backend, accelerator)
    assert set(choice.skipped) == {v.id for v in FULL.variants} - {chosen}
    assert choice.skipped["onnx-int8"]  # every other variant says why not
    assert any(r.startswith("needs 64 MB;") for r in choice.reasons)


def test_reasons_on_an_nvidia_box() -> None:
    choice = choose(FULL, NVIDIA_BOX)
    assert choice.reasons == [
        "runs on GPU 0, NVIDIA RTX A2000 (compute 8.6), with onnxruntime "
        "(TensorrtExecutionProvider, CUDAExecutionProvider)",
        "fp16: on nvidia-gpu, fp16 comes first",
        "needs 64 MB; 10000 MB of GPU memory free on NVIDIA RTX A2000",
    ]
    assert choice.skipped == {
        "onnx-fp32": "ranked lower: fp16 comes before fp32 on nvidia-gpu",
        "onnx-int8": "ranked lower: it would run on cpu, onnx-fp16 on nvidia-gpu",
        "openvino-fp32": "ranked lower: it would run on cpu, onnx-fp16 on nvidia-gpu",
        "tflite-fp32": "ranked lower: it would run on cpu, onnx-fp16 on nvidia-gpu",
    }
    assert choice.lines()[0] == "choice        onnx-fp16 with onnxruntime on nvidia-gpu"


def test_reasons_on_a_small_arm_box() -> None:
    choice = choose(FULL, SMALL_ARM)
    assert choice.skipped == {
        "onnx-fp32": "needs onnxruntime, which is not installed",
        "onnx-fp16": "needs onnxruntime, which is not installed",
        "onnx-int8": "needs onnxruntime, which is not installed",
        "openvino-fp32": "needs openvino, which is not installed",
    }
    assert choice.reasons == ["runs on the CPU with litert", "needs 64 MB; 600 MB of RAM available"]
    # On an AMD CPU box with every runtime: ONNX first, fp32 first, int8 last.
    assert choose(FULL, box()).reasons == [
        "runs on the CPU with onnxruntime",
        "not int8: int8 is chosen first only when the policy says prefer_int8",
        "onnx comes first where there is no Intel device with OpenVINO",
        "fp32: on the CPU, full precision comes first",
        "needs 64 MB; 12000 MB of RAM available",
    ]
    assert choose(FULL, INTEL_CPU_BOX).reasons[2] == (
        "openvino-ir comes first on an Intel box with OpenVINO"
    )


def test_int8_only_when_the_policy_says_so() -> None:
    cpu = box()
    assert (
        "ranked lower: int8 is chosen first only when the policy says prefer_int8"
        in (choose(bundle(FULL.variants[0], FULL.variants[2]), cpu).skipped["onnx-int8"])
    )
    choice = choose(FULL, cpu, ChoicePolicy(prefer_int8=True))
    assert choice.variant_id == "onnx-int8"
    assert "int8: the policy prefers int8" in choice.reasons
    # On a GPU box the int8 variant (CPU only) still loses to the GPU.
    assert choose(FULL, NVIDIA_BOX, ChoicePolicy(prefer_int8=True)).variant_id == "onnx-fp16"


def test_policy_prefer_forbid_and_backends() -> None:
    choice = choose(FULL, NVIDIA_BOX, ChoicePolicy(prefer=["tflite"]))
    assert (choice.variant_id, choice.reasons[0]) == ("tflite-fp32", "the policy prefers tflite")
    assert choice.skipped["onnx-fp16"] == "ranked lower: the policy prefers tflite"
    choice = choose(FULL, NVIDIA_BOX, ChoicePolicy(prefer=["onnx-fp32", "tflite"]))
    assert choice.variant_id == "onnx-fp32"
    choice = choose(FULL, NVIDIA_BOX, ChoicePolicy(forbid=["fp16", "onnx-fp32"]))
    assert (choice.variant_id, choice.accelerator) == ("openvino-fp32", "cpu")
    assert choice.skipped["onnx-int8"] == (
        "ranked lower: int8 is chosen first only when the policy says prefer_int8"
    )
    assert choice.skipped["onnx-fp16"] == "forbidden by the policy (forbid: fp16)"
    assert choice.skipped["onnx-fp32"] == "forbidden by the policy (forbid: onnx-fp32)"
    # ONNX variants on OpenVINO, on an Intel box with a GPU.
    choice = choose(
        bundle(FULL.variants[0]), INTEL_GPU_BOX, ChoicePolicy(backends={"onnx": "openvino"})
    )
    assert (choice.variant_id, choice.backend, choice.accelerator) == (
        "onnx-fp32",
        "openvino",
        "intel-gpu",
    )


def test_policy_is_validated_without_loading_anything() -> None:
    with pytest.raises(ValidationError, match="backend litert does not run onnx models"):
        ChoicePolicy(backends={"onnx": "litert"})
    with pytest.raises(ValidationError, match="no backend 'tensorflow'"):
        ChoicePolicy(backends={"tflite": "tensorflow"})
    with pytest.raises(ValidationError):
        ChoicePolicy.model_validate({"prefer_fp4": True})
    assert ChoicePolicy.model_validate({"backends": {"onnx": "openvino"}}).backend_for("onnx") == (
        "openvino"
    )


def test_runtime_config_table() -> None:
    config = RuntimeConfig.model_validate(
        {
            "policy": {"prefer": ["openvino-ir"], "forbid": ["int8"]},
            "openvino": {"device": "GPU", "precision": "f16", "cache_dir": "/var/cache/ov"},
            "litert": {"threads": 2},
        }
    )
    assert config.settings_for("openvino") == OpenVinoSettings(
        device="GPU", precision="f16", cache_dir=Path("/var/cache/ov")
    )
    assert config.settings_for("litert") == LiteRtSettings(threads=2)
    assert config.settings_for("onnxruntime") == OnnxRuntimeSettings()
    assert choose(FULL, box(), config.policy).variant_id == "openvino-fp32"
    with pytest.raises(ValidationError, match="precision"):
        RuntimeConfig.model_validate({"openvino": {"precision": "int4"}})


def test_constraints_architecture_accelerator_and_cuda_compute() -> None:
    manifest = bundle(
        variant("trt-orin", "onnx", "fp16", accelerators=["jetson"], min_cuda_compute="8.7"),
        variant("arm-only", "tflite", "fp32", architectures=["aarch64"]),
        variant("ampere", "onnx", "fp16", accelerators=["nvidia-gpu"], min_cuda_compute="8.0"),
        variant("generic", "onnx", "fp32"),
    )
    x86 = choose(manifest, box())
    assert (x86.variant_id, x86.accelerator) == ("generic", "cpu")
    assert x86.skipped == {
        "trt-orin": "built for jetson; with onnxruntime it would run on cpu here",
        "arm-only": "built for aarch64; this box is x86_64",
        "ampere": "built for nvidia-gpu; with onnxruntime it would run on cpu here",
    }
    xavier = box(architecture="aarch64", jetson=JetsonInfo(model="Jetson AGX Xavier", compute_capability="7.2"), onnxruntime_providers=[CUDA, CPU])  # fmt: skip
    choice = choose(manifest, xavier)
    assert choice.skipped["trt-orin"] == "needs CUDA compute capability 8.7; this GPU has 7.2"
    assert (choice.variant_id, choice.accelerator) == ("generic", "jetson")
    assert (
        choice.skipped["ampere"]
        == "built for nvidia-gpu; with onnxruntime it would run on cpu here"
    )
    assert choice.skipped["arm-only"] == "ranked lower: it would run on cpu, generic on jetson"
    turing = box(nvidia_gpus=[RTX.model_copy(update={"compute_capability": "7.5"})], onnxruntime_providers=[CUDA, CPU])  # fmt: skip
    assert choose(manifest, turing).skipped["ampere"] == (
        "needs CUDA compute capability 8.0; this GPU has 7.5"
    )
    assert choose(manifest, NVIDIA_BOX).variant_id == "ampere"
    assert choose(manifest, JETSON_BOX).variant_id == "trt-orin"


def test_nothing_fits() -> None:
    other_arch = bundle(variant("a", "onnx", "fp32", architectures=["aarch64"]))
    with pytest.raises(
        BadContentError,
        match=r"no variant of det 1.0.0 runs on this box: a: built for aarch64; this box is x86_64",
    ):
        choose(other_arch, box())
    too_big = bundle(variant("a", "onnx", "fp32", memory=50_000), variant("b", "tflite", "fp32", memory=20_000))  # fmt: skip
    with pytest.raises(
        InsufficientMemoryError,
        match=r"a: needs 50000 MB; 12000 MB of RAM available; b: needs 20000 MB",
    ):
        choose(too_big, box())


def test_a_variant_the_deployment_names() -> None:
    choice = choose(FULL, NVIDIA_BOX, variant="onnx-int8")
    assert (choice.variant_id, choice.accelerator) == ("onnx-int8", "cpu")
    assert choice.reasons[0] == "the deployment names this variant"
    assert choice.skipped["onnx-fp16"] == "the deployment names onnx-int8"
    with pytest.raises(
        BadContentError, match=r"the deployment names variant 'onnx-fp8'; det 1\.0\.0 has onnx-fp32"
    ):
        choose(FULL, NVIDIA_BOX, variant="onnx-fp8")
    with pytest.raises(
        BadContentError,
        match=r"variant openvino-fp32 of det 1\.0\.0 cannot run on this box: needs openvino, which is not installed",
    ):
        choose(FULL, SMALL_ARM, variant="openvino-fp32")


def test_memory_is_checked_where_the_variant_runs() -> None:
    """GPU memory for a variant on the NVIDIA GPU, RAM for one on the CPU (and on a Jetson)."""
    big_gpu = variant("onnx-fp16", "onnx", "fp16", memory=11_000)
    big_cpu = variant("tflite-fp32", "tflite", "fp32", memory=11_000)
    with pytest.raises(
        InsufficientMemoryError,
        match="variant onnx-fp16 needs 11000 MB; only 10000 MB of GPU memory free on NVIDIA RTX A2000",
    ) as exc:
        check_memory(big_gpu, NVIDIA_BOX)
    assert exc.value.code == "insufficient-memory"
    check_memory(big_cpu, NVIDIA_BOX)  # 12000 MB of RAM
    check_memory(big_gpu, NVIDIA_BOX, "openvino")  # OpenVINO would run it on the CPU
    with pytest.raises(InsufficientMemoryError, match="RAM available \\(shared with the GPU\\)"):
        check_memory(big_gpu, JETSON_BOX.model_copy(update={"memory_available_mb": 3000}))
    # The choice skips what does not fit and takes the next.
    choice = choose(bundle(big_gpu, variant("onnx-fp32", "onnx", "fp32", memory=500)), NVIDIA_BOX)
    assert choice.variant_id == "onnx-fp32"
    assert (
        choice.skipped["onnx-fp16"]
        == "needs 11000 MB; 10000 MB of GPU memory free on NVIDIA RTX A2000"
    )


# -- edge-agent hardware ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("hw")
    onnx_model, tflite_model = make_onnx(d / "m.onnx"), make_tflite(d / "m.tflite")
    options = BuildOptions(
        name="m", version="1.0.0", quantize="int8", openvino=True, samples="none"
    )
    other = "x86_64" if platform.machine() != "x86_64" else "aarch64"
    return {
        "bundle": build_bundle([onnx_model, tflite_model], d / "m.emb", options).path,
        "elsewhere": build_bundle(
            [onnx_model],
            d / "other.emb",
            BuildOptions(name="m", version="1.0.0", samples="none", architectures=(other,)),
        ).path,
    }


def test_cli_hardware(capsys: pytest.CaptureFixture[str]) -> None:
    assert agent_main(["hardware"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"cpu           {platform.machine()}, ")
    assert "runtimes      onnxruntime " in out
    assert "accelerators  cpu" in out


def test_cli_hardware_with_a_bundle(
    built: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert agent_main(["hardware", "--bundle", str(built["bundle"]), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["profile"]["architecture"] == platform.machine()
    assert "cpu" in doc["profile"]["accelerators"]
    assert doc["bundle"]["variants"] == ["onnx-fp32", "tflite-fp32", "onnx-int8", "openvino-fp32"]
    choice = doc["choice"]
    # This box is a CPU box with all three runtimes: ONNX or OpenVINO IR (on an Intel CPU), fp32.
    assert choice["variant_id"] in ("onnx-fp32", "openvino-fp32")
    assert choice["accelerator"] == "cpu"
    assert set(choice["skipped"]) == set(doc["bundle"]["variants"]) - {choice["variant_id"]}
    assert agent_main(["hardware", "--bundle", str(built["bundle"])]) == 0
    out = capsys.readouterr().out
    assert f"choice        {choice['variant_id']} with {choice['backend']} on cpu" in out
    assert "  because     runs on the CPU with" in out
    assert "  not onnx-int8 " in out
    assert "manifest not verified here" in out


def test_cli_hardware_with_a_bundle_for_other_hardware(
    built: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert agent_main(["hardware", "--bundle", str(built["elsewhere"]), "--json"]) == 1
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert doc["choice"] is None
    assert doc["error"]["code"] == "bad-content"
    assert "rejected (bad-content): no variant of m 1.0.0 runs on this box" in captured.err
    assert agent_main(["hardware", "--bundle", str(built["bundle"].parent / "missing.emb")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_probe_module_reads_no_real_file_with_a_fake_root(tmp_path: Path) -> None:
    """An empty fake root is an unknown box, not this one."""
    profile = probe(Probes(root=tmp_path, nvml=no_nvml, openvino=no_openvino, runtimes=dict, onnxruntime=list))  # fmt: skip
    assert (profile.cpu_model, profile.cpu_vendor, profile.memory_total_mb) == (
        "unknown",
        "unknown",
        0,
    )
    assert profile.jetson is None
    assert FORMAT_BACKENDS["tflite"] == "litert"


def test_the_isolated_probe_leaves_the_runtimes_out_of_the_caller() -> None:
    """The daemon probes in a child: the same profile, and OpenVINO and ONNX Runtime are not
    loaded into the caller by it."""
    code = (
        "import sys, json; from agent.runtime.probe import probe_isolated;"
        "p = probe_isolated();"
        "print(json.dumps([p.architecture, p.cpu_cores, 'openvino' in sys.modules,"
        " 'onnxruntime' in sys.modules]))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    arch, cores, openvino_loaded, ort_loaded = json.loads(done.stdout.splitlines()[-1])
    here = probe()
    assert (arch, cores) == (here.architecture, here.cpu_cores)
    assert not openvino_loaded
    assert not ort_loaded


def test_cli_hardware_chooses_with_the_configs_policy(
    built: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    toml = tmp_path / "agent.toml"
    toml.write_text(
        'device_id = "cam-01"\n'
        f'state_dir = "{tmp_path / "state"}"\n'
        "[trust]\n"
        f'root = "{tmp_path / "root.json"}"\n'
        "[runtime.policy]\n"
        'prefer = ["tflite"]\n'
    )
    bundle = str(built["bundle"])
    assert agent_main(["hardware", "--bundle", bundle, "--config", str(toml), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["config"] == str(toml)
    assert doc["choice"]["variant_id"] == "tflite-fp32"
    toml.write_text(toml.read_text().replace('prefer = ["tflite"]', "prefer = [1]"))
    assert agent_main(["hardware", "--bundle", bundle, "--config", str(toml)]) == 2
    assert "prefer" in capsys.readouterr().err
