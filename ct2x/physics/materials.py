"""CT numbers (HU) -> mass density and air / soft tissue / bone decomposition, as in DeepDRR.

The projector integrates the three channels of `material_densities` (g/cm^3) along each ray. A line integral
of them in mm, divided by 10, is the area density A_m in g/cm^2 that `ct2x.physics.transmission` expects.
`basis_densities` gives two channels instead, air counted as soft tissue and bone (`AttenuationTable.air_basis`).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Tuple

import torch
from torch import Tensor

from ct2x.errors import CT2XInputError

MATERIALS = ("air", "soft_tissue", "bone")  # channel order everywhere
AIR_MAX_HU = -800.0  # air: HU <= -800
SOFT_TISSUE_MAX_HU = 350.0  # soft tissue: -800 < HU <= 350; bone: HU > 350
_CHUNK_VOXELS = 1 << 16  # voxels material_densities converts at once on the CPU: temporaries stay in cache


def _as_float(hu: Tensor) -> Tensor:
    hu = torch.as_tensor(hu)
    return hu if hu.is_floating_point() else hu.to(torch.float32)


def hu_to_density(hu: Tensor) -> Tensor:
    """Mass density in g/cm^3 from HU: DeepDRR's two linear fits meeting at HU 0, clipped at 0.

    -1000 HU -> 0.001, 0 HU -> 1.03, 1000 HU -> 1.619 g/cm^3. Same shape as ``hu``; integer HU give float32.
    """
    hu = _as_float(hu)
    return torch.clamp(torch.minimum(0.001029 * hu + 1.030, 0.0005886 * hu + 1.03), min=0.0)


def material_fractions(hu: Tensor, smooth: bool = False, width_hu: float = 50.0) -> Tensor:
    """Fractions of air, soft tissue and bone per voxel, shape (3, *hu.shape), summing to 1.

    ``smooth=False``: one-hot by the thresholds (air <= -800 < soft tissue <= 350 < bone HU).
    ``smooth=True``: logistic ramps centred on the thresholds whose tangent rises from 0 to 1 over
    ``width_hu`` (12 % -> 88 % across the width), so gradients reach the HU values.
    """
    hu = _as_float(hu)
    if smooth:
        if not width_hu > 0:
            raise CT2XInputError(f"width_hu={width_hu}: the ramp width must be > 0 HU (e.g. 50).")
        above_air = torch.sigmoid((hu - AIR_MAX_HU) * (4.0 / width_hu))
        above_soft_tissue = torch.sigmoid((hu - SOFT_TISSUE_MAX_HU) * (4.0 / width_hu))
    else:
        above_air = (hu > AIR_MAX_HU).to(hu.dtype)
        above_soft_tissue = (hu > SOFT_TISSUE_MAX_HU).to(hu.dtype)
    return torch.stack([1.0 - above_air, above_air - above_soft_tissue, above_soft_tissue])


def material_densities(hu: Tensor, smooth: bool = False, width_hu: float = 50.0, workers: int = 1) -> Tensor:
    """Partial densities of air, soft tissue and bone in g/cm^3, shape (3, *hu.shape).

    density(HU) * fractions(HU): the channels the projector integrates. A line integral in mm / 10 = g/cm^2.
    `hu` may be a strided view (a crop): it is read a block of its first axis at a time, never copied whole.
    `workers` > 1 shares the blocks out to that many threads (CPU).
    """
    hu = _as_float(hu)
    if smooth or (torch.is_grad_enabled() and hu.requires_grad):
        return hu_to_density(hu) * material_fractions(hu, smooth=smooth, width_hu=width_hu)
    return _in_blocks(hu, len(MATERIALS), _densities_into, workers)


def basis_densities(hu: Tensor, air_basis: Tuple[float, float], workers: int = 1) -> Tensor:
    """Densities in the soft tissue + bone basis, g/cm^3, shape (2, *hu.shape): air counted as `air_basis`
    (alpha, beta) = so much soft tissue and bone per gram (`AttenuationTable.air_basis`).

    Two channels to project instead of `material_densities`' three, for an attenuation within about 3e-4 of theirs.
    Read in blocks like `material_densities`; one-hot materials.
    """
    alpha, beta = air_basis
    hu = _as_float(hu)
    if torch.is_grad_enabled() and hu.requires_grad:
        air, soft_tissue, bone = hu_to_density(hu) * material_fractions(hu)
        return torch.stack([soft_tissue + alpha * air, bone + beta * air])

    def convert(block: Tensor, out: Tensor) -> None:  # (N,) HU -> (2, N) g/cm^3
        density = hu_to_density(block)
        air, bone = block <= AIR_MAX_HU, block > SOFT_TISSUE_MAX_HU
        torch.where(air, density * alpha, torch.where(bone, 0.0, density), out=out[0])
        torch.where(air, density * beta, torch.where(bone, density, 0.0), out=out[1])

    return _in_blocks(hu, 2, convert, workers)


def _in_blocks(hu: Tensor, channels: int, convert: Callable[[Tensor, Tensor], None], workers: int) -> Tensor:
    """(channels, *hu.shape) from `convert(flat HU (N,), out (channels, N))`, a cache-sized piece at a time: for a
    CT, one pass over memory where whole-volume temporaries would each be one (half the time)."""
    out = torch.empty((channels,) + tuple(hu.shape), dtype=hu.dtype, device=hu.device)
    if hu.device.type != "cpu" or hu.dim() == 0:
        convert(hu.reshape(-1), out.view(channels, -1))
        return out
    rows = max(1, _CHUNK_VOXELS // max(hu[0].numel(), 1))  # of the first axis per block

    def convert_block(first: int) -> None:
        block = hu[first:first + rows].reshape(-1)  # copied here only if `hu` is a strided view
        target = out[:, first:first + rows].view(channels, -1)
        for start in range(0, block.numel(), _CHUNK_VOXELS):
            convert(block[start:start + _CHUNK_VOXELS], target[:, start:start + _CHUNK_VOXELS])

    blocks = range(0, hu.shape[0], rows)
    if workers > 1:
        with ThreadPoolExecutor(workers, thread_name_prefix="ct2x-densities") as pool:
            list(pool.map(convert_block, blocks))
    else:
        list(map(convert_block, blocks))
    return out


def _densities_into(hu: Tensor, out: Tensor) -> None:
    """Flat HU (N,) -> out (3, N): the densities of air, soft tissue and bone, by thresholds."""
    zero = torch.zeros((), dtype=hu.dtype, device=hu.device)
    density = hu_to_density(hu)
    air, bone = hu <= AIR_MAX_HU, hu > SOFT_TISSUE_MAX_HU
    torch.where(air, density, zero, out=out[0])
    torch.where(air | bone, zero, density, out=out[1])
    torch.where(bone, density, zero, out=out[2])
