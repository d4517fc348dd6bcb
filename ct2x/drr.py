"""Physically based DRR: CT in HU -> material area densities -> polychromatic Beer-Lambert -> radiograph.

Per-CT preparation (done once, in `DRRRenderer.__init__`): crop to the body, convert HU to the density of each
material (air, soft tissue, bone; g/cm^3) and re-slice for the projector. Each view then costs one projection of
those three channels (one channel on the monochromatic fast path) and a per-pixel look-up of the polychromatic
attenuation (`ct2x.physics.AttenuationTable`, within 2e-4 of the exact spectrum sum).

Outputs per view (`Radiograph`): the attenuation image -ln(I / I_open) (float, quantitative: 0 where nothing
attenuates), the displayed 8-bit image (attenuation windowed, bone bright) and, on the polychromatic path, the area
density of each material along every ray (g/cm^2), from which bone-only or bone-suppressed films follow
(`Radiograph.material_attenuation`). A renderer without those maps (`material_maps=False`, CT2XSynth's slider)
projects two channels instead of three: air counted as soft tissue and bone (`basis_densities`), the film within about
3e-4 of the three-material attenuation, 1.2-1.5x faster on the CPU (bench/RESULTS.md, slider).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from .conventions import voxel_to_world
from .device import torch_device
from .errors import CT2XInputError
from .geometry import CArm, View
from .memory import check_fits, drr_peak_bytes
from .physics import (
    MATERIALS,
    add_quantum_noise,
    attenuation_table,
    basis_densities,
    load_spectrum,
    mass_attenuation_at,
    material_densities,
    transmission,
)
from .projector import SliceWarpProjector, single_threaded_ops
from .volume import CTVolume

MIN_NOISE_PHOTONS = 1.0  # photons per open-field pixel; fewer leave a blank film
MAX_NOISE_PHOTONS = 1e12  # beyond this the relative noise 1/sqrt(N) is below float32 resolution: no noise at all
BODY_MIN_HU = -500.0  # voxels above this bound the body crop; air outside it (~0.001 g/cm^3) is left out
CROP_MARGIN_VOXELS = 2
#: Views a fitted detector shows the whole body in by default: the slider's horizontal sweep, (primary, secondary) deg.
FIT_SWEEP_DEG: Tuple[Tuple[float, float], ...] = tuple((float(a), 0.0) for a in range(-90, 91, 15))
#: Slab lengths a renderer's projector uses: a view that allows 5 (7) slices per slab takes 4 (6), so that only the
#: stacks of 2 and 3 are re-sliced from the CT and the others merged from them (`SliceWarpProjector`).
RENDER_SLAB_LENGTHS = (1, 2, 3, 4, 6, 8)
#: Views whose re-slicings a renderer prepares up front: the horizontal sweep and the steepest tilts (CT2XSynth's
#: secondary angle, +-45 deg) every 30 deg, (primary, secondary) deg. The projector fills in every slab length between
#: them (`prepare(sweep=True)`), which covers each whole-degree view of both sliders of the real chest CT.
PREPARED_SWEEP_DEG: Tuple[Tuple[float, float], ...] = FIT_SWEEP_DEG + tuple(
    (float(a), tilt) for a in range(-90, 91, 30) for tilt in (-45.0, 45.0))


@dataclass(frozen=True)
class Physics:
    """How rays become intensities. `energy_kev` selects the monochromatic fast path instead of `spectrum`."""

    spectrum: str = "60kV"  # tube spectrum: "60kV" (3.5 mm Al, the CT2X-GAN paper's), "90kV", "120kV"
    energy_kev: Optional[float] = None  # monochromatic energy, keV; None = polychromatic `spectrum`
    energy_weighted: bool = True  # energy-integrating detector (True) or photon counting (False)
    noise_photons: Optional[float] = None  # photons per pixel for Poisson quantum noise; None = noiseless
    seed: Optional[int] = None  # noise seed: the same seed gives the same series of noisy films

    def __post_init__(self) -> None:
        if self.energy_kev is None:
            load_spectrum(self.spectrum)  # raises for an unknown name
        elif not (isinstance(self.energy_kev, (int, float)) and math.isfinite(self.energy_kev)):
            raise CT2XInputError(f"energy_kev={self.energy_kev!r}: pass a photon energy in keV (e.g. 50)")
        else:
            mass_attenuation_at(self.energy_kev)  # raises outside the tables' energies
        if self.noise_photons is not None and not MIN_NOISE_PHOTONS <= self.noise_photons <= MAX_NOISE_PHOTONS:
            raise CT2XInputError(
                f"noise_photons={self.noise_photons!r}: photons per pixel must lie between {MIN_NOISE_PHOTONS:g} "
                f"(fewer leave a blank film) and {MAX_NOISE_PHOTONS:g} (more add no visible noise); DeepDRR's "
                "default is 1e4, or leave it out for a noiseless film")
        if self.seed is not None and not (isinstance(self.seed, (int, np.integer)) and 0 <= self.seed < 2**64):
            raise CT2XInputError(f"seed={self.seed!r}: the noise seed must be a whole number from 0 to 2^64 - 1")

    def describe(self) -> dict:
        """JSON-serialisable record of these settings."""
        return {"spectrum": None if self.energy_kev is not None else self.spectrum, "energy_kev": self.energy_kev,
                "detector": "energy-integrating" if self.energy_weighted else "photon-counting",
                "noise_photons_per_pixel": self.noise_photons, "noise_seed": self.seed}


@dataclass
class Radiograph:
    """One rendered view. Arrays are (H, W), row 0 at the top, radiological display (see `ct2x.geometry`)."""

    view: View
    attenuation: np.ndarray  # float32, -ln(I / I_open), unitless
    display: np.ndarray  # uint8, attenuation windowed to 0..255, bone bright
    window: Tuple[float, float]  # attenuation values shown as 0 and 255
    area_density_g_cm2: Dict[str, np.ndarray] = field(default_factory=dict)  # per material; empty without maps
    spectrum_name: Optional[str] = None

    def material_attenuation(self, materials: Sequence[str]) -> np.ndarray:
        """Attenuation image with only `materials` present, e.g. ("bone",) or ("air", "soft_tissue")."""
        if not self.area_density_g_cm2 or self.spectrum_name is None:
            raise CT2XInputError("material images need the polychromatic path (Physics(energy_kev=None)) of a "
                                 "renderer that keeps the material maps (DRRRenderer(material_maps=True))")
        if isinstance(materials, str):
            materials = (materials,)
        unknown = set(materials) - set(MATERIALS)
        if unknown:
            raise CT2XInputError(f"unknown materials {sorted(unknown)}; choose from {MATERIALS}")
        stack = np.stack([self.area_density_g_cm2[m] if m in materials else np.zeros_like(self.attenuation)
                          for m in MATERIALS])  # (3, H, W) g/cm^2
        intensity = transmission(torch.from_numpy(stack), load_spectrum(self.spectrum_name))
        return (-torch.log(intensity.clamp_min(1e-12))).numpy().astype(np.float32)


def auto_window(attenuation: np.ndarray, low_percentile: float = 0.5, high_percentile: float = 99.5,
                min_attenuation: float = 0.05) -> Tuple[float, float]:
    """Display window from the percentiles of the attenuation inside the object (pixels above `min_attenuation`)."""
    inside = attenuation[attenuation > min_attenuation]
    if inside.size < 16:
        return 0.0, max(float(attenuation.max()), 1e-3)
    low, high = np.percentile(inside, [low_percentile, high_percentile])
    return float(low), float(max(high, low + 1e-3))


def check_window(window: Tuple[float, float]) -> Tuple[float, float]:
    """`window` as two floats (low, high) of attenuation, or CT2XInputError unless both are finite and low < high."""
    try:
        low, high = (float(w) for w in window)
    except (TypeError, ValueError):
        raise CT2XInputError(f"window {window!r}: pass two numbers (low, high) of attenuation") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise CT2XInputError(f"window {window!r}: low and high must be finite, with low below high (e.g. 0.5 4.0)")
    return low, high


def to_display(attenuation: np.ndarray, window: Tuple[float, float]) -> np.ndarray:
    """Attenuation -> uint8 with `window` (low, high) mapped to 0 and 255; higher attenuation is brighter."""
    low, high = check_window(window)
    scaled = (attenuation - low) / (high - low)
    return np.round(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)


class DRRRenderer:
    """Renders radiographs of one CT at any C-arm angle; per-CT work is done once, here.

    The display window is fixed by the first render (or given), so films of one CT are comparable and a view-angle
    slider does not flicker. `sweep` (the default) re-slices up front for every view of both sliders' sweeps
    (`PREPARED_SWEEP_DEG`), so that dragging a slider never stops; without it each view re-slices what it needs when
    first rendered, which is cheaper for a few films of a CT (about a third of the time for one 64^2 film of a 64^3
    cube). The films are the same either way.

    `material_maps=False` (polychromatic only) gives films without the per-material area densities, from two
    projected channels instead of three (see the module docstring): what a slider that shows only the film needs.
    """

    def __init__(self, volume: CTVolume, carm: Optional[CArm] = None, physics: Optional[Physics] = None,
                 device: str = "cpu", window: Optional[Tuple[float, float]] = None, sweep: bool = True,
                 material_maps: bool = True):
        start = time.perf_counter()
        self.volume = volume
        self.carm = carm or CArm()
        self.physics = physics or Physics()
        self.device = torch_device(device)
        self.window = None if window is None else check_window(window)
        self.isocenter_ras = volume.center_ras
        self._spectrum = None if self.physics.energy_kev is not None else load_spectrum(self.physics.spectrum)
        self._attenuation = None if self._spectrum is None else attenuation_table(
            self._spectrum, self.physics.energy_weighted)  # polychromatic -ln(I / I_open), looked up
        self._in_basis = self._spectrum is not None and not material_maps  # two channels: soft tissue, bone
        self._generator = None
        if self.physics.seed is not None:
            self._generator = torch.Generator(device=self.device).manual_seed(self.physics.seed)

        hu, affine = _crop_to_body(volume)
        check_fits(drr_peak_bytes(hu.size, self.carm.detector.width_px * self.carm.detector.height_px),
                   f"{volume.source or 'CT'}: preparing {hu.shape[::-1]} body voxels for a "
                   f"{self.carm.detector.width_px}x{self.carm.detector.height_px} px detector",
                   "resample the CT to coarser voxels (e.g. 1 mm), crop it, or use a smaller detector")
        # On the CPU every op runs on one thread, here and in `render_view`, and the projector shares its re-slicing
        # and each view out to as many single-threaded workers as torch has threads (`SliceWarpProjector`): torch's
        # own threads spin at every op and collapse beside another busy process (seconds per view).
        workers = torch.get_num_threads() if self.device.type == "cpu" else 1
        with single_threaded_ops(self.device.type == "cpu"):
            hu = torch.from_numpy(hu).to(self.device)
            if self._in_basis:
                channels = basis_densities(hu, self._attenuation.air_basis, workers=workers)  # (2, K, J, I) g/cm^3
            elif self.physics.energy_kev is not None:
                # Fast path: one channel of linear attenuation at one energy, 1/cm -> the projector integrates mm.
                densities = material_densities(hu, workers=workers)  # (3, K, J, I) g/cm^3
                mu_rho = torch.as_tensor(mass_attenuation_at(self.physics.energy_kev)).to(densities)  # (3,) cm^2/g
                channels = torch.einsum("m,mkji->kji", mu_rho, densities)[None]  # (1, K, J, I) 1/cm
            else:
                channels = material_densities(hu, workers=workers)  # (3, K, J, I) g/cm^3
            # Straight slabs only, so that the sweep's preparation below covers every angle in between (and the
            # films of a renderer without it are the same); bands of detector rows take the slabs their own rays
            # allow (a tilted view's rows slant less towards one edge), from the same prepared stacks. On the CPU
            # the re-sliced stacks are kept in float16: half the memory, films within about 2e-5 relative L2.
            self.projector = SliceWarpProjector(  # (1, C, K, J, I)
                channels[None], affine, workers=workers, shear=False, merge_slabs=True, row_bands=True,
                slab_lengths=RENDER_SLAB_LENGTHS, stack_dtype=torch.float16 if self.device.type == "cpu" else None)
            if sweep:  # every slab the sliders' sweeps need, so that dragging a slider never stops to re-slice
                self.projector.prepare([self.view(*angles) for angles in PREPARED_SWEEP_DEG], sweep=True)
        self.preparation_seconds = time.perf_counter() - start

    def view(self, primary_deg: float = 0.0, secondary_deg: float = 0.0) -> View:
        """The C-arm view at these angles (degrees) about the CT's centre."""
        return self.carm.view(primary_deg, secondary_deg, self.isocenter_ras)

    @torch.no_grad()
    def render(self, primary_deg: float = 0.0, secondary_deg: float = 0.0) -> Radiograph:
        """The radiograph at C-arm angles in degrees (see `ct2x.geometry` for their meaning)."""
        return self.render_view(self.view(primary_deg, secondary_deg))

    @torch.no_grad()
    def render_view(self, view: View) -> Radiograph:
        """The radiograph for any view (for example one built from a 4x4 pose).

        On the CPU every op runs on one thread (`single_threaded_ops`); the projector's workers share the view.
        """
        with single_threaded_ops(self.device.type == "cpu"):
            return self._render_view(view)

    def _render_view(self, view: View) -> Radiograph:
        line_integrals = self.projector.project([view])[0, 0]  # (C, H, W) value x mm
        area_density = None
        if self._spectrum is None:
            intensity = torch.exp(-line_integrals[0] / 10.0)  # mm -> cm
        elif self._in_basis:
            intensity = torch.exp(-self._attenuation.basis(line_integrals / 10.0))  # (2, H, W) g/cm^2
        else:
            area_density = line_integrals / 10.0  # (3, H, W) g/cm^2
            intensity = torch.exp(-self._attenuation(area_density))
        if self.physics.noise_photons is not None:
            intensity = add_quantum_noise(intensity, self.physics.noise_photons, generator=self._generator)
        attenuation = (-torch.log(intensity.clamp_min(1e-12))).clamp_min(0.0).cpu().numpy().astype(np.float32)
        if self.window is None:
            self.window = auto_window(attenuation)
        maps = {} if area_density is None else {m: a.cpu().numpy() for m, a in zip(MATERIALS, area_density)}
        return Radiograph(view, attenuation, to_display(attenuation, self.window), self.window, maps,
                          None if self._spectrum is None else self._spectrum.name)


def body_outline_ras(volume: CTVolume, max_cells_per_axis: int = 48) -> np.ndarray:
    """(N, 3) RAS mm corners of the coarse cells on the body's surface (voxels above BODY_MIN_HU).

    The grid is divided into at most `max_cells_per_axis` cells per axis; a cell holding any body voxel counts as
    body, so the corners of its surface cells enclose the body (to within one cell) at any viewing angle.
    """
    body = volume.hu > BODY_MIN_HU  # (K, J, I) bool
    if not body.any():
        body = np.ones_like(body)  # no body: the whole grid
    cell = np.array([-(-n // max_cells_per_axis) for n in body.shape])  # voxels per cell along K, J, I
    n_cells = -(-np.array(body.shape) // cell)  # cells along K, J, I
    padded = np.zeros(n_cells * cell, dtype=np.uint8)
    padded[: body.shape[0], : body.shape[1], : body.shape[2]] = body
    blocks = torch.from_numpy(padded).reshape(n_cells[0], cell[0], n_cells[1], cell[1], n_cells[2], cell[2])
    cells = blocks.amax(dim=5).amax(dim=3).amax(dim=1).numpy().astype(bool)  # (K', J', I') any body voxel
    inner = np.zeros_like(cells)  # cells whose 6 neighbours are body too
    inner[1:-1, 1:-1, 1:-1] = cells[1:-1, 1:-1, 1:-1] & cells[:-2, 1:-1, 1:-1] & cells[2:, 1:-1, 1:-1] \
        & cells[1:-1, :-2, 1:-1] & cells[1:-1, 2:, 1:-1] & cells[1:-1, 1:-1, :-2] & cells[1:-1, 1:-1, 2:]
    surface = cells & ~inner
    corners = np.zeros(n_cells + 1, dtype=bool)  # (K'+1, J'+1, I'+1) cell-corner lattice
    for dk in (0, 1):
        for dj in (0, 1):
            for di in (0, 1):
                corners[dk:dk + n_cells[0], dj:dj + n_cells[1], di:di + n_cells[2]] |= surface
    corner_kji = np.minimum(np.argwhere(corners) * cell, body.shape)  # (N, 3) voxel-face index, K, J, I
    return voxel_to_world(volume.affine, corner_kji[:, ::-1] - 0.5)


def fitted_detector_spacing_mm(volume: CTVolume, carm: CArm, size_px: int,
                               views_deg: Optional[Sequence[Tuple[float, float]]] = None,
                               margin: float = 1.04) -> float:
    """Detector pixel spacing (mm) at which `size_px` pixels show the whole body in every one of `views_deg`.

    `views_deg`: (primary, secondary) C-arm angles in degrees about the CT's centre; default FIT_SWEEP_DEG, the
    slider's horizontal sweep. The body's outline is projected through each view (parts nearer the source are
    magnified more), and `margin` leaves a border around the widest silhouette. Raises CT2XInputError when the
    source of a view lies inside the body.
    """
    outline = body_outline_ras(volume)  # (N, 3) RAS mm
    half_extent_mm = 0.0  # largest distance of the silhouette from the detector centre, mm on the detector
    for primary, secondary in FIT_SWEEP_DEG if views_deg is None else views_deg:
        view = carm.view(primary, secondary, volume.center_ras)
        camera = (outline - view.source_ras) @ view.camera_to_world[:3, :3]  # (N, 3) camera axes, mm
        if carm.beam == "cone":
            if camera[:, 2].min() <= 0.0:
                raise CT2XInputError(
                    f"{volume.source or 'CT'}: at {primary:g}/{secondary:g} deg the X-ray source "
                    f"({carm.source_to_isocenter_mm:g} mm from the CT's centre) lies inside or behind the body; "
                    "increase the source-to-isocentre distance")
            camera = camera[:, :2] * (carm.source_to_detector_mm / camera[:, 2:3])  # (N, 2) on the detector, mm
        half_extent_mm = max(half_extent_mm, float(np.abs(camera[:, :2]).max()))
    return 2.0 * half_extent_mm * margin / size_px


def _crop_to_body(volume: CTVolume) -> Tuple[np.ndarray, np.ndarray]:
    """HU array (a view, not a copy) and affine cropped to the box of voxels above BODY_MIN_HU plus a margin (whole
    volume if none)."""
    inside = volume.hu > BODY_MIN_HU
    if not inside.any():
        return volume.hu, volume.affine
    bounds = []
    for axis in range(3):  # K, J, I
        other = tuple(a for a in range(3) if a != axis)
        present = np.nonzero(inside.any(axis=other))[0]
        bounds.append((max(present[0] - CROP_MARGIN_VOXELS, 0),
                       min(present[-1] + CROP_MARGIN_VOXELS + 1, inside.shape[axis])))
    (k0, k1), (j0, j1), (i0, i1) = bounds
    affine = volume.affine.copy()
    affine[:3, 3] = volume.affine[:3, :3] @ np.array([i0, j0, k0]) + volume.affine[:3, 3]
    return volume.hu[k0:k1, j0:j1, i0:i1], affine

