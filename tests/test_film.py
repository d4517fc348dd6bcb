"""ct2x.film: grey-level order, full range, local contrast, resolution invariance, edge cases."""

import numpy as np
import pytest

from ct2x import phantoms
from ct2x.drr import DRRRenderer, auto_window, to_display
from ct2x.errors import CT2XInputError
from ct2x.film import DEFAULT_DISPLAY_MODE, DISPLAY_MODES, FilmProcessing, process_film
from ct2x.geometry import CArm, Detector

DETECTOR_MM = 576.0  # the whole phantom and air around it in view (about 400 mm at the isocentre)


@pytest.fixture(scope="module")
def chest():
    return phantoms.chest(size=64, spacing_mm=5.0)


def render(volume, size_px, angles):
    renderer = DRRRenderer(volume, CArm(1020, 700, Detector.square(size_px, DETECTOR_MM / size_px)))
    return [renderer.render(angle) for angle in angles]


@pytest.fixture(scope="module")
def ap_and_lateral(chest):
    return render(chest, 64, (0.0, 90.0))


def test_display_modes():
    assert DISPLAY_MODES == ("processed", "linear") and DEFAULT_DISPLAY_MODE == "processed"
    assert FilmProcessing().describe()["display"] == "processed"


def test_output_is_uint8_of_the_input_shape_and_leaves_the_attenuation_alone(ap_and_lateral):
    film = ap_and_lateral[0]
    attenuation = film.attenuation.copy()
    display = process_film(film.attenuation, film.view.detector.pixel_spacing_mm)
    assert display.dtype == np.uint8 and display.shape == film.attenuation.shape
    np.testing.assert_array_equal(film.attenuation, attenuation)
    np.testing.assert_array_equal(display, process_film(film.attenuation, film.view.detector.pixel_spacing_mm))


def test_bone_is_brighter_than_soft_tissue_which_is_brighter_than_air(ap_and_lateral):
    for film in ap_and_lateral:
        display = process_film(film.attenuation, film.view.detector.pixel_spacing_mm).astype(float)
        bone_density = film.area_density_g_cm2["bone"]  # g/cm^2 along each ray
        air = film.attenuation <= FilmProcessing().body_min_attenuation
        bone = bone_density > np.percentile(bone_density[bone_density > 0], 75)
        soft_tissue = (bone_density == 0) & ~air
        assert air.sum() > 100 and bone.sum() > 20 and soft_tissue.sum() > 100
        assert display[bone].mean() > display[soft_tissue].mean() + 40
        assert display[soft_tissue].mean() > display[air].mean() + 40
        assert display[air].max() == 0  # air outside the body is black, as on a film


def test_processed_films_use_the_full_range_where_the_series_window_does_not(ap_and_lateral):
    windows = [auto_window(film.attenuation) for film in ap_and_lateral]
    series_window = (min(w[0] for w in windows), max(w[1] for w in windows))  # today's linear default
    ap = ap_and_lateral[0]
    body = ap.attenuation > FilmProcessing().body_min_attenuation
    linear = to_display(ap.attenuation, series_window)
    processed = process_film(ap.attenuation, ap.view.detector.pixel_spacing_mm)
    assert linear.max() < 240  # the AP film never reaches white under the series window
    assert processed.max() >= 250 and processed[body].min() <= 5
    assert np.percentile(processed[body], 99) - np.percentile(processed[body], 1) > 200


def test_local_contrast_of_a_faint_detail_in_a_dense_region_is_raised():
    spacing_mm, size = 3.0, 128
    y, x = (np.mgrid[:size, :size] + 0.5 - size / 2) * spacing_mm  # mm from the image centre

    def chord_mm(centre_x, centre_y, radius_x, radius_y, half_depth):
        """Path length (mm) through an ellipsoid, seen along its depth axis."""
        inside = 1 - ((x - centre_x) / radius_x) ** 2 - ((y - centre_y) / radius_y) ** 2
        return 2 * half_depth * np.sqrt(np.clip(inside, 0, None))

    attenuation = 0.02 * chord_mm(0, 0, 170, 180, 110)  # body, 1/mm x mm
    attenuation -= 0.015 * (chord_mm(-85, -20, 50, 120, 50) + chord_mm(85, -20, 50, 120, 50))  # lungs
    attenuation += 0.05 * chord_mm(0, 0, 12, 300, 12)  # spine
    distance_mm = np.hypot(x + 24, y)  # from a faint detail beside the spine, in the densest soft tissue
    detail, surround = distance_mm <= 6, (distance_mm > 9) & (distance_mm <= 12)
    attenuation = (attenuation + 0.1 * detail).astype(np.float32)  # the detail adds 2 % to about 4.4
    assert attenuation[detail].mean() > np.percentile(attenuation[attenuation > 0.05], 75)

    def detail_contrast(display):
        return display[detail].mean() - display[surround].mean()

    linear = detail_contrast(to_display(attenuation, auto_window(attenuation)))
    processed = detail_contrast(process_film(attenuation, spacing_mm))
    assert linear > 2 and processed > 1.3 * linear


def test_the_look_does_not_change_with_detector_resolution(chest, ap_and_lateral):
    coarse = ap_and_lateral[0]  # 64 px of 9 mm
    fine = render(chest, 128, (0.0,))[0]  # 128 px of 4.5 mm: the same field of view
    coarse_film = process_film(coarse.attenuation, coarse.view.detector.pixel_spacing_mm).astype(float)

    def halved(display):
        return display.astype(float).reshape(64, 2, 64, 2).mean(axis=(1, 3))

    fine_film = halved(process_film(fine.attenuation, fine.view.detector.pixel_spacing_mm))
    ignoring_spacing = halved(process_film(fine.attenuation, coarse.view.detector.pixel_spacing_mm))
    difference = np.abs(fine_film - coarse_film).mean()  # grey levels
    assert difference < 4.5
    assert difference < 0.75 * np.abs(ignoring_spacing - coarse_film).mean()  # the spacing is what keeps the look


def test_blank_tiny_and_non_finite_images():
    np.testing.assert_array_equal(process_film(np.zeros((32, 48), np.float32), 1.0), np.zeros((32, 48), np.uint8))
    rng = np.random.default_rng(7)
    for shape in [(8, 8), (1, 1), (2, 9)]:
        display = process_film(rng.uniform(0, 5, shape).astype(np.float32), (0.5, 0.7))
        assert display.dtype == np.uint8 and display.shape == shape
    constant = process_film(np.full((16, 16), 3.0, np.float32), 1.0)
    assert constant.dtype == np.uint8 and len(np.unique(constant)) == 1
    corrupted = rng.uniform(0, 5, (32, 32)).astype(np.float32)
    corrupted[0, :4] = [np.nan, np.inf, -np.inf, np.nan]
    display = process_film(corrupted, 1.0)
    assert display.dtype == np.uint8 and display[0, 0] == display[0, 2] == 0 and display[0, 1] >= 250


@pytest.mark.parametrize("spacing", [0.0, -1.0, float("nan"), (1.0, 2.0, 3.0)])
def test_bad_pixel_spacing_is_refused(spacing):
    with pytest.raises(CT2XInputError, match="pixel spacing"):
        process_film(np.ones((8, 8), np.float32), spacing)


@pytest.mark.parametrize("settings", [{"range_percentiles": (60, 40)}, {"unsharp_sigma_mm": 0}, {"mid_grey": 1.0},
                                      {"equalisation_clip": 0.5}, {"equalisation_weight": 2}, {"contrast": -1}])
def test_impossible_settings_are_refused(settings):
    with pytest.raises(CT2XInputError, match="film processing"):
        FilmProcessing(**settings)


def test_a_non_image_is_refused():
    with pytest.raises(CT2XInputError, match="2-D"):
        process_film(np.ones((2, 8, 8), np.float32), 1.0)
