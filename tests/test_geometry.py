import numpy as np
import pytest

from ct2x.errors import CT2XInputError
from ct2x.geometry import BIPLANAR_VIEWS_DEG, SEVEN_VIEWS_DEG, CArm, Detector, View, parse_angles

ISO = np.array([10.0, -20.0, 30.0])  # RAS mm


def test_defaults_are_the_mobile_carm():
    carm = CArm()
    assert carm.source_to_detector_mm == 1020 and carm.source_to_isocenter_mm == 530
    assert carm.magnification == pytest.approx(1020 / 530)
    assert carm.detector.width_px * carm.detector.pixel_spacing_mm[0] == pytest.approx(1536 * 0.194)


@pytest.mark.parametrize("primary, source_side, mirrored", [
    (0, [0, 1, 0], False),  # AP: source anterior
    (180, [0, -1, 0], True),  # PA: source posterior, shown mirrored
    (90, [1, 0, 0], False),  # left lateral: source at the patient's right, detector at the left
    (-90, [-1, 0, 0], False),  # right lateral
])
def test_source_and_detector_placement(primary, source_side, mirrored):
    view = CArm().view(primary, 0, ISO)
    np.testing.assert_allclose(view.source_ras, ISO + 530 * np.array(source_side), atol=1e-9)
    np.testing.assert_allclose(view.detector_center_ras, ISO - 490 * np.array(source_side), atol=1e-9)
    assert view.mirrored is mirrored


def test_secondary_angle_tilts_detector_towards_head():
    view = CArm().view(0, 20, ISO)
    assert view.detector_center_ras[2] > ISO[2] > view.source_ras[2]


def test_camera_frame_is_right_handed_and_ap_axes():
    view = CArm().view(0, 0, ISO)
    rotation = view.camera_to_world[:3, :3]
    np.testing.assert_allclose(np.linalg.det(rotation), 1.0)
    np.testing.assert_allclose(view.column_direction, [-1, 0, 0], atol=1e-12)  # image right = patient's left
    np.testing.assert_allclose(view.row_direction, [0, 0, -1], atol=1e-12)  # image down = inferior


@pytest.mark.parametrize("beam", ["cone", "parallel"])
@pytest.mark.parametrize("primary, secondary", [(0, 0), (35, -10), (180, 5), (-120, 0)])
def test_points_on_a_pixel_ray_project_to_that_pixel(beam, primary, secondary):
    carm = CArm(beam=beam, detector=Detector(40, 30, (2.0, 3.0)))
    view = carm.view(primary, secondary, ISO)
    origins, directions = view.rays()
    for r, c in [(0, 0), (29, 39), (12, 7)]:
        point = origins[r, c] + 600.0 * directions[r, c]
        np.testing.assert_allclose(view.project_points(point)[0], [c, r], atol=1e-9)


def test_camera_label_reprojects_like_the_view():
    for primary in (0, 45, 180):
        view = CArm().view(primary, 10, ISO)
        label = view.camera_label()
        assert label.shape == (25,)
        pose, intrinsics = label[:16].reshape(4, 4).astype(np.float64), label[16:].reshape(3, 3).astype(np.float64)
        assert intrinsics[0, 2] == pytest.approx(0.5) and intrinsics[1, 2] == pytest.approx(0.5)
        assert (intrinsics[0, 0] < 0) == view.mirrored
        point = ISO + np.array([30.0, -40.0, 25.0])
        camera = (point - ISO - pose[:3, 3]) @ pose[:3, :3]  # label translation is relative to the isocentre
        uv = intrinsics @ (camera / camera[2])  # continuous coordinates in image-size units
        expected = (view.project_points(point)[0] + 0.5) / np.array(view.detector.shape[::-1])
        np.testing.assert_allclose(uv[:2], expected, atol=1e-5)


def test_view_from_pose_reproduces_rays():
    view = CArm(detector=Detector.square(16, 2.0)).view(30, 15, ISO)
    again = View.from_pose(view.camera_to_world, view.source_to_detector_mm, view.detector)
    for a, b in zip(view.rays(), again.rays()):
        np.testing.assert_allclose(a, b)


def test_presets():
    assert [a for a, _ in SEVEN_VIEWS_DEG] == [-90, -60, -30, 0, 30, 60, 90]
    assert all(b == 0 for _, b in SEVEN_VIEWS_DEG)
    assert BIPLANAR_VIEWS_DEG["PA"][0] == 180 and BIPLANAR_VIEWS_DEG["lateral"][0] == 90


def test_parse_angles():
    assert parse_angles("-90:90:30") == [-90, -60, -30, 0, 30, 60, 90]
    assert parse_angles("0,90") == [0, 90]
    assert parse_angles("45") == [45]
    for bad in ("a:b", "0:90:0", "90:0:30", "x"):
        with pytest.raises(CT2XInputError, match="START:STOP:STEP"):
            parse_angles(bad)


def test_bad_geometry_is_rejected_with_a_clear_message():
    with pytest.raises(CT2XInputError, match="shorter than"):
        CArm(source_to_detector_mm=500, source_to_isocenter_mm=800)
    with pytest.raises(CT2XInputError, match="pixel spacing"):
        Detector(10, 10, (0.0, 1.0))
    with pytest.raises(CT2XInputError, match="beam"):
        CArm(beam="fan")
    with pytest.raises(CT2XInputError, match="rotation"):
        View.from_pose(np.diag([1.0, 1.0, -1.0, 1.0]))
    with pytest.raises(CT2XInputError, match="secondary"):
        CArm().view(0, 90)
