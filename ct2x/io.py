"""Read CT volumes (NIfTI, NRRD, MHA/MHD, DICOM series) into ``CTVolume`` and write images atomically."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

from ct2x.errors import CT2XInputError
from ct2x.volume import CTVolume

PathLike = Union[str, os.PathLike]

READ_FORMATS = {  # file suffix -> format name
    ".nii": "NIfTI",
    ".nii.gz": "NIfTI",
    ".nrrd": "NRRD",
    ".nhdr": "NRRD",
    ".mha": "MetaImage",
    ".mhd": "MetaImage",
}
SUPPORTED = "NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) or a folder holding a DICOM series"
SLICE_SPACING_RTOL = 0.01  # DICOM slice positions may deviate this much (relative) from even spacing


def load_ct(path: PathLike, series_uid: Optional[str] = None) -> CTVolume:
    """Load a CT in Hounsfield units from an image file or a DICOM series folder.

    Any integer or float storage becomes float32 HU (SimpleITK applies DICOM rescale slope/intercept).

    Args:
        path: .nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd file, or a folder with DICOM files (not searched recursively).
        series_uid: SeriesInstanceUID to load when the folder holds several series (see ``list_dicom_series``).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CT2XInputError(f"{path}: does not exist; check the path (supported: {SUPPORTED}).")
    if path.is_dir():
        return _load_dicom_series(path, series_uid)
    if series_uid is not None:
        raise CT2XInputError(f"{path}: series_uid is only for DICOM folders; pass the folder or leave it out.")
    suffix = _format_suffix(path)
    if suffix not in READ_FORMATS:
        raise CT2XInputError(
            f"{path}: unknown format {suffix or '(no extension)'!r}; supported: {SUPPORTED}. "
            "For DICOM, pass the folder that holds the series, not one file."
        )
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise CT2XInputError(
            f"{path}: could not be read as {READ_FORMATS[suffix]} ({_sitk_reason(error)}); is the file complete and "
            f"really {READ_FORMATS[suffix]}? Supported: {SUPPORTED}."
        ) from None
    return CTVolume.from_sitk(image, source=str(path))


def list_dicom_series(folder: PathLike) -> List[Tuple[str, int, str]]:
    """(SeriesInstanceUID, number of files, SeriesDescription or "") of each DICOM series directly in ``folder``."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise CT2XInputError(f"{folder}: is not a folder; pass the folder that holds the DICOM files.")
    series = []
    for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)):
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
        series.append((uid, len(files), _series_description(files[0])))
    return series


def _load_dicom_series(folder: Path, series_uid: Optional[str]) -> CTVolume:
    series = list_dicom_series(folder)
    if not series:
        n_files = sum(1 for p in folder.iterdir() if p.is_file())
        subfolders = [p.name for p in folder.iterdir() if p.is_dir()]
        hint = f" Subfolders are not searched: {', '.join(subfolders[:5])}." if subfolders else ""
        raise CT2XInputError(
            f"{folder}: folder holds no DICOM series ({n_files} files).{hint} Pass a folder with DICOM files or an "
            f"image file ({SUPPORTED})."
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
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))
    reader.MetaDataDictionaryArrayUpdateOn()  # per-slice tags, to check the slice positions below
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise CT2XInputError(f"{source}: the DICOM series could not be read ({_sitk_reason(error)}).") from None
    _check_even_slice_spacing(reader, image, source)
    return CTVolume.from_sitk(image, source=source)


def _check_even_slice_spacing(reader: sitk.ImageSeriesReader, image: sitk.Image, source: str) -> None:
    """ITK takes the slice spacing from the first two slices; missing slices would silently distort the volume."""
    n_slices = image.GetSize()[2]
    if n_slices < 3 or not all(reader.HasMetaDataKey(s, "0020|0032") for s in range(n_slices)):
        return
    positions = np.array(
        [[float(v) for v in reader.GetMetaData(s, "0020|0032").split("\\")] for s in range(n_slices)]
    )  # (n_slices, 3) ImagePositionPatient, LPS mm
    normal = np.array(image.GetDirection()).reshape(3, 3)[:, 2]  # (3,) LPS unit vector along k
    gaps = np.diff(positions @ normal)  # (n_slices - 1,) mm between neighbouring slices
    if not np.allclose(gaps, image.GetSpacing()[2], rtol=SLICE_SPACING_RTOL, atol=1e-3):
        raise CT2XInputError(
            f"{source}: DICOM slices are not evenly spaced (gaps {gaps.min():.3g} to {gaps.max():.3g} mm): slices are "
            "missing or several acquisitions are mixed. Load the series in Slicer's DICOM module (it regularises "
            "such series), save it as NRRD and load that."
        )


def _describe_series(series: Sequence[Tuple[str, int, str]]) -> str:
    return "\n".join(
        f"  series_uid={uid!r}: {n_files} files" + (f", {description!r}" if description else "")
        for uid, n_files, description in series
    )


def _series_description(dicom_file: str) -> str:
    reader = sitk.ImageFileReader()
    reader.SetFileName(dicom_file)
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return ""
    return reader.GetMetaData("0008|103e").strip() if reader.HasMetaDataKey("0008|103e") else ""


def _format_suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _sitk_reason(error: RuntimeError) -> str:
    """The last line of a SimpleITK exception, without the C++ source location."""
    return str(error).strip().splitlines()[-1].replace("sitk::ERROR: ", "")


def save_image(
    image: np.ndarray,
    path: PathLike,
    spacing_mm: Union[float, Sequence[float]],
    origin_mm: Optional[Sequence[float]] = None,
) -> Path:
    """Write a 2-D (rows, columns) or 3-D (K, J, I) array as float32 NRRD or MHA (chosen by extension).

    Args:
        image: array in KJI order: a 2-D image is (J, I) = (rows, columns).
        path: destination ending in .nrrd or .mha; written atomically.
        spacing_mm: pixel spacing in mm, one number or one per axis in (i, j[, k]) order (columns first).
        origin_mm: position of pixel 0 written as-is into the header (no RAS/LPS conversion; for CTs use
            ``save_ct``); default zeros.
    """
    array = np.asarray(image, dtype=np.float32)
    if array.ndim not in (2, 3):
        raise CT2XInputError(f"save_image: image must be 2-D or 3-D, got shape {array.shape}.")
    spacing = np.broadcast_to(np.asarray(spacing_mm, dtype=np.float64), (array.ndim,))  # (ndim,) mm, i first
    if not np.all(spacing > 0):
        raise CT2XInputError(f"save_image: spacing_mm must be positive, got {spacing_mm}.")
    sitk_image = sitk.GetImageFromArray(array)
    sitk_image.SetSpacing(spacing.tolist())
    if origin_mm is not None:
        sitk_image.SetOrigin([float(v) for v in origin_mm])
    return _write_atomic(sitk_image, path, allowed=(".nrrd", ".mha"))


def save_ct(volume: CTVolume, path: PathLike) -> Path:
    """Write a CTVolume as float32 HU with its geometry (.nrrd, .mha, .nii or .nii.gz; written atomically).

    The round trip through ``load_ct`` is exact for NRRD and MHA; NIfTI stores geometry in float32 (~1e-6 mm).
    """
    return _write_atomic(volume.to_sitk(), path, allowed=(".nrrd", ".mha", ".nii", ".nii.gz"))


def _write_atomic(image: sitk.Image, path: PathLike, allowed: Sequence[str]) -> Path:
    """Write to a temporary file next to ``path``, then rename it, so a failure leaves nothing half-written."""
    path = Path(path).expanduser()
    suffix = _format_suffix(path)
    if suffix not in allowed:
        raise CT2XInputError(f"{path}: cannot write {suffix or '(no extension)'!r}; use one of {', '.join(allowed)}.")
    if not path.parent.is_dir():
        raise CT2XInputError(f"{path}: folder {path.parent} does not exist; create it first.")
    fd, tmp_name = tempfile.mkstemp(suffix=suffix, prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        sitk.WriteImage(image, tmp_name, useCompression=True)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path
