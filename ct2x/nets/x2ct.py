"""X2CT-GAN generators (Ying et al., CVPR 2019): biplanar X2CT-GAN+B and single-view X2CT-GAN+S.

Written from CT2X's specification of the official networks (kylekma/X2CT); official weights load through
`ct2x.models.x2ct_official`, and tests/test_x2ct_official.py checks the outputs against the official code's.

Volumes are NCDHW: D superior-inferior, H anterior-posterior, W left-right. Films are (N, 1, S, S) in [0, 1]: the PA
film has rows along D and columns along W (it projects along H), the lateral film rows along D and columns along H
(it projects along W). Each film's branch works in its own layout, the new projection axis first:
PA [N, C, H, D, W], lateral [N, C, W, D, H]; the biplanar fusion (Connection-C) works in [N, C, D, H, W].
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import OrderedDict
from typing import Any, ContextManager, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ct2x.nets.config import JSONConfig, check_int, check_ints
from ct2x.nets.layers import DecoderLevel3d, DenseStage2d, Lifted, LiftToVolume, init_official, instance_norm

ENCODER_STAGES = 5  # each halves the film: S -> S / 32
DECODER_LEVELS = ENCODER_STAGES + 1  # level j works at S / 2^j, j = 0 (output size) ... 5 (coarsest)
PA_TO_VOLUME = (0, 1, 3, 2, 4)  # [N, C, H, D, W] -> [N, C, D, H, W]
LATERAL_TO_VOLUME = (0, 1, 3, 4, 2)  # [N, C, W, D, H] -> [N, C, D, H, W]
VOLUME_TO_PA = (0, 1, 3, 2, 4)  # [N, C, D, H, W] -> [N, C, H, D, W]
VOLUME_TO_LATERAL = (0, 1, 4, 2, 3)  # [N, C, D, H, W] -> [N, C, W, D, H]


@dataclasses.dataclass(frozen=True)
class X2CTConfig(JSONConfig):
    """Shape of an X2CT-GAN generator; the defaults are the official networks (61,740,467 parameters biplanar)."""

    input_size: int = 128  # film edge = volume edge S, pixels / voxels; a multiple of 32, at least 64
    base_channels: int = 64  # channels of the encoder's 7x7 stem
    growth: int = 32  # channels each dense layer adds
    bottleneck: int = 128  # channels of each dense layer's 1x1 bottleneck
    encoder_blocks: Tuple[int, ...] = (6, 12, 24, 16, 6)  # dense layers of the encoder stages at S/2 ... S/32
    decoder_channels: Tuple[int, ...] = (16, 16, 32, 64, 128, 256)  # decoder levels at S, S/2, ..., S/32
    view_decoder_blocks: Tuple[int, ...] = (1, 2, 2, 2, 2, 0)  # conv blocks per level, each film's decoder
    fusion_blocks: Tuple[int, ...] = (1, 1, 1, 1, 1, 0)  # conv blocks per level, the biplanar fusion decoder
    dropout: float = 0.5  # Connection-A dropout probability (training only)

    def __post_init__(self) -> None:
        check_encoder_fields(self)
        owner = type(self).__name__
        check_ints(owner, "view_decoder_blocks", self.view_decoder_blocks, DECODER_LEVELS, 0)
        check_ints(owner, "fusion_blocks", self.fusion_blocks, DECODER_LEVELS, 0)

    @classmethod
    def scaled(cls, input_size: int = 128, width: float = 0.25, depth: float = 0.5) -> X2CTConfig:
        """The official design at `input_size`, channels times `width`, dense layers times `depth` (at least 1 each);
        decoder blocks and dropout as the official."""
        official = cls()

        def narrow(channels: int) -> int:
            return max(1, round(channels * width))

        return cls(
            input_size=input_size,
            base_channels=narrow(official.base_channels),
            growth=narrow(official.growth),
            bottleneck=narrow(official.bottleneck),
            encoder_blocks=tuple(max(1, round(layers * depth)) for layers in official.encoder_blocks),
            decoder_channels=tuple(narrow(channels) for channels in official.decoder_channels),
        )

    def encoder_channels(self) -> Tuple[int, ...]:
        """Channels of the stem and of each encoder stage: (64, 128, 256, 512, 512, 704) officially."""
        channels = [self.base_channels]
        for stage, layers in enumerate(self.encoder_blocks):
            dense_channels = channels[-1] + layers * self.growth
            channels.append(dense_channels if stage == ENCODER_STAGES - 1 else dense_channels // 2)
        return tuple(channels)


def check_encoder_fields(config: Any) -> None:
    """ValueError naming the field, unless the film-encoder fields of `config` (an X2CTConfig, or a configuration
    built on its encoder) fit: input_size, base_channels, growth, bottleneck, encoder_blocks, decoder_channels,
    dropout."""
    owner = type(config).__name__
    check_int(owner, "input_size", config.input_size, 64)
    if config.input_size % 32:
        raise ValueError(f"{owner}.input_size must be a multiple of 32, got {config.input_size}")
    for name in ("base_channels", "growth", "bottleneck"):
        check_int(owner, name, getattr(config, name), 1)
    check_ints(owner, "encoder_blocks", config.encoder_blocks, ENCODER_STAGES, 1)
    check_ints(owner, "decoder_channels", config.decoder_channels, DECODER_LEVELS, 1)
    if isinstance(config.dropout, bool) or not isinstance(config.dropout, (int, float)) or not 0 <= config.dropout < 1:
        raise ValueError(f"{owner}.dropout must be a probability in [0, 1), got {config.dropout!r}")


PRESETS = {
    "official": X2CTConfig(),  # the paper's networks, 128^3
    "cpu128": X2CTConfig.scaled(128, width=0.25, depth=0.5),  # quarter width, half depth, 128^3
    "cpu64": X2CTConfig.scaled(64, width=0.25, depth=0.5),  # the same at 64^3
    "tiny64": X2CTConfig.scaled(64, width=0.125, depth=0.25),  # unit tests
}


class DenseEncoder2d(nn.Module):
    """DenseNet encoder of one film: (N, 1, S, S) -> feature maps at S, S/2, ..., S/16 and a code (N, C)."""

    def __init__(self, config: X2CTConfig) -> None:
        super().__init__()
        channels = config.encoder_channels()
        self.stem = nn.Sequential(OrderedDict(
            pad=nn.ReflectionPad2d(3),
            conv=nn.Conv2d(1, config.base_channels, 7),
            norm=instance_norm(2, config.base_channels),
            relu=nn.ReLU(inplace=True),
        ))
        self.stages = nn.ModuleList(
            DenseStage2d(channels[stage], layers, config.growth, config.bottleneck, stage < ENCODER_STAGES - 1)
            for stage, layers in enumerate(config.encoder_blocks)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, film: Tensor) -> Tuple[List[Tensor], Tensor]:
        features = [self.stem(film)]  # (N, 64, S, S)
        for stage in self.stages:
            features.append(stage(features[-1]))  # (N, C_k, S / 2^k, S / 2^k)
        code = self.pool(features.pop()).flatten(1)  # (N, 704): global average of the S/32 map
        return features, code


class CodeToVolume(nn.Module):
    """Connection-A: a film's code (N, C) -> a coarse volume (N, channels, s, s, s): Linear -> Dropout -> ReLU."""

    def __init__(self, code_channels: int, channels: int, size: int, dropout: float) -> None:
        super().__init__()
        self.shape = (channels, size, size, size)
        self.linear = nn.Linear(code_channels, channels * size**3)
        self.dropout = nn.Dropout(dropout)

    def forward(self, code: Tensor) -> Tensor:
        volume = torch.relu(self.dropout(self.linear(code)))  # (N, channels * s^3)
        return volume.view(-1, *self.shape)  # (N, channels, s, s, s) in the branch layout


class FilmEncoder(nn.Module):
    """One film's encoder, Connection-A and Connection-B (one per skip level), in the branch layout."""

    def __init__(self, config: X2CTConfig) -> None:
        super().__init__()
        self.config = config
        channels, levels = config.encoder_channels(), config.decoder_channels
        self.encoder = DenseEncoder2d(config)
        self.to_volume = CodeToVolume(channels[-1], levels[-1], config.input_size // 32, config.dropout)
        self.skips = nn.ModuleList(LiftToVolume(channels[j], levels[j]) for j in range(ENCODER_STAGES))

    def encode(self, film: Tensor) -> Tuple[Tensor, List[Lifted]]:
        """The coarsest volume (N, C5, S/32, S/32, S/32) and the lifted skips (`Lifted`: N, C_j, S/2^j, ...),
        j = 0 ... 4.

        The 2-D encoder and Connection-A run in float32 even under autocast: the dense encoder amplifies rounding
        (bfloat16 there moves a trained model's output by 2.5 % relative L2, against 0.65 % with it in float32)."""
        with float32(film.device.type):
            features, code = self.encoder(film.float())
            volume = self.to_volume(code)
        return volume, [lift.lift(feature) for lift, feature in zip(self.skips, features)]


class FilmBranch(FilmEncoder):
    """One film's `FilmEncoder` and its own 3-D decoder, in the branch layout."""

    def __init__(self, config: X2CTConfig) -> None:
        super().__init__(config)
        self.levels = decoder_levels(config.decoder_channels, config.view_decoder_blocks)
        self.head = output_head(config.decoder_channels[0])


class X2CTSingleViewGenerator(FilmBranch):
    """X2CT-GAN+S: one PA film (N, 1, S, S) in [0, 1] -> volume (N, 1, S, S, S) NCDHW in [0, inf).

    The official network returns its PA branch layout [N, 1, H, D, W]; this one permutes that to NCDHW.
    """

    def __init__(self, config: Optional[X2CTConfig] = None) -> None:
        config = config or X2CTConfig()
        super().__init__(config)
        init_official(self)

    def forward(self, pa: Tensor) -> Tensor:
        check_film("pa", pa, self.config.input_size)
        volume, skips = self.encode(pa)  # [N, C, H, D, W]
        for j in reversed(range(DECODER_LEVELS)):
            level = self.levels[j]
            volume = level.compress_with(volume, skips.pop()) if j < ENCODER_STAGES else level.compress_input(volume)
            volume = level.refine(volume)
        return self.head(volume).permute(PA_TO_VOLUME).contiguous()  # (N, 1, D, H, W)


class X2CTOutputs(NamedTuple):
    """Volumes (N, 1, D, H, W) in [0, inf) of the biplanar generator; only `fused` enters X2CT-GAN's losses."""

    fused: Tensor
    pa: Tensor  # the PA branch's own decoder output
    lateral: Tensor  # the lateral branch's own decoder output


class X2CTGenerator(nn.Module):
    """X2CT-GAN+B: PA and lateral films (N, 1, S, S) in [0, 1] -> volume (N, 1, S, S, S) NCDHW in [0, inf).

    Each film has its own branch; at every decoder level the two branches' compressed features are averaged in the
    volume layout (Connection-C), the average feeds the fusion decoder and replaces both branches' own features.
    """

    def __init__(self, config: Optional[X2CTConfig] = None) -> None:
        super().__init__()
        self.config = config = config or X2CTConfig()
        self.pa = FilmBranch(config)
        self.lateral = FilmBranch(config)
        self.fusion_levels = decoder_levels(config.decoder_channels, config.fusion_blocks)
        self.fusion_head = output_head(config.decoder_channels[0])
        init_official(self)

    def forward(self, pa: Tensor, lateral: Tensor) -> Tensor:
        """The fused volume (N, 1, D, H, W)."""
        fused, _ = self._decode(pa, lateral, keep_finest=False)
        return fused

    def forward_all(self, pa: Tensor, lateral: Tensor) -> X2CTOutputs:
        """The fused volume and each branch's own (N, 1, D, H, W)."""
        fused, finest = self._decode(pa, lateral)
        pa_volume = self.pa.head(self.pa.levels[0].refine(finest.permute(VOLUME_TO_PA)))  # (N, 1, H, D, W)
        lateral_volume = self.lateral.head(self.lateral.levels[0].refine(finest.permute(VOLUME_TO_LATERAL)))
        return X2CTOutputs(
            fused,
            pa_volume.permute(PA_TO_VOLUME).contiguous(),
            lateral_volume.permute(LATERAL_TO_VOLUME).contiguous(),  # from (N, 1, W, D, H)
        )

    def _decode(self, pa: Tensor, lateral: Tensor, keep_finest: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
        """The fused volume (N, 1, D, H, W) and the branches' average at the finest level (N, C0, D, H, W), or None
        unless `keep_finest`. Each volume is dropped once used: skips as they are concatenated, the branches'
        volumes once averaged."""
        check_film("pa", pa, self.config.input_size)
        check_film("lateral", lateral, self.config.input_size)
        if pa.shape[0] != lateral.shape[0]:
            raise ValueError(f"pa and lateral films must come in equal numbers, got {len(pa)} and {len(lateral)}")
        pa_volume, pa_skips = self.pa.encode(pa)  # [N, C, H, D, W]
        lateral_volume, lateral_skips = self.lateral.encode(lateral)  # [N, C, W, D, H]
        fused: Optional[Tensor] = None
        for j in reversed(range(DECODER_LEVELS)):
            pa_level, lateral_level = self.pa.levels[j], self.lateral.levels[j]
            if j < ENCODER_STAGES:  # skips[j] is the last one left
                pa_volume = pa_level.compress_with(pa_volume, pa_skips.pop())
                lateral_volume = lateral_level.compress_with(lateral_volume, lateral_skips.pop())
            # (PA + lateral) / 2 in NCDHW; the same values as adding the two permuted views, without their slow
            # strided loop (100 instead of 350 ms at 16 x 128^3 on one core)
            average = pa_volume.permute(PA_TO_VOLUME).clone(memory_format=torch.contiguous_format)
            average.add_(lateral_volume.permute(LATERAL_TO_VOLUME)).div_(2)
            pa_volume = lateral_volume = None
            fused = self.fusion_levels[j](average if fused is None else torch.cat([average, fused], dim=1))
            if j > 0:  # the average replaces each branch's own features
                pa_volume = pa_level.refine(average.permute(VOLUME_TO_PA))  # [N, C, H, D, W]
                lateral_volume = lateral_level.refine(average.permute(VOLUME_TO_LATERAL))  # [N, C, W, D, H]
            elif not keep_finest:
                average = None
        return self.fusion_head(fused), average


def decoder_levels(channels: Tuple[int, ...], blocks: Tuple[int, ...]) -> nn.ModuleList:
    """Levels j = 0 (finest) ... 5: each but the coarsest compresses 2 C_j -> C_j (its input concatenated with a
    skip, or with the fusion decoder's volume), each but the finest ends in an up-convolution to C_(j-1)."""
    return nn.ModuleList(
        DecoderLevel3d(
            channels[j],
            blocks[j],
            in_channels=2 * channels[j] if j < ENCODER_STAGES else 0,
            up_channels=channels[j - 1] if j > 0 else 0,
        )
        for j in range(DECODER_LEVELS)
    )


def output_head(channels: int) -> nn.Sequential:
    """Conv3d 7x7x7 (channels -> 1) -> ReLU: attenuation in [0, inf)."""
    return nn.Sequential(OrderedDict(conv=OneChannelConv3d(channels, 1, 7, padding=3), relu=nn.ReLU(inplace=True)))


class OneChannelConv3d(nn.Conv3d):
    """nn.Conv3d whose CPU forward, for one output channel, is a convolution with kernel depth 1 whose output channels
    are the kernel's depth taps, then the sum of those planes shifted along D (in float32). The same function up to
    float32 rounding; oneDNN is slow with a single output channel: the 7 x 7 x 7, 16 -> 1 head at 128^3 takes 2.2 s on
    one core, 0.45 s this way. Parameters and state dict are nn.Conv3d's."""

    def forward(self, volume: Tensor) -> Tensor:
        if volume.device.type != "cpu" or self.out_channels != 1 or self.groups != 1 or self.padding_mode != "zeros" \
                or isinstance(self.padding, str) or self.stride != (1, 1, 1) or self.dilation != (1, 1, 1):
            return super().forward(volume)
        depth, pad = self.kernel_size[0], self.padding[0]
        taps = F.conv3d(volume, self.weight.transpose(0, 2), None, 1, (0,) + self.padding[1:])  # (N, depth, D, H, W)
        planes = taps.shape[2]
        out_planes = planes + 2 * pad - depth + 1
        total = taps.new_zeros((taps.shape[0], 1, out_planes) + taps.shape[3:], dtype=torch.float32)
        for tap in range(depth):  # input plane i, through tap `tap`, lands on output plane i + pad - tap
            start, stop = max(0, tap - pad), min(planes, out_planes + tap - pad)
            total[:, 0, start + pad - tap:stop + pad - tap] += taps[:, tap, start:stop]
        if self.bias is not None:
            total += self.bias.view(1, -1, 1, 1, 1)
        return total.to(taps.dtype)


def float32(device_type: str) -> ContextManager:
    """Autocast off on `device_type` (a no-op where torch has no autocast, such as the meta device)."""
    if not torch.amp.is_autocast_available(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def check_film(name: str, film: Tensor, size: int) -> None:
    """ValueError unless `film` is (N, 1, size, size)."""
    if film.dim() != 4 or film.shape[1] != 1 or film.shape[2:] != (size, size):
        raise ValueError(f"{name} film must be (N, 1, {size}, {size}), got {tuple(film.shape)}")


def conditional_input(pa: Tensor, lateral: Tensor, volume: Tensor) -> Tensor:
    """The conditional discriminator's input (N, 3, D, H, W): the PA film (N, 1, D, W) copied along H, the lateral film
    (N, 1, D, H) copied along W and the volume (N, 1, D, H, W)."""
    n, _, d, h, w = volume.shape
    if pa.shape != (n, 1, d, w) or lateral.shape != (n, 1, d, h):
        raise ValueError(f"films (N, 1, D, W) and (N, 1, D, H) must fit the volume {tuple(volume.shape)}, "
                         f"got pa {tuple(pa.shape)} and lateral {tuple(lateral.shape)}")
    pa_copies = pa.unsqueeze(3).expand(n, 1, d, h, w)  # (N, 1, D, H, W), constant along H
    lateral_copies = lateral.unsqueeze(4).expand(n, 1, d, h, w)  # (N, 1, D, H, W), constant along W
    return torch.cat([pa_copies, lateral_copies, volume], dim=1)


def build_generator(**config: Any) -> X2CTGenerator:
    """X2CT-GAN+B from JSON keyword arguments (`X2CTConfig.to_dict()`), for model files."""
    return X2CTGenerator(X2CTConfig.from_dict(config))


def build_single_view_generator(**config: Any) -> X2CTSingleViewGenerator:
    """X2CT-GAN+S from JSON keyword arguments (`X2CTConfig.to_dict()`), for model files."""
    return X2CTSingleViewGenerator(X2CTConfig.from_dict(config))
