"""Tests of ct2x.physics: HU -> materials, spectra tables, polychromatic transmission, quantum noise."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ct2x.errors import CT2XInputError
from ct2x.physics import (
    MATERIALS,
    SPECTRA,
    AttenuationTable,
    Spectrum,
    add_quantum_noise,
    attenuation_table,
    basis_densities,
    hu_to_density,
    load_spectrum,
    material_densities,
    material_fractions,
    monochromatic_transmission,
    transmission,
)
from ct2x.physics.spectra import TABLES_PATH

REPO_ROOT = Path(__file__).resolve().parents[1]
AIR, SOFT_TISSUE, BONE = range(3)


def area_density(air: float = 0.0, soft_tissue: float = 0.0, bone: float = 0.0) -> torch.Tensor:
    """(3, 1, 1) float64 area densities in g/cm^2."""
    return torch.tensor([air, soft_tissue, bone], dtype=torch.float64).view(3, 1, 1)


# --- materials ------------------------------------------------------------------------------------


def test_hu_to_density_matches_deepdrr_fit():
    hu = torch.tensor([-2000, -1000, -800, 0, 350, 1000], dtype=torch.int16)
    density = hu_to_density(hu)
    assert density.dtype == torch.float32
    expected = torch.tensor([0.0, 0.001, 0.2068, 1.03, 1.23601, 1.6186])
    torch.testing.assert_close(density, expected, atol=1e-4, rtol=0)


def test_fractions_are_one_hot_at_thresholds():
    hu = torch.tensor([-1000.0, -800.0, -799.9, 0.0, 350.0, 350.1, 2000.0])
    fractions = material_fractions(hu)
    assert fractions.shape == (3, 7)
    expected_material = torch.tensor([AIR, AIR, SOFT_TISSUE, SOFT_TISSUE, SOFT_TISSUE, BONE, BONE])
    torch.testing.assert_close(fractions, torch.nn.functional.one_hot(expected_material, 3).T.float())


def test_smooth_fractions_sum_to_one_and_pass_gradients():
    hu = torch.linspace(-1200.0, 1200.0, 97, requires_grad=True)
    fractions = material_fractions(hu, smooth=True, width_hu=50.0)
    torch.testing.assert_close(fractions.sum(0), torch.ones(97))
    assert (fractions >= 0).all()
    at_thresholds = material_fractions(torch.tensor([-800.0, 350.0]), smooth=True)
    torch.testing.assert_close(at_thresholds[1], torch.tensor([0.5, 0.5]))
    material_densities(hu, smooth=True)[BONE].sum().backward()
    near_bone_threshold = (hu.detach() - 350.0).abs() < 50.0
    assert (hu.grad[near_bone_threshold] > 0).all()
    with pytest.raises(CT2XInputError, match="width_hu"):
        material_fractions(hu, smooth=True, width_hu=0.0)


def test_material_densities_split_the_density():
    hu = torch.randint(-1024, 2000, (4, 5, 6)).float()
    densities = material_densities(hu)
    assert densities.shape == (3, 4, 5, 6)
    torch.testing.assert_close(densities.sum(0), hu_to_density(hu))
    assert (densities[BONE][hu <= 350] == 0).all() and (densities[AIR][hu > -800] == 0).all()


def test_material_densities_are_density_times_fractions_exactly():
    """The chunked selection (CPU, no gradients) gives bitwise the product of density and one-hot fractions."""
    hu = torch.cat([torch.linspace(-1100.0, 3000.0, 200_003), torch.tensor([-800.0, 350.0, -0.0, 0.0])])
    crop = hu[:-7].view(20, 100, 100)[2:19, 3:97, 1:90]  # a strided view, as a crop of a CT is
    for values in (hu, hu.double(), hu[:-7].view(8, -1)[:, :1000], crop):
        expected = hu_to_density(values) * material_fractions(values)
        assert torch.equal(material_densities(values), expected)
        assert torch.equal(material_densities(values, workers=3), expected)
    with_grad = hu[:10].clone().requires_grad_()
    material_densities(with_grad).sum().backward()
    torch.testing.assert_close(with_grad.grad, torch.autograd.grad(hu_to_density(with_grad).sum(), with_grad)[0])



def test_basis_densities_count_air_as_soft_tissue_and_bone():
    """Two channels: soft tissue + alpha * air and bone + beta * air, from the chunked selection (bitwise as the
    three materials combined) and under autograd alike."""
    hu = torch.cat([torch.linspace(-1100.0, 3000.0, 200_003), torch.tensor([-800.0, 350.0])]).view(5, -1)
    air, soft_tissue, bone = material_densities(hu)
    expected = torch.stack([soft_tissue + 0.9 * air, bone + 0.03 * air])
    for workers in (1, 3):
        basis = basis_densities(hu, (0.9, 0.03), workers=workers)
        assert basis.shape == (2, *hu.shape)
        torch.testing.assert_close(basis, expected, atol=0, rtol=2e-7)
    with_grad = hu[:, :10].clone().requires_grad_()
    basis = basis_densities(with_grad, (0.9, 0.03))
    torch.testing.assert_close(basis, expected[:, :, :10])
    basis.sum().backward()
    scale = torch.where(hu[:, :10] <= -800, 0.93, 1.0)  # d density / d HU is counted once per gram of air
    torch.testing.assert_close(with_grad.grad, scale * torch.autograd.grad(hu_to_density(with_grad).sum(),
                                                                           with_grad)[0])

# --- tables and spectra ---------------------------------------------------------------------------


@pytest.mark.parametrize("name, mean_kev", [("60kV", 37.5), ("90kV", 48.7), ("120kV", 57.5)])
def test_spectra_sum_to_one_with_reference_mean_energy(name, mean_kev):
    spectrum = load_spectrum(name)
    assert spectrum.name == name
    assert spectrum.photon_fraction.sum() == pytest.approx(1.0, abs=1e-12)
    assert (spectrum.photon_fraction > 0).all()  # empty bins dropped
    assert not spectrum.photon_fraction.flags.writeable
    assert spectrum.energies_kev.max() < spectrum.kvp
    assert spectrum.mass_attenuation_cm2_g.shape == (3, spectrum.energies_kev.size)
    assert spectrum.mean_energy_kev == pytest.approx(mean_kev, abs=1.0)


# xraylib mu/rho (cm^2/g) at 30 / 50 / 100 keV, from shared/reference/drr-physics.md section 3.
REFERENCE_MU_RHO = {
    "air": (0.354, 0.208, 0.154),
    "soft_tissue": (0.360, 0.222, 0.169),
    "bone": (1.280, 0.415, 0.186),
}


@pytest.mark.parametrize("material", MATERIALS)
def test_monochromatic_mu_rho_matches_xraylib(material):
    for energy_kev, expected in zip((30.0, 50.0, 100.0), REFERENCE_MU_RHO[material]):
        one_g_cm2 = area_density(**{material: 1.0})
        mu_rho = -torch.log(monochromatic_transmission(one_g_cm2, energy_kev)).item()
        assert mu_rho == pytest.approx(expected, rel=0.03), (material, energy_kev)


@pytest.mark.parametrize(
    "name, minus_log_t, mu_rho_soft_bone",
    [("60kV", 5.32, (0.318, 1.012)), ("90kV", 4.52, (0.258, 0.649)), ("120kV", 4.19, (0.233, 0.504))],
)
def test_20cm_soft_tissue_matches_reference(name, minus_log_t, mu_rho_soft_bone):
    spectrum = load_spectrum(name)
    averaged = spectrum.mass_attenuation_cm2_g[[SOFT_TISSUE, BONE]] @ spectrum.photon_fraction
    np.testing.assert_allclose(averaged, mu_rho_soft_bone, rtol=0.03)
    # 20 cm of soft tissue at 1.0 g/cm^3 = 20 g/cm^2, photon-counting detector as in the reference.
    through_20cm = transmission(area_density(soft_tissue=20.0), spectrum, energy_weighted=False)
    assert -torch.log(through_20cm).item() == pytest.approx(minus_log_t, rel=0.03)


def test_spectrum_aliases_and_unknown_name():
    assert load_spectrum("60KV_AL35") is load_spectrum("60kV")
    assert load_spectrum("90kv_al40") is load_spectrum("90KV")
    assert load_spectrum("120KV_AL43") is load_spectrum("120kV")
    with pytest.raises(CT2XInputError, match="60kV, 90kV, 120kV"):
        load_spectrum("80kV")


def test_tables_metadata_describes_tables():
    metadata = json.loads(TABLES_PATH.with_suffix(".json").read_text(encoding="utf-8"))
    assert TABLES_PATH.stat().st_size < 20_000
    assert metadata["command"] == "python scripts/make_physics_tables.py"
    assert set(metadata["libraries"]) >= {"spekpy", "xraylib"}
    assert list(metadata["materials"]) == list(MATERIALS)
    assert metadata["materials"]["bone"]["nist_name"] == "Bone, Cortical (ICRP)"
    assert list(metadata["spectra"]) == list(SPECTRA)
    for name in SPECTRA:
        spectrum, settings = load_spectrum(name), metadata["spectra"][name]
        assert (settings["kvp"], settings["filtration_mm_al"]) == (spectrum.kvp, spectrum.filtration_mm_al)
        assert settings["anode_angle_deg"] == 12.0


# --- transmission ---------------------------------------------------------------------------------


def test_transmission_shapes_dtypes_and_open_field():
    spectrum = load_spectrum("90kV")
    assert transmission(torch.zeros(2, 3, 4, 5), spectrum).shape == (2, 4, 5)
    torch.testing.assert_close(transmission(torch.zeros(3, 4, 5), spectrum), torch.ones(4, 5))
    densities = torch.rand(3, 8, 8, dtype=torch.float64) * torch.tensor([0.1, 30.0, 5.0]).view(3, 1, 1)
    full = transmission(densities, spectrum)
    assert full.dtype == torch.float64 and ((full > 0) & (full <= 1)).all()
    half = transmission(densities.half(), spectrum)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.double(), full, atol=2e-3, rtol=0)
    with pytest.raises(CT2XInputError, match="dimension -3"):
        transmission(torch.zeros(4, 4, 4), spectrum)
    with pytest.raises(CT2XInputError, match="float"):
        transmission(torch.zeros(3, 4, 4, dtype=torch.int32), spectrum)


def test_transmission_equals_direct_sum_over_chunks():
    spectrum = load_spectrum("120kV")
    densities = torch.rand(3, 40, 40, dtype=torch.float64) * torch.tensor([0.1, 30.0, 5.0]).view(3, 1, 1)
    mu = torch.tensor(spectrum.mass_attenuation_cm2_g)  # (3, E)
    weight = torch.tensor(spectrum.photon_fraction * spectrum.energies_kev)
    direct = torch.einsum("e,ehw->hw", weight, torch.exp(-torch.einsum("me,mhw->ehw", mu, densities)))
    torch.testing.assert_close(transmission(densities, spectrum), direct / weight.sum())


@pytest.mark.parametrize("name", SPECTRA)
@pytest.mark.parametrize("energy_weighted", [True, False])
def test_attenuation_table_matches_the_exact_spectrum_sum(name, energy_weighted):
    """Looked-up -ln(I / I_open) within 2e-4 (absolute; 0.02 % of the intensity) of the exact sum over energy
    bins, thin to thick and in between the table's nodes; outside the table (and for negative area densities) it is
    the exact sum."""
    spectrum = load_spectrum(name)
    table = AttenuationTable(spectrum, energy_weighted)
    rng = np.random.default_rng(3)
    scale = np.array([8.0, 64.0, 32.0])[:, None, None]  # air, soft tissue, bone up to the table's extents, g/cm^2
    inside = rng.uniform(0.0, 1.0, (3, 300, 300)) * scale * rng.choice([0.02, 0.2, 1.0], (1, 300, 300))
    inside = torch.from_numpy(inside)
    exact = -torch.log(transmission(inside, spectrum, energy_weighted))
    looked_up = table(inside.float())
    assert looked_up.dtype == torch.float32
    assert (looked_up.double() - exact).abs().max() < 2e-4
    outside = area_density(0.5, 90.0, 3.0).expand(3, 2, 2).clone()
    outside[:, 1, 1] = torch.tensor([0.1, -1e-3, 2.0])
    torch.testing.assert_close(table(outside), -torch.log(transmission(outside, spectrum, energy_weighted)),
                               atol=1e-6, rtol=0)  # float32 of the exact sum
    with pytest.raises(CT2XInputError, match=r"\(3, H, W\)"):
        table(torch.zeros(2, 3, 4, 4))


def test_attenuation_table_is_exact_at_its_nodes_up_to_its_edges():
    """At the table's nodes the lookup is the exact sum, on the air planes' last soft-tissue row and on the last air
    plane too, where a bilinear sample of the stacked planes meets the next plane pair's rows."""
    spectrum = load_spectrum("60kV")
    table = AttenuationTable(spectrum)
    rng = np.random.default_rng(4)
    air = rng.integers(0, 9, 400).astype(float)  # nodes: 1 g/cm^2 apart, 8 the last
    soft = np.where(rng.random(400) < 0.5, 360, rng.integers(0, 361, 400)) * 0.2  # half on the last row (72)
    bone = rng.integers(0, 801, 400) * 0.04
    nodes = torch.from_numpy(np.stack([air, soft - air, bone]).reshape(3, 20, 20)).clamp_min(0.0)  # (air, soft, bone)
    exact = -torch.log(transmission(nodes, spectrum))
    assert (table(nodes.float()).double() - exact).abs().max() < 2e-5



@pytest.mark.parametrize("name", SPECTRA)
@pytest.mark.parametrize("energy_weighted", [True, False])
def test_air_counted_in_the_soft_tissue_bone_basis_attenuates_as_air(name, energy_weighted):
    """`AttenuationTable.basis` of (soft tissue + alpha air, bone + beta air) within 3e-4 of the exact sum over the
    three materials (up to a chest's 3.5 g/cm^2 of air, 44 of soft tissue, 10.5 of bone), while leaving air out
    (alpha = beta = 0) errs by up to 0.3. Outside the table it is the exact sum of the basis without air."""
    spectrum = load_spectrum(name)
    table = AttenuationTable(spectrum, energy_weighted)
    rng = np.random.default_rng(5)
    scale = np.array([3.5, 44.0, 10.5])[:, None, None]  # air, soft tissue, bone, g/cm^2
    materials = torch.from_numpy(rng.uniform(0.0, 1.0, (3, 100, 100)) * scale)  # (3, H, W) float64
    exact = -torch.log(transmission(materials, spectrum, energy_weighted))
    alpha, beta = table.air_basis
    basis = torch.stack([materials[1] + alpha * materials[0], materials[2] + beta * materials[0]])  # (2, H, W)
    looked_up = table.basis(basis.float())
    assert looked_up.dtype == torch.float32 and looked_up.shape == (100, 100)
    assert (looked_up.double() - exact).abs().max() < 3e-4
    assert (table.basis(materials[1:].float()).double() - exact).abs().max() > 0.3
    outside = torch.tensor([[[80.0, 1.0]], [[2.0, -1e-3]]])  # past the soft-tissue nodes; negative bone
    with_no_air = torch.cat([torch.zeros(1, 1, 2), outside]).double()
    torch.testing.assert_close(table.basis(outside), -torch.log(transmission(with_no_air, spectrum,
                                                                             energy_weighted)).float())
    with pytest.raises(CT2XInputError, match=r"\(2, H, W\)"):
        table.basis(materials)

def test_attenuation_table_is_built_once_per_spectrum_and_detector():
    spectrum = load_spectrum("60kV")
    assert attenuation_table(spectrum) is attenuation_table(spectrum)
    assert attenuation_table(spectrum, False) is not attenuation_table(spectrum)


def test_single_bin_spectrum_is_monochromatic():
    table = load_spectrum("120kV")
    bin_index = int(np.argmin(np.abs(table.energies_kev - 50.0)))
    one_bin = Spectrum(
        name="mono",
        kvp=120.0,
        filtration_mm_al=0.0,
        energies_kev=table.energies_kev[[bin_index]],
        photon_fraction=np.ones(1),
        mass_attenuation_cm2_g=table.mass_attenuation_cm2_g[:, [bin_index]],
    )
    densities = torch.rand(3, 5, 5, dtype=torch.float64) * 10.0
    expected = monochromatic_transmission(densities, float(table.energies_kev[bin_index]))
    torch.testing.assert_close(transmission(densities, one_bin), expected)
    with pytest.raises(CT2XInputError, match="energy_kev"):
        monochromatic_transmission(densities, 150.0)


def test_more_bone_is_darker_and_beam_hardens():
    spectrum = load_spectrum("60kV")
    bone = torch.tensor([0.0, 0.5, 1.0, 2.0, 4.0], dtype=torch.float64)
    densities = torch.stack([torch.zeros(5), torch.full((5,), 10.0), bone]).view(3, 1, 5).double()
    behind_bone = transmission(densities, spectrum)
    assert (behind_bone.diff(dim=-1) < 0).all()

    soft_tissue = torch.tensor([1.0, 5.0, 10.0, 20.0, 40.0], dtype=torch.float64)  # g/cm^2
    densities = torch.stack([torch.zeros(5), soft_tissue, torch.zeros(5)]).view(3, 1, 5).double()
    for energy_weighted in (False, True):
        effective_mu_rho = -torch.log(transmission(densities, spectrum, energy_weighted)) / soft_tissue
        assert (effective_mu_rho.diff(dim=-1) < 0).all()
    # An energy-integrating detector weights the penetrating high-energy photons more.
    photon_counting = transmission(densities, spectrum, energy_weighted=False)
    assert (transmission(densities, spectrum) > photon_counting).all()


def test_transmission_gradcheck():
    densities = torch.rand(1, 3, 2, 2, dtype=torch.float64) * torch.tensor([0.1, 20.0, 3.0]).view(1, 3, 1, 1)
    densities.requires_grad_()
    spectrum = load_spectrum("60kV")
    assert torch.autograd.gradcheck(lambda area: transmission(area, spectrum), (densities,))
    assert torch.autograd.gradcheck(lambda area: transmission(area, spectrum, False), (densities,))


# --- noise ----------------------------------------------------------------------------------------


def test_noise_is_reproducible_with_a_seed():
    clean = torch.full((64, 64), 0.2)
    first = add_quantum_noise(clean, 1000.0, seed=7)
    assert first.shape == clean.shape
    torch.testing.assert_close(first, add_quantum_noise(clean, 1000.0, seed=7), rtol=0, atol=0)
    torch.testing.assert_close(
        first, add_quantum_noise(clean, 1000.0, generator=torch.Generator().manual_seed(7)), rtol=0, atol=0
    )
    assert not torch.equal(first, add_quantum_noise(clean, 1000.0, seed=8))


@pytest.mark.parametrize("gaussian_approximation", [False, True])
def test_noise_mean_and_variance(gaussian_approximation):
    clean, photons, n = 0.3, 1000.0, 200_000
    clean_image = torch.full((n,), clean, dtype=torch.float64)
    noisy = add_quantum_noise(clean_image, photons, seed=1, gaussian_approximation=gaussian_approximation)
    variance = clean / photons
    assert abs(noisy.mean().item() - clean) < 5 * math.sqrt(variance / n)
    assert noisy.var().item() == pytest.approx(variance, rel=0.03)  # sample variance: 0.3 % standard error


def test_noise_keeps_log_finite_and_checks_photons():
    noisy = add_quantum_noise(torch.tensor([0.0, 1e-9, 1.0]), 100.0, seed=0)
    assert torch.isfinite(-torch.log(noisy)).all() and noisy.min() >= 0.5 / 100.0
    transmitted = torch.full((8,), 0.5, requires_grad=True)
    add_quantum_noise(transmitted, 100.0, seed=0, gaussian_approximation=True).sum().backward()
    assert (transmitted.grad != 0).all()
    for bad in (0.0, -5.0, float("nan"), float("inf"), "many"):
        with pytest.raises(CT2XInputError, match="photons_per_pixel"):
            add_quantum_noise(torch.ones(2), bad)
    with pytest.raises(CT2XInputError, match="seed or generator"):
        add_quantum_noise(torch.ones(2), 10.0, seed=1, generator=torch.Generator())


# --- packaging ------------------------------------------------------------------------------------


def test_runtime_does_not_import_table_generators():
    code = (
        "import sys, torch, ct2x.physics as physics\n"
        "physics.transmission(torch.zeros(3, 2, 2), physics.load_spectrum('90kV'))\n"
        "print(sorted({'spekpy', 'xraylib', 'scipy'} & set(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"
