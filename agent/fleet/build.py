"""``edge-fleet bundle build``: model files in, one bundle out.

Steps: read each model's tensors; derive extra variants (int8 by ONNX Runtime dynamic
quantization, OpenVINO IR by conversion); make self-test samples (random inputs, or inputs from
``.npz`` files) and record the reference variant's outputs on them; run every other variant on the
same inputs and record how far it strays; write the manifest and the aligned archive.
"""

from __future__ import annotations

import hashlib
import io
import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
from pydantic import TypeAdapter, ValidationError

from agent._fsutil import atomic_writer
from agent.bundle.archive import Source, write_archive
from agent.bundle.manifest import (
    DEFAULT_BLOCK_SIZE,
    MANIFEST_NAME,
    Accuracy,
    Constraints,
    FileEntry,
    Manifest,
    SampleCase,
    Samples,
    TensorSpec,
    Tolerance,
    Variant,
)
from agent.errors import ConfigError, FormatError
from agent.fleet._models import (
    NUMPY_DTYPES,
    ModelFile,
    Runner,
    convert_openvino,
    inspect_model,
    member_name,
    quantize_int8,
)
from agent.transport.messages import COMMON_PACKET_LIMIT
from agent.values import BlockSize, ModelName, SemVer

Feeds = dict[str, np.ndarray]


@dataclass(frozen=True)
class BuildOptions:
    name: str
    version: str
    release: int | None = None
    samples: str = "auto"  # "auto", "none", or a directory of .npz files
    sample_count: int = 4
    seed: int = 0
    quantize: str | None = None  # "int8"
    openvino: bool = False
    block_size: int = DEFAULT_BLOCK_SIZE
    description: str = ""
    tolerance: Tolerance = field(default_factory=lambda: Tolerance(atol=1e-3, rtol=1e-3))
    min_memory_mb: int | None = None  # None: estimated from each variant's files
    architectures: tuple[str, ...] = ()  # empty: any


@dataclass(frozen=True)
class BuildResult:
    path: Path
    manifest: Manifest
    size: int
    sha256: str
    warnings: tuple[str, ...] = ()  # for a person; the bundle is built and valid


def block_size_warning(block_size: int) -> str | None:
    """Why ``block_size`` may not pass common brokers, or None.

    A block reply carries one block plus its header and topic, so a block of
    ``COMMON_PACKET_LIMIT`` bytes or more does not pass a broker with that limit.
    """
    if block_size < COMMON_PACKET_LIMIT:
        return None
    return (
        f"block size {block_size}: a block's reply (the block, its header and topic) is larger "
        f"than {COMMON_PACKET_LIMIT} bytes, the packet limit of many brokers (AWS IoT Core "
        f"allows 128 KiB per message); devices behind such a broker fail with block-too-large. "
        f"The default, {DEFAULT_BLOCK_SIZE}, passes them"
    )


def input_mismatch_warning(manifest: Manifest) -> str | None:
    """Why the same request may work on one box and not on another, or None: the variants
    take different inputs (a .tflite fixed at a batch of 1 beside an ONNX model with -1)."""
    mismatch = manifest.input_mismatch()
    if mismatch is None:
        return None
    return (
        f"the variants take different inputs: {mismatch}; a request that fits one gets a 400 "
        "from devices that run another (export the models with the same input shapes)"
    )


def release_from_version(version: str) -> int:
    """The default release counter: MAJOR*10^6 + MINOR*10^3 + PATCH, so it grows with semver."""
    core = version.split("+", 1)[0].split("-", 1)[0]
    try:
        major, minor, patch = (int(p) for p in core.split("."))
    except ValueError:
        raise ConfigError(f"{version!r} is not MAJOR.MINOR.PATCH") from None
    if minor >= 1000 or patch >= 1000:
        raise ConfigError(f"cannot derive a release counter from {version}; pass --release")
    return major * 1_000_000 + minor * 1_000 + patch or 1


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _random_feeds(inputs: Sequence[TensorSpec], rng: np.random.Generator) -> Feeds:
    feeds = {}
    for spec in inputs:
        dtype = NUMPY_DTYPES.get(spec.datatype)
        if dtype is None:
            raise ConfigError(
                f"cannot generate samples for {spec.datatype} input {spec.name!r}; use --samples DIR"
            )
        shape = [d if d >= 0 else 1 for d in spec.shape]
        if dtype.startswith("float"):
            feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == "bool":
            feeds[spec.name] = rng.random(shape) > 0.5
        else:
            feeds[spec.name] = rng.integers(0, 10, size=shape).astype(dtype)
    return feeds


def _load_sample_dir(directory: Path, reference: ModelFile) -> list[tuple[Feeds, Feeds | None]]:
    files = sorted(Path(directory).glob("*.npz"))
    if not files:
        raise ConfigError(f"{directory} holds no .npz sample files")
    cases = []
    want_in = [t.name for t in reference.inputs]
    want_out = [t.name for t in reference.outputs]
    for path in files:
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except (OSError, ValueError) as exc:
            raise FormatError(f"{path}: not a readable .npz file: {exc}") from None
        missing = [n for n in want_in if n not in arrays]
        if missing:
            raise ConfigError(f"{path}: missing input tensor(s) {missing}")
        outputs = {n: arrays[n] for n in want_out} if all(n in arrays for n in want_out) else None
        cases.append(({n: arrays[n] for n in want_in}, outputs))
    return cases


def _errors(actual: Feeds, expected: Feeds) -> tuple[float, float]:
    worst, total, count = 0.0, 0.0, 0
    for name, want in expected.items():
        got = actual.get(name)
        if got is None or got.shape != want.shape:
            raise FormatError(
                f"output {name!r} has shape {None if got is None else got.shape}, expected {want.shape}"
            )
        diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
        worst = max(worst, float(diff.max(initial=0.0)))
        total += float(diff.sum())
        count += diff.size
    return worst, total / max(count, 1)


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


class _Files:
    """The members of the bundle being built: name -> where its bytes are."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.paths: dict[str, Path] = {}
        self.entries: dict[str, FileEntry] = {}

    def add_path(self, name: str, path: Path) -> FileEntry:
        entry = FileEntry(path=name, size=path.stat().st_size, sha256=_sha256_file(path))
        self.paths[name], self.entries[name] = path, entry
        return entry

    def add_bytes(self, name: str, data: bytes) -> FileEntry:
        path = self.workdir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return self.add_path(name, path)

    def sources(self) -> list[Source]:
        def opener(p: Path) -> Callable[[], BinaryIO]:
            return lambda: open(p, "rb")

        return [Source(n, self.entries[n].size, opener(p)) for n, p in self.paths.items()]


def _check_options(options: BuildOptions) -> None:
    """Refuse a bad name, version or block size before any model is read."""
    for what, kind, value in (
        ("name", ModelName, options.name),
        ("version", SemVer, options.version),
        ("block size", BlockSize, options.block_size),
    ):
        try:
            TypeAdapter(kind).validate_python(value, strict=True)
        except ValidationError as exc:
            msg = exc.errors()[0]["msg"].removeprefix("Value error, ")
            raise ConfigError(f"invalid {what} {value!r}: {msg}") from None


def build_bundle(models: Sequence[Path], out: Path, options: BuildOptions) -> BuildResult:
    if not models:
        raise ConfigError("give at least one model file")
    _check_options(options)
    if options.quantize not in (None, "int8"):
        raise ConfigError(f"unknown quantization {options.quantize!r}; only int8 is supported")
    release = options.release or release_from_version(options.version)
    with tempfile.TemporaryDirectory(prefix="edge-fleet-build-") as tmp:
        workdir = Path(tmp)
        given = [inspect_model(Path(m)) for m in models]
        onnx = next((m for m in given if m.format == "onnx"), None)
        derived: list[ModelFile] = []
        if options.quantize:
            if onnx is None:
                raise ConfigError("--quantize int8 needs an ONNX model")
            derived.append(inspect_model(quantize_int8(onnx, workdir / "model.int8.onnx")))
        if options.openvino:
            if onnx is None:
                raise ConfigError("--openvino needs an ONNX model to convert")
            (workdir / "ov").mkdir()
            derived.append(inspect_model(convert_openvino(onnx, workdir / "ov" / "model.xml")))
        all_models = given + derived
        reference = all_models[0]

        files = _Files(workdir / "members")
        samples, cases = _make_samples(reference, options, files)
        variants: list[Variant] = []
        used_ids: set[str] = set()
        for model in all_models:
            variant_id = _variant_id(model, used_ids)
            accuracy, tolerance = None, options.tolerance
            if cases and model is not reference:
                accuracy = _measure(model, cases, reference_id=variants[0].id)
                tolerance = Tolerance(
                    atol=max(options.tolerance.atol, 2 * accuracy.max_abs_error),
                    rtol=options.tolerance.rtol,
                )
            entries = [
                files.add_path(f"variants/{variant_id}/{member_name(p, f'file{i}{p.suffix}')}", p)
                for i, p in enumerate(model.files)
            ]
            variants.append(
                Variant(
                    id=variant_id,
                    format=model.format,  # type: ignore[arg-type]
                    precision=model.precision,  # type: ignore[arg-type]
                    entrypoint=entries[0].path,
                    files=entries,
                    inputs=list(model.inputs),
                    outputs=list(model.outputs),
                    constraints=_constraints(model, options),
                    tolerance=tolerance,
                    accuracy=accuracy,
                )
            )
        try:
            manifest = Manifest(
                name=options.name,
                version=options.version,
                release=release,
                description=options.description,
                block_size=options.block_size,
                variants=variants,
                samples=samples,
            )
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            raise ConfigError(f"the bundle would be invalid: {exc}") from None
        manifest_bytes = manifest.to_bytes()
        sources = [Source(MANIFEST_NAME, len(manifest_bytes), lambda: io.BytesIO(manifest_bytes))]
        sources += files.sources()
        with atomic_writer(Path(out)) as f:
            size = write_archive(f, sources, options.block_size)
    warnings = (block_size_warning(options.block_size), input_mismatch_warning(manifest))
    return BuildResult(
        path=Path(out),
        manifest=manifest,
        size=size,
        sha256=_sha256_file(Path(out)),
        warnings=tuple(w for w in warnings if w is not None),
    )


# Where each kind of variant can run. ONNX fp32/fp16 runs on the CPU, CUDA and TensorRT; dynamic
# int8 quantization produces integer ops that only the CPU provider runs well.
_ACCELERATORS = {
    ("onnx", "int8"): ["cpu"],
    ("openvino-ir", None): ["cpu", "intel-gpu", "intel-npu"],
    ("tflite", None): ["cpu"],
}


def _constraints(model: ModelFile, options: BuildOptions) -> Constraints:
    accelerators = _ACCELERATORS.get(
        (model.format, model.precision), _ACCELERATORS.get((model.format, None), [])
    )
    if options.min_memory_mb is not None:
        memory = options.min_memory_mb
    else:
        # Weights are held once by the runtime and briefly twice while it loads them.
        size = sum(p.stat().st_size for p in model.files)
        memory = max(16, math.ceil(2 * size / 2**20))
    return Constraints(
        min_memory_mb=memory,
        accelerators=accelerators,  # type: ignore[arg-type]
        architectures=list(options.architectures),  # type: ignore[arg-type]
    )


def _variant_id(model: ModelFile, used: set[str]) -> str:
    base = f"{model.format.split('-')[0]}-{model.precision}"
    candidate, n = base, 2
    while candidate in used:
        candidate, n = f"{base}-{n}", n + 1
    used.add(candidate)
    return candidate


def _make_samples(
    reference: ModelFile, options: BuildOptions, files: _Files
) -> tuple[Samples | None, list[tuple[Feeds, Feeds]]]:
    if options.samples == "none":
        return None, []
    runner = Runner(reference)
    if options.samples == "auto":
        rng = np.random.default_rng(options.seed)
        raw: list[tuple[Feeds, Feeds | None]] = [
            (_random_feeds(reference.inputs, rng), None) for _ in range(options.sample_count)
        ]
    else:
        raw = _load_sample_dir(Path(options.samples), reference)
    cases: list[tuple[Feeds, Feeds]] = []
    sample_cases = []
    for i, (feeds, given_out) in enumerate(raw):
        outputs = given_out if given_out is not None else runner(feeds)
        cases.append((feeds, outputs))
        name = f"case-{i:03d}"
        ins = {
            t: files.add_bytes(f"samples/{name}/in{j}.npy", _npy(a)).path
            for j, (t, a) in enumerate(feeds.items())
        }
        outs = {
            t: files.add_bytes(f"samples/{name}/out{j}.npy", _npy(a)).path
            for j, (t, a) in enumerate(outputs.items())
        }
        sample_cases.append(SampleCase(name=name, inputs=ins, outputs=outs))
    sample_files = [e for n, e in files.entries.items() if n.startswith("samples/")]
    return Samples(files=sample_files, cases=sample_cases), cases


def _measure(model: ModelFile, cases: list[tuple[Feeds, Feeds]], *, reference_id: str) -> Accuracy:
    runner = Runner(model)
    errors = [_errors(runner(feeds), expected) for feeds, expected in cases]
    return Accuracy(
        reference=reference_id,
        max_abs_error=max(worst for worst, _ in errors),
        mean_abs_error=float(np.mean([mean for _, mean in errors])),
        samples=len(cases),
    )
