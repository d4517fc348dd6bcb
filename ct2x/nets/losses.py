"""Losses of X-ray -> CT training (X2CT-GAN's, models.md §1.4): least-squares GAN, voxel MSE, projection L1.

Volumes are (N, 1, D, H, W) in X2CT's [0, 1] normalisation; discriminator outputs are patch maps of any shape.
The generator's objective is `weights.gan * lsgan_generator + weights.voxel * voxel_mse + weights.projection *
projection_l1` (0.1, 10, 10 in X2CT-GAN's code); the discriminator's is `weights.gan * lsgan_discriminator` (the code
has no factor 1/2, unlike the paper).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

VOLUME_AXES = (2, 3, 4)  # D, H, W of (N, C, D, H, W)


@dataclass(frozen=True)
class ReconLossWeights:
    """Weights of the loss terms (X2CT-GAN's defaults)."""

    gan: float = 0.1
    voxel: float = 10.0
    projection: float = 10.0


def lsgan_generator(fake_scores: torch.Tensor) -> torch.Tensor:
    """The generator wants the discriminator to score its volumes as real: mean (D(fake) - 1)^2."""
    return F.mse_loss(fake_scores, torch.ones_like(fake_scores))


def lsgan_discriminator(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    """Real volumes scored 1, generated ones 0: mean (D(real) - 1)^2 + mean D(fake)^2."""
    return (F.mse_loss(real_scores, torch.ones_like(real_scores))
            + F.mse_loss(fake_scores, torch.zeros_like(fake_scores)))


def voxel_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every voxel."""
    return F.mse_loss(prediction, target)


def projection_l1(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over D, H and W of the L1 distance between the volumes' mean-|value| projections along that axis.

    Parallel axis means of |v|, as X2CT-GAN's code computes them (not DRRs).
    """
    return torch.stack([F.l1_loss(prediction.abs().mean(dim=axis), target.abs().mean(dim=axis))
                        for axis in VOLUME_AXES]).mean()
