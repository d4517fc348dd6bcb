"""CT2X-GAN's pose-aware discriminator: a film and its camera label -> one raw score per film.

The paper says only that the discriminator is conditioned on the camera pose, with DRRs at that pose as its real
samples (eq. 17). Ours: StyleGAN2's residual discriminator (equalised learning rate, average-pool downsampling, no
minibatch-standard-deviation layer) with projection conditioning as in EG3D: the image features at 4 x 4 end in a
vector that is dotted with an embedding of the camera label, so that a film scores high only together with its pose.

Films are (N, 1, S, S), nominally in [-1, 1]; labels (N, 25) as `ct2x.nets.ct2x_gan` describes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import torch.nn.functional as F
from torch import Tensor, nn

from ct2x.nets.config import JSONConfig, check_int
from ct2x.nets.ct2x_gan import LABEL_SIZE, check_image, mlp, scaled_label
from ct2x.nets.ct2x_gan_layers import FIRST_RESOLUTION, EqualConv2d, EqualLinear, resolution_channels, resolutions


@dataclasses.dataclass(frozen=True)
class PoseDiscriminatorConfig(JSONConfig):
    """Shape of the pose-aware discriminator (all ours but the image size)."""

    image_size: int = 256  # the paper's: film edge, px (a power of 2, >= 8)
    channel_base: int = 16384  # StyleGAN2's: min(channel_max, channel_base / r) channels at r x r
    channel_max: int = 512  # StyleGAN2's
    label_hidden: int = 256  # width of the camera-label MLP (two layers)
    embedding_dim: int = 512  # length of the vectors whose dot product is the score
    label_translation_mm: float = 530.0  # the label's translation is divided by this, as in the generator

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_int(owner, "image_size", self.image_size, 2 * FIRST_RESOLUTION)
        if self.image_size & (self.image_size - 1):
            raise ValueError(f"{owner}.image_size must be a power of 2, got {self.image_size}")
        for name in ("channel_base", "channel_max", "label_hidden", "embedding_dim"):
            check_int(owner, name, getattr(self, name), 1)
        if isinstance(self.label_translation_mm, bool) or not isinstance(self.label_translation_mm, (int, float)) \
                or not 0 < self.label_translation_mm < math.inf:
            raise ValueError(f"{owner}.label_translation_mm must be a positive number, got "
                             f"{self.label_translation_mm!r}")

    @classmethod
    def scaled(cls, image_size: int = 64, width: float = 0.25) -> PoseDiscriminatorConfig:
        """The default design at `image_size`, every width times `width` (at least 1)."""
        full = cls()

        def narrow(channels: int) -> int:
            return max(1, round(channels * width))

        return cls(image_size=image_size, channel_base=narrow(full.channel_base),
                   channel_max=narrow(full.channel_max), label_hidden=narrow(full.label_hidden),
                   embedding_dim=narrow(full.embedding_dim))


class DiscriminatorBlock(nn.Module):
    """(N, in, r, r) -> (N, out, r/2, r/2): two 3x3 convolutions and a 2x average pool, plus a pooled 1x1 shortcut,
    summed and divided by sqrt(2) (StyleGAN2's residual block)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv0 = EqualConv2d(in_channels, in_channels, 3, activate=True)
        self.conv1 = EqualConv2d(in_channels, out_channels, 3, activate=True)
        self.shortcut = EqualConv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        residual = F.avg_pool2d(self.conv1(self.conv0(x)), 2)  # (N, out, r/2, r/2)
        return (self.shortcut(F.avg_pool2d(x, 2)) + residual) / math.sqrt(2.0)


class PoseDiscriminator(nn.Module):
    """(N, 1, S, S) films and (N, 25) camera labels -> raw scores (N,): higher means "a DRR at this pose" (or "a real
    film", given zero labels, when trained with the real films as its real samples)."""

    def __init__(self, config: Optional[PoseDiscriminatorConfig] = None) -> None:
        super().__init__()
        self.config = config = config or PoseDiscriminatorConfig()
        sizes = resolutions(config.image_size)[::-1]  # S, S/2, ..., 4
        channels = [resolution_channels(r, config.channel_base, config.channel_max) for r in sizes]
        self.from_image = EqualConv2d(1, channels[0], 1, activate=True)
        self.blocks = nn.Sequential(*(DiscriminatorBlock(channels[i], channels[i + 1]) for i in range(len(sizes) - 1)))
        last = channels[-1]
        self.conv = EqualConv2d(last, last, 3, activate=True)
        self.fc = EqualLinear(last * FIRST_RESOLUTION**2, last, activate=True)
        self.out = EqualLinear(last, config.embedding_dim)
        self.label = mlp(LABEL_SIZE, config.label_hidden, config.embedding_dim)

    def forward(self, image: Tensor, label: Tensor) -> Tensor:
        check_image("discriminator input", image, self.config.image_size)
        if label.shape[0] != image.shape[0]:
            raise ValueError(f"{label.shape[0]} camera labels for {image.shape[0]} films")
        x = self.blocks(self.from_image(image))  # (N, C_4, 4, 4)
        features = self.out(self.fc(self.conv(x).flatten(1)))  # (N, embedding_dim)
        embedding = self.label(scaled_label(label, self.config.label_translation_mm))  # (N, embedding_dim)
        return (features * embedding).sum(dim=1) / math.sqrt(self.config.embedding_dim)  # (N,)


def build_discriminator(**config: Any) -> PoseDiscriminator:
    """The pose-aware discriminator from JSON keyword arguments (`PoseDiscriminatorConfig.to_dict()`)."""
    return PoseDiscriminator(PoseDiscriminatorConfig.from_dict(config))
