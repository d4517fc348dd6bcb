"""Many views of one detector projected together: ray planning on the volume's device, one sampling call per stack
and chunk of slabs for all the views that use that stack (`SliceWarpProjector(batched=True)`, the default on GPUs).

The per-view path (`SliceWarpProjector._project_view`) plans each view in numpy and samples only the detector
rectangle whose rays meet each chunk of slabs: right for a CPU, whose time follows the samples taken. A GPU takes
those samples in a fraction of the time the host needs to plan them and to launch the kernels (bench/RESULTS.md,
"GPU": 0.1 ms of kernels in 5.5 ms per view). Here the host does only what does not grow with the pixels: the
views' geometry (a few numbers each), one copy back of each view's slope ranges to choose its stacks with the
per-view path's own rule (`SliceWarpProjector._stack_choice`), and a loop over stacks and chunks of slabs. Every
pixel of every view takes every slab of its stack; a sample that the per-view path does not take (before the
source, past the pixel, or on a ray of another main axis) reads zero. The films are the per-view path's to float32
rounding (tests/test_projector.py).
"""

from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..conventions import world_to_voxel
from ..geometry import View
from .slicewarp import _SLICE_LAYOUT, SliceWarpProjector, _shear_pad, single_threaded_ops

# Grid points per sampling call, all views together (2^24: 128 MB of float32 grid).
_SAMPLES_PER_CALL = 1 << 24
# Views planned together: the rays of 64 views of 256^2 pixels take 100 MB per float64 (P, 3, H, W) tensor.
_VIEWS_PER_BATCH = 64


def project_view_batch(projector: SliceWarpProjector, views: Sequence[View]) -> Tensor:
    """Line integrals of the projector's volumes at `views`, which share one detector and beam -> (B, P, C, H, W)."""
    return torch.cat([_project_batch(projector, views[begin:begin + _VIEWS_PER_BATCH])
                      for begin in range(0, len(views), _VIEWS_PER_BATCH)], 1)


def _project_batch(projector: SliceWarpProjector, views: Sequence[View]) -> Tensor:
    """`project_view_batch` of at most _VIEWS_PER_BATCH views."""
    batch, channels = projector.volume.shape[:2]
    height, width = views[0].detector.shape
    rays = _Rays(projector, views)
    result = projector.volume.new_zeros(batch * channels, len(views), height, width)
    for key, members in _stack_users(projector, views, rays).items():
        main = key[0]
        selected = rays.select(list(members), main)
        part = _integrate(projector, key, selected)  # (B*C, P', H, W)
        chosen = selected.views
        rows = torch.from_numpy(np.stack(list(members.values()))).to(chosen.device)[..., None]  # (P', 2, H, 1)
        forward = rays.offsets[chosen, main] > 0  # (P', H, W)
        uses = (rays.best_axis[chosen] == main) & torch.where(forward, rows[:, 0], rows[:, 1])
        result[:, chosen] = torch.where(uses, part, result[:, chosen])
    return result.view(batch, channels, len(views), height, width).transpose(1, 2)


class _AxisRays(NamedTuple):
    """Rays of P' views integrated across one main axis, voxel index space, float64 on the volume's device."""

    views: Tensor  # (P',) their indices in the batch
    origins: Tensor  # (P', 3, 1, 1) cone-beam sources, or (P', 3, H, W)
    slope: Tensor  # (P', 3, H, W) index change per unit of main index
    pixels_main: Tensor  # (P', H, W) main index of each ray's pixel centre, where the ray ends
    along: Tensor  # (P', H, W) main index per mm along each ray
    cut_at_pixel: Tensor  # (P', 1, 1) bool: part of the volume lies past the detector
    cone: bool
    limited: bool  # whether a ray may start or stop inside the volume (a source in or near it, or a cut at a pixel)


class _Rays:
    """The views' rays in voxel index space, index axis (i, j, k) second, on the volume's device in float64: pixel
    centres (P, 3, H, W), origins ((P, 3, 1, 1) for a cone beam's source, else (P, 3, H, W)), origin -> pixel offsets
    (P, 3, H, W), lengths to the pixels (P, H, W) mm and each ray's main axis (P, H, W)."""

    def __init__(self, projector: SliceWarpProjector, views: Sequence[View]):
        first, device = views[0], projector.volume.device  # the views share its detector and beam
        rows_mm, cols_mm = first.detector.pixel_offsets_mm()  # (H,), (W,)
        to_voxel = projector.voxel_per_mm  # (3, 3) mm -> index steps
        centre = world_to_voxel(projector.affine, np.stack([view.detector_center_ras for view in views]))  # (P, 3) ijk
        row = np.stack([to_voxel @ view.row_direction for view in views])  # (P, 3) index steps per mm down the rows
        col = np.stack([to_voxel @ view.column_direction for view in views])
        distance = np.array([view.source_to_detector_mm for view in views])  # (P,) mm
        if first.beam == "parallel":
            far = distance[:, None] * np.stack([to_voxel @ view.principal_direction for view in views])  # (P, 3)
        else:
            far = world_to_voxel(projector.affine, np.stack([view.source_ras for view in views]))  # (P, 3) ijk
        # The detector's corners span each view's pixel centres along every index axis: (P, 4, 3) ijk.
        corners = (centre[:, None] + np.array([rows_mm[0], rows_mm[-1]]).repeat(2)[:, None] * row[:, None]
                   + np.array([cols_mm[0], cols_mm[-1]] * 2)[:, None] * col[:, None])
        self._pixels_low, self._pixels_high = corners.min(1), corners.max(1)  # (P, 3) each, host
        # One copy to the device: (P, 13) = centre, row, column, source or offset, distance.
        far_host = far
        packed = torch.from_numpy(np.concatenate([centre, row, col, far, distance[:, None]], 1)).to(device)
        centre, row, col, far = (packed[:, 3 * n:3 * n + 3, None, None] for n in range(4))  # (P, 3, 1, 1) each
        distance = packed[:, 12, None, None]  # (P, 1, 1)
        rows = torch.from_numpy(rows_mm).to(device)[:, None]  # (H, 1)
        cols = torch.from_numpy(cols_mm).to(device)  # (W,)
        self.pixels = centre + row * rows + col * cols  # (P, 3, H, W)
        if first.beam == "parallel":
            self.offsets = far.expand_as(self.pixels)
            self.origins = self.pixels - self.offsets
            self.lengths = distance.expand(-1, *self.pixels.shape[2:])
        else:
            self.origins = far
            self.offsets = self.pixels - far
            self.lengths = torch.sqrt(distance ** 2 + rows ** 2 + cols ** 2)  # (P, H, W)
        # Each ray's main axis (P, H, W), counted in filtered voxels and the first on ties as in the per-view path
        # (`_argmax_of_three`; torch's argmax across a dim of 3 is 40 times slower on a CPU).
        self.pitches_mm = [projector._detector_pitch_at_volume(view) for view in views]  # mm, at the volume
        filtered = np.stack([projector._filtered_voxels_per_voxel(pitch) for pitch in self.pitches_mm])  # (P, 3)
        advance = self.offsets.abs() * torch.from_numpy(filtered).to(device)[..., None, None]  # (P, 3, H, W)
        first_axis, second_axis, third_axis = advance.unbind(1)
        best = (second_axis > first_axis).long()
        self.best_axis = torch.where(third_axis > torch.maximum(first_axis, second_axis), 2, best)
        self._slopes: Dict[int, Tensor] = {}
        self.cone = first.beam == "cone"  # then a ray starts at the source; a parallel ray crosses the whole volume
        past = [projector._reaches_past_detector(view) for view in views]  # a ray's samples stop at its pixel
        self.cut_at_pixel = torch.tensor(past, device=device)[:, None, None]
        self._past, self._source = np.array(past), far_host if self.cone else None  # on the host: (P,), (P, 3) ijk
        self._shape, self._margin = projector.shape_ijk, projector.max_slab

    def slopes(self, main: int) -> Tensor:
        """(P, 3, H, W) index change per unit of main index along each ray."""
        if main not in self._slopes:
            self._slopes[main] = self.offsets / self.offsets[:, main:main + 1]
        return self._slopes[main]

    def select(self, members: List[int], main: int) -> _AxisRays:
        """The rays of these views (indices in the batch), integrated across main axis `main`."""
        limited = bool(self._past[members].any())
        if self._source is not None:
            # Every ray takes every slab only when its source lies before the first slab centre (after the last),
            # slab centres lying from 0 to below N + max_slab along `main`, and every pixel beyond it (before it).
            source = self._source[members, main]  # (P',) main index of each view's source
            below = (source < -self._margin) & (self._pixels_low[members, main] > source)
            above = (source > self._shape[main] + self._margin) & (self._pixels_high[members, main] < source)
            limited |= not bool(np.all(below | above))
        chosen = torch.tensor(members, device=self.pixels.device)
        return _AxisRays(chosen, self.origins[chosen], self.slopes(main)[chosen], self.pixels[chosen, main],
                         self.offsets[chosen, main] / self.lengths[chosen], self.cut_at_pixel[chosen], self.cone,
                         limited)


def _stack_users(projector: SliceWarpProjector, views: Sequence[View],
                 rays: _Rays) -> Dict[Tuple, Dict[int, np.ndarray]]:
    """stack key (`_RayPlan.stack_key`) -> {view: (2, H) bool}: the detector rows whose rays across that main axis,
    towards increasing index (first) or decreasing index (second), project with that stack, as the per-view path's
    regions and their bands of rows (`SliceWarpProjector._row_bands`) do.

    The slope ranges per row of every view, main axis and direction come back to the host in one copy; the choice is
    the per-view path's."""
    ranges = []
    for main in range(3):
        row_axis, col_axis = _SLICE_LAYOUT[main][1]
        slope = rays.slopes(main)
        forward = rays.offsets[:, main] > 0  # (P, H, W)
        for direction in (forward, ~forward):
            uses = (rays.best_axis == main) & direction  # (P, H, W)
            for axis in (row_axis, col_axis):
                ranges.append(torch.where(uses, slope[:, axis], torch.inf).amin(2))  # (P, H)
                ranges.append(torch.where(uses, slope[:, axis], -torch.inf).amax(2))
    height = views[0].detector.shape[0]
    # (P, main, forward / backward, row low / high and column low / high, H)
    ranges = torch.stack(ranges, 1).view(len(views), 3, 2, 4, height).cpu().numpy()
    users: Dict[Tuple, Dict[int, np.ndarray]] = {}
    for index, pitch_mm in enumerate(rays.pitches_mm):
        for main in range(3):
            for direction, (row_low, row_high, col_low, col_high) in enumerate(ranges[index, main]):
                if not np.any(row_low <= row_high):  # no ray of this view crosses `main` in this direction
                    continue
                for begin, end, choice in projector._row_bands(main, pitch_mm, row_low, row_high, col_low, col_high):
                    rows = users.setdefault((main, *choice), {}).setdefault(index, np.zeros((2, height), bool))
                    rows[direction, begin:end] = True
    pool = projector._worker_pool(projector.volume.device)
    with single_threaded_ops(pool is not None):
        projector._build({key + ("sum",) for key in users}, pool)
    return users


def _integrate(projector: SliceWarpProjector, key: Tuple, rays: _AxisRays) -> Tensor:
    """(B*C, P', H, W) line integrals through stack `key` along the given rays (`_Rays.select`)."""
    main, slab, pool_rows, pool_cols, shear_rows, shear_cols, _ = key
    stack = projector._stack(*key, "sum")  # (slabs, B*C, rows, cols)
    n_slabs, _, n_rows, n_cols = stack.shape
    row_axis, col_axis = _SLICE_LAYOUT[main][1]
    origins, slope = rays.origins, rays.slope
    dtype = projector.volume.dtype
    # As in `SliceWarpProjector._start_region`: grid(n) = start + n * step, align_corners coordinates of slab n.
    o_main = origins[:, main]
    starts, steps = [], []
    for axis, pool, shear, size in ((col_axis, pool_cols, shear_cols, n_cols),
                                    (row_axis, pool_rows, shear_rows, n_rows)):
        scale = 2.0 / (pool * max(size - 1, 1))
        at_first_slab = origins[:, axis] + ((slab - 1) / 2.0 - o_main) * slope[:, axis]
        starts.append(scale * (at_first_slab + _shear_pad(slab, shear, pool) - (pool - 1) / 2.0) - 1.0)
        steps.append(scale * slab * slope[:, axis])
    start = torch.stack(starts, -1).to(dtype)  # (P', H, W, 2) grid x, y
    step = torch.stack(steps, -1).to(dtype)
    if rays.limited:
        first, end = _slab_range(slab, n_slabs, o_main if rays.cone else None, rays.pixels_main, rays.along,
                                 rays.cut_at_pixel)  # (P', H, W) each

    views, height, width = start.shape[:3]
    chunk = max(1, _SAMPLES_PER_CALL // (views * height * width))
    total = stack.new_zeros(stack.shape[1], views * height, width, dtype=dtype)
    for begin in range(0, n_slabs, chunk):
        index = torch.arange(begin, min(begin + chunk, n_slabs), device=stack.device, dtype=dtype)
        index = index.view(-1, 1, 1, 1)  # (n, 1, 1, 1)
        grid = torch.addcmul(start, index[..., None], step)  # (n, P', H, W, 2)
        if rays.limited:  # samples outside a ray's slabs read zero
            taken = (index >= first) & (index < end)  # (n, P', H, W)
            grid.masked_fill_(~taken[..., None], 2.0)
        samples = F.grid_sample(stack[begin:begin + len(index)].to(dtype), grid.view(len(index), -1, width, 2),
                                mode="bilinear", padding_mode="zeros", align_corners=True)  # (n, B*C, P'H, W)
        total += samples.sum(0)
    # Ray length per unit of main index: the direction is a unit world vector, so 1 / |d(main)/d(mm)|.
    return total.view(-1, views, height, width) / rays.along.abs().to(dtype)


def _slab_range(slab: int, n_slabs: int, source_main: Optional[Tensor], pixels_main: Tensor, along: Tensor,
                cut_at_pixel: Tensor) -> Tuple[Tensor, Tensor]:
    """Per ray, the first and one past the last slab index it samples (P', H, W) float each: as
    `SliceWarpProjector._slabs_in_front_of_source` and `_slabs_past_detector` choose them, slab centres ahead of a
    cone beam's source (`source_main`, its main index; None for a parallel beam) and, where `cut_at_pixel`, not past
    the ray's pixel.

    Slab n is centred on main index c_n = slab * n + (slab - 1) / 2; a ray towards increasing index takes c_n > source
    and n up to the slab of its pixel, one towards decreasing index the opposite."""
    increasing = along > 0
    first = torch.zeros_like(along)
    end = torch.full_like(along, n_slabs)
    if source_main is not None:
        source = (source_main - (slab - 1) / 2.0) / slab  # slab coordinate of the source
        first = torch.where(increasing, torch.floor(source) + 1, first)
        end = torch.where(increasing, end, torch.ceil(source))
    pixel = (pixels_main - (slab - 1) / 2.0) / slab  # ... and of each ray's pixel
    first = torch.where(cut_at_pixel & ~increasing, torch.maximum(first, torch.ceil(pixel)), first)
    end = torch.where(cut_at_pixel & increasing, torch.minimum(end, torch.floor(pixel) + 1), end)
    return first, end
