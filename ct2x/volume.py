"""A CT volume: Hounsfield units on a voxel grid placed in patient RAS space (see ``ct2x.conventions``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np
import SimpleITK as sitk

from ct2x.conventions import (
    affine_from_sitk,
    sitk_geometry_from_affine,
    spacing_from_affine,
    voxel_to_world,
)
from ct2x.errors import CT2XInputError

MIN_VOXELS_PER_AXIS = 8
AIR_ABOVE_HU = -500.0  # a CT has air (about -1000 HU) somewhere: its minimum must be below this
DENSE_BELOW_HU = -200.0  # ... and something denser than fat (about -100 HU): its maximum must be above this


def validate_ct(hu: np.ndarray, affine: np.ndarray, source: str = "") -> np.ndarray:
    """Return ``hu`` as a float32 (K, J, I) array (no copy if it already is one) or raise CT2XInputError.

    A 4-D array with a leading or trailing singleton axis is squeezed to 3-D. ``source`` names the input in messages.
    """
    name = source or "CT volume"
    _validate_affine(affine, name)
    hu = np.asarray(hu)
    if hu.ndim == 4 and 1 in (hu.shape[0], hu.shape[-1]):
        hu = hu[0] if hu.shape[0] == 1 else hu[..., 0]
    if hu.ndim != 3:
        raise CT2XInputError(
            f"{name}: is a {hu.ndim}-D array (shape {hu.shape}); CT2X needs one 3-D CT volume (K, J, I). "
            "For a 2-D image use the X-ray tools; for a 4-D CT choose one phase."
        )
    if min(hu.shape) < MIN_VOXELS_PER_AXIS:
        raise CT2XInputError(
            f"{name}: has only {min(hu.shape)} voxels along an axis (shape_ijk {hu.shape[::-1]}); "
            f"CT2X needs at least {MIN_VOXELS_PER_AXIS} along each axis. Is it a single slice or a thin slab?"
        )
    if hu.dtype.kind not in "biuf":  # bool, signed, unsigned, float
        raise CT2XInputError(f"{name}: voxel type {hu.dtype} is not a real number; a CT holds Hounsfield units.")
    hu = np.asarray(hu, dtype=np.float32)
    n_bad = hu.size - int(np.count_nonzero(np.isfinite(hu)))
    if n_bad:
        raise CT2XInputError(
            f"{name}: has {n_bad} non-finite values (NaN or inf) of {hu.size}; replace them (e.g. by -1024 HU) first."
        )
    lo, hi = float(hu.min()), float(hu.max())
    if lo >= 0.0 and hi <= 1.0 and np.all((hu == 0.0) | (hu == 1.0)):
        reason = "only the values 0 and 1"
    elif lo > AIR_ABOVE_HU:
        reason = f"no air: nothing below {AIR_ABOVE_HU:g} HU"
    elif hi < DENSE_BELOW_HU:
        reason = f"nothing denser than fat: nothing above {DENSE_BELOW_HU:g} HU"
    else:
        return hu
    raise CT2XInputError(
        f"{name}: does not look like a CT in Hounsfield units (range {lo:g}..{hi:g}; {reason}); "
        "is it an MR, a mask or a normalised image? CT2X needs HU (air about -1000, water 0)."
    )


def _validate_affine(affine: np.ndarray, name: str) -> None:
    affine = np.asarray(affine)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise CT2XInputError(f"{name}: affine must be a finite 4x4 matrix (ijk -> RAS mm), got shape {affine.shape}.")
    if not np.allclose(affine[3], [0.0, 0.0, 0.0, 1.0]):
        raise CT2XInputError(f"{name}: affine's last row is {affine[3].tolist()}, expected [0, 0, 0, 1].")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise CT2XInputError(
            f"{name}: affine is singular (zero spacing or parallel axes): {affine[:3, :3].tolist()}; "
            "check the file's spacing and direction."
        )


@dataclass(eq=False)
class CTVolume:
    """A CT in Hounsfield units with its placement in patient space.

    Args:
        hu: float32 (K, J, I) array in HU (``hu[k, j, i]``); not copied when it already is float32.
        affine: float64 (4, 4) voxel index (i, j, k, 1) -> RAS mm.
        source: path or description of where the volume came from, used in messages.
    """

    hu: np.ndarray
    affine: np.ndarray
    source: str = ""

    def __post_init__(self) -> None:
        self.hu = validate_ct(self.hu, self.affine, self.source)
        self.affine = np.array(self.affine, dtype=np.float64)  # own copy: callers may reuse theirs

    def __repr__(self) -> str:
        spacing = tuple(round(s, 4) for s in self.spacing_mm.tolist())
        return f"CTVolume(shape_ijk={self.shape_ijk}, spacing_mm={spacing}, source={self.source!r})"

    @property
    def shape_ijk(self) -> Tuple[int, int, int]:
        """Number of voxels along i, j, k."""
        k, j, i = self.hu.shape
        return (i, j, k)

    @property
    def spacing_mm(self) -> np.ndarray:
        """(3,) voxel spacing in mm along i, j, k."""
        return spacing_from_affine(self.affine)

    @property
    def center_ras(self) -> np.ndarray:
        """(3,) RAS mm of the grid's geometric centre, voxel index ((n - 1) / 2) along each axis."""
        center_ijk = (np.array(self.shape_ijk, dtype=np.float64) - 1.0) / 2.0  # (3,) voxel index
        return voxel_to_world(self.affine, center_ijk[None])[0]

    @property
    def extent_mm(self) -> np.ndarray:
        """(3,) physical size in mm along i, j, k covered by the voxels (voxel count x spacing)."""
        return np.array(self.shape_ijk, dtype=np.float64) * self.spacing_mm

    def to_sitk(self) -> sitk.Image:
        """A float32 SimpleITK image (LPS geometry) holding a copy of the HU values."""
        image = sitk.GetImageFromArray(self.hu)
        origin, spacing, direction = sitk_geometry_from_affine(self.affine)
        image.SetOrigin(origin)
        image.SetSpacing(spacing)
        image.SetDirection(direction)
        return image

    @classmethod
    def from_sitk(cls, image: sitk.Image, source: str = "") -> CTVolume:
        """A CTVolume from a scalar 3-D SimpleITK image (a 4-D one with a single time point is accepted)."""
        name = source or "image"
        if image.GetNumberOfComponentsPerPixel() != 1:
            raise CT2XInputError(
                f"{name}: has {image.GetNumberOfComponentsPerPixel()} components per voxel (colour or vector "
                "image); a CT has one Hounsfield value per voxel."
            )
        if image.GetDimension() == 4 and image.GetSize()[3] == 1:
            image = sitk.Extract(image, list(image.GetSize()[:3]) + [0], [0, 0, 0, 0])  # drop the time axis
        if image.GetDimension() != 3:
            raise CT2XInputError(
                f"{name}: is a {image.GetDimension()}-D image (size {image.GetSize()}); CT2X needs one 3-D CT volume. "
                "For a 2-D image use the X-ray tools; for a 4-D CT choose one phase."
            )
        hu = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)  # (K, J, I) HU
        return cls(hu=hu, affine=affine_from_sitk(image), source=source)
