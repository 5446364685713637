"""What ``edge-agent check-config`` checks: agent.toml and its overrides, then what the agent
needs on this box before it starts (a device id, the trust files, the TLS files, the state
directory). Nothing is printed here: the result is the problems and warnings, each one line.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from agent.config import AgentConfig, config_files, env_overrides, load_config
from agent.errors import BadContentError, ConfigError, ConfigProblems
from agent.transport.session import MqttSettings, tls_context
from agent.trust.verifier import TrustedState

# What the shipped agent.toml says until a technician sets it.
PLACEHOLDER_DEVICE_ID = "CHANGE-ME"


@dataclass
class ConfigCheck:
    """The outcome of :func:`check_config`.

    ``loaded``: whether the file (with its overrides) loaded. When it did not, ``problems`` are
    the loader's, each naming its file or variable; when it did, they are the checks' of what
    it says, and ``summary`` is what it configures.
    """

    loaded: bool
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    summary: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


def check_config(
    file: Path, environ: Mapping[str, str] = os.environ, now: datetime | None = None
) -> ConfigCheck:
    """Load ``file`` and its drop-ins with the ``EDGE_AGENT_*`` overrides of ``environ`` and
    check what they name."""
    try:
        config = load_config(file, environ)
        files = config_files(file)
    except ConfigProblems as exc:
        return ConfigCheck(loaded=False, problems=list(exc.problems))
    overrides = [o.variable for o in env_overrides(environ)]
    check = ConfigCheck(loaded=True, summary=config_summary(config, overrides, files))
    if config.device_id == PLACEHOLDER_DEVICE_ID:
        check.problems.append(
            f"device_id: still {PLACEHOLDER_DEVICE_ID!r}; set this box's id "
            "(the name its certificate carries)"
        )
    check.problems += check_trust(config, check.warnings, now or datetime.now(timezone.utc))
    check.problems += check_tls(config.mqtt)
    state_problem = check_state_dir(config.state_dir)
    if state_problem:
        check.problems.append(state_problem)
    return check


def check_state_dir(state_dir: Path) -> str | None:
    """None when the agent can use (or create) ``state_dir``; else why not."""
    if state_dir.exists():
        if not state_dir.is_dir():
            return f"state_dir: {state_dir} is not a directory"
        if not os.access(state_dir, os.W_OK | os.X_OK):
            return f"state_dir: {state_dir} is not writable"
        return None
    parent = state_dir.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"state_dir: cannot create {state_dir}: {parent} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"state_dir: cannot create {state_dir}: {parent} is not writable"
    return None


def check_trust(config: AgentConfig, warnings: list[str], now: datetime) -> list[str]:
    """Problems with the trust files; ``warnings`` gets what does not stop the agent but
    stops it deploying (no keyring yet)."""
    problems = []
    try:
        state = TrustedState.from_root(config.trust.root.read_bytes())
        state.check_root_fresh(now)
    except OSError as exc:
        return [f"trust.root: cannot read {config.trust.root}: {exc.strerror}"]
    except BadContentError as exc:
        return [f"trust.root: {config.trust.root} is not a usable root ({exc.code}): {exc}"]
    keyring = None
    if config.trust.keyring is not None:
        try:
            keyring = state.update_keyring(config.trust.keyring.read_bytes(), now).keyring
        except OSError as exc:
            problems.append(f"trust.keyring: cannot read {config.trust.keyring}: {exc.strerror}")
        except BadContentError as exc:
            problems.append(
                f"trust.keyring: {config.trust.keyring} does not verify against "
                f"{config.trust.root} ({exc.code}): {exc}"
            )
    if keyring is None and not problems:
        # One received since (the trust topic), kept in the state directory?
        stored = config.state_dir / "trust" / "keyring.json"
        try:
            keyring = state.update_keyring(stored.read_bytes(), now).keyring
        except (OSError, BadContentError):
            keyring = None
    if keyring is None and not problems:
        warnings.append(
            "trust: no keyring yet, so this box cannot verify any deployment: it takes one "
            "from the fleet's trust topic ('edge-fleet keys publish'), or set [trust] keyring"
        )
    return problems


def check_tls(settings: MqttSettings) -> list[str]:
    """Problems with the TLS files of ``settings``: missing, or not loadable together."""
    if not settings.tls:
        return []
    missing = [
        f"mqtt.{name}: {path} does not exist"
        for name, path in (
            ("ca_file", settings.ca_file),
            ("cert_file", settings.cert_file),
            ("key_file", settings.key_file),
        )
        if path is not None and not path.is_file()
    ]
    if missing:
        return missing
    try:
        tls_context(settings)
    except ConfigError as exc:
        return [f"mqtt: {exc}"]
    return []


def config_summary(
    config: AgentConfig, overrides: list[str], files: list[Path] | None = None
) -> dict[str, Any]:
    """What ``config`` configures, as ``check-config --json`` shows it."""
    api = config.api
    listeners = []
    if api.port is not None:
        listeners.append(f"http://{api.host}:{api.port}")
    if api.unix_socket is not None:
        listeners.append(f"unix:{api.unix_socket}")
    return {
        "device_id": config.device_id,
        "groups": list(config.groups),
        "broker": f"{config.mqtt.host}:{config.mqtt.port}",
        "protocol": config.mqtt.protocol,
        "tls": config.mqtt.tls,
        "state_dir": str(config.state_dir),
        "api": listeners,
        "overrides": overrides,
        "files": [str(f) for f in files or []],
    }
