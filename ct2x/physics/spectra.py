"""Tube spectra and polychromatic Beer-Lambert transmission through air / soft tissue / bone.

Tables (``tables.npz``, made by ``scripts/make_physics_tables.py`` from SpekPy and xraylib): 0.5 keV bins from
10 to 120 keV, photon fractions of three filtered tungsten spectra and mu/rho of the `MATERIALS`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ct2x.errors import CT2XInputError
from ct2x.physics.materials import MATERIALS

TABLES_PATH = Path(__file__).with_name("tables.npz")
SPECTRA = ("60kV", "90kV", "120kV")
_ALIASES = {"60kv_al35": "60kV", "90kv_al40": "90kV", "120kv_al43": "120kV"}  # DeepDRR's spectrum names
# Pixels x energy bins evaluated at once: cache-sized on CPU (4x faster than one pass), large on accelerators.
_CPU_CHUNK_ELEMENTS = 1 << 17
_ACCELERATOR_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True, eq=False)
class Spectrum:
    """A filtered X-ray tube spectrum with the attenuation of `MATERIALS` on its energy bins.

    Arrays are float64 numpy arrays; `load_spectrum` gives read-only ones with only the bins that carry photons.
    """

    name: str
    kvp: float  # tube voltage, kV
    filtration_mm_al: float  # total filtration, mm aluminium
    energies_kev: np.ndarray  # (E,) bin centres, keV
    photon_fraction: np.ndarray  # (E,) photons per bin, sums to 1
    mass_attenuation_cm2_g: np.ndarray  # (3, E) mu/rho of air, soft tissue, bone, cm^2/g

    @property
    def mean_energy_kev(self) -> float:
        """Photon-weighted mean energy in keV."""
        return float(self.photon_fraction @ self.energies_kev)


@functools.cache
def _tables() -> dict[str, np.ndarray]:
    with np.load(TABLES_PATH) as npz:
        tables = {key: npz[key] for key in npz.files}
    if tuple(tables["materials"]) != MATERIALS:
        raise RuntimeError(f"{TABLES_PATH} has materials {tuple(tables['materials'])}, expected {MATERIALS}.")
    for array in tables.values():
        array.setflags(write=False)
    return tables


@functools.cache
def _load(name: str) -> Spectrum:
    tables = _tables()
    row = list(tables["spectrum_names"]).index(name)
    has_photons = tables["photon_fraction"][row] > 0  # drop empty bins once, here
    photon_fraction = tables["photon_fraction"][row, has_photons]
    arrays = {
        "energies_kev": tables["energies_kev"][has_photons],
        "photon_fraction": photon_fraction / photon_fraction.sum(),
        "mass_attenuation_cm2_g": tables["mass_attenuation_cm2_g"][:, has_photons],
    }
    for array in arrays.values():
        array.setflags(write=False)
    return Spectrum(
        name=name, kvp=float(tables["kvp"][row]), filtration_mm_al=float(tables["filtration_mm_al"][row]), **arrays
    )


def load_spectrum(name: str) -> Spectrum:
    """The spectrum "60kV" (60 kVp, 3.5 mm Al), "90kV" (4.0 mm Al) or "120kV" (4.3 mm Al); cached.

    DeepDRR's names "60KV_AL35", "90KV_AL40", "120KV_AL43" are accepted too; case does not matter.
    """
    key = str(name).lower()
    canonical = _ALIASES.get(key) or next((spectrum for spectrum in SPECTRA if spectrum.lower() == key), None)
    if canonical is None:
        raise CT2XInputError(
            f"spectrum {name!r} is unknown: use one of {', '.join(SPECTRA)} "
            f"(or DeepDRR's {', '.join(alias.upper() for alias in _ALIASES)})."
        )
    return _load(canonical)


def _check_area_density(area_density_g_cm2: Tensor) -> None:
    if not isinstance(area_density_g_cm2, Tensor) or area_density_g_cm2.dim() < 3:
        raise CT2XInputError("area_density_g_cm2 must be a tensor of shape (..., 3, H, W) in g/cm^2.")
    if area_density_g_cm2.shape[-3] != len(MATERIALS):
        raise CT2XInputError(
            f"area_density_g_cm2 has shape {tuple(area_density_g_cm2.shape)}: dimension -3 must hold the "
            f"{len(MATERIALS)} materials {MATERIALS}."
        )
    if not area_density_g_cm2.is_floating_point():
        raise CT2XInputError(f"area_density_g_cm2 has dtype {area_density_g_cm2.dtype}: pass a float tensor.")


def transmission(area_density_g_cm2: Tensor, spectrum: Spectrum, energy_weighted: bool = True) -> Tensor:
    """Polychromatic transmission I/I_open in (0, 1] behind material area densities; differentiable.

    area_density_g_cm2: (..., 3, H, W) g/cm^2 of air, soft tissue, bone (line integrals of
    `material_densities` in mm / 10). Returns (..., H, W): sum_E w(E) exp(-sum_m mu_m(E) A_m) / sum_E w(E)
    with w = p(E) E for an energy-integrating detector (default) or w = p(E) for photon counting.
    Float16/bfloat16 are computed in float32. Under autograd the (pixels x bins) exponentials are kept.
    """
    _check_area_density(area_density_g_cm2)
    compute_dtype = torch.promote_types(area_density_g_cm2.dtype, torch.float32)
    weight = spectrum.photon_fraction * (spectrum.energies_kev if energy_weighted else 1.0)  # (E,)
    as_tensor = functools.partial(torch.as_tensor, dtype=compute_dtype, device=area_density_g_cm2.device)
    weight = as_tensor(weight / weight.sum())
    minus_mu = as_tensor(-spectrum.mass_attenuation_cm2_g)  # (3, E) cm^2/g

    per_pixel = area_density_g_cm2.movedim(-3, -1).to(compute_dtype)  # (..., H, W, 3)
    flat = per_pixel.reshape(-1, len(MATERIALS))  # (N, 3)
    device_chunk = _CPU_CHUNK_ELEMENTS if flat.device.type == "cpu" else _ACCELERATOR_CHUNK_ELEMENTS
    chunk = max(1, device_chunk // weight.numel())
    result = torch.cat([torch.exp(part @ minus_mu) @ weight for part in flat.split(chunk)])  # (N,)
    return result.reshape(per_pixel.shape[:-1]).to(area_density_g_cm2.dtype)


def mass_attenuation_at(energy_kev: float) -> np.ndarray:
    """(3,) mu/rho of `MATERIALS` at one photon energy, cm^2/g, log-log interpolated on the table (10.25-119.75 keV)."""
    tables = _tables()
    energies_kev = tables["energies_kev"]
    if not energies_kev[0] <= energy_kev <= energies_kev[-1]:
        raise CT2XInputError(
            f"energy_kev={energy_kev} is outside the tables: use {energies_kev[0]} to {energies_kev[-1]} keV."
        )
    return np.array([np.exp(np.interp(np.log(energy_kev), np.log(energies_kev), np.log(material)))
                     for material in tables["mass_attenuation_cm2_g"]])


def monochromatic_transmission(area_density_g_cm2: Tensor, energy_kev: float) -> Tensor:
    """Transmission exp(-sum_m mu_m(E) A_m) at one photon energy (keV); (..., 3, H, W) g/cm^2 -> (..., H, W)."""
    _check_area_density(area_density_g_cm2)
    mu = torch.as_tensor(mass_attenuation_at(energy_kev), dtype=area_density_g_cm2.dtype,
                         device=area_density_g_cm2.device)
    return torch.exp(-(area_density_g_cm2 * mu[:, None, None]).sum(-3))
