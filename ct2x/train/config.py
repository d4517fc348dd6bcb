"""One training run's settings, saved with the run as `config.json`; every hyper-parameter lives here.

The trainer knows networks only by kind and configuration (built through `ct2x.models.architectures`); `RECIPES`
names the networks and the objective of each model the command line can train. The objective (a "module:class"
string) builds its own training set, sample pictures and model-file metadata (`ct2x.train.recon_gan.ReconGAN` for
X-ray -> CT, `ct2x.train.synth_gan.SynthGAN` for CT2X-GAN).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from ct2x.errors import CT2XInputError

CONFIG_FILE = "config.json"  # a run folder's settings
X2CT_CONFIGS = {"generator_config": "ct2x.nets.x2ct:X2CTConfig",
                "discriminator_config": "ct2x.nets.patch_discriminator:PatchDiscriminatorConfig"}
RECON_GAN = "ct2x.train.recon_gan:ReconGAN"
RECIPES: Dict[str, Dict[str, Any]] = {  # model name -> what to train (the objective's "module:class", generator,
    # discriminator, films, and the "module:class" of each network's configuration, see `network_configs`)
    "x2ct": {"objective": RECON_GAN, "generator": "x2ct-biplanar", "discriminator": "patch-discriminator-3d",
             "films": ("pa", "lateral"), **X2CT_CONFIGS},
    "x2ct-single": {"objective": RECON_GAN, "generator": "x2ct-single", "discriminator": "patch-discriminator-3d",
                    "films": ("pa",), **X2CT_CONFIGS},
    "cvaa": {"objective": RECON_GAN, "generator": "cvaa-biplanar", "discriminator": "cvaa-discriminator-3d",
             "films": ("pa", "lateral"), "generator_config": "ct2x.nets.cvaa:CVAAConfig",
             "discriminator_config": "ct2x.nets.cvaa:CVAADiscriminatorConfig"},
    "ct2x-gan": {"objective": "ct2x.train.synth_gan:SynthGAN", "generator": "ct2x-gan",
                 "discriminator": "ct2x-gan-discriminator", "films": (),
                 "generator_config": "ct2x.nets.ct2x_gan:CT2XGANConfig",
                 "discriminator_config": "ct2x.nets.ct2x_gan_discriminator:PoseDiscriminatorConfig",
                 "loss_config": "ct2x.nets.ct2x_gan_losses:CT2XGANLossConfig"},
}


@dataclass(frozen=True)
class TrainConfig:
    """Settings of a run. Steps count generator updates (one batch each); lengths of time are in steps."""

    model: str = "x2ct"  # a RECIPES name
    data: str = ""  # folder made by `ct2x prepare recon` (or `prepare synth` for ct2x-gan)
    generator_config: Dict[str, Any] = field(default_factory=dict)  # constructor keywords ({} = the full network)
    discriminator_config: Dict[str, Any] = field(default_factory=dict)
    loss_config: Dict[str, Any] = field(default_factory=dict)  # ct2x-gan: CT2XGANLossConfig fields over its defaults
    steps: int = 1000  # total generator updates
    decay_steps: int = 500  # the learning rate falls linearly to 0 over the last `decay_steps` (X2CT: half)
    batch_size: int = 1  # per process
    learning_rate: float = 2e-4  # Adam, generator and discriminator (X2CT-GAN's)
    betas: Tuple[float, float] = (0.5, 0.99)
    # X-ray -> CT loss weights (X2CT-GAN's): LSGAN (0: no discriminator, X2CT-CNN-style) ... (ct2x-gan: loss_config)
    gan_weight: float = 0.1
    voxel_weight: float = 10.0  # ... voxel MSE ...
    projection_weight: float = 10.0  # ... projection L1
    augment: bool = True  # re-render films on the fly (the defaults of ct2x.data.recon_dataset.ReconAugmentation or,
    # for ct2x-gan, ct2x.data.synth_dataset.SynthAugmentation)
    seed: int = 0
    workers: int = 0  # data-loading processes per training process
    mixed_precision: bool = True  # bfloat16 autocast on CUDA (ignored on CPU)
    log_every: int = 10
    sample_every: int = 100  # PNG of the objective's sample picture
    checkpoint_every: int = 200
    # Exponential moving average of the generator's weights (StyleGAN2's G_ema; 0 = none): after every step
    # ema = ema_decay * ema + (1 - ema_decay) * weights; the model file then holds the average.
    ema_decay: float = 0.0
    # Every this many steps (0 = never) the generator (its average with ema_decay) is scored on the data folder's
    # validation split, and the best so far is kept as best_model.safetensors beside the last.
    validate_every: int = 0

    def __post_init__(self) -> None:
        if self.model not in RECIPES:
            raise CT2XInputError(f"model {self.model!r} is unknown; choose one of {', '.join(RECIPES)}")
        for name in ("steps", "batch_size", "log_every", "sample_every", "checkpoint_every"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise CT2XInputError(f"{name}={getattr(self, name)!r}: must be a whole number, at least 1")
        if not (isinstance(self.validate_every, int) and self.validate_every >= 0):
            raise CT2XInputError(f"validate_every={self.validate_every!r}: must be a whole number, 0 (never) or more")
        if not 0 <= self.decay_steps <= self.steps:
            raise CT2XInputError(f"decay_steps={self.decay_steps}: must lie between 0 and steps ({self.steps})")
        if not 0 <= self.ema_decay < 1:
            raise CT2XInputError(f"ema_decay={self.ema_decay!r}: must lie in [0, 1) (0: no average)")
        if not self.learning_rate > 0:
            raise CT2XInputError(f"learning_rate={self.learning_rate}: must be positive")
        for name in ("gan_weight", "voxel_weight", "projection_weight"):
            if not getattr(self, name) >= 0:
                raise CT2XInputError(f"{name}={getattr(self, name)!r}: must be 0 or more")

    @property
    def adversarial(self) -> bool:
        """Whether the run trains a discriminator (gan_weight > 0); without one the generator learns from the voxel
        and projection losses alone."""
        return self.gan_weight > 0

    @property
    def recipe(self) -> Dict[str, Any]:
        return RECIPES[self.model]

    def learning_rate_at(self, step: int) -> float:
        """Constant, then linear decay to 0 over the last `decay_steps` (step counted from 0)."""
        constant = self.steps - self.decay_steps
        return self.learning_rate * (1.0 if step < constant else 1.0 - (step - constant) / (self.decay_steps + 1))

    def to_dict(self) -> Dict[str, Any]:
        return {key: list(value) if isinstance(value, tuple) else value
                for key, value in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise CT2XInputError(f"training configuration: unknown settings {unknown}; known: {sorted(names)}")
        values = {key: tuple(value) if key == "betas" else value for key, value in data.items()}
        return cls(**values)

    @property
    def objective_class(self) -> Any:
        """The class of the recipe's objective."""
        return named_class(self.recipe["objective"])

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path, overrides: Optional[Dict[str, Any]] = None) -> TrainConfig:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise CT2XInputError(f"{path}: not a readable training configuration ({error})") from None
        return cls.from_dict({**data, **(overrides or {})})


def network_configs(model: str, input_size: int, width: Optional[float] = None,
                    depth: float = 0.5) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """The generator's and discriminator's configurations (JSON values) of the X-ray -> CT RECIPES `model` for films
    and volumes of `input_size`: the full networks, or with `width` scaled ones (`scaled(input_size, width, depth)`
    for the generator, the discriminator's base_channels times `width`)."""
    generator, discriminator = (named_class(RECIPES[model][key]) for key in ("generator_config",
                                                                                "discriminator_config"))
    if width is None:
        return generator(input_size=input_size).to_dict(), discriminator().to_dict()
    narrow = max(1, round(discriminator().base_channels * width))
    return (generator.scaled(input_size=input_size, width=width, depth=depth).to_dict(),
            discriminator(base_channels=narrow).to_dict())


def network_config(network: Any, given: Dict[str, Any]) -> Dict[str, Any]:
    """The network's full constructor configuration where it can tell it (`config.to_dict()`), else `given`."""
    config = getattr(network, "config", None)
    return config.to_dict() if hasattr(config, "to_dict") else dict(given)


def named_class(name: str) -> Any:
    """The class a "module:class" string names (its module imported now)."""
    module, _, attribute = name.partition(":")
    return getattr(importlib.import_module(module), attribute)
