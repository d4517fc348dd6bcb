"""Slice-warp projector: forward projection as a sum of 2-D warped slices (Joseph's method, shear-warp layout).

Each ray is integrated across its *main axis*, the volume index axis it is most aligned with (Joseph's rule; a wide
cone at an oblique angle splits the detector into regions with different main axes). Every slice across it meets a
ray in one point; since a ray is a line, the in-slice coordinates of that point are affine in the slice index, so
one 2-D bilinear `grid_sample` per chunk of slices samples all rays at once, and the line integral is the sum over
slices times the ray's length per slice. The volume is re-sliced once per main axis and cached, so a new view only
pays for the warps.

Anti-aliasing (on by default) makes the work follow the detector rather than the CT:
- in-plane, slices are box-filtered by the integer factor by which the detector pixel, projected to the volume
  centre, is wider than a voxel;
- along the main axis, neighbouring slices are summed into slabs as long as a ray drifts sideways by at most
  `max_drift_voxels` (default 2) filtered voxels across a slab, so near-axial rays take fewer steps. On the real
  chest CT this stays within 0.3 % relative L2 of the dense reference at 0/30/45/90 deg (bench/RESULTS.md).
With `antialias=False` the method is plain Joseph: one bilinear sample per slice per ray.

Each `grid_sample` call covers a chunk of slabs and, of the detector, only the rectangle whose rays meet those slabs
(at slider geometry about half the rays miss a given slab and would read zeros). On the CPU the chunk is first
copied into a reused buffer, which halves the sampling time (`SliceWarpProjector._staged`).

The continuous volume is the trilinear interpolant between voxel centres with zero outside, the same one that
`reference.reference_projection` integrates densely.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..conventions import spacing_from_affine, voxel_to_world, world_to_voxel
from ..errors import CT2XInputError
from ..geometry import View

MODES = ("sum", "max")

# For main axis m (0 = i, 1 = j, 2 = k): the tensor dims (of B, C, K, J, I) holding the slice rows and columns, and
# which index axes they are. grid_sample's x runs along columns, y along rows.
_SLICE_LAYOUT = {0: ((2, 3), (2, 1)), 1: ((2, 4), (2, 0)), 2: ((3, 4), (1, 0))}
_MAIN_DIM = {0: 4, 1: 3, 2: 2}
# Grid points per grid_sample call (4 slabs at 256^2): few slabs keep the detector rectangle per chunk tight, enough
# points keep the per-call overhead small.
_SAMPLES_PER_CHUNK = 1 << 18


@dataclass(frozen=True)
class _RayPlan:
    """How the rays of one detector region are projected: their main axis, filter factors and voxel-space rays.

    A region is the bounding rectangle of the pixels whose rays share a main axis; `mask` marks those pixels when
    other rays share the rectangle.
    """

    main: int  # main axis, 0 = i, 1 = j, 2 = k
    slab: int
    pool_rows: int
    pool_cols: int
    rows: slice  # the region on the detector
    cols: slice
    mask: Optional[np.ndarray]  # (h, w) bool, True where this plan's rays are; None = the whole region
    origins_vox: np.ndarray  # (h, w, 3) ray origins, voxel index (i, j, k)
    directions_mm: np.ndarray  # (h, w, 3) unit ray directions, RAS
    along: np.ndarray  # (h, w) main index per mm along each ray
    slope: np.ndarray  # (h, w, 3) index change per unit of main index along each ray

    @property
    def stack_key(self) -> Tuple[int, int, int, int]:
        return self.main, self.slab, self.pool_rows, self.pool_cols


class SliceWarpProjector:
    """Projects a batch of volumes (B, C, K, J, I) with a voxel->RAS affine at any number of views.

    float32/float64 anywhere; float16/bfloat16 on CUDA (on the CPU they are computed in float32).

    Differentiable with respect to the volume. Re-sliced copies are cached per (main axis, filter factors) when the
    volume does not require gradients; with gradients they are rebuilt per call so that every call has its own graph.
    """

    def __init__(self, volume: torch.Tensor, affine: np.ndarray, antialias: bool = True, max_slab: int = 8,
                 max_drift_voxels: float = 2.0):
        if volume.ndim != 5:
            raise CT2XInputError(f"projector volume must be (B, C, K, J, I), got shape {tuple(volume.shape)}")
        if min(volume.shape[2:]) < 2:
            raise CT2XInputError(f"projector volume needs at least 2 voxels per axis, got {tuple(volume.shape[2:])}")
        if volume.device.type == "cpu" and volume.dtype in (torch.float16, torch.bfloat16):
            volume = volume.float()  # CPU grid_sample has no half-precision kernel worth using (bf16 crashed here)
        self.volume = volume
        self.affine = np.asarray(affine, dtype=np.float64)
        self.voxel_per_mm = np.linalg.inv(self.affine[:3, :3])  # (3, 3) world direction (mm) -> index steps
        self.antialias = antialias
        self.max_slab = max(1, int(max_slab))
        self.max_drift_voxels = float(max_drift_voxels)  # sideways ray travel allowed across one slab, filtered voxels
        self.spacing_mm = spacing_from_affine(self.affine)  # (3,) mm per i, j, k
        self.shape_ijk = np.array(volume.shape[2:][::-1])  # (I, J, K)
        self.center_ras = voxel_to_world(self.affine, (self.shape_ijk - 1) / 2.0)
        self._stacks: Dict[Tuple[int, int, int, int, str], torch.Tensor] = {}  # (slabs, B*C, rows, cols)
        self._staging: Optional[torch.Tensor] = None  # flat CPU buffer the chunk being sampled is copied into

    # --- public ---------------------------------------------------------------------------------------------
    def project(self, views: Sequence[View], mode: str = "sum") -> torch.Tensor:
        """Every volume at every view -> (B, P, C, H, W): line integrals (value x mm) or maxima along rays."""
        if mode not in MODES:
            raise CT2XInputError(f"projection mode {mode!r} is unknown; use one of {MODES}")
        return torch.stack([self._project_view(view, mode) for view in views], dim=1)

    def prepare(self, views: Sequence[View], mode: str = "sum") -> None:
        """Build (and cache) the re-sliced volumes these views need, so that later calls pay only for warps."""
        for view in views:
            for plan in self._plans(view):
                self._stack(*plan.stack_key, mode)

    # --- per view -------------------------------------------------------------------------------------------
    def _plans(self, view: View) -> List[_RayPlan]:
        """Joseph's rule per ray: integrate across the index axis the ray is most aligned with (in voxel steps).

        Near-axial views use one axis for every ray; oblique views with a wide cone split the detector into regions.
        """
        origins, directions = view.rays()  # (H, W, 3) RAS mm, unit directions
        origins_vox = world_to_voxel(self.affine, origins)  # (H, W, 3) ijk
        directions_vox = directions @ self.voxel_per_mm.T  # (H, W, 3) ijk per mm
        best_axis = np.argmax(np.abs(directions_vox), axis=-1)  # (H, W)
        main_axes = np.flatnonzero(np.bincount(best_axis.ravel(), minlength=3))
        pitch_mm = self._detector_pitch_at_volume(view)
        plans = []
        for main in (int(m) for m in main_axes):
            rows = cols = slice(None)
            mask = None
            if len(main_axes) > 1:
                uses = best_axis == main
                r, c = np.nonzero(uses)
                rows, cols = slice(r.min(), r.max() + 1), slice(c.min(), c.max() + 1)
                mask = uses[rows, cols]
            along = directions_vox[rows, cols, main]  # (h, w), never below 1/sqrt(3) of the largest component
            slope = directions_vox[rows, cols] / along[..., None]  # (h, w, 3)
            row_axis, col_axis = _SLICE_LAYOUT[main][1]
            pool_rows = pool_cols = slab = 1
            if self.antialias:
                pool_rows = self._pool_factor(pitch_mm, row_axis)
                pool_cols = self._pool_factor(pitch_mm, col_axis)
                used = np.abs(slope if mask is None else slope[mask])  # (n, 3) slopes of this plan's rays
                drift = max(used[..., row_axis].max() / pool_rows, used[..., col_axis].max() / pool_cols)
                slab = int(min(self.max_slab, max(1, math.floor(self.max_drift_voxels / max(drift, 1e-6))),
                               self.shape_ijk[main]))
            plans.append(_RayPlan(main, slab, pool_rows, pool_cols, rows, cols, mask, origins_vox[rows, cols],
                                  directions[rows, cols], along, slope))
        return plans

    def _detector_pitch_at_volume(self, view: View) -> float:
        """Detector pixel size (mm) projected back to the volume centre."""
        pitch = min(view.detector.pixel_spacing_mm)
        if view.beam == "parallel":
            return pitch
        depth = float(np.dot(self.center_ras - view.source_ras, view.principal_direction))
        return pitch * max(depth, 1e-6) / view.source_to_detector_mm

    def _pool_factor(self, pitch_mm: float, axis: int) -> int:
        factor = int(math.floor(pitch_mm / self.spacing_mm[axis] + 1e-6))
        return max(1, min(factor, int(self.shape_ijk[axis]) // 2))

    def _project_view(self, view: View, mode: str) -> torch.Tensor:
        """(B, C, H, W) projection of every volume at one view."""
        batch, channels = self.volume.shape[:2]
        height, width = view.detector.shape
        result = None
        for plan in self._plans(view):
            part = self._project_region(view, plan, mode)  # (B*C, h, w)
            if plan.mask is None:
                result = part
                continue
            if result is None:
                result = part.new_zeros(batch * channels, height, width)
            mask = torch.from_numpy(plan.mask).to(part.device)
            result[:, plan.rows, plan.cols] = torch.where(mask, part, result[:, plan.rows, plan.cols])
        return result.view(batch, channels, height, width)

    def _project_region(self, view: View, plan: _RayPlan, mode: str) -> torch.Tensor:
        """(B*C, h, w) projection of the rays of one plan."""
        main, slab, pool_rows, pool_cols = plan.stack_key
        slab = self._cached_slab(main, slab, pool_rows, pool_cols, mode)
        origins_vox, slope, along = plan.origins_vox, plan.slope, plan.along
        stack = self._stack(main, slab, pool_rows, pool_cols, mode)
        row_axis, col_axis = _SLICE_LAYOUT[main][1]
        n_slabs, _, n_rows, n_cols = stack.shape

        # Slab n is centred on original main index t_n = slab*n + (slab-1)/2. Along a ray an index axis a is at
        # a(t) = o_a + (t - o_m) * slope_a; box filtering by p maps index a to (a - (p-1)/2) / p; grid_sample's
        # align_corners coordinates map index x of an n-long axis to 2x/(n-1) - 1. All affine in n:
        # grid(n) = start + n * step.
        o_main = origins_vox[..., main]
        starts, steps = [], []
        for axis, pool, size in ((col_axis, pool_cols, n_cols), (row_axis, pool_rows, n_rows)):
            scale = 2.0 / (pool * max(size - 1, 1))
            at_first_slab = origins_vox[..., axis] + ((slab - 1) / 2.0 - o_main) * slope[..., axis]
            starts.append(scale * (at_first_slab - (pool - 1) / 2.0) - 1.0)
            steps.append(scale * slab * slope[..., axis])
        starts, steps = np.stack(starts, -1), np.stack(steps, -1)  # (h, w, 2) grid x, y
        device, dtype = stack.device, stack.dtype
        start = torch.from_numpy(starts).to(device=device, dtype=dtype)
        step = torch.from_numpy(steps).to(device=device, dtype=dtype)

        first, last = self._slabs_in_front_of_source(view, main, slab, n_slabs, o_main, along)
        past_detector = self._slabs_past_detector(view, slab, o_main, along, plan.directions_mm)
        if past_detector is not None:
            threshold = torch.from_numpy(past_detector[0]).to(device=device, dtype=dtype)[..., None]  # (h, w, 1)
        # Only the detector rectangle whose rays meet a chunk's slabs is sampled for that chunk: at slider
        # geometry about half the rays of a slab miss it.
        enter, leave = _slabs_hitting_stack(starts, steps, n_rows, n_cols, plan.mask)  # (h, w)
        rows_enter, rows_leave = enter.min(1), leave.max(1)  # (h,) slab range any pixel of a row meets
        cols_enter, cols_leave = enter.min(0), leave.max(0)  # (w,)
        height, width = start.shape[:2]
        chunk = max(1, _SAMPLES_PER_CHUNK // (height * width))
        empty = 0.0 if mode == "sum" else -math.inf
        result = torch.full((stack.shape[1], height, width), empty, device=device, dtype=dtype)
        for begin in range(first, last, chunk):
            end = min(begin + chunk, last)
            rows = _span((rows_enter < end) & (rows_leave >= begin))
            cols = _span((cols_enter < end) & (cols_leave >= begin))
            if rows is None or cols is None:
                continue
            index = torch.arange(begin, end, device=device, dtype=dtype).view(-1, 1, 1, 1)
            grid = torch.addcmul(start[rows, cols], index, step[rows, cols])  # (n, h', w', 2)
            if past_detector is not None:  # samples past a ray's pixel read zero (outside [-1, 1])
                past = index >= threshold[rows, cols] if past_detector[1] else index <= threshold[rows, cols]
                grid = grid.masked_fill(past.expand_as(grid), 2.0)
            samples = F.grid_sample(self._staged(stack, begin, end), grid, mode="bilinear", padding_mode="zeros",
                                    align_corners=True)  # (n, B*C, h', w')
            target = result[:, rows, cols]
            if mode == "sum":
                target += samples.sum(0)
            else:
                target.copy_(torch.maximum(target, samples.amax(0)))
        if mode == "max":  # a ray with a sample outside the stack read a zero there; one without samples is zero
            read_zero = torch.from_numpy((enter > first) | (leave < last - 1) | (last <= first)).to(device)
            result = torch.where(read_zero, result.clamp_min(0.0), result)
        else:
            # Ray length per unit of main index: the direction is a unit world vector, so 1 / |d(main)/d(mm)|.
            mm_per_slice = torch.from_numpy(1.0 / np.abs(along)).to(device, dtype)
            result = result * mm_per_slice
        return result

    def _staged(self, stack: torch.Tensor, begin: int, end: int) -> torch.Tensor:
        """stack[begin:end]; on the CPU copied into a reused buffer first (not under autograd).

        grid_sample's gathers stall on memory that is not in cache, while a plain copy streams it in: sampling the
        copy takes half the time at slider geometry on the real chest CT (bench/RESULTS.md).
        """
        chunk = stack[begin:end]
        if chunk.device.type != "cpu" or chunk.requires_grad:
            return chunk
        if self._staging is None or self._staging.numel() < chunk.numel():
            self._staging = torch.empty(chunk.numel(), dtype=chunk.dtype)
        return self._staging[:chunk.numel()].view_as(chunk).copy_(chunk)

    def _slabs_in_front_of_source(self, view: View, main: int, slab: int, n_slabs: int, o_main: np.ndarray,
                                  along: np.ndarray) -> Tuple[int, int]:
        """Range of slab indices that lie on the detector side of a cone-beam source (all slabs otherwise)."""
        if view.beam != "cone":
            return 0, n_slabs
        source = float(o_main.flat[0])
        centres = slab * np.arange(n_slabs) + (slab - 1) / 2.0
        ahead = np.nonzero((centres - source) * np.sign(along.flat[0]) > 0)[0]
        if ahead.size == 0:
            return 0, 0
        return int(ahead[0]), int(ahead[-1]) + 1

    def _slabs_past_detector(self, view: View, slab: int, o_main: np.ndarray, along: np.ndarray,
                             direction_mm: np.ndarray) -> Optional[Tuple[np.ndarray, bool]]:
        """Per pixel, the slab index from which on (in the ray's direction) slab centres lie past the detector,
        and whether the ray runs towards increasing index; None when the whole volume is in front of the detector.
        """
        corners = np.stack(np.meshgrid(*[[-1.0, n] for n in self.shape_ijk], indexing="ij"), -1).reshape(-1, 3)
        corners_ras = voxel_to_world(self.affine, corners)
        if np.max((corners_ras - view.detector_center_ras) @ view.principal_direction) <= 0:
            return None
        # Every ray starts source_to_detector_mm before the detector plane (a parallel ray) or at the source.
        ray_length_mm = view.source_to_detector_mm / (direction_mm @ view.principal_direction)  # (H, W) to pixel
        t_detector = o_main + ray_length_mm * along  # (H, W) main index where each ray meets its pixel
        last_inside = (t_detector - (slab - 1) / 2.0) / slab  # slab coordinate of the detector
        increasing = bool(along.flat[0] > 0)
        return (np.floor(last_inside) + 1 if increasing else np.ceil(last_inside) - 1), increasing

    # --- re-slicing -----------------------------------------------------------------------------------------
    def _cached_slab(self, main: int, slab: int, pool_rows: int, pool_cols: int, mode: str) -> int:
        """The longest cached slab length up to `slab` for this axis and filter; `slab` when none is cached.

        Shorter slabs only drift less, so a cached one serves instead of a new re-slicing, which would stall a
        slider sweep for a few hundred ms at each new length.
        """
        cached = [key[1] for key in self._stacks
                  if key[0] == main and key[1] <= slab and key[2:] == (pool_rows, pool_cols, mode)]
        return max(cached, default=slab)

    def _stack(self, main: int, slab: int, pool_rows: int, pool_cols: int, mode: str) -> torch.Tensor:
        """The volume re-sliced across `main` with these filter factors: (slabs, B*C, rows, cols), cached."""
        key = (main, slab, pool_rows, pool_cols, mode)
        if key in self._stacks:
            return self._stacks[key]
        stack = self._reslice(main, slab, pool_rows, pool_cols, mode)
        if not (torch.is_grad_enabled() and self.volume.requires_grad):
            self._stacks[key] = stack
        return stack

    def _reslice(self, main: int, slab: int, pool_rows: int, pool_cols: int, mode: str) -> torch.Tensor:
        """(B, C, K, J, I) -> (ceil(N/slab), B*C, rows, cols): slabs across `main`, box-filtered in-plane."""
        batch, channels = self.volume.shape[:2]
        row_dim, col_dim = _SLICE_LAYOUT[main][0]
        slices = self.volume.permute(_MAIN_DIM[main], 0, 1, row_dim, col_dim)  # (N, B, C, rows, cols)
        slices = slices.reshape(slices.shape[0], batch * channels, *slices.shape[3:])
        if slab > 1:
            n = slices.shape[0]
            padded = math.ceil(n / slab) * slab
            slices = F.pad(slices, (0, 0, 0, 0, 0, 0, 0, padded - n))
            slices = slices.view(padded // slab, slab, *slices.shape[1:])
            slices = slices.sum(1) if mode == "sum" else slices.amax(1)
        if pool_rows > 1 or pool_cols > 1:
            rows, cols = slices.shape[2:]
            slices = F.pad(slices, (0, (-cols) % pool_cols, 0, (-rows) % pool_rows))
            pool = F.avg_pool2d if mode == "sum" else F.max_pool2d
            slices = pool(slices, (pool_rows, pool_cols))
        return slices.contiguous()


def _slabs_hitting_stack(starts: np.ndarray, steps: np.ndarray, n_rows: int, n_cols: int,
                         mask: Optional[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
    """Per pixel, the first and last slab index at which its bilinear sample can be non-zero, (h, w) int each.

    Grid coordinates are start + n * step (x = column, y = row, align_corners); a sample reads the stack only while
    its index lies in (-1, size) along both axes, and reads zero otherwise. Pixels that never do get enter > leave.
    """
    enter = np.full(starts.shape[:2], -np.inf)
    leave = np.full(starts.shape[:2], np.inf)
    for axis, size in ((0, n_cols), (1, n_rows)):
        reach = 2.0 / max(size - 1, 1) + 1e-4  # one cell, plus slack for the float32 grid: a superset is exact
        start = starts[..., axis]
        step = np.where(steps[..., axis] == 0, 1e-30, steps[..., axis])  # a constant coordinate: bounds far away
        at_low, at_high = (-1.0 - reach - start) / step, (1.0 + reach - start) / step  # slab index at the bounds
        enter = np.maximum(enter, np.minimum(at_low, at_high))
        leave = np.minimum(leave, np.maximum(at_low, at_high))
    big = np.iinfo(np.int64).max // 4
    enter = np.clip(np.floor(enter) + 1, -big, big).astype(np.int64)
    leave = np.clip(np.ceil(leave) - 1, -big, big).astype(np.int64)
    if mask is not None:
        enter[~mask], leave[~mask] = big, -big
    return enter, leave


def _span(flags: np.ndarray) -> Optional[slice]:
    """The slice from the first to the last True in a 1-D array; None when there is none."""
    where = np.flatnonzero(flags)
    return slice(int(where[0]), int(where[-1]) + 1) if where.size else None


def project(volume: torch.Tensor, affine: np.ndarray, views: Sequence[View], mode: str = "sum",
            antialias: bool = True) -> torch.Tensor:
    """Forward projection of (B, C, K, J, I) volumes at `views` -> (B, P, C, H, W). See `SliceWarpProjector`.

    Each call builds a new projector, which re-slices the volume for the views' main axes: for the 512 x 512 x 141
    chest about 4 times the cost of the projection itself. To project one volume more than once, keep a
    `SliceWarpProjector` (its re-sliced volumes are cached) and call its `project`."""
    return SliceWarpProjector(volume, affine, antialias=antialias).project(views, mode)


def backproject(images: torch.Tensor, affine: np.ndarray, volume_shape: Sequence[int], views: Sequence[View],
                antialias: bool = True) -> torch.Tensor:
    """The adjoint of `project` (line-integral mode): (B, P, C, H, W) images -> (B, C, K, J, I) volume.

    Exact adjoint of the same discretisation, obtained as the vector-Jacobian product of the linear forward map, so
    <project(x), y> = <x, backproject(y)> to rounding.
    """
    batch, _, channels = images.shape[:3]
    with torch.enable_grad():
        volume = torch.zeros(batch, channels, *volume_shape, dtype=images.dtype, device=images.device,
                             requires_grad=True)
        projections = SliceWarpProjector(volume, affine, antialias=antialias).project(views, "sum")
        (adjoint,) = torch.autograd.grad(projections, volume, grad_outputs=images, create_graph=images.requires_grad)
    return adjoint

