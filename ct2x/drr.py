"""Physically based DRR: CT in HU -> material area densities -> polychromatic Beer-Lambert -> radiograph.

Per-CT preparation (done once, in `DRRRenderer.__init__`): crop to the body, convert HU to the density of each
material (air, soft tissue, bone; g/cm^3) and re-slice for the projector. Each view then costs one projection of
those three channels (one channel on the monochromatic fast path) and a per-pixel spectrum sum.

Outputs per view (`Radiograph`): the attenuation image -ln(I / I_open) (float, quantitative: 0 where nothing
attenuates), the displayed 8-bit image (attenuation windowed, bone bright) and, on the polychromatic path, the area
density of each material along every ray (g/cm^2), from which bone-only or bone-suppressed films follow
(`Radiograph.material_attenuation`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from .conventions import voxel_to_world
from .errors import CT2XInputError
from .geometry import CArm, View
from .physics import (
    MATERIALS,
    add_quantum_noise,
    load_spectrum,
    mass_attenuation_at,
    material_densities,
    transmission,
)
from .projector import SliceWarpProjector
from .volume import CTVolume

BODY_MIN_HU = -500.0  # voxels above this bound the body crop; air outside it (~0.001 g/cm^3) is left out
CROP_MARGIN_VOXELS = 2


@dataclass(frozen=True)
class Physics:
    """How rays become intensities. `energy_kev` selects the monochromatic fast path instead of `spectrum`."""

    spectrum: str = "60kV"  # tube spectrum: "60kV" (3.5 mm Al, the CT2X-GAN paper's), "90kV", "120kV"
    energy_kev: Optional[float] = None  # monochromatic energy, keV; None = polychromatic `spectrum`
    energy_weighted: bool = True  # energy-integrating detector (True) or photon counting (False)
    noise_photons: Optional[float] = None  # photons per pixel for Poisson quantum noise; None = noiseless
    seed: Optional[int] = None  # noise seed: the same seed gives the same series of noisy films

    def describe(self) -> dict:
        """JSON-serialisable record of these settings."""
        return {"spectrum": None if self.energy_kev else self.spectrum, "energy_kev": self.energy_kev,
                "detector": "energy-integrating" if self.energy_weighted else "photon-counting",
                "noise_photons_per_pixel": self.noise_photons, "noise_seed": self.seed}


@dataclass
class Radiograph:
    """One rendered view. Arrays are (H, W), row 0 at the top, radiological display (see `ct2x.geometry`)."""

    view: View
    attenuation: np.ndarray  # float32, -ln(I / I_open), unitless
    display: np.ndarray  # uint8, attenuation windowed to 0..255, bone bright
    window: Tuple[float, float]  # attenuation values shown as 0 and 255
    area_density_g_cm2: Dict[str, np.ndarray] = field(default_factory=dict)  # per material; empty on the mono path
    spectrum_name: Optional[str] = None

    def material_attenuation(self, materials: Sequence[str]) -> np.ndarray:
        """Attenuation image with only `materials` present, e.g. ("bone",) or ("air", "soft_tissue")."""
        if not self.area_density_g_cm2 or self.spectrum_name is None:
            raise CT2XInputError("material images need the polychromatic path (Physics(energy_kev=None))")
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


def to_display(attenuation: np.ndarray, window: Tuple[float, float]) -> np.ndarray:
    """Attenuation -> uint8 with `window` (low, high) mapped to 0 and 255; higher attenuation is brighter."""
    low, high = window
    scaled = (attenuation - low) / (high - low)
    return np.round(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)


class DRRRenderer:
    """Renders radiographs of one CT at any C-arm angle; per-CT work is done once, here.

    The display window is fixed by the first render (or given), so films of one CT are comparable and a view-angle
    slider does not flicker.
    """

    def __init__(self, volume: CTVolume, carm: Optional[CArm] = None, physics: Optional[Physics] = None,
                 device: str = "cpu", window: Optional[Tuple[float, float]] = None):
        start = time.perf_counter()
        self.volume = volume
        self.carm = carm or CArm()
        self.physics = physics or Physics()
        self.device = torch.device(device)
        self.window = window
        self.isocenter_ras = volume.center_ras
        self._spectrum = None if self.physics.energy_kev else load_spectrum(self.physics.spectrum)
        if self.physics.noise_photons is not None and self.physics.noise_photons <= 0:
            raise CT2XInputError(f"noise photon count {self.physics.noise_photons} must be positive")
        self._generator = None
        if self.physics.seed is not None:
            self._generator = torch.Generator(device=self.device).manual_seed(int(self.physics.seed))

        hu, affine = _crop_to_body(volume)
        densities = material_densities(torch.from_numpy(hu).to(self.device))  # (3, K, J, I) g/cm^3
        if self.physics.energy_kev:
            # Fast path: one channel of linear attenuation at one energy, 1/cm -> the projector integrates mm.
            mu_rho = torch.as_tensor(mass_attenuation_at(self.physics.energy_kev)).to(densities)  # (3,) cm^2/g
            channels = torch.einsum("m,mkji->kji", mu_rho, densities)[None]  # (1, K, J, I) 1/cm
        else:
            channels = densities
        self.projector = SliceWarpProjector(channels[None], affine)  # (1, C, K, J, I)
        # AP, lateral and 45 deg hold the longest and the shortest slabs a primary-angle sweep needs; the shorter
        # ones serve every angle in between, so dragging the slider never stops to re-slice.
        self.projector.prepare([self.view(angle) for angle in (0.0, 45.0, 90.0)])
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
        """The radiograph for any view (for example one built from a 4x4 pose)."""
        line_integrals = self.projector.project([view])[0, 0]  # (C, H, W) value x mm
        area_density = None
        if self._spectrum is None:
            intensity = torch.exp(-line_integrals[0] / 10.0)  # mm -> cm
        else:
            area_density = line_integrals / 10.0  # (3, H, W) g/cm^2
            intensity = transmission(area_density, self._spectrum, energy_weighted=self.physics.energy_weighted)
        if self.physics.noise_photons is not None:
            intensity = add_quantum_noise(intensity, self.physics.noise_photons, generator=self._generator)
        attenuation = (-torch.log(intensity.clamp_min(1e-12))).clamp_min(0.0).cpu().numpy().astype(np.float32)
        if self.window is None:
            self.window = auto_window(attenuation)
        maps = {} if area_density is None else {m: a.cpu().numpy() for m, a in zip(MATERIALS, area_density)}
        return Radiograph(view, attenuation, to_display(attenuation, self.window), self.window, maps,
                          None if self._spectrum is None else self._spectrum.name)


def body_extent_mm(volume: CTVolume) -> float:
    """Largest edge (mm) of the RAS-axis box around the body (voxels above BODY_MIN_HU) - for fitting a detector."""
    hu, affine = _crop_to_body(volume)
    corners = np.stack(np.meshgrid(*[[-0.5, n - 0.5] for n in hu.shape[::-1]], indexing="ij"), -1).reshape(-1, 3)
    corners_ras = voxel_to_world(affine, corners)
    return float((corners_ras.max(0) - corners_ras.min(0)).max())


def fitted_detector_spacing_mm(volume: CTVolume, carm: CArm, size_px: int, margin: float = 1.1) -> float:
    """Detector pixel spacing (mm) at which `size_px` pixels show the whole body at the isocentre, with a margin."""
    return body_extent_mm(volume) * carm.magnification * margin / size_px


def _crop_to_body(volume: CTVolume) -> Tuple[np.ndarray, np.ndarray]:
    """HU array and affine cropped to the box of voxels above BODY_MIN_HU plus a margin (whole volume if none)."""
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
    return np.ascontiguousarray(volume.hu[k0:k1, j0:j1, i0:i1]), affine

