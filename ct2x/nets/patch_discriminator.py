"""The conditional 3-D PatchGAN discriminator of X2CT-GAN (pix2pix's N-layer design in 3-D, instance norm).

Written from CT2X's specification of the official network (kylekma/X2CT, `basic3d`). Its input is
`ct2x.nets.x2ct.conditional_input(pa, lateral, volume)`.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Any, Optional

from torch import Tensor, nn

from ct2x.nets.config import JSONConfig, check_int
from ct2x.nets.layers import init_official, instance_norm

KERNEL_SIZE = 4
PADDING = 2
NEGATIVE_SLOPE = 0.2  # of the leaky ReLUs
MAX_WIDTH = 8  # hidden layers have at most 8 x base_channels


@dataclasses.dataclass(frozen=True)
class PatchDiscriminatorConfig(JSONConfig):
    """Shape of a 3-D PatchGAN; the defaults are X2CT-GAN's (11,055,169 parameters)."""

    in_channels: int = 3  # PA copies, lateral copies, volume
    base_channels: int = 64  # channels of the first layer, doubled per layer up to 8 x
    strided_layers: int = 3  # layers of stride 2; one of stride 1 follows, then the 1-channel output layer

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_int(owner, "in_channels", self.in_channels, 1)
        check_int(owner, "base_channels", self.base_channels, 1)
        check_int(owner, "strided_layers", self.strided_layers, 1)


class PatchDiscriminator3d(nn.Module):
    """(N, in_channels, D, H, W) -> patch logits (N, 1, D', H', W'): each edge n -> n // 2 + 1 per strided layer, then
    + 2 (128^3 -> 19^3). Conv3d kernel 4, padding 2; hidden layers instance-normed, without bias."""

    def __init__(self, config: Optional[PatchDiscriminatorConfig] = None) -> None:
        super().__init__()
        self.config = config = config or PatchDiscriminatorConfig()
        widths = [config.base_channels * min(2**layer, MAX_WIDTH) for layer in range(config.strided_layers + 1)]
        blocks = [nn.Sequential(OrderedDict(
            conv=nn.Conv3d(config.in_channels, widths[0], KERNEL_SIZE, stride=2, padding=PADDING),
            relu=nn.LeakyReLU(NEGATIVE_SLOPE, inplace=True),
        ))]
        for layer in range(1, config.strided_layers + 1):
            stride = 2 if layer < config.strided_layers else 1
            conv = nn.Conv3d(widths[layer - 1], widths[layer], KERNEL_SIZE, stride=stride, padding=PADDING, bias=False)
            blocks.append(nn.Sequential(OrderedDict(
                conv=conv,
                norm=instance_norm(3, widths[layer]),
                relu=nn.LeakyReLU(NEGATIVE_SLOPE, inplace=True),
            )))
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Conv3d(widths[-1], 1, KERNEL_SIZE, padding=PADDING)
        init_official(self)

    def forward(self, volume: Tensor) -> Tensor:
        if volume.dim() != 5 or volume.shape[1] != self.config.in_channels:
            raise ValueError(f"discriminator input must be (N, {self.config.in_channels}, D, H, W), "
                             f"got {tuple(volume.shape)}")
        return self.head(self.blocks(volume))  # (N, 1, D', H', W') raw logits


def build_patch_discriminator(**config: Any) -> PatchDiscriminator3d:
    """The 3-D PatchGAN from JSON keyword arguments (`PatchDiscriminatorConfig.to_dict()`), for model files."""
    return PatchDiscriminator3d(PatchDiscriminatorConfig.from_dict(config))
