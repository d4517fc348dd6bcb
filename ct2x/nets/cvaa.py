"""CVAA-GAN (Qiao et al., arXiv 2408.09736): biplanar films -> CT with coarse-fine view attention alignment.

Written from the paper and CT2X's specification (models.md §2); no code of it is public. The generator is X2CT-GAN's
two film encoders (dense 2-D encoder, Connection-A, Connection-B lifting; `ct2x.nets.x2ct`) and one fusion decoder:
the two views' coarsest volumes are added, and at every finer level a `CVAAModule` fuses the two views' lifted skips
under the guidance of the deep feature coming up from the level below. The discriminator is X2CT-GAN's conditional
3-D PatchGAN, the films lifted by a learned 3-D convolution first, as the paper describes.

Volumes are NCDHW: D superior-inferior, H anterior-posterior, W patient's right -> left, as in `ct2x.nets.x2ct`;
films (N, 1, S, S) in [0, 1], the PA one projecting along H, the lateral one along W. Each view's lifted features are
permuted from its branch layout (PA [N, C, H, D, W], lateral [N, C, W, D, H]) to NCDHW before any fusion.

Every choice the paper leaves open is a configuration field or a named constant below, commented "our choice".
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Any, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ct2x.nets.config import JSONConfig, check_int, check_ints
from ct2x.nets.layers import (
    ConvNormReLU,
    DecoderLevel3d,
    Lifted,
    add_lifted_conv,
    channels_first,
    init_official,
    plain_3x3x3,
)
from ct2x.nets.patch_discriminator import PatchDiscriminator3d, PatchDiscriminatorConfig
from ct2x.nets.x2ct import (
    DECODER_LEVELS,
    ENCODER_STAGES,
    LATERAL_TO_VOLUME,
    PA_TO_VOLUME,
    VOLUME_TO_LATERAL,
    VOLUME_TO_PA,
    FilmEncoder,
    OneChannelConv3d,
    X2CTConfig,
    check_encoder_fields,
    check_film,
    output_head,
)

VIEWS = 2  # PA, lateral
ATTENTION_KERNEL = 7  # the paper's: VAA's mixing convolution, 7^3, padding 3, 2 output channels
DISTILLATION_KERNEL = 3  # the paper's: FD's convolution, 3^3, padding 1, 1 output channel


@dataclasses.dataclass(frozen=True)
class CVAAConfig(JSONConfig):
    """Shape of a CVAA-GAN generator. The encoder fields are X2CT-GAN's (`X2CTConfig`): the paper names only "a
    typical densenet" and X2CT's lifting, so their defaults are the official X2CT-GAN encoder (our choice)."""

    input_size: int = 128  # film edge = volume edge S, pixels / voxels (the paper: 128); a multiple of 32, >= 64
    base_channels: int = 64  # our choice (X2CT-GAN's): channels of the encoder's 7x7 stem
    growth: int = 32  # our choice (X2CT-GAN's): channels each dense layer adds
    bottleneck: int = 128  # our choice (X2CT-GAN's): channels of each dense layer's 1x1 bottleneck
    encoder_blocks: Tuple[int, ...] = (6, 12, 24, 16, 6)  # our choice (X2CT-GAN's): dense layers at S/2 ... S/32
    decoder_channels: Tuple[int, ...] = (16, 16, 32, 64, 128, 256)  # our choice (X2CT-GAN's): levels at S ... S/32
    # Conv blocks per level after its first convolution (the one that compresses the CVAA concatenation; the coarsest
    # level has none). The paper: one "basic 3-D convolution" per level, one block at the coarsest, then the
    # up-convolution; so (0, 0, 0, 0, 0, 1).
    decoder_blocks: Tuple[int, ...] = (0, 0, 0, 0, 0, 1)
    dropout: float = 0.5  # our choice (X2CT-GAN's): Connection-A dropout probability (training only)
    view_kernel: int = 3  # our choice: kernel of VAA's structure-aware view convolutions (the paper gives none)
    view_attention: bool = True  # VAA; off: the coarse feature is the views' sum (X2CT-style addition)
    fine_distillation: bool = True  # FD; off: no fine feature in the concatenation

    def __post_init__(self) -> None:
        check_encoder_fields(self)
        owner = type(self).__name__
        check_ints(owner, "decoder_blocks", self.decoder_blocks, DECODER_LEVELS, 0)
        check_int(owner, "view_kernel", self.view_kernel, 1)
        if self.view_kernel % 2 == 0:
            raise ValueError(f"{owner}.view_kernel must be odd (the features keep their size), got {self.view_kernel}")
        for name in ("view_attention", "fine_distillation"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{owner}.{name} must be true or false, got {getattr(self, name)!r}")

    @classmethod
    def scaled(cls, input_size: int = 128, width: float = 0.25, depth: float = 0.5, **changes: Any) -> CVAAConfig:
        """The default design at `input_size`, channels times `width`, dense layers times `depth` (at least 1 each),
        as `X2CTConfig.scaled`; `changes` set other fields (the ablation switches, for example)."""
        encoder = X2CTConfig.scaled(input_size, width, depth)
        return cls(
            input_size=input_size,
            base_channels=encoder.base_channels,
            growth=encoder.growth,
            bottleneck=encoder.bottleneck,
            encoder_blocks=encoder.encoder_blocks,
            decoder_channels=encoder.decoder_channels,
            **changes,
        )

    def encoder_config(self) -> X2CTConfig:
        """The X2CT-GAN configuration whose film encoders and lifting this network uses (its decoder fields unused)."""
        return X2CTConfig(input_size=self.input_size, base_channels=self.base_channels, growth=self.growth,
                          bottleneck=self.bottleneck, encoder_blocks=self.encoder_blocks,
                          decoder_channels=self.decoder_channels, dropout=self.dropout)


PRESETS = {
    "paper": CVAAConfig(),  # X2CT-GAN's encoder, the paper's decoder, 128^3
    "cpu128": CVAAConfig.scaled(128, width=0.25, depth=0.5),  # quarter width, half depth, 128^3
    "cpu64": CVAAConfig.scaled(64, width=0.25, depth=0.5),  # the same at 64^3
    "tiny64": CVAAConfig.scaled(64, width=0.125, depth=0.25),  # unit tests
}


class ViewAttention(nn.Module):
    """VAA's weights: each view's structure-aware feature ReLU(Conv3d(cat(deep, view))), both into a 7^3 convolution
    to one channel per view, softmax over the views: (N, 2, D, H, W), summing to 1 at every voxel."""

    def __init__(self, channels: int, kernel_size: int) -> None:
        super().__init__()
        # our choice: one convolution per view (the views are lifted along different axes), C_j output channels,
        # no norm (the paper's "basic 3-D convolution block (Conv3d + ReLU)")
        self.structure = nn.ModuleList(
            nn.Sequential(OrderedDict(
                conv=nn.Conv3d(2 * channels, channels, kernel_size, padding=kernel_size // 2),
                relu=nn.ReLU(inplace=True),
            ))
            for _ in range(VIEWS)
        )
        self.mix = nn.Conv3d(VIEWS * channels, VIEWS, ATTENTION_KERNEL, padding=ATTENTION_KERNEL // 2)

    def forward(self, pa: Union[Tensor, Lifted], lateral: Union[Tensor, Lifted], deep: Tensor) -> Tensor:
        """The views (N, C, D, H, W), or their lifted skips (`Lifted`, branch layouts; `lifted_weights`), and the deep
        feature (N, C, D, H, W) -> the weights (N, 2, D, H, W)."""
        if isinstance(pa, Lifted) and isinstance(lateral, Lifted):
            return self.lifted_weights(pa, lateral, deep)
        aware = [conv(torch.cat([deep, view], dim=1)) for conv, view in zip(self.structure, (pa, lateral))]
        return torch.softmax(self.mix(torch.cat(aware, dim=1)), dim=1)  # (N, 2, D, H, W)

    def lifted_weights(self, pa: Lifted, lateral: Lifted, deep: Tensor) -> Tensor:
        """forward(each view's lifted skip as an NCDHW volume, deep) (N, 2, D, H, W) for 3^3 structure convolutions
        (`CVAAModule.fast_path`), without those volumes; `deep` (N, C, D, H, W) in any memory layout.

        The structure convolutions are linear in their input channels: the deep feature's part of both runs as one
        3-D convolution to 2 C channels, each view's part as 2-D convolutions of its skip's planes (`add_lifted_conv`,
        in the skip's layout). A softmax over two logits is [sigmoid(l0 - l1), sigmoid(l1 - l0)], and l0 - l1 is one
        7^3 convolution to 1 channel with weights W0 - W1, which runs on `OneChannelConv3d`'s CPU path: oneDNN is
        slow with few output channels. At 128^3, 16 channels, on one core: 1.9-2.7 instead of 9-9.6 s (the 7^3
        convolution 1.0-1.4 instead of 4-7 s)."""
        channels = deep.shape[1]
        convs = [unit.conv for unit in self.structure]
        deep_weight = torch.cat([conv.weight[:, :channels] for conv in convs])  # (2 C, C, 3, 3, 3)
        aware = F.conv3d(deep, deep_weight, torch.cat([conv.bias for conv in convs]), padding=1)  # (N, 2 C, D, H, W)
        for part, conv, skip, to_branch in zip(aware.split(channels, dim=1), convs, (pa, lateral),
                                               (VOLUME_TO_PA, VOLUME_TO_LATERAL)):
            add_lifted_conv(part.permute(to_branch), skip, conv.weight[:, channels:].permute(to_branch))
        aware = aware.relu_()  # cat(aware_PA, aware_lateral)
        difference = OneChannelConv3d(self.mix.in_channels, 1, self.mix.kernel_size, padding=self.mix.padding,
                                      device="meta")  # its configuration only: the weights are given at the call
        weight, bias = self.mix.weight, self.mix.bias
        logits = torch.func.functional_call(difference, {"weight": weight[:1] - weight[1:],
                                                         "bias": bias[:1] - bias[1:]}, (aware,))  # l_PA - l_lateral
        return torch.cat([torch.sigmoid(logits), torch.sigmoid(-logits)], dim=1)  # (N, 2, D, H, W)


class FineDistillation(nn.Module):
    """FD: fine = sigmoid(Conv3d(cat(coarse, deep))) * coarse, one weight per voxel shared by the channels."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        # one output channel: OneChannelConv3d's CPU path (0.34 instead of 0.56 s at 128^3, 32 channels, one core)
        self.gate = OneChannelConv3d(2 * channels, 1, DISTILLATION_KERNEL, padding=DISTILLATION_KERNEL // 2)

    def forward(self, coarse: Tensor, deep: Tensor) -> Tensor:
        weight = torch.sigmoid(self.gate(torch.cat([coarse, deep], dim=1)))  # (N, 1, D, H, W)
        return weight * coarse  # (N, C, D, H, W)


class CVAAModule(nn.Module):
    """The coarse-fine view attention alignment of one decoder level: the two views' lifted features and the deep
    feature, each (N, C, D, H, W) -> cat [coarse, fine, PA + lateral, deep] (N, parts * C, D, H, W).

    Without view attention the coarse feature is PA + lateral and appears once; without fine distillation the fine
    feature is left out. Both off: cat [PA + lateral, deep], X2CT-GAN's fusion (with a sum for its average).
    """

    def __init__(self, channels: int, view_kernel: int, view_attention: bool, fine_distillation: bool) -> None:
        super().__init__()
        self.attention = ViewAttention(channels, view_kernel) if view_attention else None
        self.distillation = FineDistillation(channels) if fine_distillation else None
        self.parts = 2 + (self.attention is not None) + (self.distillation is not None)

    def coarse(self, pa: Tensor, lateral: Tensor, deep: Tensor) -> Tensor:
        """The views' attention-weighted sum (N, C, D, H, W); their plain sum without view attention."""
        if self.attention is None:
            return pa + lateral
        weights = self.attention(pa, lateral, deep)  # (N, 2, D, H, W)
        return weights[:, :1] * pa + weights[:, 1:] * lateral

    def forward(self, pa: Tensor, lateral: Tensor, deep: Tensor) -> Tensor:
        coarse = self.coarse(pa, lateral, deep)
        parts = [coarse] if self.attention is not None else []
        if self.distillation is not None:
            parts.append(self.distillation(coarse, deep))
        return torch.cat(parts + [pa + lateral, deep], dim=1)  # (N, parts * C, D, H, W)

    def fast_path(self, compress: Optional[ConvNormReLU]) -> bool:
        """Whether `compressed` may replace compress(self(views, deep)): in inference (the gradient takes the plain
        computation), with 3^3 convolutions where it splits them."""
        return not torch.is_grad_enabled() and compress is not None and plain_3x3x3(compress.conv) and \
            (self.attention is None or all(plain_3x3x3(unit.conv) for unit in self.attention.structure))

    def compressed(self, pa: Lifted, lateral: Lifted, deep: Tensor, compress: ConvNormReLU) -> Tensor:
        """compress(self(PA view, lateral view, deep)) (N, C, D, H, W) from the lifted skips (branch layouts) and the
        deep feature (N, C, D, H, W), for `fast_path`. At 128^3 in the default network, on one core: 4.7 instead of
        14.2 s.

        The compressing conv is linear in its input channels: the coarse, deep and fine features, in one volume, go
        through one 3-D convolution, PA + lateral (a part of its own with view attention) through 2-D convolutions of
        the skips' planes (`add_lifted_conv`); without view attention the coarse feature is PA + lateral itself. The
        views are never permuted volumes that every op reads strided (`lifted_volume`). On CPU the 3-D convolutions
        run in channels_last_3d, where oneDNN is 1.2-2.3 times faster (the whole network: 4.5 instead of 6.6 s on one
        core); the instance norm does not: torch's channels_last group_norm is off by 8e-4 relative L2."""
        channels = deep.shape[1]
        layout = torch.channels_last_3d if deep.device.type == "cpu" else torch.contiguous_format
        deep = deep.contiguous(memory_format=layout)
        if self.attention is not None:
            view_weights = self.attention(pa, lateral, deep)  # (N, 2, D, H, W)
        parts = 2 + (self.distillation is not None)
        stack = torch.empty((deep.shape[0], parts * channels) + deep.shape[2:], dtype=deep.dtype, device=deep.device,
                            memory_format=layout)  # [coarse, deep, fine]: FD's input [coarse, deep] is its first part
        coarse = stack[:, :channels]
        pa_view = lifted_volume(pa, PA_TO_VOLUME, layout)  # (N, C, D, H, W)
        lateral_view = lifted_volume(lateral, LATERAL_TO_VOLUME, layout)
        if self.attention is not None:
            pa_view.mul_(view_weights[:, :1])
            lateral_view.mul_(view_weights[:, 1:])
        torch.add(pa_view, lateral_view, out=coarse)
        del pa_view, lateral_view
        stack[:, channels:2 * channels] = deep
        if self.distillation is not None:
            gate = torch.sigmoid(self.distillation.gate(stack[:, :2 * channels]))  # (N, 1, D, H, W)
            torch.mul(gate, coarse, out=stack[:, 2 * channels:])
        # the compressing conv's weight by part, in the order of `forward`'s concatenation, then in the stack's
        names = ["coarse"] * (self.attention is not None) + ["fine"] * (self.distillation is not None) + ["sum", "deep"]
        weights = dict(zip(names, compress.conv.weight.split(channels, dim=1)))
        order = ["coarse" if self.attention is not None else "sum", "deep"] + ["fine"] * (self.distillation is not None)
        out = F.conv3d(stack, torch.cat([weights[name] for name in order], dim=1), compress.conv.bias, padding=1)
        del stack, coarse
        if self.attention is not None:  # PA + lateral
            for skip, to_branch in ((pa, VOLUME_TO_PA), (lateral, VOLUME_TO_LATERAL)):
                add_lifted_conv(out.permute(to_branch), skip, weights["sum"].permute(to_branch))
        return compress.relu(compress.norm(channels_first(out)))  # (N, C, D, H, W)


def lifted_volume(skip: Lifted, to_volume: Tuple[int, ...], layout: torch.memory_format) -> Tensor:
    """skip.volume().permute(to_volume) (N, C, D, H, W), dense in `layout`: its planes copied straight into place,
    where the permuted volume would be a strided view that every later op reads slowly."""
    n, channels, _, rows, columns = skip.planes.shape
    branch_shape = (n, channels, skip.size, rows, columns)
    volume = torch.empty(tuple(branch_shape[axis] for axis in to_volume), dtype=skip.planes.dtype,
                         device=skip.planes.device, memory_format=layout)
    branch = volume.permute(tuple(to_volume.index(axis) for axis in range(5)))  # a view in the skip's layout
    first, inner, last = skip.planes.split(1, dim=2)
    branch[:, :, :1] = first
    branch[:, :, 1:-1] = inner  # copied along the lifted axis
    branch[:, :, -1:] = last
    return volume


class CVAAGenerator(nn.Module):
    """CVAA-GAN's generator: PA and lateral films (N, 1, S, S) in [0, 1] -> volume (N, 1, S, S, S) NCDHW in [0, inf).

    Level j works at S / 2^j with C_j channels. The coarsest (j = 5): the views' Connection-A volumes added, conv
    blocks, up-convolution. Each finer level: CVAA of the views' lifted skips j and the deep feature from below,
    a conv compressing the concatenation to C_j, conv blocks, up-convolution (j > 0) or the output head (j = 0).
    """

    def __init__(self, config: Optional[CVAAConfig] = None) -> None:
        super().__init__()
        self.config = config = config or CVAAConfig()
        channels, blocks = config.decoder_channels, config.decoder_blocks
        self.pa = FilmEncoder(config.encoder_config())
        self.lateral = FilmEncoder(config.encoder_config())
        self.fusions = nn.ModuleList(
            CVAAModule(channels[j], config.view_kernel, config.view_attention, config.fine_distillation)
            for j in range(ENCODER_STAGES)
        )
        self.levels = nn.ModuleList(
            DecoderLevel3d(
                channels[j],
                blocks[j],
                in_channels=self.fusions[j].parts * channels[j] if j < ENCODER_STAGES else 0,
                up_channels=channels[j - 1] if j > 0 else 0,
            )
            for j in range(DECODER_LEVELS)
        )
        self.head = output_head(channels[0])  # our choice (X2CT-GAN's): Conv3d 7^3 to 1 channel, ReLU
        init_official(self)  # our choice (X2CT-GAN's): weights N(0, 0.02), biases 0

    def forward(self, pa: Tensor, lateral: Tensor) -> Tensor:
        check_film("pa", pa, self.config.input_size)
        check_film("lateral", lateral, self.config.input_size)
        if pa.shape[0] != lateral.shape[0]:
            raise ValueError(f"pa and lateral films must come in equal numbers, got {len(pa)} and {len(lateral)}")
        pa_volume, pa_skips = self.pa.encode(pa)  # [N, C5, H, D, W], skips [N, C_j, H, D, W]
        lateral_volume, lateral_skips = self.lateral.encode(lateral)  # [N, C5, W, D, H], skips [N, C_j, W, D, H]
        deep = pa_volume.permute(PA_TO_VOLUME) + lateral_volume.permute(LATERAL_TO_VOLUME)  # (N, C5, S/32, ...)
        deep = self.levels[ENCODER_STAGES](deep)  # (N, C4, S/16, S/16, S/16)
        for j in reversed(range(ENCODER_STAGES)):
            pa_skip, lateral_skip = pa_skips.pop(), lateral_skips.pop()  # Lifted (N, C_j, S / 2^j, ...)
            fusion, level = self.fusions[j], self.levels[j]
            if fusion.fast_path(level.compress):
                deep = level.refine(fusion.compressed(pa_skip, lateral_skip, deep, level.compress))
            else:
                pa_view = pa_skip.volume().permute(PA_TO_VOLUME)  # (N, C_j, D, H, W) at S / 2^j
                lateral_view = lateral_skip.volume().permute(LATERAL_TO_VOLUME)  # (N, C_j, D, H, W)
                deep = level(fusion(pa_view, lateral_view, deep))  # (N, C_(j-1), 2x) or (N, C0, S^3)
        return self.head(deep)  # (N, 1, D, H, W)


@dataclasses.dataclass(frozen=True)
class CVAADiscriminatorConfig(JSONConfig):
    """Shape of CVAA-GAN's discriminator: X2CT-GAN's 3-D PatchGAN (`PatchDiscriminatorConfig`) behind the films'
    learned lifting."""

    base_channels: int = 64  # our choice (X2CT-GAN's): channels of the PatchGAN's first layer
    strided_layers: int = 3  # the paper's ("three conv3d-norm-relu modules with stride 2"), as X2CT-GAN's
    film_channels: int = 4  # our choice: channels of each film's lifting convolution (the paper gives none)

    def __post_init__(self) -> None:
        check_int(type(self).__name__, "film_channels", self.film_channels, 1)
        self.patch_config()  # checks the other fields

    def patch_config(self) -> PatchDiscriminatorConfig:
        return PatchDiscriminatorConfig(in_channels=VIEWS * self.film_channels + 1, base_channels=self.base_channels,
                                        strided_layers=self.strided_layers)


class CVAADiscriminator(nn.Module):
    """`conditional_input(pa, lateral, volume)` (N, 3, D, H, W) -> patch logits (N, 1, D', H', W'): each film's copies
    through its own Conv3d 3^3 + instance norm + ReLU (the paper's "2D => 3D followed by a basic 3-D convolution",
    as in the encoders' lifting), concatenated with the volume, into X2CT-GAN's 3-D PatchGAN."""

    def __init__(self, config: Optional[CVAADiscriminatorConfig] = None) -> None:
        super().__init__()
        self.config = config = config or CVAADiscriminatorConfig()
        self.lift = nn.ModuleList(ConvNormReLU(3, 1, config.film_channels, 3, padding=1) for _ in range(VIEWS))
        self.patches = PatchDiscriminator3d(config.patch_config())  # initialised by itself
        init_official(self.lift)

    def forward(self, conditioned: Tensor) -> Tensor:
        if conditioned.dim() != 5 or conditioned.shape[1] != VIEWS + 1:
            raise ValueError(f"discriminator input must be (N, 3, D, H, W), got {tuple(conditioned.shape)}")
        *films, volume = conditioned.split(1, dim=1)  # PA copies, lateral copies, volume: each (N, 1, D, H, W)
        lifted = [lift(film) for lift, film in zip(self.lift, films)]  # each (N, film_channels, D, H, W)
        return self.patches(torch.cat(lifted + [volume], dim=1))  # (N, 1, D', H', W') raw logits


def build_generator(**config: Any) -> CVAAGenerator:
    """CVAA-GAN's generator from JSON keyword arguments (`CVAAConfig.to_dict()`), for model files."""
    return CVAAGenerator(CVAAConfig.from_dict(config))


def build_discriminator(**config: Any) -> CVAADiscriminator:
    """CVAA-GAN's discriminator from JSON keyword arguments (`CVAADiscriminatorConfig.to_dict()`)."""
    return CVAADiscriminator(CVAADiscriminatorConfig.from_dict(config))
