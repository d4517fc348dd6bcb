"""VTK <-> ct2x: vtkImageData + IJK-to-RAS matrix <-> CTVolume, and a radiograph as a film placed in 3-D.

The only ct2x module that imports VTK (3D Slicer's volume nodes hold a vtkImageData plus an IJK-to-RAS matrix).

- Arrays: VTK stores point scalars with i fastest, so the flat scalars reshape to KJI (``array[k, j, i]``), the
  order of ``slicer.util.arrayFromVolume`` and of ``ct2x.volume.CTVolume.hu``.
- Geometry: Slicer keeps its vtkImageData at origin 0, spacing 1 and puts the whole placement in the node's IJK-to-RAS
  matrix. Image data that carries its own origin, spacing, direction or a non-zero extent start is accepted too: that
  index-to-physical part is folded into the affine, so the result is always "voxel index (i, j, k) -> RAS mm".
- Films: a radiograph (H, W) becomes a single-slice image of dimensions (W, H, 1) (IJK = column, row, 0) whose
  IJK-to-RAS puts every pixel at its centre on the detector plane of its view, so the film sits where the detector
  was, next to the CT in a 3-D view.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Tuple, Union

import numpy as np
from vtkmodules.util.numpy_support import numpy_to_vtk, vtk_to_numpy
from vtkmodules.vtkCommonDataModel import vtkImageData
from vtkmodules.vtkCommonMath import vtkMatrix4x4

from ct2x.errors import CT2XInputError
from ct2x.geometry import View
from ct2x.volume import CTVolume, interpret_stored_values

if TYPE_CHECKING:  # ct2x.drr imports torch; the bridge itself needs only numpy and VTK
    from ct2x.drr import Radiograph

FILM_VALUES = ("attenuation", "display")
FILM_THICKNESS_MM = 1.0  # slice spacing given to the single-slice film (its third IJK axis), mm

MatrixLike = Union[vtkMatrix4x4, np.ndarray]


def array_from_vtk_matrix(matrix: MatrixLike) -> np.ndarray:
    """(4, 4) float64 copy of a vtkMatrix4x4 or of a 4x4 array-like."""
    if isinstance(matrix, vtkMatrix4x4):
        return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)
    array = np.array(matrix, dtype=np.float64)
    if array.shape != (4, 4):
        raise CT2XInputError(f"ijk_to_ras: expected a vtkMatrix4x4 or a 4x4 array, got shape {array.shape}.")
    return array


def vtk_matrix_from_array(array: np.ndarray) -> vtkMatrix4x4:
    """A new vtkMatrix4x4 holding a (4, 4) array."""
    array = array_from_vtk_matrix(array)
    matrix = vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def array_from_vtk(image_data: vtkImageData, name: str = "image data") -> np.ndarray:
    """(K, J, I) copy of the single-component point scalars of a vtkImageData (dtype kept)."""
    scalars = image_data.GetPointData().GetScalars() if image_data is not None else None
    if scalars is None:
        raise CT2XInputError(f"{name}: has no voxel values (empty vtkImageData); load or create the volume first.")
    if scalars.GetNumberOfComponents() != 1:
        raise CT2XInputError(
            f"{name}: has {scalars.GetNumberOfComponents()} components per voxel (colour or vector volume); "
            "CT2X needs a scalar volume with one Hounsfield value per voxel.")
    i, j, k = image_data.GetDimensions()
    return np.array(vtk_to_numpy(scalars).reshape(k, j, i))  # (K, J, I); copy: VTK may reuse its buffer


def vtk_from_array(array_kji: np.ndarray) -> vtkImageData:
    """A vtkImageData (origin 0, spacing 1, as Slicer keeps it) holding a copy of a (K, J, I) or (J, I) array."""
    array = np.asarray(array_kji)
    if array.ndim == 2:
        array = array[None]  # (1, J, I): a single slice
    if array.ndim != 3:
        raise CT2XInputError(f"array_kji: expected a 2-D or 3-D array, got shape {array.shape}.")
    image_data = vtkImageData()
    image_data.SetDimensions(array.shape[2], array.shape[1], array.shape[0])  # (I, J, K)
    scalars = numpy_to_vtk(np.ascontiguousarray(array).ravel(), deep=True)  # i fastest, then j, then k
    scalars.SetName("ImageScalars")
    image_data.GetPointData().SetScalars(scalars)
    return image_data


def volume_from_vtk(
    image_data: vtkImageData, ijk_to_ras: MatrixLike, source: str = "", stored_values: str = "auto"
) -> CTVolume:
    """A CTVolume (HU copied to float32, KJI) from a vtkImageData and its IJK-to-RAS matrix (mm).

    The image data's own index-to-physical placement (extent start, spacing, origin, direction) is applied before
    `ijk_to_ras`, so data with origin 0 and spacing 1 (Slicer's) and data that carries its geometry both work.
    `stored_values`: "auto" (HU, or HU + 1024 recognised and converted with a CT2XWarning), "hu" or "hu+1024"; see
    `ct2x.volume.interpret_stored_values`.
    """
    name = source or "volume"
    values = array_from_vtk(image_data, name)  # (K, J, I) stored values
    hu, offset = interpret_stored_values(values, stored_values, name)  # (K, J, I) float32 HU
    index_to_physical = array_from_vtk_matrix(image_data.GetIndexToPhysicalMatrix())  # structured index -> image mm
    extent_start = np.eye(4)
    extent_start[:3, 3] = image_data.GetExtent()[0::2]  # array index 0 is structured index (x0, y0, z0)
    affine = array_from_vtk_matrix(ijk_to_ras) @ index_to_physical @ extent_start  # (4, 4) ijk -> RAS mm
    return CTVolume(hu=hu, affine=affine, source=source, stored_offset_hu=offset)


def film_ijk_to_ras(view: View) -> np.ndarray:
    """(4, 4) float64 mapping film voxel (column, row, 0, 1) to the RAS mm centre of detector pixel (row, column).

    Columns are scaled by the detector pixel spacing along the image column and row directions; the third axis is
    their cross product times FILM_THICKNESS_MM, so the matrix is right-handed (positive determinant).
    """
    column_spacing, row_spacing = view.detector.pixel_spacing_mm
    column_direction, row_direction = view.column_direction, view.row_direction  # (3,) unit RAS
    normal = np.cross(column_direction, row_direction)  # (3,) unit RAS, along or against the beam
    first_pixel = (view.detector_center_ras
                   - (view.detector.width_px / 2 - 0.5) * column_spacing * column_direction
                   - (view.detector.height_px / 2 - 0.5) * row_spacing * row_direction)  # (3,) RAS mm of (0, 0)
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, 0] = column_spacing * column_direction
    ijk_to_ras[:3, 1] = row_spacing * row_direction
    ijk_to_ras[:3, 2] = FILM_THICKNESS_MM * normal
    ijk_to_ras[:3, 3] = first_pixel
    return ijk_to_ras


def radiograph_to_vtk(radiograph: Radiograph, values: str = "attenuation") -> Tuple[vtkImageData, np.ndarray]:
    """The film as float32 vtkImageData of dimensions (W, H, 1) and its (4, 4) IJK-to-RAS on the detector plane.

    `values`: "attenuation" (-ln(I / I_open), quantitative; window it with `radiograph.window`) or "display"
    (the 8-bit windowed image as 0..255 floats).
    """
    if values not in FILM_VALUES:
        raise CT2XInputError(f"values={values!r}: choose one of {FILM_VALUES}.")
    film = radiograph.attenuation if values == "attenuation" else radiograph.display  # (H, W)
    image_data = vtk_from_array(film.astype(np.float32)[None])  # (1, H, W) KJI -> dimensions (W, H, 1)
    return image_data, film_ijk_to_ras(radiograph.view)
