"""Slice-warp projector: forward projection as a sum of 2-D warped slices (Joseph's method, shear-warp layout).

Each ray is integrated across its *main axis*, the volume index axis it is most aligned with (Joseph's rule, counted
in the anti-aliasing filter's voxels; a wide cone at an oblique angle splits the detector into regions with different
main axes). Every slice across it meets a ray in one point; since a ray is a line, the in-slice coordinates of that
point are affine in the slice index, so one 2-D bilinear `grid_sample` per chunk of slices samples all rays at once,
and the line integral is the sum over slices times the ray's length per slice. The volume is re-sliced once per
main axis, slab length, shear and filter and cached, so a new view only pays for the warps (`prepare(...,
sweep=True)` readies a whole slider range; a renderer's slab lengths can be merged from the shortest length that
divides them, and a stack across j comes from its twin across i where both pool the same voxels, each for a fraction
of a re-slicing). Ray planning works in voxel index space: pixel centres are affine in (row, column), so no per-pixel
RAS arrays.

Anti-aliasing (on by default) makes the work follow the detector rather than the CT:
- in-plane, slices are box-filtered by the integer factor by which the detector pixel, projected to the volume
  centre, is wider than a voxel;
- along the main axis, neighbouring slices are summed into slabs as long as a ray drifts sideways by at most
  `max_drift_voxels` (default 2) filtered voxels across a slab, so rays take fewer steps;
- where that at least doubles the slab length, slabs are sheared: each slice is shifted in-plane (linearly between
  whole voxels) along the slope of the view's middle ray, rounded to `SHEAR_STEP`, so that only the rays' spread
  about it limits the slab length, not their common slant. An oblique view with a narrow cone then takes as few
  steps as a frontal one. Elsewhere a shear by whole voxels per slice (no interpolation of the slices) is taken
  wherever it lengthens the slab at all (a wide cone's obliques), and failing that the middle slope's shear with
  each slice's shift rounded to whole voxels, in the longest slab that samples no further from the rays than the
  straight slab (mean square sideways offset, `_mean_square_offset`).
On the real chest CT this stays within 0.4 % relative L2 of the dense reference at 0-90 deg (bench/RESULTS.md).
A view's slab length and shear are functions of the view alone, so its image never depends on what was projected
before.
With `antialias=False` the method is plain Joseph: one bilinear sample per slice per ray.

Each `grid_sample` call covers a chunk of slabs and, of the detector, only the rectangle whose rays meet those slabs
(at slider geometry about half the rays miss a given slab and would read zeros); that rectangle comes from the central
projection of each slab's four corners onto the detector, not from every pixel. On the CPU the chunk is first
copied into a reused buffer, which halves the sampling time (`SliceWarpProjector._staged`), and the chunks can be
shared out to single-threaded workers (`workers`), which keep their speed beside other busy processes where
torch's intra-op threads do not.

The continuous volume is the trilinear interpolant between voxel centres with zero outside, the same one that
`reference.reference_projection` integrates densely.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..conventions import spacing_from_affine, voxel_to_world
from ..errors import CT2XInputError
from ..geometry import View

MODES = ("sum", "max")

# For main axis m (0 = i, 1 = j, 2 = k): the tensor dims (of B, C, K, J, I) holding the slice rows and columns, and
# which index axes they are. grid_sample's x runs along columns, y along rows.
_SLICE_LAYOUT = {0: ((2, 3), (2, 1)), 1: ((2, 4), (2, 0)), 2: ((3, 4), (1, 0))}
_MAIN_DIM = {0: 4, 1: 3, 2: 2}
# Grid points per grid_sample call (4 slabs at 256^2): few slabs keep the detector rectangle per chunk tight, enough
# points keep the per-call overhead small. Counted over the region's whole rectangle: a call takes whole slab planes
# (`_staged`), so more slabs where fewer rays meet them overflow the cache (bench/RESULTS.md, twelfth stop).
_SAMPLES_PER_CHUNK = 1 << 18
# ... and at most this many slabs: a region of a few detector columns (an oblique view's second main axis) would
# otherwise take its whole stack in one chunk, whose staging copy no cache holds (15 and 75 deg slider views 35-43 ->
# 29-32 ms on the real chest).
_MAX_SLABS_PER_CHUNK = 16
# Slab shears are multiples of this many filtered voxels per slice: the rays' slopes are met to within half of it.
SHEAR_STEP = 0.125
# With `row_bands`, a band of fewer detector rows (with rays) than this joins a neighbour, taking the shorter slab of
# the two: each band restages the planes of its own stack, which a few rows do not repay.
_MIN_BAND_ROWS = 16
# A region's chunks of slabs are accumulated in this many interleaved groups, one partial image each, added in group
# order: the image is the same whether one thread or several (`workers`) project the groups.
_GROUPS = 4
# The in-plane filtering of the volume (`SliceWarpProjector._planar`) takes this many slices across k at a time.
_PLANAR_SLICES = 2


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
    shear_rows: int  # slab shear along the slice rows and columns, in steps of SHEAR_STEP filtered voxels per slice
    shear_cols: int
    rounded: bool  # each slice shifted by its shear rounded to whole voxels, instead of linearly between them
    rows: slice  # the region on the detector
    cols: slice
    mask: Optional[np.ndarray]  # (h, w) bool, True where this plan's rays are; None = the whole region
    origins_vox: np.ndarray  # (3, h, w) ray origins, voxel index (i, j, k); (3, 1, 1) for a cone beam's source
    offsets_main: np.ndarray  # (h, w) main index from each ray's origin to its pixel centre, where the ray ends
    increasing: bool  # the rays run towards increasing main index
    mm_per_slice: np.ndarray  # (h, w) ray length per unit of main index, mm
    slope: np.ndarray  # (3, h, w) index change per unit of main index along each ray

    @property
    def stack_key(self) -> Tuple[int, int, int, int, int, int, bool]:
        return self.main, self.slab, self.pool_rows, self.pool_cols, self.shear_rows, self.shear_cols, self.rounded


class SliceWarpProjector:
    """Projects a batch of volumes (B, C, K, J, I) with a voxel->RAS affine at any number of views.

    float32/float64 anywhere; float16/bfloat16 on CUDA (on the CPU they are computed in float32).

    `workers` > 1 (CPU, no autograd): the interleaved groups of each region's chunks (`_GROUPS`, 4) are projected
    by up to that many Python threads, each running torch single-threaded (`single_threaded_ops`, for the call),
    instead of by torch's intra-op threads. Those meet at a barrier after every op and spin there; when another
    process holds a core, a waiting thread loses its time slice at every op and a 40 ms view takes seconds. Workers
    meet once per region, and one whose core is free takes more of the groups. The image is the same for any number
    of workers. The same spinning comes from the caller's own torch ops between calls: one op on torch's threads
    (a `.double()` of the film) leaves them spinning for milliseconds into the next call, beside the workers; keep
    such ops in `single_threaded_ops` (as `ct2x.drr.DRRRenderer` does) or in numpy (bench/RESULTS.md, thirteenth
    stop: 10.4 -> 6.6 ms per view).

    `stack_dtype=torch.float16` keeps the cached stacks in half the memory (CPU): each chunk is converted back to
    the volume's dtype as it is staged, so sampling and sums stay in float32; the stacks' rounding (2^-11 relative)
    moves a chest film by about 2e-5 relative L2.

    `merge_slabs=True` builds each straight stack whose slab length is not prime from the one of its shortest divisor
    above 1 (4, 6 and 8 from 2: runs of neighbours summed, a fraction of the cost of re-slicing the volume; that
    stack is kept as well): for a renderer that prepares several lengths. Its films differ from re-sliced ones by
    rounding only.

    `slab_lengths` limits the slab lengths a view may take (default: all up to `max_slab`); a view takes the longest
    allowed one its rays permit. With `merge_slabs`, (1, 2, 3, 4, 6, 8) leaves only lengths 1, 2 and 3 to re-slice,
    and 3 only where a view takes it.

    `batched=True` (the default on GPUs) projects the views of one detector together in line-integral mode
    (`view_batch.py`): planning on the device and one sampling call per stack and chunk of slabs for all of them,
    every ray taking every slab; the same films to float32 rounding. On a CPU, where time follows the samples taken,
    the per-view path is faster.

    `row_bands=True` lets each band of detector rows take the longest slab its own rays allow, instead of the
    slab of its region's most slanted ray: a tilted view's rows slant more towards one edge of the detector, so most
    of its rows take longer slabs (fewer samples; each ray still within `max_drift_voxels`). A view then needs more
    stacks, so it pays where they are prepared (a slider's renderer); off by default.

    `shear=False` keeps every slab straight. A slider's renderer wants that: where a shear pays changes between the
    angles a sweep's preparation samples, so a view in between could need a sheared stack that nobody prepared.

    Line integrals skip, slab by slab, the rays that can meet only zeros of the slab (outside the box of the
    volume's non-zero voxels in its slices, found when preparing): the same sums from fewer samples where a CT's
    reconstruction circle or the air around the body leaves the slabs nearest its front and back mostly zero.

    Differentiable with respect to the volume. Re-sliced copies are cached per (main axis, slab length, filter
    factors, shear) when the volume does not require gradients; with gradients they are rebuilt per call so that
    every call has its own graph. The cache changes only the time a view takes, never its image.
    """

    def __init__(self, volume: torch.Tensor, affine: np.ndarray, antialias: bool = True, max_slab: int = 8,
                 max_drift_voxels: float = 2.0, workers: int = 1, shear: bool = True,
                 stack_dtype: Optional[torch.dtype] = None, slab_lengths: Optional[Sequence[int]] = None,
                 merge_slabs: bool = False, batched: Optional[bool] = None, row_bands: bool = False):
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
        # The slab lengths a view may take (1 always): the longest one its rays allow.
        self.slab_lengths = sorted({1} | {int(n) for n in slab_lengths or range(1, self.max_slab + 1)})
        self.max_drift_voxels = float(max_drift_voxels)  # sideways ray travel allowed across one slab, filtered voxels
        self.shear = shear
        self.row_bands = row_bands
        self.merge_slabs = merge_slabs
        self.stack_dtype = stack_dtype or volume.dtype  # cached stacks; sampled in the volume's dtype
        self.spacing_mm = spacing_from_affine(self.affine)  # (3,) mm per i, j, k
        self.shape_ijk = np.array(volume.shape[2:][::-1])  # (I, J, K)
        self.center_ras = voxel_to_world(self.affine, (self.shape_ijk - 1) / 2.0)
        corners = np.stack(np.meshgrid(*[[-1.0, n] for n in self.shape_ijk], indexing="ij"), -1).reshape(-1, 3)
        self.corners_ras = voxel_to_world(self.affine, corners)  # (8, 3) the box samples can read, RAS mm
        # (slabs, B*C, rows, cols) by (main, slab, pool_rows, pool_cols, shear_rows, shear_cols, rounded, mode)
        self._stacks: Dict[Tuple[int, int, int, int, int, int, bool, str], torch.Tensor] = {}
        # by (main axis, in-plane axis): each slice's first and last non-zero voxel along that axis (`_extents`)
        self._extents_found: Optional[Dict[Tuple[int, int], Tuple[np.ndarray, np.ndarray]]] = None
        # while `_build` runs: the volume filtered in-plane (`_planar`) by (rows, cols, mode) for the stacks it builds
        self._planar_volumes: Dict[Tuple[int, int, str], torch.Tensor] = {}
        self._staging: Dict[int, torch.Tensor] = {}  # per thread: flat CPU buffer its chunk is copied into
        self.workers = max(1, int(workers))
        self.batched = volume.device.type != "cpu" if batched is None else batched
        self._pool: Optional[ThreadPoolExecutor] = None

    # --- public ---------------------------------------------------------------------------------------------
    def project(self, views: Sequence[View], mode: str = "sum") -> torch.Tensor:
        """Every volume at every view -> (B, P, C, H, W): line integrals (value x mm) or maxima along rays."""
        if mode not in MODES:
            raise CT2XInputError(f"projection mode {mode!r} is unknown; use one of {MODES}")
        if self.batched and mode == "sum" and len({(view.detector, view.beam) for view in views}) == 1:
            from .view_batch import project_view_batch  # it builds on this module

            return project_view_batch(self, views)
        with single_threaded_ops(self._worker_pool(self.volume.device) is not None):
            return torch.stack([self._project_view(view, mode) for view in views], dim=1)

    def prepare(self, views: Sequence[View], mode: str = "sum", sweep: bool = False) -> None:
        """Build (and cache) the re-sliced volumes these views need, so that later calls pay only for warps.

        `sweep=True`: also every slab length and shear between the least and the most that each main axis and
        filter needs among `views`, so that the views in between a coarsely sampled sweep (a slider's range, whose
        drift and slant change smoothly with the angle) find theirs too.
        """
        pool = self._worker_pool(self.volume.device)

        def stack_keys(view: View) -> List[Tuple]:  # the plans' arrays are dropped at once
            return [plan.stack_key for plan in self._plans(view)]

        keys = {key for view_keys in (pool.map if pool is not None else map)(stack_keys, views) for key in view_keys}
        if sweep:  # straight and sheared stacks apart: a view shears its slabs only where that pays
            for group in {(key[0], key[2], key[3], key[4:6] != (0, 0), key[6]) for key in keys}:
                members = [key for key in keys if (key[0], key[2], key[3], key[4:6] != (0, 0), key[6]) == group]
                slabs, shears_rows, shears_cols = ([key[at] for key in members] for at in (1, 4, 5))
                keys |= {(group[0], slab, group[1], group[2], shear_rows, shear_cols, group[4])
                         for slab in self.slab_lengths if min(slabs) <= slab <= max(slabs)
                         for shear_rows in range(min(shears_rows), max(shears_rows) + 1)
                         for shear_cols in range(min(shears_cols), max(shears_cols) + 1)}
        with single_threaded_ops(pool is not None):
            self._build({key + (mode,) for key in keys}, pool)
        if mode == "sum" and not self._with_graph():
            self._extents()  # for `_nonzero_boxes`, before the first view

    # --- per view -------------------------------------------------------------------------------------------
    def _plans(self, view: View) -> List[_RayPlan]:
        """Joseph's rule per ray, counted in filtered voxels: integrate across the index axis along which the ray
        advances the most filtered voxels (`_filtered_voxels_per_voxel`).

        Near-axial views use one axis for every ray; oblique views with a wide cone split the detector into regions.
        """
        origins_vox, offsets_vox, lengths_mm = self._rays_vox(view)
        pitch_mm = self._detector_pitch_at_volume(view)
        per_voxel = self._filtered_voxels_per_voxel(pitch_mm)
        dominant = _dominant_axis(offsets_vox, per_voxel)
        if dominant is None:
            best_axis = _argmax_of_three(np.abs(offsets_vox) * per_voxel[:, None, None])
            main_axes = np.flatnonzero(np.bincount(best_axis.ravel(), minlength=3))
        else:
            main_axes = [dominant]
        regions = []  # (main axis, the pixels whose rays cross it in one direction; None = all)
        for main in (int(m) for m in main_axes):
            uses = best_axis == main if len(main_axes) > 1 else None
            if uses is None and _one_sign(offsets_vox[main]):  # every ray runs one way along `main`
                regions.append((main, None))
                continue
            forward = offsets_vox[main] > 0  # (H, W) towards increasing index
            ahead = forward if uses is None else uses & forward
            behind = ~forward if uses is None else uses & ~forward
            # Both directions only when the source lies between the detector's ends along `main` (a source inside
            # the volume): a region's slabs in front of the source are counted in one direction.
            regions += [(main, ahead), (main, behind)] if ahead.any() and behind.any() else [(main, uses)]
        plans = []
        for main, uses in regions:
            rows = cols = slice(None)
            mask = None
            if uses is not None:
                rows, cols = _span(uses.any(1)), _span(uses.any(0))
                mask = uses[rows, cols]
                if mask.all():  # a rectangle of its own (a horizontal view's regions split by columns)
                    mask = None
            offsets = offsets_vox[:, rows, cols]  # (3, h, w) index steps along each ray
            slope = np.empty(offsets.shape, np.float32)  # (3, h, w), never above sqrt(3) in size
            slope[main] = 1.0
            for axis in _SLICE_LAYOUT[main][1]:
                np.divide(offsets[axis], offsets[main], out=slope[axis])
            mm_per_slice = lengths_mm[rows, cols] / np.abs(offsets[main])  # (h, w) ray length / main index travel
            increasing = bool(offsets[main].flat[0] > 0)  # one direction per region
            origins = origins_vox if origins_vox.shape[1:] == (1, 1) else origins_vox[:, rows, cols]
            row_axis, col_axis = _SLICE_LAYOUT[main][1]
            top = rows.start or 0
            for begin, end, choice in self._row_bands(main, pitch_mm, *_row_ranges(slope[row_axis], mask),
                                                      *_row_ranges(slope[col_axis], mask)):
                band = slice(begin, end)
                plans.append(_RayPlan(main, *choice, slice(top + begin, top + end), cols,
                                      None if mask is None else mask[band],
                                      origins if origins.shape[1:] == (1, 1) else origins[:, band],
                                      offsets[main, band], increasing, mm_per_slice[band], slope[:, band]))
        return plans

    def _row_bands(self, main: int, pitch_mm: float, row_low: np.ndarray, row_high: np.ndarray,
                   col_low: np.ndarray, col_high: np.ndarray) -> List[Tuple[int, int, Tuple[int, int, int, int, int]]]:
        """Bands of consecutive detector rows, (begin, end, `_stack_choice`), for rays across `main` whose slopes
        along the slice rows and columns span (low, high) per row, (h,) each; low > high in a row without such rays.

        One band of all rows, or with `row_bands` a band per run of rows whose own rays allow one slab length (runs
        of fewer than _MIN_BAND_ROWS rows with rays joined to a neighbour). A row without rays belongs to the band
        before it, or to the first band, and never changes one."""
        runs = []  # [first row with rays, rows with rays, slab length] per band
        if self.row_bands and self.antialias:
            row_axis, col_axis = _SLICE_LAYOUT[main][1]
            drift = np.maximum(np.maximum(np.abs(row_low), np.abs(row_high)) / self._pool_factor(pitch_mm, row_axis),
                               np.maximum(np.abs(col_low), np.abs(col_high)) / self._pool_factor(pitch_mm, col_axis))
            with_rays = np.flatnonzero(row_low <= row_high)
            for row, slab in zip(with_rays, self._slab_length(drift[with_rays], main)):
                if runs and runs[-1][2] == slab:
                    runs[-1][1] += 1
                else:
                    runs.append([int(row), 1, int(slab)])
            _join_small_runs(runs)
        starts = [0] + [run[0] for run in runs[1:]] + [len(row_low)]
        return [(begin, end, self._stack_choice(main, pitch_mm, (row_low[begin:end].min(), row_high[begin:end].max()),
                                                (col_low[begin:end].min(), col_high[begin:end].max())))
                for begin, end in zip(starts[:-1], starts[1:])]

    def _stack_choice(self, main: int, pitch_mm: float, row_slopes: Tuple[float, float],
                      col_slopes: Tuple[float, float]) -> Tuple[int, int, int, int, int, bool]:
        """Slab length, filter factors, shears and their rounding (`_RayPlan`'s) for rays across `main` whose slopes
        (index change per slice along the slice rows and columns, original voxels) span these (low, high) ranges."""
        if not self.antialias:
            return 1, 1, 1, 0, 0, False
        row_axis, col_axis = _SLICE_LAYOUT[main][1]
        pool_rows, pool_cols = self._pool_factor(pitch_mm, row_axis), self._pool_factor(pitch_mm, col_axis)
        largest = max(max(map(abs, row_slopes)) / pool_rows, max(map(abs, col_slopes)) / pool_cols)
        slab = int(self._slab_length(largest, main))
        if self.shear:
            # Slabs sheared along the rays' middle slope (to the nearest SHEAR_STEP), so that only the rays' spread
            # about it limits the slab length, not their common slant. A shear costs an interpolation of each
            # slice, so it is taken only where it at least doubles the slab length.
            middle_rows, drift_rows = _shear_and_drift(*row_slopes, pool_rows)
            middle_cols, drift_cols = _shear_and_drift(*col_slopes, pool_cols)
            sheared = int(self._slab_length(max(drift_rows, drift_cols), main))
            if sheared >= 2 * slab:
                return sheared, pool_rows, pool_cols, middle_rows, middle_cols, False
            # Else a shear by whole voxels per slice, which moves slices without interpolating them (by half
            # voxels in slabs of even length), wherever it lengthens the slab at all: a wide cone's obliques
            # (bench/RESULTS.md, twelfth stop).
            shear_rows, drift_rows = _whole_voxel_shear_and_drift(*row_slopes, pool_rows)
            shear_cols, drift_cols = _whole_voxel_shear_and_drift(*col_slopes, pool_cols)
            sheared = int(self._slab_length(max(drift_rows, drift_cols), main))
            if sheared > slab:
                return sheared, pool_rows, pool_cols, shear_rows, shear_cols, False
            # Else the middle slope's shear with each slice's shift rounded to whole voxels (no interpolation
            # either), in the longest slab whose sampling lies no further from the rays than the straight slab's:
            # the worst ray's mean square sideways offset over the slices, both axes (bench/RESULTS.md, thirteenth
            # stop).
            if middle_rows or middle_cols:
                axes = ((row_slopes, pool_rows, middle_rows), (col_slopes, pool_cols, middle_cols))
                straight = sum(_mean_square_offset(*slopes, pool, 0.0, slab) for slopes, pool, _ in axes)
                longer = [length for length in self.slab_lengths
                          if slab < length <= min(self.max_slab, int(self.shape_ijk[main]))]
                for length in sorted(longer, reverse=True):
                    if sum(_mean_square_offset(*slopes, pool, shear * SHEAR_STEP * pool, length)
                           for slopes, pool, shear in axes) <= straight:
                        return length, pool_rows, pool_cols, middle_rows, middle_cols, True
        return slab, pool_rows, pool_cols, 0, 0, False

    def _rays_vox(self, view: View) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The view's rays in voxel index space, index axis (i, j, k) first so that numpy runs along whole rows:
        origins ((3, 1, 1) for a cone beam's source, else (3, H, W)), origin -> pixel offsets (3, H, W) and the rays'
        lengths to their pixels (H, W) mm.

        Pixel centres are affine in (row, column), so they are built from the detector's centre and axes mapped to
        voxel index space once, rather than mapping every pixel from RAS. The per-pixel planes are float32, like
        the sampling grid they become (a view's set-up, which the workers wait for, moves half the bytes).
        """
        rows_mm, cols_mm = (offsets.astype(np.float32) for offsets in view.detector.pixel_offsets_mm())  # (H,), (W,)
        centre_vox, row_vox, col_vox = self._detector_vox(view)

        def pixels_from(origin: np.ndarray) -> np.ndarray:  # (3, H, W) pixel centres - origin, index units
            origin, rows, cols = (vector.astype(np.float32)[:, None, None] for vector in (origin, row_vox, col_vox))
            return origin + rows * rows_mm[:, None] + cols * cols_mm

        if view.beam == "parallel":
            pixels_vox = pixels_from(centre_vox)
            beam_vox = (view.source_to_detector_mm * (self.voxel_per_mm @ view.principal_direction)).astype(np.float32)
            offsets_vox = np.broadcast_to(beam_vox[:, None, None], pixels_vox.shape)  # (3,) index steps per ray
            lengths_mm = np.full(pixels_vox.shape[1:], view.source_to_detector_mm, dtype=np.float32)
            return pixels_vox - offsets_vox, offsets_vox, lengths_mm
        origins_vox = self._voxel_of(view.source_ras)  # (3,)
        lengths_mm = np.sqrt(np.float32(view.source_to_detector_mm) ** 2 + rows_mm[:, None] ** 2 + cols_mm ** 2)
        return origins_vox[:, None, None], pixels_from(centre_vox - origins_vox), lengths_mm

    def _detector_vox(self, view: View) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The detector's centre (3,) in voxel index (i, j, k) and its row and column directions (3,) each, in index
        steps per mm down the rows and along the columns."""
        return (self._voxel_of(view.detector_center_ras), self.voxel_per_mm @ view.row_direction,
                self.voxel_per_mm @ view.column_direction)

    def _voxel_of(self, point_ras: np.ndarray) -> np.ndarray:
        """(3,) RAS mm -> (3,) voxel index (i, j, k), by the projector's inverted affine."""
        return self.voxel_per_mm @ (point_ras - self.affine[:3, 3])

    def _detector_pitch_at_volume(self, view: View) -> float:
        """Detector pixel size (mm) projected back to the volume centre."""
        pitch = min(view.detector.pixel_spacing_mm)
        if view.beam == "parallel":
            return pitch
        depth = float(np.dot(self.center_ras - view.source_ras, view.principal_direction))
        return pitch * max(depth, 1e-6) / view.source_to_detector_mm

    def _slab_length(self, drift, main: int) -> np.ndarray:
        """Slices per slab for rays that drift sideways by `drift` (a number or an array) filtered voxels per slice."""
        longest = np.minimum(min(self.max_slab, int(self.shape_ijk[main])),
                             np.floor(self.max_drift_voxels / np.maximum(drift, 1e-6)))
        lengths = np.array(self.slab_lengths)  # ascending, 1 first
        return lengths[np.searchsorted(lengths, np.maximum(longest, 1), side="right") - 1]

    def _filtered_voxels_per_voxel(self, pitch_mm: float) -> np.ndarray:
        """(3,) per index axis i, j, k: 1 / the in-plane filter factor that axis takes in slices across another.

        A ray's slab is limited by how many filtered voxels it drifts along the other two axes per slice, so the
        samples it takes per mm follow the larger of its advances along those two in filtered voxels (until slabs
        reach their longest): fewest across the axis along which it advances the most filtered voxels. Where the
        filter factors differ (a CT of 1 mm pixels and 2 mm slices at a detector pitch of 2.5 mm at the volume: i
        and j filtered by 2, k by 1), steep rays are counted across the slices (k) before they are most aligned
        with k in voxels: fewer samples in fewer bands of rows (bench/RESULTS.md, slider)."""
        if not self.antialias:
            return np.ones(3)
        return 1.0 / np.array([self._pool_factor(pitch_mm, axis) for axis in range(3)])

    def _pool_factor(self, pitch_mm: float, axis: int) -> int:
        factor = int(math.floor(pitch_mm / self.spacing_mm[axis] + 1e-6))
        return max(1, min(factor, int(self.shape_ijk[axis]) // 2))

    def _project_view(self, view: View, mode: str) -> torch.Tensor:
        """(B, C, H, W) projection of every volume at one view."""
        batch, channels = self.volume.shape[:2]
        height, width = view.detector.shape
        plans = self._plans(view)
        pool = self._worker_pool(self.volume.device)
        if pool is not None:  # the re-slicings the view still needs, built side by side
            self._build({plan.stack_key + (mode,) for plan in plans}, pool)
        # Every region is set up and handed to the workers before the first is collected: the next region's set-up
        # (numpy, this thread) overlaps the workers' sampling, and no worker waits at the end of a region.
        finishers = [self._start_region(view, plan, mode) for plan in plans]
        result = None
        for plan, finish in zip(plans, finishers):
            part = finish()  # (B*C, h, w)
            if len(plans) == 1:  # it covers the detector
                result = part
                continue
            if result is None:
                result = part.new_zeros(batch * channels, height, width)
            if plan.mask is None:  # a band of rows of the whole detector
                result[:, plan.rows, plan.cols] = part
                continue
            mask = torch.from_numpy(plan.mask).to(part.device)
            result[:, plan.rows, plan.cols] = torch.where(mask, part, result[:, plan.rows, plan.cols])
        return result.view(batch, channels, height, width)

    def _start_region(self, view: View, plan: _RayPlan, mode: str) -> Callable[[], torch.Tensor]:
        """Starts projecting the rays of one plan (on the workers, if any) and returns what waits for and returns
        their (B*C, h, w) projection."""
        main, slab, pool_rows, pool_cols, shear_rows, shear_cols, _ = plan.stack_key
        origins_vox, slope = plan.origins_vox, plan.slope
        stack = self._stack(*plan.stack_key, mode)
        row_axis, col_axis = _SLICE_LAYOUT[main][1]
        n_slabs, _, n_rows, n_cols = stack.shape

        device, dtype = stack.device, self.volume.dtype
        planes = _grid_planes(origins_vox, slope, main, slab, ((col_axis, pool_cols, shear_cols, n_cols),
                                                               (row_axis, pool_rows, shear_rows, n_rows)), dtype)
        start, step = (plane.to(device=device, dtype=dtype) for plane in planes)  # (h, w, 2) x, y
        starts, steps = (np.moveaxis(plane.numpy(), -1, 0) for plane in planes)  # (2, h, w) x, y

        first, last = self._slabs_in_front_of_source(view, plan, n_slabs)
        past_detector = self._slabs_past_detector(view, plan)  # (h, w), or None
        if past_detector is not None:
            threshold = torch.from_numpy(past_detector).to(device=device, dtype=dtype)[..., None]  # (h, w, 1)
            cut_rows, cut_cols = _nearest_cuts(past_detector, plan.increasing)  # (h,), (w,)
        # Only the detector rectangle whose rays meet a chunk's slabs is sampled for that chunk: at slider
        # geometry about half the rays of a slab miss it.
        # a line integral skips the rays of a slab that meet only its zeros; a maximum reads them
        nonzero = self._nonzero_boxes(plan.stack_key) if mode == "sum" and not self._with_graph() else None
        windows = self._slab_windows(view, plan, first, last, n_rows, n_cols, nonzero)
        if windows is None:  # from every pixel's bounds instead
            windows = _windows_from_pixels(first, last, *_slabs_hitting_stack(starts, steps, n_rows, n_cols, plan.mask))
        height, width = start.shape[:2]
        chunk = max(1, min(_SAMPLES_PER_CHUNK // (height * width), _MAX_SLABS_PER_CHUNK))
        chunks = _chunks_of_slabs(first, chunk, *windows)  # [(begin, end, rows, cols)]
        empty = 0.0 if mode == "sum" else -math.inf

        def project_chunks(group: int) -> torch.Tensor:
            """(B*C, h, w) sum or maximum over the chunks of one group: every _GROUPS-th chunk from the group's."""
            partial = torch.full((stack.shape[1], height, width), empty, device=device, dtype=dtype)
            for begin, end, rows, cols in chunks[group::_GROUPS]:
                if rows is None:  # no ray meets these slabs
                    continue
                index = torch.arange(begin, end, device=device, dtype=dtype).view(-1, 1, 1, 1)
                grid = torch.addcmul(start[rows, cols], index, step[rows, cols])  # (n, h', w', 2)
                if past_detector is not None and _chunk_reaches_cut(cut_rows[rows], cut_cols[cols], begin, end,
                                                                    plan.increasing):
                    # samples past a ray's pixel read zero (outside [-1, 1])
                    past = index >= threshold[rows, cols] if plan.increasing else index <= threshold[rows, cols]
                    grid = grid.masked_fill(past.expand_as(grid), 2.0)
                samples = F.grid_sample(self._staged(stack, begin, end), grid, mode="bilinear",
                                        padding_mode="zeros", align_corners=True)  # (n, B*C, h', w')
                target = partial[:, rows, cols]
                if mode == "sum":
                    target += samples.sum(0)
                else:
                    target.copy_(torch.maximum(target, samples.amax(0)))
            return partial

        length_per_slice = torch.from_numpy(plan.mm_per_slice).to(device, dtype) if mode == "sum" else None
        pool = self._worker_pool(device)
        # Nothing more on this thread once the workers start: on two cores it would hold the second one back.
        groups = [pool.submit(project_chunks, group) for group in range(_GROUPS)] if pool is not None else None

        def finish() -> torch.Tensor:
            # In group order, the same sums whichever thread made them; each partial image as soon as it is done,
            # while the workers sample the later groups.
            result = None
            for group in range(_GROUPS):
                partial = groups[group].result() if groups is not None else project_chunks(group)
                if result is None:
                    result = partial
                elif mode == "sum":
                    result += partial
                else:
                    torch.maximum(result, partial, out=result)
            if mode == "max":  # a ray with a sample outside the stack read a zero there; one without samples is zero
                first_met, last_met = _slab_indices(*_slabs_hitting_stack(starts, steps, n_rows, n_cols, plan.mask))
                read_zero = torch.from_numpy((first_met > first) | (last_met < last - 1) | (last <= first)).to(device)
                return torch.where(read_zero, result.clamp_min(0.0), result)
            return result.mul_(length_per_slice)

        return finish

    def _slab_windows(self, view: View, plan: _RayPlan, first: int, last: int, n_rows: int, n_cols: int,
                      nonzero: Optional[np.ndarray] = None) -> Optional[Tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                               np.ndarray]]:
        """For each slab of [first, last), the first and last row and column of the plan's rectangle whose rays can
        read its stack (n_rows x n_cols in-plane): four (slabs,) int64 arrays, low > high where none; None where the
        geometry cannot bound them (a slab's plane reaching behind a cone beam's source). With `nonzero` (the
        stack's `_nonzero_boxes`), only the rays that can read a non-zero value of the slab.

        The rays that read slab n cross its plane inside the stack's rectangle, or its box of non-zero values (one
        filtered voxel beyond it each way, as `_slabs_hitting_stack`), and the pixels of those rays lie in the
        rectangle's central projection onto the detector: a quadrilateral, whose four corners bound them. A few
        numbers per slab, instead of every pixel's bounds.
        """
        if last <= first:
            return None
        main, slab, pool_rows, pool_cols, shear_rows, shear_cols, _ = plan.stack_key
        row_axis, col_axis = _SLICE_LAYOUT[main][1]
        slabs = np.arange(first, last)
        boxes, empty = np.array([[0, n_rows - 1, 0, n_cols - 1]]), False  # (1 or slabs, 4) rows, columns
        if nonzero is not None:
            boxes = nonzero[first:last]
            empty = boxes[:, 0] > boxes[:, 1]
        corners = np.empty((len(slabs), 4, 3))  # (slabs, 4, 3) voxel index (i, j, k) of each rectangle's corners
        corners[..., main] = slabs[:, None] * slab + (slab - 1) / 2.0  # the plane of the slab's centre
        for axis, pool, shear, box, picks in ((row_axis, pool_rows, shear_rows, boxes[:, :2], [0, 0, 1, 1]),
                                              (col_axis, pool_cols, shear_cols, boxes[:, 2:], [0, 1, 0, 1])):
            # a bilinear sample reads filtered index u of the padded stack within one cell: between box[0] - 1 and
            # box[1] + 1 (the whole stack: (-1, size)), volume index a = p*u - pad + (p-1)/2
            offset = _shear_pad(slab, shear, pool) - (pool - 1) / 2.0
            bounds = np.stack([pool * (box[:, 0] - 1) - offset - 0.01, pool * (box[:, 1] + 1) - offset + 0.01], 1)
            corners[..., axis] = bounds[:, picks]
        rows_mm, cols_mm = view.detector.pixel_offsets_mm()
        centre, row_vox, col_vox = self._detector_vox(view)
        normal = _cross(row_vox, col_vox)  # of the detector plane, in index space
        # Each corner P along its ray to the detector plane: from the source s (cone) or along the beam d.
        if view.beam == "cone":
            source = self._voxel_of(view.source_ras)
            depth = (corners - source) @ normal  # (slabs, 4), > 0 in front of the source
            if np.any(depth * ((centre - source) @ normal) <= 0):
                return None
            hits = source + (corners - source) * (((centre - source) @ normal) / depth)[..., None]
        else:
            beam = self.voxel_per_mm @ view.principal_direction
            hits = corners + beam * (((centre - corners) @ normal) / (beam @ normal))[..., None]
        # in-plane coordinates, mm down the rows and along the columns, by the plane axes' dual basis
        gram = np.array([[row_vox @ row_vox, row_vox @ col_vox], [row_vox @ col_vox, col_vox @ col_vox]])
        dual = _inverse_2x2(gram) @ np.stack([row_vox, col_vox])  # (2, 3)
        at_row_mm, at_col_mm = np.moveaxis((hits - centre) @ dual.T, -1, 0)  # (slabs, 4) each
        indices = []  # (slabs, 4) continuous pixel index of the corners within the plan's rectangle, rows, columns
        for at_mm, pixel_mm, span in ((at_row_mm, rows_mm, plan.rows), (at_col_mm, cols_mm, plan.cols)):
            pitch = pixel_mm[1] - pixel_mm[0] if len(pixel_mm) > 1 else 1.0
            indices.append((at_mm - pixel_mm[0]) / pitch - (span.start or 0))
        sizes = plan.mm_per_slice.shape  # (h, w) of the plan's rectangle
        windows = []
        for along, across, across_size, size in ((0, 1, sizes[1], sizes[0]), (1, 0, sizes[0], sizes[1])):
            # the quadrilateral's extent along rows (columns) over the detector's columns (rows) only
            low, high = _extent_within_strip(indices[along], indices[across], -0.5, across_size - 0.5)
            missed = np.isnan(low) | empty  # empty windows: low = size, high = -1
            low = np.minimum(np.maximum(np.floor(low - 1e-6), 0), size)
            high = np.minimum(np.maximum(np.ceil(high + 1e-6), -1), size - 1)
            windows += [np.where(missed, size, low).astype(np.int64), np.where(missed, -1, high).astype(np.int64)]
        return tuple(windows)

    def _nonzero_boxes(self, key: Tuple) -> np.ndarray:
        """(slabs, 4) int64 for the stack of `key` (`_stack`'s first six): the first and last filtered row and column
        of each slab that may hold a non-zero value, low > high for a slab of zeros; from the volume's non-zero
        voxels in each slice (`_extents`), so that no stack is searched.

        A CT's reconstruction circle leaves its corners zero (HU clipped at air), so the slabs nearest the body's
        front and back are mostly zero, and an oblique view's rays meet them in a small part of the detector.
        """
        main, slab, pool_rows, pool_cols, shear_rows, shear_cols = key[:6]
        starts = np.arange(0, int(self.shape_ijk[main]), slab)  # each slab's first slice
        boxes = []
        for axis, pool, shear in zip(_SLICE_LAYOUT[main][1], (pool_rows, pool_cols), (shear_rows, shear_cols)):
            low, high = self._extents()[main, axis]
            low, high = np.minimum.reduceat(low, starts), np.maximum.reduceat(high, starts)  # (slabs,) over slices
            # voxel a of a slice lands at a + pad - shift in the padded plane, |shift| <= pad, filtered by `pool`
            pad = _shear_pad(slab, shear, pool)
            boxes += [np.where(low <= high, low // pool, 1), np.where(low <= high, (high + 2 * pad) // pool, 0)]
        return np.stack(boxes, 1)

    def _extents(self) -> Dict[Tuple[int, int], Tuple[np.ndarray, np.ndarray]]:
        """By (main axis, in-plane axis): the first and last voxel along that axis that is non-zero in any volume,
        (slices across main,) int64 each, low > high in a slice of zeros; found once."""
        if self._extents_found is None:
            self._extents_found = {}
            for third, lines in _nonzero_seen_along(self.volume.detach()).items():
                later, earlier = sorted({0, 1, 2} - {third}, reverse=True)  # lines' dims run (k, j, i)
                self._extents_found[later, earlier] = _first_and_last_true(lines)
                self._extents_found[earlier, later] = _first_and_last_true(lines.T)
        return self._extents_found

    def _staged(self, stack: torch.Tensor, begin: int, end: int) -> torch.Tensor:
        """stack[begin:end] in the volume's dtype; on the CPU copied into this thread's reused buffer first (not
        under autograd).

        grid_sample's gathers stall on memory that is not in cache, while a plain copy streams it in: sampling the
        copy takes half the time at slider geometry on the real chest CT (bench/RESULTS.md).
        """
        chunk = stack[begin:end]
        if chunk.device.type != "cpu" or chunk.requires_grad:
            return chunk.to(self.volume.dtype)
        thread = threading.get_ident()
        buffer = self._staging.get(thread)
        if buffer is None or buffer.numel() < chunk.numel():
            buffer = self._staging[thread] = torch.empty(chunk.numel(), dtype=self.volume.dtype)
        return buffer[:chunk.numel()].view_as(chunk).copy_(chunk)

    def _with_graph(self) -> bool:
        """Whether this call records autograd's graph through the volume: then stacks are built per call, never
        cached, and no worker threads project."""
        return torch.is_grad_enabled() and self.volume.requires_grad

    def _worker_pool(self, device: torch.device) -> Optional[ThreadPoolExecutor]:
        """The threads that project a region's chunk groups, or build stacks, side by side (CPU, `workers` > 1, no
        autograd); None otherwise."""
        if device.type != "cpu" or self.workers <= 1 or self._with_graph():
            return None
        if self._pool is None:
            self._pool = ThreadPoolExecutor(min(self.workers, _GROUPS), thread_name_prefix="ct2x-projector")
        return self._pool

    def _slabs_in_front_of_source(self, view: View, plan: _RayPlan, n_slabs: int) -> Tuple[int, int]:
        """Range of the plan's slab indices that lie on the detector side of a cone-beam source (all slabs
        otherwise)."""
        if view.beam != "cone":
            return 0, n_slabs
        source = float(plan.origins_vox[plan.main].flat[0])
        centres = plan.slab * np.arange(n_slabs) + (plan.slab - 1) / 2.0
        ahead = np.nonzero((centres - source) * (1 if plan.increasing else -1) > 0)[0]
        if ahead.size == 0:
            return 0, 0
        return int(ahead[0]), int(ahead[-1]) + 1

    def _reaches_past_detector(self, view: View) -> bool:
        """Whether part of the volume lies past the detector plane, where a ray's samples stop at its pixel."""
        return bool(np.max((self.corners_ras - view.detector_center_ras) @ view.principal_direction) > 0)

    def _slabs_past_detector(self, view: View, plan: _RayPlan) -> Optional[np.ndarray]:
        """Per pixel (h, w), the slab index from which on (in the rays' direction, `plan.increasing`) slab centres
        lie past the detector; None when the whole volume is in front of the detector."""
        if not self._reaches_past_detector(view):
            return None
        pixels_main = plan.origins_vox[plan.main] + plan.offsets_main  # (h, w) main index of each ray's pixel
        last_inside = (pixels_main - (plan.slab - 1) / 2.0) / plan.slab  # (h, w) slab coordinate of each pixel
        return np.floor(last_inside) + 1 if plan.increasing else np.ceil(last_inside) - 1

    # --- re-slicing -----------------------------------------------------------------------------------------
    def _build(self, keys: Set[Tuple], pool: Optional[ThreadPoolExecutor]) -> None:
        """Re-slice and cache the stacks of these keys (`_stack`'s arguments) that are not cached yet, and the stacks
        they are merged from; with a pool, the workers share them out, each a stack and then those merged from it."""
        if self._with_graph():
            return  # nothing is cached: each call builds its own
        wanted, bases = set(), set(keys)
        while bases:
            wanted |= bases
            bases = {self._merged_from(key) for key in bases} - {None} - wanted
        missing = wanted - set(self._stacks)
        source = {key: self._merged_from(key) or (self._twin_of(key) if self._twin_of(key) in wanted else None)
                  for key in missing}

        def build_from(key: Tuple) -> None:
            self._stack(*key)
            for other in sorted(other for other in missing if source[other] == key):
                build_from(other)

        def followers(key: Tuple) -> int:
            return sum(1 + followers(other) for other in missing if source[other] == key)

        # The longest work first, so that the workers finish together: more stacks built from it, shorter slabs.
        starts = sorted((key for key in missing if source[key] not in missing),
                        key=lambda key: (-followers(key), key[1], key))
        # Stacks re-sliced from the volume that filter j and i alike start from one in-plane filtering, made first.
        windows = [self._planar_window(key) for key in starts if source[key] is None and key[4:6] == (0, 0)]
        for rows, cols, mode in {window for window in windows if windows.count(window) > 1 and window[:2] != (1, 1)}:
            self._planar_volumes[rows, cols, mode] = self._planar(rows, cols, mode, pool)
        try:
            list((pool.map if pool is not None else map)(build_from, starts))
        finally:
            self._planar_volumes.clear()

    def _stack(self, main: int, slab: int, pool_rows: int, pool_cols: int, shear_rows: int, shear_cols: int,
               rounded: bool, mode: str) -> torch.Tensor:
        """The volume re-sliced across `main` with these filter factors and shears: (slabs, B*C, rows, cols),
        cached in `stack_dtype`.

        With `merge_slabs`, straight slabs of a length that is not prime are merged from the slabs of its shortest
        divisor (`_merged_from`), always, so that a stack's numbers never depend on what was built before. A stack
        across j whose twin across i is cached (`_twin_of`) is that stack transposed: the same numbers as
        re-slicing, for the cost of a copy.
        """
        key = (main, slab, pool_rows, pool_cols, shear_rows, shear_cols, rounded, mode)
        if key in self._stacks:
            return self._stacks[key]
        cached = not self._with_graph()
        base, twin = self._merged_from(key), self._twin_of(key)
        if base is not None:
            stack = _merge_runs(self._stack(*base), key[1] // base[1], mode)
        elif cached and twin in self._stacks:
            stack = _twin_transposed(self._stacks[twin])
        else:
            stack = self._reslice(*key, dtype=self.stack_dtype if cached else None)
        if cached:
            stack = self._stacks[key] = stack.to(self.stack_dtype)
        return stack

    def _planar(self, rows: int, cols: int, mode: str, pool: Optional[ThreadPoolExecutor] = None) -> torch.Tensor:
        """(B*C, K, J', I'): the volume with runs of `rows` voxels along j and `cols` along i summed (or maximised),
        as `_build` prepared it for the stacks it builds, or made here: on the CPU a few slices at a time (shared out
        to the workers of `pool`), so that both passes run in cache."""
        prepared = self._planar_volumes.get((rows, cols, mode))
        if prepared is not None:
            return prepared
        volume = self.volume.reshape(-1, *self.volume.shape[2:])  # (B*C, K, J, I)
        if rows == cols == 1 or volume.device.type != "cpu" or self._with_graph():
            return _runs_in_plane(volume, rows, cols, mode)
        planar = volume.new_empty(volume.shape[:2] + (-(-volume.shape[2] // rows), -(-volume.shape[3] // cols)))

        def filter_slices(first: int) -> None:
            part = volume[:, first:first + _PLANAR_SLICES]
            planar[:, first:first + _PLANAR_SLICES] = _runs_in_plane(part, rows, cols, mode)

        list((pool.map if pool is not None else map)(filter_slices, range(0, volume.shape[1], _PLANAR_SLICES)))
        return planar

    def _planar_window(self, key: Tuple) -> Tuple[int, int, str]:
        """(runs along j, runs along i, mode) of the in-plane filtering that a straight stack re-sliced from the
        volume starts from (`_reslice_straight`)."""
        main, slab, pool_rows, pool_cols = key[:4]
        return {0: (pool_cols, slab), 1: (slab, pool_cols), 2: (pool_rows, pool_cols)}[main] + (key[-1],)

    def _merged_from(self, key: Tuple) -> Optional[Tuple]:
        """The key of the stack that `_stack` merges this one from (`merge_slabs`): for straight slabs of a length
        that is not prime, the slabs of its shortest divisor above 1 (4, 6 and 8 from 2; 9 from 3); None when it is
        re-sliced from the volume."""
        main, slab, pool_rows, pool_cols, shear_rows, shear_cols, _, mode = key
        if not self.merge_slabs or shear_rows or shear_cols:
            return None
        divisor = next((length for length in range(2, slab) if slab % length == 0), None)
        return None if divisor is None else (main, divisor, pool_rows, pool_cols, 0, 0, False, mode)

    def _twin_of(self, key: Tuple) -> Optional[Tuple]:
        """For a straight stack across j re-sliced from the volume whose slab is as long as its filter along i, the
        stack across i with the same key: it pools the same windows of voxels and scales them alike, so it holds
        the same numbers, transposed; None otherwise."""
        main, slab, pool_rows, pool_cols, shear_rows, shear_cols, _, mode = key
        twin = (0,) + tuple(key[1:])
        if main != 1 or slab != pool_cols or shear_rows or shear_cols or self._merged_from(key) is not None:
            return None
        return twin

    def _reslice(self, main: int, slab: int, pool_rows: int, pool_cols: int, shear_rows: int = 0,
                 shear_cols: int = 0, rounded: bool = False, mode: str = "sum",
                 dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """(B, C, K, J, I) -> (ceil(N/slab), B*C, rows, cols): sheared slabs across `main`, box-filtered in-plane.

        Slice t of a slab is shifted in-plane by its offset from the slab's centre along the shear (linear between
        the two nearest whole voxels, or `rounded` to the nearest) and the slab is the sum (or maximum) of its
        shifted slices, so that it follows a slanted ray. The plane is padded by the largest shift on each side, and
        with zeros to whole filter windows; missing slices of the last slab and everything outside the volume count
        as zeros. `dtype`: of a straight stack, converted in its last copy (default: the volume's).
        """
        if shear_rows == shear_cols == 0:
            return self._reslice_straight(main, slab, pool_rows, pool_cols, mode, dtype)
        volume = self.volume.reshape(-1, *self.volume.shape[2:])  # (B*C, K, J, I)
        main_dim = _MAIN_DIM[main] - 1  # dims of (B*C, K, J, I)
        row_dim, col_dim = (dim - 1 for dim in _SLICE_LAYOUT[main][0])
        length, rows, cols = volume.shape[main_dim], volume.shape[row_dim], volume.shape[col_dim]
        n_slabs = -(-length // slab)
        pad_rows, pad_cols = _shear_pad(slab, shear_rows, pool_rows), _shear_pad(slab, shear_cols, pool_cols)
        shape = (n_slabs, volume.shape[0], -(-(rows + 2 * pad_rows) // pool_rows) * pool_rows,
                 -(-(cols + 2 * pad_cols) // pool_cols) * pool_cols)
        slabs = volume.new_zeros(shape) if mode == "sum" else volume.new_full(shape, -math.inf)
        shifted = None if mode == "sum" else volume.new_empty((shape[0],) + shape[2:])  # a slice per slab, in zeros
        # Per slice t of a slab: (weight, row, column) at which its voxel (0, 0) lands, as it reads x + shift at x.
        shifts = _rounded_shifts if rounded else _linear_shifts
        corners = [[(weight_r * weight_c, pad_rows - shift_r, pad_cols - shift_c)
                    for weight_r, shift_r in shifts(t - (slab - 1) / 2.0, shear_rows * SHEAR_STEP * pool_rows)
                    for weight_c, shift_c in shifts(t - (slab - 1) / 2.0, shear_cols * SHEAR_STEP * pool_cols)]
                   for t in range(slab)]
        for channel in range(volume.shape[0]):
            slices = _slices_first(volume[channel], main_dim - 1)  # (N, rows, cols)
            channel_slabs = slabs[:, channel]
            for t in range(slab):
                part = slices[t::slab]  # (n, rows, cols): slice t of each slab
                target = channel_slabs if shifted is None else shifted.zero_()
                for weight, row, col in corners[t]:
                    target[:len(part), row:row + rows, col:col + cols].add_(part, alpha=weight)
                if shifted is not None:  # a slab without slice t (the last) takes its zeros
                    torch.maximum(channel_slabs, target, out=channel_slabs)
        slabs = _runs_in_plane(slabs, pool_rows, pool_cols, mode)  # whole windows
        if mode == "sum" and pool_rows * pool_cols > 1:  # in-plane means
            slabs = slabs / (pool_rows * pool_cols)
        return slabs

    def _reslice_straight(self, main: int, slab: int, pool_rows: int, pool_cols: int, mode: str,
                          dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """`_reslice` without a shear: slabs and box filter are runs of neighbouring voxels summed (or maximised) in
        the volume's own layout, in-plane first (`_planar`, which stacks that filter j and i alike share), then along
        k; a short last run counts the missing voxels as zeros. Only the smaller result is transposed, the expensive
        step when slices run along i.
        """
        main_dim = _MAIN_DIM[main] - 1  # dims of (B*C, K, J, I)
        row_dim, col_dim = (dim - 1 for dim in _SLICE_LAYOUT[main][0])
        window = [1, 1, 1, 1]  # along B*C, K, J, I
        window[main_dim], window[row_dim], window[col_dim] = slab, pool_rows, pool_cols
        volume = _runs_along(self._planar(window[2], window[3], mode), 1, window[1], mode)  # (B*C, K', J', I')
        if mode == "sum" and pool_rows * pool_cols > 1:  # runs' sums -> slab sums of in-plane means
            volume = volume / (pool_rows * pool_cols)
        dtype = dtype or volume.dtype  # the last copy converts
        if main_dim == 3:  # slices across i: (B*C, K', J', I') -> (I', B*C, K', J')
            return _last_axis_first(volume, dtype)
        return _contiguous_copy(volume.permute(main_dim, 0, row_dim, col_dim), dtype)


@contextmanager
def single_threaded_ops(enabled: bool = True) -> Iterator[None]:
    """Within the block, torch runs each CPU op on one thread (`torch.set_num_threads(1)`); restored after."""
    previous = torch.get_num_threads()
    if enabled:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if enabled:
            torch.set_num_threads(previous)


def _chunks_of_slabs(first: int, chunk: int, row_low: np.ndarray, row_high: np.ndarray, col_low: np.ndarray,
                     col_high: np.ndarray) -> List[Tuple[int, int, Optional[slice], Optional[slice]]]:
    """Slabs first, first + 1, ... in runs of `chunk`, one `grid_sample` call each: (begin, end, rows, cols), the
    detector rectangle whose rays meet slabs begin..end-1, from each slab's window (`_slab_windows`); rows and cols
    None where no ray meets them."""
    met = (row_low <= row_high) & (col_low <= col_high)  # (slabs,)
    if not met.size:
        return []
    starts = np.arange(0, met.size, chunk)
    unmet_low = np.iinfo(np.int64).max
    row_begins, col_begins = (np.minimum.reduceat(np.where(met, low, unmet_low), starts).tolist()
                              for low in (row_low, col_low))
    row_ends, col_ends = (np.maximum.reduceat(np.where(met, high, -1), starts).tolist()
                          for high in (row_high, col_high))
    any_met = np.logical_or.reduceat(met, starts).tolist()
    chunks = []
    for at, met_here, row_begin, row_end, col_begin, col_end in zip(starts.tolist(), any_met, row_begins, row_ends,
                                                                    col_begins, col_ends):
        rows, cols = (slice(row_begin, row_end + 1), slice(col_begin, col_end + 1)) if met_here else (None, None)
        chunks.append((first + at, first + min(at + chunk, met.size), rows, cols))
    return chunks


def _nonzero_seen_along(volume: torch.Tensor) -> Dict[int, np.ndarray]:
    """Where any of the volumes (B, C, K, J, I) is non-zero, seen along each index axis: by that axis, 0 = i: (K, J),
    1 = j: (K, I), 2 = k: (J, I) bool. Four slices at a time: in cache, and no mask as large as the volume."""
    volumes = volume.reshape(-1, *volume.shape[2:])  # (B*C, K, J, I)
    n_k, n_j, n_i = volumes.shape[1:]
    seen = {0: np.zeros((n_k, n_j), bool), 1: np.zeros((n_k, n_i), bool), 2: np.zeros((n_j, n_i), bool)}
    for first in range(0, n_k, 4):
        occupied = None  # (k, J, I)
        for block in volumes[:, first:first + 4]:
            if block.device.type == "cpu":  # numpy compares 4x faster than torch
                non_zero = block.numpy() != 0
            else:
                non_zero = (block != 0).cpu().numpy()
            occupied = non_zero if occupied is None else np.logical_or(occupied, non_zero, out=occupied)
        seen[0][first:first + len(occupied)] = occupied.any(2)
        seen[1][first:first + len(occupied)] = occupied.any(1)
        seen[2] |= occupied.any(0)
    return seen


def _windows_from_pixels(first: int, last: int, enter: np.ndarray,
                         leave: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`_slab_windows` from every pixel's bounds (`_slabs_hitting_stack`'s (h, w) enter and leave): a row (column)
    takes part in slab n where n lies between the first and last slab that any pixel of it meets."""
    numbers = np.arange(first, last)[:, None]  # (slabs, 1)
    windows = []
    for axis in (1, 0):  # rows: reduced over the columns; columns: over the rows
        row_enter, row_leave = _slab_indices(enter.min(axis), leave.max(axis))
        meets = (row_enter <= numbers) & (row_leave >= numbers)  # (slabs, n)
        windows += _first_and_last_true(meets)
    return tuple(windows)


def _first_and_last_true(flags: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Per row of `flags` (m, n) bool, the index of its first and of its last True, (m,) int64 each; n and -1 in a
    row without one."""
    found = flags.any(1)
    return (np.where(found, flags.argmax(1), flags.shape[1]),
            np.where(found, flags.shape[1] - 1 - flags[:, ::-1].argmax(1), -1))


def _slabs_hitting_stack(starts: Sequence[np.ndarray], steps: Sequence[np.ndarray], n_rows: int, n_cols: int,
                         mask: Optional[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
    """Per pixel, the slab coordinates (h, w) between which its bilinear sample can be non-zero; `_slab_indices` turns
    them, or their minima and maxima over rows or columns, into the first and last slab index.

    Grid coordinates are start + n * step, (x = column, y = row) planes of (h, w) each, align_corners; a sample
    reads the stack only while its index lies in (-1, size) along both axes, and reads zero otherwise. Pixels that
    never do, or that `mask` leaves out, get enter > leave.
    """
    enter = leave = None
    for start, step, size in ((starts[0], steps[0], n_cols), (starts[1], steps[1], n_rows)):
        reach = 2.0 / max(size - 1, 1) + 1e-4  # one cell, plus slack for the float32 grid: a superset is exact
        step = np.where(step == 0, 1e-30, step)  # a constant coordinate: bounds far away
        at_low, at_high = (-1.0 - reach - start) / step, (1.0 + reach - start) / step  # slab index at the bounds
        first, last = np.minimum(at_low, at_high), np.maximum(at_low, at_high)
        enter = first if enter is None else np.maximum(enter, first, out=enter)
        leave = last if leave is None else np.minimum(leave, last, out=leave)
    if mask is not None:
        enter[~mask], leave[~mask] = np.inf, -np.inf
    return enter, leave


def _slab_indices(enter: np.ndarray, leave: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """`_slabs_hitting_stack`'s bounds -> the first and last slab index between them, int64 (rounding is monotonic,
    so the bounds may be reduced over rows or columns first, on fewer numbers)."""
    big = np.iinfo(np.int64).max // 4
    return (np.clip(np.floor(enter) + 1, -big, big).astype(np.int64),
            np.clip(np.ceil(leave) - 1, -big, big).astype(np.int64))


def _nearest_cuts(limits: np.ndarray, increasing: bool) -> Tuple[np.ndarray, np.ndarray]:
    """Per detector row and per column, the slab index of the earliest cut (in the rays' direction) of any of its
    rays at the detector, from `_slabs_past_detector`'s per-pixel limits."""
    if increasing:
        return limits.min(1), limits.min(0)
    return limits.max(1), limits.max(0)


def _chunk_reaches_cut(cut_rows: np.ndarray, cut_cols: np.ndarray, begin: int, end: int, increasing: bool) -> bool:
    """Whether a chunk of slabs [begin, end) may hold samples past the detector for a ray of the rectangle of these
    rows and columns. The rectangle's earliest cut lies no earlier than its rows' or its columns' earliest, so
    False is exact; most chunks of a view lie wholly in front of the detector and need no per-sample mask, which
    costs three times the sampling (bench/RESULTS.md)."""
    if increasing:
        return max(cut_rows.min(), cut_cols.min()) < end
    return min(cut_rows.max(), cut_cols.max()) >= begin


def _grid_planes(origins_vox: np.ndarray, slope: np.ndarray, main: int, slab: int,
                 axes: Sequence[Tuple[int, int, int, int]], dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """The sampling grid of slab n, start + n * step: (start, step), (h, w, 2) host tensors each, x and y from
    `axes` (index axis, filter factor, shear, stack size) of the slice columns and rows, for rays (origins (3, h, w)
    or (3, 1, 1), slopes (3, h, w)) across `main`.

    Slab n is centred on original main index t_n = slab*n + (slab-1)/2. Along a ray an index axis a is at
    a(t) = o_a + (t - o_m) * slope_a; a stack padded by `pad` and box-filtered by p maps index a to
    (a + pad - (p-1)/2) / p; grid_sample's align_corners coordinates map index x of an n-long axis to 2x/(n-1) - 1.
    All affine in n, and for a cone beam (one origin) affine in the slope: a pass or two per plane, written
    straight into the grid (a view's set-up, which the workers wait for).
    """
    host_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    shape = slope.shape[1:] + (2,)
    start, step = torch.empty(shape, dtype=host_dtype), torch.empty(shape, dtype=host_dtype)
    for at, (axis, pool, shear, size) in enumerate(axes):
        scale = 2.0 / (pool * max(size - 1, 1))
        # (1, 1) for a cone beam's one origin, in the slopes' dtype so that no pass runs in float64
        intercept = scale * (origins_vox[axis] + _shear_pad(slab, shear, pool) - (pool - 1) / 2.0) - 1.0
        factor = scale * ((slab - 1) / 2.0 - origins_vox[main])
        np.add(factor.astype(slope.dtype) * slope[axis], intercept.astype(slope.dtype), out=start.numpy()[..., at],
               casting="same_kind")
        np.multiply(slope[axis], scale * slab, out=step.numpy()[..., at], casting="same_kind")
    return start, step


def _extent_within_strip(along: np.ndarray, across: np.ndarray, low: float, high: float) -> Tuple[np.ndarray,
                                                                                                     np.ndarray]:
    """Per convex quadrilateral, the least and greatest `along` coordinate of its part with `across` in [low, high]
    (NaN where it misses the strip). Vertices (n, 4) in the order of `SliceWarpProjector._slab_windows`' corners (low
    row & low column, low & high, high & low, high & high), so the edges join 0-1, 1-3, 3-2 and 2-0.

    The part is convex; its vertices are the quadrilateral's vertices inside the strip and the points where its edges
    cross the strip's two lines."""
    inside = (across >= low) & (across <= high)
    candidates = [np.where(inside, along, np.nan)]
    start, end = [0, 1, 3, 2], [1, 3, 2, 0]
    a0, a1, b0, b1 = along[:, start], along[:, end], across[:, start], across[:, end]
    with np.errstate(divide="ignore", invalid="ignore"):
        for line in (low, high):
            crosses = (b0 - line) * (b1 - line) <= 0
            at = a0 + (line - b0) / (b1 - b0) * (a1 - a0)
            candidates.append(np.where(crosses & np.isfinite(at), at, np.nan))
    candidates = np.concatenate(candidates, 1)  # (n, 12)
    return np.fmin.reduce(candidates, 1), np.fmax.reduce(candidates, 1)  # NaN only where all are


def _cross(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a x b of two (3,) vectors (np.cross costs tens of microseconds on vectors this small)."""
    return np.array([a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]])


def _inverse_2x2(matrix: np.ndarray) -> np.ndarray:
    """The inverse of an invertible (2, 2) matrix, by its adjugate."""
    (a, b), (c, d) = matrix
    return np.array([[d, -b], [-c, a]]) / (a * d - b * c)


def _argmax_of_three(values: np.ndarray) -> np.ndarray:
    """np.argmax(values, axis=0) for a first axis of 3 (the first on ties), by two comparisons of whole planes."""
    first, second, third = values
    best = (second > first).astype(np.int64)
    best[third > np.maximum(first, second)] = 2
    return best


def _dominant_axis(offsets_vox: np.ndarray, per_voxel: np.ndarray) -> Optional[int]:
    """The index axis along which every ray advances the most filtered voxels (offsets (3, H, W) index steps,
    `per_voxel` (3,) filtered voxels per voxel), decided from the detector's corners; None when they cannot tell.

    A pixel's offset is affine in its row and column, so over the detector |offset| peaks at a corner and falls
    below the corners' least only where its sign changes: an axis whose least there beats every other axis's peak
    wins at every pixel."""
    corners = (offsets_vox[:, [0, 0, -1, -1], [0, -1, 0, -1]] * per_voxel[:, None]).tolist()  # 3 x 4
    peak = [max(map(abs, axis)) for axis in corners]
    least = [min(map(abs, axis)) if all(x > 0 for x in axis) or all(x < 0 for x in axis) else 0.0 for axis in corners]
    winners = [axis for axis in range(3) if least[axis] > max(peak[other] for other in range(3) if other != axis)]
    return winners[0] if winners else None


def _one_sign(values: np.ndarray) -> bool:
    """Whether a plane affine in row and column (H, W) is non-zero with one sign everywhere: at its corners."""
    corners = values[[0, 0, -1, -1], [0, -1, 0, -1]]
    return bool(np.all(corners > 0) or np.all(corners < 0))


def _row_ranges(values: np.ndarray, mask: Optional[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
    """min and max of `values` (h, w) per row over the pixels where `mask` is True (all pixels when it is None),
    (h,) each; inf and -inf in a row without such pixels.

    Without a mask the values are a ray slope, a ratio of two functions affine in the column whose denominator
    keeps its sign over the region: monotonic along a row, so its ends hold the extremes."""
    if mask is None:
        ends = values[:, [0, -1]]
        return ends.min(1), ends.max(1)
    return np.where(mask, values, np.inf).min(1), np.where(mask, values, -np.inf).max(1)


def _join_small_runs(runs: List[list]) -> None:
    """Joins each run of rows [first row, rows, slab length] with fewer than _MIN_BAND_ROWS rows to the neighbour
    that costs the fewest extra samples, taking the shorter slab of the two, smallest run first; runs of one slab
    length that come to meet are joined too. In place."""
    def extra_samples(run: list, other: list) -> float:  # rows x slabs per slice, before and after joining
        slab = min(run[2], other[2])
        return run[1] * (1 / slab - 1 / run[2]) + other[1] * (1 / slab - 1 / other[2])

    while len(runs) > 1:
        small = min(range(len(runs)), key=lambda at: runs[at][1])
        if runs[small][1] >= _MIN_BAND_ROWS:
            return
        neighbours = [at for at in (small - 1, small + 1) if 0 <= at < len(runs)]
        other = min(neighbours, key=lambda at: extra_samples(runs[small], runs[at]))
        first, second = sorted((small, other))
        (row, rows, slab), (_, more_rows, other_slab) = runs[first], runs[second]
        runs[first:second + 1] = [[row, rows + more_rows, min(slab, other_slab)]]
        for at in range(len(runs) - 1, 0, -1):
            if runs[at][2] == runs[at - 1][2]:
                runs[at - 1][1] += runs.pop(at)[1]


def _shear_and_drift(low: float, high: float, pool: int) -> Tuple[int, float]:
    """The slab shear (in SHEAR_STEPs) nearest the middle of rays' slopes from `low` to `high` (index change per
    slice, original voxels) and their largest sideways drift from it per slice, in voxels filtered by `pool`."""
    low, high = low / pool, high / pool  # filtered voxels per slice
    shear = int(round((low + high) / 2.0 / SHEAR_STEP))
    return shear, max(high - shear * SHEAR_STEP, shear * SHEAR_STEP - low)


def _mean_square_offset(low: float, high: float, pool: int, shift_per_slice: float, slab: int) -> float:
    """The mean square sideways offset (filtered voxels^2) between rays of slopes `low` to `high` (voxels per slice)
    and where a slab of `slab` slices, each shifted by `shift_per_slice` times its offset from the slab's centre
    rounded to whole voxels (as `_rounded_shifts`), reads them, over its slices: of the worse ray (a convex function
    of the slope peaks at an end). A straight slab's (no shift) is slope^2 (slab^2 - 1) / 12. A few numbers: plain
    Python."""
    offsets = [t - (slab - 1) / 2.0 for t in range(slab)]  # slices from the slab's centre
    shifts = [_rounded_shifts(offset, shift_per_slice)[0][1] for offset in offsets]
    return max(sum(((slope * offset - shift) / pool) ** 2 for offset, shift in zip(offsets, shifts)) / slab
               for slope in (low, high))


def _whole_voxel_shear_and_drift(low: float, high: float, pool: int) -> Tuple[int, float]:
    """`_shear_and_drift` for a shear of whole voxels per slice (in SHEAR_STEPs) nearest the middle of the slopes;
    no shear where the filter factor makes a whole voxel a fraction of SHEAR_STEPs."""
    steps_per_voxel = 1.0 / (SHEAR_STEP * pool)
    if abs(steps_per_voxel - round(steps_per_voxel)) > 1e-9:
        return 0, max(abs(low), abs(high)) / pool
    voxels = round((low + high) / 2.0)
    return int(voxels * round(steps_per_voxel)), max(high - voxels, voxels - low) / pool


def _slices_first(volume: torch.Tensor, main_dim: int) -> torch.Tensor:
    """(K, J, I) -> (N, rows, cols): the slices across `main_dim` (0 = k, 1 = j, 2 = i), each contiguous in its rows
    (slices across i copied out by `_last_axis_first`)."""
    if main_dim == 2:
        return _last_axis_first(volume)
    return volume.movedim(main_dim, 0)


def _last_axis_first(tensor: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """(..., n) -> (n, ...), a contiguous copy (in `dtype`, default the tensor's): one 2-D transpose, torch's fastest
    way to reorder the contiguous axis."""
    flipped = _contiguous_copy(tensor.reshape(-1, tensor.shape[-1]).t(), dtype or tensor.dtype)
    return flipped.view(tensor.shape[-1], *tensor.shape[:-1])


def _contiguous_copy(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous copy of `tensor` in `dtype`, made by one pass (`Tensor.to` keeps a view's strides)."""
    return torch.empty(tensor.shape, dtype=dtype, device=tensor.device).copy_(tensor)


def _twin_transposed(stack: torch.Tensor) -> torch.Tensor:
    """(slabs across i, B*C, k, j) -> (slabs across j, B*C, k, i): the stack of `_twin_of` back to its own layout, by a
    2-D transpose (torch's fastest way to move the contiguous axis) and a permutation of whole rows."""
    n_slabs, channels, rows, cols = stack.shape
    flipped = stack.reshape(n_slabs, -1).t().contiguous().view(channels, rows, cols, n_slabs)
    return flipped.permute(2, 0, 1, 3).contiguous()


def _runs_along(tensor: torch.Tensor, dim: int, length: int, mode: str) -> torch.Tensor:
    """Runs of `length` neighbours along `dim` summed (or maximised): ceil(n / length) long, a short last run as if
    zeros filled it. Strided adds, about twice as fast on the CPU as the same pooling by `avg_pool3d`."""
    if length == 1:
        return tensor
    size = tensor.shape[dim]
    full = size // length * length

    def run_member(at: int) -> torch.Tensor:  # element `at` of every whole run
        return tensor[(slice(None),) * dim + (slice(at, full, length),)]

    runs = run_member(0) + run_member(1) if mode == "sum" else torch.maximum(run_member(0), run_member(1))
    for at in range(2, length):
        runs = runs + run_member(at) if mode == "sum" else torch.maximum(runs, run_member(at))
    if full == size:
        return runs
    rest = tensor.narrow(dim, full, size - full)
    rest = rest.sum(dim, keepdim=True) if mode == "sum" else rest.amax(dim, keepdim=True).clamp_min(0.0)
    return torch.cat([runs, rest], dim)


def _runs_in_plane(tensor: torch.Tensor, rows: int, cols: int, mode: str) -> torch.Tensor:
    """(..., R, C) -> (..., ceil(R / rows), ceil(C / cols)): `_runs_along` the last two dims, the last first."""
    return _runs_along(_runs_along(tensor, tensor.dim() - 1, cols, mode), tensor.dim() - 2, rows, mode)


def _merge_runs(stack: torch.Tensor, length: int, mode: str) -> torch.Tensor:
    """(N, B*C, rows, cols) -> (ceil(N / length), B*C, rows, cols): runs of `length` neighbouring slabs summed (or
    maximised), the sums rounded once to the stack's dtype; a short last run is padded with zeros.

    One run at a time, so that its float32 sum stays in cache: four to six times faster on the CPU than one reduction
    over the stack.
    """
    total_dtype = torch.promote_types(stack.dtype, torch.float32)  # float16 stacks add in float32
    merged = stack.new_empty((-(-stack.shape[0] // length),) + stack.shape[1:])
    for run in range(merged.shape[0]):
        merged[run] = _runs_along(stack[run * length:(run + 1) * length].to(total_dtype), 0, length, mode)[0]
    return merged


def _shear_pad(slab: int, shear: int, pool: int) -> int:
    """Voxels by which the slices of a slab sheared by `shear` SHEAR_STEPs (filter factor `pool`) move at most."""
    return int(math.ceil(abs((slab - 1) / 2.0 * shear * SHEAR_STEP * pool) - 1e-9))


def _rounded_shifts(offset: float, slope: float) -> List[Tuple[float, int]]:
    """A shift by offset * slope voxels rounded to the nearest whole voxel (half to even), as `_linear_shifts`."""
    return [(1.0, int(round(offset * slope)))]


def _linear_shifts(offset: float, slope: float) -> List[Tuple[float, int]]:
    """A shift by offset * slope voxels as (weight, whole-voxel shift) pairs: linear between the two nearest."""
    shift = offset * slope
    low = math.floor(shift)
    weight = shift - low
    return [(1.0 - weight, low)] + ([(weight, low + 1)] if weight > 1e-9 else [])


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

