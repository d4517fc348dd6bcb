"""StyleGAN2 building blocks for CT2X-GAN: equalised-learning-rate layers, the modulated convolution and the synthesis
network G (Karras et al., "Analyzing and Improving the Image Quality of StyleGAN", CVPR 2020), written from that paper.

Images are NCHW, one channel (films), nominally in [-1, 1]. Per-layer codes are (N, L, w_dim), L = 2 per resolution.

Equalised learning rate: weights are stored N(0, 1) and scaled by He's constant 1 / sqrt(fan_in) at run time, so that
Adam at CT2X-GAN's learning rate 0.0025 (StyleGAN2's default) moves every layer alike.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NEGATIVE_SLOPE = 0.2  # leaky ReLU slope throughout CT2X-GAN
ACTIVATION_GAIN = math.sqrt(2.0)  # StyleGAN2 multiplies leaky ReLU outputs by sqrt(2) to keep their variance
DEMODULATION_EPS = 1e-8
FIRST_RESOLUTION = 4  # G starts from a learned 4 x 4 constant


def leaky_relu(x: Tensor) -> Tensor:
    """StyleGAN2's activation: leaky ReLU (slope 0.2) times sqrt(2)."""
    return F.leaky_relu(x, NEGATIVE_SLOPE) * ACTIVATION_GAIN


class EqualLinear(nn.Module):
    """(N, ..., in_features) -> (N, ..., out_features) with equalised learning rate; optional StyleGAN2 activation."""

    def __init__(self, in_features: int, out_features: int, bias_init: float = 0.0, activate: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features))
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init)))
        self.scale = 1.0 / math.sqrt(in_features)
        self.activate = activate

    def forward(self, x: Tensor) -> Tensor:
        x = F.linear(x, self.weight * self.scale, self.bias)
        return leaky_relu(x) if self.activate else x

    def extra_repr(self) -> str:
        return f"{self.weight.shape[1]}, {self.weight.shape[0]}, activate={self.activate}"


class EqualConv2d(nn.Module):
    """(N, in, H, W) -> (N, out, H / stride, W / stride): a 'same'-padded Conv2d with equalised learning rate;
    optional StyleGAN2 activation."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, bias: bool = True,
        activate: bool = False,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.scale = 1.0 / math.sqrt(in_channels * kernel_size**2)
        self.stride, self.padding, self.activate = stride, kernel_size // 2, activate

    def forward(self, x: Tensor) -> Tensor:
        x = F.conv2d(x, self.weight * self.scale, self.bias, stride=self.stride, padding=self.padding)
        return leaky_relu(x) if self.activate else x

    def extra_repr(self) -> str:
        out_channels, in_channels, kernel, _ = self.weight.shape
        return f"{in_channels}, {out_channels}, kernel_size={kernel}, stride={self.stride}, activate={self.activate}"


class ModulatedConv2d(nn.Module):
    """StyleGAN2's modulated convolution: (N, in, H, W) and a code w (N, w_dim) -> (N, out, H', W').

    An affine map turns w into one scale per input channel (bias 1: identity at the start); the kernel is scaled by
    them and, with `demodulate`, each output channel's kernel is renormalised to unit L2 norm (StyleGAN2's
    replacement of AdaIN's instance normalisation). With `upsample` the input is first enlarged 2x bilinearly (our
    choice, simpler than StyleGAN2's transposed convolution with a FIR filter). Without bias or activation.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, w_dim: int, demodulate: bool = True,
        upsample: bool = False,
    ) -> None:
        super().__init__()
        self.affine = EqualLinear(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.scale = 1.0 / math.sqrt(in_channels * kernel_size**2)
        self.demodulate, self.upsample, self.padding = demodulate, upsample, kernel_size // 2

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        n, in_channels = x.shape[:2]
        styles = self.affine(w)  # (N, in)
        weight = self.weight[None] * self.scale * styles[:, None, :, None, None]  # (N, out, in, k, k)
        if self.demodulate:
            weight = weight * torch.rsqrt(weight.square().sum(dim=(2, 3, 4), keepdim=True) + DEMODULATION_EPS)
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)  # (N, in, 2H, 2W)
        height, width = x.shape[2:]
        # One grouped convolution: each sample is a group with its own kernel.
        x = F.conv2d(x.reshape(1, n * in_channels, height, width), weight.flatten(0, 1), padding=self.padding,
                     groups=n)  # (1, N * out, H', W')
        return x.view(n, -1, *x.shape[2:])  # (N, out, H', W')


class SynthesisLayer(nn.Module):
    """One synthesis layer: modulated 3x3 convolution (demodulated), bias, StyleGAN2 activation."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, upsample: bool = False) -> None:
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, out_channels, 3, w_dim, upsample=upsample)
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        return leaky_relu(self.conv(x, w) + self.bias[:, None, None])  # (N, out, H', W')


class ToImage(nn.Module):
    """(N, C, H, W) and w -> a one-channel image (N, 1, H, W): modulated 1x1 convolution, not demodulated, plus bias."""

    def __init__(self, in_channels: int, w_dim: int) -> None:
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, 1, 1, w_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        return self.conv(x, w) + self.bias[:, None, None]


class SynthesisBlock(nn.Module):
    """One resolution of G: two synthesis layers (the first doubles the size, except at 4 x 4) and its image output,
    added to the previous resolution's image enlarged 2x (StyleGAN2's skip architecture)."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, upsample: bool) -> None:
        super().__init__()
        self.conv0 = SynthesisLayer(in_channels, out_channels, w_dim, upsample=upsample)
        self.conv1 = SynthesisLayer(out_channels, out_channels, w_dim)
        self.to_image = ToImage(out_channels, w_dim)

    def forward(self, x: Tensor, image: Optional[Tensor], w0: Tensor, w1: Tensor) -> Tuple[Tensor, Tensor]:
        x = self.conv1(self.conv0(x, w0), w1)  # (N, out, r, r)
        layer_image = self.to_image(x, w1)  # (N, 1, r, r); the block's last code, as StyleGAN2's toRGB
        if image is not None:
            layer_image = layer_image + F.interpolate(image, scale_factor=2, mode="bilinear", align_corners=False)
        return x, layer_image


def resolutions(image_size: int) -> Tuple[int, ...]:
    """G's resolutions 4, 8, ..., image_size."""
    return tuple(FIRST_RESOLUTION * 2**i for i in range(int(math.log2(image_size // FIRST_RESOLUTION)) + 1))


def synthesis_layers(image_size: int) -> int:
    """G's number of synthesis layers, two per resolution: 14 at 256 x 256 (the paper's), 12 at 128, 8 at 32."""
    return 2 * len(resolutions(image_size))


def resolution_channels(resolution: int, channel_base: int, channel_max: int) -> int:
    """StyleGAN2's channel rule: min(channel_max, channel_base / resolution), at least 1."""
    return max(1, min(channel_max, channel_base // resolution))


class SynthesisNetwork(nn.Module):
    """G: per-layer codes (N, L, w_dim) -> image (N, 1, S, S), L = `synthesis_layers(S)` (layer l takes code l).

    A learned 4 x 4 constant is refined by two layers per resolution 4, 8, ..., S; no noise inputs (our choice: the
    same CT, pose and style give the same film).
    """

    def __init__(self, image_size: int, w_dim: int, channel_base: int, channel_max: int) -> None:
        super().__init__()
        channels = [resolution_channels(r, channel_base, channel_max) for r in resolutions(image_size)]
        self.layers = synthesis_layers(image_size)
        self.constant = nn.Parameter(torch.randn(channels[0], FIRST_RESOLUTION, FIRST_RESOLUTION))
        self.blocks = nn.ModuleList(
            SynthesisBlock(channels[max(0, i - 1)], out_channels, w_dim, upsample=i > 0)
            for i, out_channels in enumerate(channels)
        )

    def forward(self, ws: Tensor) -> Tensor:
        if ws.dim() != 3 or ws.shape[1] != self.layers:
            raise ValueError(f"synthesis codes must be (N, {self.layers}, w_dim), got {tuple(ws.shape)}")
        x = self.constant.expand(ws.shape[0], -1, -1, -1)  # (N, C_4, 4, 4)
        image: Optional[Tensor] = None
        for i, block in enumerate(self.blocks):
            x, image = block(x, image, ws[:, 2 * i], ws[:, 2 * i + 1])  # (N, C_r, r, r), (N, 1, r, r)
        return image  # (N, 1, S, S)
