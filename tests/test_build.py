"""edge-fleet bundle build: variants, samples, quantization and conversion, with real runtimes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from agent.bundle.reader import read_index
from agent.bundle.unpack import unpack_bundle
from agent.cli import fleet_main
from agent.errors import ConfigError, FormatError
from agent.fleet._models import Runner, inspect_model
from agent.fleet.build import release_from_version
from agent.testing.models import make_onnx, reference
from agent.transport.messages import COMMON_PACKET_LIMIT


def _unpack(path: Path, dest: Path):
    with open(path, "rb") as f:
        index = read_index(f)
    return unpack_bundle(path, dest, manifest_sha256=index.manifest_sha256)


def test_auto_samples_record_the_reference_outputs(build, onnx_model: Path, tmp_path: Path) -> None:
    result = build(sample_count=3)
    manifest = _unpack(result.path, tmp_path / "out")
    assert [v.id for v in manifest.variants] == ["onnx-fp32"]
    variant = manifest.variants[0]
    assert (variant.inputs[0].name, variant.inputs[0].datatype, variant.inputs[0].shape) == (
        "x",
        "FP32",
        [-1, 16],
    )
    assert (variant.outputs[0].name, variant.outputs[0].shape) == ("y", [-1, 8])
    assert manifest.samples is not None
    assert len(manifest.samples.cases) == 3
    for case in manifest.samples.cases:
        x = np.load(tmp_path / "out" / case.inputs["x"], allow_pickle=False)
        y = np.load(tmp_path / "out" / case.outputs["y"], allow_pickle=False)
        assert x.shape == (1, 16)
        assert x.dtype == np.float32
        np.testing.assert_allclose(y, reference(onnx_model, x), rtol=1e-5, atol=1e-5)
    # Different cases really are different inputs.
    first, second = (np.load(tmp_path / "out" / c.inputs["x"]) for c in manifest.samples.cases[:2])
    assert not np.array_equal(first, second)


def test_int8_variant_is_quantized_and_its_error_recorded(build, tmp_path: Path) -> None:
    result = build(quantize="int8")
    manifest = _unpack(result.path, tmp_path / "out")
    int8 = manifest.variant("onnx-int8")
    assert int8.precision == "int8"
    ops = {n.op_type for n in onnx.load(str(tmp_path / "out" / int8.entrypoint)).graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeLinear"}
    assert int8.accuracy is not None
    assert int8.accuracy.reference == "onnx-fp32"
    assert 0 < int8.accuracy.max_abs_error < 1.0
    assert int8.accuracy.mean_abs_error <= int8.accuracy.max_abs_error
    assert int8.tolerance.atol >= 2 * int8.accuracy.max_abs_error
    # The recorded error is the real one: rerun the int8 model on the samples.
    runner = Runner(inspect_model(tmp_path / "out" / int8.entrypoint))
    assert manifest.samples is not None
    worst = 0.0
    for case in manifest.samples.cases:
        x = np.load(tmp_path / "out" / case.inputs["x"])
        want = np.load(tmp_path / "out" / case.outputs["y"])
        worst = max(worst, float(np.abs(runner({"x": x})["y"] - want).max()))
    assert worst == pytest.approx(int8.accuracy.max_abs_error, rel=1e-6)


def test_openvino_variant_is_converted_and_matches(build, onnx_model: Path, tmp_path: Path) -> None:
    result = build(openvino=True)
    manifest = _unpack(result.path, tmp_path / "out")
    ov = manifest.variant("openvino-fp32")
    assert ov.format == "openvino-ir"
    assert sorted(f.path.rsplit("/", 1)[1] for f in ov.files) == ["model.bin", "model.xml"]
    assert ov.entrypoint.endswith("model.xml")
    assert ov.accuracy is not None
    assert ov.accuracy.max_abs_error < 1e-4
    x = np.random.default_rng(7).standard_normal((2, 16)).astype(np.float32)
    got = Runner(inspect_model(tmp_path / "out" / ov.entrypoint))({"x": x})["y"]
    np.testing.assert_allclose(got, reference(onnx_model, x), rtol=1e-5, atol=1e-5)


def test_samples_from_a_directory(build, onnx_model: Path, tmp_path: Path) -> None:
    samples = tmp_path / "samples"
    samples.mkdir()
    x0 = np.full((1, 16), 0.5, dtype=np.float32)
    np.savez(samples / "a.npz", x=x0)  # outputs recorded by running the model
    given_y = np.zeros((1, 8), dtype=np.float32)
    np.savez(samples / "b.npz", x=x0, y=given_y)  # outputs taken as given
    manifest = _unpack(build(samples=str(samples)).path, tmp_path / "out")
    assert manifest.samples is not None
    a, b = manifest.samples.cases
    np.testing.assert_allclose(
        np.load(tmp_path / "out" / a.outputs["y"]), reference(onnx_model, x0), atol=1e-5
    )
    np.testing.assert_array_equal(np.load(tmp_path / "out" / b.outputs["y"]), given_y)


def test_sample_directory_missing_an_input(build, tmp_path: Path) -> None:
    samples = tmp_path / "samples"
    samples.mkdir()
    np.savez(samples / "a.npz", wrong=np.zeros((1, 16), dtype=np.float32))
    with pytest.raises(ConfigError, match="missing input"):
        build(samples=str(samples))


def test_no_samples(build, tmp_path: Path) -> None:
    manifest = _unpack(build(samples="none").path, tmp_path / "out")
    assert manifest.samples is None


def test_release_counter_defaults_from_the_version(build) -> None:
    assert build("2.3.4").manifest.release == 2_003_004
    assert build("2.3.4", release=77).manifest.release == 77
    assert release_from_version("0.0.0") == 1
    assert release_from_version("1.2.3-rc.1+build.5") == 1_002_003
    with pytest.raises(ConfigError):
        release_from_version("1.1000.0")


def test_the_build_is_reproducible(build) -> None:
    first, second = build("1.0.0"), build("1.0.0")
    assert first.sha256 == second.sha256
    assert hashlib.sha256(first.path.read_bytes()).hexdigest() == first.sha256


@pytest.mark.parametrize(
    ("name", "version"), [("Bad Name", "1.0.0"), ("tiny", "1.0"), ("tiny", "v1.0.0")]
)
def test_bad_name_or_version(build, name: str, version: str) -> None:
    with pytest.raises(ConfigError, match="invalid"):
        build(version, name=name)


def test_block_size_must_be_a_power_of_two(build) -> None:
    with pytest.raises(ConfigError, match="invalid"):
        build(block_size=3 * 4096)


def test_unreadable_models(build, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07not a model" * 10)
    with pytest.raises(FormatError, match=r"garbage\.onnx"):
        build(models=[garbage])
    unknown = tmp_path / "x.pt"
    unknown.write_bytes(b"x")
    with pytest.raises(FormatError, match=r"unknown model format \(expected"):
        build(models=[unknown])
    xml = tmp_path / "lonely.xml"
    xml.write_text("<net/>")
    with pytest.raises(FormatError, match="weights"):
        build(models=[xml])


def test_quantize_needs_onnx(build, tmp_path: Path) -> None:
    ov_dir = tmp_path / "ov"
    ov_dir.mkdir()
    import openvino as ov

    ov.save_model(
        ov.convert_model(str(make_onnx(tmp_path / "m.onnx"))),
        str(ov_dir / "m.xml"),
        compress_to_fp16=False,
    )
    with pytest.raises(ConfigError, match="needs an ONNX model"):
        build(models=[ov_dir / "m.xml"], quantize="int8")


def test_target_constraints(build, tmp_path: Path) -> None:
    manifest = build(quantize="int8", openvino=True).manifest
    assert manifest.variant("onnx-fp32").constraints.accelerators == []  # CPU, CUDA, TensorRT
    assert manifest.variant("onnx-int8").constraints.accelerators == ["cpu"]
    assert manifest.variant("openvino-fp32").constraints.accelerators == [
        "cpu",
        "intel-gpu",
        "intel-npu",
    ]
    assert all(v.constraints.min_memory_mb >= 16 for v in manifest.variants)
    pinned = build(min_memory_mb=512, architectures=("aarch64",)).manifest.variants[0].constraints
    assert (pinned.min_memory_mb, pinned.architectures) == (512, ["aarch64"])
    big = make_onnx(tmp_path / "big.onnx", inputs=1024, outputs=4096)  # 16 MiB of weights
    estimate = build(models=[big], samples="none").manifest.variants[0].constraints.min_memory_mb
    assert estimate == -(-2 * big.stat().st_size // 2**20)
    assert estimate > 32


@pytest.mark.parametrize(
    ("block_size", "warned"), [(65536, False), (COMMON_PACKET_LIMIT, True), (1 << 20, True)]
)
def test_build_warns_of_blocks_too_large_for_common_brokers(
    onnx_model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    block_size: int,
    warned: bool,
) -> None:
    """A block of 128 KiB is already too large: its reply adds a header and the topic."""
    out = tmp_path / "m.emb"
    argv = ["bundle", "build", "--name", "m", "--version", "1.0.0", "--samples", "none"]
    code = fleet_main([*argv, "--block-size", str(block_size), "-o", str(out), str(onnx_model)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert printed.out.startswith(f"built {out}")
    with open(out, "rb") as f:
        assert read_index(f).manifest.block_size == block_size, "built as asked"
    if warned:
        assert printed.err.startswith(f"edge-fleet: warning: block size {block_size}:")
        assert str(COMMON_PACKET_LIMIT) in printed.err
        assert "block-too-large" in printed.err
    else:
        assert printed.err == ""


def test_variants_with_different_input_shapes_are_warned_of_and_inspect_flags_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A .tflite fixed at a batch of 1 beside an ONNX model with a dynamic batch: the same
    two-row request runs on one and is refused by the other, so build warns in one line and
    inspect shows each variant's inputs and the difference."""
    from agent.errors import InputShapeError
    from agent.testing.models import make_tflite

    onnx_model, tflite = make_onnx(tmp_path / "m.onnx"), make_tflite(tmp_path / "m.tflite")
    two_rows = {"x": np.ones((2, 16), dtype=np.float32)}
    assert Runner(inspect_model(onnx_model))(two_rows)["y"].shape == (2, 8)
    with pytest.raises(InputShapeError):
        Runner(inspect_model(tflite))(two_rows)

    out = tmp_path / "m.emb"
    argv = ["bundle", "build", "--name", "m", "--version", "1.0.0", "-o", str(out)]
    assert fleet_main([*argv, str(onnx_model), str(tflite)]) == 0
    printed = capsys.readouterr()
    assert printed.out.startswith(f"built {out}"), "built all the same"
    mismatch = "onnx-fp32 x:FP32[-1, 16]; tflite-fp32 x:FP32[1, 16]"
    assert printed.err.splitlines() == [
        f"edge-fleet: warning: the variants take different inputs: {mismatch}; a request that "
        "fits one gets a 400 from devices that run another (export the models with the same "
        "input shapes)"
    ]

    assert fleet_main(["bundle", "inspect", str(out)]) == 0
    shown = capsys.readouterr().out.splitlines()
    assert "             in  x:FP32[-1, 16]" in shown
    assert "             in  x:FP32[1, 16]" in shown
    assert [line for line in shown if line.startswith("inputs")] == [
        f"inputs     differ between variants: {mismatch} (a request that fits one gets a 400 "
        "from devices that run another)"
    ]
    assert fleet_main(["bundle", "inspect", "--json", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["input_mismatch"] == mismatch


def test_variants_that_take_the_same_inputs_are_not_flagged(
    onnx_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "m.emb"
    argv = ["bundle", "build", "--name", "m", "--version", "1.0.0", "--quantize", "int8"]
    assert fleet_main([*argv, "-o", str(out), str(onnx_model)]) == 0
    assert capsys.readouterr().err == ""
    assert fleet_main(["bundle", "inspect", "--json", str(out)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [v["id"] for v in doc["manifest"]["variants"]] == ["onnx-fp32", "onnx-int8"]
    assert doc["input_mismatch"] is None
