"""Message schemas for every topic (pydantic, strict), and the binary framing of block replies.

Documents on the wire are UTF-8 JSON objects, except two:

* ``devices/{id}/desired``, ``groups/{g}/desired`` carry a signed deployment (a DSSE envelope,
  see :mod:`agent.trust.metadata`), checked by the trust core before anything is read from it;
* ``devices/{id}/blocks`` carries :func:`encode_block_reply` frames: a short JSON header and the
  raw bytes, so the same frame works on MQTT 3.1.1 (no user properties) and 5.0.

``docs/protocol.md`` is generated from these models (``make docs``); a test fails when it is stale.
"""

from __future__ import annotations

import re
import struct
from typing import Annotated, Literal, TypeVar

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from agent._strictjson import describe_validation_error, dump_model, parse_model
from agent.errors import FormatError, SizeLimitError
from agent.values import Hex64, ModelName, Phase, TargetId

MAX_MESSAGE_BYTES = 256 * 1024
MAX_WINDOW = 64  # blocks one request may ask for
MAX_BLOCK_BYTES = 1 << 20  # the largest block size a descriptor may sign
MAX_BLOCK_REPLY_BYTES = MAX_BLOCK_BYTES + 8192  # one block, its header and the frame
# The largest MQTT packet of the protocol: a reply of MAX_BLOCK_REPLY_BYTES on the longest
# blocks topic (a prefix of 8 levels of 64, a device id of 64: 599 bytes) with the MQTT header
# and properties. config/broker/mosquitto.conf sets ``max_packet_size`` to exactly this.
MAX_BLOCK_PACKET_BYTES = MAX_BLOCK_REPLY_BYTES + 1024
BLOCK_LIST_PAGE = 2048  # digests per block-list page: 64 KiB of SHA-256s
# The packet limit of many brokers: AWS IoT Core allows 128 KiB per message, and mosquitto is
# often run with ``max_packet_size 131072``. ``edge-fleet bundle build`` warns of block sizes
# whose replies do not pass it (devices behind such a broker fail with ``block-too-large``).
COMMON_PACKET_LIMIT = 128 * 1024

Text = Annotated[str, Field(max_length=1024)]


M = TypeVar("M", bound="_Message")


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    def to_bytes(self) -> bytes:
        return dump_model(self)

    @classmethod
    def from_bytes(cls: type[M], data: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES) -> M:
        return parse_model(cls, data, what=cls.__name__, max_bytes=max_bytes)


class ErrorInfo(_Message):
    """A machine-readable ``code`` (the ``code`` of agent.errors) and a message for a person."""

    code: Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]{0,63}$")]
    message: Text


class Online(_Message):
    """``devices/{id}/online``, retained. The will message is ``{"state": "offline"}``."""

    state: Literal["online", "offline"]
    agent_version: Annotated[str, Field(max_length=64)] | None = None
    since: AwareDatetime | None = None


class HardwareProfile(_Message):
    arch: Annotated[str, Field(max_length=32)]
    cpu_count: Annotated[int, Field(ge=1)]
    memory_mb: Annotated[int, Field(ge=0)]
    accelerators: list[Annotated[str, Field(max_length=32)]] = Field(default=[], max_length=16)
    details: dict[Annotated[str, Field(max_length=64)], Text] = Field(default={}, max_length=32)


class VersionRef(_Message):
    """A version of a model by its bundle."""

    version: Annotated[str, Field(max_length=64)]
    release: Annotated[int, Field(ge=1)]
    bundle_sha256: Hex64


class ModelStatus(_Message):
    """One model slot: what it serves now, and where its deployment stands.

    ``version`` ... ``bundle_sha256`` are what answers requests now: during ``probation`` that
    is the new version, and ``fallback`` names the committed version that a failed probation
    goes back to (absent on a first deployment, where there is none). In every other phase the
    committed version serves (while a new one downloads, loads or self-tests beside it).
    """

    phase: Phase
    version: Annotated[str, Field(max_length=64)] | None = None
    release: Annotated[int, Field(ge=1)] | None = None
    variant: Annotated[str, Field(max_length=32)] | None = None
    runtime: Annotated[str, Field(max_length=64)] | None = None
    bundle_sha256: Hex64 | None = None
    progress: Annotated[float, Field(ge=0, le=100)] | None = None  # percent, while downloading
    error: ErrorInfo | None = None
    fallback: VersionRef | None = None


class TrustStatus(_Message):
    """What the device trusts now: the acknowledgement of a trust update."""

    root_version: Annotated[int, Field(ge=1)]
    keyring_version: Annotated[int, Field(ge=1)] | None = None  # None: no keyring yet
    keyring_expires: AwareDatetime | None = None


class Reported(_Message):
    """``devices/{id}/reported``, retained: what runs, what failed and why."""

    type: Literal["reported"] = "reported"
    device_id: TargetId
    agent_version: Annotated[str, Field(max_length=64)]
    at: AwareDatetime
    hardware: HardwareProfile | None = None
    # The groups the device follows, in order of precedence (agent.toml): what the fleet selects
    # a group's devices by (a rollout's target set, ``deploy --group --wait``).
    groups: list[TargetId] = Field(default=[], max_length=32)
    deployment_id: TargetId | None = None
    sequence: Annotated[int, Field(ge=1)] | None = None
    models: dict[ModelName, ModelStatus] = Field(default={}, max_length=16)
    error: ErrorInfo | None = None  # about the deployment document itself (bad signature, ...)
    trust: TrustStatus | None = None


class Event(_Message):
    """``devices/{id}/events``: each phase change and each refusal, in order (``seq``).

    ``seq`` grows with every event, across restarts too; numbers may be skipped (after a
    restart). ``count`` is the number of refusals a ``rejected`` event stands for: refusals
    on one topic with one reason code within a second of the last such event are counted into
    the next one, which carries the last one's error.
    """

    type: Literal["event"] = "event"
    device_id: TargetId
    seq: Annotated[int, Field(ge=0)]
    at: AwareDatetime
    kind: Literal["phase", "rejected", "info"]
    model: ModelName | None = None
    deployment_id: TargetId | None = None
    phase: Phase | None = None
    topic: Annotated[str, Field(max_length=256)] | None = None
    error: ErrorInfo | None = None
    count: Annotated[int, Field(ge=1)] = 1


MAX_TELEMETRY_METRICS = 256


class Telemetry(_Message):
    """``devices/{id}/telemetry``: named gauges and counters at one instant (see METRICS)."""

    type: Literal["telemetry"] = "telemetry"
    device_id: TargetId
    at: AwareDatetime
    metrics: dict[Annotated[str, Field(max_length=128)], float] = Field(
        max_length=MAX_TELEMETRY_METRICS
    )


# Every telemetry metric (``<...>`` stands for one label), its unit and what it measures: the
# table docs/protocol.md shows. A test checks that each name agent.telemetry collects is here.
METRICS: tuple[tuple[str, str, str], ...] = (
    ("cpu.percent", "%", "CPU use of the whole box since the previous reading"),
    ("cpu.load1", "runnable tasks", "load average over 1 minute"),
    ("cpu.load5", "runnable tasks", "load average over 5 minutes"),
    ("cpu.load15", "runnable tasks", "load average over 15 minutes"),
    ("mem.used_mb", "MiB", "memory in use (total minus available)"),
    ("mem.available_mb", "MiB", "memory available to new processes"),
    ("mem.percent", "%", "memory in use"),
    ("proc.rss_mb", "MiB", "the agent's resident memory"),
    ("proc.cpu_percent", "% of one core", "the agent's CPU use since the previous reading"),
    ("proc.threads", "threads", "the agent's threads"),
    ("disk.state_free_mb", "MiB", "free space where the state directory is"),
    ("disk.state_used_mb", "MiB", "used space there"),
    ("disk.state_percent", "%", "used space there"),
    ("temp.<sensor>_c", "°C", "the hottest reading of a sensor group or thermal zone type"),
    ("gpu<i>.util_pct", "%", "NVIDIA GPU i's utilisation (NVML)"),
    ("gpu<i>.mem_used_mb", "MiB", "NVIDIA GPU i's memory in use"),
    ("gpu<i>.mem_total_mb", "MiB", "NVIDIA GPU i's memory"),
    ("gpu<i>.temp_c", "°C", "NVIDIA GPU i's temperature"),
    ("jetson.gpu_util_pct", "%", "a Jetson's integrated GPU load"),
    ("model.<name>.requests", "requests", "inference requests answered since the agent started"),
    ("model.<name>.errors", "requests", "of those, answered with an error"),
    ("model.<name>.rps", "requests/s", "requests per second since the previous reading"),
    ("model.<name>.errors_per_s", "requests/s", "errors per second since the previous reading"),
    ("model.<name>.p50_ms", "ms", "median latency since the previous reading"),
    ("model.<name>.p99_ms", "ms", "99th percentile latency since the previous reading"),
)


def metric_pattern(name: str) -> re.Pattern[str]:
    """The names a :data:`METRICS` entry covers: ``<...>`` is one label."""
    parts = re.split(r"<[a-z]+>", name)
    return re.compile("^" + "[A-Za-z0-9_-]+".join(re.escape(p) for p in parts) + "$")


class BlockRequest(_Message):
    """``bundles/{sha256}/request/{device_id}``: a device asks for blocks or block-list pages.

    The server answers on ``devices/{device_id}/blocks``, the id taken from the topic, where the
    broker's ACL binds it to the device's certificate; ``device_id`` here must be the same.
    """

    type: Literal["block-request"] = "block-request"
    device_id: TargetId
    bundle_sha256: Hex64
    kind: Literal["blocks", "block-list"]
    indexes: list[Annotated[int, Field(ge=0)]] = Field(min_length=1, max_length=MAX_WINDOW)


class BlockReplyHeader(_Message):
    bundle_sha256: Hex64
    kind: Literal["block", "block-list", "error"]
    index: Annotated[int, Field(ge=0)]
    total: Annotated[int, Field(ge=0)]  # blocks in the bundle, or pages in the block list
    error: ErrorInfo | None = None


class TrustUpdate(_Message):
    """``trust``, retained: root versions after the one shipped (in order) and the keyring.

    Each entry is the DSSE envelope exactly as ``edge-fleet keys`` wrote it (its JSON object).
    """

    type: Literal["trust-update"] = "trust-update"
    roots: list[dict[str, object]] = Field(default=[], max_length=64)
    keyring: dict[str, object]


# -- block replies ------------------------------------------------------------------------------
_MAGIC = b"EMB1"
_HEAD = struct.Struct(">4sH")  # magic, header length


def encode_block_reply(header: BlockReplyHeader, data: bytes = b"") -> bytes:
    head = header.to_bytes()
    return _HEAD.pack(_MAGIC, len(head)) + head + data


def block_reply_length(header: BlockReplyHeader, data_len: int) -> int:
    """The length of ``encode_block_reply(header, data)`` for ``data_len`` bytes of data."""
    return _HEAD.size + len(header.to_bytes()) + data_len


def decode_block_reply(
    payload: bytes, *, max_bytes: int = MAX_BLOCK_REPLY_BYTES
) -> tuple[BlockReplyHeader, bytes]:
    """Split a block reply into its header and bytes; FormatError for anything malformed.

    The bytes are not checked here: the transfer compares their length and SHA-256 with the
    signed block-hash list.
    """
    if len(payload) > max_bytes:
        raise SizeLimitError(f"block reply of {len(payload)} bytes; the limit is {max_bytes}")
    if len(payload) < _HEAD.size:
        raise FormatError("block reply is too short")
    magic, length = _HEAD.unpack_from(payload)
    if magic != _MAGIC:
        raise FormatError("block reply has the wrong magic")
    if _HEAD.size + length > len(payload):
        raise FormatError("block reply header runs past the message")
    head = payload[_HEAD.size : _HEAD.size + length]
    # One pass of pydantic's own JSON parser (strict): this runs once per block, and the
    # header carries nothing the block's signed hash does not check anyway.
    try:
        header = BlockReplyHeader.model_validate_json(head, strict=True)
    except ValidationError as exc:
        raise FormatError(f"block reply header: {describe_validation_error(exc)}") from None
    return header, payload[_HEAD.size + length :]


# -- rollouts (fleet side) ----------------------------------------------------------------------
# A rollout's plan, state and the operators' requests are retained under ``rollouts/{id}/``, so
# that any controller can carry a rollout on and any operator can see it; devices never read them.
RolloutStatus = Literal[
    "running", "paused", "halted", "aborted", "done", "rolling-back", "rolled-back"
]
ROLLOUT_FINAL: frozenset[str] = frozenset({"aborted", "done", "rolled-back"})
MAX_ROLLOUT_DEVICES = 5000  # the plan of so many stays well under MAX_MESSAGE_BYTES
HEARTBEAT_S = 5.0  # a driving controller says so this often on the state topic
LEASE_S = 3 * HEARTBEAT_S  # a state whose heartbeat is older has no live controller
# Failure codes of a rollout that are not a device's own error codes.
TIMED_OUT, OFFLINE, NOT_RETURNED = "timed-out", "offline", "not-returned"
Envelope = dict[str, object]  # a DSSE envelope as its JSON object


class RolloutModel(_Message):
    """A model the rollout deploys: its bundle's signed descriptor, and what that says."""

    version: Annotated[str, Field(max_length=64)]
    release: Annotated[int, Field(ge=1)]
    bundle_sha256: Hex64
    descriptor: Envelope


class DocumentTerms(_Message):
    """The terms every device document of a rollout (or of its rollback) is signed on: the same
    terms give the same bytes (Ed25519 is deterministic), so publishing one again changes
    nothing on a device."""

    deployment_id: TargetId
    sequence: Annotated[int, Field(ge=1, le=2**53)]
    issued: AwareDatetime
    expires: AwareDatetime


class Gate(_Message):
    """What a wave must show before the next one starts."""

    wave_timeout_s: Annotated[float, Field(gt=0)]
    max_failures: Annotated[int, Field(ge=0)] | None = 0  # failed, rolled back, refused, timed out
    max_failures_percent: Annotated[float, Field(ge=0, le=100)] | None = None  # of the wave
    soak_s: Annotated[float, Field(ge=0)] = 0.0  # then the wave's telemetry against the old one's
    max_error_rate_increase: Annotated[float, Field(ge=0, le=1)] = 0.01  # errors per request
    max_p99_ratio: Annotated[float, Field(ge=1)] = 1.5


class PriorVersion(_Message):
    """What some devices ran of a model before the rollout: where a rollback returns them."""

    version: Annotated[str, Field(max_length=64)]
    release: Annotated[int, Field(ge=1)]
    bundle_sha256: Hex64
    variant: Annotated[str, Field(max_length=32)] | None = None  # the one it ran
    devices: list[TargetId] = Field(max_length=MAX_ROLLOUT_DEVICES)


class RolloutPlan(_Message):
    """``rollouts/{id}/plan``, retained: written once, when the rollout starts."""

    type: Literal["rollout-plan"] = "rollout-plan"
    rollout_id: TargetId
    created: AwareDatetime
    created_by: Annotated[str, Field(max_length=128)]
    group: TargetId | None = None
    selectors: list[Annotated[str, Field(max_length=128)]] = Field(default=[], max_length=16)
    models: dict[ModelName, RolloutModel] = Field(min_length=1, max_length=16)
    variants: dict[ModelName, Annotated[str, Field(max_length=32)]] = {}
    terms: DocumentTerms
    gate: Gate
    waves: list[list[TargetId]] = Field(min_length=1, max_length=64)
    # Devices a model ran on before, per model and version; a device not listed ran none.
    prior: dict[ModelName, list[PriorVersion]] = {}
    prior_descriptors: dict[Hex64, Envelope] = {}  # signed descriptors of those versions

    @property
    def devices(self) -> list[str]:
        return [d for wave in self.waves for d in wave]


class DeviceFailure(_Message):
    device: TargetId
    wave: Annotated[int, Field(ge=0)]
    code: Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]{0,63}$")]
    message: Text = ""


class RollbackTerms(_Message):
    """What a rollback publishes: fresh terms, and each earlier bundle's descriptor re-issued
    with a release above every one the rollout reached (the bytes, so the blocks, unchanged)."""

    terms: DocumentTerms
    descriptors: dict[Hex64, Envelope]  # bundle sha256 -> re-issued descriptor
    devices: list[TargetId] = Field(max_length=MAX_ROLLOUT_DEVICES)  # those it returns
    published: bool = False  # every device's document is on the broker


class RolloutState(_Message):
    """``rollouts/{id}/state``, retained: where the rollout stands, written by its controller.

    ``wave`` is the current wave (0-based); its documents are all on the broker once
    ``published`` is above it. ``owner`` and ``heartbeat`` say which controller drives it: another
    one takes over only once the heartbeat is old (or the owner's process is gone).
    """

    type: Literal["rollout-state"] = "rollout-state"
    rollout_id: TargetId
    status: RolloutStatus
    wave: Annotated[int, Field(ge=0)] = 0
    published: Annotated[int, Field(ge=0)] = 0
    wave_started: AwareDatetime | None = None
    soak_started: AwareDatetime | None = None
    failures: list[DeviceFailure] = Field(default=[], max_length=MAX_ROLLOUT_DEVICES)
    reason: Text | None = None
    rollback: RollbackTerms | None = None
    control_at: AwareDatetime | None = None  # the last operator request taken
    owner: Annotated[str, Field(max_length=128)] | None = None
    heartbeat: AwareDatetime | None = None
    updated: AwareDatetime


class RolloutControl(_Message):
    """``rollouts/{id}/control``, retained: an operator's request to the rollout's controller."""

    type: Literal["rollout-control"] = "rollout-control"
    rollout_id: TargetId
    action: Literal["pause", "resume", "abort"]
    at: AwareDatetime
    by: Annotated[str, Field(max_length=128)] = ""


MESSAGES: dict[str, type[_Message]] = {
    "online": Online,
    "reported": Reported,
    "events": Event,
    "telemetry": Telemetry,
    "block request": BlockRequest,
    "block reply header": BlockReplyHeader,
    "trust": TrustUpdate,
    "rollout plan": RolloutPlan,
    "rollout state": RolloutState,
    "rollout control": RolloutControl,
}

__all__ = [
    "BLOCK_LIST_PAGE",
    "COMMON_PACKET_LIMIT",
    "MAX_WINDOW",
    "MESSAGES",
    "BlockReplyHeader",
    "BlockRequest",
    "ErrorInfo",
    "Event",
    "HardwareProfile",
    "ModelStatus",
    "Online",
    "Phase",
    "Reported",
    "RolloutControl",
    "RolloutPlan",
    "RolloutState",
    "Telemetry",
    "TrustStatus",
    "TrustUpdate",
    "VersionRef",
    "block_reply_length",
    "decode_block_reply",
    "encode_block_reply",
]
