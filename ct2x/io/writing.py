"""Write images atomically (a failure leaves nothing half-written) with ordinary file modes."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from functools import partial
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk

from ct2x.errors import CT2XInputError
from ct2x.io.formats import format_suffix
from ct2x.io.native_output import quietly, sitk_reason
from ct2x.text import size_text
from ct2x.volume import CTVolume

PathLike = Union[str, os.PathLike]


def save_image(
    image: np.ndarray,
    path: PathLike,
    spacing_mm: Union[float, Sequence[float]],
    origin_mm: Optional[Sequence[float]] = None,
) -> Path:
    """Write a 2-D (rows, columns) or 3-D (K, J, I) array as float32 NRRD or MHA (chosen by extension).

    Args:
        image: array in KJI order: a 2-D image is (J, I) = (rows, columns).
        path: destination ending in .nrrd or .mha; written atomically.
        spacing_mm: pixel spacing in mm, one number or one per axis in (i, j[, k]) order (columns first).
        origin_mm: position of pixel 0 written as-is into the header (no RAS/LPS conversion; for CTs use
            ``save_ct``); default zeros.
    """
    array = np.asarray(image, dtype=np.float32)
    if array.ndim not in (2, 3):
        raise CT2XInputError(f"save_image: image must be 2-D or 3-D, got shape {array.shape}.")
    spacing = np.broadcast_to(np.asarray(spacing_mm, dtype=np.float64), (array.ndim,))  # (ndim,) mm, i first
    if not np.all(spacing > 0):
        raise CT2XInputError(f"save_image: spacing_mm must be positive, got {spacing_mm}.")
    sitk_image = sitk.GetImageFromArray(array)
    sitk_image.SetSpacing(spacing.tolist())
    if origin_mm is not None:
        sitk_image.SetOrigin([float(v) for v in origin_mm])
    return _write_atomic(sitk_image, path, allowed=(".nrrd", ".mha"))


def save_png(image: np.ndarray, path: PathLike) -> Path:
    """Write a (rows, columns) uint8 image as an 8-bit greyscale PNG, atomically (no imaging library needed)."""
    array = np.asarray(image)
    if array.ndim != 2 or array.dtype != np.uint8:
        raise CT2XInputError(f"save_png: image must be 2-D uint8, got shape {array.shape} of {array.dtype}.")
    return _write_atomic(sitk.GetImageFromArray(array), path, allowed=(".png",))


def save_ct(volume: CTVolume, path: PathLike) -> Path:
    """Write a CTVolume as float32 HU with its geometry (.nrrd, .mha, .nii or .nii.gz; written atomically).

    The round trip through ``load_ct`` is exact for NRRD and MHA; NIfTI stores geometry in float32 (~1e-6 mm).
    """
    return _write_atomic(volume.to_sitk(), path, allowed=(".nrrd", ".mha", ".nii", ".nii.gz"))


def _write_atomic(image: sitk.Image, path: PathLike, allowed: Sequence[str]) -> Path:
    """Write to a temporary file next to ``path``, then rename it, so a failure leaves nothing half-written.

    The file gets the ordinary mode for new files (0o666 less the umask). A failure inside SimpleITK becomes an
    OSError naming the file and the likely cause (errno kept or inferred, e.g. ENOSPC).
    """
    path = Path(path).expanduser()
    suffix = format_suffix(path)
    if suffix not in allowed:
        raise CT2XInputError(f"{path}: cannot write {suffix or '(no extension)'!r}; use one of {', '.join(allowed)}.")
    if not path.parent.is_dir():
        raise CT2XInputError(f"{path}: folder {path.parent} does not exist; create it first.")
    fd, tmp_name = tempfile.mkstemp(suffix=suffix, prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        _, failure, native = quietly(partial(sitk.WriteImage, image, tmp_name, useCompression=True))
        if failure is not None:
            raise _write_error(path, image, f"{sitk_reason(failure)} {native}")
        os.chmod(tmp_name, 0o666 & ~_umask())  # mkstemp made it 0o600
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    """The process's umask (set and restored: os has no way to only read it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_error(path: Path, image: sitk.Image, reason: str) -> OSError:
    """An OSError for a failed write: errno from the reason's text, else ENOSPC when the disk is too full, else EIO."""
    needed = image.GetNumberOfPixels() * image.GetNumberOfComponentsPerPixel() * image.GetSizeOfPixelComponent()
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:  # the folder itself is gone or unreachable
        free = None
    causes = {
        errno.ENOSPC: "the disk is full" + ("" if free is None else f" ({size_text(free)} free, the image needs up to "
                                                                     f"{size_text(needed)})")
                      + "; free some space or write elsewhere",
        errno.EACCES: "permission denied; choose a folder this user may write to",
        errno.EROFS: "the file system is read-only; write elsewhere",
        errno.EFBIG: "the file is too large for this file system; write elsewhere",
    }
    if hasattr(errno, "EDQUOT"):
        causes[errno.EDQUOT] = "the disk quota is exceeded; free some space or write elsewhere"
    code = next((code for code in causes if os.strerror(code).lower() in reason.lower()), None)
    if code is None:
        code = errno.ENOSPC if free is not None and free < needed else errno.EIO
    cause = causes.get(code, "the write failed; is the disk full, removed or failing?")
    return OSError(code, f"{path}: could not be written: {cause} (SimpleITK: {' '.join(reason.split())}).")
