"""Random rigid motion and contrast of a cube CT, the part of augmentation both training tasks share.

The CT is (D, H, W) HU (`ct2x.data.x2ct_convention.ct_cube`'s KJI layout: D superior -> inferior, H anterior ->
posterior, W right -> left) on an unchanged affine, so a moved CT keeps its cube, isocentre and voxel grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ct2x.errors import CT2XInputError

AIR_HU = -1024.0


@dataclass(frozen=True)
class CTMotion:
    """Ranges of the draw: angles in degrees, lengths in mm."""

    rotation_deg: float = 5.0  # turn about the superior-inferior axis, uniform in +-
    shift_mm: float = 8.0  # shift along each axis, uniform in +- (the cube then crops the CT elsewhere)
    contrast: float = 0.05  # soft-tissue contrast scale 1 +- this (HU above -1000 scaled about -1000)

    def __post_init__(self) -> None:
        if min(self.rotation_deg, self.shift_mm, self.contrast) < 0:
            raise CT2XInputError("augmentation ranges must not be negative")

    def apply(self, ct_hu: np.ndarray, voxel_mm: float, rng: np.random.Generator) -> np.ndarray:
        """(D, H, W) float32 HU of one draw from `rng`: `ct_hu` turned, shifted (air comes in at the edges) and
        re-contrasted."""
        angle = math.radians(rng.uniform(-1, 1) * self.rotation_deg)
        shift_voxels = rng.uniform(-1, 1, size=3) * self.shift_mm / voxel_mm  # (W, H, D) voxels
        moved = turn_and_shift(torch.from_numpy(np.asarray(ct_hu, dtype=np.float32)), angle, shift_voxels)
        contrast = 1.0 + rng.uniform(-1, 1) * self.contrast
        return torch.where(moved > -1000.0, -1000.0 + (moved + 1000.0) * contrast, moved).numpy()


def turn_and_shift(ct_hu: torch.Tensor, angle_rad: float, shift_voxels: Sequence[float]) -> torch.Tensor:
    """(D, H, W) HU turned by `angle_rad` about the D axis and shifted by (W, H, D) voxels; outside is air."""
    depth, height, width = ct_hu.shape
    cos, sin = math.cos(angle_rad), math.sin(angle_rad)
    theta = torch.tensor([[cos, -sin, 0.0, 2 * shift_voxels[0] / width],
                          [sin, cos, 0.0, 2 * shift_voxels[1] / height],
                          [0.0, 0.0, 1.0, 2 * shift_voxels[2] / depth]], dtype=torch.float32)  # (x=W, y=H, z=D)
    grid = F.affine_grid(theta[None], [1, 1, depth, height, width], align_corners=False)
    shifted = ct_hu - AIR_HU  # sample with zeros outside = air
    return F.grid_sample(shifted[None, None], grid, align_corners=False)[0, 0] + AIR_HU
