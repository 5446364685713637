"""Logging for the daemon: journald with structured fields, or stderr with ``<N>`` priorities.

:func:`setup_logging` sends records through ``systemd.journal.send`` when journald is reachable
(its socket exists and systemd-python is installed), with the fields MODEL, MODEL_VERSION,
DEPLOYMENT_ID, BUNDLE_ID and PHASE taken from the record (``extra=log_fields(...)``), so that
``journalctl -u edge-agent MODEL=tiny`` works. Otherwise each stderr line starts with its syslog
priority (``<3>`` error ... ``<7>`` debug, the sd-daemon(3) convention), which journald parses when
stderr is connected to it.
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TextIO

JOURNAL_SOCKET = Path("/run/systemd/journal/socket")
FIELDS = ("MODEL", "MODEL_VERSION", "DEPLOYMENT_ID", "BUNDLE_ID", "PHASE")
FORMAT = "%(levelname)s %(name)s: %(message)s"

JournalSend = Callable[..., object]


def log_fields(
    *,
    model: str | None = None,
    version: str | None = None,
    deployment_id: str | None = None,
    bundle_id: str | None = None,
    phase: object = None,
) -> dict[str, str]:
    """``extra=`` for a log call: the journal fields that are set (``phase``: a Phase or str)."""
    values = (model, version, deployment_id, bundle_id, phase)
    return {
        key: str(getattr(value, "value", value))
        for key, value in zip(FIELDS, values, strict=True)
        if value is not None
    }


def syslog_priority(levelno: int) -> int:
    """The syslog priority of a logging level (3 error, 4 warning, 6 info, 7 debug)."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


class PriorityFormatter(logging.Formatter):
    """Every line (a traceback's too) starts with ``<N>``, N the record's syslog priority."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


class JournalHandler(logging.Handler):
    """Sends each record to journald, with the structured fields of :func:`log_fields`."""

    def __init__(
        self, send: JournalSend | None = None, identifier: str = "edge-agent", level: int = 0
    ) -> None:
        super().__init__(level)
        if send is None:
            send = _journal_module().send
        self._send = send
        self.identifier = identifier

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields: dict[str, object] = {
                "PRIORITY": str(syslog_priority(record.levelno)),
                "SYSLOG_IDENTIFIER": self.identifier,
                "LOGGER": record.name,
                "THREAD_NAME": record.threadName or "",
                "CODE_FILE": record.pathname,
                "CODE_LINE": record.lineno,  # systemd.journal.send formats it with {:d}
                "CODE_FUNC": record.funcName,
            }
            for key in FIELDS:
                value = record.__dict__.get(key)
                if value is not None:
                    fields[key] = str(value)
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + logging.Formatter().formatException(record.exc_info)
            self._send(message, **fields)
        except Exception:
            self.handleError(record)


def _journal_module() -> ModuleType:
    # Imported by name: mypy would take the repository's systemd/ folder (the unit) for it.
    return importlib.import_module("systemd.journal")


def journal_available(socket_path: Path = JOURNAL_SOCKET) -> bool:
    if not socket_path.exists():
        return False
    try:
        _journal_module()
    except ImportError:
        return False
    return True


def setup_logging(
    verbose: bool = False,
    *,
    journal_socket: Path = JOURNAL_SOCKET,
    stream: TextIO | None = None,
) -> logging.Handler:
    """Configure the root logger for the daemon; returns the handler it installed."""
    handler: logging.Handler
    if journal_available(journal_socket):
        handler = JournalHandler()
    else:
        handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
        handler.setFormatter(PriorityFormatter(FORMAT))
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, handlers=[handler], force=True
    )
    return handler
