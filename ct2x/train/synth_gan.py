"""CT2X-GAN's objective for CT -> X-ray networks (paper eqs. 8-12 and 16-19, `ct2x.nets.ct2x_gan_losses`): per batch
a generator-side step (E_CT, PAM, E_sty and G together) with the discriminator frozen, then a discriminator step with
the R1 penalty on its real samples (the DRRs, or the real films when `loss_config["real_samples"]` is "xray") every
`loss_config["r1_interval"]`-th step (1, every step, by default; StyleGAN2's lazy R1 is 16).

Adam at the paper's learning rate 0.0025 (the command line's default; here `config.learning_rate`) with
`config.betas`, StyleGAN2's (0, 0.99) by the command line's default: the paper names Adam and the rate but no betas,
and its networks are StyleGAN2's with equalised learning rates, for which these are StyleGAN2's values. The loss
weights and switches are `config.loss_config` (CT2XGANLossConfig fields over its defaults). LPIPS (eq. 8) is the
`lpips` package's AlexNet (`ct2x.metrics.lpips.alexnet_lpips`), built only when its weight `loss_config["lpips"]` is
above 0; it may also be passed in. Under torchrun the networks stay unwrapped (the losses call their methods, which
DistributedDataParallel does not see): they start from the first process's weights and every gradient is averaged
over the processes (`ct2x.train.distributed`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ct2x import __version__
from ct2x.data.preparation import prepared_settings
from ct2x.data.synth_dataset import SynthAugmentation, SynthDataset
from ct2x.models import ModelInfo
from ct2x.nets.ct2x_gan_losses import CT2XGANBatch, CT2XGANLoss, CT2XGANLossConfig, Perceptual, syntheses
from ct2x.train.config import TrainConfig, network_config
from ct2x.train.distributed import average_gradients, share_first_process_weights


class SynthGAN:
    """Adam optimisers, CT2X-GAN's losses and one training step for its generator side and pose discriminator."""

    wraps_in_ddp = False  # several processes average gradients here instead

    def __init__(self, generator: torch.nn.Module, discriminator: torch.nn.Module, config: TrainConfig,
                 lpips: Optional[Perceptual] = None):
        loss_config = CT2XGANLossConfig.from_dict({**CT2XGANLossConfig().to_dict(), **config.loss_config})
        if lpips is None:
            lpips = _no_lpips if loss_config.lpips == 0 else _alexnet_lpips(generator)
        self.generator, self.discriminator, self.config = generator, discriminator, config
        for network in (generator, discriminator):
            share_first_process_weights(network)
        self.loss = CT2XGANLoss(generator, discriminator, lpips, loss_config)
        self.generator_optimizer = torch.optim.Adam(generator.parameters(), config.learning_rate, config.betas)
        self.discriminator_optimizer = torch.optim.Adam(discriminator.parameters(), config.learning_rate,
                                                        config.betas)
        self.latest_r1 = float("nan")  # the last R1 penalty, logged on the lazy steps without one

    @staticmethod
    def uses_discriminator(config: TrainConfig) -> bool:
        """Always: CT2X-GAN's losses need the pose discriminator."""
        return True

    @classmethod
    def for_run(cls, generator: torch.nn.Module, discriminator: torch.nn.Module, config: TrainConfig) -> SynthGAN:
        """The objective the trainer uses for `config`."""
        return cls(generator, discriminator, config)

    @staticmethod
    def training_set(config: TrainConfig) -> SynthDataset:
        """The training split of `config.data` (a `prepare synth` folder), rendered anew on the fly when
        `config.augment`."""
        return SynthDataset(config.data, "train", seed=config.seed,
                            augmentation=SynthAugmentation() if config.augment else None)

    @staticmethod
    def validation_set(config: TrainConfig) -> SynthDataset:
        """The validation split of `config.data` at its stored poses, the CTs unmoved."""
        return SynthDataset(config.data, "val", seed=config.seed)

    def validation_error(self, generator: torch.nn.Module, batch: Dict[str, torch.Tensor],
                         device: torch.device) -> float:
        """Mean absolute difference between `generator`'s DRR-style synthesis and the DRR (eq. 8's MAE, films in
        [-1, 1]): how well it keeps the CT's anatomy at the batch's poses."""
        inputs = self.inputs(batch, device)
        return F.l1_loss(syntheses(generator, inputs)["drr_synthesis"].float(), inputs.drr.float()).item()

    def set_learning_rate(self, learning_rate: float) -> None:
        for optimizer in (self.generator_optimizer, self.discriminator_optimizer):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate

    def inputs(self, batch: Dict[str, torch.Tensor], device: torch.device) -> CT2XGANBatch:
        """The loss's batch (on `device`) from a SynthDataset batch."""
        mip = batch["mip"].to(device) if self.generator.config.pose_attention else None
        return CT2XGANBatch(batch["ct"].to(device), batch["label"].to(device), mip, batch["drr"].to(device),
                            batch["xray"].to(device))

    def step(self, batch: Dict[str, torch.Tensor], device: torch.device, done: int = 0) -> Dict[str, float]:
        """One generator-side and one discriminator update after `done` steps; the terms as floats, "g_..." and
        "d_..." ("d_r1" is the latest R1 penalty: a lazy step without one repeats the last, NaN before the first)."""
        inputs = self.inputs(batch, device)
        self.generator.train()
        self.discriminator.train()
        self.discriminator.requires_grad_(False)
        generator_terms = self.loss.generator_terms(inputs)
        self.generator_optimizer.zero_grad(set_to_none=True)
        generator_terms["total"].backward()
        average_gradients(self.generator)
        self.generator_optimizer.step()

        self.discriminator.requires_grad_(True)
        discriminator_terms = self.loss.discriminator_terms(inputs, with_r1=done % self.loss.config.r1_interval == 0)
        self.discriminator_optimizer.zero_grad(set_to_none=True)
        discriminator_terms["total"].backward()
        average_gradients(self.discriminator)
        self.discriminator_optimizer.step()
        if "r1" in discriminator_terms:
            self.latest_r1 = discriminator_terms["r1"].item()
        return {"d_r1": self.latest_r1,
                **{f"g_{name}": value.item() for name, value in generator_terms.items()},
                **{f"d_{name}": value.item() for name, value in discriminator_terms.items() if name != "r1"}}

    def sample_picture(self, batch: Dict[str, torch.Tensor], device: torch.device) -> np.ndarray:
        """uint8 films of the batch's first sample side by side: DRR | DRR-style synthesis | X-ray-style synthesis |
        the real film whose style it took (the generator in eval mode, as a model file runs)."""
        self.generator.eval()
        first = {name: value[:1] for name, value in batch.items() if isinstance(value, torch.Tensor)}
        films = self.loss.synthesize(self.inputs(first, device))
        row = [first["drr"], films["drr_synthesis"], films["xray_synthesis"], first["xray"]]
        sheet = torch.cat([film[0, 0].float().cpu() for film in row], dim=1)
        return ((sheet.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()

    def model_info(self, steps: int, cases: int) -> ModelInfo:
        """The model file's metadata (`ct2x.synthesize.model_conventions` of the folder's preparation) after `steps`
        steps on `cases` training samples."""
        from ct2x.data.prepare_synth import SynthPreparation
        from ct2x.synthesize import model_conventions

        config, recipe = self.config, self.config.recipe
        prepared = prepared_settings(config.data)
        return ModelInfo(
            kind=recipe["generator"], config=network_config(self.generator, config.generator_config),
            license="Apache-2.0", description=f"{config.model} trained by ct2x {__version__} for {steps} steps",
            training_data={"folder": str(Path(config.data).resolve()), "samples": cases,
                           "films": "DRRs at the stored poses and the folder's real films"},
            **model_conventions(SynthPreparation(**prepared)),
        )

    def optimizer_states(self) -> Dict[str, dict]:
        return {"generator_optimizer": self.generator_optimizer.state_dict(),
                "discriminator_optimizer": self.discriminator_optimizer.state_dict()}

    def load_optimizer_states(self, state: Dict[str, dict]) -> None:
        self.generator_optimizer.load_state_dict(state["generator_optimizer"])
        self.discriminator_optimizer.load_state_dict(state["discriminator_optimizer"])


def _no_lpips(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """LPIPS weighted 0: zero distances, so no pretrained network is needed."""
    return prediction.new_zeros(len(prediction))


def _alexnet_lpips(generator: torch.nn.Module) -> Perceptual:
    from ct2x.metrics.lpips import alexnet_lpips

    return alexnet_lpips(device=str(next(generator.parameters()).device))
