"""The topic scheme, as pure frozen dataclasses (no paho here).

Under one configurable prefix (default ``ema/v1``)::

    devices/{id}/desired     retained   fleet -> device   signed deployment document
    devices/{id}/reported    retained   device -> fleet   what runs, what failed and why
    devices/{id}/online      retained   device -> fleet   "online"; the will says "offline"
    devices/{id}/telemetry              device -> fleet   metrics
    devices/{id}/events                 device -> fleet   phase changes and errors
    devices/{id}/blocks                 server -> device  block replies
    groups/{group}/desired   retained   fleet -> devices  signed deployment document
    bundles/{sha256}/request/{id}       device -> server  block requests (a shared subscription)
    trust                    retained   fleet -> devices  root chain and keyring updates
    rollouts/{id}/plan       retained   fleet -> fleet    a rollout's plan (waves, gate, prior versions)
    rollouts/{id}/state      retained   fleet -> fleet    where it stands, and which controller drives it
    rollouts/{id}/control    retained   fleet -> fleet    pause, resume, abort

The requesting device's id is the last level of a block request's topic, where the broker's ACL
binds it to the device's certificate; a bundle server answers that device only.

Device and group ids are single topic levels: letters, digits, ``.``, ``_`` and ``-``, at most 64
characters, so no id can contain ``/``, ``+`` or ``#`` and reach into another device's topics.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from agent.errors import ConfigError, FormatError
from agent.values import ID_PATTERN

DEFAULT_PREFIX = "ema/v1"
SHARE_GROUP = "ema-bundle-servers"

_ID = re.compile(ID_PATTERN)
_SHA256 = re.compile(r"[0-9a-f]{64}")
_PREFIX = re.compile(r"[A-Za-z0-9._-]{1,64}(/[A-Za-z0-9._-]{1,64}){0,7}")

RolloutChannel = Literal["plan", "state", "control"]
DeviceChannel = Literal["desired", "reported", "online", "telemetry", "events", "blocks"]
_DEVICE_CHANNELS: tuple[DeviceChannel, ...] = (
    "desired",
    "reported",
    "online",
    "telemetry",
    "events",
    "blocks",
)

_ROLLOUT_CHANNELS: tuple[RolloutChannel, ...] = ("plan", "state", "control")


def check_id(value: str, what: str = "id") -> str:
    """Return ``value`` if it is a valid device or group id; raise ConfigError otherwise."""
    if not _ID.fullmatch(value):
        raise ConfigError(
            f"{what} {value!r} must be 1-64 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit"
        )
    return value


@dataclass(frozen=True)
class TopicRef:
    """What an incoming topic addresses."""

    kind: Literal["device", "group", "bundle", "trust", "rollout"]
    channel: str  # "desired", "reported", ..., "request", "trust"
    id: str = ""  # device id, group id or bundle sha256
    device: str = ""  # the requesting device, for a block request


@dataclass(frozen=True)
class DeviceTopics:
    prefix: str
    device_id: str

    def _t(self, channel: DeviceChannel) -> str:
        return f"{self.prefix}/devices/{self.device_id}/{channel}"

    @property
    def desired(self) -> str:
        return self._t("desired")

    @property
    def reported(self) -> str:
        return self._t("reported")

    @property
    def online(self) -> str:
        return self._t("online")

    @property
    def telemetry(self) -> str:
        return self._t("telemetry")

    @property
    def events(self) -> str:
        return self._t("events")

    @property
    def blocks(self) -> str:
        return self._t("blocks")


@dataclass(frozen=True)
class Topics:
    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not _PREFIX.fullmatch(self.prefix):
            raise ConfigError(
                f"topic prefix {self.prefix!r} must be up to 8 levels of [A-Za-z0-9._-] "
                "with no wildcards"
            )

    def device(self, device_id: str) -> DeviceTopics:
        return DeviceTopics(self.prefix, check_id(device_id, "device id"))

    def group_desired(self, group: str) -> str:
        return f"{self.prefix}/groups/{check_id(group, 'group')}/desired"

    def bundle_request(self, bundle_sha256: str, device_id: str) -> str:
        if not _SHA256.fullmatch(bundle_sha256):
            raise ConfigError(f"{bundle_sha256!r} is not a SHA-256 in hex")
        return f"{self.prefix}/bundles/{bundle_sha256}/request/{check_id(device_id, 'device id')}"

    @property
    def trust(self) -> str:
        return f"{self.prefix}/trust"

    def rollout(self, rollout_id: str, channel: RolloutChannel) -> str:
        return f"{self.prefix}/rollouts/{check_id(rollout_id, 'rollout id')}/{channel}"

    def all_rollouts_filter(self, channel: RolloutChannel) -> str:
        return f"{self.prefix}/rollouts/+/{channel}"

    # -- subscriptions of the fleet side --------------------------------------------------------
    def bundle_requests_filter(self, shared: bool = True) -> str:
        """Block requests for every bundle; shared so several servers split the load (MQTT 5)."""
        plain = f"{self.prefix}/bundles/+/request/+"
        return f"$share/{SHARE_GROUP}/{plain}" if shared else plain

    def all_devices_filter(self, channel: DeviceChannel) -> str:
        return f"{self.prefix}/devices/+/{channel}"

    # -- parsing --------------------------------------------------------------------------------
    def parse(self, topic: str) -> TopicRef:
        """Say what ``topic`` addresses; FormatError for anything outside the scheme."""
        head = self.prefix + "/"
        if not topic.startswith(head):
            raise FormatError(f"topic {topic!r} is outside the prefix {self.prefix!r}")
        parts = topic[len(head) :].split("/")
        if parts == ["trust"]:
            return TopicRef("trust", "trust")
        if len(parts) == 3:
            section, ident, channel = parts
            if section == "devices" and channel in _DEVICE_CHANNELS and _ID.fullmatch(ident):
                return TopicRef("device", channel, ident)
            if section == "groups" and channel == "desired" and _ID.fullmatch(ident):
                return TopicRef("group", channel, ident)
            if section == "rollouts" and channel in _ROLLOUT_CHANNELS and _ID.fullmatch(ident):
                return TopicRef("rollout", channel, ident)
        if len(parts) == 4:
            section, ident, channel, device = parts
            if (
                section == "bundles"
                and channel == "request"
                and _SHA256.fullmatch(ident)
                and _ID.fullmatch(device)
            ):
                return TopicRef("bundle", channel, ident, device)
        raise FormatError(f"topic {topic!r} is not part of the scheme")
