"""CT and image files: read CT volumes into ``CTVolume`` (refusing damaged or implausible files) and write images.

- ``reading``: ``load_ct`` for NIfTI, NRRD, MetaImage files and DICOM folders (``dicom``), with the checks ITK leaves
  out (``file_checks``) and ITK's own console output turned into CT2X messages (``native_output``).
- ``writing``: ``save_image``, ``save_png``, ``save_ct``, atomic, ordinary file modes, clear errors when the disk is
  full.
"""

from ct2x.io.dicom import list_dicom_series
from ct2x.io.reading import SUPPORTED, load_ct
from ct2x.io.writing import save_ct, save_image, save_png

__all__ = ["SUPPORTED", "list_dicom_series", "load_ct", "save_ct", "save_image", "save_png"]
