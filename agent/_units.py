"""Sizes for people: what the command-line tools print and the bundle server logs."""

from __future__ import annotations


def size_text(n: float) -> str:
    """``n`` bytes in B, KiB, MiB or GiB: ``512 B``, ``13.6 KiB``, ``1.2 GiB``."""
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
