"""The image file formats CT2X reads, named once."""

from __future__ import annotations

from pathlib import Path

READ_FORMATS = {  # file suffix -> format name
    ".nii": "NIfTI",
    ".nii.gz": "NIfTI",
    ".nrrd": "NRRD",
    ".nhdr": "NRRD",
    ".mha": "MetaImage",
    ".mhd": "MetaImage",
}
SUPPORTED = "NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) or a folder holding a DICOM series"


def format_suffix(path: Path) -> str:
    """The lower-case suffix that names a file's format (".nii.gz" counts as one)."""
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()
