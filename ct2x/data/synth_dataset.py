"""Training samples for CT2X-GAN (CT -> X-ray synthesis) from a folder made by `ct2x prepare synth`.

Item i is case i // P of the split at its stored pose i % P (P poses per case, so an epoch sees every stored DRR),
with one real film of the same split drawn as the style reference (unpaired): a dict of float32 tensors
- `ct` (1, D, H, W) in X2CT's [0, 1] normalisation (`x2ct_normalize` of the stored HU);
- `label` (25,), the pose's camera label, and `mip` (1, M, M), its MIP in [0, 1];
- `drr` (1, F, F), the DRR at the pose, and `xray` (1, F, F), the real film, both mapped from [0, 1] to the
  networks' [-1, 1];
- `case`, `film` (their ids) and `angle_deg` (the pose's primary angle).

The film is drawn from (seed, epoch, index), so a run with a fixed seed sees the same samples again. There is no
augmentation yet: the poses are the stored ones only (no DRRs rendered at random poses in between).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Union

import numpy as np
import torch

from ct2x.data.prepare_synth import case_paths, film_paths, load_case, load_film
from ct2x.errors import CT2XInputError
from ct2x.preprocess import x2ct_normalize


class SynthDataset(torch.utils.data.Dataset):
    """The (case, stored pose) pairs of one split of a prepared synth folder, each with a drawn real film of the
    split."""

    def __init__(self, root: Union[str, Path], split: Optional[str] = "train", seed: int = 0):
        self.paths, self.film_paths = case_paths(root, split), film_paths(root, split)
        for name, paths in (("cases", self.paths), ("films", self.film_paths)):
            if not paths:
                raise CT2XInputError(f"{root}: no {split or ''} {name}; prepare more or check the split")
        with np.load(self.paths[0]) as first:
            self.poses = len(first["angles_deg"])  # one preparation: every case has the same poses
        self.seed = seed
        self.epoch = 0  # set by the trainer, so each epoch draws new films reproducibly

    def __len__(self) -> int:
        return len(self.paths) * self.poses

    def __getitem__(self, index: int) -> Dict[str, Union[torch.Tensor, str, float]]:
        number, pose = divmod(index, self.poses)
        case = load_case(self.paths[number])
        rng = np.random.default_rng([self.seed, self.epoch, index])
        film = self.film_paths[int(rng.integers(len(self.film_paths)))]
        return {"ct": x2ct_normalize(torch.from_numpy(case["ct_hu"].astype(np.float32)))[None],
                "label": torch.from_numpy(case["labels"][pose]), "mip": torch.from_numpy(case["mips"][pose])[None],
                "drr": torch.from_numpy(case["drr"][pose])[None] * 2 - 1,
                "xray": torch.from_numpy(load_film(film))[None] * 2 - 1,
                "case": self.paths[number].stem, "film": film.stem, "angle_deg": float(case["angles_deg"][pose])}
