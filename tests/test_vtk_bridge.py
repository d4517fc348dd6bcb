"""ct2x.vtk_bridge on real vtkImageData: CT round trip, image-data geometry folded in, films placed on the detector."""

from __future__ import annotations

import numpy as np
import pytest

vtk = pytest.importorskip("vtk")

from ct2x.drr import DRRRenderer, Radiograph  # noqa: E402
from ct2x.errors import CT2XInputError  # noqa: E402
from ct2x.geometry import CArm, Detector  # noqa: E402
from ct2x.phantoms import chest  # noqa: E402
from ct2x.vtk_bridge import (  # noqa: E402
    array_from_vtk,
    array_from_vtk_matrix,
    film_ijk_to_ras,
    radiograph_to_vtk,
    volume_from_vtk,
    vtk_from_array,
    vtk_matrix_from_array,
)


def _vtk_point_ras(image_data, ijk_to_ras: np.ndarray, index) -> np.ndarray:
    """Independent reference: VTK's own position of the point at array index (i, j, k), then IJK-to-RAS."""
    i, j, k = index
    n_i, n_j, _ = image_data.GetDimensions()
    physical = image_data.GetPoint(i + n_i * (j + n_j * k))  # point id of array element [k, j, i]
    return (ijk_to_ras @ np.append(physical, 1.0))[:3]


def test_ct_round_trip_keeps_values_order_and_affine(ct_phantom):
    image_data = vtk_from_array(ct_phantom.hu)

    assert image_data.GetDimensions() == ct_phantom.shape_ijk  # (I, J, K)
    k, j, i = 10, 8, 22  # inside the bone block
    assert image_data.GetScalarComponentAsDouble(i, j, k, 0) == ct_phantom.hu[k, j, i] == 700.0

    volume = volume_from_vtk(image_data, vtk_matrix_from_array(ct_phantom.affine), source="round trip")

    assert volume.hu.dtype == np.float32
    np.testing.assert_array_equal(volume.hu, ct_phantom.hu)
    np.testing.assert_allclose(volume.affine, ct_phantom.affine, atol=1e-12)
    assert volume.source == "round trip"


def test_volume_owns_a_float32_copy_of_integer_scalars(ct_phantom):
    image_data = vtk_from_array(ct_phantom.hu.astype(np.int16))
    assert image_data.GetScalarType() == vtk.VTK_SHORT

    volume = volume_from_vtk(image_data, ct_phantom.affine)  # a plain 4x4 array is accepted too
    image_data.GetPointData().GetScalars().SetValue(0, 3000)  # later edits of the node must not leak in

    assert volume.hu.dtype == np.float32
    np.testing.assert_array_equal(volume.hu, ct_phantom.hu)


def test_image_data_origin_spacing_direction_and_extent_are_folded_into_the_affine(ct_phantom):
    image_data = vtk_from_array(ct_phantom.hu)
    image_data.SetSpacing(0.5, 2.0, 3.0)
    image_data.SetOrigin(-7.0, 11.0, 5.0)
    direction = vtk.vtkMatrix3x3()
    for r, c, value in [(0, 0, 0.0), (0, 1, -1.0), (1, 0, 1.0), (1, 1, 0.0)]:  # 90 deg about z
        direction.SetElement(r, c, value)
    image_data.SetDirectionMatrix(direction)
    i, j, k = ct_phantom.shape_ijk
    image_data.SetExtent(3, 3 + i - 1, -2, -2 + j - 1, 1, k)  # array index 0 is structured index (3, -2, 1)
    ijk_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
    ijk_to_ras[:3, 3] = (100.0, -50.0, 25.0)

    volume = volume_from_vtk(image_data, ijk_to_ras)

    for index in [(0, 0, 0), (i - 1, 0, 0), (0, j - 1, k - 1), (5, 7, 9)]:
        expected = _vtk_point_ras(image_data, ijk_to_ras, index)
        np.testing.assert_allclose(volume.affine @ np.append(index, 1.0), np.append(expected, 1.0), atol=1e-9)
    np.testing.assert_allclose(volume.spacing_mm, (0.5, 2.0, 3.0))
    np.testing.assert_array_equal(volume.hu, ct_phantom.hu)


def test_bad_inputs_are_named():
    with pytest.raises(CT2XInputError, match="4x4"):
        array_from_vtk_matrix(np.eye(3))
    with pytest.raises(CT2XInputError, match="empty vtkImageData"):
        volume_from_vtk(vtk.vtkImageData(), np.eye(4), source="CT node")
    rgb = vtk.vtkImageData()
    rgb.SetDimensions(8, 8, 8)
    rgb.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 3)
    with pytest.raises(CT2XInputError, match="3 components"):
        array_from_vtk(rgb, "colour volume")
    with pytest.raises(CT2XInputError, match="2-D or 3-D"):
        vtk_from_array(np.zeros(5))


def _synthetic_radiograph(primary_deg: float, secondary_deg: float) -> Radiograph:
    """A 6 x 4 film (anisotropic spacing) whose pixel (r, c) holds 10 r + c, at a C-arm pose about (10, -20, 30)."""
    carm = CArm(1020.0, 530.0, Detector(width_px=6, height_px=4, pixel_spacing_mm=(1.5, 2.5)))
    view = carm.view(primary_deg, secondary_deg, isocenter_ras=(10.0, -20.0, 30.0))
    rows, cols = np.mgrid[0:4, 0:6]
    attenuation = (10 * rows + cols).astype(np.float32)  # (H, W)
    return Radiograph(view, attenuation, attenuation.astype(np.uint8), (0.0, 55.0))


@pytest.mark.parametrize("primary_deg, secondary_deg", [(0.0, 0.0), (90.0, 0.0), (180.0, 0.0), (-30.0, 20.0)])
def test_film_pixels_sit_on_their_detector_pixel_centres(primary_deg, secondary_deg):
    radiograph = _synthetic_radiograph(primary_deg, secondary_deg)
    view = radiograph.view

    image_data, ijk_to_ras = radiograph_to_vtk(radiograph)

    assert image_data.GetDimensions() == (6, 4, 1)  # (W, H, 1)
    assert image_data.GetScalarType() == vtk.VTK_FLOAT
    centres = view.pixel_centers_ras()  # (H, W, 3) RAS mm
    for row, col in [(0, 0), (0, 5), (3, 0), (3, 5), (2, 1)]:
        assert image_data.GetScalarComponentAsDouble(col, row, 0, 0) == 10 * row + col
        np.testing.assert_allclose((ijk_to_ras @ [col, row, 0, 1])[:3], centres[row, col], atol=1e-9)
    np.testing.assert_allclose(np.linalg.norm(ijk_to_ras[:3, :3], axis=0), (1.5, 2.5, 1.0))  # Slicer's spacing
    assert np.linalg.det(ijk_to_ras[:3, :3]) > 0  # right-handed, non-singular
    assert abs(np.dot(ijk_to_ras[:3, 2], view.principal_direction)) == pytest.approx(1.0)  # normal along the beam


def test_ap_and_lateral_films_face_the_expected_directions():
    ap = film_ijk_to_ras(_synthetic_radiograph(0.0, 0.0).view)
    lateral = film_ijk_to_ras(_synthetic_radiograph(90.0, 0.0).view)
    # AP (radiological display): image right = patient's left (-x), image down = inferior (-z), detector posterior.
    np.testing.assert_allclose(ap[:3, 0] / 1.5, (-1.0, 0.0, 0.0), atol=1e-12)
    np.testing.assert_allclose(ap[:3, 1] / 2.5, (0.0, 0.0, -1.0), atol=1e-12)
    assert ap[1, 3] == pytest.approx(-20.0 - 490.0)  # detector plane 490 mm behind the isocentre (posterior, -y)
    # Left lateral: detector at the patient's left (-x), image down still inferior.
    np.testing.assert_allclose(lateral[:3, 1] / 2.5, (0.0, 0.0, -1.0), atol=1e-12)
    assert lateral[0, 3] == pytest.approx(10.0 - 490.0)  # detector plane 490 mm to the patient's left (-x)


def test_display_values_and_bad_value_name():
    radiograph = _synthetic_radiograph(0.0, 0.0)
    image_data, _ = radiograph_to_vtk(radiograph, values="display")
    assert image_data.GetScalarType() == vtk.VTK_FLOAT
    np.testing.assert_array_equal(array_from_vtk(image_data)[0], radiograph.display.astype(np.float32))
    with pytest.raises(CT2XInputError, match="values="):
        radiograph_to_vtk(radiograph, values="intensity")


def test_rendered_chest_film_round_trips_through_vtk():
    volume = chest(size=48)
    image_data = vtk_from_array(volume.hu)
    volume_back = volume_from_vtk(image_data, vtk_matrix_from_array(volume.affine))
    renderer = DRRRenderer(volume_back, CArm().with_detector(40))

    for primary_deg in (0.0, 90.0):
        radiograph = renderer.render(primary_deg)
        film, ijk_to_ras = radiograph_to_vtk(radiograph)
        assert film.GetDimensions() == (40, 40, 1)
        values = array_from_vtk(film)  # (1, H, W)
        np.testing.assert_array_equal(values[0], radiograph.attenuation)
        assert values.max() > 1.0 and values.min() < 0.1  # a body in air, not a blank film
        np.testing.assert_allclose((ijk_to_ras @ [39, 39, 0, 1])[:3], radiograph.view.pixel_centers_ras()[39, 39])
