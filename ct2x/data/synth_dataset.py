"""Training samples for CT2X-GAN (CT -> X-ray synthesis) from a folder made by `ct2x prepare synth`.

Item i is case i // P of the split at its stored pose i % P (P poses per case, so an epoch sees every stored DRR),
with one real film of the same split drawn as the style reference (unpaired): a dict of float32 tensors
- `ct` (1, D, H, W) in X2CT's [0, 1] normalisation (`x2ct_normalize` of the stored HU);
- `label` (25,), the pose's camera label, and `mip` (1, M, M), its MIP in [0, 1];
- `drr` (1, F, F), the DRR at the pose, and `xray` (1, F, F), the real film, both mapped from [0, 1] to the
  networks' [-1, 1];
- `case`, `film` (their ids) and `angle_deg` (the pose's primary angle).

Augmentation (`SynthAugmentation`) renders a sample anew, as only a fast projector allows: the CT turned about its
superior-inferior axis, shifted and re-contrasted (`ct2x.data.ct_motion`), seen at a primary angle drawn anywhere in
the stored poses' range rather than at the stored pose, its DRR, MIP and label made by the preparation's own
`render_poses`. Draws come from (seed, epoch, index), so a run with a fixed seed sees the same samples again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Union

import numpy as np
import torch

from ct2x.data.ct_motion import CTMotion
from ct2x.data.preparation import prepared_settings
from ct2x.data.prepare_synth import SynthPreparation, case_paths, film_paths, load_case, load_film, render_poses
from ct2x.errors import CT2XInputError
from ct2x.preprocess import x2ct_normalize
from ct2x.volume import CTVolume


@dataclass(frozen=True)
class SynthAugmentation:
    """Random changes to a sample; each sample draws its own from the dataset's seed."""

    probability: float = 0.8  # share of samples rendered anew; the rest use the stored CT and pose
    motion: CTMotion = CTMotion()  # the CT turned, shifted and re-contrasted
    random_pose: bool = True  # primary angle uniform over the stored poses' range (else the stored pose)

    def __post_init__(self) -> None:
        if not 0 <= self.probability <= 1:
            raise CT2XInputError(f"augmentation probability {self.probability}: must lie in [0, 1]")


class SynthDataset(torch.utils.data.Dataset):
    """The (case, stored pose) pairs of one split of a prepared synth folder, each with a drawn real film of the
    split; with `augmentation` a share of them rendered anew from a moved CT at a drawn pose."""

    def __init__(self, root: Union[str, Path], split: Optional[str] = "train", seed: int = 0,
                 augmentation: Optional[SynthAugmentation] = None):
        self.paths, self.film_paths = case_paths(root, split), film_paths(root, split)
        for name, paths in (("cases", self.paths), ("films", self.film_paths)):
            if not paths:
                raise CT2XInputError(f"{root}: no {split or ''} {name}; prepare more or check the split")
        self.settings = SynthPreparation(**prepared_settings(root))
        self.poses = len(self.settings.angles_deg)
        self.augmentation = augmentation
        self.seed = seed
        self.epoch = 0  # set by the trainer, so each epoch draws new films and augmentations reproducibly

    def __len__(self) -> int:
        return len(self.paths) * self.poses

    def __getitem__(self, index: int) -> Dict[str, Union[torch.Tensor, str, float]]:
        number, pose = divmod(index, self.poses)
        case = load_case(self.paths[number])
        rng = np.random.default_rng([self.seed, self.epoch, index])
        film = self.film_paths[int(rng.integers(len(self.film_paths)))]
        ct_hu, angle = case["ct_hu"].astype(np.float32), float(case["angles_deg"][pose])  # (D, H, W) HU; degrees
        views = {name: case[name][pose] for name in ("labels", "mips", "drr")}
        if self.augmentation is not None and rng.random() < self.augmentation.probability:
            ct_hu, angle, views = self._render_anew(ct_hu, case["affine"], angle, rng)
        return {"ct": x2ct_normalize(torch.from_numpy(ct_hu))[None], "label": torch.from_numpy(views["labels"]),
                "mip": torch.from_numpy(views["mips"])[None], "drr": torch.from_numpy(views["drr"])[None] * 2 - 1,
                "xray": torch.from_numpy(load_film(film))[None] * 2 - 1,
                "case": self.paths[number].stem, "film": film.stem, "angle_deg": angle}

    def _render_anew(self, ct_hu: np.ndarray, affine: np.ndarray, angle: float, rng: np.random.Generator):
        """(moved CT (D, H, W) HU, primary angle, its label, MIP and DRR) of one draw."""
        augmentation, angles = self.augmentation, self.settings.angles_deg
        moved = augmentation.motion.apply(ct_hu, self.settings.voxel_mm, rng)
        if augmentation.random_pose:
            angle = float(rng.uniform(min(angles), max(angles)))
        rendered = render_poses(CTVolume(moved, affine, source="augmented case"), self.settings, [angle])
        return moved, angle, {name: rendered[name][0] for name in ("labels", "mips", "drr")}
