"""Training samples for X-ray -> CT networks from a prepared folder, with augmentation only a fast projector allows.

Each sample is a dict of float32 tensors: `ct` (1, D, H, W) in X2CT's [0, 1] normalisation, `pa` and `lateral`
(1, P, P) films in [0, 1] (see `ct2x.data.x2ct_convention`), and `case` (its id).

Augmentation (`ReconAugmentation`) re-renders the films on the fly: the CT is turned about its superior-inferior axis,
shifted and its contrast varied, the films are rendered from it at slightly jittered C-arm angles, with the official
linear attenuation or a polychromatic spectrum, and quantum noise. So a network trained by CT2X sees films that
differ as real ones do, always paired with the CT they show.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import numpy as np
import torch

from ct2x.data.ct_motion import CTMotion
from ct2x.data.prepare_recon import case_paths, load_case
from ct2x.data.x2ct_convention import LATERAL_DEG, PA_DEG, official_films, physics_films
from ct2x.drr import Physics
from ct2x.errors import CT2XInputError
from ct2x.preprocess import x2ct_normalize
from ct2x.volume import CTVolume

OFFICIAL_ATTENUATION = "linear"  # the official films' HU -> mu, beside the tube spectra of ct2x.physics


@dataclass(frozen=True)
class ReconAugmentation:
    """Random changes to a case; angles in degrees. Each sample draws its own from the dataset's seed."""

    probability: float = 0.8  # share of samples augmented; the rest use the stored films
    motion: CTMotion = CTMotion()  # the CT turned about its superior-inferior axis, shifted, re-contrasted
    pose_jitter_deg: float = 2.0  # each film's C-arm angle, uniform in +-
    attenuations: Tuple[str, ...] = (OFFICIAL_ATTENUATION, "60kV", "90kV", "120kV")  # drawn uniformly
    noise_photons: Tuple[float, float] = (3e3, 1e5)  # log-uniform photons per pixel; polychromatic films only

    def __post_init__(self) -> None:
        if not 0 <= self.probability <= 1:
            raise CT2XInputError(f"augmentation probability {self.probability}: must lie in [0, 1]")
        if self.pose_jitter_deg < 0:
            raise CT2XInputError("augmentation ranges must not be negative")


class ReconDataset(torch.utils.data.Dataset):
    """The cases of one split of a prepared folder; `augmentation=None` gives the stored, official films."""

    def __init__(self, root: Union[str, Path], split: Optional[str] = "train",
                 augmentation: Optional[ReconAugmentation] = None, seed: int = 0):
        self.paths = case_paths(root, split)
        if not self.paths:
            raise CT2XInputError(f"{root}: no {split or ''} cases; prepare more CTs or check the split")
        self.augmentation = augmentation
        self.seed = seed
        self.epoch = 0  # set by the trainer, so each epoch draws new augmentations reproducibly

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Dict[str, Union[torch.Tensor, str]]:
        case = load_case(self.paths[index])
        ct_hu, pa, lateral = case["ct_hu"].astype(np.float32), case["pa"], case["lateral"]  # (D, H, W) HU; (P, P)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        if self.augmentation is not None and rng.random() < self.augmentation.probability:
            ct_hu, pa, lateral = augment_case(ct_hu, case["affine"], pa.shape[0], self.augmentation, rng)
        return {"ct": x2ct_normalize(torch.from_numpy(ct_hu))[None], "pa": torch.from_numpy(pa)[None],
                "lateral": torch.from_numpy(lateral)[None], "case": self.paths[index].stem}


def augment_case(ct_hu: np.ndarray, affine: np.ndarray, film_px: int, augmentation: ReconAugmentation,
                 rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(CT (D, H, W) HU, PA, lateral) of one random draw: the CT moved and re-contrasted, films rendered from it."""
    moved = augmentation.motion.apply(ct_hu, float(np.linalg.norm(affine[:3, 0])), rng)  # (D, H, W) HU
    cube = CTVolume(moved, affine, source="augmented case")
    angles = (PA_DEG + rng.uniform(-1, 1) * augmentation.pose_jitter_deg,
              LATERAL_DEG + rng.uniform(-1, 1) * augmentation.pose_jitter_deg)
    attenuation = augmentation.attenuations[rng.integers(len(augmentation.attenuations))]
    if attenuation == OFFICIAL_ATTENUATION:
        pa, lateral = official_films(cube, film_px, angles_deg=angles)
    else:
        low, high = np.log(augmentation.noise_photons)
        physics = Physics(spectrum=attenuation, noise_photons=float(np.exp(rng.uniform(low, high))),
                          seed=int(rng.integers(2**32)))
        pa, lateral = physics_films(cube, physics, film_px, angles_deg=angles)
    return cube.hu, pa, lateral

