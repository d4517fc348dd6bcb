"""Read CT volumes (NIfTI, NRRD, MHA/MHD, DICOM series) into ``CTVolume``, refusing damaged files."""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Optional, Union

import SimpleITK as sitk

from ct2x.errors import CT2XInputError
from ct2x.io.dicom import load_dicom_series
from ct2x.io.file_checks import check_nifti, explain_read_failure
from ct2x.io.formats import READ_FORMATS, SUPPORTED, format_suffix
from ct2x.io.native_output import quietly, sitk_reason, warn_native_output
from ct2x.volume import CTVolume, check_stored_values

PathLike = Union[str, os.PathLike]


def load_ct(path: PathLike, series_uid: Optional[str] = None, stored_values: str = "auto") -> CTVolume:
    """Load a CT in Hounsfield units from an image file or a DICOM series folder.

    Any integer or float storage becomes float32 HU (SimpleITK applies DICOM rescale slope/intercept).

    Args:
        path: .nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd file, or a folder with DICOM files (not searched recursively).
        series_uid: SeriesInstanceUID to load when the folder holds several series (see ``list_dicom_series``).
        stored_values: "auto" (HU, or HU + 1024 recognised and converted with a CT2XWarning), "hu" (use the values
            as they are) or "hu+1024" (subtract 1024); see ``ct2x.volume.interpret_stored_values``. The volume's
            ``stored_offset_hu`` records the conversion.
    """
    path = Path(path).expanduser()
    check_stored_values(stored_values)  # before a long read
    check_readable(path)
    if path.is_dir():
        return load_dicom_series(path, series_uid, stored_values)
    if series_uid is not None:
        raise CT2XInputError(f"{path}: series_uid is only for DICOM folders; pass the folder or leave it out.")
    suffix = format_suffix(path)
    if suffix not in READ_FORMATS:
        raise CT2XInputError(
            f"{path}: unknown format {suffix or '(no extension)'!r}; supported: {SUPPORTED}. "
            "For DICOM, pass the folder that holds the series, not one file."
        )
    if READ_FORMATS[suffix] == "NIfTI":
        check_nifti(path)
    image, failure, native = quietly(partial(sitk.ReadImage, str(path)))
    if failure is not None:
        explain_read_failure(path, suffix, native)
        raise CT2XInputError(
            f"{path}: could not be read as {READ_FORMATS[suffix]} ({sitk_reason(failure)}); is the file complete and "
            f"really {READ_FORMATS[suffix]}? Supported: {SUPPORTED}."
        )
    warn_native_output(native, str(path))
    return CTVolume.from_sitk(image, source=str(path), stored_values=stored_values)


def check_readable(path: Path) -> None:
    """Refuse a path that does not exist or that this user may not read, saying which."""
    try:
        path.stat()
    except PermissionError:
        raise CT2XInputError(
            f"{path}: permission denied: a folder on its path may not be searched by this user; check the folders' "
            "permissions."
        ) from None
    except OSError:
        raise CT2XInputError(f"{path}: does not exist; check the path (supported: {SUPPORTED}).") from None
    needed = os.R_OK | os.X_OK if path.is_dir() else os.R_OK
    if not os.access(path, needed):
        kind = "folder" if path.is_dir() else "file"
        raise CT2XInputError(
            f"{path}: permission denied: this user may not read the {kind}; change its permissions or ask its owner."
        )


