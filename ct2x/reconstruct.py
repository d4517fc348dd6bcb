"""Films -> CT with an X2CT model file: the inference engine under `ct2x reconstruct` and the CT2XReconstruct module.

    volume = reconstruct("x2ct-gan-biplanar.safetensors", "pa.png", "lateral.jpg")   # CTVolume in HU
    save_ct(volume, "chest.nii.gz")
    films = simulate_films(load_ct("chest.nrrd"), read_info("x2ct-gan-biplanar.safetensors"))  # a CT's own films
    comparison = compare_to_reference(volume, load_ct("chest.nrrd"))   # metrics and difference volume

Films are prepared as `ct2x.data.films.prepare_film` does (or given prepared); the network's (D, H, W) output is the
convention's CT cube (`ct2x.data.x2ct_convention`): its KJI array exactly, placed by `cube_affine` about RAS (0, 0, 0),
so that the patient's left in the films is the patient's left (RAS x < 0) in the volume.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
from pathlib import Path
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple, Union

import numpy as np
import torch

from ct2x.data.films import PreparedFilm, prepare_film
from ct2x.data.x2ct_convention import CUBE_MM, FILM_PX, ct_cube, ct_films, cube_affine
from ct2x.errors import CT2XInputError
from ct2x.models import LoadedModel, ModelInfo
from ct2x.precision import check_precision
from ct2x.preprocess import x2ct_denormalize, x2ct_normalize
from ct2x.volume import CTVolume

PathLike = Union[str, os.PathLike]
FilmInput = Union[PathLike, np.ndarray, PreparedFilm]
VIEWS_BY_KIND = {"x2ct-biplanar": ("pa", "lateral"), "x2ct-single": ("pa",)}  # for files naming no films
RECONSTRUCTION_KINDS = ("x2ct-biplanar", "x2ct-single", "cvaa-biplanar")  # the films -> CT kinds ct2x builds
CUBE_CENTER_RAS = np.zeros(3)  # the reconstructed cube's centre, RAS mm: films carry no position
Progress = Callable[[float], None]  # fraction of the network's work done, 0 ... 1; raising in it stops the run


class ReferenceComparison(NamedTuple):
    """A reconstruction beside the real CT: `metrics` of `ct2x evaluate recon` (ct2x.metrics.METRICS, both
    conventions), `difference_hu` (K, J, I) float32 = reconstruction - reference on the reconstruction's grid, and
    `reference_cube`, the reference as the network would have had to reconstruct it."""

    metrics: Dict[str, float]
    difference_hu: np.ndarray
    reference_cube: CTVolume


def load_recon_model(model: Union[PathLike, LoadedModel], device: str = "cpu") -> LoadedModel:
    """The films -> CT network of a model file (or registry name: its cached file), or `model` itself when loaded;
    CT2XInputError for a missing file or a network of another kind."""
    from ct2x import models

    if isinstance(model, LoadedModel):
        check_kind(model.info)
        return model
    return models.load(recon_model_file(model)[0], device=device)


def recon_model_file(model: PathLike) -> Tuple[Path, ModelInfo]:
    """(the file, its ModelInfo) of a films -> CT model file or registry name, read from the header only (fast);
    CT2XInputError for a missing file or a network of another kind."""
    from ct2x.models import model_path, read_info

    path = model_path(model)
    info = read_info(path)
    check_kind(info)
    return path, info


def check_kind(info: ModelInfo) -> None:
    """CT2XInputError unless the model turns films into a CT: its file names the films it reads (inputs "films") and
    the volume it makes (outputs "volume"), as `ct2x train recon` and `ct2x models import` write them; X2CT-GAN's
    kinds are known without."""
    if info.kind in VIEWS_BY_KIND or ("films" in info.inputs and "volume" in info.outputs):
        return
    raise CT2XInputError(f"the model is a {info.kind!r} network, not one that turns films into a CT (its file names "
                         "no films in and no volume out)")


def film_views(info: ModelInfo) -> Tuple[str, ...]:
    """The films the network reads, in its argument order: ("pa", "lateral") or ("pa",)."""
    views = tuple(info.inputs.get("films", VIEWS_BY_KIND.get(info.kind, ())))
    if views not in (("pa",), ("pa", "lateral")):
        raise CT2XInputError(f"the model file's inputs name the films {list(views)}; ct2x reads ['pa'] or "
                             "['pa', 'lateral']")
    return views


def film_size(info: ModelInfo) -> int:
    """Film pixels per side the network reads: its inputs' film_px, else its configuration's input_size, else the
    convention's."""
    size = info.inputs.get("film_px", info.config.get("input_size", FILM_PX))
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise CT2XInputError(f"the model file's film size {size!r} is not a number of pixels")
    return size


def cube_mm(info: ModelInfo) -> Tuple[float, str]:
    """(edge of the reconstructed cube in mm, where that comes from): the outputs' field_of_view_mm (one number or
    three equal ones), else the convention's cube."""
    given = info.outputs.get("field_of_view_mm")
    if given is None:
        return CUBE_MM, f"the X2CT convention's {CUBE_MM:g} mm cube (the model file does not state its field of view)"
    edges = given if isinstance(given, list) else [given]
    if not edges or any(isinstance(e, bool) or not isinstance(e, (int, float)) or not e > 0 for e in edges) or \
            len(set(edges)) != 1 or len(edges) not in (1, 3):
        raise CT2XInputError(f"the model file's field_of_view_mm {given!r} is not one cube edge in mm")
    return float(edges[0]), "the model file's field of view"


def check_views(info: ModelInfo, has_lateral: bool) -> Tuple[str, ...]:
    """The model's views, once the films given fit them; CT2XInputError saying what is missing or too much."""
    views = film_views(info)
    if "lateral" in views and not has_lateral:
        raise CT2XInputError(f"the {info.kind} model reads a PA and a lateral film; give the lateral film too")
    if "lateral" not in views and has_lateral:
        raise CT2XInputError(f"the {info.kind} model reads the PA film only; leave the lateral film out (it would be "
                             "ignored)")
    return views


def reconstruct(model: Union[PathLike, LoadedModel], pa: FilmInput, lateral: Optional[FilmInput] = None,
                device: str = "cpu", precision: str = "fp32", progress: Optional[Progress] = None) -> CTVolume:
    """The CT (HU, the convention's cube about RAS (0, 0, 0)) that `model` reconstructs from the films.

    model: a model file, registry name or loaded model of a films -> CT network (`check_kind`). pa, lateral: film
    files, arrays or `PreparedFilm`s of the model's film size; files and arrays are prepared with `prepare_film`'s
    detection.
    precision: "fp32", or "bf16" (bfloat16 autocast; the films' 2-D encoders stay float32). progress: called with
    the fraction of the network's work done; an exception raised in it stops the run and leaves this function.
    """
    from ct2x.device import torch_device

    check_precision(precision)
    target = torch_device(device)
    network, info = load_recon_model(model, str(target))
    views = check_views(info, lateral is not None)
    size = film_size(info)
    films = [_prepared(film, view, size) for film, view in zip((pa, lateral), views)]
    inputs = [torch.from_numpy(film.image)[None, None].to(target) for film in films]  # (1, 1, P, P) each
    network = network.to(target)
    with torch.inference_mode(), torch.autocast(target.type, dtype=torch.bfloat16, enabled=precision == "bf16"), \
            _reporting(network, info, inputs, progress):
        output = network(*inputs)  # (1, 1, D, H, W), X2CT normalisation
    if output.dim() != 5 or output.shape[:2] != (1, 1) or len(set(output.shape[2:])) != 1:
        raise CT2XInputError(f"the {info.kind} network returned {list(output.shape)}, not one cube (1, 1, D, D, D)")
    volume = output[0, 0].float().clamp(0.0, 1.0).cpu().numpy()  # (D, H, W) = KJI of the cube
    edge_mm, _ = cube_mm(info)
    hu = x2ct_denormalize(volume).astype(np.float32)  # (K, J, I) HU -1024 ... 1476
    affine = cube_affine(CUBE_CENTER_RAS, voxels=volume.shape[0], cube_mm=edge_mm)
    try:
        return CTVolume(hu=hu, affine=affine, source=f"reconstructed by {info.kind}")
    except CT2XInputError as error:
        raise CT2XInputError(f"the network's output is not a CT ({error}); is the model trained, and for films like "
                             "these?") from None


def simulate_films(ct: CTVolume, info: ModelInfo) -> List[PreparedFilm]:
    """The films the model reads (PA, then the lateral for biplanar models) of `ct`, made as its training films were:
    the CT on the model's cube about its centre at 1 mm, projected by the convention's C-arm, normalised, resized to
    the model's film size."""
    edge_mm, _ = cube_mm(info)
    pa, lateral = ct_films(ct, edge_mm, film_size(info))  # (P, P) float32 in [0, 1] each, as `ct2x prepare recon`
    made = f"simulated from {ct.source or 'a CT'} on the model's {edge_mm:g} mm cube (the convention's C-arm)"
    films = {"pa": PreparedFilm(pa, (made,)), "lateral": PreparedFilm(lateral, (made,))}
    return [films[view] for view in film_views(info)]


def compare_to_reference(reconstruction: CTVolume, reference: CTVolume) -> ReferenceComparison:
    """The reconstruction against the real CT, put on a cube of the reconstruction's size about its own centre (as
    `ct2x prepare recon` makes the cases the models learn from): the metrics of `ct2x evaluate recon` and the
    difference volume."""
    from ct2x.metrics import reconstruction_metrics

    voxels = reconstruction.hu.shape
    edges_mm = np.abs(np.diag(reconstruction.affine)[:3]) * voxels[::-1]  # I, J, K extents
    if len(set(voxels)) != 1 or not np.allclose(edges_mm, edges_mm[0]):
        raise CT2XInputError(f"the reconstruction is {voxels} voxels, {edges_mm} mm: not one of ct2x's cubes")
    cube = ct_cube(reference, voxels=voxels[0], cube_mm=float(edges_mm[0]))
    metrics = reconstruction_metrics(x2ct_normalize(reconstruction.hu), x2ct_normalize(cube.hu.astype(np.float32)))
    difference = (reconstruction.hu - cube.hu).astype(np.float32)  # (K, J, I) HU
    return ReferenceComparison(metrics, difference, cube)


def network_input_picture(films: List[PreparedFilm]) -> np.ndarray:
    """(P, n P + 2 (n - 1)) uint8: the films exactly as the network reads them, side by side (PA first), 2 grey
    columns apart."""
    gap = np.full((films[0].image.shape[0], 2), 128, dtype=np.uint8)
    parts: List[np.ndarray] = []
    for film in films:
        parts += [gap] if parts else []
        parts.append(np.round(np.clip(film.image, 0.0, 1.0) * 255).astype(np.uint8))
    return np.concatenate(parts, axis=1)


def describe_geometry(info: ModelInfo, voxels: int) -> str:
    """One line on the output's geometry: voxels, voxel size and where the field of view comes from."""
    edge_mm, source = cube_mm(info)
    return (f"CT of {voxels}^3 voxels of {edge_mm / voxels:.3g} mm ({edge_mm:g} mm cube: {source}), centred on RAS "
            "(0, 0, 0)")


@contextlib.contextmanager
def _reporting(network: torch.nn.Module, info: ModelInfo, inputs: List[torch.Tensor],
               progress: Optional[Progress]) -> Iterator[None]:
    """Calls `progress` after each module of `network` with the share of the work done so far: each module's work
    (multiply-adds of its weights over its output positions, else its output's size) is planned by running the same
    architecture on the meta device, which computes shapes only."""
    if progress is None:
        yield
        return
    shapes = tuple(tuple(film.shape) for film in inputs)
    plan = _module_work(info.kind, json.dumps(info.config, sort_keys=True), shapes)
    total, done = max(sum(plan.values()), 1.0), [0.0]
    names = {module: name for name, module in network.named_modules()}

    def report(module: torch.nn.Module, _inputs, _output) -> None:
        done[0] += plan.get(names[module], 0.0)
        progress(min(done[0] / total, 1.0))

    handles = [module.register_forward_hook(report) for module in names if not list(module.children())]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@functools.lru_cache(maxsize=8)
def _module_work(kind: str, config_json: str, film_shapes: Tuple[Tuple[int, ...], ...]) -> Dict[str, float]:
    """Module name -> work of its calls in one forward pass of the `kind` network on films of `film_shapes`,
    found by running it on the meta device (shapes only; 0.4 s for the full X2CT-GAN, once per session)."""
    from ct2x.models import build_network

    with torch.device("meta"):
        network = build_network(kind, json.loads(config_json)).eval()
    work: Dict[str, float] = {}

    def record(name: str) -> Callable:
        def hook(module: torch.nn.Module, _inputs, output: torch.Tensor) -> None:
            weight = getattr(module, "weight", None)
            positions = output.numel() / output.shape[1] if output.dim() > 1 else output.numel()
            cost = weight.numel() * positions if isinstance(weight, torch.Tensor) and weight.dim() > 1 \
                else output.numel()
            work[name] = work.get(name, 0.0) + float(cost)
        return hook

    for name, module in network.named_modules():
        if not list(module.children()):
            module.register_forward_hook(record(name))
    with torch.no_grad():
        network(*(torch.zeros(shape, device="meta") for shape in film_shapes))
    return work


def _prepared(film: FilmInput, view: str, size: int) -> PreparedFilm:
    if not isinstance(film, PreparedFilm):
        return prepare_film(film, view, size)
    if film.image.shape != (size, size) or film.image.dtype != np.float32 or \
            not math.isfinite(float(film.image.sum())):
        raise CT2XInputError(f"the prepared {view} film is {film.image.shape} {film.image.dtype}; the model reads "
                             f"({size}, {size}) float32 films")
    return film
