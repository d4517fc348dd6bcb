"""How well a films -> CT model reconstructs the test cases of a prepared folder, beside two baselines.

Methods: a CT2X model file, and two baselines that need no learning beyond the training cases' statistics:
- `mean`: the mean training volume, whatever the films;
- `backprojection`: each film spread back along its own axis (PA along H, lateral along W), averaged, and mapped to
  the CT's intensities by the least-squares line fitted on the training cases.
Volumes and films are in `ct2x.data.x2ct_convention`'s layout and X2CT's [0, 1] normalisation; metrics are
`ct2x.metrics.METRICS`, each named with its convention.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from ct2x.data.prepare_recon import case_paths, load_case
from ct2x.errors import CT2XInputError
from ct2x.metrics import reconstruction_metrics
from ct2x.preprocess import x2ct_normalize

Method = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (PA, lateral) films (P, P) -> volume (D, H, W) in [0, 1]
BASELINES = ("mean", "backprojection")


def evaluate(methods: Dict[str, Method], data: Union[str, Path], split: str = "test") -> List[Dict[str, object]]:
    """One row per (case, method): the case id, the method and every metric."""
    rows = []
    for path in case_paths(data, split):
        case = load_case(path)
        true = x2ct_normalize(case["ct_hu"].astype(np.float32))  # (D, H, W) in [0, 1]
        for name, method in methods.items():
            predicted = method(case["pa"], case["lateral"])
            if predicted.shape != true.shape:
                raise CT2XInputError(f"{name}: gives volumes of {predicted.shape} voxels, the cases of {data} are "
                                     f"{true.shape}; prepare the data with the model's film and CT size")
            rows.append({"case": path.stem, "method": name, **reconstruction_metrics(predicted, true)})
    if not rows:
        raise CT2XInputError(f"{data}: no {split} cases to evaluate")
    return rows


def model_method(model_path: Union[str, Path], device: str = "cpu") -> Method:
    """The volumes a CT2X model file's network reconstructs from the films it reads."""
    from ct2x.reconstruct import film_views, load_recon_model

    network, info = load_recon_model(model_path, device)
    films = film_views(info)

    def reconstruct(pa: np.ndarray, lateral: np.ndarray) -> np.ndarray:
        given = {"pa": pa, "lateral": lateral}
        inputs = [torch.from_numpy(given[name])[None, None].to(device) for name in films]  # (1, 1, P, P) each
        with torch.inference_mode():
            return network(*inputs)[0, 0].float().clamp(0, 1).cpu().numpy()

    return reconstruct


def baseline_methods(data: Union[str, Path], names: Sequence[str] = BASELINES) -> Dict[str, Method]:
    """The named baselines, fitted on the training cases of `data`."""
    training = [load_case(path) for path in case_paths(data, "train")]
    if not training:
        raise CT2XInputError(f"{data}: no training cases to fit the baselines on")
    volumes = [x2ct_normalize(case["ct_hu"].astype(np.float32)) for case in training]
    methods: Dict[str, Method] = {}
    if "mean" in names:
        mean_volume = np.mean(volumes, axis=0)
        methods["mean"] = lambda pa, lateral: mean_volume
    if "backprojection" in names:
        spread = np.concatenate([backprojection(c["pa"], c["lateral"]).ravel() for c in training])  # (N,)
        design = np.stack([spread, np.ones_like(spread)], axis=1)  # (N, 2): least squares of slope, intercept
        (slope, intercept), *_ = np.linalg.lstsq(design, np.concatenate([v.ravel() for v in volumes]), rcond=None)
        methods["backprojection"] = lambda pa, lateral: np.clip(slope * backprojection(pa, lateral) + intercept, 0, 1)
    return methods


def backprojection(pa: np.ndarray, lateral: np.ndarray) -> np.ndarray:
    """(D, H, W): the PA film (D, W) copied along H averaged with the lateral film (D, H) copied along W."""
    return 0.5 * (pa[:, None, :] + lateral[:, :, None])


def summary(rows: List[Dict[str, object]]) -> Dict[str, Dict[str, Dict[str, float]]]:
    """method -> metric -> {"mean", "std"} over the cases."""
    methods = sorted({str(row["method"]) for row in rows}, key=[row["method"] for row in rows].index)
    metrics = [key for key in rows[0] if key not in ("case", "method")]
    table: Dict[str, Dict[str, Dict[str, float]]] = {}
    for method in methods:
        values = {m: np.array([float(row[m]) for row in rows if row["method"] == method]) for m in metrics}
        table[method] = {m: {"mean": float(v.mean()), "std": float(v.std())} for m, v in values.items()}
    return table


def mid_slice_sheet(volumes: Dict[str, np.ndarray], gap_px: int = 2) -> np.ndarray:
    """(rows, columns) uint8: one row per volume (true first, then each method), coronal | sagittal | axial."""
    rows = []
    for volume in volumes.values():
        d, h, w = (n // 2 for n in volume.shape)
        slices = [volume[:, h, :], volume[:, :, w], volume[d, :, :]]  # (D, W), (D, H), (H, W)
        rows.append(np.concatenate([np.pad(s, ((0, gap_px), (0, gap_px))) for s in slices], axis=1))
    return (np.clip(np.concatenate(rows, axis=0), 0, 1) * 255).round().astype(np.uint8)


def comparison_pictures(methods: Dict[str, Method], data: Union[str, Path], folder: Path,
                        split: str = "test", limit: Optional[int] = None) -> List[Path]:
    """A mid-slice sheet (`mid_slice_sheet`) per case, written as `<case>.png` into `folder`."""
    from ct2x.io import save_png

    written = []
    for path in case_paths(data, split)[:limit]:
        case = load_case(path)
        volumes = {"true": x2ct_normalize(case["ct_hu"].astype(np.float32))}
        volumes.update({name: method(case["pa"], case["lateral"]) for name, method in methods.items()})
        written.append(save_png(mid_slice_sheet(volumes), folder / f"{path.stem}.png"))
    return written
