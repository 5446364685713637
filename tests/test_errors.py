"""The exception tree of agent/errors.py: one place, drawn in full, one code per class."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

from agent import errors
from agent.errors import EdgeAgentError, StorageError, ToolError, unexpected

AGENT = Path(__file__).resolve().parent.parent / "agent"


def _tree() -> list[type[EdgeAgentError]]:
    out, todo = [], [EdgeAgentError]
    while todo:
        cls = todo.pop()
        out.append(cls)
        todo += cls.__subclasses__()
    return out


def test_every_exception_class_under_agent_lives_in_errors() -> None:
    """No module defines an exception of the tree (or any public exception) of its own."""
    found = []
    for path in sorted(AGENT.rglob("*.py")):
        if path.name == "errors.py" and path.parent == AGENT:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                bases = {ast.unparse(b) for b in node.bases}
                if any(b.endswith(("Error", "Exception")) for b in bases):
                    found.append(f"{path.relative_to(AGENT.parent)}:{node.lineno}: {node.name}")
    assert not found, "exception classes outside agent/errors.py:\n" + "\n".join(found)


def test_the_tree_is_drawn_whole_and_codes_are_unique() -> None:
    # Import every module, so that a class defined anywhere would be in the tree.
    for path in sorted(AGENT.rglob("*.py")):
        name = ".".join(path.relative_to(AGENT.parent).with_suffix("").parts)
        if name.endswith("__main__"):
            continue
        try:
            importlib.import_module(name.removesuffix(".__init__"))
        except ImportError:  # an optional runtime (systemd, pynvml) absent here
            continue
    classes = _tree()
    drawn = set(re.findall(r"[├└]── (\w+)", errors.__doc__ or ""))
    assert {c.__name__ for c in classes} - {"EdgeAgentError"} == drawn
    assert all(c.__module__ == "agent.errors" for c in classes)
    # A class that sets a code sets one of its own (ConfigProblems keeps ConfigError's).
    codes = [c.code for c in classes if "code" in vars(c)]
    assert len(codes) == len(set(codes)), sorted(codes)
    assert all(re.fullmatch(r"[a-z][a-z0-9-]{0,63}", code) for code in codes)


def test_unexpected_keeps_ours_and_names_the_type_of_others() -> None:
    ours = StorageError("disk gone")
    assert unexpected(ours) is ours
    mapped = unexpected(KeyError("input"))
    assert type(mapped) is ToolError
    assert str(mapped) == "KeyError: 'input'"
    assert mapped.code == "tool"
    with pytest.raises(ToolError, match=r"^OSError: \[Errno 28\] no space$"):
        raise unexpected(OSError(28, "no space"))
