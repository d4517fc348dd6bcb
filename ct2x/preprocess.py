"""Resampling, cropping and intensity mapping of CT volumes before projection or learning."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Optional, Sequence, TypeVar, Union

import numpy as np
import SimpleITK as sitk

from ct2x.conventions import sitk_geometry_from_affine
from ct2x.errors import CT2XInputError
from ct2x.volume import AIR_ABOVE_HU, DENSE_BELOW_HU, CTVolume

if TYPE_CHECKING:
    import torch

ArrayOrTensor = TypeVar("ArrayOrTensor", np.ndarray, "torch.Tensor")

OUTSIDE_HU = -1024.0  # value of new voxels that fall outside the input grid (air)
INTERPOLATORS = {"nearest": sitk.sitkNearestNeighbor, "linear": sitk.sitkLinear, "bspline": sitk.sitkBSpline}
X2CT_HU_OFFSET = 1024.0  # X2CT-GAN maps HU + 1024 ...
X2CT_HU_RANGE = 2500.0  # ... clipped to [0, 2500] onto [0, 1]


def resample_isotropic(volume: CTVolume, spacing_mm: float = 1.0, order: str = "linear") -> CTVolume:
    """Resample onto an isotropic grid with the same orientation, centre and physical extent.

    Each axis gets round(extent_mm / spacing_mm) voxels; new voxels outside the input are -1024 HU.
    ``order``: "nearest", "linear" or "bspline".
    """
    spacing = _positive(spacing_mm, "spacing_mm")
    shape_ijk = np.maximum(1, np.round(volume.extent_mm / spacing)).astype(int)  # (3,) voxels along i, j, k
    affine = _grid_affine(volume, spacing, shape_ijk, volume.center_ras)
    return _resample(volume, affine, shape_ijk, order)


def crop_or_pad_cube(
    volume: CTVolume,
    size_mm: float,
    spacing_mm: Optional[float] = None,
    center_ras: Optional[Sequence[float]] = None,
    order: str = "linear",
) -> CTVolume:
    """A cube of edge ``size_mm`` about the volume centre (or ``center_ras``), resampled and padded with -1024 HU.

    The cube keeps the volume's orientation, has round(size_mm / spacing_mm) voxels per edge and its centre exactly
    at the requested point, e.g. ``crop_or_pad_cube(v, 128.0, spacing_mm=1.0)`` -> 128^3 at 1 mm (CT2X-GAN) and
    ``crop_or_pad_cube(v, 320.0, spacing_mm=1.0)`` -> 320^3 (X2CT). ``spacing_mm=None`` keeps the volume's spacing,
    which must then be isotropic. ``order``: "nearest", "linear" or "bspline".
    """
    size = _positive(size_mm, "size_mm")
    if spacing_mm is None:
        spacing_ijk = volume.spacing_mm
        if not np.allclose(spacing_ijk, spacing_ijk[0], rtol=1e-4):
            raise CT2XInputError(
                f"crop_or_pad_cube: {volume.source or 'volume'} has anisotropic spacing "
                f"{np.round(spacing_ijk, 4).tolist()} mm; pass spacing_mm=... to resample it."
            )
        spacing_mm = float(spacing_ijk[0])
    spacing = _positive(spacing_mm, "spacing_mm")
    edge = max(1, int(round(size / spacing)))  # voxels per cube edge
    center = volume.center_ras if center_ras is None else np.asarray(center_ras, dtype=np.float64).reshape(3)
    affine = _grid_affine(volume, spacing, np.array([edge, edge, edge]), center)
    return _resample(volume, affine, np.array([edge, edge, edge]), order)


def clip_hu(volume_or_array: Union[CTVolume, ArrayOrTensor], low: float, high: float) -> Union[CTVolume, ArrayOrTensor]:
    """Clip HU to [low, high]; returns the same kind it gets (CTVolume, numpy array or torch tensor).

    A CTVolume stays a CT only with low <= -500 and high >= -200 HU; for narrower windows clip ``volume.hu``.
    """
    if not low < high:
        raise CT2XInputError(f"clip_hu: low ({low}) must be below high ({high}) HU.")
    if not isinstance(volume_or_array, CTVolume):
        return volume_or_array.clip(low, high)
    if low > AIR_ABOVE_HU or high < DENSE_BELOW_HU:
        raise CT2XInputError(
            f"clip_hu: [{low}, {high}] HU would leave no air (needs low <= {AIR_ABOVE_HU:g}) or no tissue (needs "
            f"high >= {DENSE_BELOW_HU:g}), which a CTVolume must keep; clip the array volume.hu instead."
        )
    return dataclasses.replace(volume_or_array, hu=volume_or_array.hu.clip(low, high))


def x2ct_normalize(hu: ArrayOrTensor) -> ArrayOrTensor:
    """HU -> [0, 1] as in X2CT-GAN: clip(HU + 1024, 0, 2500) / 2500 (numpy array or torch tensor)."""
    return (hu + X2CT_HU_OFFSET).clip(0.0, X2CT_HU_RANGE) / X2CT_HU_RANGE


def x2ct_denormalize(x: ArrayOrTensor) -> ArrayOrTensor:
    """[0, 1] -> HU, the inverse of ``x2ct_normalize`` inside its range: x * 2500 - 1024."""
    return x * X2CT_HU_RANGE - X2CT_HU_OFFSET


def _grid_affine(volume: CTVolume, spacing_mm: float, shape_ijk: np.ndarray, center_ras: np.ndarray) -> np.ndarray:
    """(4, 4) ijk -> RAS mm of a grid with the volume's axes, isotropic spacing and its centre at ``center_ras``."""
    direction = volume.affine[:3, :3] / volume.spacing_mm  # (3, 3) RAS unit columns of i, j, k
    affine = np.eye(4)
    affine[:3, :3] = direction * spacing_mm
    affine[:3, 3] = center_ras - affine[:3, :3] @ ((shape_ijk - 1.0) / 2.0)  # RAS mm of voxel (0, 0, 0)
    return affine


def resample_onto(volume: CTVolume, affine: np.ndarray, shape_ijk: Sequence[int], order: str = "linear") -> CTVolume:
    """The volume resampled onto the grid `affine` (voxel ijk -> RAS mm) of `shape_ijk` voxels; outside is -1024 HU."""
    return _resample(volume, np.asarray(affine, dtype=np.float64), np.asarray(shape_ijk), order)


def _resample(volume: CTVolume, affine: np.ndarray, shape_ijk: np.ndarray, order: str) -> CTVolume:
    if order not in INTERPOLATORS:
        raise CT2XInputError(f"order must be one of {', '.join(INTERPOLATORS)}, got {order!r}.")
    origin, spacing, direction = sitk_geometry_from_affine(affine)
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize([int(n) for n in shape_ijk])
    resampler.SetOutputOrigin(origin)
    resampler.SetOutputSpacing(spacing)
    resampler.SetOutputDirection(direction)
    resampler.SetInterpolator(INTERPOLATORS[order])
    resampler.SetDefaultPixelValue(OUTSIDE_HU)
    resampler.SetOutputPixelType(sitk.sitkFloat32)
    hu = sitk.GetArrayFromImage(resampler.Execute(volume.to_sitk()))  # (K, J, I) float32 HU
    return CTVolume(hu=hu, affine=affine, source=volume.source, stored_offset_hu=volume.stored_offset_hu)


def _positive(value: float, name: str) -> float:
    value = float(value)
    if not value > 0.0:
        raise CT2XInputError(f"{name} must be a positive length in mm, got {value}.")
    return value
