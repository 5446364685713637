"""Listening Unix sockets for the agent's local services (the inference API, the status socket).

The socket is bound under a temporary name, given its mode, and renamed into place, so a client
never finds it with the umask's mode. A socket file left by an agent that did not stop cleanly
is replaced; a live one, or anything that is not a socket, is refused.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from pathlib import Path

from agent.errors import ConfigError, StorageError

UNIX_PATH_MAX = 107  # sun_path holds 108 bytes with its terminating NUL


def bind_unix(path: Path, mode: int, what: str) -> socket.socket:
    """A bound (not yet listening) stream socket at ``path``; ``what`` names it in errors."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    if len(os.fsencode(tmp)) > UNIX_PATH_MAX:
        raise ConfigError(f"{what} {path} is too long for a Unix socket path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(path, what)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(os.fsencode(tmp))
            os.chmod(tmp, mode)
            os.replace(tmp, path)
        except BaseException:
            sock.close()
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
    except OSError as exc:
        raise StorageError(f"cannot create the {what} {path}: {exc.strerror or exc}") from None
    return sock


def remove_stale(path: Path, what: str) -> None:
    """Remove a socket nobody answers on any more; refuse anything else at ``path``."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"{what} {path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(os.fsencode(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)  # left behind by an agent that did not stop cleanly
        return
    except OSError as exc:
        raise StorageError(f"cannot check the {what} {path}: {exc.strerror}") from None
    finally:
        probe.close()
    raise ConfigError(f"another process answers on {path}: is the agent already running?")
