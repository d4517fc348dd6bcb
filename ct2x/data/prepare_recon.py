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

import json
import os
import random
import re
import sys
import tempfile
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from ct2x import __version__
from ct2x.errors import CT2XInputError, CT2XWarning
from ct2x.io.formats import READ_FORMATS, format_suffix

PathLike = Union[str, os.PathLike]
SETTINGS_FILE = "preparation.json"
MANIFEST_FILE = "manifest.json"
CASES_FOLDER = "cases"
HU_STORAGE_RANGE = (-1024, 3071)  # int16 storage of the cube: X2CT's normalisation uses -1024 ... 1476 HU


@dataclass(frozen=True)
class ReconPreparation:
    """How CTs become cases; saved with the folder, which later runs must match."""

    cube_mm: float = 320.0  # cube edge about the CT's centre, mm (X2CT's)
    ct_voxels: int = 128  # voxels per cube edge
    film_px: int = 128  # film pixels per side
    stored_values: str = "auto"  # "auto", "hu" or "hu+1024" (see ct2x.volume.interpret_stored_values)
    test_fraction: float = 0.1  # share of patients held out for testing (at least one when there are two or more)
    seed: int = 0  # of the split
    patient_pattern: str = ""  # regular expression whose first group takes the patient id from the case id

    def __post_init__(self) -> None:
        if not 0 <= self.test_fraction < 1:
            raise CT2XInputError(f"test_fraction={self.test_fraction}: must lie in [0, 1)")
        if self.ct_voxels < 16 or self.film_px < 16 or not self.cube_mm > 0:
            raise CT2XInputError("cube_mm must be positive and ct_voxels, film_px at least 16")
        if self.patient_pattern:
            try:
                pattern = re.compile(self.patient_pattern)
            except re.error as error:
                raise CT2XInputError(f"patient_pattern {self.patient_pattern!r}: not a regular expression "
                                     f"({error})") from None
            if pattern.groups < 1:
                raise CT2XInputError(f"patient_pattern {self.patient_pattern!r}: needs a group, e.g. '^(\\d+)_'")


def find_cts(inputs: Sequence[PathLike]) -> Dict[str, Path]:
    """Case id -> CT path for files and folders given: image files directly or found recursively in folders, and
    each folder that directly holds DICOM files (one series: one case). Ids are the names without suffix, made unique.
    """
    found: List[Path] = []
    for entry in (Path(p).expanduser() for p in inputs):
        if not entry.exists():
            raise CT2XInputError(f"{entry}: does not exist; pass CT files or folders that hold them")
        if entry.is_file():
            found.append(entry)
            continue
        found.extend(sorted(p for p in entry.rglob("*") if p.is_file() and format_suffix(p) in READ_FORMATS))
        found.extend(folder for folder in sorted([entry, *(p for p in entry.rglob("*") if p.is_dir())])
                     if _holds_dicom(folder))
    cases: Dict[str, Path] = {}
    for path in found:
        stem = path.name[: -len(format_suffix(path))] if path.is_file() and format_suffix(path) else path.name
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem) or "case"
        case_id, n = stem, 1
        while case_id in cases:
            n += 1
            case_id = f"{stem}-{n}"
        cases[case_id] = path
    return cases


def _holds_dicom(folder: Path) -> bool:
    """Whether the folder directly holds a DICOM file (by its name or its "DICM" preamble)."""
    from ct2x.io.dicom import has_dicom_preamble

    files = (p for p in folder.iterdir() if p.is_file() and format_suffix(p) not in READ_FORMATS)
    return any(p.suffix.lower() == ".dcm" or (p.stat().st_size > 132 and has_dicom_preamble(p)) for p in files)


def prepare_case(path: Path, settings: ReconPreparation) -> Dict[str, np.ndarray]:
    """One CT -> the arrays of its case file, plus the notices its reading raised (`notices`, a str array)."""
    import torch

    from ct2x.data.x2ct_convention import ct_cube, official_films
    from ct2x.io import load_ct

    torch.set_num_threads(1)  # cases run in parallel processes
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CT2XWarning)
        volume = load_ct(path, stored_values=settings.stored_values)
    fine_cube = ct_cube(volume, voxels=int(round(settings.cube_mm)), cube_mm=settings.cube_mm)  # 1 mm for films
    pa, lateral = official_films(fine_cube, settings.film_px)
    cube = ct_cube(volume, voxels=settings.ct_voxels, cube_mm=settings.cube_mm)
    ct_hu = np.clip(np.round(cube.hu), *HU_STORAGE_RANGE).astype(np.int16)  # (D, H, W)
    return {"ct_hu": ct_hu, "pa": pa, "lateral": lateral, "affine": cube.affine,
            "stored_offset_hu": np.float64(volume.stored_offset_hu),
            "notices": np.array([str(w.message) for w in caught if issubclass(w.category, CT2XWarning)], dtype=str)}


def prepare_recon(inputs: Sequence[PathLike], out: PathLike, settings: ReconPreparation = ReconPreparation(),
                  workers: int = 1, progress: bool = True) -> dict:
    """Prepare every CT of `inputs` into `out` (resuming a folder prepared with the same settings); the manifest."""
    from tqdm import tqdm

    out = Path(out).expanduser()
    cases = find_cts(inputs)
    if not cases:
        raise CT2XInputError(f"no CT files found in {', '.join(map(str, inputs))}")
    manifest = _start(out, settings)
    todo = {case: path for case, path in cases.items()
            if case not in manifest["cases"] and not (out / CASES_FOLDER / f"{case}.npz").exists()}
    for case in set(cases) - set(todo) - set(manifest["cases"]):  # written, then interrupted before the manifest
        manifest["cases"][case] = {"source": str(cases[case]), "resumed": True}
    bar = tqdm(total=len(cases), initial=len(cases) - len(todo), desc="ct2x prepare recon", unit="CT",
               file=sys.stderr, disable=not progress)
    for case, path, result in _run(todo, settings, workers):
        if isinstance(result, str):
            manifest["failed"][case] = {"source": str(path), "reason": result}
            bar.write(f"ct2x prepare recon: skipped {path}: {result}", file=sys.stderr)
        else:
            notices = [str(n) for n in result.pop("notices")]
            _write_npz(out / CASES_FOLDER / f"{case}.npz", result)
            manifest["failed"].pop(case, None)
            manifest["cases"][case] = {"source": str(path), "stored_offset_hu": float(result["stored_offset_hu"]),
                                       "notices": notices}
            for notice in notices:
                bar.write(f"ct2x prepare recon: note: {notice}", file=sys.stderr)
        _assign_splits(manifest, settings)
        _write_json(out / MANIFEST_FILE, manifest)
        bar.update(1)
    bar.close()
    _assign_splits(manifest, settings)
    _write_json(out / MANIFEST_FILE, manifest)
    return manifest


def _start(out: Path, settings: ReconPreparation) -> dict:
    """The folder's manifest, new or resumed; refuses a folder prepared with other settings or holding other files."""
    wanted = {"created_by": f"ct2x {__version__} prepare recon", "settings": asdict(settings)}
    settings_file = out / SETTINGS_FILE
    if settings_file.exists():
        previous = json.loads(settings_file.read_text(encoding="utf-8"))
        if previous.get("settings") != wanted["settings"]:
            raise CT2XInputError(f"{out}: was prepared with other settings ({previous.get('settings')}); use the same "
                                 "settings to resume, or another folder")
        manifest_file = out / MANIFEST_FILE
        return (json.loads(manifest_file.read_text(encoding="utf-8")) if manifest_file.exists()
                else {"cases": {}, "failed": {}})
    if out.exists() and any(out.iterdir()):
        raise CT2XInputError(f"{out}: folder exists, is not empty and is no prepared folder; choose a new folder")
    (out / CASES_FOLDER).mkdir(parents=True, exist_ok=True)
    _write_json(settings_file, wanted)
    return {"cases": {}, "failed": {}}


def _run(todo: Dict[str, Path], settings: ReconPreparation,
         workers: int) -> Iterator[Tuple[str, Path, Union[Dict[str, np.ndarray], str]]]:
    """(case, path, arrays or the reason it failed) for each case, as they finish."""
    if workers <= 1 or len(todo) <= 1:
        for case, path in todo.items():
            yield case, path, _prepare_or_reason(path, settings)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = {case: pool.submit(_prepare_or_reason, path, settings) for case, path in todo.items()}
        for case, future in futures.items():
            yield case, todo[case], future.result()


def _prepare_or_reason(path: Path, settings: ReconPreparation) -> Union[Dict[str, np.ndarray], str]:
    try:
        return prepare_case(path, settings)
    except (CT2XInputError, OSError) as error:
        return str(error)


def _assign_splits(manifest: dict, settings: ReconPreparation) -> None:
    """Split patients (not cases) into train and test with the settings' seed; every case gets its patient's split."""
    pattern = re.compile(settings.patient_pattern) if settings.patient_pattern else None
    for case, record in manifest["cases"].items():
        match = pattern.search(case) if pattern else None
        record["patient"] = match.group(1) if match else case
    patients = sorted({record["patient"] for record in manifest["cases"].values()})
    n_test = 0 if len(patients) < 2 or settings.test_fraction == 0 else max(1, round(settings.test_fraction *
                                                                                     len(patients)))
    test = set(random.Random(settings.seed).sample(patients, n_test))
    for record in manifest["cases"].values():
        record["split"] = "test" if record["patient"] in test else "train"


def _write_npz(path: Path, arrays: Dict[str, np.ndarray]) -> None:
    fd, tmp = tempfile.mkstemp(suffix=".npz", prefix=f".{path.stem}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            np.savez_compressed(file, **arrays)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_json(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(suffix=".json", prefix=f".{path.stem}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            json.dump(data, file, indent=2)
            file.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_case(path: PathLike) -> Dict[str, np.ndarray]:
    """A case file's arrays (`ct_hu`, `pa`, `lateral`, `affine`); no pickled objects are loaded."""
    with np.load(Path(path), allow_pickle=False) as case:
        return {key: case[key] for key in ("ct_hu", "pa", "lateral", "affine")}


def case_paths(root: PathLike, split: Optional[str] = None) -> List[Path]:
    """The case files of a prepared folder, of one split ("train", "test") or all, in case order."""
    root = Path(root).expanduser()
    manifest_file = root / MANIFEST_FILE
    if not manifest_file.exists():
        raise CT2XInputError(f"{root}: no {MANIFEST_FILE}; prepare the folder with `ct2x prepare recon` first")
    cases = json.loads(manifest_file.read_text(encoding="utf-8"))["cases"]
    return [root / CASES_FOLDER / f"{case}.npz" for case, record in sorted(cases.items())
            if split is None or record.get("split") == split]
