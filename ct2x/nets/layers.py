"""Building blocks of the X2CT-GAN networks: conv-norm-ReLU units, DenseNet layers, 2-D to 3-D lifting.

Every instance norm uses each sample's own statistics, in training and in evaluation alike (affine=False,
track_running_stats=False), as the official X2CT-GAN test script does. Convolutions pad with zeros.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def instance_norm(dims: int, channels: int) -> nn.Module:
    """Per-sample, per-channel normalisation without learned scale or running statistics, in 2-D or 3-D.

    3-D uses `InstanceNorm3d` below (the same function, 2.5 times faster on CPU). 2-D keeps nn.InstanceNorm2d: its
    maps are small, and the dense encoder amplifies float32 rounding (swapping its norms too moves the biplanar
    generator's output by 1e-4 relative L2, as much as running it on 1 instead of 2 threads does).
    """
    if dims == 3:
        return InstanceNorm3d(channels)
    return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)


class InstanceNorm3d(nn.Module):
    """nn.InstanceNorm3d(channels, affine=False, track_running_stats=False) computed by group_norm with one group per
    channel: the same statistics (biased variance, eps inside the square root) in one fused pass, 65 instead of
    160 ms for a (1, 16, 128, 128, 128) volume on one core. No parameters or buffers: state dicts are unchanged."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features, self.eps = num_features, eps

    def forward(self, volume: Tensor) -> Tensor:
        return F.group_norm(volume, self.num_features, eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def init_official(network: nn.Module) -> None:
    """X2CT-GAN's initialisation: convolution and linear weights N(0, 0.02), biases 0. Nothing to do for a network
    built on the meta device (shapes only, its weights to come from a file)."""
    for module in network.modules():
        if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose3d, nn.Linear)) and not module.weight.is_meta:
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

    def forward(self, volume: Tensor) -> Tensor:
        if volume.device.type != "cpu":
            return super().forward(volume)
        # On CPU oneDNN's transposed convolution is 4 times faster in channels_last_3d, with the same sums (bitwise
        # equal output): 82 instead of 325 ms for 16 -> 16 channels, 64^3 -> 128^3, on one core.
        volume = self.conv(volume.contiguous(memory_format=torch.channels_last_3d))
        return self.relu(self.norm(channels_first(volume)))


def channels_first(volume: Tensor) -> Tensor:
    """(N, C, D, H, W) in the ordinary contiguous layout. A channels_last_3d volume is moved by one 2-D transpose per
    sample, torch's blocked one: 85 ms for (1, 16, 128, 128, 128) where .contiguous() takes 200 ms."""
    if volume.is_contiguous() or torch.is_grad_enabled() or \
            not volume.is_contiguous(memory_format=torch.channels_last_3d):
        return volume.contiguous()
    channels = volume.shape[1]
    result = torch.empty(volume.shape, dtype=volume.dtype, device=volume.device)  # contiguous
    for sample, target in zip(volume.permute(0, 2, 3, 4, 1), result):  # (D, H, W, C) contiguous -> (C, D, H, W)
        target.view(channels, -1).copy_(sample.reshape(-1, channels).t())
    return result


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
        return self.lift(features).volume()  # (N, c, S, rows, columns)

    def lift(self, features: Tensor) -> Lifted:
        """The lifted volume as a `Lifted`: its three distinct planes, computed in 2-D (3 ms instead of 380 + 150 ms
        for the 3-D convolution and norm at 128^3 on one core); `.volume()` builds the volume itself."""
        features = self.reduce(features)  # (N, c, rows, columns)
        size = features.shape[-1]  # >= 2: the coarsest skip is S / 16, S >= 64
        planes = lifted_conv(self.refine.conv, features.unsqueeze(2).expand(-1, -1, 3, -1, -1), size)
        return Lifted(self.refine.relu(lifted_instance_norm(planes, size, self.refine.norm.eps)), size)


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

    def compress_with(self, volume: Tensor, skip: Lifted) -> Tensor:
        """compress_input(torch.cat([volume, skip.volume()], dim=1)) without building the skip's volume or the
        concatenation: the convolution is linear in its input channels, so the skip's part is added on its own, and
        along the lifted axis that part has only 5 distinct planes (2-D convolutions of the skip's 3 planes)."""
        conv = self.compress.conv
        if not plain_3x3x3(conv):
            return self.compress_input(torch.cat([volume, skip.volume()], dim=1))
        split = volume.shape[1]
        out = F.conv3d(volume, conv.weight[:, :split], conv.bias, padding=1)  # (N, channels, S, S, S)
        add_lifted_conv(out, skip, conv.weight[:, split:])
        return self.compress.relu(self.compress.norm(out))

    def refine(self, volume: Tensor) -> Tensor:
        """(N, channels, S, S, S) -> (N, up_channels, 2S, 2S, 2S), or (N, channels, S, S, S) without up-convolution."""
        volume = self.blocks(volume)
        return volume if self.up is None else self.up(volume)

    def forward(self, volume: Tensor) -> Tensor:
        return self.refine(self.compress_input(volume))


class Lifted(NamedTuple):
    """A Connection-B volume (N, C, size, rows, columns) held as its distinct planes along the lifted (first spatial)
    axis: `planes` (N, C, 3, rows, columns) = the first, every inner one (all equal: a 2-D map copied), the last."""

    planes: Tensor
    size: int

    def volume(self) -> Tensor:
        first, inner, last = self.planes.split(1, dim=2)
        return torch.cat([first, inner.expand(-1, -1, self.size - 2, -1, -1), last], dim=2)

    def plane(self, index: int) -> int:
        """Which plane (0 first, 1 inner, 2 last) plane `index` of the volume is; -1 outside it (zero padding)."""
        return -1 if not 0 <= index < self.size else 0 if index == 0 else 2 if index == self.size - 1 else 1


def plain_3x3x3(conv: nn.Conv3d) -> bool:
    return conv.kernel_size == (3, 3, 3) and conv.padding == (1, 1, 1) and conv.stride == (1, 1, 1) and \
        conv.dilation == (1, 1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"


def tap_responses(planes: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """(N, 3 planes, 3 taps, out, rows, columns): each of a Lifted's 3 planes (N, in, 3, rows, columns) through each
    depth tap of a 3 x 3 x 3 kernel `weight` (out, in, 3, 3, 3), in one batched 2-D convolution."""
    n, channels, _, rows, columns = planes.shape
    batch = planes.transpose(1, 2).reshape(n * 3, channels, rows, columns)  # plane-major
    taps = weight.permute(2, 0, 1, 3, 4).reshape(-1, channels, *weight.shape[3:])  # (3 taps x out, in, 3, 3)
    bias = None if bias is None else bias.repeat(3)
    return F.conv2d(batch, taps, bias, padding=1).view(n, 3, 3, weight.shape[0], rows, columns)


def add_lifted_conv(out: Tensor, skip: Lifted, weight: Tensor) -> None:
    """out += conv3d(skip.volume(), weight, padding=1) for a 3 x 3 x 3 kernel `weight` (out, in, 3, 3, 3), in place on
    `out` (N, out, size, rows, columns, the skip's layout; a view is fine), without building the skip's volume: along
    the lifted axis the convolution has only 5 distinct planes (2-D convolutions of the skip's 3 planes)."""
    responses = tap_responses(skip.planes, weight).to(out.dtype)  # (N, 3 planes, 3 taps, out, rows, columns)
    size = skip.size
    for plane in sorted({0, 1, size - 2, size - 1} & set(range(size))):  # planes next to the padding
        reads = [(skip.plane(plane + tap - 1), tap) for tap in range(3)]
        out[:, :, plane] += sum(responses[:, source, tap] for source, tap in reads if source >= 0)
    if size > 4:  # every inner plane reads the inner map through all three taps
        out[:, :, 2:size - 2] += responses[:, 1].sum(dim=1).unsqueeze(2)


def lifted_conv(conv: nn.Conv3d, planes: Tensor, size: int) -> Tensor:
    """The planes (N, out, 3, rows, columns) of conv(Lifted(planes 3 x the 2-D map, size).volume()) for a 3 x 3 x 3
    conv with padding 1 (LiftToVolume's): along the lifted axis every tap reads the same map, except on the first and
    last planes, where one tap reads the zero padding."""
    responses = tap_responses(planes, conv.weight)  # (N, 3, 3 taps, out, rows, columns); the 3 planes are equal
    first, middle, last = responses[:, 0].unbind(1)
    bias = 0 if conv.bias is None else conv.bias.view(1, -1, 1, 1)
    return torch.stack([middle + last + bias, first + middle + last + bias, first + middle + bias], dim=2)


def lifted_instance_norm(planes: Tensor, size: int, eps: float) -> Tensor:
    """instance_norm of Lifted(planes, size).volume(), on the planes: statistics of the whole volume (the inner plane
    counted size - 2 times) in float64, biased variance, eps inside the square root."""
    values = planes.double()
    counts = values.new_tensor([1.0, size - 2.0, 1.0]).view(1, 1, 3, 1, 1)
    total = size * planes.shape[3] * planes.shape[4]
    mean = (values * counts).sum(dim=(2, 3, 4), keepdim=True) / total
    variance = ((values - mean) ** 2 * counts).sum(dim=(2, 3, 4), keepdim=True) / total
    return ((values - mean) / torch.sqrt(variance + eps)).to(planes.dtype)
