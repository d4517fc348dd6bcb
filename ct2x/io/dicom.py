"""DICOM series folders: list the series, read one, and name the files that are damaged or missing."""

from __future__ import annotations

import os
import warnings
from functools import partial
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

from ct2x.errors import CT2XInputError, CT2XWarning
from ct2x.io.formats import SUPPORTED
from ct2x.io.native_output import quietly, sitk_reason, warn_native_output
from ct2x.text import size_text
from ct2x.volume import CTVolume

SLICE_SPACING_RTOL = 0.01  # DICOM slice positions may deviate this much (relative) from even spacing
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
MAX_NAMED_FILES = 5


# DICOM series


def list_dicom_series(folder: Union[str, os.PathLike]) -> List[Tuple[str, int, str]]:
    """(SeriesInstanceUID, number of files, SeriesDescription or "") of each DICOM series directly in ``folder``."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise CT2XInputError(f"{folder}: is not a folder; pass the folder that holds the DICOM files.")
    return [(uid, len(files), series_description(files[0])) for uid, files in dicom_series_files(folder).items()]


def dicom_series_files(folder: Path) -> Dict[str, List[str]]:
    """SeriesInstanceUID -> its files (sorted by GDCM along the slice axis), for the series directly in ``folder``."""
    def scan() -> Dict[str, List[str]]:
        return {uid: list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))
                for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))}

    series, failure, _ = quietly(scan)
    if failure is not None:
        raise CT2XInputError(f"{folder}: the folder could not be scanned for DICOM files ({sitk_reason(failure)}).")
    return series


def load_dicom_series(folder: Path, series_uid: Optional[str], stored_values: str) -> CTVolume:
    series_files = dicom_series_files(folder)
    series = [(uid, len(files), series_description(files[0])) for uid, files in series_files.items()]
    if not series:
        n_files = sum(1 for p in folder.iterdir() if p.is_file())
        subfolders = [p.name for p in folder.iterdir() if p.is_dir()]
        hint = f" Subfolders are not searched: {', '.join(subfolders[:5])}." if subfolders else ""
        damaged = _unreadable_dicom_files(folder, series_files)
        damaged_text = f" Files that look like DICOM but could not be read: {damaged}." if damaged else ""
        raise CT2XInputError(
            f"{folder}: folder holds no DICOM series ({n_files} files).{hint}{damaged_text} Pass a folder with DICOM "
            f"files or an image file ({SUPPORTED})."
        )
    uids = [uid for uid, _, _ in series]
    if series_uid is None and len(series) > 1:
        raise CT2XInputError(
            f"{folder}: folder holds {len(series)} DICOM series; pass series_uid=... to choose one of:\n"
            + _describe_series(series)
        )
    if series_uid is not None and series_uid not in uids:
        raise CT2XInputError(
            f"{folder}: no DICOM series with series_uid={series_uid!r}; the folder holds:\n" + _describe_series(series)
        )
    uid = uids[0] if series_uid is None else series_uid
    source = f"{folder} (DICOM series {uid})" if len(series) > 1 else str(folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(series_files[uid])
    reader.MetaDataDictionaryArrayUpdateOn()  # per-slice tags, to check the slice positions below
    image, failure, native = quietly(reader.Execute)
    if failure is not None:
        damaged = _unreadable_dicom_files(folder, series_files)
        raise CT2XInputError(
            f"{source}: the DICOM series could not be read ({sitk_reason(failure)})."
            + (f" Files that look like DICOM but could not be read: {damaged}." if damaged else "")
        )
    _check_even_slice_spacing(reader, image, source, partial(_unreadable_dicom_files, folder, series_files))
    warn_native_output(native, source)
    left_out = _unreadable_dicom_files(folder, series_files)
    if left_out:  # e.g. a damaged first or last slice: the volume is shorter but evenly spaced
        warnings.warn(
            f"{source}: these files in the folder look like DICOM but are in no series (damaged, truncated or not "
            f"images), so the volume was built without them: {left_out}.",
            CT2XWarning,
            stacklevel=3,
        )
    return CTVolume.from_sitk(image, source=source, stored_values=stored_values)


def _check_even_slice_spacing(
    reader: sitk.ImageSeriesReader, image: sitk.Image, source: str, unreadable_files: Callable[[], str]
) -> None:
    """ITK takes the slice spacing from the first two slices; missing slices would silently distort the volume.

    ``unreadable_files`` names the folder's damaged DICOM files (GDCM leaves them out of the series), if any.
    """
    n_slices = image.GetSize()[2]
    if n_slices < 3 or not all(reader.HasMetaDataKey(s, "0020|0032") for s in range(n_slices)):
        return
    positions = np.array(
        [[float(v) for v in reader.GetMetaData(s, "0020|0032").split("\\")] for s in range(n_slices)]
    )  # (n_slices, 3) ImagePositionPatient, LPS mm
    normal = np.array(image.GetDirection()).reshape(3, 3)[:, 2]  # (3,) LPS unit vector along k
    gaps = np.diff(positions @ normal)  # (n_slices - 1,) mm between neighbouring slices
    if np.allclose(gaps, image.GetSpacing()[2], rtol=SLICE_SPACING_RTOL, atol=1e-3):
        return
    problem = f"{source}: DICOM slices are not evenly spaced (gaps {gaps.min():.3g} to {gaps.max():.3g} mm)"
    damaged = unreadable_files()
    if damaged:
        raise CT2XInputError(
            f"{problem}: slices are missing. These files in the folder look like DICOM but could not be read, "
            f"probably the missing slices: {damaged}. Replace them with intact copies (copy or export the series "
            "again)."
        )
    raise CT2XInputError(
        f"{problem}: slices are missing or several acquisitions are mixed. Load the series in Slicer's DICOM module "
        "(it regularises such series), save it as NRRD and load that."
    )


def _unreadable_dicom_files(folder: Path, series_files: Dict[str, List[str]]) -> str:
    """The files directly in ``folder`` that look like DICOM but are in no series (GDCM could not read them), described.

    A file looks like DICOM by its DICOM preamble or its name (.dcm, .dicom, .ima or no suffix; DICOMDIR aside).
    """
    in_series = {Path(name).name for files in series_files.values() for name in files}
    found: List[Tuple[Path, str]] = []  # (file, problem; "" for damaged or truncated)
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.name not in in_series):
        dicom_name = path.suffix.lower() in DICOM_SUFFIXES or (not path.suffix and path.name.upper() != "DICOMDIR")
        if not os.access(path, os.R_OK):
            if dicom_name:
                found.append((path, "permission denied"))
        elif path.stat().st_size == 0:
            if dicom_name:
                found.append((path, "empty"))
        elif (dicom_name and path.suffix) or (has_dicom_preamble(path) and path.name.upper() != "DICOMDIR"):
            found.append((path, ""))
    if not found:
        return ""
    sizes = [os.path.getsize(name) for files in series_files.values() for name in files]
    typical = f", the series' files {size_text(int(np.median(sizes)))}" if sizes else ""
    described = [f"{path.name} ({problem or f'{size_text(path.stat().st_size)}{typical}: damaged or truncated'})"
                 for path, problem in found]
    if len(described) > MAX_NAMED_FILES:
        described[MAX_NAMED_FILES:] = [f"and {len(described) - MAX_NAMED_FILES} more"]
    return ", ".join(described)


def has_dicom_preamble(path: Path) -> bool:
    """Whether the file starts like a DICOM file (128 bytes, then "DICM")."""
    with open(path, "rb") as file:
        return file.read(132)[128:] == b"DICM"


def _describe_series(series: Sequence[Tuple[str, int, str]]) -> str:
    return "\n".join(
        f"  series_uid={uid!r}: {n_files} files" + (f", {description!r}" if description else "")
        for uid, n_files, description in series
    )


def series_description(dicom_file: str) -> str:
    reader = sitk.ImageFileReader()
    reader.SetFileName(dicom_file)
    _, failure, _ = quietly(reader.ReadImageInformation)
    if failure is not None:
        return ""
    return reader.GetMetaData("0008|103e").strip() if reader.HasMetaDataKey("0008|103e") else ""
