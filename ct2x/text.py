"""Quantities as messages write them for people."""

from __future__ import annotations


def size_text(n_bytes: float) -> str:
    """A size in decimal units: 950 bytes, 65.5 kB, 12.1 MB, 1.2 GB, 3.4 TB."""
    if n_bytes < 1000:
        return f"{n_bytes:.0f} bytes"
    for unit in ("kB", "MB", "GB"):
        n_bytes /= 1000
        if n_bytes < 1000:
            return f"{n_bytes:.1f} {unit}"
    return f"{n_bytes / 1000:.1f} TB"
