"""The backend contract, held by all three runtimes on tiny models the tests build.

Every backend loads a variant from an unpacked bundle layout, matches the numpy reference, checks
inputs against the model's metadata (FormatError with a clear message), warms up with progress,
serves several threads at once, and maps its runtime's exceptions to agent.errors.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from agent.bundle.manifest import FileEntry, TensorSpec, Variant
from agent.errors import ConfigError, FormatError, InputShapeError, ToolError
from agent.fleet._models import Runner, convert_openvino, inspect_model
from agent.runtime.base import (
    REGISTRY,
    LiteRtSettings,
    LoadedModel,
    OnnxRuntimeSettings,
    OpenVinoSettings,
    check_inputs,
    default_settings,
    get_backend,
    kserve_datatype,
    merge_with_manifest,
)
from agent.testing.models import make_onnx, make_tflite, make_tflite_add, make_two_inputs, reference

KEYS = ["onnxruntime", "openvino", "litert"]


def lay_out(model: Path, root: Path, variant_id: str, **changes: object) -> Variant:
    """Copy a model's files to ``root/variants/<id>/`` as an unpacked bundle holds them, and
    describe them as the manifest would (``changes`` alter the description)."""
    info = inspect_model(model)
    entries = []
    for path in info.files:
        member = f"variants/{variant_id}/{path.name}"
        (root / member).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, root / member)
        data = path.read_bytes()
        entries.append(
            FileEntry(path=member, size=len(data), sha256=hashlib.sha256(data).hexdigest())
        )
    fields: dict[str, object] = {
        "id": variant_id,
        "format": info.format,
        "precision": info.precision,
        "entrypoint": entries[0].path,
        "files": entries,
        "inputs": list(info.inputs),
        "outputs": list(info.outputs),
    }
    fields.update(changes)
    return Variant(**fields)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny model per runtime, all with the same weights: y = relu(x @ W + B)."""
    d = tmp_path_factory.mktemp("models")
    onnx_path = make_onnx(d / "tiny.onnx")
    (d / "ov").mkdir()
    return {
        "onnxruntime": onnx_path,
        "openvino": convert_openvino(inspect_model(onnx_path), d / "ov" / "tiny.xml"),
        "litert": make_tflite(d / "tiny.tflite"),
        "reference": onnx_path,
    }


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory, models: dict[str, Path]) -> Path:
    return tmp_path_factory.mktemp("bundle")


def load(key: str, models: dict[str, Path], root: Path, **settings: object) -> LoadedModel:
    variant = lay_out(models[key], root, f"{key}-v")
    cls = type(default_settings(key))
    return get_backend(key).load(root, variant, cls(**settings))


@pytest.fixture(params=KEYS)
def loaded(request: pytest.FixtureRequest, models: dict[str, Path], bundle_dir: Path):
    model = load(request.param, models, bundle_dir)
    yield request.param, model
    model.close()


def batch(key: str) -> int:
    """The tiny TFLite model has a fixed batch of 1; the ONNX and IR models take any batch."""
    return 1 if key == "litert" else 3


def test_every_backend_matches_the_numpy_reference(loaded, models: dict[str, Path]) -> None:
    key, model = loaded
    rng = np.random.default_rng(11)
    for _ in range(3):
        x = rng.standard_normal((batch(key), 16)).astype(np.float32)
        out = model.infer({"x": x})
        assert list(out) == ["y"]
        assert out["y"].dtype == np.float32
        np.testing.assert_allclose(out["y"], reference(models["reference"], x), atol=1e-5)
    first = 1 if key == "litert" else -1
    assert [(t.name, t.datatype, t.shape) for t in model.inputs] == [("x", "FP32", [first, 16])]
    assert [(t.name, t.datatype, t.shape) for t in model.outputs] == [("y", "FP32", [first, 8])]
    label = {"onnxruntime": "onnxruntime ", "openvino": "openvino ", "litert": "litert "}[key]
    assert model.runtime.startswith(label)
    assert len(model.runtime) <= 64  # fits the reported ModelStatus.runtime


BAD_INPUTS = [
    pytest.param({"z": np.zeros((1, 16), np.float32)}, r"unknown input 'z'; the model's inputs are 'x'", id="wrong-name"),
    pytest.param({}, r"missing input 'x' \(FP32\[.*, 16\]\)", id="missing"),
    pytest.param(
        {"x": np.zeros((1, 16), np.float32), "extra": np.zeros(1, np.float32)},
        r"unknown input 'extra'",
        id="extra-name",
    ),
    pytest.param({"x": np.zeros((1, 16), np.float64)}, r"input 'x' is FP64; the model takes FP32", id="fp64"),
    pytest.param({"x": np.zeros((1, 16), np.int32)}, r"input 'x' is INT32; the model takes FP32", id="int32"),
    pytest.param({"x": np.zeros((1, 16), np.float16)}, r"input 'x' is FP16; the model takes FP32", id="fp16"),
    pytest.param({"x": np.zeros((1, 16), ">f4")}, r"input 'x' is >f4; the model takes FP32", id="big-endian"),
    pytest.param({"x": np.zeros(16, np.float32)}, r"input 'x' has shape \[16\]; the model takes \[.*, 16\] \(-1: any size\)", id="rank"),
    pytest.param({"x": np.zeros((1, 15), np.float32)}, r"input 'x' has shape \[1, 15\]; the model takes", id="size"),
    pytest.param({"x": np.zeros((1, 16, 1), np.float32)}, r"input 'x' has shape \[1, 16, 1\]", id="rank-3"),
    pytest.param({"x": [[0.0] * 16]}, r"input 'x' is a list, not an array", id="list"),
]  # fmt: skip


@pytest.mark.parametrize(("inputs", "message"), BAD_INPUTS)
def test_bad_input_is_a_format_error_with_a_clear_message(
    loaded, inputs: dict[str, object], message: str
) -> None:
    _, model = loaded
    with pytest.raises(FormatError, match=message):
        model.infer(inputs)  # type: ignore[arg-type]
    # The model still serves after refusing.
    assert model.infer({"x": np.zeros((1, 16), np.float32)})["y"].shape == (1, 8)


def test_a_fixed_batch_refuses_another_batch(models: dict[str, Path], tmp_path: Path) -> None:
    model = load("litert", models, tmp_path)
    with pytest.raises(FormatError, match=r"has shape \[2, 16\]; the model takes \[1, 16\]"):
        model.infer({"x": np.zeros((2, 16), np.float32)})


# -- inputs that must agree on a dimension ---------------------------------------------------

MISMATCHED = {"x": np.ones((2, 4), np.float32), "y": np.ones((3, 4), np.float32)}


@pytest.mark.parametrize("op", ["Add", "Concat"])
def test_inputs_that_disagree_on_a_shared_dimension_are_refused_before_running(
    op: str, tmp_path: Path
) -> None:
    """x and y both [N, 4] in the ONNX file: ONNX Runtime names N for both, so a request with
    batches 2 and 3 is refused by the check, naming the inputs and the dimension."""
    model = get_backend("onnxruntime").load_file(
        make_two_inputs(tmp_path / "m.onnx", op=op), OnnxRuntimeSettings(providers=["cpu"])
    )
    assert model.dim_names == {"x": ["N", None], "y": ["N", None]}  # type: ignore[attr-defined]
    with pytest.raises(
        InputShapeError,
        match=r"inputs 'x' and 'y' disagree on dimension 'N', which the model shares between "
        r"them: 'x' has 2 \(axis 0\), 'y' has 3 \(axis 0\)",
    ):
        model.infer(MISMATCHED)
    z = model.infer({"x": np.ones((3, 4), np.float32), "y": np.full((3, 4), 2, np.float32)})["z"]
    assert z.shape == ((3, 4) if op == "Add" else (3, 8))
    assert float(z.sum()) == 36.0  # 12 ones and 12 twos, added or side by side


def test_one_input_may_name_a_dimension_twice() -> None:
    specs = [TensorSpec(name="m", datatype="FP32", shape=[-1, -1])]
    square = {"m": ["K", "K"]}
    assert check_inputs(specs, {"m": np.zeros((3, 3), np.float32)}, square)["m"].shape == (3, 3)
    with pytest.raises(InputShapeError, match=r"input 'm' has 3 at axis 0 and 4 at axis 1"):
        check_inputs(specs, {"m": np.zeros((3, 4), np.float32)}, square)


def _two_input_model(key: str, tmp_path: Path) -> LoadedModel:
    if key == "litert":
        return get_backend("litert").load_file(
            make_tflite_add(tmp_path / "add.tflite"), LiteRtSettings()
        )
    if key == "openvino":  # the ONNX file names N; OpenVINO keeps no name (see its module)
        path = make_two_inputs(tmp_path / "add.onnx")
        return get_backend("openvino").load_file(path, OpenVinoSettings(device="CPU"))
    path = make_two_inputs(tmp_path / "add.onnx", dims=(None, None))  # no name in the file
    return get_backend("onnxruntime").load_file(path, OnnxRuntimeSettings(providers=["cpu"]))


@pytest.mark.parametrize("key", KEYS)
def test_a_runtime_refusing_mismatched_unnamed_dimensions_is_an_input_shape_error(
    key: str, tmp_path: Path
) -> None:
    """Where the runtime cannot say the inputs share a dimension, their disagreement is only
    found when the runtime refuses them: that refusal is the request's mistake, at the adapter
    edge, and the model goes on serving (LiteRT reallocates for the next request)."""
    model = _two_input_model(key, tmp_path)
    assert all(name is None for names in model.dim_names.values() for name in names)  # type: ignore[attr-defined]
    for _ in range(2):  # the same bad shapes twice: LiteRT must not run unallocated tensors
        with pytest.raises(
            InputShapeError,
            match=r"the runtime refused inputs that differ in size where the model may need them "
            r"equal \(at axis 0, 'x' has 2, 'y' has 3\): \S",
        ) as info:
            model.infer(MISMATCHED)
        assert "Exception from" not in str(info.value)
    z = model.infer({"x": np.ones((2, 4), np.float32), "y": np.full((2, 4), 2, np.float32)})["z"]
    np.testing.assert_array_equal(z, np.full((2, 4), 3, np.float32))
    model.close()


def test_a_model_failing_on_input_its_metadata_admits_is_a_tool_error(tmp_path: Path) -> None:
    """x [N, 4] and y [M, 4]: the file says the batches are independent, so a request with 2
    and 3 fits the model's metadata and its failure is the model's, not the request's."""
    path = make_two_inputs(tmp_path / "nm.onnx", dims=("N", "M"))
    model = get_backend("onnxruntime").load_file(path, OnnxRuntimeSettings(providers=["cpu"]))
    with pytest.raises(ToolError, match=r"inference failed.*broadcast"):
        model.infer(MISMATCHED)


def test_warm_up_reports_progress_on_the_calling_thread(loaded) -> None:
    _, model = loaded
    seen: list[tuple[float, str]] = []
    model.warm_up(lambda p: seen.append((p, threading.current_thread().name)))
    assert [p for p, _ in seen] == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0])
    assert {t for _, t in seen} == {threading.current_thread().name}
    model.warm_up()  # progress is optional


def test_concurrent_infer_from_many_threads(loaded, models: dict[str, Path]) -> None:
    key, model = loaded
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            for _ in range(25):
                x = rng.standard_normal((batch(key), 16)).astype(np.float32)
                y = model.infer({"x": x})["y"]
                np.testing.assert_allclose(y, reference(models["reference"], x), atol=1e-5)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    if key == "openvino":
        # One infer request per concurrent call, reused afterwards: never more than the threads.
        assert 1 <= model.requests_made <= 8  # type: ignore[attr-defined]


def test_closed_model_refuses_to_run(models: dict[str, Path], tmp_path: Path) -> None:
    for key in KEYS:
        model = load(key, models, tmp_path)
        model.close()
        model.close()  # twice is harmless
        with pytest.raises(ToolError, match="closed"):
            model.infer({"x": np.zeros((1, 16), np.float32)})


@pytest.mark.parametrize("key", KEYS)
def test_manifest_that_disagrees_with_the_model_is_refused(
    key: str, models: dict[str, Path], tmp_path: Path
) -> None:
    backend = get_backend(key)
    settings = default_settings(key)
    renamed = lay_out(
        models[key],
        tmp_path,
        "renamed",
        inputs=[TensorSpec(name="img", datatype="FP32", shape=[-1, 16])],
    )
    with pytest.raises(
        FormatError,
        match=r"variant renamed: the model's inputs \['x'\] differ from the manifest's \['img'\]",
    ):
        backend.load(tmp_path, renamed, settings)
    retyped = lay_out(
        models[key],
        tmp_path,
        "retyped",
        outputs=[TensorSpec(name="y", datatype="FP16", shape=[-1, 8])],
    )
    with pytest.raises(
        FormatError,
        match=r"output 'y' is FP32\[.*, 8\] in the model and FP16\[-1, 8\] in the manifest",
    ):
        backend.load(tmp_path, retyped, settings)
    resized = lay_out(
        models[key],
        tmp_path,
        "resized",
        inputs=[TensorSpec(name="x", datatype="FP32", shape=[-1, 32])],
    )
    with pytest.raises(
        FormatError, match=r"input 'x' is FP32\[.*, 16\] in the model and FP32\[-1, 32\]"
    ):
        backend.load(tmp_path, resized, settings)


def test_the_manifest_can_pin_a_dynamic_dimension(models: dict[str, Path], tmp_path: Path) -> None:
    """Where the model says any batch and the signed manifest says 2, inputs must have 2."""
    variant = lay_out(
        models["onnxruntime"],
        tmp_path,
        "pinned",
        inputs=[TensorSpec(name="x", datatype="FP32", shape=[2, 16])],
    )
    model = get_backend("onnxruntime").load(tmp_path, variant, OnnxRuntimeSettings())
    assert model.inputs[0].shape == [2, 16]
    assert model.outputs[0].shape == [-1, 8]
    assert model.infer({"x": np.ones((2, 16), np.float32)})["y"].shape == (2, 8)
    with pytest.raises(FormatError, match=r"takes \[2, 16\]"):
        model.infer({"x": np.ones((3, 16), np.float32)})


@pytest.mark.parametrize(
    ("key", "name", "message"),
    [
        ("onnxruntime", "bad.onnx", "ONNX Runtime refused the model"),
        ("litert", "bad.tflite", "litert refused the model"),
        ("openvino", "bad.xml", "not a readable OpenVINO model"),
    ],
)
def test_a_corrupt_model_file_is_a_format_error(
    key: str, name: str, message: str, tmp_path: Path
) -> None:
    path = tmp_path / name
    path.write_bytes(np.random.default_rng(0).bytes(512))
    if name.endswith(".xml"):
        path.with_suffix(".bin").write_bytes(b"\0" * 64)
    with pytest.raises(FormatError, match=message):
        get_backend(key).load_file(path, default_settings(key))


@pytest.mark.parametrize(
    ("key", "module", "hint"),
    [
        ("onnxruntime", "onnxruntime", r"onnxruntime is not installed; install edge-model-agent\[cpu\]"),
        ("openvino", "openvino", r"openvino is not installed; install edge-model-agent\[openvino\]"),
        ("litert", "ai_edge_litert.interpreter", r"litert is not installed; install edge-model-agent\[tflite\]"),
    ],
)  # fmt: skip
def test_a_missing_runtime_is_a_tool_error(
    key: str, module: str, hint: str, models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A box without the runtime: its import fails (None in sys.modules makes it fail)."""
    monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", None)
    with pytest.raises(ToolError, match=hint):
        get_backend(key).load_file(models[key], default_settings(key))


def test_settings_and_formats_are_checked(models: dict[str, Path], tmp_path: Path) -> None:
    variant = lay_out(models["litert"], tmp_path, "t")
    with pytest.raises(ConfigError, match="backend onnxruntime runs onnx models, not tflite"):
        get_backend("onnxruntime").load(tmp_path, variant, OnnxRuntimeSettings())
    with pytest.raises(
        ConfigError, match="backend litert takes LiteRtSettings, not OpenVinoSettings"
    ):
        get_backend("litert").load(tmp_path, variant, OpenVinoSettings())
    with pytest.raises(
        ConfigError, match="no backend 'tensorflow'; known: onnxruntime, openvino, litert"
    ):
        get_backend("tensorflow")
    with pytest.raises(ConfigError, match="no backend"):
        default_settings("tensorflow")


def test_registry_backends_are_installed_here() -> None:
    for key in REGISTRY:
        backend = get_backend(key)
        assert backend.key == key
        assert backend.available()
        assert backend.version()
    assert get_backend("openvino").formats == ("openvino-ir", "onnx")


def test_backend_modules_import_no_runtime() -> None:
    """A box without OpenVINO still runs: importing the backend modules and the hardware probe
    module imports no runtime package (only ``load`` and ``probe`` do)."""
    code = (
        "import sys, agent.runtime.onnxrt, agent.runtime.openvino, agent.runtime.litert, "
        "agent.runtime.probe, agent.runtime.choice\n"
        "print(sorted(m for m in ('onnxruntime', 'openvino', 'ai_edge_litert') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_datatype_helpers() -> None:
    assert kserve_datatype(np.float32) == "FP32"
    assert kserve_datatype(np.dtype(np.bool_)) == "BOOL"
    assert kserve_datatype(np.dtype("U3")) is None
    assert kserve_datatype("not a dtype") is None
    feeds = check_inputs(
        [TensorSpec(name="x", datatype="FP32", shape=[-1, 2])],
        {"x": np.zeros((4, 2), np.float32).T.T[::2]},
    )
    assert feeds["x"].flags.c_contiguous
    merged = merge_with_manifest(
        "input",
        [TensorSpec(name="x", datatype="FP32", shape=[-1, 2])],
        [TensorSpec(name="x", datatype="FP32", shape=[4, -1])],
    )
    assert merged[0].shape == [4, 2]


def test_fleet_runner_uses_the_same_backends(models: dict[str, Path]) -> None:
    """Bundle build's reference runs go through agent.runtime, CPU, full precision."""
    x = np.random.default_rng(3).standard_normal((1, 16)).astype(np.float32)
    want = reference(models["reference"], x)
    for key in ("onnxruntime", "openvino", "litert"):
        runner = Runner(inspect_model(models[key]))
        np.testing.assert_allclose(runner({"x": x})["y"], want, atol=1e-5)
        with pytest.raises(FormatError, match="input 'x' is FP64"):
            runner({"x": x.astype(np.float64)})
        runner.close()
