"""X2CT-GAN's official checkpoints (kylekma/X2CT) as CT2X networks: the official state-dict names mapped onto ours.

Written from the official networks' state-dict manifests (names and shapes) only. An official checkpoint is a
`torch.save`d dict with keys iters, epoch, state_dict and lr; its state dict may carry DataParallel's `module.`
prefix, and holds the running statistics of instance norms that never use them, which are dropped.

Official decoder layers are numbered -1 (finest) ... 4 (coarsest); ours are levels 0 ... 5.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Tuple, Union

import torch
from torch import nn

from ct2x.errors import CT2XInputError
from ct2x.nets.patch_discriminator import PatchDiscriminator3d, PatchDiscriminatorConfig
from ct2x.nets.x2ct import DECODER_LEVELS, ENCODER_STAGES, X2CTConfig, X2CTGenerator, X2CTSingleViewGenerator

VARIANTS = ("biplanar", "single", "discriminator")  # X2CT-GAN+B, X2CT-GAN+S, the conditional 3-D PatchGAN
NORM_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")  # instance-norm buffers, dropped
DATA_PARALLEL_PREFIX = "module."


def official_network(variant: str) -> nn.Module:
    """A new CT2X network of the official shape: X2CTGenerator, X2CTSingleViewGenerator or PatchDiscriminator3d."""
    _check_variant(variant)
    if variant == "biplanar":
        return X2CTGenerator(X2CTConfig())
    if variant == "single":
        return X2CTSingleViewGenerator(X2CTConfig())
    return PatchDiscriminator3d(PatchDiscriminatorConfig())


def official_names(variant: str) -> Dict[str, str]:
    """Official state-dict name -> CT2X name, for every parameter of `variant`, in the official order."""
    _check_variant(variant)
    if variant == "biplanar":
        modules = [
            *_branch_modules("view1Model.", "pa.", compress_apart=True),
            *_branch_modules("view2Model.", "lateral.", compress_apart=True),
            *_decoder_modules("", "fusion_levels.", "fusion_head.", X2CTConfig().fusion_blocks, compress_apart=False),
        ]
    elif variant == "single":
        modules = list(_branch_modules("", "", compress_apart=False))
    else:
        modules = list(_discriminator_modules())
    return {f"{official}.{kind}": f"{ours}.{kind}" for official, ours, kinds in modules for kind in kinds}


def official_to_ct2x(
    state_dict: Mapping[str, Any], variant: str, source: str = "state dict"
) -> Dict[str, torch.Tensor]:
    """The CT2X state dict of an official one (as `read_official_checkpoint` returns it).

    Strips a `module.` prefix and drops instance-norm running statistics; CT2XInputError naming every missing,
    left-over and wrong-shape tensor (official name and ours) unless the rest maps one-to-one onto the network.
    `source` names the state dict in messages, e.g. the checkpoint's path.
    """
    names = official_names(variant)
    shapes = _ct2x_shapes(variant)
    tensors: Dict[str, Any] = {}
    twice: List[str] = []
    for key, value in state_dict.items():
        name = key[len(DATA_PARALLEL_PREFIX):] if key.startswith(DATA_PARALLEL_PREFIX) else key
        if name.rsplit(".", 1)[-1] in NORM_STATISTICS:
            continue
        if name in tensors:
            twice.append(name)
        tensors[name] = value
    missing = [f"{name} (ours {ours})" for name, ours in names.items() if name not in tensors]
    left_over = [name for name in tensors if name not in names]
    wrong_shape = [
        f"{name} (ours {ours}): {_describe(tensors[name])}, expected {'x'.join(map(str, shapes[ours])) or 'scalar'}"
        for name, ours in names.items()
        if name in tensors and not (torch.is_tensor(tensors[name]) and tuple(tensors[name].shape) == shapes[ours])
    ]
    if missing or left_over or wrong_shape or twice:
        raise CT2XInputError(_mismatch_message(source, variant, missing, left_over, wrong_shape, twice, tensors))
    return {ours: tensors[name] for name, ours in names.items()}


def read_official_checkpoint(path: Union[str, Path]) -> Dict[str, torch.Tensor]:
    """The state dict of an official checkpoint file (`torch.load(weights_only=True)`; a bare state dict is also read).

    CT2XInputError naming the file when it cannot be read, is not a PyTorch file that loads without running code, or
    holds no state dict.
    """
    path = Path(path)
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as error:
        raise CT2XInputError(f"{path}: cannot read the checkpoint: {error.strerror or error}") from None
    except Exception as error:  # torch.load fails on a foreign or damaged file with many exception types
        raise CT2XInputError(
            f"{path}: not a PyTorch checkpoint that loads safely (torch.load with weights_only=True): {error}"
        ) from None
    state_dict = content["state_dict"] if isinstance(content, dict) and "state_dict" in content else content
    if not _is_state_dict(state_dict):
        found = f"a dict with keys {sorted(map(str, content))[:8]}" if isinstance(content, dict) else repr(content)[:80]
        raise CT2XInputError(f"{path}: not an X2CT-GAN checkpoint: expected a dict with keys iters, epoch, state_dict "
                             f"and lr, the state dict mapping names to tensors; found {found}")
    return dict(state_dict)


def _is_state_dict(value: Any) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(
        isinstance(key, str) and torch.is_tensor(tensor) for key, tensor in value.items()
    )


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise CT2XInputError(f"unknown X2CT-GAN variant {variant!r}; expected one of {', '.join(VARIANTS)}")


ModuleNames = Iterator[Tuple[str, str, Tuple[str, ...]]]  # (official module, our module, parameter names)
WEIGHT_AND_BIAS = ("weight", "bias")


def _branch_modules(official: str, ours: str, compress_apart: bool) -> ModuleNames:
    """One film's encoder, Connection-A and -B and decoder; `compress_apart`: the biplanar branches' layout."""
    config = X2CTConfig()
    yield f"{official}encoder_layer.1", f"{ours}encoder.stem.conv", WEIGHT_AND_BIAS
    for stage, layers in enumerate(config.encoder_blocks):
        official_stage, our_stage = f"{official}encoder_layer{stage}", f"{ours}encoder.stages.{stage}"
        yield f"{official_stage}.2", f"{our_stage}.down.conv", WEIGHT_AND_BIAS
        for layer in range(layers):
            official_layer = f"{official_stage}.3.conv_block.{layer}"
            yield f"{official_layer}.conv1", f"{our_stage}.dense.{layer}.bottleneck.conv", WEIGHT_AND_BIAS
            yield f"{official_layer}.conv2", f"{our_stage}.dense.{layer}.grow.conv", WEIGHT_AND_BIAS
        if stage < ENCODER_STAGES - 1:
            yield f"{official_stage}.6", f"{our_stage}.compress.conv", WEIGHT_AND_BIAS
    yield f"{official}base_link.0", f"{ours}to_volume.linear", WEIGHT_AND_BIAS
    for level in range(ENCODER_STAGES):
        official_link = f"{official}linker_layer{level}.0"
        yield f"{official_link}.compress_block.0", f"{ours}skips.{level}.reduce.conv", WEIGHT_AND_BIAS
        yield f"{official_link}.conv_block.0", f"{ours}skips.{level}.refine.conv", WEIGHT_AND_BIAS
    yield from _decoder_modules(official, f"{ours}levels.", f"{ours}head.", config.view_decoder_blocks, compress_apart)


def _decoder_modules(
    official: str, our_levels: str, our_head: str, blocks: Tuple[int, ...], compress_apart: bool
) -> ModuleNames:
    """Our level j is official decoder_layer{j-1}: [compress,] conv blocks, [up]; each module 3 entries apart
    (conv, norm, ReLU). `compress_apart`: the compress conv is decoder_compress_layer{j-1} instead."""
    for level in (*range(1, DECODER_LEVELS), 0):  # the official order: decoder_layer-1 last
        official_layer, ours = f"{official}decoder_layer{level - 1}", f"{our_levels}{level}"
        position = 0
        if level < ENCODER_STAGES:
            if compress_apart:
                yield f"{official}decoder_compress_layer{level - 1}.0", f"{ours}.compress.conv", WEIGHT_AND_BIAS
            else:
                yield f"{official_layer}.0", f"{ours}.compress.conv", WEIGHT_AND_BIAS
                position = 3
        for block in range(blocks[level]):
            yield f"{official_layer}.{position + 3 * block}", f"{ours}.blocks.{block}.conv", WEIGHT_AND_BIAS
        if level > 0:
            up = position + 3 * blocks[level]
            yield f"{official_layer}.{up}.block.block.0", f"{ours}.up.conv", WEIGHT_AND_BIAS
    yield f"{official}decoder_layer.0", f"{our_head}conv", WEIGHT_AND_BIAS


def _discriminator_modules() -> ModuleNames:
    """Official `model` is one Sequential: conv, leaky ReLU, then (conv, norm, leaky ReLU) per hidden layer, conv."""
    layers = PatchDiscriminatorConfig().strided_layers
    yield "model.0", "blocks.0.conv", WEIGHT_AND_BIAS
    for layer in range(1, layers + 1):
        yield f"model.{3 * layer - 1}", f"blocks.{layer}.conv", ("weight",)
    yield f"model.{3 * layers + 2}", "head", WEIGHT_AND_BIAS


@functools.lru_cache(maxsize=None)
def _ct2x_shapes(variant: str) -> Dict[str, Tuple[int, ...]]:
    """Our state dict's shapes, from a network built without memory where torch can (meta device, torch >= 2)."""
    device = torch.device("meta") if hasattr(torch.device, "__enter__") else contextlib.nullcontext()
    with device:
        network = official_network(variant)
    return {name: tuple(tensor.shape) for name, tensor in network.state_dict().items()}


def _describe(value: Any) -> str:
    if torch.is_tensor(value):
        return "x".join(map(str, value.shape)) or "scalar"
    return f"not a tensor but {type(value).__name__}"


def _mismatch_message(
    source: str,
    variant: str,
    missing: List[str],
    left_over: List[str],
    wrong_shape: List[str],
    twice: List[str],
    tensors: Mapping[str, Any],
) -> str:
    lines = [f"{source} is not the official X2CT-GAN {variant} network's state dict:"]
    for title, items in (
        ("missing (official name, ours)", missing),
        ("left over (official name)", left_over),
        ("wrong shape (official name, ours): found, expected", wrong_shape),
        ("given twice, with and without the module. prefix", twice),
    ):
        if items:
            lines.append(f"  {len(items)} {title}:")
            lines.extend(f"    {item}" for item in items)
    best = max(VARIANTS, key=lambda other: len(set(official_names(other)) & set(tensors)))
    if best != variant and set(official_names(best)) & set(tensors):
        lines.append(f"  its names are those of the {best} variant: is the variant right?")
    return "\n".join(lines)


def import_official_checkpoint(checkpoint: Union[str, Path], variant: str, out: Union[str, Path]) -> Path:
    """Read an official X2CT-GAN generator checkpoint and write it as a CT2X model file (`ct2x.models`) at `out`.

    The model file records the checkpoint's SHA256 and the official licence terms; it loads with
    `ct2x.models.load(out)` and takes films and gives volumes in `ct2x.data.x2ct_convention`'s layout.
    """
    from ct2x.data.x2ct_convention import CT_VOXELS, CUBE_MM, FILM_PX
    from ct2x.models import ModelInfo, save_model

    if variant not in ("biplanar", "single"):
        raise CT2XInputError(f"--variant {variant!r}: official generators are 'biplanar' (X2CT-GAN+B) or 'single'")
    path = Path(checkpoint).expanduser()
    network = official_network(variant)
    network.load_state_dict(official_to_ct2x(read_official_checkpoint(path), variant, source=str(path)))
    films = ["pa", "lateral"] if variant == "biplanar" else ["pa"]
    info = ModelInfo(
        kind="x2ct-biplanar" if variant == "biplanar" else "x2ct-single",
        config=X2CTConfig().to_dict(),
        license="GPL-3.0",
        description=f"X2CT-GAN{'+B' if variant == 'biplanar' else '+S'}, official weights (kylekma/X2CT), imported",
        inputs={"films": films, "film_px": FILM_PX,
                "orientation": "PA: rows superior->inferior, columns patient's right->left (radiological display); "
                               "lateral: rows superior->inferior, columns anterior->posterior",
                "normalisation": "each film divided by its own maximum (8-bit), [0, 1], bone bright",
                "convention": "ct2x.data.x2ct_convention"},
        outputs={"volume": "(N, 1, D, H, W): D superior->inferior, H anterior->posterior, W right->left",
                 "voxels": CT_VOXELS, "field_of_view_mm": CUBE_MM, "voxel_mm": CUBE_MM / CT_VOXELS,
                 "hu": "HU = 2500 * value - 1024 (values clipped to [0, 1])"},
        training_data={"dataset": "LIDC-IDRI", "cases": 916,
                       "films": "plastimatch DRRs (SAD 541 mm, SID 949 mm), per-film maximum normalisation"},
        source={"checkpoint": path.name, "sha256": _sha256(path), "page": "https://github.com/kylekma/X2CT",
                "license_terms": "X2CT-GAN's code and weights are GPL-3.0 (README and file headers; its LICENSE file "
                                 "says LGPL-3.0): a work using these weights is bound by those terms"},
    )
    return save_model(out, network, info)


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
