"""`ct2x prepare recon`: CTs -> training cases for X-ray -> CT networks (a cube CT and its PA and lateral films).

A prepared folder holds `preparation.json` (the settings), `manifest.json` (every case: source, patient, split,
stored-value conversion; every failed input with its reason) and `cases/<case>.npz`, each with
- `ct_hu`: int16 (D, H, W) HU on X2CT's cube (`ct2x.data.x2ct_convention`), 2.5 mm voxels by default,
- `pa`, `lateral`: float32 (P, P) films in [0, 1] as the official pipeline renders them,
- `affine`: float64 (4, 4) voxel ijk -> RAS mm of the cube (i = W, j = H, k = D).

Cases are written atomically one by one and the manifest after each, so an interrupted run resumes where it stopped
(`prepare_recon` on the same folder and settings skips finished cases). Inputs that fail are reported and skipped.
The split into training and test cases is by patient and seeded.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from ct2x import __version__
from ct2x.data.preparation import (
    CASES_FOLDER,
    PathLike,
    assign_splits,
    case_details,
    check_fractions,
    check_patient_pattern,
    find_cts,
    open_folder,
    patient_of,
    prepare_items,
    prepared_paths,
    read_npz,
    stored_hu,
)
from ct2x.errors import CT2XInputError, CT2XWarning


@dataclass(frozen=True)
class ReconPreparation:
    """How CTs become cases; saved with the folder, which later runs must match."""

    cube_mm: float = 320.0  # cube edge about the CT's centre, mm (X2CT's)
    ct_voxels: int = 128  # voxels per cube edge
    film_px: int = 128  # film pixels per side
    stored_values: str = "auto"  # "auto", "hu" or "hu+1024" (see ct2x.volume.interpret_stored_values)
    test_fraction: float = 0.1  # share of patients held out for testing (at least one when there are two or more)
    val_fraction: float = 0.0  # ... then for validation (none by default; `ct2x train --validate-every` scores on it)
    seed: int = 0  # of the split
    patient_pattern: str = ""  # regular expression whose first group takes the patient id from the case id

    def __post_init__(self) -> None:
        check_fractions({"test_fraction": self.test_fraction, "val_fraction": self.val_fraction})
        if self.ct_voxels < 16 or self.film_px < 16 or not self.cube_mm > 0:
            raise CT2XInputError("cube_mm must be positive and ct_voxels, film_px at least 16")
        check_patient_pattern(self.patient_pattern)


def prepare_case(path: Path, settings: ReconPreparation) -> Dict[str, np.ndarray]:
    """One CT -> the arrays of its case file, plus the notices its reading raised (`notices`, a str array)."""
    import torch

    from ct2x.data.x2ct_convention import ct_cube, ct_films
    from ct2x.io import load_ct

    torch.set_num_threads(1)  # cases run in parallel processes
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CT2XWarning)
        volume = load_ct(path, stored_values=settings.stored_values)
    pa, lateral = ct_films(volume, settings.cube_mm, settings.film_px)
    cube = ct_cube(volume, voxels=settings.ct_voxels, cube_mm=settings.cube_mm)
    ct_hu = stored_hu(cube.hu)  # (D, H, W)
    return {"ct_hu": ct_hu, "pa": pa, "lateral": lateral, "affine": cube.affine,
            "stored_offset_hu": np.float64(volume.stored_offset_hu),
            "notices": np.array([str(w.message) for w in caught if issubclass(w.category, CT2XWarning)], dtype=str)}


def prepare_recon(inputs: Sequence[PathLike], out: PathLike, settings: ReconPreparation = ReconPreparation(),
                  workers: int = 1, progress: bool = True) -> dict:
    """Prepare every CT of `inputs` into `out` (resuming a folder prepared with the same settings); the manifest."""
    out = Path(out).expanduser()
    cases = find_cts(inputs)
    if not cases:
        raise CT2XInputError(f"no CT files found in {', '.join(map(str, inputs))}")
    manifest = open_folder(out, f"ct2x {__version__} prepare recon", asdict(settings), ("cases", "failed"),
                           (CASES_FOLDER,))
    prepare_items("ct2x prepare recon", cases, prepare_case, lambda path: {"source": str(path)}, case_details, out,
                  CASES_FOLDER, ("cases", "failed"), manifest, settings, lambda m: _assign_splits(m, settings),
                  workers, progress)
    return manifest


def _assign_splits(manifest: dict, settings: ReconPreparation) -> None:
    """Split patients (not cases) into train, test and val with the settings' seed (test drawn first, so a val
    fraction leaves the test split as without it); every case gets its patient's split."""
    for case, record in manifest["cases"].items():
        record["patient"] = patient_of(case, settings.patient_pattern)
    assign_splits(manifest["cases"], (("test", settings.test_fraction), ("val", settings.val_fraction)), settings.seed)


def load_case(path: PathLike) -> Dict[str, np.ndarray]:
    """A case file's arrays (`ct_hu`, `pa`, `lateral`, `affine`); no pickled objects are loaded."""
    return read_npz(path, ("ct_hu", "pa", "lateral", "affine"))


def case_paths(root: PathLike, split: Optional[str] = None) -> List[Path]:
    """The case files of a prepared folder, of one split ("train", "test") or all, in case order."""
    return prepared_paths(root, "cases", CASES_FOLDER, "ct2x prepare recon", split)
