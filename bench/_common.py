"""Small pieces the benchmarks here share: progress lines, per-process CPU time, broker settings."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path


def say(message: str) -> None:
    """A progress line on stderr (stdout's last line is the benchmark's JSON)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def cpu_s(pid: int, tid: int | None = None) -> float:
    """User + system CPU seconds of process ``pid`` (or its thread ``tid``) so far."""
    stat = Path(f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat")
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


SHIPPED_BROKER_CONF = Path(__file__).resolve().parents[1] / "config" / "broker" / "mosquitto.conf"


def shipped_broker_lines(keys: tuple[str, ...]) -> list[str]:
    """The lines of config/broker/mosquitto.conf that set ``keys`` (none if it is missing)."""
    try:
        lines = SHIPPED_BROKER_CONF.read_text().splitlines()
    except OSError:
        return []
    return [line.strip() for line in lines if line.split(" ", 1)[0] in keys]


def fs_type(path: Path) -> str:
    """The type of the filesystem ``path`` lies on (from /proc/mounts)."""
    best, kind = "", "unknown"
    target = str(path.resolve())
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and target.startswith(parts[1]) and len(parts[1]) > len(best):
                best, kind = parts[1], parts[2]
    return kind
