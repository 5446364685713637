"""``/etc/edge-agent/agent.toml``: the agent's configuration (pydantic, no extras).

Only the device id is required; everything else has a default (see config/agent.toml, which
lists them all with comments). The package ships agent.toml as pure defaults; what a box sets
(its id, groups, broker and certificates: ``edge-agent enroll`` writes them) goes in drop-ins,
``agent.toml.d/*.toml`` beside it, read after it in lexical order: a later file wins, table by
table (a table in a drop-in changes only the keys it names). So an upgrade that changes the
shipped file never stops at dpkg's conffile prompt. ``EDGE_AGENT_<TABLE>__<KEY>=value``
environment variables override them all (see :func:`load_config`). Validation never touches the
network; ``edge-agent check-config [FILE]`` also checks the files the settings name.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agent.bundle.limits import BundleLimits
from agent.errors import ConfigProblems
from agent.runtime.choice import RuntimeConfig
from agent.serving.api import ApiSettings
from agent.serving.slots import SlotSettings
from agent.statusd import DEFAULT_SOCKET
from agent.transport.fetch import TransferSettings
from agent.transport.session import MqttSettings
from agent.transport.topics import DEFAULT_PREFIX, Topics
from agent.upstream import TelemetrySettings
from agent.values import TargetId

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

DEFAULT_CONFIG = Path("/etc/edge-agent/agent.toml")
DROPIN_SUFFIX = ".d"  # agent.toml.d beside agent.toml
DEFAULT_STATE_DIR = Path("/var/lib/edge-agent")


class TrustSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # The root trusted out of band (installed with the package or by the operator).
    root: Path = Path("/etc/edge-agent/root.json")
    # An optional first keyring; later ones arrive on the retained trust topic.
    keyring: Path | None = None


class AgentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    device_id: TargetId
    groups: list[TargetId] = Field(default=[], max_length=32)  # in order of precedence
    topic_prefix: str = DEFAULT_PREFIX
    state_dir: Path = DEFAULT_STATE_DIR
    mqtt: MqttSettings = MqttSettings()
    trust: TrustSettings = TrustSettings()
    transfer: TransferSettings = TransferSettings()
    limits: BundleLimits = BundleLimits()
    runtime: RuntimeConfig = RuntimeConfig()
    serving: SlotSettings = SlotSettings()
    api: ApiSettings = ApiSettings()
    telemetry: TelemetrySettings = (
        TelemetrySettings()
    )  # port and unix_socket both unset: no local API
    report_interval_s: Annotated[float, Field(gt=0)] = 1.0  # least time between progress reports
    status_socket: Path | None = DEFAULT_SOCKET  # `edge-agent status` asks here; None: no socket

    @field_validator("status_socket", mode="before")
    @classmethod
    def _status_off(cls, value: object) -> object:
        """TOML has no null: ``""`` (or ``false``) turns the status socket off."""
        return None if value is False or value == "" else value

    @field_validator("status_socket")
    @classmethod
    def _status_absolute(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_absolute():
            raise ValueError("must be an absolute path")
        return value

    @property
    def topics(self) -> Topics:
        return Topics(self.topic_prefix)


ENV_PREFIX = "EDGE_AGENT_"


@dataclass(frozen=True)
class Override:
    """One ``EDGE_AGENT_<SECTION>__<KEY>=value`` environment variable."""

    variable: str
    key: tuple[str, ...]  # ("mqtt", "host")
    raw: str
    value: object  # the raw text parsed as a TOML value, or the raw text itself

    @property
    def dotted(self) -> str:
        return ".".join(self.key)


def _toml_value(raw: str) -> object:
    """``16`` -> 16, ``true`` -> True, ``["a","b"]`` -> a list, ``"x"`` -> x; else the text."""
    try:
        parsed = tomllib.loads(f"v = {raw}")
    except tomllib.TOMLDecodeError:
        return raw
    return parsed["v"] if list(parsed) == ["v"] else raw


def env_overrides(environ: Mapping[str, str]) -> list[Override]:
    """The ``EDGE_AGENT_...`` variables in ``environ``, sorted by name; a malformed name is refused."""
    overrides = []
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX):
            continue
        key = tuple(name[len(ENV_PREFIX) :].lower().split("__"))
        if not all(key):
            raise ConfigProblems(
                [f"{name}: not a setting (EDGE_AGENT_<KEY> or EDGE_AGENT_<TABLE>__<KEY>)"]
            )
        overrides.append(Override(name, key, environ[name], _toml_value(environ[name])))
    return overrides


def _apply(data: dict[str, Any], overrides: list[Override]) -> list[str]:
    """Set each override in ``data`` (tables created as needed); the clashes, as problems."""
    problems = []
    for o in overrides:
        table = data
        for depth, part in enumerate(o.key[:-1]):
            table = table.setdefault(part, {})
            if not isinstance(table, dict):
                where = ".".join(o.key[: depth + 1])
                problems.append(f"{o.variable}: {o.dotted}: {where} is not a table")
                break
        else:
            table[o.key[-1]] = o.value
    return problems


def _source(loc: tuple[str | int, ...], kind: str, overrides: list[Override]) -> Override | None:
    """The override an error is about: at or under its key, or an unknown table on its way."""
    for o in overrides:
        if loc[: len(o.key)] == o.key or (kind == "extra_forbidden" and o.key[: len(loc)] == loc):
            return o
    return None


def dropin_dir(path: Path) -> Path:
    """The drop-in directory of the config file ``path``: ``agent.toml.d`` beside it."""
    return path.with_name(path.name + DROPIN_SUFFIX)


def config_files(path: Path) -> list[Path]:
    """``path``, then its drop-ins (``*.toml`` in ``agent.toml.d``, lexical order; names that
    start with a dot, such as a file being written, are left out): the files
    :func:`load_config` reads, in order. No drop-in directory is no drop-ins."""
    directory = dropin_dir(path)
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except FileNotFoundError:
        return [path]
    except NotADirectoryError:
        raise ConfigProblems([f"{directory} is not a directory"]) from None
    except OSError as exc:
        raise ConfigProblems([f"cannot read {directory}: {exc.strerror}"]) from None
    return [
        path,
        *(Path(e.path) for e in entries if e.name.endswith(".toml") and not e.name.startswith(".")),
    ]


Sources = dict[tuple[str, ...], Path]


def _merge(into: dict[str, Any], data: dict[str, Any], file: Path, sources: Sources) -> None:
    """Merge ``data`` into ``into`` table-wise (a table merges key by key; any other value
    replaces); ``sources`` records the file each key was set in."""

    def walk(target: dict[str, Any], new: dict[str, Any], prefix: tuple[str, ...]) -> None:
        for key, value in new.items():
            where = (*prefix, key)
            if isinstance(value, dict) and isinstance(target.get(key), dict):
                walk(target[key], value, where)
            else:
                target[key] = value
                for known in [k for k in sources if k[: len(where)] == where]:
                    del sources[known]
                sources[where] = file

    walk(into, data, ())


def _file_of(loc: tuple[str | int, ...], sources: Sources, default: Path) -> Path:
    """The file that set the key at ``loc`` (or the table it lies in); else ``default``."""
    for depth in range(len(loc), 0, -1):
        found = sources.get(tuple(str(p) for p in loc[:depth]))
        if found is not None:
            return found
    return default


def _validate(
    data: dict[str, Any],
    path: Path,
    overrides: list[Override],
    sources: Sources | None = None,
) -> AgentConfig | list[str]:
    try:
        config = AgentConfig.model_validate(data)
        config.topics  # noqa: B018 - checks the prefix
    except ValidationError as exc:
        problems = []
        for e in exc.errors():
            loc = tuple(e["loc"])
            dotted = ".".join(str(p) for p in loc) or "(top)"
            o = _source(loc, e["type"], overrides)
            if o is not None and len(o.key) > len(loc):  # an unknown table: name the whole key
                dotted = o.dotted
            where = o.variable if o else _file_of(loc, sources or {}, path)
            problems.append(f"{where}: {dotted}: {e['msg']}")
        return problems
    return config


def read_toml(path: Path) -> dict[str, Any]:
    """The tables of a TOML file; ConfigProblems saying why it cannot be read."""
    try:
        with open(path, "rb") as f:
            data: dict[str, Any] = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigProblems([f"{path} does not exist"]) from None
    except IsADirectoryError:
        raise ConfigProblems([f"{path} is a directory"]) from None
    except OSError as exc:
        raise ConfigProblems([f"cannot read {path}: {exc.strerror}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigProblems([f"{path} is not valid TOML: {exc}"]) from None
    return data


def load_config(path: Path, environ: Mapping[str, str] = os.environ) -> AgentConfig:
    """Read and check agent.toml and its drop-ins, then the ``EDGE_AGENT_...`` overrides in
    ``environ``.

    The drop-ins (``agent.toml.d/*.toml`` beside ``path``, see :func:`config_files`) are merged
    over the file in lexical order, table by table: ``[mqtt] host`` in a drop-in changes the
    host and keeps the file's other ``[mqtt]`` keys; a later drop-in wins.

    ``EDGE_AGENT_<TABLE>__<KEY>=value`` sets ``[table] key`` (``__`` separates each level;
    ``EDGE_AGENT_DEVICE_ID`` a top-level key). The value is read as a TOML value when it is one
    (``16``, ``true``, ``["a", "b"]``, ``"quoted"``), else as a string; a bare number or boolean
    given to a text setting (``EDGE_AGENT_MQTT__PROTOCOL=5``) stays the text it was.

    ConfigProblems (a ConfigError) names, for each problem, the file (the one that set the key)
    or the variable, the dotted key and the reason.
    """
    files = config_files(path)
    data: dict[str, Any] = {}
    sources: Sources = {}
    for file in files:
        _merge(data, read_toml(file), file, sources)
    overrides = env_overrides(environ)
    clashes = _apply(data, overrides)
    if clashes:
        raise ConfigProblems(clashes)
    result = _validate(data, path, overrides, sources)
    if isinstance(result, list):
        # A number or boolean where text is wanted (a protocol "5", a client id 1234): the text.
        failing = [
            o
            for o in overrides
            if not isinstance(o.value, (str, list, dict))
            and any(p.startswith(f"{o.variable}: ") for p in result)
        ]
        if failing:
            for o in failing:
                _apply(data, [replace(o, value=o.raw)])
            result = _validate(data, path, overrides, sources)
    if isinstance(result, list):
        raise ConfigProblems(result)
    return result
