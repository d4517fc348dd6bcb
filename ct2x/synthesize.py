"""CT + C-arm pose + style -> X-ray film with a CT2X-GAN model file: the engine under `ct2x synth` and CT2XSynth's
learned mode (issue 12 §6-§7).

    synthesizer = Synthesizer("ct2x-gan.safetensors", load_ct("chest.nrrd"), style="pa.png")  # encodes the CT once
    film = synthesizer.render(30.0)                  # (256, 256) float32 in [0, 1], radiological display
    save_style_code("style.safetensors", synthesizer.style_code())    # later: style=load_style_code(...)

The network's inputs are made exactly as `ct2x prepare synth` made its training data
(`ct2x.data.prepare_synth.prepare_case`):
- the CT: resampled (linear) onto the preparation's cube about the CT's centre (`ct_cube`: `ct_voxels`^3 voxels of
  `voxel_mm`, array (D, H, W) = KJI, D superior -> inferior, H anterior -> posterior, W patient's right -> left),
  rounded to whole HU and clipped to the case files' int16 range, then `x2ct_normalize`d: (1, 1, D, H, W) in [0, 1];
- the camera label at a pose: `View.camera_label()` of the preparation's C-arm (`film_px` detector over `sensor_mm`)
  at the primary and secondary angles (degrees) about the cube's centre, the isocentre (`camera_labels`);
- the pose MIP: the same view on an `mip_px` detector, maximum intensity along its rays through the normalised cube,
  as `pose_mips` makes it (one `SliceWarpProjector` kept for the CT; its output depends on the view alone);
- the style: a real film prepared by `prepare_film` at `film_px` (as the style films were), mapped [0, 1] -> [-1, 1],
  through E_sty's X-ray branch; or a style code saved before.
The film G makes, in [-1, 1], is mapped to [0, 1]: the scale of the training DRRs and films (attenuation divided by
its maximum: air 0, the densest bone 1, bone bright), in the view's radiological display (`ct2x.geometry`).

Model-file convention (`ModelInfo` of kind "ct2x-gan"; `model_conventions` writes it): `inputs["preparation"]` holds
the `SynthPreparation` settings the training data was made with, as `preparation.json` stores them. Fields it lacks
take SynthPreparation's defaults (the paper's 1 mm cube, DeepDRR's mobile C-arm), except the three sizes
(`ct_voxels`, `film_px`, `mip_px`), which default to the network's own (`ct_size`, `image_size`, `mip_size`); sizes
that contradict the network are refused.

Speed: the CT is encoded once (E_CT, and the CT's share of the PAM's first query layer), the style once (E_sty, and
G's style layers: their modulated, demodulated kernels and image kernels are folded once per style). A pose then
costs its camera label, its MIP (when the model has pose attention), the rest of the PAM and G's content layers,
which take StyleGAN2's unfused form (input scaled by the style, fixed kernel, output demodulated: the same function
as the network's per-sample kernels, without rebuilding 512 x 512 x 3 x 3 kernels per call). precision "bf16" runs G
in bfloat16 (CPUs with AVX-512 BF16 or AMX, GPUs). bench/RESULTS.md has the times.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from ct2x import __version__
from ct2x.data.films import PreparedFilm, prepare_film
from ct2x.data.prepare_synth import SynthPreparation, synth_cube
from ct2x.errors import CT2XInputError
from ct2x.geometry import View
from ct2x.models import LoadedModel, ModelInfo
from ct2x.precision import check_precision
from ct2x.preprocess import x2ct_normalize
from ct2x.projector import SliceWarpProjector
from ct2x.volume import CTVolume

PathLike = Union[str, os.PathLike]
KIND = "ct2x-gan"  # CT2X-GAN's generator side (ct2x.models.architectures)
STYLE_CODE_KEY = "style_code"  # the tensor of a style-code file
STYLE_METADATA_KEY = "ct2x_style_code"  # its header metadata entry
STYLE_CODE_FORMAT = 1
SIZE_FIELDS = {"ct_voxels": "ct_size", "film_px": "image_size", "mip_px": "mip_size"}  # preparation -> network
ENCODING_SHARES = (0.1, 0.9)  # progress: the cube is done at 10 %, E_CT at 90 %, the MIP projector at 100 %
Progress = Callable[[float], None]  # fraction of the CT encoding done, 0 ... 1; raising in it stops the encoding


class StyleCode(NamedTuple):
    """A style code: `code` (w_dim,) float32 in (-1, 1) from E_sty's X-ray branch; `model`, the fingerprint of the
    weights that made it (`style_fingerprint`); `source`, what it was made from (a film's path, for people)."""

    code: np.ndarray
    model: str
    source: str = ""


class SynthInputs(NamedTuple):
    """The network's inputs at one pose: `view` (the film's geometry), `label` (1, 25) float32 and `mip`
    (1, 1, M, M) float32 in [0, 1] (None for a model without pose attention)."""

    view: View
    label: torch.Tensor
    mip: Optional[torch.Tensor]


StyleInput = Union[PathLike, np.ndarray, PreparedFilm, StyleCode, None]


def model_conventions(settings: SynthPreparation) -> Dict[str, Dict[str, Any]]:
    """`inputs` and `outputs` for the ModelInfo of a CT2X-GAN trained on data prepared with `settings`:
    `ModelInfo(kind="ct2x-gan", config=..., license=..., **model_conventions(settings))`."""
    return {
        "inputs": {
            "preparation": dataclasses.asdict(settings),
            "ct": "x2ct_normalize(HU) of the preparation's cube, (1, 1, D, H, W) = KJI (ct2x.data.x2ct_convention)",
            "pose": "camera label (View.camera_label) and pose MIP of the preparation's C-arm about the cube's centre",
            "style": "a real film through ct2x.data.films.prepare_film at film_px, [0, 1] mapped to [-1, 1]",
        },
        "outputs": {"film": "[-1, 1]; (x + 1) / 2 is attenuation / its maximum, bone bright, radiological display"},
    }


def check_kind(info: ModelInfo) -> None:
    """CT2XInputError unless the model is CT2X-GAN's generator side."""
    if info.kind != KIND:
        raise CT2XInputError(f"the model is a {info.kind!r} network, not CT2X-GAN's generator (kind {KIND!r}); "
                             "ct2x synth needs a CT2X-GAN model file")


def network_config(info: ModelInfo):
    """The CT2XGANConfig of a CT2X-GAN model file; CT2XInputError for a configuration this ct2x refuses."""
    from ct2x.nets.ct2x_gan import CT2XGANConfig

    check_kind(info)
    try:
        return CT2XGANConfig.from_dict(info.config)
    except CT2XInputError as error:
        raise CT2XInputError(f"the model file's configuration: {error}") from None


def preparation_of(info: ModelInfo) -> SynthPreparation:
    """How the model's training data was prepared: `info.inputs["preparation"]` over the defaults (module docstring);
    CT2XInputError for unknown fields, impossible settings, or sizes that contradict the network."""
    config = network_config(info)
    given = info.inputs.get("preparation", {})
    if not isinstance(given, dict):
        raise CT2XInputError(f"the model file's inputs.preparation must be a JSON object, got {given!r}")
    known = {field.name for field in dataclasses.fields(SynthPreparation)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise CT2XInputError(f"the model file's inputs.preparation has unknown fields {unknown}: it was written by a "
                             "newer ct2x; update ct2x")
    sizes = {name: getattr(config, size) for name, size in SIZE_FIELDS.items()}
    try:
        settings = SynthPreparation(**{**sizes, **given})
    except (TypeError, ValueError) as error:
        raise CT2XInputError(f"the model file's inputs.preparation: {error}") from None
    for name, size in SIZE_FIELDS.items():
        if name == "mip_px" and not config.pose_attention:
            continue
        if getattr(settings, name) != getattr(config, size):
            raise CT2XInputError(f"the model file's inputs.preparation.{name} is {getattr(settings, name)}, but its "
                                 f"network's {size} is {getattr(config, size)}; the file is inconsistent")
    return settings


def synth_model_file(model: PathLike) -> Tuple[Path, ModelInfo, SynthPreparation]:
    """(the file, its ModelInfo, its SynthPreparation) of a CT2X-GAN model file or registry name, from the header
    only (fast); CT2XInputError for a missing file, another kind, or a preparation this engine cannot follow."""
    from ct2x.models import model_path, read_info

    path = model_path(model)
    info = read_info(path)
    return path, info, preparation_of(info)


def load_synth_model(model: Union[PathLike, LoadedModel], device: str = "cpu") -> LoadedModel:
    """The CT2X-GAN generator of a model file (or registry name), or `model` itself when loaded (checked)."""
    from ct2x import models

    if isinstance(model, LoadedModel):
        preparation_of(model.info)
        return model
    return models.load(synth_model_file(model)[0], device=device)


def style_fingerprint(network: torch.nn.Module) -> str:
    """SHA256 (hex) of the X-ray style branch's weights: the same for every copy of one model's E_sty, so a style
    code is only ever used with the weights that made it."""
    digest = hashlib.sha256()
    for name, tensor in network.style_encoder.xray.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def save_style_code(path: PathLike, style: StyleCode) -> Path:
    """Write a style code as a `.safetensors` file (atomically): the code as tensor "style_code", and in the header
    the model fingerprint and source. Safetensors rather than .npy: one format with the model files, no pickle, and a
    header that keeps the code with the model it belongs to."""
    from safetensors.torch import save_file

    from ct2x.models.model_file import atomic_file

    path = Path(path).expanduser()
    if path.suffix != ".safetensors":
        raise CT2XInputError(f"{path}: a style code file's name ends in .safetensors")
    if not path.parent.is_dir():
        raise CT2XInputError(f"{path}: folder {path.parent} does not exist; create it first")
    metadata = {"format_version": STYLE_CODE_FORMAT, "model": style.model, "source": style.source,
                "created_by": f"ct2x {__version__}"}
    tensor = torch.from_numpy(np.ascontiguousarray(style.code, dtype=np.float32))
    with atomic_file(path) as temporary:
        save_file({STYLE_CODE_KEY: tensor}, str(temporary), metadata={STYLE_METADATA_KEY: json.dumps(metadata)})
    return path


def load_style_code(path: PathLike) -> StyleCode:
    """The style code in a file `save_style_code` wrote; CT2XInputError for any other file."""
    from safetensors import SafetensorError, safe_open

    path = Path(path).expanduser()
    if not path.is_file():
        raise CT2XInputError(f"{path}: no such style code file")
    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = json.loads((handle.metadata() or {})[STYLE_METADATA_KEY])
            code = handle.get_tensor(STYLE_CODE_KEY)
    except (SafetensorError, KeyError, ValueError) as error:
        raise CT2XInputError(f"{path}: not a ct2x style code file ({error}); make one with `ct2x synth` or "
                             "ct2x.synthesize.save_style_code") from None
    if not isinstance(metadata, dict) or metadata.get("format_version") != STYLE_CODE_FORMAT or code.ndim != 1 or \
            not np.isfinite(code).all():
        raise CT2XInputError(f"{path}: a damaged or newer style code file; make it again with this ct2x")
    return StyleCode(code.astype(np.float32), str(metadata.get("model", "")), str(metadata.get("source", "")))


class Synthesizer:
    """Films of one CT at any C-arm pose in one style, with a CT2X-GAN model; the CT and the style are encoded once.

    model: a model file, registry name or loaded model of kind "ct2x-gan" (put in eval mode on `device`). ct: the
    CT (any grid; put on the model's cube here). style: a reference X-ray (file, array or `PreparedFilm`; prepared by
    `prepare_film` as `style_view`, "pa" or "lateral", at the model's film size), a `StyleCode`, a style-code file
    (.safetensors), or None for a model without a style encoder. precision: "fp32" or "bf16" (G in bfloat16).
    progress: called with the fraction of the CT encoding done; an exception raised in it stops the encoding and
    leaves this constructor.
    """

    def __init__(self, model: Union[PathLike, LoadedModel], ct: CTVolume, style: StyleInput = None,
                 style_view: str = "pa", device: str = "cpu", precision: str = "fp32",
                 progress: Optional[Progress] = None) -> None:
        from ct2x.device import torch_device

        check_precision(precision)
        self.device = torch_device(device)
        network, self.info = load_synth_model(model, str(self.device))
        self.network = network.to(self.device).eval()
        self.config = self.network.config
        self.preparation = preparation_of(self.info)
        self.film_carm = self.preparation.carm(self.preparation.film_px)
        self.mip_carm = self.preparation.carm(self.preparation.mip_px)
        self._dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        report = progress or (lambda fraction: None)
        with torch.inference_mode():
            self._generator = _CachedGenerator(self.network, self._dtype)
            self._style: Optional[StyleCode] = None
            self.set_style(style, style_view)  # before the CT: a bad style fails at once
            self.cube = synth_cube(ct, self.preparation)
            report(ENCODING_SHARES[0])
            values = x2ct_normalize(torch.from_numpy(self.cube.hu)).to(self.device)[None, None]  # (1, 1, D, H, W)
            self._generator.set_ct(self._encode(values, report))
            self._projector = None
            if self.config.pose_attention:
                # The re-slicings of a sweep over the preparation's angles; a sheared one that only some view in
                # between needs is built when first met (a few ms on a 128^3 cube).
                self._projector = SliceWarpProjector(values, self.cube.affine)
                self._projector.prepare([self.mip_view(angle) for angle in self.preparation.angles_deg], mode="max",
                                        sweep=True)
        report(1.0)

    @property
    def isocenter_ras(self) -> np.ndarray:
        """(3,) RAS mm: the cube's centre, about which the C-arm turns (as in the training data)."""
        return self.cube.center_ras

    def view(self, primary_deg: float, secondary_deg: float = 0.0) -> View:
        """The film's view at C-arm angles in degrees: the preparation's C-arm, `film_px` detector, about the cube."""
        return self.film_carm.view(primary_deg, secondary_deg, self.isocenter_ras)

    def mip_view(self, primary_deg: float, secondary_deg: float = 0.0) -> View:
        """The pose MIP's view: the same C-arm with an `mip_px` detector over the same sensor."""
        return self.mip_carm.view(primary_deg, secondary_deg, self.isocenter_ras)

    def inputs(self, primary_deg: float, secondary_deg: float = 0.0) -> SynthInputs:
        """The network's pose inputs at these C-arm angles (degrees), made as `prepare_case` made them."""
        view = self.view(primary_deg, secondary_deg)
        label = torch.from_numpy(view.camera_label())[None].to(self.device)  # (1, 25)
        mip = None
        if self._projector is not None:
            with torch.inference_mode():
                mip = self._projector.project([self.mip_view(primary_deg, secondary_deg)], mode="max")[0].float()
        return SynthInputs(view, label, mip)  # mip: (1, 1, M, M) in [0, 1]

    def render(self, primary_deg: float, secondary_deg: float = 0.0) -> np.ndarray:
        """The film (film_px, film_px) float32 in [0, 1] at C-arm angles in degrees (0 = AP, +90 = left lateral;
        secondary + cranial), bone bright, in the view's radiological display."""
        _, label, mip = self.inputs(primary_deg, secondary_deg)
        with torch.inference_mode():
            film = self._generator(label, mip)  # (1, 1, S, S) in [-1, 1]
        return ((film[0, 0] + 1.0) / 2.0).clamp(0.0, 1.0).cpu().numpy().astype(np.float32)

    def style_code(self) -> Optional[StyleCode]:
        """The style in use (None for a model without a style encoder)."""
        return self._style

    def set_style(self, style: StyleInput, view: str = "pa") -> None:
        """Use another style; the CT stays encoded. `style` as in the constructor."""
        if self.network.style_encoder is None:
            if style is not None:
                raise CT2XInputError("this CT2X-GAN has no style encoder (the w/o E_sty ablation): it takes no style; "
                                     "leave the style out")
            with torch.inference_mode():
                self._generator.set_style(self.network.fixed_style[None])
            return
        if style is None:
            raise CT2XInputError("this CT2X-GAN needs a style: a reference X-ray film or a saved style code")
        if isinstance(style, (str, os.PathLike)) and Path(style).suffix == ".safetensors":
            style = load_style_code(style)
        if isinstance(style, StyleCode):
            code = self._checked(style)
        else:
            film = _prepared(style, view, self.preparation.film_px)
            image = torch.from_numpy(film.image).to(self.device)[None, None] * 2.0 - 1.0  # (1, 1, F, F) in [-1, 1]
            with torch.inference_mode():
                code = self.network.style_code(image, "xray")  # (1, w_dim)
            source = str(style) if isinstance(style, (str, os.PathLike)) else ""
            style = StyleCode(code[0].cpu().numpy(), style_fingerprint(self.network), source)
        with torch.inference_mode():
            self._generator.set_style(code)
        self._style = style

    def _checked(self, style: StyleCode) -> torch.Tensor:
        """The style code as (1, w_dim) on the device, once it fits this model."""
        if style.code.shape != (self.config.w_dim,):
            raise CT2XInputError(f"the style code has {style.code.size} numbers; this model's have {self.config.w_dim}")
        if style.model != style_fingerprint(self.network):
            raise CT2XInputError("the style code was made by another model (its style encoder's weights differ); "
                                 "make it again from the reference film with this model")
        return torch.from_numpy(style.code).to(self.device)[None]

    def _encode(self, ct: torch.Tensor, report: Progress) -> torch.Tensor:
        """f_c^CT (1, code length) of the normalised cube, reporting after each E_CT layer by its share of the
        multiply-adds (27 x in x out per output voxel for each of its two convolutions)."""
        layers = list(self.network.ct_encoder.layers)
        size, work = ct.shape[2], []
        for layer in layers:
            size //= layer.conv0.stride[0]  # the layer's output edge, voxels
            channels = layer.conv0.out_channels
            work.append(27.0 * size**3 * channels * (layer.conv0.in_channels + channels))
        total, done = sum(work), [0.0]
        start, end = ENCODING_SHARES

        def after(share: float) -> Callable:
            def hook(_module, _inputs, _output) -> None:
                done[0] += share
                report(start + (end - start) * done[0] / total)
            return hook

        handles = [layer.register_forward_hook(after(share)) for layer, share in zip(layers, work)]
        try:
            return self.network.encode_ct(ct)
        finally:
            for handle in handles:
                handle.remove()


def _prepared(film: Union[PathLike, np.ndarray, PreparedFilm], view: str, size: int) -> PreparedFilm:
    """The style film as the style films of the training data were made (`prepare_film`), or checked if prepared."""
    if not isinstance(film, PreparedFilm):
        try:
            return prepare_film(film, view, size)
        except CT2XInputError as error:
            raise CT2XInputError(f"style film: {error}") from None
    if film.image.shape != (size, size) or film.image.dtype != np.float32 or not np.isfinite(film.image).all():
        raise CT2XInputError(f"the prepared style film is {film.image.shape} {film.image.dtype}; the model reads "
                             f"({size}, {size}) float32 films")
    return film


class _CachedGenerator:
    """CT2X-GAN's `content_code` + `synthesize` at batch 1 for one CT and one style, with all that depends on neither
    the pose nor the input computed once. The same function as the network's (tests/test_synthesize.py checks it):

    - PAM: the first query layer is linear in concat(f_c^CT, MLP(p)), so the CT's share (with the bias) is computed
      once per CT; a pose adds the label's share, then the network's own label MLP, second query layer and attention.
    - G, layers taking the style (and the image layers after them): the kernels the network modulates and
      demodulates per call are built once per style, exactly as the network builds them.
    - G, layers taking the pose's content code: StyleGAN2's unfused modulation, conv(x * s, W) * d with d =
      rsqrt((W^2 summed over the kernel) s^2 + eps), equal to the network's conv(x, W * s * d) up to rounding, but
      without a new kernel per call; `dtype` bfloat16 runs G's convolutions in bfloat16, channels_last.
    """

    def __init__(self, network: torch.nn.Module, dtype: torch.dtype) -> None:
        from ct2x.nets.ct2x_gan_layers import leaky_relu

        self.network, self.dtype, self.activation = network, dtype, leaky_relu
        self.config = network.config
        first = network.pose_attention.query[0]  # EqualLinear(code length + label_hidden -> pam_hidden)
        weight = first.weight * first.scale  # (pam_hidden, code length + label_hidden)
        self._query_weight_ct = weight[:, :self.config.ct_code_length]
        self._query_weight_pose = weight[:, self.config.ct_code_length:]
        self._query_ct: Optional[torch.Tensor] = None  # (1, pam_hidden), set_ct
        synthesis = network.synthesis
        self._constant = _layout(synthesis.constant[None], dtype)  # (1, C_4, 4, 4)
        self._layers = [_PoseLayer(layer, dtype) for block in synthesis.blocks for layer in (block.conv0, block.conv1)]
        self._image_kernels: List[Optional[torch.Tensor]] = [None] * len(synthesis.blocks)  # set_style

    def set_ct(self, ct_code: torch.Tensor) -> None:
        """Cache the CT's share of the first query layer: (1, code length) -> (1, pam_hidden)."""
        self._query_ct = F.linear(ct_code, self._query_weight_ct, self.network.pose_attention.query[0].bias)

    def set_style(self, style: torch.Tensor) -> None:
        """Fold the style code (1, w_dim) into the layers that take it."""
        blocks = self.network.synthesis.blocks
        content_layers = self.config.content_layers
        for index, layer in enumerate(self._layers):
            if index >= content_layers:
                self._layers[index] = _StyleLayer(layer.layer, style, self.dtype)
        for index, block in enumerate(blocks):
            if 2 * index + 1 >= content_layers:
                self._image_kernels[index] = _image_kernel(block.to_image, style, self.dtype)

    def __call__(self, label: torch.Tensor, mip: Optional[torch.Tensor]) -> torch.Tensor:
        """The film (1, 1, S, S) float32 in [-1, 1] at the pose of `label` (1, 25) with its MIP (1, 1, M, M)."""
        return self.synthesize(self.content_code(label, mip))

    def content_code(self, label: torch.Tensor, mip: Optional[torch.Tensor]) -> torch.Tensor:
        """f_c^w+ (1, content_layers, w_dim), as `PoseAttention.forward`."""
        from ct2x.nets.ct2x_gan import scaled_label

        attention = self.network.pose_attention
        pose = attention.label(scaled_label(label, self.config.label_translation_mm))  # (1, label_hidden)
        hidden = self._query_ct + F.linear(pose, self._query_weight_pose)  # (1, pam_hidden)
        if attention.query[0].activate:
            hidden = self.activation(hidden)
        query = attention.query[1](hidden).view(1, self.config.content_layers, self.config.w_dim)
        if mip is None:
            return query
        attended, _ = attention.attend(query, mip)
        return query + attended

    def synthesize(self, content: torch.Tensor) -> torch.Tensor:
        """G (`SynthesisNetwork.forward`) with the content codes (1, content_layers, w_dim) and the folded style."""
        x, image = self._constant, None
        for index, block in enumerate(self.network.synthesis.blocks):
            for layer_index in (2 * index, 2 * index + 1):
                code = content[:, layer_index] if layer_index < self.config.content_layers else None
                x = self._layers[layer_index](x, code)  # (1, C_r, r, r)
            kernel = self._image_kernels[index]
            if kernel is None:
                kernel = _image_kernel(block.to_image, content[:, 2 * index + 1], self.dtype)
            # the modulated 1x1 to-image convolution as a product over channels: (1, r, r, C) @ (C, 1)
            layer_image = (x.permute(0, 2, 3, 1) @ kernel).permute(0, 3, 1, 2).float()  # (1, 1, r, r)
            layer_image = layer_image + block.to_image.bias[:, None, None]
            if image is not None:
                layer_image = layer_image + F.interpolate(image, scale_factor=2, mode="bilinear", align_corners=False)
            image = layer_image  # (1, 1, r, r)
        return image


class _PoseLayer:
    """A synthesis layer whose code changes with the pose: conv(up(x) * s, W) * d + b, then the leaky ReLU."""

    def __init__(self, layer: torch.nn.Module, dtype: torch.dtype) -> None:
        self.layer, conv = layer, layer.conv
        self.affine_weight = conv.affine.weight * conv.affine.scale  # (in, w_dim): EqualLinear's, scaled once
        weight = conv.weight * conv.scale  # (out, in, k, k)
        self.squares = weight.square().sum(dim=(2, 3)).T  # (in, out): demodulation's sums per input channel
        self.weight = _layout(weight, dtype)
        self.bias = layer.bias.to(dtype)[None, :, None, None]  # (1, out, 1, 1)

    def __call__(self, x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        from ct2x.nets.ct2x_gan_layers import DEMODULATION_EPS, leaky_relu

        conv = self.layer.conv
        styles = F.linear(code, self.affine_weight, conv.affine.bias)  # (1, in), as conv.affine(code)
        demodulation = torch.rsqrt(styles.square() @ self.squares + DEMODULATION_EPS)  # (1, out)
        if conv.upsample:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        x = F.conv2d(x * styles.to(x.dtype)[:, :, None, None], self.weight, padding=conv.padding)  # (1, out, r, r)
        return leaky_relu(torch.addcmul(self.bias, x, demodulation.to(x.dtype)[:, :, None, None]))


class _StyleLayer:
    """A synthesis layer whose code is the style: its kernel modulated and demodulated once, as the network does."""

    def __init__(self, layer: torch.nn.Module, style: torch.Tensor, dtype: torch.dtype) -> None:
        from ct2x.nets.ct2x_gan_layers import DEMODULATION_EPS

        self.layer, conv = layer, layer.conv
        weight = conv.weight[None] * conv.scale * conv.affine(style)[:, None, :, None, None]  # (1, out, in, k, k)
        weight = weight * torch.rsqrt(weight.square().sum(dim=(2, 3, 4), keepdim=True) + DEMODULATION_EPS)
        self.weight = _layout(weight[0], dtype)
        self.bias = layer.bias.to(dtype)

    def __call__(self, x: torch.Tensor, code: None) -> torch.Tensor:
        from ct2x.nets.ct2x_gan_layers import leaky_relu

        conv = self.layer.conv
        if conv.upsample:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        return leaky_relu(F.conv2d(x, self.weight, self.bias, padding=conv.padding))  # (1, out, r, r)


def _image_kernel(to_image: torch.nn.Module, code: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The to-image layer's modulated 1x1 kernel for `code` (1, w_dim), as (C, 1) (not demodulated)."""
    conv = to_image.conv
    return (conv.weight[0, :, 0, 0] * conv.scale * conv.affine(code)[0])[:, None].to(dtype)  # (C, 1)


def _layout(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A 4-D tensor in `dtype`, channels_last (oneDNN's and cuDNN's fast layout for these convolutions)."""
    return tensor.to(dtype).contiguous(memory_format=torch.channels_last)
