"""Reference ray marcher: dense trilinear sampling along every ray, float64.

Slow and simple on purpose: it is the yardstick the fast projector is measured against (tests, `bench/`). It
integrates the same continuous volume the fast projector sees: trilinear interpolation between voxel centres with
zero outside, i.e. support from index -1 to n along each axis.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..conventions import world_to_voxel
from ..geometry import View


def reference_projection(volume: torch.Tensor, affine: np.ndarray, view: View, step_mm: float = 0.25,
                         mode: str = "sum", rays_per_chunk: int = 4096) -> torch.Tensor:
    """Line integrals (value x mm) or maxima of `volume` (C, K, J, I) along the rays of `view` -> (C, H, W) float64.

    `affine` maps voxel (i, j, k, 1) to world RAS mm. Samples are the midpoints of equal steps of at most
    `step_mm` between the ray's entry into and exit from the volume's support.
    """
    volume = volume.to(torch.float64)
    channels = volume.shape[0]
    shape_ijk = np.array(volume.shape[1:][::-1], dtype=np.float64)  # (I, J, K)
    origins, directions = view.rays()  # (H, W, 3) RAS mm, unit
    height, width = origins.shape[:2]
    origins_vox = world_to_voxel(affine, origins.reshape(-1, 3))  # (R, 3) ijk
    directions_vox = directions.reshape(-1, 3) @ np.linalg.inv(affine[:3, :3]).T  # (R, 3) ijk per mm

    # Slab test against the support box [-1, n] per axis: ray parameter t in mm along the unit world direction.
    with np.errstate(divide="ignore", invalid="ignore"):
        t_low = (-1.0 - origins_vox) / directions_vox
        t_high = (shape_ijk - origins_vox) / directions_vox
    t_near = np.nanmax(np.where(np.isfinite(t_low), np.minimum(t_low, t_high), -np.inf), axis=1)
    t_far = np.nanmin(np.where(np.isfinite(t_low), np.maximum(t_low, t_high), np.inf), axis=1)
    # Rays parallel to an axis and outside its range never enter.
    outside = np.any((directions_vox == 0) & ((origins_vox <= -1) | (origins_vox >= shape_ijk)), axis=1)
    t_near = np.maximum(t_near, 0.0)
    if view.beam == "cone":  # a cone-beam ray ends on its pixel
        t_far = np.minimum(t_far, np.linalg.norm(view.pixel_centers_ras().reshape(-1, 3) - origins.reshape(-1, 3),
                                                 axis=1))
    length = np.where(outside, 0.0, np.clip(t_far - t_near, 0.0, None))  # (R,) mm inside the support
    steps = max(1, int(np.ceil(length.max() / step_mm)))
    fractions = (np.arange(steps) + 0.5) / steps  # (S,) midpoints in [0, 1]

    grid_scale = 2.0 / np.maximum(shape_ijk - 1.0, 1.0)  # voxel index -> grid_sample's [-1, 1] (align_corners)
    result = torch.zeros(channels, origins_vox.shape[0], dtype=torch.float64)
    for start in range(0, origins_vox.shape[0], rays_per_chunk):
        rays = slice(start, start + rays_per_chunk)
        t = t_near[rays, None] + fractions[None, :] * length[rays, None]  # (r, S) mm
        points = origins_vox[rays, None, :] + t[..., None] * directions_vox[rays, None, :]  # (r, S, 3) ijk
        grid = torch.from_numpy(points * grid_scale - 1.0).view(1, 1, -1, steps, 3)  # x=i, y=j, z=k
        samples = F.grid_sample(volume[None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        samples = samples.view(channels, -1, steps)  # (C, r, S)
        if mode == "sum":
            result[:, rays] = samples.sum(-1) * torch.from_numpy(length[rays] / steps)
        else:
            result[:, rays] = samples.amax(-1)
    return result.view(channels, height, width)
