"""The dependency direction of shared/DESIGN.md, checked on every import under ``agent/`` (also
those inside functions), the way import-linter's layer contracts work.

From the bottom: the base (shared values, errors, private helpers) that everything may import;
the pure cores ``trust`` and ``bundle``, which import only the base and never each other;
``transport``, ``runtime``, ``state``, ``telemetry`` and ``agent.verify`` on the cores, none of
them importing another; ``serving`` on ``runtime``; the device side on all of those; the fleet
side on all but the device's process; the CLI and the test harness on top. ``bench/`` imports
no test module.

Run it alone to see the map: ``pytest -q tests/test_layers.py -s``.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
AGENT = ROOT / "agent"

BASE = "base"
# Each component and the components it may import (the base always; itself always).
LAYERS: dict[str, set[str]] = {
    BASE: set(),
    "trust": set(),
    "bundle": set(),
    "transport": {"trust", "bundle"},
    "runtime": {"trust", "bundle"},
    "state": {"trust", "bundle"},
    "telemetry": {"trust", "bundle"},
    "verify": {"trust", "bundle"},
    "serving": {"trust", "bundle", "runtime", "state", "verify"},
}
_BELOW_DEVICE = set(LAYERS) - {BASE}
# agent/device/: device-side parts the fleet's simulator runs too; the daemon's process
# (daemon, config, upstream, standalone, checks) sits above them, and the fleet beside it.
LAYERS["device-shared"] = set(_BELOW_DEVICE)
LAYERS["device"] = _BELOW_DEVICE | {"device-shared"}
LAYERS["fleet"] = _BELOW_DEVICE | {"device-shared"}
LAYERS["cli"] = set(LAYERS) - {BASE}
LAYERS["testing"] = set(LAYERS) - {BASE}

# Top-level modules of agent/ and the component each one belongs to.
MODULES = {
    "values": BASE,
    "errors": BASE,
    "logs": BASE,
    "notify": BASE,
    "statusd": BASE,
    "verify": "verify",
    "daemon": "device",
    "config": "device",
    "upstream": "device",
    "standalone": "device",
    "checks": "device",
    "enrol": "device",
    "cli": "cli",
    "testing": "testing",
}


def component(module: str) -> str | None:
    """The component of ``agent.x.y``, or None for a module outside the agent."""
    parts = module.split(".")
    if parts[0] != "agent":
        return None
    if len(parts) == 1 or parts[1].startswith("_") or parts[1] == "__init__":
        return BASE
    if parts[1] == "device":
        return "device-shared"
    if parts[1] in MODULES:
        return MODULES[parts[1]]
    return parts[1]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path, module: str | None = None) -> list[tuple[int, str]]:
    """Every module ``path`` imports (line, absolute name), relative imports resolved."""
    tree = ast.parse(path.read_text(), str(path))
    package = (module or module_name(path)).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package[: len(package) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            out.append((node.lineno, base))
            # ``from agent import cli`` imports the module agent.cli.
            out += [(node.lineno, f"{base}.{a.name}") for a in node.names if base == "agent"]
    return out


def violations(
    files: list[tuple[Path, str]] | None = None,
) -> tuple[list[str], dict[str, set[str]]]:
    """Imports against the layers in ``files`` (path, module name; default: all of agent/),
    and the graph of components actually imported."""
    if files is None:
        files = [(path, module_name(path)) for path in sorted(AGENT.rglob("*.py"))]
    found: list[str] = []
    graph: dict[str, set[str]] = defaultdict(set)
    for path, module in files:
        mine = component(module)
        assert mine in LAYERS, f"{path}: component {mine!r} is in no layer; add it to LAYERS"
        for line, name in imports(path, module):
            theirs = component(name)
            if theirs is None or theirs in (mine, BASE):
                continue
            graph[mine].add(theirs)
            if theirs not in LAYERS[mine]:
                found.append(f"{module}:{line}: {mine} imports {name} ({theirs})")
    return found, graph


def test_every_import_under_agent_goes_with_the_layers() -> None:
    found, graph = violations()
    for mine in sorted(graph):
        print(f"{mine:>14} -> {', '.join(sorted(graph[mine]))}")
    assert not found, "imports against the layers of shared/DESIGN.md:\n" + "\n".join(found)


def test_bench_imports_no_test_module() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{line}: imports {name}"
        for path in sorted((ROOT / "bench").rglob("*.py"))
        for line, name in imports(path)
        if name == "tests" or name.startswith("tests.")
    ]
    assert not found, "bench/ imports test modules:\n" + "\n".join(found)


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    """The checker itself: imports against the direction are reported, lazy and relative ones
    too, and imports with it are not."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from agent.values import Hex64\n"
        "from agent.trust import metadata\n"
        "def f():\n"
        "    from agent.bundle import manifest\n"
        "    from ..fleet import rollout\n"
    )
    found, graph = violations([(probe, "agent.trust.probe")])
    assert found == [
        "agent.trust.probe:4: trust imports agent.bundle (bundle)",
        "agent.trust.probe:5: trust imports agent.fleet (fleet)",
    ]
    assert graph == {"trust": {"bundle", "fleet"}}
    found, _ = violations([(probe, "agent.serving.probe")])
    assert found == ["agent.serving.probe:5: serving imports agent.fleet (fleet)"]
    assert component("agent.fleet.rollout") == "fleet"
    assert component("agent.values") == BASE
    assert component("agent._strictjson") == BASE
    assert component("json") is None
    assert component("agent.daemon") == "device"
    assert "fleet" not in LAYERS["device"]
    assert "device" not in LAYERS["fleet"]
    assert "cli" not in LAYERS["fleet"]
    assert "testing" not in LAYERS["device"]
