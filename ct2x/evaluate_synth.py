"""How well a CT2X-GAN model synthesises the test CTs of a `ct2x prepare synth` folder: the paper's protocols.

For each test CT and each of its poses the model makes two films (Tan et al., arXiv 2404.11889, Tables 1-3):
- X-ray style: the style code of a real film of the same split (E_s^X), the split's films taken in turn, so that
  every held-out film styles about as many syntheses (which film styled which synthesis is recorded);
- DRR style: the style code of the ground-truth DRR at that pose (E_s^DRR), the paper's "DRR style reconstruction".
A model without style encoder (the w/o E_sty ablation) makes one film per pose, which serves as both.

Metrics (`SYNTH_METRICS`):
- per case and pose: LPIPS (AlexNet, `ct2x.metrics.lpips`), PSNR and SSIM (`ct2x.metrics.films`) of the DRR-style
  synthesis against the DRR (Table 3; LPIPS as in Table 1, on the same pairs);
- per method over all the split's films: FID and KID (`ct2x.metrics.fid`) against the split's real films, on a
  named feature network (Tables 1-2). Methods: the X-ray-style and the DRR-style syntheses, and the plain physics
  DRRs themselves as the baseline; all three sets have one film per case and pose, so their numbers compare;
- the floor (`real_film_floor`): FID and KID of real films from the folder's other splits, drawn at the methods' set
  size, against the split's films: what real films score against real films. A method within its range cannot be
  told from real films on these features and set sizes, so compare a method with the floor before ranking it.
Films are (F, F) in [0, 1], bone bright, as the folder stores them; the networks' [-1, 1] is mapped in and out here.

The model file is read by the synthesis engine's `ct2x.synthesize.load_synth_model`, and runs through
`synthesize_case`, which calls the generator API itself (`encode_ct` once per CT, then `content_code`, `style_code`
and `synthesize` for all poses in one batch) rather than the engine's `Synthesizer`: the evaluation feeds each case's
stored inputs (the cube, labels and MIPs the training saw) and needs the DRR style branch, which the engine (X-ray
styles only, one pose at a time) does not offer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from ct2x.data.prepare_synth import case_paths, film_paths, load_case, load_film
from ct2x.errors import CT2XInputError
from ct2x.metrics.fid import FeatureNetwork, frechet_distance, kernel_inception_distance
from ct2x.metrics.films import FILM_METRICS, film_metrics
from ct2x.nets.ct2x_gan import DRR, XRAY, CT2XGANGenerator
from ct2x.preprocess import x2ct_normalize

LPIPS = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # films (N, 1, H, W) in [0, 1] twice -> (N,) distances
DRR_BASELINE = "physics DRR"
FLOOR_DRAWS = 100  # seeded draws of other real films for the floor

SYNTH_METRICS = {  # name -> what it is, for reports
    "lpips": "LPIPS (AlexNet, lpips 0.1) of the DRR-style synthesis against the DRR at the same pose",
    "psnr": f"{FILM_METRICS['psnr']}, DRR-style synthesis against the DRR",
    "ssim": f"{FILM_METRICS['ssim']}, DRR-style synthesis against the DRR",
    "fid": "Frechet distance between the features of a method's films and of the split's real films (N - 1 "
           "covariances); biased upwards for small sets",
    "kid": "kernel distance: unbiased squared MMD, kernel (x.y/F + 1)^3, mean ± std over 100 random subset pairs "
           "(torch-fidelity's protocol, seed 2020)",
}


@dataclass
class CaseSyntheses:
    """A test CT's ground-truth DRRs and the model's films at its P poses, each (P, F, F) in [0, 1]."""

    case: str
    angles_deg: np.ndarray  # (P,) primary C-arm angles, degrees
    drr: np.ndarray  # ground truth (physics DRRs)
    drr_style: np.ndarray  # syntheses in the DRR's own style
    xray_style: np.ndarray  # syntheses in the style of real films ...
    style_films: List[str]  # ... these, one per pose


def synthesize_case(network: CT2XGANGenerator, case: Dict[str, np.ndarray], style_films: np.ndarray,
                    device: str = "cpu") -> Tuple[np.ndarray, np.ndarray]:
    """(X-ray-style, DRR-style) films (P, F, F) in [0, 1] of a prepared case at its P poses; pose p takes the style
    of `style_films[p]` (P, F, F) in [0, 1] and of the case's own DRR at p."""
    with torch.inference_mode():
        ct = torch.from_numpy(x2ct_normalize(case["ct_hu"].astype(np.float32)))[None, None].to(device)  # (1,1,S,S,S)
        labels = torch.from_numpy(case["labels"]).to(device)  # (P, 25)
        mips = torch.from_numpy(case["mips"])[:, None].to(device) if network.config.pose_attention else None
        ct_code = network.encode_ct(ct).expand(len(labels), -1)  # (P, code length): one CT, every pose
        content = network.content_code(ct_code, labels, mips)  # (P, L_c, w_dim)
        if network.style_encoder is None:  # w/o E_sty: one learned style, one film per pose
            film = _to_unit(network.synthesize(content))
            return film, film
        xray_style = network.style_code(_to_network(style_films, device), XRAY)  # (P, w_dim)
        drr_style = network.style_code(_to_network(case["drr"], device), DRR)
        return _to_unit(network.synthesize(content, xray_style)), _to_unit(network.synthesize(content, drr_style))


def synthesize_split(network: CT2XGANGenerator, data: Union[str, Path], split: str = "test",
                     device: str = "cpu") -> List[CaseSyntheses]:
    """The model's films for every case of `split`, styled by the real films of the same split in turn."""
    paths, films = case_paths(data, split), film_paths(data, split)
    if not paths:
        raise CT2XInputError(f"{data}: no {split} cases to evaluate")
    if not films:
        raise CT2XInputError(f"{data}: no {split} real films to take the X-ray style from and to compare with")
    style_images = np.stack([load_film(path) for path in films])  # (n, F, F)
    results, used = [], 0
    for path in paths:
        case = load_case(path)
        _check_sizes(network, case, style_images, data)
        chosen = [(used + pose) % len(films) for pose in range(len(case["angles_deg"]))]
        used += len(chosen)
        xray_style, drr_style = synthesize_case(network, case, style_images[chosen], device)
        results.append(CaseSyntheses(path.stem, case["angles_deg"], case["drr"], drr_style, xray_style,
                                     [films[i].stem for i in chosen]))
    return results


def film_rows(syntheses: List[CaseSyntheses], lpips: Optional[LPIPS] = None) -> List[Dict[str, object]]:
    """One row per case and pose: the case, the angle, the style film, and LPIPS (when given), PSNR and SSIM of the
    DRR-style synthesis against the DRR."""
    rows = []
    for result in syntheses:
        distances = None
        if lpips is not None:
            with torch.inference_mode():
                distances = lpips(torch.from_numpy(result.drr_style)[:, None], torch.from_numpy(result.drr)[:, None])
        for pose, angle in enumerate(result.angles_deg):
            row: Dict[str, object] = {"case": result.case, "angle_deg": float(angle),
                                      "style_film": result.style_films[pose]}
            if distances is not None:
                row["lpips"] = float(distances[pose])
            row.update(film_metrics(result.drr_style[pose], result.drr[pose]))
            rows.append(row)
    return rows


def distribution_table(syntheses: List[CaseSyntheses], data: Union[str, Path], features: FeatureNetwork,
                       model_name: str, split: str = "test", device: str = "cpu") -> Dict[str, Dict[str, float]]:
    """method -> FID, KID (mean, std, subset size) and film counts against the real films of `split`, on `features`:
    the model's X-ray-style and DRR-style films, and the physics DRRs."""
    real = _film_features(film_paths(data, split), features, device)
    sets = {f"{model_name} (X-ray style)": [r.xray_style for r in syntheses],
            f"{model_name} (DRR style)": [r.drr_style for r in syntheses],
            DRR_BASELINE: [r.drr for r in syntheses]}
    table = {}
    for method, films in sets.items():
        made = features.features(np.concatenate(films), device=device)  # (cases x poses, F)
        kid, kid_std, subset = kernel_inception_distance(made, real)
        table[method] = {"fid": frechet_distance(made, real), "kid": kid, "kid_std": kid_std,
                         "kid_subset_size": subset, "films": len(made), "real_films": len(real)}
    return table


def real_film_floor(data: Union[str, Path], features: FeatureNetwork, films: int, split: str = "test",
                    pool: Optional[Union[str, Path]] = None, draws: int = FLOOR_DRAWS, seed: int = 0,
                    device: str = "cpu") -> Optional[Dict[str, float]]:
    """FID and KID of real films against the real films of `split`, at the methods' set size: `draws` seeded draws
    of `films` films from the folder's other splits, or from every split of the prepared folder `pool` less the
    split's own films (by film id), one draw of them all when they are no more, against the split's films; mean
    and 5th and 95th percentiles over the draws, and the set sizes. None when fewer than two such films exist."""
    split_films = film_paths(data, split)
    own = {path.stem for path in split_films}
    others = [path for path in film_paths(data if pool is None else pool) if path.stem not in own]
    if len(others) < 2:
        return None
    real = _film_features(split_films, features, device)  # (N, F)
    candidates = _film_features(others, features, device)  # (M, F)
    size = min(films, len(candidates))
    rng = np.random.default_rng(seed)
    picks = [candidates[rng.choice(len(candidates), size, replace=False)]
             for _ in range(draws if size < len(candidates) else 1)]
    fids = [frechet_distance(pick, real) for pick in picks]
    kids = [kernel_inception_distance(pick, real)[0] for pick in picks]
    floor: Dict[str, float] = {}
    for metric, values in (("fid", fids), ("kid", kids)):
        low, high = np.percentile(values, [5, 95])
        floor.update({metric: float(np.mean(values)), f"{metric}_p5": float(low), f"{metric}_p95": float(high)})
    return {**floor, "draws": len(picks), "films": size, "real_films": len(real)}


def summary(rows: List[Dict[str, object]]) -> Dict[str, Dict[str, float]]:
    """metric -> {"mean", "std"} over the rows (cases and poses)."""
    metrics = [key for key in rows[0] if key in SYNTH_METRICS]
    values = {metric: np.array([float(row[metric]) for row in rows]) for metric in metrics}
    return {metric: {"mean": float(v.mean()), "std": float(v.std())} for metric, v in values.items()}


def picture_sheet(result: CaseSyntheses, gap_px: int = 2) -> np.ndarray:
    """(rows, columns) uint8: one column per pose; rows DRR, DRR-style synthesis, X-ray-style synthesis."""
    rows = [np.concatenate([np.pad(film, ((0, gap_px), (0, gap_px))) for film in films], axis=1)
            for films in (result.drr, result.drr_style, result.xray_style)]  # each (F + gap, P (F + gap))
    return (np.clip(np.concatenate(rows, axis=0), 0, 1) * 255).round().astype(np.uint8)


def _check_sizes(network: CT2XGANGenerator, case: Dict[str, np.ndarray], style_images: np.ndarray,
                 data: Union[str, Path]) -> None:
    config = network.config
    found = {"film": case["drr"].shape[-1], "CT": case["ct_hu"].shape[0], "style film": style_images.shape[-1]}
    wanted = {"film": config.image_size, "CT": config.ct_size, "style film": config.image_size}
    if config.pose_attention:
        found["MIP"], wanted["MIP"] = case["mips"].shape[-1], config.mip_size
    wrong = [f"{name} {found[name]} px (the model's {wanted[name]})" for name in found if found[name] != wanted[name]]
    if wrong or case["ct_hu"].shape != (config.ct_size,) * 3:
        raise CT2XInputError(f"{data}: {', '.join(wrong) or 'the CT is not a cube'}; prepare the data with the "
                             "model's film, CT and MIP sizes (`ct2x prepare synth --film-px --voxels --mip-px`)")


def _film_features(paths: List[Path], features: FeatureNetwork, device: str) -> np.ndarray:
    """(N, F) features of prepared film files."""
    return features.features(np.stack([load_film(path) for path in paths]), device=device)


def _to_network(films: np.ndarray, device: str) -> torch.Tensor:
    """(P, F, F) in [0, 1] -> (P, 1, F, F) in [-1, 1], the networks' range."""
    return torch.from_numpy(np.ascontiguousarray(films, dtype=np.float32))[:, None].to(device) * 2 - 1


def _to_unit(films: torch.Tensor) -> np.ndarray:
    """(P, 1, F, F) in [-1, 1] -> (P, F, F) float32 in [0, 1], clipped."""
    return ((films[:, 0].float() + 1) / 2).clamp(0, 1).cpu().numpy()
