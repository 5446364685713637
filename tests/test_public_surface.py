"""The public surface that agent/__init__.py declares: each module of it says what it offers in
``__all__``, every name there resolves and is defined on the surface itself, and importing the
fleet library costs nothing until a name of it is used."""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

import agent
from agent.errors import BadContentError

PUBLIC = list(agent.PUBLIC_MODULES)


def test_the_package_docstring_names_every_public_module() -> None:
    doc = agent.__doc__ or ""
    for name in PUBLIC:
        assert f"``{name}``" in doc, name


@pytest.mark.parametrize("name", PUBLIC)
def test_each_public_module_lists_names_that_resolve(name: str) -> None:
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    assert isinstance(exported, list), f"{name} has no __all__"
    assert exported, f"{name}.__all__ is empty"
    assert len(set(exported)) == len(exported), f"{name}.__all__ repeats a name"
    for attr in exported:
        assert not attr.startswith("_"), f"{name}.__all__ offers the private name {attr}"
        assert hasattr(module, attr), f"{name}.__all__ names {attr}, which it lacks"


def _home(obj: object) -> str | None:
    if inspect.isclass(obj) or inspect.isfunction(obj):
        return obj.__module__
    return None


@pytest.mark.parametrize("name", PUBLIC)
def test_public_names_are_defined_on_the_public_surface(name: str) -> None:
    """A class or function offered publicly lives in a public module (or a module below one), so
    that no internal module's name becomes part of the surface by being re-exported."""
    module = importlib.import_module(name)
    for attr in module.__all__:
        home = _home(getattr(module, attr))
        if home is None:
            continue
        assert any(home == p or home.startswith(p + ".") for p in PUBLIC), (
            f"{name}.{attr} is defined in {home}, which is internal"
        )


def test_importing_the_fleet_library_imports_no_heavy_dependency() -> None:
    """Nor do signing and deployment documents: a program that only signs needs no broker."""
    code = (
        "import sys, agent.fleet; "
        "agent.fleet.make_deployment, agent.fleet.sign_bundle, agent.fleet.KeyStore; "
        "print(sorted(m for m in ('numpy', 'onnx', 'paho', 'onnxruntime') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    assert out.strip() == "[]"


def test_a_fleet_name_is_imported_on_first_use() -> None:
    import agent.fleet
    from agent.fleet.sign import sign_bundle

    assert agent.fleet.sign_bundle is sign_bundle
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        _ = agent.fleet.nothing_here  # type: ignore[attr-defined]
    assert set(agent.fleet.__all__) <= set(dir(agent.fleet))


def test_the_surface_alone_builds_signs_and_verifies_a_bundle(tmp_path: Path) -> None:
    """The README's library example: nothing but ``agent.fleet`` and ``agent.verify``."""
    from agent.fleet import BuildOptions, KeyStore, build_bundle, load_signer, sign_bundle
    from agent.testing.models import make_onnx
    from agent.verify import verify_file

    now = datetime.now(timezone.utc)
    keys = KeyStore.init(tmp_path / "keys", now=now, root_keys=1, threshold=1)
    model = make_onnx(tmp_path / "model.onnx")
    built = build_bundle(
        [model], tmp_path / "classifier.emb", BuildOptions(name="classifier", version="1.2.0")
    )
    signer = load_signer(keys.release_key_paths()[0])
    sign_bundle(built.path, [signer], now=now)
    verified = verify_file(built.path, keys.root, now=now)
    assert verified.descriptor.model == "classifier"
    assert verified.descriptor.version == "1.2.0"

    # One byte changed: the same call refuses it.
    data = bytearray(built.path.read_bytes())
    data[-600] ^= 1
    built.path.write_bytes(bytes(data))
    with pytest.raises(BadContentError):
        verify_file(built.path, keys.root, now=now)
