"""Polychromatic attenuation from a precomputed table, instead of an exponential per energy bin per pixel.

-ln(I / I_open) behind the area densities of `MATERIALS` is a smooth function of them, so `AttenuationTable` tabulates
it once per spectrum on a regular grid and interpolates trilinearly: within 2e-4 of `transmission`'s exact spectrum
sum at 60 kV (less at 90 and 120 kV; tests/test_physics.py), about a tenth of its cost per image. The axes are air,
soft tissue + air and bone: air attenuates almost like soft tissue (mu/rho within 7 %), so at a fixed sum the share
of air changes the attenuation so little that 1 g/cm^2 steps along it suffice. Pixels outside the table (or with a
negative area density) get the exact sum.

`AttenuationTable.basis` looks up two channels instead of three: air counted as so much soft tissue and bone
(`air_basis`, a two-material basis as in dual-energy imaging, Alvarez & Macovski 1976), so that a projector integrates
two channels of `basis_densities`, not three. Within about 3e-4 of the three-material attenuation on a chest's paths.
"""

from __future__ import annotations

import functools
from typing import Dict, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ct2x.errors import CT2XInputError
from ct2x.physics.spectra import Spectrum, _check_area_density, transmission

# Grid steps and extents, g/cm^2, along (air, soft tissue + air, bone). The real chest CT reaches about 3.5, 44 and
# 10.5 g/cm^2 at 0-90 deg; the table covers 8, 72 and 32 (9 x 361 x 801 float32, 10 MB, built in about 50 ms).
STEPS_G_CM2 = (1.0, 0.2, 0.04)
EXTENTS_G_CM2 = (8.0, 72.0, 32.0)
#: Soft tissue and bone, g/cm^2, behind which the spectrum weighs the energies `air_basis` is fitted over: about the
#: middle of a body's paths. Fitted to the open beam instead, the basis errs twice as much at a chest's thickest paths.
BASIS_FIT_BEHIND_G_CM2 = (10.0, 1.0)


class AttenuationTable:
    """-ln(I / I_open) behind (air, soft tissue, bone) area densities, looked up; see the module docstring."""

    def __init__(self, spectrum: Spectrum, energy_weighted: bool = True):
        self.spectrum = spectrum
        self.energy_weighted = energy_weighted
        weight = spectrum.photon_fraction * (spectrum.energies_kev if energy_weighted else 1.0)  # (E,)
        mu_air, mu_soft, mu_bone = spectrum.mass_attenuation_cm2_g  # (E,) each, cm^2/g
        nodes = [np.linspace(0.0, extent, int(round(extent / step)) + 1)
                 for step, extent in zip(STEPS_G_CM2, EXTENTS_G_CM2)]  # g/cm^2 per axis
        # exp(-mu_a A_a - mu_s A_s - mu_b A_b) = exp(-(mu_a - mu_s) A_a) exp(-mu_s (A_s + A_a)) exp(-mu_b A_b): the
        # sum over energies for every node is one matrix product per air node.
        air = torch.from_numpy(np.exp(-np.outer(nodes[0], mu_air - mu_soft)))  # (A, E)
        soft = torch.from_numpy(np.exp(-np.outer(nodes[1], mu_soft)) * (weight / weight.sum()))  # (S, E)
        bone = torch.from_numpy(np.exp(-np.outer(nodes[2], mu_bone)))  # (B, E)
        intensity = torch.stack([(soft * row) @ bone.T for row in air])  # (A, S, B) float64
        table = -torch.log(intensity).float()  # (A, S, B)
        self.shape = tuple(table.shape)
        # Trilinear interpolation as two 2-D bilinear samples, in the air planes below and above, blended: torch's
        # 2-D `grid_sample` is vectorised on the CPU, its 3-D one is not (2.4 -> 1.1 ms per 256^2 film). The planes
        # lie one below the other, row a * (S + 1) + s holding table[a, s]; each is closed by a copy of its last
        # soft-tissue row: float32 rounding of a row coordinate can land a hair past a plane's last row (1e-4 rows).
        closed = torch.cat([table, table[:, -1:]], 1)  # (A, S + 1, B)
        self._planes = closed.reshape(1, 1, -1, table.shape[2])  # (1, 1, A (S + 1), B)
        # (air, soft tissue, bone) g/cm^2 -> nodes along (bone, soft tissue + air, air)
        self._to_nodes = torch.tensor([[0.0, 0.0, 1.0 / STEPS_G_CM2[2]],
                                       [1.0 / STEPS_G_CM2[1], 1.0 / STEPS_G_CM2[1], 0.0],
                                       [1.0 / STEPS_G_CM2[0], 0.0, 0.0]])
        self._last_node = torch.tensor([[self.shape[2] - 1.0], [self.shape[1] - 1.0], [self.shape[0] - 1.0]])
        self._on_device: Dict[Tuple[str, int], Tensor] = {}
        # Air's mass attenuation as alpha * soft tissue's + beta * bone's: least squares over the energies, each
        # weighted by its share of the beam behind BASIS_FIT_BEHIND_G_CM2.
        behind = weight * np.exp(-mu_soft * BASIS_FIT_BEHIND_G_CM2[0] - mu_bone * BASIS_FIT_BEHIND_G_CM2[1])  # (E,)
        root = np.sqrt(behind / behind.sum())
        alpha, beta = np.linalg.lstsq(np.stack([mu_soft, mu_bone], 1) * root[:, None], mu_air * root, rcond=None)[0]
        self.air_basis = (float(alpha), float(beta))  # g of soft tissue and of bone that act as 1 g of air

    def __call__(self, area_density_g_cm2: Tensor) -> Tensor:
        """(3, H, W) g/cm^2 of air, soft tissue, bone -> (H, W) attenuation -ln(I / I_open), same dtype."""
        _check_area_density(area_density_g_cm2)
        if area_density_g_cm2.dim() != 3:
            raise CT2XInputError(f"area_density_g_cm2 has shape {tuple(area_density_g_cm2.shape)}: pass (3, H, W).")
        device = area_density_g_cm2.device
        flat = area_density_g_cm2.float().reshape(3, -1)  # (3, HW)
        nodes = self._on(self._to_nodes, device) @ flat  # (3, HW): bone, soft tissue + air, air in nodes
        outside = (flat.amin(0) < 0) | ((nodes - self._on(self._last_node, device)).amax(0) > 0)  # (HW,)
        bone, soft, air = nodes
        below = air.floor().clamp_(0, self.shape[0] - 2)  # the air plane below
        plane = below + torch.tensor([[0.0], [1.0]], device=device)  # (2, HW): below and above
        lower, upper = self._sample(bone, plane * (self.shape[1] + 1) + soft)  # (HW,) each
        result = torch.lerp(lower, upper, air - below)
        return self._exact_outside(result, area_density_g_cm2.reshape(3, -1), outside).view(
            area_density_g_cm2.shape[1:]).to(area_density_g_cm2.dtype)

    def basis(self, basis_g_cm2: Tensor) -> Tensor:
        """(2, H, W) g/cm^2 of soft tissue and bone with air counted in them (`basis_densities`, projected) -> (H, W)
        attenuation -ln(I / I_open), same dtype: the table's plane of no air, one bilinear sample per pixel."""
        if not (isinstance(basis_g_cm2, Tensor) and basis_g_cm2.dim() == 3 and basis_g_cm2.shape[0] == 2
                and basis_g_cm2.is_floating_point()):
            raise CT2XInputError(f"basis_g_cm2 {getattr(basis_g_cm2, 'shape', type(basis_g_cm2))}: pass a float "
                                 "tensor (2, H, W) of soft tissue and bone in g/cm^2")
        flat = basis_g_cm2.float().reshape(2, -1)  # (2, HW)
        soft, bone = flat[0] / STEPS_G_CM2[1], flat[1] / STEPS_G_CM2[2]  # (HW,) nodes
        outside = (flat.amin(0) < 0) | (soft > self.shape[1] - 1) | (bone > self.shape[2] - 1)  # (HW,)
        result = self._sample(bone, soft[None])[0]
        with_air = torch.cat([torch.zeros_like(basis_g_cm2[:1]), basis_g_cm2]).reshape(3, -1)  # (3, HW), no air
        return self._exact_outside(result, with_air, outside).view(basis_g_cm2.shape[1:]).to(basis_g_cm2.dtype)

    def _sample(self, bone: Tensor, rows: Tensor) -> Tensor:
        """Bilinear samples of the stacked planes: (N,) bone nodes and (P, N) rows -> (P, N)."""
        planes = self._on(self._planes, rows.device)
        grid = torch.empty(1, *rows.shape, 2, device=rows.device)  # align_corners: -1, 1 = first, last node
        grid[0, :, :, 0] = bone * (2.0 / (self.shape[2] - 1)) - 1.0
        grid[0, :, :, 1] = rows * (2.0 / (planes.shape[2] - 1)) - 1.0
        return F.grid_sample(planes, grid, mode="bilinear", align_corners=True)[0, 0]

    def _exact_outside(self, result: Tensor, materials_g_cm2: Tensor, outside: Tensor) -> Tensor:
        """`result` (N,) with the exact spectrum sum where `outside` (N,), from (3, N) g/cm^2 of the materials."""
        if bool(outside.any()):
            exact = transmission(materials_g_cm2[:, outside][..., None], self.spectrum, self.energy_weighted)
            result[outside] = -torch.log(exact[:, 0].float())
        return result

    def _on(self, tensor: Tensor, device: torch.device) -> Tensor:
        """`tensor` on `device`, copied there once."""
        key = (str(device), id(tensor))
        if key not in self._on_device:
            self._on_device[key] = tensor.to(device)
        return self._on_device[key]


@functools.lru_cache(maxsize=8)
def attenuation_table(spectrum: Spectrum, energy_weighted: bool = True) -> AttenuationTable:
    """The `AttenuationTable` of a spectrum and detector type, built once per process."""
    return AttenuationTable(spectrum, energy_weighted)
