"""What every `ct2x prepare` task shares: finding CTs, the prepared folder, resuming, workers, splits, atomic files.

A prepared folder holds `preparation.json` (the command and its settings, which a resumed run must match),
`manifest.json` (one record per prepared item, with its patient and split, and every failed input with its reason)
and one `.npz` file per item. Files are written atomically (a temporary file, then a rename), the manifest after each
item, so an interrupted run leaves nothing half-written and resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import random
import re
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, TypeVar, Union

import numpy as np

from ct2x.errors import CT2XInputError
from ct2x.io.formats import READ_FORMATS, format_suffix

PathLike = Union[str, os.PathLike]
Settings = TypeVar("Settings")
Item = TypeVar("Item")
SETTINGS_FILE = "preparation.json"
MANIFEST_FILE = "manifest.json"
CASES_FOLDER = "cases"
HU_STORAGE_RANGE = (-1024, 3071)  # int16 storage of a case's CT; X2CT's normalisation uses -1024 ... 1476 HU


def stored_hu(hu: np.ndarray) -> np.ndarray:
    """HU as a case file stores them: whole HU clipped to HU_STORAGE_RANGE, int16 (same shape)."""
    return np.clip(np.round(hu), *HU_STORAGE_RANGE).astype(np.int16)


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
    return unique_ids(found, lambda path: format_suffix(path) if path.is_file() else "")


def unique_ids(paths: Iterable[Path], suffix_of: Callable[[Path], str]) -> Dict[str, Path]:
    """Id -> path: each path's name without `suffix_of(path)`, reduced to letters, digits, '.', '_' and '-', with
    "-2", "-3", ... added to repeated names."""
    ids: Dict[str, Path] = {}
    for path in paths:
        suffix = suffix_of(path)
        stem = path.name[: -len(suffix)] if suffix else path.name
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem) or "item"
        item_id, n = stem, 1
        while item_id in ids:
            n += 1
            item_id = f"{stem}-{n}"
        ids[item_id] = path
    return ids


def _holds_dicom(folder: Path) -> bool:
    """Whether the folder directly holds a DICOM file (by its name or its "DICM" preamble)."""
    from ct2x.io.dicom import has_dicom_preamble

    files = (p for p in folder.iterdir() if p.is_file() and format_suffix(p) not in READ_FORMATS)
    return any(p.suffix.lower() == ".dcm" or (p.stat().st_size > 132 and has_dicom_preamble(p)) for p in files)


def prepared_settings(root: PathLike) -> dict:
    """The settings a prepared folder was made with (its `preparation.json`)."""
    return json.loads((Path(root) / SETTINGS_FILE).read_text(encoding="utf-8"))["settings"]


def open_folder(out: Path, created_by: str, settings: dict, sections: Sequence[str],
                folders: Sequence[str]) -> dict:
    """The folder's manifest, new (with `sections`, each an empty mapping, and the item `folders` made) or resumed;
    refuses a folder prepared with other settings (another command's too) or holding other files."""
    wanted = {"created_by": created_by, "settings": json.loads(json.dumps(settings))}  # tuples as JSON lists
    settings_file = out / SETTINGS_FILE
    if settings_file.exists():
        previous = json.loads(settings_file.read_text(encoding="utf-8"))
        if previous.get("settings") != wanted["settings"]:
            raise CT2XInputError(f"{out}: was prepared with other settings ({previous.get('settings')}); use the same "
                                 "settings to resume, or another folder")
        manifest_file = out / MANIFEST_FILE
        manifest = json.loads(manifest_file.read_text(encoding="utf-8")) if manifest_file.exists() else {}
        return {section: manifest.get(section, {}) for section in sections}
    if out.exists() and any(out.iterdir()):
        raise CT2XInputError(f"{out}: folder exists, is not empty and is no prepared folder; choose a new folder")
    for folder in folders:
        (out / folder).mkdir(parents=True, exist_ok=True)
    write_json(settings_file, wanted)
    return {section: {} for section in sections}


def pending(items: Dict[str, Item], records: Dict[str, dict], folder: Path) -> Tuple[Dict[str, Item], List[str]]:
    """(the items still to prepare, the ids of items whose file `folder/<id>.npz` was written but which the manifest
    does not list: a run stopped between the two, so they are done)."""
    todo = {item_id: item for item_id, item in items.items()
            if item_id not in records and not (folder / f"{item_id}.npz").exists()}
    written = [item_id for item_id in items if item_id not in todo and item_id not in records]
    return todo, written


def prepare_items(command: str, items: Dict[str, Item], prepare: Callable[[Item, Settings], Dict[str, np.ndarray]],
                  describe: Callable[[Item], dict], details: Callable[[Dict[str, np.ndarray]], dict], out: Path,
                  folder: str, sections: Tuple[str, str], manifest: dict, settings: Settings,
                  assign_splits: Callable[[dict], None], workers: int = 1, progress: bool = True,
                  unit: str = "CT") -> None:
    """Prepare the `items` not done yet into `out/folder`, resuming: each is recorded in `manifest[sections[0]]` as
    `describe(item)` (a record with its "source") and `details(result)` (which pops what is not an array to save), or
    its failure in `manifest[sections[1]]`; splits are assigned and the manifest written after each. `command` names
    the task in messages ("ct2x prepare recon")."""
    import sys

    from tqdm import tqdm

    done, failed = (manifest[section] for section in sections)
    todo, written = pending(items, done, out / folder)
    for item_id in written:
        done[item_id] = {**describe(items[item_id]), "resumed": True}
    bar = tqdm(total=len(items), initial=len(items) - len(todo), desc=f"{command}: {folder}", unit=unit,
               file=sys.stderr, disable=not progress or not items)
    for item_id, item, result in run_parallel(prepare, todo, settings, workers):
        record = describe(item)
        if isinstance(result, str):
            failed[item_id] = {"source": record["source"], "reason": result}
            bar.write(f"{command}: skipped {record['source']}: {result}", file=sys.stderr)
        else:
            record.update(details(result))
            write_npz(out / folder / f"{item_id}.npz", result)
            failed.pop(item_id, None)
            done[item_id] = record
            for notice in record.get("notices", []):
                bar.write(f"{command}: note: {notice}", file=sys.stderr)
        assign_splits(manifest)
        write_json(out / MANIFEST_FILE, manifest)
        bar.update(1)
    bar.close()
    assign_splits(manifest)
    write_json(out / MANIFEST_FILE, manifest)


def case_details(result: Dict[str, np.ndarray]) -> dict:
    """The manifest details of a prepared CT case (`prepare_items`' `details`): the stored-value offset it was read
    with and the notices its reading raised (popped from the arrays to save)."""
    return {"stored_offset_hu": float(result["stored_offset_hu"]),
            "notices": [str(notice) for notice in result.pop("notices")]}


def run_parallel(prepare: Callable[[Item, Settings], Dict[str, np.ndarray]], todo: Dict[str, Item],
                 settings: Settings, workers: int) -> Iterator[Tuple[str, Item, Union[Dict[str, np.ndarray], str]]]:
    """(id, item, `prepare(item, settings)` or the reason it failed) for each item of `todo`, in order; on `workers`
    processes (each with one torch thread) when more than one. `prepare` must be a module-level function."""
    if workers <= 1 or len(todo) <= 1:
        for item_id, item in todo.items():
            yield item_id, item, _prepare_or_reason(prepare, item, settings)
        return
    with ProcessPoolExecutor(max_workers=workers, initializer=_one_torch_thread) as pool:
        futures = {item_id: pool.submit(_prepare_or_reason, prepare, item, settings) for item_id, item in todo.items()}
        for item_id, future in futures.items():
            yield item_id, todo[item_id], future.result()


def _one_torch_thread() -> None:
    import torch

    torch.set_num_threads(1)  # items run in parallel processes


def _prepare_or_reason(prepare: Callable[[Item, Settings], Dict[str, np.ndarray]], item: Item,
                       settings: Settings) -> Union[Dict[str, np.ndarray], str]:
    try:
        return prepare(item, settings)
    except (CT2XInputError, OSError) as error:
        return str(error)


def patient_of(item_id: str, pattern: str) -> str:
    """The patient id in `item_id`: the first group of the regular expression `pattern` where it matches, else the
    item id itself (every item its own patient)."""
    match = re.search(pattern, item_id) if pattern else None
    return match.group(1) if match else item_id


def check_patient_pattern(pattern: str) -> None:
    """CT2XInputError unless `pattern` is empty or a regular expression with a group."""
    if not pattern:
        return
    try:
        compiled = re.compile(pattern)
    except re.error as error:
        raise CT2XInputError(f"patient_pattern {pattern!r}: not a regular expression ({error})") from None
    if compiled.groups < 1:
        raise CT2XInputError(f"patient_pattern {pattern!r}: needs a group, e.g. '^(\\d+)_'")


def assign_splits(records: Dict[str, dict], held_out: Sequence[Tuple[str, float]], seed: int) -> None:
    """Give every record (which holds its "patient") its patient's "split" (`split_patients`)."""
    splits = split_patients((record["patient"] for record in records.values()), held_out, seed)
    for record in records.values():
        record["split"] = splits[record["patient"]]


def split_patients(patients: Iterable[str], held_out: Sequence[Tuple[str, float]], seed: int) -> Dict[str, str]:
    """Patient -> split. For each (split, fraction) of `held_out` in turn (e.g. ("test", 0.1), ("val", 0.1)), the
    seeded draw takes round(fraction x all patients) of the patients left, at least one when the fraction is above 0,
    always leaving one for training; the rest are "train". The same patients and seed give the same split."""
    remaining = sorted(set(patients))
    total = len(remaining)
    draw = random.Random(seed)
    splits: Dict[str, str] = {}
    for split, fraction in held_out:
        count = 0 if fraction == 0 or len(remaining) < 2 else min(max(1, round(fraction * total)), len(remaining) - 1)
        splits.update({patient: split for patient in draw.sample(remaining, count)})
        remaining = [patient for patient in remaining if patient not in splits]
    splits.update({patient: "train" for patient in remaining})
    return splits


def check_fractions(fractions: Dict[str, float]) -> None:
    """CT2XInputError unless each held-out fraction lies in [0, 1) and together they leave room for training."""
    for name, fraction in fractions.items():
        if not 0 <= fraction < 1:
            raise CT2XInputError(f"{name}={fraction}: must lie in [0, 1)")
    if sum(fractions.values()) >= 1:
        raise CT2XInputError(f"{' + '.join(fractions)} = {sum(fractions.values()):g}: must stay below 1, leaving "
                             "patients for training")


def write_npz(path: Path, arrays: Dict[str, np.ndarray]) -> None:
    """Save `arrays` compressed into `path`, atomically."""
    fd, tmp = tempfile.mkstemp(suffix=".npz", prefix=f".{path.stem}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            np.savez_compressed(file, **arrays)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: dict) -> None:
    """Save `data` as indented JSON into `path`, atomically."""
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


def read_npz(path: PathLike, keys: Sequence[str]) -> Dict[str, np.ndarray]:
    """The arrays `keys` of an `.npz` file; no pickled objects are loaded."""
    with np.load(Path(path), allow_pickle=False) as arrays:
        return {key: arrays[key] for key in keys}


def prepared_paths(root: PathLike, section: str, folder: str, command: str,
                   split: Optional[str] = None) -> List[Path]:
    """The item files `root/folder/<id>.npz` of the manifest's `section`, of one split or all, in id order;
    CT2XInputError naming `command` when `root` holds no manifest."""
    root = Path(root).expanduser()
    manifest_file = root / MANIFEST_FILE
    if not manifest_file.exists():
        raise CT2XInputError(f"{root}: no {MANIFEST_FILE}; prepare the folder with `{command}` first")
    records = json.loads(manifest_file.read_text(encoding="utf-8")).get(section, {})
    return [root / folder / f"{item_id}.npz" for item_id, record in sorted(records.items())
            if split is None or record.get("split") == split]
