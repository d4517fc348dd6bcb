"""CT2X-GAN's generator side (Tan et al., arXiv 2404.11889): CT encoder, pose attention, style decoupling encoder, G.

Written from the paper and CT2X's specification (models.md §3); no code of it is public. A CT and a camera label give
the content code f_c^w+ (E_CT, then the pose attention module PAM with the CT's maximum-intensity projection at the
target pose); a reference image gives a style code (the style decoupling encoder E_sty, one style branch per domain:
real X-ray or DRR); G, a StyleGAN2 synthesis network, takes the content code in its first layers and the style code
in its last six (the paper: layers 1-8 and 9-14 of 14 at 256 x 256).

Tensors:
- CT (N, 1, S, S, S) NCDHW (D superior-inferior, H anterior-posterior, W left-right), 1 mm voxels, values in [0, 1]
  (`ct2x.preprocess.x2ct_normalize`: HU = 2500 x - 1024).
- Camera label (N, 25): `ct2x.geometry.View.camera_label()`, a flattened 4x4 camera-to-world pose (translation in mm
  from the isocentre) and the flattened 3x3 normalised intrinsics, EG3D's layout, which the paper's p in R^{1x25}
  matches. The networks divide the translation by `label_translation_mm` so that every entry is of order 1.
- MIP (N, 1, M, M) in [0, 1]: the CT's maximum-intensity projection at the label's pose (`ct2x.synth_inputs`).
- Films (X-ray, DRR, synthesis) (N, 1, image_size, image_size), nominally in [-1, 1] (StyleGAN2's range, our choice).

Networks never read files or call the projector: the MIP comes in as a tensor. Every choice the paper leaves open is
a configuration field or a named constant, commented "ours".
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ct2x.nets.config import JSONConfig, check_int, check_ints
from ct2x.nets.ct2x_gan_layers import (
    NEGATIVE_SLOPE,
    EqualConv2d,
    EqualLinear,
    SynthesisNetwork,
    synthesis_layers,
)

LABEL_SIZE = 25  # the paper's p in R^{1x25}
TRANSLATION_ENTRIES = (3, 7, 11)  # the 4x4 pose's translation in the flattened (row-major) label
CT_DOWNSAMPLINGS = 3  # the paper's: E_CT has three downsampling layers
STYLE_CONVS = 7  # the paper's: seven Conv2D per style branch (before the final one)
CONTENT_DOWNSAMPLINGS = 3  # ours: E_sty's content branch halves the film three times
XRAY, DRR = "xray", "drr"  # the style domains
DOMAINS = (XRAY, DRR)


@dataclasses.dataclass(frozen=True)
class CT2XGANConfig(JSONConfig):
    """Shape of CT2X-GAN's generator side; the defaults are the paper's sizes and our choices where it gives none."""

    image_size: int = 256  # the paper's: film edge, px (a power of 2, >= 32); the style images have it too
    ct_size: int = 128  # the paper's: CT edge S, voxels (1 mm); a multiple of 8
    # ours: channels of E_CT's input layer and three downsampling layers (stride-2 first convolution, ours)
    ct_channels: Tuple[int, ...] = (16, 32, 64, 128)
    ct_code_channels: int = 4  # ours: channels of E_CT's latent layer; the code is 4 x (S/8)^3 = 16,384 numbers
    w_dim: int = 512  # ours (StyleGAN2's): length of each synthesis layer's code, content and style alike
    label_hidden: int = 256  # ours: width of the camera-label MLP (two layers)
    label_translation_mm: float = 530.0  # ours: the label's translation is divided by this (source-to-isocentre)
    mip_size: int = 128  # ours: MIP edge, px (one pixel per CT voxel at the isocentre scale)
    mip_patch: int = 16  # ours: the MIP is cut into mip_patch^2-pixel patches, one key/value token each (64 tokens)
    pam_hidden: int = 512  # ours: hidden width of the query and key/value MLPs (two layers each)
    # ours: channels of the seven 3x3 convolutions of each style branch (stride 2 while the map exceeds 4 x 4)
    style_channels: Tuple[int, ...] = (64, 128, 256, 256, 256, 256, 256)
    # ours: channels of the shared content branch: a stride-1 convolution, then three of stride 2 (instance-normed)
    content_channels: Tuple[int, ...] = (32, 64, 128, 256)
    channel_base: int = 16384  # ours (StyleGAN2's): G has min(channel_max, channel_base / r) channels at r x r
    channel_max: int = 512  # ours (StyleGAN2's)
    style_layers: int = 6  # the paper's: the last six synthesis layers (9-14 of 14) take the style code
    style_encoder: bool = True  # ablation "w/o E_sty" when False: no E_sty; the style layers take a learned code
    pose_attention: bool = True  # ablation "w/o PAM" when False: no MIP; f_c^w+ is the query Q alone

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_int(owner, "image_size", self.image_size, 32)
        if self.image_size & (self.image_size - 1):
            raise ValueError(f"{owner}.image_size must be a power of 2, got {self.image_size}")
        check_int(owner, "ct_size", self.ct_size, 8)
        if self.ct_size % 2**CT_DOWNSAMPLINGS:
            raise ValueError(f"{owner}.ct_size must be a multiple of 8, got {self.ct_size}")
        check_ints(owner, "ct_channels", self.ct_channels, CT_DOWNSAMPLINGS + 1, 1)
        for name in ("ct_code_channels", "w_dim", "label_hidden", "mip_size", "mip_patch", "pam_hidden",
                     "channel_base", "channel_max"):
            check_int(owner, name, getattr(self, name), 1)
        if self.mip_size % self.mip_patch:
            raise ValueError(f"{owner}.mip_size must be a multiple of mip_patch, got {self.mip_size} and "
                             f"{self.mip_patch}")
        check_ints(owner, "style_channels", self.style_channels, STYLE_CONVS, 1)
        check_ints(owner, "content_channels", self.content_channels, CONTENT_DOWNSAMPLINGS + 1, 1)
        check_int(owner, "style_layers", self.style_layers, 1)
        if self.style_layers >= self.layers:
            raise ValueError(f"{owner}.style_layers must leave content layers: G has {self.layers} layers at "
                             f"{self.image_size} px, got {self.style_layers}")
        if isinstance(self.label_translation_mm, bool) or not isinstance(self.label_translation_mm, (int, float)) \
                or not 0 < self.label_translation_mm < math.inf:
            raise ValueError(f"{owner}.label_translation_mm must be a positive number, got "
                             f"{self.label_translation_mm!r}")
        for name in ("style_encoder", "pose_attention"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{owner}.{name} must be true or false, got {getattr(self, name)!r}")

    @property
    def layers(self) -> int:
        """G's synthesis layers: two per resolution 4 ... image_size (14 at 256)."""
        return synthesis_layers(self.image_size)

    @property
    def content_layers(self) -> int:
        """The first synthesis layers, which take the content code f_c^w+ (8 of 14 at 256)."""
        return self.layers - self.style_layers

    @property
    def ct_code_length(self) -> int:
        """Length of E_CT's flattened code: latent channels x (S/8)^3."""
        return self.ct_code_channels * (self.ct_size // 2**CT_DOWNSAMPLINGS) ** 3

    @property
    def mip_tokens(self) -> int:
        """Key/value tokens of the PAM: MIP patches."""
        return (self.mip_size // self.mip_patch) ** 2

    @classmethod
    def scaled(cls, image_size: int = 64, ct_size: int = 64, width: float = 0.25) -> CT2XGANConfig:
        """The default design at these sizes, every width times `width` (at least 1); the MIP is ct_size pixels in
        8 x 8 patches, as the default's."""
        full = cls()

        def narrow(channels: int) -> int:
            return max(1, round(channels * width))

        return cls(
            image_size=image_size,
            ct_size=ct_size,
            ct_channels=tuple(narrow(c) for c in full.ct_channels),
            w_dim=narrow(full.w_dim),
            label_hidden=narrow(full.label_hidden),
            mip_size=ct_size,
            mip_patch=max(1, ct_size // (full.mip_size // full.mip_patch)),
            pam_hidden=narrow(full.pam_hidden),
            style_channels=tuple(narrow(c) for c in full.style_channels),
            content_channels=tuple(narrow(c) for c in full.content_channels),
            channel_base=narrow(full.channel_base),
            channel_max=narrow(full.channel_max),
        )


PRESETS = {
    "paper": CT2XGANConfig(),  # 256 x 256 films from 128^3 CTs
    "paper128": CT2XGANConfig(image_size=128),  # the same at 128 x 128 (G has 12 layers, the last 6 for style)
    "cpu64": CT2XGANConfig.scaled(64, 64, width=0.25),  # quarter width, 64 px films from 64^3 CTs
    "tiny32": CT2XGANConfig.scaled(32, 16, width=1 / 16),  # unit tests
}


def scaled_label(label: Tensor, translation_mm: float) -> Tensor:
    """(N, 25) camera labels with the translation entries (mm) divided by `translation_mm`."""
    if label.dim() != 2 or label.shape[1] != LABEL_SIZE:
        raise ValueError(f"camera labels must be (N, {LABEL_SIZE}), got {tuple(label.shape)}")
    scale = torch.ones(LABEL_SIZE, dtype=label.dtype, device=label.device)
    scale[list(TRANSLATION_ENTRIES)] = 1.0 / translation_mm
    return label * scale  # (N, 25)


def check_image(name: str, image: Tensor, size: int) -> None:
    """ValueError unless `image` is (N, 1, size, size)."""
    if image.dim() != 4 or image.shape[1] != 1 or image.shape[2:] != (size, size):
        raise ValueError(f"{name} must be (N, 1, {size}, {size}), got {tuple(image.shape)}")


class EncoderLayer3d(nn.Sequential):
    """One E_CT layer, the paper's: two (Conv3d 3x3x3 -> BatchNorm -> LeakyReLU 0.2); the first convolution has
    `stride` (2 in the downsampling layers, ours). Convolutions without bias (BatchNorm follows; ours)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        units = []
        for unit, (channels, unit_stride) in enumerate(((in_channels, stride), (out_channels, 1))):
            units += [
                (f"conv{unit}", nn.Conv3d(channels, out_channels, 3, stride=unit_stride, padding=1, bias=False)),
                (f"norm{unit}", nn.BatchNorm3d(out_channels)),
                (f"act{unit}", nn.LeakyReLU(NEGATIVE_SLOPE, inplace=True)),
            ]
        super().__init__(OrderedDict(units))


class CTEncoder(nn.Module):
    """E_CT: CT (N, 1, S, S, S) -> content code f_c^CT (N, ct_code_channels * (S/8)^3): an input layer, three
    downsampling layers and a latent layer, then flattened (the paper's "transformation layer")."""

    def __init__(self, config: CT2XGANConfig) -> None:
        super().__init__()
        widths = (1,) + config.ct_channels + (config.ct_code_channels,)
        names = ("input", "down1", "down2", "down3", "latent")
        strides = (1, 2, 2, 2, 1)
        self.layers = nn.Sequential(OrderedDict(
            (name, EncoderLayer3d(widths[i], widths[i + 1], stride))
            for i, (name, stride) in enumerate(zip(names, strides))
        ))
        # Channels-last 3-D convolutions and BatchNorm: forward + backward at 128^3, batch 16, bf16 on an H200
        # 263 -> 74 ms; forward at 128^3, fp32 on the 2-core CPU 1.18 -> 1.05 s (docs/ct2x_gan.md)
        self.to(memory_format=torch.channels_last_3d)

    def forward(self, ct: Tensor) -> Tensor:
        ct = ct.contiguous(memory_format=torch.channels_last_3d)
        return self.layers(ct).flatten(1)  # (N, C_latent, S/8, S/8, S/8) -> (N, code length)


def mlp(in_features: int, hidden: int, out_features: int) -> nn.Sequential:
    """Two equalised linear layers, the first activated (the PAM's MLPs; two layers each is ours)."""
    return nn.Sequential(EqualLinear(in_features, hidden, activate=True), EqualLinear(hidden, out_features))


class PoseAttention(nn.Module):
    """PAM: f_c^w+ = Q + softmax(Q K^T / tau) V, with Q = MLP(concat(f_c^CT, MLP(p))) as `content_layers` tokens of
    w_dim, and K = V = MLP(MIP patches) + a learned position embedding per patch.

    Ours: the tokens (one query per content layer, one key per MIP patch), the position embedding, tau = sqrt(w_dim)
    (scaled dot-product attention), and the residual "Q +" (the paper says the PAM "modifies" the CT code; without
    it f_c^w+ would hold nothing of the CT code but the attention weights). Without `pose_attention` (the "w/o PAM"
    ablation) f_c^w+ = Q: the pose still enters through its label.
    """

    def __init__(self, config: CT2XGANConfig) -> None:
        super().__init__()
        self.config = config
        self.label = mlp(LABEL_SIZE, config.label_hidden, config.label_hidden)
        self.query = mlp(config.ct_code_length + config.label_hidden, config.pam_hidden,
                         config.content_layers * config.w_dim)
        if config.pose_attention:
            self.key = mlp(config.mip_patch**2, config.pam_hidden, config.w_dim)
            self.position = nn.Parameter(torch.zeros(config.mip_tokens, config.w_dim))

    def forward(self, ct_code: Tensor, label: Tensor, mip: Optional[Tensor] = None) -> Tensor:
        """(N, code length), (N, 25) and the MIP (N, 1, M, M) -> f_c^w+ (N, content_layers, w_dim)."""
        query = self.queries(ct_code, label)  # (N, L_c, w_dim)
        if not self.config.pose_attention:
            if mip is not None:
                raise ValueError("this CT2X-GAN has no pose attention (the w/o PAM ablation): pass no MIP")
            return query
        if mip is None:
            raise ValueError("the pose attention needs the MIP at the target pose")
        attended, _ = self.attend(query, mip)
        return query + attended

    def queries(self, ct_code: Tensor, label: Tensor) -> Tensor:
        """Q (N, content_layers, w_dim) from the CT code (N, code length) and camera labels (N, 25)."""
        if ct_code.dim() != 2 or ct_code.shape[1] != self.config.ct_code_length:
            raise ValueError(f"CT codes must be (N, {self.config.ct_code_length}), got {tuple(ct_code.shape)}")
        if label.shape[0] != ct_code.shape[0]:
            raise ValueError(f"{label.shape[0]} camera labels for {ct_code.shape[0]} CT codes")
        pose = self.label(scaled_label(label, self.config.label_translation_mm))  # (N, label_hidden)
        query = self.query(torch.cat([ct_code, pose], dim=1))  # (N, L_c * w_dim)
        return query.view(-1, self.config.content_layers, self.config.w_dim)

    def attend(self, query: Tensor, mip: Tensor) -> Tuple[Tensor, Tensor]:
        """softmax(Q K^T / sqrt(w_dim)) V (N, L_c, w_dim) and the attention weights (N, L_c, tokens)."""
        check_image("MIP", mip, self.config.mip_size)
        if mip.shape[0] != query.shape[0]:
            raise ValueError(f"{mip.shape[0]} MIPs for {query.shape[0]} queries")
        patch = self.config.mip_patch
        patches = F.unfold(mip, patch, stride=patch).transpose(1, 2)  # (N, tokens, patch^2), row-major patches
        keys = self.key(patches) + self.position  # (N, tokens, w_dim); K = V
        weights = torch.softmax(query @ keys.transpose(1, 2) / math.sqrt(self.config.w_dim), dim=-1)  # (N, L_c, T)
        return weights @ keys, weights


def style_strides(image_size: int) -> Tuple[int, ...]:
    """Strides of a style branch's seven convolutions: 1, then 2 while the map is larger than 4 x 4 (ours)."""
    strides, size = [1], image_size
    for _ in range(STYLE_CONVS - 1):
        strides.append(2 if size > 4 else 1)
        size //= strides[-1]
    return tuple(strides)


class StyleBranch(nn.Module):
    """One style branch of E_sty, the paper's layout: film (N, 1, S, S) -> style code (N, w_dim) in (-1, 1) by seven
    3x3 convolutions (leaky ReLU; no normalisation, which would remove the style, ours), adaptive average pooling to
    1 x 1, a final 1x1 convolution and tanh."""

    def __init__(self, config: CT2XGANConfig) -> None:
        super().__init__()
        widths = (1,) + config.style_channels
        self.convs = nn.Sequential(*(
            EqualConv2d(widths[i], widths[i + 1], 3, stride=stride, activate=True)
            for i, stride in enumerate(style_strides(config.image_size))
        ))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out = EqualConv2d(widths[-1], config.w_dim, 1)

    def forward(self, image: Tensor) -> Tensor:
        features = self.pool(self.convs(image))  # (N, C, 1, 1)
        return torch.tanh(self.out(features)).flatten(1)  # (N, w_dim)


class ContentBranch(nn.Module):
    """E_sty's shared content branch (ours; the paper gives no design): film (N, 1, S, S) -> content map
    (N, C, S/8, S/8) by a stride-1 and three stride-2 3x3 convolutions, each instance-normed (removing each map's
    intensity statistics, i.e. style) and leaky-ReLU activated."""

    def __init__(self, config: CT2XGANConfig) -> None:
        super().__init__()
        widths = (1,) + config.content_channels
        self.convs = nn.Sequential(*(
            nn.Sequential(
                EqualConv2d(widths[i], widths[i + 1], 3, stride=1 if i == 0 else 2, bias=False),
                nn.InstanceNorm2d(widths[i + 1], affine=False, track_running_stats=False),
                nn.LeakyReLU(NEGATIVE_SLOPE),
            )
            for i in range(CONTENT_DOWNSAMPLINGS + 1)
        ))

    def forward(self, image: Tensor) -> Tensor:
        return self.convs(image)  # (N, C, S/8, S/8)


class StyleDecouplingEncoder(nn.Module):
    """E_sty: an X-ray style branch E_s^X, a DRR style branch E_s^DRR and the shared content branch E_c."""

    def __init__(self, config: CT2XGANConfig) -> None:
        super().__init__()
        self.image_size = config.image_size
        self.xray = StyleBranch(config)
        self.drr = StyleBranch(config)
        self.content = ContentBranch(config)

    def style(self, image: Tensor, domain: str) -> Tensor:
        """The style code (N, w_dim) of films (N, 1, S, S) by the branch of `domain` ("xray" or "drr")."""
        check_image(f"{domain} style image", image, self.image_size)
        if domain not in DOMAINS:
            raise ValueError(f"style domain must be one of {DOMAINS}, got {domain!r}")
        return (self.xray if domain == XRAY else self.drr)(image)

    def content_code(self, image: Tensor) -> Tensor:
        """The content map (N, C, S/8, S/8) of films (N, 1, S, S)."""
        check_image("content image", image, self.image_size)
        return self.content(image)


class CT2XGANGenerator(nn.Module):
    """CT2X-GAN's generator side: CT (N, 1, S, S, S), camera label (N, 25), MIP (N, 1, M, M) and a style film
    (N, 1, s, s) -> film (N, 1, s, s) at that pose in the style's domain.

    The steps are separate methods so that a CT is encoded once for many poses and styles:
    `encode_ct` -> `content_code` (per pose) -> `synthesize` with a `style_code` (per style image).
    """

    def __init__(self, config: Optional[CT2XGANConfig] = None) -> None:
        super().__init__()
        self.config = config = config or CT2XGANConfig()
        self.ct_encoder = CTEncoder(config)
        self.pose_attention = PoseAttention(config)
        self.style_encoder = StyleDecouplingEncoder(config) if config.style_encoder else None
        # w/o E_sty: one learned style code for every film (ours), so G can only learn the DRR domain
        self.fixed_style = None if config.style_encoder else nn.Parameter(torch.randn(config.w_dim))
        self.synthesis = SynthesisNetwork(config.image_size, config.w_dim, config.channel_base, config.channel_max)

    def encode_ct(self, ct: Tensor) -> Tensor:
        """f_c^CT (N, code length) of CTs (N, 1, S, S, S) in [0, 1]."""
        size = self.config.ct_size
        if ct.dim() != 5 or ct.shape[1] != 1 or ct.shape[2:] != (size, size, size):
            raise ValueError(f"CT must be (N, 1, {size}, {size}, {size}), got {tuple(ct.shape)}")
        return self.ct_encoder(ct)

    def content_code(self, ct_code: Tensor, label: Tensor, mip: Optional[Tensor] = None) -> Tensor:
        """f_c^w+ (N, content_layers, w_dim) at the labels' poses (the MIP is None without pose attention)."""
        return self.pose_attention(ct_code, label, mip)

    def style_code(self, image: Tensor, domain: str = XRAY) -> Tensor:
        """The style code (N, w_dim) of films (N, 1, s, s) of `domain` ("xray" or "drr")."""
        if self.style_encoder is None:
            raise ValueError("this CT2X-GAN has no style encoder (the w/o E_sty ablation): it takes no style image")
        return self.style_encoder.style(image, domain)

    def synthesize(self, content: Tensor, style: Optional[Tensor] = None) -> Tensor:
        """Film (N, 1, s, s) from f_c^w+ (N, content_layers, w_dim) and a style code (N, w_dim); without a style
        encoder the style is None (the learned code is used)."""
        if (style is None) != (self.style_encoder is None):
            raise ValueError("pass a style code exactly when the network has a style encoder")
        if style is None:
            style = self.fixed_style.expand(content.shape[0], -1)  # (N, w_dim)
        if style.shape != (content.shape[0], self.config.w_dim):
            raise ValueError(f"style codes must be (N, {self.config.w_dim}) for {content.shape[0]} content codes, "
                             f"got {tuple(style.shape)}")
        ws = torch.cat([content, style[:, None].expand(-1, self.config.style_layers, -1)], dim=1)  # (N, L, w_dim)
        return self.synthesis(ws)  # (N, 1, s, s)

    def forward(self, ct: Tensor, label: Tensor, mip: Optional[Tensor] = None, style_image: Optional[Tensor] = None,
                domain: str = XRAY) -> Tensor:
        """The film (N, 1, s, s) of each CT at its label's pose in the style of `style_image` (of `domain`)."""
        content = self.content_code(self.encode_ct(ct), label, mip)
        style = None if style_image is None else self.style_code(style_image, domain)
        return self.synthesize(content, style)


def build_generator(**config: Any) -> CT2XGANGenerator:
    """CT2X-GAN's generator side from JSON keyword arguments (`CT2XGANConfig.to_dict()`), for model files."""
    return CT2XGANGenerator(CT2XGANConfig.from_dict(config))
