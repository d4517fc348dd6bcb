"""X2CT-GAN's objective for X-ray -> CT networks: per batch, a generator step with the discriminator frozen, then a
discriminator step (models.md §1.4). The discriminator is conditioned on both films, whichever films the generator
reads. Without a discriminator (gan_weight 0: X2CT-GAN without its GAN loss) a step is the generator's update alone."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ct2x import __version__
from ct2x.data.preparation import prepared_settings
from ct2x.data.recon_dataset import ReconAugmentation, ReconDataset
from ct2x.models import ModelInfo
from ct2x.nets.losses import (
    ReconLossWeights,
    lsgan_discriminator,
    lsgan_generator,
    projection_l1,
    voxel_mse,
)
from ct2x.nets.x2ct import conditional_input
from ct2x.train.config import TrainConfig, network_config


class ReconGAN:
    """Adam optimisers, losses and one training step for a film(s) -> volume generator and a 3-D discriminator
    (None when `config.gan_weight` is 0: no adversarial term, no discriminator step)."""

    wraps_in_ddp = True  # under torchrun the trainer wraps both networks in DistributedDataParallel

    def __init__(self, generator: torch.nn.Module, discriminator: Optional[torch.nn.Module], films: Sequence[str],
                 config: TrainConfig):
        if (discriminator is not None) != config.adversarial:
            raise ValueError(f"gan_weight={config.gan_weight} needs {'a' if config.adversarial else 'no'} "
                             "discriminator")
        self.generator, self.discriminator, self.films, self.config = generator, discriminator, tuple(films), config
        self.weights = ReconLossWeights(config.gan_weight, config.voxel_weight, config.projection_weight)
        self.generator_optimizer = torch.optim.Adam(generator.parameters(), config.learning_rate, config.betas)
        self.discriminator_optimizer = (None if discriminator is None else
                                        torch.optim.Adam(discriminator.parameters(), config.learning_rate,
                                                         config.betas))

    @staticmethod
    def uses_discriminator(config: TrainConfig) -> bool:
        """Whether the trainer builds a discriminator for `config`: unless gan_weight is 0."""
        return config.adversarial

    @classmethod
    def for_run(cls, generator: torch.nn.Module, discriminator: Optional[torch.nn.Module],
                config: TrainConfig) -> ReconGAN:
        """The objective the trainer uses for `config`'s recipe."""
        return cls(generator, discriminator, config.recipe["films"], config)

    @staticmethod
    def training_set(config: TrainConfig) -> ReconDataset:
        """The training split of `config.data`, re-rendered on the fly when `config.augment`."""
        return ReconDataset(config.data, "train", ReconAugmentation() if config.augment else None, seed=config.seed)

    @staticmethod
    def validation_set(config: TrainConfig) -> ReconDataset:
        """The validation split of `config.data` with its stored films."""
        return ReconDataset(config.data, "val", None, seed=config.seed)

    def validation_error(self, generator: torch.nn.Module, batch: Dict[str, torch.Tensor],
                         device: torch.device) -> float:
        """Mean absolute difference between the volume `generator` makes from the batch's films and the CT (both in
        the preparation's [0, 1] intensity units)."""
        predicted = generator(*(batch[name].to(device) for name in self.films))  # (N, 1, D, H, W)
        return F.l1_loss(predicted.float(), batch["ct"].to(device).float()).item()

    def set_learning_rate(self, learning_rate: float) -> None:
        for optimizer in self._optimizers():
            for group in optimizer.param_groups:
                group["lr"] = learning_rate

    def generate(self, batch: Dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
        """(N, 1, D, H, W) volumes from the batch's films."""
        return self.generator(*(batch[name].to(device) for name in self.films))

    def step(self, batch: Dict[str, torch.Tensor], device: torch.device, done: int = 0) -> Dict[str, float]:
        """One generator and one discriminator update (every step alike, whatever the `done` steps before); the loss
        terms as floats (without a discriminator: the generator's update alone, and no g_gan or d_total)."""
        pa, lateral, true = (batch[name].to(device) for name in ("pa", "lateral", "ct"))  # (N,1,P,P) x2, (N,1,D,H,W)
        self.generator.train()
        fake = self.generate(batch, device)
        voxel, projection = voxel_mse(fake, true), projection_l1(fake, true)
        if self.discriminator is None:
            generator_total = self.weights.voxel * voxel + self.weights.projection * projection
            self.generator_optimizer.zero_grad(set_to_none=True)
            generator_total.backward()
            self.generator_optimizer.step()
            return {"g_voxel": voxel.item(), "g_projection": projection.item(), "g_total": generator_total.item()}

        self.discriminator.train()
        judge = getattr(self.discriminator, "module", self.discriminator)  # frozen: no gradient sync across processes
        judge.requires_grad_(False)
        gan = lsgan_generator(judge(conditional_input(pa, lateral, fake)))
        generator_total = self.weights.gan * gan + self.weights.voxel * voxel + self.weights.projection * projection
        self.generator_optimizer.zero_grad(set_to_none=True)
        generator_total.backward()
        self.generator_optimizer.step()

        judge.requires_grad_(True)
        both = torch.cat([conditional_input(pa, lateral, true), conditional_input(pa, lateral, fake.detach())])
        real_scores, fake_scores = self.discriminator(both).chunk(2)  # one forward: per-sample norms, DDP-safe
        discriminator_total = self.weights.gan * lsgan_discriminator(real_scores, fake_scores)
        self.discriminator_optimizer.zero_grad(set_to_none=True)
        discriminator_total.backward()
        self.discriminator_optimizer.step()
        return {"g_gan": gan.item(), "g_voxel": voxel.item(), "g_projection": projection.item(),
                "g_total": generator_total.item(), "d_total": discriminator_total.item()}

    def sample_picture(self, batch: Dict[str, torch.Tensor], device: torch.device) -> np.ndarray:
        """uint8 mid slices of the batch's first case: true above, predicted below (each row coronal (D, W),
        sagittal (D, H), axial (H, W) side by side)."""
        predicted = self.generate(batch, device)[0, 0].float().cpu().clamp(0, 1).numpy()
        true = batch["ct"][0, 0].numpy()  # (D, H, W) in [0, 1]

        def mid_slices(volume: np.ndarray) -> np.ndarray:
            d, h, w = (n // 2 for n in volume.shape)
            return np.concatenate([volume[:, h, :], volume[:, :, w], volume[d, :, :]], axis=1)

        sheet = np.concatenate([mid_slices(true), mid_slices(predicted)], axis=0)
        return (sheet * 255).round().astype(np.uint8)

    def model_info(self, steps: int, cases: int) -> ModelInfo:
        """The model file's metadata after `steps` steps on `cases` training cases."""
        config, recipe = self.config, self.config.recipe
        prepared = prepared_settings(config.data)
        return ModelInfo(
            kind=recipe["generator"],
            config=network_config(getattr(self.generator, "module", self.generator), config.generator_config),
            license="Apache-2.0", description=f"{config.model} trained by ct2x {__version__} for {steps} steps",
            inputs={"films": list(recipe["films"]), "film_px": prepared["film_px"],
                    "convention": "ct2x.data.x2ct_convention"},
            outputs={"volume": "(N, 1, D, H, W), X2CT normalisation [0, 1] = HU -1024..1476",
                     "voxels": prepared["ct_voxels"], "field_of_view_mm": prepared["cube_mm"],
                     "voxel_mm": prepared["cube_mm"] / prepared["ct_voxels"],
                     "convention": "ct2x.data.x2ct_convention"},
            training_data={"folder": str(Path(config.data).resolve()), "cases": cases, "augmented": config.augment},
        )

    def optimizer_states(self) -> Dict[str, dict]:
        states = {"generator_optimizer": self.generator_optimizer.state_dict()}
        if self.discriminator_optimizer is not None:
            states["discriminator_optimizer"] = self.discriminator_optimizer.state_dict()
        return states

    def load_optimizer_states(self, state: Dict[str, dict]) -> None:
        self.generator_optimizer.load_state_dict(state["generator_optimizer"])
        if self.discriminator_optimizer is not None:
            self.discriminator_optimizer.load_state_dict(state["discriminator_optimizer"])

    def _optimizers(self):
        return [o for o in (self.generator_optimizer, self.discriminator_optimizer) if o is not None]
