"""Sizes as people read them: one formatting for every message and plan that states bytes."""

from __future__ import annotations


def format_bytes(count: float) -> str:
    """``count`` bytes in the decimal unit that fits it: "512 B", "1.05 MB" (a MiB), "2.50 GB", up to TB; a
    size of a few kB never reads "0.00 GB"."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(count) < 1000:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.2f} {unit}"
        count /= 1000
    return f"{count:.2f} TB"
