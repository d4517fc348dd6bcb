"""Phantoms made in code: analytic shapes with known line integrals, and a simple anatomical chest.

Grids are axis-aligned with RAS (+i towards the patient's right, +j anterior, +k superior), isotropic, centred on a
chosen RAS point; arrays are KJI. Occupancies are partial-volume fractions (each voxel supersampled), so edges are not
staircases.
"""

from __future__ import annotations

from typing import Callable, Sequence, Tuple

import numpy as np

from .volume import CTVolume


def grid_affine(shape_kji: Sequence[int], spacing_mm: float,
                center_ras: Sequence[float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """4x4 voxel (i, j, k) -> RAS mm for an axis-aligned RAS grid of `shape_kji` centred on `center_ras`."""
    affine = np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])
    half_extent = (np.array(shape_kji[::-1], dtype=np.float64) - 1) / 2.0 * spacing_mm
    affine[:3, 3] = np.asarray(center_ras, dtype=np.float64) - half_extent
    return affine


def occupancy(inside: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray], shape_kji: Sequence[int],
              affine: np.ndarray, supersampling: int = 4) -> np.ndarray:
    """(K, J, I) float32 fraction of each voxel for which inside(x, y, z) (RAS mm arrays) holds."""
    spacing = affine[0, 0]
    offsets = ((np.arange(supersampling) + 0.5) / supersampling - 0.5) * spacing  # (s,) mm within a voxel
    k, j, i = (np.arange(n) for n in shape_kji)
    z0 = affine[2, 3] + k * spacing
    y0 = affine[1, 3] + j * spacing
    x0 = affine[0, 3] + i * spacing
    fraction = np.zeros(tuple(shape_kji), dtype=np.float64)
    for dz in offsets:
        for dy in offsets:
            for dx in offsets:
                fraction += inside((x0 + dx)[None, None, :], (y0 + dy)[None, :, None], (z0 + dz)[:, None, None])
    return (fraction / supersampling**3).astype(np.float32)


def sphere(shape_kji: Sequence[int] = (64, 64, 64), spacing_mm: float = 2.0, radius_mm: float = 40.0,
           center_ras: Sequence[float] = (0.0, 0.0, 0.0)) -> Tuple[np.ndarray, np.ndarray]:
    """Uniform sphere of value 1 centred on the grid centre -> (occupancy (K, J, I), affine)."""
    affine = grid_affine(shape_kji, spacing_mm, center_ras)
    c = np.asarray(center_ras, dtype=np.float64)
    values = occupancy(lambda x, y, z: (x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2 <= radius_mm**2,
                       shape_kji, affine)
    return values, affine


def cylinder(shape_kji: Sequence[int] = (64, 64, 64), spacing_mm: float = 2.0, radius_mm: float = 30.0,
             half_length_mm: float = 50.0) -> Tuple[np.ndarray, np.ndarray]:
    """Uniform cylinder of value 1 along the superior-inferior (z) axis, centred at the origin."""
    affine = grid_affine(shape_kji, spacing_mm)
    values = occupancy(lambda x, y, z: (x**2 + y**2 <= radius_mm**2) & (np.abs(z) <= half_length_mm),
                       shape_kji, affine)
    return values, affine


def chest(size: int = 128, spacing_mm: float = 2.5) -> CTVolume:
    """A simple anatomical chest in HU: body, two lungs, heart on the patient's left, spine, sternum and ribs.

    Default 128^3 at 2.5 mm (320 mm field of view, like X2CT's crop). Built from ellipsoids and tori; values are
    typical HU: air -1000, lung -850, soft tissue 40, blood 50, cancellous bone 300, cortical bone 1200.
    """
    shape = (size, size, size)
    affine = grid_affine(shape, spacing_mm)

    def fraction(inside):
        return occupancy(inside, shape, affine, supersampling=2)

    def ellipsoid(cx, cy, cz, rx, ry, rz):
        return lambda x, y, z: ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 + ((z - cz) / rz) ** 2 <= 1.0

    def rib(z_mm):
        # A flattened ring around the thorax at height z, open at the front; 6 mm thick.
        def inside(x, y, z):
            ring = np.abs(np.sqrt((x / 140.0) ** 2 + ((y + 10) / 95.0) ** 2) - 1.0) * 100.0 <= 3.0
            return ring & (np.abs(z - z_mm + 0.15 * (y + 10)) <= 3.0) & (y < 60)
        return inside

    hu = np.full(shape, -1000.0, dtype=np.float32)  # (K, J, I) air

    def paint(inside, value):
        f = fraction(inside)
        hu[...] = hu * (1 - f) + value * f

    paint(lambda x, y, z: ((x / 160.0) ** 2 + ((y + 10) / 110.0) ** 2 <= 1.0) & (np.abs(z) <= 150), 40.0)  # body
    paint(ellipsoid(75, -5, 20, 55, 70, 110), -850.0)  # right lung (patient's right = +x)
    paint(ellipsoid(-75, -5, 20, 50, 68, 105), -850.0)  # left lung
    paint(ellipsoid(-25, 25, -30, 55, 45, 55), 50.0)  # heart, towards the patient's left
    paint(lambda x, y, z: (x**2 + (y + 75) ** 2 <= 18.0**2) & (np.abs(z) <= 150), 300.0)  # vertebral bodies
    paint(lambda x, y, z: (np.abs(x**2 + (y + 75) ** 2 - 16.0**2) <= 60.0) & (np.abs(z) <= 150), 1200.0)  # cortex
    paint(lambda x, y, z: (np.abs(x) <= 12) & (np.abs(y - 92) <= 5) & (np.abs(z) <= 90), 700.0)  # sternum
    for z_mm in range(-110, 131, 30):
        paint(rib(float(z_mm)), 900.0)
    return CTVolume(hu=hu, affine=affine, source="ct2x.phantoms.chest")
