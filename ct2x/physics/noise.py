"""Quantum (photon shot) noise on a transmission image."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ct2x.errors import CT2XInputError

MIN_PHOTONS = 0.5  # a pixel never records fewer photons, so that -ln(transmission) stays finite


def add_quantum_noise(
    transmission: Tensor,
    photons_per_pixel: float,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    gaussian_approximation: bool = False,
) -> Tensor:
    """Noisy transmission N / photons, N ~ Poisson(photons * transmission), same shape as ``transmission``.

    photons_per_pixel: photons reaching an open-field pixel (DeepDRR's default is 1e4). Counts are clipped
    below at 0.5 photon. ``seed`` draws from a fresh CPU generator (the same noise on any device);
    ``generator`` draws from the caller's generator on its device; with neither, torch's global RNG is used.
    Poisson samples carry no gradient; ``gaussian_approximation=True`` returns T + sqrt(T / photons) * eps,
    eps ~ N(0, 1), which does (its standard deviation uses at least 0.5 photon).
    """
    if not (isinstance(transmission, Tensor) and transmission.is_floating_point()):
        raise CT2XInputError("transmission must be a float tensor of I/I_open values in [0, 1].")
    try:
        photons = float(photons_per_pixel)
    except (TypeError, ValueError):
        photons = math.nan
    if not 0 < photons < math.inf:
        raise CT2XInputError(
            f"photons_per_pixel={photons_per_pixel!r}: pass a finite photon count > 0 (e.g. 1e4)."
        )
    if seed is not None and generator is not None:
        raise CT2XInputError("add_quantum_noise: pass either seed or generator, not both.")
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
    sample_device = generator.device if generator is not None else transmission.device

    expected = transmission.clamp(min=0.0) * photons  # (...) mean photon counts
    if gaussian_approximation:
        eps = torch.randn(expected.shape, generator=generator, device=sample_device, dtype=expected.dtype)
        counts = expected + expected.clamp(min=MIN_PHOTONS).sqrt() * eps.to(expected.device)
    else:
        counts = torch.poisson(expected.detach().to(sample_device), generator=generator).to(expected.device)
    return counts.clamp(min=MIN_PHOTONS) / photons
