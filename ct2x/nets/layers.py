"""Building blocks of the X2CT-GAN networks: conv-norm-ReLU units, DenseNet layers, 2-D to 3-D lifting.

Every instance norm uses each sample's own statistics, in training and in evaluation alike (affine=False,
track_running_stats=False), as the official X2CT-GAN test script does. Convolutions pad with zeros.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn


def instance_norm(dims: int, channels: int) -> nn.Module:
    """Per-sample, per-channel normalisation without learned scale or running statistics, in 2-D or 3-D."""
    norm = nn.InstanceNorm2d if dims == 2 else nn.InstanceNorm3d
    return norm(channels, affine=False, track_running_stats=False)


def init_official(network: nn.Module) -> None:
    """X2CT-GAN's initialisation: convolution and linear weights N(0, 0.02), biases 0."""
    for module in network.modules():
        if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose3d, nn.Linear)):
            nn.init.normal_(module.weight, 0.0, 0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


class ConvNormReLU(nn.Sequential):
    """Conv (with bias) -> instance norm -> ReLU, in 2-D or 3-D."""

    def __init__(self, dims: int, in_channels: int, out_channels: int, kernel_size: int, padding: int = 0) -> None:
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        super().__init__(OrderedDict(
            conv=conv(in_channels, out_channels, kernel_size, padding=padding),
            norm=instance_norm(dims, out_channels),
            relu=nn.ReLU(inplace=True),
        ))


class NormReLUConv2d(nn.Sequential):
    """The dense encoder's pre-activation unit: instance norm -> ReLU -> Conv2d (with bias)."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0
    ) -> None:
        super().__init__(OrderedDict(
            norm=instance_norm(2, in_channels),
            relu=nn.ReLU(inplace=True),
            conv=nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding),
        ))


class UpConvNormReLU3d(nn.Sequential):
    """Doubles each spatial size: ConvTranspose3d (kernel 3, stride 2, padding 1, output padding 1) -> norm -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(OrderedDict(
            conv=nn.ConvTranspose3d(in_channels, out_channels, 3, stride=2, padding=1, output_padding=1),
            norm=instance_norm(3, out_channels),
            relu=nn.ReLU(inplace=True),
        ))


class DenseLayer2d(nn.Module):
    """DenseNet-BC layer: (N, C, H, W) -> (N, C + growth, H, W), its new features appended after its input."""

    def __init__(self, in_channels: int, bottleneck: int, growth: int) -> None:
        super().__init__()
        self.bottleneck = NormReLUConv2d(in_channels, bottleneck, 1)
        self.grow = NormReLUConv2d(bottleneck, growth, 3, padding=1)

    def forward(self, features: Tensor) -> Tensor:
        return torch.cat([features, self.grow(self.bottleneck(features))], dim=1)  # (N, C + growth, H, W)


class DenseStage2d(nn.Module):
    """One encoder resolution: a stride-2 conv halves H and W, dense layers add channels, an optional 1x1 conv
    halves the channels: (N, C, H, W) -> (N, out_channels, H / 2, W / 2)."""

    def __init__(self, in_channels: int, layers: int, growth: int, bottleneck: int, compress: bool) -> None:
        super().__init__()
        self.down = NormReLUConv2d(in_channels, in_channels, 3, stride=2, padding=1)
        self.dense = nn.Sequential(*(DenseLayer2d(in_channels + i * growth, bottleneck, growth) for i in range(layers)))
        dense_channels = in_channels + layers * growth
        self.out_channels = dense_channels // 2 if compress else dense_channels
        self.compress = NormReLUConv2d(dense_channels, self.out_channels, 1) if compress else None

    def forward(self, features: Tensor) -> Tensor:
        features = self.dense(self.down(features))  # (N, dense channels, H / 2, W / 2)
        return features if self.compress is None else self.compress(features)


class LiftToVolume(nn.Module):
    """Connection-B: a square 2-D feature (N, C, S, S) -> a 3-D feature (N, c, S, S, S), copied along a new first
    spatial axis (the film's projection direction) between a 1x1 Conv2d and a 3x3x3 Conv3d."""

    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__()
        self.reduce = ConvNormReLU(2, in_channels, channels, 1)
        self.refine = ConvNormReLU(3, channels, channels, 3, padding=1)

    def forward(self, features: Tensor) -> Tensor:
        features = self.reduce(features)  # (N, c, rows, columns)
        size = features.shape[-1]
        return self.refine(features.unsqueeze(2).expand(-1, -1, size, -1, -1))  # (N, c, S, rows, columns)


class DecoderLevel3d(nn.Module):
    """One decoder resolution: an optional compressing Conv3d (in_channels -> channels), `blocks` Conv3d
    (channels -> channels), an optional up-convolution to `up_channels` at twice the size; all 3x3x3 + norm + ReLU."""

    def __init__(self, channels: int, blocks: int, in_channels: int = 0, up_channels: int = 0) -> None:
        super().__init__()
        self.compress = ConvNormReLU(3, in_channels, channels, 3, padding=1) if in_channels else None
        self.blocks = nn.Sequential(*(ConvNormReLU(3, channels, channels, 3, padding=1) for _ in range(blocks)))
        self.up = UpConvNormReLU3d(channels, up_channels) if up_channels else None

    def compress_input(self, volume: Tensor) -> Tensor:
        """(N, in_channels, S, S, S) -> (N, channels, S, S, S); unchanged at a level without compression."""
        return volume if self.compress is None else self.compress(volume)

    def refine(self, volume: Tensor) -> Tensor:
        """(N, channels, S, S, S) -> (N, up_channels, 2S, 2S, 2S), or (N, channels, S, S, S) without up-convolution."""
        volume = self.blocks(volume)
        return volume if self.up is None else self.up(volume)

    def forward(self, volume: Tensor) -> Tensor:
        return self.refine(self.compress_input(volume))
