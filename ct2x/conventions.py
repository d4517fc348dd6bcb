"""Array-order and world-frame conventions of CT2X, said once and applied only here.

- World frame: patient RAS in millimetres (+x = patient's Right, +y = Anterior, +z = Superior), as in Slicer.
  ITK/SimpleITK, DICOM, NRRD and MHA headers are LPS (+x Left, +y Posterior); NIfTI stores RAS but ITK converts it
  to LPS on read. An LPS point or affine becomes RAS by negating its first two rows: ``LPS_TO_RAS = diag(-1, -1, 1, 1)``
  (its own inverse).
- Affine: float64 (4, 4) mapping a voxel index column (i, j, k, 1) to RAS mm. Its column norms are the spacings.
- Arrays: volumes are stored KJI, ``array[k, j, i]`` (SimpleITK ``GetArrayFromImage``, Slicer ``arrayFromVolume``);
  torch tensors of volumes are (B, C, K, J, I). Sizes, spacings and points are always listed in (i, j, k) order.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np
import SimpleITK as sitk

from ct2x.errors import CT2XInputError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # (4, 4); also RAS_TO_LPS: the flip is its own inverse


def lps_to_ras(affine_lps: np.ndarray) -> np.ndarray:
    """(4, 4) affine ijk -> LPS mm  =>  (4, 4) affine ijk -> RAS mm."""
    return LPS_TO_RAS @ np.asarray(affine_lps, dtype=np.float64)


def ras_to_lps(affine_ras: np.ndarray) -> np.ndarray:
    """(4, 4) affine ijk -> RAS mm  =>  (4, 4) affine ijk -> LPS mm."""
    return LPS_TO_RAS @ np.asarray(affine_ras, dtype=np.float64)


def affine_from_sitk(image: sitk.Image) -> np.ndarray:
    """(4, 4) float64 affine ijk -> RAS mm of a 3-D SimpleITK image (whose origin and direction are LPS)."""
    if image.GetDimension() != 3:
        raise CT2XInputError(f"affine_from_sitk: image is {image.GetDimension()}-D, expected a 3-D image")
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)  # columns: LPS unit axes of i, j, k
    affine_lps = np.eye(4)
    affine_lps[:3, :3] = direction * np.array(image.GetSpacing())  # scale column c by spacing c (mm per voxel)
    affine_lps[:3, 3] = image.GetOrigin()  # LPS mm of voxel (0, 0, 0)
    return lps_to_ras(affine_lps)


def sitk_geometry_from_affine(
    affine_ras: np.ndarray,
) -> Tuple[Tuple[float, ...], Tuple[float, ...], Tuple[float, ...]]:
    """(origin LPS mm (3,), spacing mm (3,), direction row-major (9,)) for ``SetOrigin/SetSpacing/SetDirection``."""
    affine_lps = ras_to_lps(affine_ras)
    spacing = np.linalg.norm(affine_lps[:3, :3], axis=0)  # (3,) mm per i, j, k
    direction = affine_lps[:3, :3] / spacing  # (3, 3) unit columns
    return tuple(affine_lps[:3, 3].tolist()), tuple(spacing.tolist()), tuple(direction.ravel().tolist())


def kji_to_ijk(array: np.ndarray) -> np.ndarray:
    """View of ``array[..., k, j, i]`` as ``[..., i, j, k]`` (the last three axes are spatial; no copy)."""
    return np.swapaxes(array, -1, -3)


def ijk_to_kji(array: np.ndarray) -> np.ndarray:
    """View of ``array[..., i, j, k]`` as ``[..., k, j, i]`` (the last three axes are spatial; no copy)."""
    return np.swapaxes(array, -1, -3)


def voxel_to_world(affine: np.ndarray, ijk_points: np.ndarray) -> np.ndarray:
    """(N, 3) voxel indices (i, j, k), fractional allowed  =>  (N, 3) float64 RAS mm."""
    ijk = np.asarray(ijk_points, dtype=np.float64)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def world_to_voxel(affine: np.ndarray, ras_points: np.ndarray) -> np.ndarray:
    """(N, 3) RAS mm  =>  (N, 3) float64 fractional voxel indices (i, j, k)."""
    ras = np.asarray(ras_points, dtype=np.float64)
    return (ras - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T


def spacing_from_affine(affine: np.ndarray) -> np.ndarray:
    """(3,) float64 voxel spacing in mm along i, j, k (norms of the affine's first three columns)."""
    return np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
