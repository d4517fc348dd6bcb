"""X2CT-GAN's objective for X-ray -> CT networks: per batch, a generator step with the discriminator frozen, then a
discriminator step (models.md §1.4). The discriminator is conditioned on both films, whichever films the generator
reads. Without a discriminator (gan_weight 0: X2CT-GAN without its GAN loss) a step is the generator's update alone."""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

from ct2x.nets.losses import (
    ReconLossWeights,
    lsgan_discriminator,
    lsgan_generator,
    projection_l1,
    voxel_mse,
)
from ct2x.nets.x2ct import conditional_input
from ct2x.train.config import TrainConfig


class ReconGAN:
    """Adam optimisers, losses and one training step for a film(s) -> volume generator and a 3-D discriminator
    (None when `config.gan_weight` is 0: no adversarial term, no discriminator step)."""

    def __init__(self, generator: torch.nn.Module, discriminator: Optional[torch.nn.Module], films: Sequence[str],
                 config: TrainConfig):
        if (discriminator is not None) != config.adversarial:
            raise ValueError(f"gan_weight={config.gan_weight} needs {'a' if config.adversarial else 'no'} "
                             "discriminator")
        self.generator, self.discriminator, self.films = generator, discriminator, tuple(films)
        self.weights = ReconLossWeights(config.gan_weight, config.voxel_weight, config.projection_weight)
        self.generator_optimizer = torch.optim.Adam(generator.parameters(), config.learning_rate, config.betas)
        self.discriminator_optimizer = (None if discriminator is None else
                                        torch.optim.Adam(discriminator.parameters(), config.learning_rate,
                                                         config.betas))

    def set_learning_rate(self, learning_rate: float) -> None:
        for optimizer in self._optimizers():
            for group in optimizer.param_groups:
                group["lr"] = learning_rate

    def generate(self, batch: Dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
        """(N, 1, D, H, W) volumes from the batch's films."""
        return self.generator(*(batch[name].to(device) for name in self.films))

    def step(self, batch: Dict[str, torch.Tensor], device: torch.device) -> Dict[str, float]:
        """One generator and one discriminator update; the loss terms as floats (without a discriminator: the
        generator's update alone, and no g_gan or d_total)."""
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
