"""`ct2x prepare synth`: CTs and real X-ray films -> training data for CT2X-GAN (CT -> X-ray synthesis).

Follows the paper's data protocol (Tan et al., arXiv 2404.11889, "Dataset"; models.md §3): each CT resampled to
1 mm and cut to 128^3 (a 128 mm cube about the CT's centre: "resampled to 1 x 1 x 1 mm^3 and reshaped into
128 x 128 x 128"), DRRs at seven C-arm poses, -90 ... 90 deg in steps of 30 deg with the secondary angle 0, rendered
with the core physics (`ct2x.drr`) from DeepDRR's 60 kVp spectrum filtered by 3.5 mm Al ("60KV_AL35", our preset
"60kV") on DeepDRR's mobile C-arm (source-to-detector 1020 mm, source-to-isocentre 530 mm, 298 mm sensor; the paper
prints the two distances swapped, see `ct2x.geometry`). The paper's DeepDRR "photon count of 1,000,000" only sets
DeepDRR's noise, which its projector leaves off by default: the DRRs here are noiseless. Real X-ray films for the
style domain go through `ct2x.data.films.prepare_film`, the preparation `ct2x reconstruct` gives films.

A prepared folder (shared layout and behaviour: `ct2x.data.preparation`) holds `preparation.json` (the settings),
`manifest.json` and
- `cases/<case>.npz`, one per CT:
  - `ct_hu`: int16 (D, H, W) HU on the cube, D superior -> inferior, H anterior -> posterior, W patient's right ->
    left (`ct2x.data.x2ct_convention.ct_cube`), `voxel_mm` voxels (1 mm);
  - `affine`: float64 (4, 4) voxel ijk -> RAS mm of the cube (i = W, j = H, k = D); its centre is the C-arm's
    isocentre;
  - `angles_deg`: float32 (P,) primary C-arm angles, degrees (0 = AP, +90 = left lateral; secondary 0);
  - `labels`: float32 (P, 25) camera labels (`ct2x.synth_inputs.camera_labels`: 4 x 4 camera-to-world, translation
    in mm from the isocentre, then the 3 x 3 normalised intrinsics);
  - `drr`: float32 (P, F, F) films in [0, 1]: the attenuation -ln(I / I_open) of each view divided by its own
    maximum (air 0, the densest bone 1, as the real films from `prepare_film`), radiological display;
  - `drr_max`: float32 (P,) that maximum, so `drr * drr_max` is the attenuation itself;
  - `mips`: float32 (P, M, M) the pose MIPs of the PAM (`ct2x.synth_inputs.pose_mips`), in [0, 1], same views on an
    M x M detector of the same sensor (pixel-aligned with the DRRs). They cost a tenth of the DRRs, so they are
    stored; a trainer rendering new poses makes its own the same way.
  DRRs and MIPs are rendered from the stored `ct_hu` itself, so rendering again from the case file gives them again.
- `films/<film>.npz`, one per real film: `image`, float32 (F, F) in [0, 1], bone bright, as `prepare_film` makes it.

The manifest lists every case (source, patient, split, stored-value conversion, notices) and every film (source,
view, where the view came from, patient, licence, the decisions `prepare_film` took, split), and every CT or film
that failed with its reason. CTs and films are split separately, each by patient and seeded, into train, val and
test. Film views and patients come from index CSVs in the film folders (a `file` or `filename` column, `view`,
`patientid`, `license`); without an index row the view is read from the file name (a word "L", "lat", "lateral",
"PA" or "AP") and each film is its own patient. Patient ids are taken as written across folders, so the same id in
two folders is one patient (ids of unrelated folders that collide only join two patients in one split).
"""

from __future__ import annotations

import csv
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ct2x import __version__
from ct2x.data.films import ROLES, prepare_film
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
    unique_ids,
)
from ct2x.data.x2ct_convention import ct_cube
from ct2x.drr import DRRRenderer, Physics
from ct2x.errors import CT2XInputError, CT2XWarning
from ct2x.geometry import (
    MOBILE_CARM_SENSOR_MM,
    SEVEN_VIEWS_DEG,
    SOURCE_TO_DETECTOR_MM,
    SOURCE_TO_ISOCENTER_MM,
    CArm,
    Detector,
)
from ct2x.io import load_ct
from ct2x.synth_inputs import camera_labels, pose_mips
from ct2x.volume import CTVolume

FILMS_FOLDER = "films"
SECTIONS = ("cases", "failed", "films", "failed_films")  # of the manifest
CASE_KEYS = ("ct_hu", "affine", "angles_deg", "labels", "drr", "drr_max", "mips")
FILM_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm")
VIEW_WORDS = {"pa": "pa", "ap": "pa", "l": "lateral", "lat": "lateral", "lateral": "lateral"}  # -> prepare_film role
INDEX_FILE_COLUMNS = ("file", "filename")
INDEX_PATIENT_COLUMNS = ("patientid", "patient_id", "patient")
INDEX_LICENCE_COLUMNS = ("license", "licence")


@dataclass(frozen=True)
class SynthPreparation:
    """How CTs and films become CT2X-GAN's data; saved with the folder, which later runs must match."""

    voxel_mm: float = 1.0  # the paper's: CTs resampled to 1 mm ...
    ct_voxels: int = 128  # ... and 128^3, a 128 mm cube about the CT's centre
    angles_deg: Tuple[float, ...] = tuple(primary for primary, _ in SEVEN_VIEWS_DEG)  # primary; secondary 0 (paper)
    film_px: int = 256  # DRR and real film pixels per side (the paper's 256)
    mip_px: int = 128  # pose MIP pixels per side (CT2XGANConfig.mip_size)
    spectrum: str = "60kV"  # 60 kVp, 3.5 mm Al: DeepDRR's "60KV_AL35", the paper's
    source_to_detector_mm: float = SOURCE_TO_DETECTOR_MM  # 1020 mm, DeepDRR's mobile C-arm (the paper's)
    source_to_isocenter_mm: float = SOURCE_TO_ISOCENTER_MM  # 530 mm
    sensor_mm: float = MOBILE_CARM_SENSOR_MM  # detector edge, 298 mm (1536 px of 0.194 mm)
    stored_values: str = "auto"  # "auto", "hu" or "hu+1024" (see ct2x.volume.interpret_stored_values)
    val_fraction: float = 0.1  # share of patients (CTs and films apart) held out for validation ...
    test_fraction: float = 0.1  # ... and for testing (at least one each when there are enough patients)
    seed: int = 0  # of the splits
    patient_pattern: str = ""  # regular expression whose first group takes the patient id from a CT's case id

    def __post_init__(self) -> None:
        object.__setattr__(self, "angles_deg", tuple(float(angle) for angle in self.angles_deg))
        if not self.angles_deg:
            raise CT2XInputError("angles_deg: give at least one C-arm angle")
        if not self.voxel_mm > 0 or min(self.ct_voxels, self.film_px, self.mip_px) < 8:
            raise CT2XInputError("voxel_mm must be positive and ct_voxels, film_px, mip_px at least 8")
        check_fractions({"val_fraction": self.val_fraction, "test_fraction": self.test_fraction})
        check_patient_pattern(self.patient_pattern)
        Physics(spectrum=self.spectrum)  # raises for an unknown spectrum
        for angle in self.angles_deg:
            self.carm(self.film_px).view(angle)  # raises for an impossible geometry or angle

    @property
    def cube_mm(self) -> float:
        """Edge of the CT cube, mm."""
        return self.voxel_mm * self.ct_voxels

    def carm(self, detector_px: int) -> CArm:
        """The C-arm with a square detector of `detector_px` pixels over the whole sensor."""
        return CArm(self.source_to_detector_mm, self.source_to_isocenter_mm,
                    Detector.square(detector_px, self.sensor_mm / detector_px))


@dataclass(frozen=True)
class FilmSource:
    """A real film to prepare, with what its folder says about it."""

    path: Path
    view: str  # "pa" (a PA or AP film) or "lateral", the role `prepare_film` prepares it as; "" when not known
    view_from: str  # where the view was read: an index file, the file name, or assumed
    patient: str
    licence: str = ""

    def describe(self) -> dict:
        """The film's manifest record before preparation."""
        return {"source": str(self.path), "view": self.view, "view_from": self.view_from, "patient": self.patient,
                "licence": self.licence}


def synth_cube(ct: CTVolume, settings: SynthPreparation) -> CTVolume:
    """The CT as its case file stores it: on the preparation's cube about its centre (linear, -1024 HU outside the
    scan), whole HU clipped to the int16 storage range; (K, J, I) = (D, H, W) float32 HU. CT2XInputError when the
    cube holds nothing denser than fat."""
    cube = ct_cube(ct, voxels=settings.ct_voxels, cube_mm=settings.cube_mm)
    return CTVolume(stored_hu(cube.hu).astype(np.float32), cube.affine, source=ct.source)


def prepare_case(path: Path, settings: SynthPreparation) -> Dict[str, np.ndarray]:
    """One CT -> the arrays of its case file, plus the notices its reading raised (`notices`, a str array)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CT2XWarning)
        volume = load_ct(path, stored_values=settings.stored_values)
    stored = synth_cube(volume, settings)  # what the case file holds; refused when the cube holds no body
    return {"ct_hu": stored.hu.astype(np.int16), "affine": stored.affine,  # (D, H, W) HU
            "angles_deg": np.array(settings.angles_deg, dtype=np.float32),
            **render_poses(stored, settings, settings.angles_deg),
            "stored_offset_hu": np.float64(volume.stored_offset_hu),
            "notices": np.array([str(w.message) for w in caught if issubclass(w.category, CT2XWarning)], dtype=str)}


def render_poses(cube: CTVolume, settings: SynthPreparation, angles_deg: Sequence[float]) -> Dict[str, np.ndarray]:
    """The case file's `labels`, `drr`, `drr_max` and `mips` of `cube` at these primary C-arm angles (degrees,
    secondary 0) about the cube's centre: what preparation stores and what a trainer renders at new poses."""
    renderer = DRRRenderer(cube, settings.carm(settings.film_px), Physics(spectrum=settings.spectrum), sweep=False)
    views = [renderer.view(angle) for angle in angles_deg]
    attenuation = np.stack([renderer.render_view(view).attenuation for view in views])  # (P, F, F) -ln(I / I_open)
    drr_max = attenuation.max(axis=(1, 2))  # (P,)
    mip_carm = settings.carm(settings.mip_px)
    mips = pose_mips(cube, [mip_carm.view(angle, 0.0, cube.center_ras) for angle in angles_deg])
    return {"labels": camera_labels(views).numpy(),
            "drr": (attenuation / np.maximum(drr_max, 1e-6)[:, None, None]).astype(np.float32),
            "drr_max": drr_max.astype(np.float32), "mips": mips[:, 0].numpy()}  # (P, M, M) in [0, 1]


def prepare_film_file(source: FilmSource, settings: SynthPreparation) -> Dict[str, np.ndarray]:
    """One real film -> the arrays of its film file (`image`), plus the decisions taken on it (`choices`)."""
    if source.view not in ROLES:
        raise CT2XInputError(f"{source.path}: {source.view_from}: neither a PA/AP nor a lateral film")
    film = prepare_film(source.path, source.view, settings.film_px)
    return {"image": film.image, "choices": np.array(film.choices, dtype=str)}


def find_films(inputs: Sequence[PathLike]) -> Dict[str, FilmSource]:
    """Film id -> source for the PNG, JPEG and DICOM (.dcm) files given or found recursively in folders given, with
    view, patient and licence from index CSVs in those folders (or beside a film given as a file)."""
    found: List[Path] = []
    index: Dict[Path, Tuple[Path, Dict[str, str]]] = {}  # film path -> (index file, its row)
    for entry in (Path(p).expanduser() for p in inputs):
        if not entry.exists():
            raise CT2XInputError(f"{entry}: does not exist; pass X-ray films or folders that hold them")
        if entry.is_file():
            found.append(entry)
        else:
            found.extend(sorted(p for p in entry.rglob("*") if p.is_file() and p.suffix.lower() in FILM_SUFFIXES))
        for table in sorted(entry.rglob("*.csv") if entry.is_dir() else entry.parent.glob("*.csv")):
            index.update(_read_index(table))
    films = {}
    for film_id, path in unique_ids(found, lambda p: p.suffix).items():
        table, row = index.get(path.resolve(), (None, {}))
        films[film_id] = _film_source(path, film_id, table, row)
    return films


def _read_index(table: Path) -> Dict[Path, Tuple[Path, Dict[str, str]]]:
    """Film path -> (table, row) for an index CSV with a file column; nothing for other CSV files."""
    try:
        with table.open(newline="", encoding="utf-8-sig") as file:
            rows = [{key.strip().lower(): (value or "").strip() for key, value in row.items() if key}
                    for row in csv.DictReader(file)]
    except (UnicodeDecodeError, csv.Error) as error:
        raise CT2XInputError(f"{table}: cannot be read as a CSV table of films ({error}); save it as UTF-8 CSV or move "
                             "it out of the film folders") from None
    column = next((name for name in INDEX_FILE_COLUMNS if rows and name in rows[0]), None)
    return {} if column is None else {(table.parent / row[column]).resolve(): (table, row) for row in rows}


def _film_source(path: Path, film_id: str, table: Optional[Path], row: Dict[str, str]) -> FilmSource:
    patient = next((row[name] for name in INDEX_PATIENT_COLUMNS if row.get(name)), film_id)
    licence = next((row[name] for name in INDEX_LICENCE_COLUMNS if row.get(name)), "")
    if row.get("view"):
        return FilmSource(path, _view(row["view"]), f"{table} says view {row['view']!r}", patient, licence)
    view = _view(path.stem)
    if view:
        return FilmSource(path, view, f"the file name says {view}", patient, licence)
    return FilmSource(path, "pa", "assumed PA: no index row and no view in the file name", patient, licence)


def _view(text: str) -> str:
    """"pa", "lateral" or "" for the last view word ("PA", "AP", "L", "lat", "lateral") in `text`."""
    words = [VIEW_WORDS[word] for word in re.split(r"[^a-z]+", text.lower()) if word in VIEW_WORDS]
    return words[-1] if words else ""


def prepare_synth(ct_inputs: Sequence[PathLike], xray_inputs: Sequence[PathLike], out: PathLike,
                  settings: SynthPreparation = SynthPreparation(), workers: int = 1, progress: bool = True) -> dict:
    """Prepare every CT of `ct_inputs` and every film of `xray_inputs` into `out` (resuming a folder prepared with
    the same settings); the manifest."""
    out = Path(out).expanduser()
    cases = find_cts(ct_inputs)
    if not cases:
        raise CT2XInputError(f"no CT files found in {', '.join(map(str, ct_inputs))}")
    films = find_films(xray_inputs)
    if xray_inputs and not films:
        raise CT2XInputError(f"no X-ray films (PNG, JPEG, DICOM .dcm) found in {', '.join(map(str, xray_inputs))}")
    manifest = open_folder(out, f"ct2x {__version__} prepare synth", asdict(settings), SECTIONS,
                           (CASES_FOLDER, FILMS_FOLDER))

    def film_details(result: Dict[str, np.ndarray]) -> dict:
        return {"choices": [str(choice) for choice in result.pop("choices")]}

    def splits(manifest: dict) -> None:
        _assign_splits(manifest, settings)

    prepare_items("ct2x prepare synth", cases, prepare_case, lambda path: {"source": str(path)}, case_details, out,
                  CASES_FOLDER, ("cases", "failed"), manifest, settings, splits, workers, progress)
    prepare_items("ct2x prepare synth", films, prepare_film_file, FilmSource.describe, film_details, out,
                  FILMS_FOLDER, ("films", "failed_films"), manifest, settings, splits, workers, progress, unit="film")
    return manifest


def _assign_splits(manifest: dict, settings: SynthPreparation) -> None:
    """Split the CTs' patients and the films' patients, each seeded, into test, val and train."""
    for case, record in manifest["cases"].items():
        record["patient"] = patient_of(case, settings.patient_pattern)
    held_out = (("test", settings.test_fraction), ("val", settings.val_fraction))
    for section in ("cases", "films"):
        assign_splits(manifest[section], held_out, settings.seed)


def load_case(path: PathLike) -> Dict[str, np.ndarray]:
    """A case file's arrays (`CASE_KEYS`); no pickled objects are loaded."""
    return read_npz(path, CASE_KEYS)


def load_film(path: PathLike) -> np.ndarray:
    """A film file's image, (F, F) float32 in [0, 1]."""
    return read_npz(path, ("image",))["image"]


def case_paths(root: PathLike, split: Optional[str] = None) -> List[Path]:
    """The case files of a prepared folder, of one split ("train", "val", "test") or all, in case order."""
    return prepared_paths(root, "cases", CASES_FOLDER, "ct2x prepare synth", split)


def film_paths(root: PathLike, split: Optional[str] = None) -> List[Path]:
    """The film files of a prepared folder, of one split ("train", "val", "test") or all, in film order."""
    return prepared_paths(root, "films", FILMS_FOLDER, "ct2x prepare synth", split)
