"""Networks: X2CT-GAN's generators and conditional 3-D PatchGAN discriminator. Network files never read files."""

from .patch_discriminator import PatchDiscriminator3d, PatchDiscriminatorConfig
from .x2ct import (
    PRESETS,
    X2CTConfig,
    X2CTGenerator,
    X2CTOutputs,
    X2CTSingleViewGenerator,
    conditional_input,
)

__all__ = [
    "PRESETS",
    "PatchDiscriminator3d",
    "PatchDiscriminatorConfig",
    "X2CTConfig",
    "X2CTGenerator",
    "X2CTOutputs",
    "X2CTSingleViewGenerator",
    "conditional_input",
]
