import numpy as np
import pytest
import torch

from ct2x import phantoms
from ct2x.drr import DRRRenderer, Physics, auto_window, fitted_detector_spacing_mm, to_display
from ct2x.errors import CT2XInputError
from ct2x.geometry import CArm, Detector
from ct2x.physics import MATERIALS, load_spectrum, transmission
from ct2x.volume import CTVolume

WIDE_CARM = CArm(1020, 700, Detector.square(64, 430 / 64))  # 430 mm detector: the whole chest in view


@pytest.fixture(scope="module")
def chest():
    return phantoms.chest(size=64, spacing_mm=5.0)


@pytest.fixture(scope="module")
def chest_renderer(chest):
    return DRRRenderer(chest, WIDE_CARM)


def test_radiograph_outputs(chest_renderer):
    film = chest_renderer.render(0)
    assert film.attenuation.shape == film.display.shape == (64, 64)
    assert film.attenuation.dtype == np.float32 and film.display.dtype == np.uint8
    assert film.attenuation.min() >= 0 and film.attenuation.max() > 1.0
    assert set(film.area_density_g_cm2) == {"air", "soft_tissue", "bone"}
    assert film.area_density_g_cm2["bone"].max() > 0 and film.display.max() == 255


def test_bone_only_and_bone_suppressed_films_add_up(chest_renderer):
    film = chest_renderer.render(0)
    bone = film.material_attenuation(["bone"])
    soft = film.material_attenuation(["air", "soft_tissue"])
    spine = (slice(28, 36), slice(30, 34))  # the spine projects onto the image centre
    assert bone[spine].mean() > 0.2
    np.testing.assert_array_equal(bone[film.area_density_g_cm2["bone"] == 0], 0)
    # Beam hardening: the materials together attenuate less than the sum of each alone.
    assert np.all(film.attenuation <= bone + soft + 1e-4)
    assert film.attenuation[spine].mean() > 0.9 * (bone + soft)[spine].mean()


def test_more_bone_gives_a_brighter_film(chest):
    denser = CTVolume(np.where(chest.hu > 350, chest.hu + 600, chest.hu), chest.affine, "denser bone")
    base = DRRRenderer(chest, WIDE_CARM, window=(0.0, 10.0)).render(0)
    more = DRRRenderer(denser, WIDE_CARM, window=(0.0, 10.0)).render(0)
    bone = base.area_density_g_cm2["bone"] > 0.5
    assert np.all(more.attenuation[bone] > base.attenuation[bone])
    assert more.display[bone].mean() > base.display[bone].mean()
    np.testing.assert_allclose(more.attenuation[~(base.area_density_g_cm2["bone"] > 0)],
                               base.attenuation[~(base.area_density_g_cm2["bone"] > 0)], atol=1e-5)


def test_harder_spectrum_attenuates_less(chest):
    soft_beam = DRRRenderer(chest, WIDE_CARM, Physics(spectrum="60kV")).render(0).attenuation
    hard_beam = DRRRenderer(chest, WIDE_CARM, Physics(spectrum="120kV")).render(0).attenuation
    assert hard_beam.mean() < 0.9 * soft_beam.mean()


def test_monochromatic_fast_path_matches_a_one_energy_spectrum_in_soft_tissue(chest):
    film = DRRRenderer(chest, WIDE_CARM, Physics(energy_kev=40.0)).render(0)
    assert film.area_density_g_cm2 == {}
    with pytest.raises(CT2XInputError, match="polychromatic"):
        film.material_attenuation(["bone"])
    poly = DRRRenderer(chest, WIDE_CARM).render(0)
    assert 0.7 < film.attenuation.mean() / poly.attenuation.mean() < 1.3  # 40 keV is near the 60 kV mean energy


def test_noise_is_reproducible_with_a_seed(chest):
    physics = Physics(noise_photons=1e4, seed=7)
    first = DRRRenderer(chest, WIDE_CARM, physics).render(30).attenuation
    again = DRRRenderer(chest, WIDE_CARM, physics).render(30).attenuation
    other = DRRRenderer(chest, WIDE_CARM, Physics(noise_photons=1e4, seed=8)).render(30).attenuation
    clean = DRRRenderer(chest, WIDE_CARM).render(30).attenuation
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert 0.001 < np.abs(first - clean).mean() < 0.1


def test_window_is_fixed_by_the_first_render(chest):
    renderer = DRRRenderer(chest, WIDE_CARM)
    first = renderer.render(0)
    lateral = renderer.render(90)
    assert lateral.window == first.window


def test_dragging_either_angle_never_reslices_the_ct(chest):
    """The renderer prepares what both sliders' whole-degree views need: horizontal, and tilted at 0 and 45 deg."""
    carm = CArm().with_detector(64, fitted_detector_spacing_mm(chest, CArm(), 64))  # CT2XSynth's defaults
    renderer = DRRRenderer(chest, carm)
    prepared = set(renderer.projector._stacks)
    assert {key[0] for key in prepared} == {0, 1, 2}  # steep tilts integrate along k
    for angle in range(-90, 91):
        renderer.render(angle)
    for primary in (0, 45):
        for tilt in range(-45, 46):
            renderer.render(primary, tilt)
    assert set(renderer.projector._stacks) == prepared


def test_film_is_the_exact_spectrum_sum_to_the_table_tolerance(chest_renderer):
    """The renderer looks the polychromatic attenuation up (`AttenuationTable`); the film stays within the table's
    2e-4 of the exact sum over energy bins of its own area densities."""
    film = chest_renderer.render(30, 10)
    maps = torch.from_numpy(np.stack([film.area_density_g_cm2[m] for m in MATERIALS])).double()  # (3, H, W) g/cm^2
    exact = -torch.log(transmission(maps, load_spectrum("60kV"))).numpy()
    assert np.abs(film.attenuation - exact).max() < 2e-4



def test_a_renderer_without_material_maps_projects_two_channels_for_the_same_film(chest, chest_renderer):
    """CT2XSynth's renderer (`material_maps=False`) projects soft tissue and bone with air counted in them: its films
    agree with the three-material films to the basis' 3e-4 (tests/test_physics.py) plus the float16 rounding of both
    renderers' stacks (up to 1e-3 here); it keeps no maps and says so when asked for a material image. Counting air
    as soft tissue alone (alpha = 1, beta = 0) would move these films by about 3e-2."""
    fast = DRRRenderer(chest, WIDE_CARM, material_maps=False)
    assert fast.projector.volume.shape[1] == 2 and chest_renderer.projector.volume.shape[1] == 3
    for primary, secondary in ((0, 0), (45, 0), (30, 10)):
        film, exact = fast.render(primary, secondary), chest_renderer.render(primary, secondary)
        assert np.abs(film.attenuation - exact.attenuation).max() < 2e-3
        assert np.linalg.norm(film.attenuation - exact.attenuation) < 1e-4 * np.linalg.norm(exact.attenuation)
        assert film.area_density_g_cm2 == {}
    with pytest.raises(CT2XInputError, match="material_maps=True"):
        film.material_attenuation(["bone"])

def test_a_view_renders_the_same_film_on_a_fresh_and_a_used_renderer(chest):
    """Neither the views rendered before (the projector's cached slabs), the thread count nor preparing a sweep up
    front change a film."""
    used = DRRRenderer(chest, WIDE_CARM, window=(0.0, 5.0))
    for primary, secondary in ((45, 0), (0, 40), (80, -30)):
        used.render(primary, secondary)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        fresh = DRRRenderer(chest, WIDE_CARM, window=(0.0, 5.0))  # one worker, where `used` has torch's threads
    finally:
        torch.set_num_threads(threads)
    unprepared = DRRRenderer(chest, WIDE_CARM, window=(0.0, 5.0), sweep=False)
    for primary, secondary in ((20, 0), (20, 25), (0, 0)):
        film = used.render(primary, secondary).attenuation
        np.testing.assert_array_equal(film, fresh.render(primary, secondary).attenuation)
        np.testing.assert_array_equal(film, unprepared.render(primary, secondary).attenuation)
    assert torch.get_num_threads() == threads  # rendering runs single-threaded ops and restores the setting


def test_display_mapping():
    attenuation = np.array([[0.0, 1.0, 2.0, 3.0]], dtype=np.float32)
    np.testing.assert_array_equal(to_display(attenuation, (1.0, 3.0)), [[0, 0, 128, 255]])
    low, high = auto_window(np.linspace(0, 5, 1000).reshape(10, 100).astype(np.float32))
    assert 0 < low < 0.2 and 4.9 < high <= 5


def test_invalid_physics_settings(chest):
    with pytest.raises(CT2XInputError, match="spectrum"):
        DRRRenderer(chest, WIDE_CARM, Physics(spectrum="200kV"))
    with pytest.raises(CT2XInputError, match="photon"):
        DRRRenderer(chest, WIDE_CARM, Physics(noise_photons=0))


# --- real scans -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_chest_films(data_dir):
    from ct2x.io import load_ct

    volume = load_ct(data_dir / "ct" / "chest_popi_phase00.nii.gz")
    renderer = DRRRenderer(volume, CArm(1020, 700, Detector.square(128, 430 / 128)))
    return {angle: renderer.render(angle) for angle in (0, 90)}


@pytest.mark.realdata
def test_real_chest_ap_is_nearly_left_right_symmetric(real_chest_films):
    ap = real_chest_films[0].attenuation
    mirrored = ap[:, ::-1]

    def shifted_correlation(a, b, shift):  # the patient's midline need not be the image centre
        if shift < 0:
            a, b, shift = b, a, -shift
        return np.corrcoef(a[:, shift:].ravel(), b[:, :a.shape[1] - shift].ravel())[0, 1]

    best = max(shifted_correlation(ap, mirrored, shift) for shift in range(-16, 17))
    assert best > 0.85
    up_down = np.corrcoef(ap.ravel(), ap[::-1].ravel())[0, 1]  # a chest is not symmetric head-to-foot
    assert best > up_down + 0.3


@pytest.mark.realdata
def test_real_chest_lungs_are_darker_than_the_spine(real_chest_films):
    ap = real_chest_films[0].display.astype(float)
    rows = slice(40, 80)  # mid-thorax
    spine = ap[rows, 60:68].mean()
    lungs = min(ap[rows, 28:44].mean(), ap[rows, 84:100].mean())
    assert lungs < spine - 40


@pytest.mark.realdata
def test_real_chest_lateral_shows_the_spine_posterior(real_chest_films):
    # Left lateral (+90 deg): the patient faces image right, so the spine (most bone) sits in the left half.
    bone = real_chest_films[90].area_density_g_cm2["bone"][40:100]
    columns = np.arange(bone.shape[1])
    spine_column = columns[np.argmax(bone.sum(0))]
    assert spine_column < 64 - 10
