"""The bundle manifest: what a bundle holds, described so that every byte can be checked.

The manifest is the first member of a bundle, ``manifest.json``. Its SHA-256 is signed in the
bundle descriptor, and it lists every other member with its size and SHA-256, so nothing in a
bundle is unaccounted for.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from agent._strictjson import dump_model, parse_model
from agent.values import BlockSize, Hex64, ModelName, SemVer

MANIFEST_NAME = "manifest.json"
DEFAULT_BLOCK_SIZE = 64 * 1024

# Member names: relative, at most 100 bytes (one ustar name field), components that start with a
# letter, digit or underscore, so "..", "." and hidden names cannot occur.
MemberPath = Annotated[
    str,
    Field(
        max_length=100,
        pattern=r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}(/[A-Za-z0-9_][A-Za-z0-9._-]{0,63}){0,7}$",
    ),
]
VariantId = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,31}$")]
TensorName = Annotated[str, Field(min_length=1, max_length=256)]
Datatype = Literal[
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "FP32", "FP64", "BF16", "BYTES",
]  # fmt: skip
Accelerator = Literal["cpu", "nvidia-gpu", "jetson", "intel-gpu", "intel-npu"]
Architecture = Literal["x86_64", "aarch64", "armv7l"]


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("must be finite")
    return value


Finite = Annotated[float, Field(ge=0), AfterValidator(_finite)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class FileEntry(_Strict):
    path: MemberPath
    size: Annotated[int, Field(ge=0)]
    sha256: Hex64


class TensorSpec(_Strict):
    name: TensorName
    datatype: Datatype
    shape: list[Annotated[int, Field(ge=-1)]] = Field(max_length=16)  # -1: any size


def tensors_text(specs: list[TensorSpec]) -> str:
    """``x:FP32[-1, 16]  mask:BOOL[-1]``: tensors as ``edge-fleet bundle inspect`` shows them."""
    return "  ".join(f"{t.name}:{t.datatype}{t.shape}" for t in specs)


class Constraints(_Strict):
    """Where a variant may run. Empty lists mean "anywhere"."""

    min_memory_mb: Annotated[int, Field(ge=0)] = 0
    accelerators: list[Accelerator] = []
    architectures: list[Architecture] = []
    min_cuda_compute: Annotated[str, Field(pattern=r"^\d{1,2}\.\d$")] | None = None


class Tolerance(_Strict):
    """Self-test passes when ``|actual - expected| <= atol + rtol * |expected|`` everywhere."""

    atol: Finite = 1e-4
    rtol: Finite = 1e-3


class Accuracy(_Strict):
    """How far a derived variant strays from the reference on the bundle's samples."""

    reference: VariantId
    max_abs_error: Finite
    mean_abs_error: Finite
    samples: Annotated[int, Field(ge=1)]


class Variant(_Strict):
    id: VariantId
    format: Literal["onnx", "openvino-ir", "tflite"]
    precision: Literal["fp32", "fp16", "bf16", "int8", "mixed"]
    entrypoint: MemberPath
    files: list[FileEntry] = Field(min_length=1, max_length=64)
    inputs: list[TensorSpec] = Field(min_length=1, max_length=64)
    outputs: list[TensorSpec] = Field(min_length=1, max_length=64)
    constraints: Constraints = Constraints()
    tolerance: Tolerance = Tolerance()
    accuracy: Accuracy | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Variant:
        paths = [f.path for f in self.files]
        if self.entrypoint not in paths:
            raise ValueError(f"entrypoint {self.entrypoint!r} is not among the variant's files")
        for what, specs in (("input", self.inputs), ("output", self.outputs)):
            names = [t.name for t in specs]
            if len(set(names)) != len(names):
                raise ValueError(f"duplicate {what} tensor names")
        return self


class SampleCase(_Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")]
    inputs: dict[TensorName, MemberPath] = Field(min_length=1, max_length=64)
    outputs: dict[TensorName, MemberPath] = Field(min_length=1, max_length=64)


class Samples(_Strict):
    """Self-test data: ``.npy`` tensors (never pickles) and the outputs the reference gave."""

    files: list[FileEntry] = Field(min_length=1, max_length=1024)
    cases: list[SampleCase] = Field(min_length=1, max_length=256)

    @model_validator(mode="after")
    def _consistent(self) -> Samples:
        listed = {f.path for f in self.files}
        for case in self.cases:
            for path in [*case.inputs.values(), *case.outputs.values()]:
                if path not in listed:
                    raise ValueError(f"sample {case.name}: {path!r} is not among the sample files")
        return self


class Manifest(_Strict):
    type: Literal["bundle-manifest"] = "bundle-manifest"
    spec_version: Literal[1] = 1
    name: ModelName
    version: SemVer
    release: Annotated[int, Field(ge=1, le=2**53)]
    description: Annotated[str, Field(max_length=1024)] = ""
    block_size: BlockSize
    variants: list[Variant] = Field(min_length=1, max_length=16)
    samples: Samples | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        ids = [v.id for v in self.variants]
        if len(set(ids)) != len(ids):
            raise ValueError("duplicate variant ids")
        seen: dict[str, FileEntry] = {}
        for entry in self._entries():
            if entry.path == MANIFEST_NAME:
                raise ValueError(f"{MANIFEST_NAME} is reserved")
            other = seen.setdefault(entry.path, entry)
            if other != entry:
                raise ValueError(f"{entry.path!r} is listed twice with different contents")
        _check_no_prefix_clash(seen)
        if self.samples:
            for variant in self.variants:
                want = {t.name for t in variant.inputs}
                for case in self.samples.cases:
                    if set(case.inputs) != want:
                        raise ValueError(
                            f"sample {case.name} inputs {sorted(case.inputs)} do not match "
                            f"variant {variant.id} inputs {sorted(want)}"
                        )
        return self

    def _entries(self) -> list[FileEntry]:
        out = [f for v in self.variants for f in v.files]
        if self.samples:
            out.extend(self.samples.files)
        return out

    def files(self) -> dict[str, FileEntry]:
        """Every member other than the manifest, by path."""
        return {e.path: e for e in self._entries()}

    def total_size(self) -> int:
        return sum(e.size for e in self.files().values())

    def input_mismatch(self) -> str | None:
        """The variants' inputs, variants with the same ones together, when they are not all
        the same (names, datatypes or shapes): ``onnx-fp32 x:FP32[-1, 16]; tflite-fp32
        x:FP32[1, 16]``. None when they agree. A request that fits one variant then gets a 400
        from a box that runs another."""
        groups: dict[str, list[str]] = {}
        for v in self.variants:
            groups.setdefault(tensors_text(v.inputs), []).append(v.id)
        if len(groups) < 2:
            return None
        return "; ".join(f"{', '.join(ids)} {inputs}" for inputs, ids in groups.items())

    def variant(self, variant_id: str) -> Variant:
        for v in self.variants:
            if v.id == variant_id:
                return v
        raise KeyError(variant_id)

    def to_bytes(self) -> bytes:
        return dump_model(self) + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes, *, max_bytes: int) -> Manifest:
        return parse_model(cls, data, what="manifest", max_bytes=max_bytes)


def _check_no_prefix_clash(entries: dict[str, FileEntry]) -> None:
    """Refuse "a" beside "a/b": one cannot be both a file and a directory on disk."""
    paths = set(entries) | {MANIFEST_NAME}
    lowered: dict[str, str] = {}
    for path in paths:
        parts = path.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in paths:
                raise ValueError(f"{path!r} lies below the file {'/'.join(parts[:i])!r}")
        # Case-insensitive filesystems (exFAT SD cards) would merge these.
        clash = lowered.setdefault(path.lower(), path)
        if clash != path:
            raise ValueError(f"{path!r} and {clash!r} differ only in case")
