"""The generator's fast inference paths (ct2x/nets/layers.py, bench/RESULTS.md) compute the plain layers' function:
each is compared with the straightforward torch computation it replaces, on random weights and inputs."""

from __future__ import annotations

from typing import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ct2x.nets.layers import (
    DecoderLevel3d,
    InstanceNorm3d,
    LiftToVolume,
    UpConvNormReLU3d,
    channels_first,
)
from ct2x.nets.x2ct import OneChannelConv3d


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value - reference).norm() / reference.norm())


@pytest.fixture(autouse=True)
def inference() -> Iterator[None]:
    torch.manual_seed(0)
    with torch.no_grad():
        yield


def test_instance_norm_3d_is_torchs() -> None:
    volume = torch.randn(2, 5, 6, 7, 8) * 3 + 1  # (N, C, D, H, W)
    plain = nn.InstanceNorm3d(5, affine=False, track_running_stats=False)
    assert relative_error(InstanceNorm3d(5)(volume), plain(volume)) < 1e-5
    assert not list(InstanceNorm3d(5).state_dict())


@pytest.mark.parametrize("size", [2, 3, 5, 8])
def test_lifted_skip_is_the_refined_copied_map(size: int) -> None:
    lift = LiftToVolume(6, 4).eval()
    features = torch.randn(2, 6, size, size)  # (N, C, rows, columns)
    reduced = lift.reduce(features)
    plain = lift.refine(reduced.unsqueeze(2).expand(-1, -1, size, -1, -1))  # (N, c, S, rows, columns)
    assert relative_error(lift(features), plain) < 1e-5


@pytest.mark.parametrize("size", [2, 4, 5, 8])
def test_compressing_with_a_lifted_skip_is_compressing_the_concatenation(size: int) -> None:
    level = DecoderLevel3d(channels=5, blocks=1, in_channels=8, up_channels=3).eval()
    lift = LiftToVolume(6, 4).eval()
    skip = lift.lift(torch.randn(1, 6, size, size))
    volume = torch.randn(1, 4, size, size, size)
    plain = level.compress_input(torch.cat([volume, skip.volume()], dim=1))
    assert relative_error(level.compress_with(volume, skip), plain) < 1e-5


def test_up_convolution_in_channels_last_is_bitwise_the_plain_one() -> None:
    up = UpConvNormReLU3d(4, 3).eval()
    volume = torch.randn(1, 4, 6, 6, 6)
    fast, plain = up(volume), up.relu(up.norm(up.conv(volume)))
    assert fast.is_contiguous() and torch.equal(fast, plain)


def test_channels_first_copies_a_channels_last_volume() -> None:
    volume = torch.randn(2, 3, 4, 5, 6).contiguous(memory_format=torch.channels_last_3d)
    moved = channels_first(volume)
    assert moved.is_contiguous() and torch.equal(moved, volume)


@pytest.mark.parametrize("kernel, padding", [(7, 3), (3, 1), (5, 0)])
def test_one_channel_convolution_is_the_plain_convolution(kernel: int, padding: int) -> None:
    conv = OneChannelConv3d(6, 1, kernel, padding=padding)
    volume = torch.randn(2, 6, 9, 10, 11)
    plain = F.conv3d(volume, conv.weight, conv.bias, padding=padding)
    assert conv(volume).shape == plain.shape
    assert relative_error(conv(volume), plain) < 1e-5
