"""Memory a DRR job needs and what this computer has free, so that a job that cannot fit is refused before it starts.

The figures are peak resident bytes measured on CPU (`bench/RESULTS.md`, "Memory estimate"): preparing a CT holds
about 8-12 float32 copies of its body crop at once (HU, densities, material fractions, re-sliced stacks), and each
detector pixel of a view in flight about 300 bytes of ray and sample buffers.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

from ct2x.errors import CT2XInputError

LIBRARIES_BYTES = 400 * 2**20  # torch, numpy and SimpleITK loaded
PREPARATION_BYTES_PER_VOXEL = 48  # per voxel of the body crop: 12 float32 copies
VIEW_BYTES_PER_PIXEL = 300  # per detector pixel of the view being rendered
SERIES_BYTES_PER_PIXEL = 8  # per detector pixel of each view kept until the series is written (attenuation, film)


def drr_peak_bytes(body_voxels: int, detector_pixels: int, n_views: int = 1) -> int:
    """Estimated peak bytes of preparing a CT with `body_voxels` in its body crop and rendering `n_views` views."""
    return (LIBRARIES_BYTES + PREPARATION_BYTES_PER_VOXEL * body_voxels + VIEW_BYTES_PER_PIXEL * detector_pixels
            + SERIES_BYTES_PER_PIXEL * detector_pixels * n_views)


def available_bytes() -> Optional[int]:
    """Bytes of memory free for a new job now (Linux MemAvailable, else physical memory); None where unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    if sys.platform != "win32" and hasattr(os, "sysconf"):
        try:
            return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return None
    return None


def check_fits(needed_bytes: int, what: str, suggestion: str) -> None:
    """Raise CT2XInputError naming `what`, the estimate and `suggestion` when `needed_bytes` exceed the free memory."""
    free = available_bytes()
    if free is not None and needed_bytes > free:
        raise CT2XInputError(f"{what} needs about {_gib(needed_bytes)} of memory, but only {_gib(free)} is free; "
                             f"{suggestion}")


def _gib(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.1f} GiB"
