"""Generate the X-ray physics tables of ``ct2x.physics`` (dev-time only).

Writes ``ct2x/physics/tables.npz`` (spectra and mass attenuation coefficients on one energy grid) and
``ct2x/physics/tables.json`` (how they were made). Needs SpekPy (MIT) and xraylib (BSD), which the ct2x
runtime never imports::

    pip install spekpy xraylib
    python scripts/make_physics_tables.py

Deterministic: the .npz is byte-identical between runs; in the .json only ``generated_on`` changes (set
SOURCE_DATE_EPOCH to pin it).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import io
import json
import os
import platform
import zipfile
from pathlib import Path

import numpy as np
import spekpy
import xraylib

OUTPUT_DIR = Path(__file__).resolve().parents[1] / "ct2x" / "physics"
COMMAND = "python scripts/make_physics_tables.py"

BIN_WIDTH_KEV = 0.5  # SpekPy bin width; bin centres at 1.25 + n * 0.5 keV
MIN_ENERGY_KEV = 10.0  # lower edge of the first kept bin (the filtered beams have < 1e-11 of photons below)
ANODE_ANGLE_DEG = 12.0

# name -> (tube voltage kVp, total filtration in mm Al); 60 kV/3.5 mm Al is the CT2X-GAN paper's beam.
SPECTRA = {"60kV": (60.0, 3.5), "90kV": (90.0, 4.0), "120kV": (120.0, 4.3)}

# Channel order of ct2x.physics.MATERIALS -> NIST compound name in xraylib.
MATERIALS = {
    "air": "Air, Dry (near sea level)",
    "soft_tissue": "Tissue, Soft (ICRU four-component)",
    "bone": "Bone, Cortical (ICRP)",
}


def spekpy_spectrum(kvp: float, filtration_mm_al: float) -> tuple[np.ndarray, np.ndarray]:
    """Bin centres (keV) and photon fluence per bin (arbitrary units, >= 0) of a filtered tungsten tube."""
    spek = spekpy.Spek(kvp=kvp, th=ANODE_ANGLE_DEG, dk=BIN_WIDTH_KEV)
    spek.filter("Al", filtration_mm_al)
    energies_kev, fluence_per_kev = spek.get_spectrum()  # (n,) keV, (n,) photons / (cm^2 keV)
    return energies_kev, np.clip(fluence_per_kev, 0.0, None) * BIN_WIDTH_KEV


def mass_attenuation(nist_name: str, energies_kev: np.ndarray) -> np.ndarray:
    """Total mass attenuation coefficient mu/rho (cm^2/g, coherent included) of a NIST compound."""
    compound = xraylib.GetCompoundDataNISTByName(nist_name)
    return np.array(
        [
            sum(
                fraction * xraylib.CS_Total(z, float(energy))
                for z, fraction in zip(compound["Elements"], compound["massFractions"])
            )
            for energy in energies_kev
        ]
    )


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like numpy.savez_compressed, but with fixed zip timestamps so the file is byte-reproducible."""
    with zipfile.ZipFile(path, "w") as archive:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, buffer.getvalue())


def generation_date() -> str:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    now = datetime.datetime.fromtimestamp(int(epoch), datetime.timezone.utc) if epoch else None
    return (now or datetime.datetime.now(datetime.timezone.utc)).date().isoformat()


def main() -> None:
    spectra = {name: spekpy_spectrum(kvp, al) for name, (kvp, al) in SPECTRA.items()}

    # Common grid: the highest-kVp spectrum's bins from MIN_ENERGY_KEV up; lower kVp are zero above their kVp.
    widest_kev, _ = max(spectra.values(), key=lambda spectrum: spectrum[0].size)
    energies_kev = widest_kev[widest_kev > MIN_ENERGY_KEV]  # (E,) keV, bin centres
    photon_fraction = np.zeros((len(SPECTRA), energies_kev.size))  # (S, E), rows sum to 1
    for row, (bin_kev, fluence) in enumerate(spectra.values()):
        index = np.searchsorted(energies_kev, bin_kev)
        inside = bin_kev > MIN_ENERGY_KEV
        assert np.allclose(energies_kev[index[inside]], bin_kev[inside]), "SpekPy bins off the common grid"
        photon_fraction[row, index[inside]] = fluence[inside]
        photon_fraction[row] /= photon_fraction[row].sum()

    mu_rho = np.stack([mass_attenuation(nist, energies_kev) for nist in MATERIALS.values()])  # (3, E) cm^2/g

    write_npz(
        OUTPUT_DIR / "tables.npz",
        {
            "energies_kev": energies_kev,
            "spectrum_names": np.array(list(SPECTRA)),
            "kvp": np.array([kvp for kvp, _ in SPECTRA.values()]),
            "filtration_mm_al": np.array([al for _, al in SPECTRA.values()]),
            "photon_fraction": photon_fraction,
            "materials": np.array(list(MATERIALS)),
            "mass_attenuation_cm2_g": mu_rho,
        },
    )

    mean_energy = photon_fraction @ energies_kev
    metadata = {
        "command": COMMAND,
        "generated_on": generation_date(),
        "libraries": {
            "spekpy": importlib.metadata.version("spekpy"),
            "xraylib": xraylib.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "energy_grid": {
            "unit": "keV",
            "bin_width_kev": BIN_WIDTH_KEV,
            "first_bin_center_kev": float(energies_kev[0]),
            "last_bin_center_kev": float(energies_kev[-1]),
            "n_bins": int(energies_kev.size),
        },
        "spectra": {
            name: {
                "kvp": kvp,
                "filtration_mm_al": al,
                "anode_angle_deg": ANODE_ANGLE_DEG,
                "target": "W",
                "model": "Spek(kvp=kvp, th=anode_angle_deg, dk=bin_width_kev).filter('Al', filtration_mm_al)",
                "photon_mean_energy_kev": round(float(mean), 3),
            }
            for (name, (kvp, al)), mean in zip(SPECTRA.items(), mean_energy)
        },
        "spectrum_units": "photon fluence per bin, negatives clipped to 0, normalised to sum 1",
        "materials": {
            name: {
                "nist_name": nist,
                "nominal_density_g_cm3": xraylib.GetCompoundDataNISTByName(nist)["density"],
            }
            for name, nist in MATERIALS.items()
        },
        "mass_attenuation_units": "cm^2/g, xraylib CS_Total (coherent included) summed by mass fraction",
        "arrays": {
            "energies_kev": "(E,) bin centres, keV",
            "spectrum_names": "(S,)",
            "kvp": "(S,) kV",
            "filtration_mm_al": "(S,) mm Al",
            "photon_fraction": "(S, E) sums to 1 per spectrum",
            "materials": "(M,) channel order of ct2x.physics.MATERIALS",
            "mass_attenuation_cm2_g": "(M, E) cm^2/g",
        },
    }
    (OUTPUT_DIR / "tables.json").write_text(json.dumps(metadata, indent=2) + "\n")

    for name, mean, fraction in zip(SPECTRA, mean_energy, photon_fraction):
        soft_tissue_20cm = -np.log(fraction @ np.exp(-mu_rho[1] * 20.0))  # 20 g/cm^2, photon counting
        print(f"{name}: photon-mean {mean:.2f} keV, -ln T through 20 cm soft tissue {soft_tissue_20cm:.3f}")


if __name__ == "__main__":
    main()
