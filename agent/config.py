"""``/etc/edge-agent/agent.toml``: the agent's configuration (pydantic, no extras).

Only the device id is required; everything else has a default (see config/agent.toml, which
lists them all with comments). Validation never touches the network.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.bundle.limits import BundleLimits
from agent.errors import ConfigError
from agent.runtime.hardware import RuntimeConfig
from agent.serving.api import ApiSettings
from agent.serving.slots import SlotSettings
from agent.transport.session import MqttSettings
from agent.transport.topics import DEFAULT_PREFIX, Topics
from agent.transport.transfer import TransferSettings
from agent.trust.metadata import TargetId

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

DEFAULT_CONFIG = Path("/etc/edge-agent/agent.toml")
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
    api: ApiSettings = ApiSettings()  # port and unix_socket both unset: no local API
    report_interval_s: Annotated[float, Field(gt=0)] = 1.0  # least time between progress reports

    @property
    def topics(self) -> Topics:
        return Topics(self.topic_prefix)


def load_config(path: Path) -> AgentConfig:
    """Read and check agent.toml; ConfigError names the file and the bad field."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    try:
        config = AgentConfig.model_validate(data)
        config.topics  # noqa: B018 - checks the prefix
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"{path}: {problems}") from None
    return config
