"""Small pieces every benchmark here uses: progress lines and per-process CPU time."""

from __future__ import annotations

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
