"""X-ray physics in torch + numpy: HU -> materials, tube spectra, polychromatic transmission (exact or looked up),
noise."""

from __future__ import annotations

from ct2x.physics.lookup import AttenuationTable, attenuation_table
from ct2x.physics.materials import (
    AIR_MAX_HU,
    MATERIALS,
    SOFT_TISSUE_MAX_HU,
    basis_densities,
    hu_to_density,
    material_densities,
    material_fractions,
)
from ct2x.physics.noise import add_quantum_noise
from ct2x.physics.spectra import (
    SPECTRA,
    Spectrum,
    load_spectrum,
    mass_attenuation_at,
    monochromatic_transmission,
    transmission,
)

__all__ = [
    "AIR_MAX_HU",
    "AttenuationTable",
    "MATERIALS",
    "SOFT_TISSUE_MAX_HU",
    "SPECTRA",
    "Spectrum",
    "add_quantum_noise",
    "attenuation_table",
    "basis_densities",
    "hu_to_density",
    "load_spectrum",
    "mass_attenuation_at",
    "material_densities",
    "material_fractions",
    "monochromatic_transmission",
    "transmission",
]
