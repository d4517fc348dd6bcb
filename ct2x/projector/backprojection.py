"""XraySyn's single-image backprojection: each pixel's value spread along its ray, normalised by the ray's length.

V(y) = I(x) / |l(x)| for every voxel y on the ray l(x) of pixel x, so a projection of a uniform volume comes back as
that uniform value (per mm). Voxel-driven: each voxel centre is projected onto the detector and reads the normalised
image bilinearly. Unlike `slicewarp.backproject` this is not an adjoint; it is the XraySyn prior-building operator.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..conventions import voxel_to_world
from ..geometry import View
from .slicewarp import SliceWarpProjector


def backproject_view(image: torch.Tensor, view: View, affine: np.ndarray, volume_shape: Sequence[int],
                     min_length_mm: float = 1e-3) -> torch.Tensor:
    """(B, C, H, W) image at `view` -> (B, C, K, J, I) volume on the grid `affine` (voxel -> RAS mm), per mm.

    Voxels whose ray misses the detector, or that lie behind a cone-beam source, get 0.
    """
    batch, channels, height, width = image.shape
    depth, rows, cols = (int(n) for n in volume_shape)  # K, J, I
    ones = torch.ones(1, 1, depth, rows, cols, dtype=image.dtype, device=image.device)
    length = SliceWarpProjector(ones, affine, antialias=False).project([view])[:, 0]  # (1, 1, H, W) mm
    per_mm = torch.where(length > min_length_mm, image / length.clamp_min(min_length_mm), torch.zeros_like(image))

    k, j, i = np.meshgrid(np.arange(depth), np.arange(rows), np.arange(cols), indexing="ij")
    ijk = np.stack([i.ravel(), j.ravel(), k.ravel()], axis=-1).astype(np.float64)  # (K*J*I, 3) voxel index
    points_ras = voxel_to_world(np.asarray(affine), ijk)  # (N, 3) RAS mm
    pixel = view.project_points(points_ras)  # (N, 2) column, row
    grid = np.stack([2 * pixel[:, 0] / max(width - 1, 1) - 1, 2 * pixel[:, 1] / max(height - 1, 1) - 1], -1)
    if view.beam == "cone":
        depth_mm = (points_ras - view.source_ras) @ view.principal_direction
        grid[depth_mm <= 0] = 2.0  # outside [-1, 1]: reads zero
    grid_t = torch.from_numpy(grid).to(image).view(1, 1, -1, 2).expand(batch, -1, -1, -1)
    values = F.grid_sample(per_mm, grid_t, mode="bilinear", padding_mode="zeros", align_corners=True)
    return values.view(batch, channels, depth, rows, cols)
