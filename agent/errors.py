"""The one exception tree of Edge Model Agent.

Every error the project raises on purpose derives from :class:`EdgeAgentError`; the command-line
tools catch that type alone and print its message. Errors from lower libraries (``json``,
``pydantic``, ``cryptography``, ``OSError``) are mapped to this tree where they enter our code.

::

    EdgeAgentError                      anything raised on purpose; ``code`` is machine-readable
    ├── ConfigError                     a configuration file, option or argument is wrong
    │   ├── ConfigProblems              every problem of one configuration (``code`` config)
    │   └── RolloutConflictError        another unfinished rollout holds some of the devices
    ├── StorageError                    the disk refused: full, read-only, missing, permissions
    │   ├── DiskFullError               not enough free space for what must be written
    │   └── NotRunningError             nothing answers on the agent's status socket
    ├── ToolError                       an optional runtime or converter is missing or failed
    │   └── LoadTimeoutError            a model did not load within the configured time
    ├── ProbationError                  a new version failed its probation and was rolled back
    ├── InsufficientMemoryError         too little free RAM or GPU memory to load a model
    ├── DeploymentInterruptedError      the agent died each time it deployed a version
    ├── BrokerError                     the MQTT broker cannot be reached or refused a message
    ├── TransferError                   a bundle could not be fetched over MQTT
    │   ├── TransferTimeoutError        no progress within the configured time
    │   ├── BundleUnavailableError      no bundle server has the bundle
    │   └── BlockTooLargeError          a block's reply exceeds the broker's packet limit
    └── BadContentError                 input from outside was refused; nothing was written
        ├── SelfTestError               a model's outputs differ from its bundle's samples
        ├── FormatError                 not well-formed: JSON, base64, types, unknown fields
        │   └── InputShapeError         an inference request's tensors do not fit the model's shapes
        ├── SizeLimitError              beyond a configured cap or a signed bound (bombs, endless data)
        ├── VerificationError           well-formed but not trusted
        │   ├── UnsignedError           no signature at all
        │   ├── UntrustedKeyError       signed, but by no key trusted for this role
        │   ├── BadSignatureError       a trusted key's signature does not match the bytes
        │   ├── ThresholdError          fewer valid signatures than the threshold asks for
        │   ├── KeyNotAllowedError      valid release keys that may not sign this model name
        │   ├── ExpiredError            metadata or key expired before the reference time (freeze)
        │   ├── RollbackError           older than what is already trusted (or replayed)
        │   ├── WrongTargetError        a deployment addressed to another device or group
        │   └── DigestMismatchError     bytes differ from their signed size or hash
        └── ArchiveError                the bundle archive is unsafe or disagrees with its manifest
            ├── UnsafePathError         absolute, ``..``, odd characters, clashing names
            ├── UnsafeMemberTypeError   symlink, hardlink, device, fifo, directory, sparse, ...
            ├── DuplicateMemberError    the same name twice
            └── MemberSizeError         a member's size differs from the size the manifest signs

Each class carries a short ``code`` (``"bad-signature"``, ``"rollback"``, ...) that reported
state and ``--json`` output use; the message is for a person. Where an exception of another
library reaches an edge of ours (a worker thread's job, a stage of a deployment),
:func:`unexpected` makes it one of this tree.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "ArchiveError",
    "BadContentError",
    "BadSignatureError",
    "BlockTooLargeError",
    "BrokerError",
    "BundleUnavailableError",
    "ConfigError",
    "ConfigProblems",
    "DeploymentInterruptedError",
    "DigestMismatchError",
    "DiskFullError",
    "DuplicateMemberError",
    "EdgeAgentError",
    "ExpiredError",
    "FormatError",
    "InputShapeError",
    "InsufficientMemoryError",
    "KeyNotAllowedError",
    "LoadTimeoutError",
    "MemberSizeError",
    "NotRunningError",
    "ProbationError",
    "RollbackError",
    "RolloutConflictError",
    "SelfTestError",
    "SizeLimitError",
    "StorageError",
    "ThresholdError",
    "ToolError",
    "TransferError",
    "TransferTimeoutError",
    "UnsafeMemberTypeError",
    "UnsafePathError",
    "UnsignedError",
    "UntrustedKeyError",
    "VerificationError",
    "WrongTargetError",
    "unexpected",
]


class EdgeAgentError(Exception):
    """Base of every error the project raises on purpose."""

    code = "error"


class ConfigError(EdgeAgentError):
    code = "config"


class ConfigProblems(ConfigError):
    """Every problem found in one configuration, each a line naming its source and key."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class RolloutConflictError(ConfigError):
    code = "rollout-conflict"


class StorageError(EdgeAgentError):
    code = "storage"


class DiskFullError(StorageError):
    code = "disk-full"


class NotRunningError(StorageError):
    """Nothing answers on the status socket: no agent runs with it."""

    code = "not-running"

    def __init__(self, path: Path) -> None:
        super().__init__(f"the agent is not running (no {path})")
        self.path = path


class ToolError(EdgeAgentError):
    code = "tool"


class LoadTimeoutError(ToolError):
    code = "load-timeout"


class ProbationError(EdgeAgentError):
    code = "probation"


class BrokerError(EdgeAgentError):
    code = "broker"


class TransferError(EdgeAgentError):
    code = "transfer"


class TransferTimeoutError(TransferError):
    code = "transfer-timeout"


class BundleUnavailableError(TransferError):
    code = "bundle-unavailable"


class BlockTooLargeError(TransferError):
    """The bundle server cannot send a block through the broker: the reply frame would exceed
    the broker's packet limit. The bundle needs a smaller block size (``--block-size``)."""

    code = "block-too-large"


class BadContentError(EdgeAgentError):
    """Content from outside (a bundle, an envelope, a message) was refused."""

    code = "bad-content"


class SelfTestError(BadContentError):
    code = "self-test"


class FormatError(BadContentError):
    code = "format"


class InputShapeError(FormatError):
    """An inference request's tensors do not fit the model: wrong rank or size, inputs that
    disagree on a dimension they share, or shapes the runtime refused to run."""

    code = "input-shape"


class SizeLimitError(BadContentError):
    code = "size-limit"


class VerificationError(BadContentError):
    code = "verification"


class UnsignedError(VerificationError):
    code = "unsigned"


class UntrustedKeyError(VerificationError):
    code = "untrusted-key"


class BadSignatureError(VerificationError):
    code = "bad-signature"


class ThresholdError(VerificationError):
    code = "threshold"


class KeyNotAllowedError(VerificationError):
    code = "key-not-allowed"


class ExpiredError(VerificationError):
    code = "expired"


class RollbackError(VerificationError):
    code = "rollback"


class WrongTargetError(VerificationError):
    code = "wrong-target"


class DigestMismatchError(VerificationError):
    code = "digest-mismatch"


class ArchiveError(BadContentError):
    code = "archive"


class UnsafePathError(ArchiveError):
    code = "unsafe-path"


class UnsafeMemberTypeError(ArchiveError):
    code = "unsafe-member-type"


class DuplicateMemberError(ArchiveError):
    code = "duplicate-member"


class MemberSizeError(ArchiveError):
    code = "member-size"


class DeploymentInterruptedError(EdgeAgentError):
    """A version whose deployment the agent's own death cut short too often (it crashed, was
    killed or lost power each time): not started again for the same deployment document."""

    code = "interrupted"


class InsufficientMemoryError(EdgeAgentError):
    """Refused before loading: the variant's ``min_memory_mb`` exceeds what is free."""

    code = "insufficient-memory"


def unexpected(exc: BaseException) -> EdgeAgentError:
    """``exc`` as one of this tree, where it reached an edge that must not let it through: ours
    as it is, anything else (a runtime's own type, a bug) as a :class:`ToolError` naming its
    type, so that the deployment it broke fails with a message instead of hanging."""
    if isinstance(exc, EdgeAgentError):
        return exc
    return ToolError(f"{type(exc).__name__}: {exc}")
