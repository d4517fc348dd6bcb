"""The fitted detector shows the whole body at every angle, and fills the film with it."""

import numpy as np
import pytest

from ct2x import phantoms
from ct2x.drr import FIT_SWEEP_DEG, DRRRenderer, Physics, body_outline_ras, fitted_detector_spacing_mm
from ct2x.errors import CT2XInputError
from ct2x.geometry import CArm
from ct2x.io import load_ct

SIZE_PX = 96
SHOWN_ATTENUATION = 0.02  # a pixel behind any body (skin ~ 1 mm of tissue is about 0.02)


def silhouette_bounds(attenuation):
    """(first row, last row, first column, last column) of the pixels behind the body."""
    rows = np.nonzero((attenuation > SHOWN_ATTENUATION).any(axis=1))[0]
    columns = np.nonzero((attenuation > SHOWN_ATTENUATION).any(axis=0))[0]
    return rows[0], rows[-1], columns[0], columns[-1]


def assert_body_fits(volume, carm, views_deg):
    renderer = DRRRenderer(volume, carm.with_detector(SIZE_PX, fitted_detector_spacing_mm(volume, carm, SIZE_PX,
                                                                                         views_deg)),
                           Physics(energy_kev=60.0))
    widest = 0
    for primary, secondary in views_deg:
        top, bottom, left, right = silhouette_bounds(renderer.render(primary, secondary).attenuation)
        assert top > 0 and left > 0 and bottom < SIZE_PX - 1 and right < SIZE_PX - 1, (primary, secondary)
        widest = max(widest, bottom - top + 1, right - left + 1)
    return widest


def test_outline_encloses_every_body_voxel():
    chest = phantoms.chest(size=48, spacing_mm=6.0)
    outline = body_outline_ras(chest)
    body_ijk = np.argwhere(chest.hu > -500)[:, ::-1]
    body_ras = body_ijk @ chest.affine[:3, :3].T + chest.affine[:3, 3]
    assert np.all(body_ras.min(0) >= outline.min(0)) and np.all(body_ras.max(0) <= outline.max(0))
    assert len(outline) < len(body_ijk)  # surface cells only, not the whole body


def test_fitted_detector_shows_the_whole_body_at_every_sweep_angle_and_fills_the_film():
    chest = phantoms.chest(size=48, spacing_mm=6.0)
    widest = assert_body_fits(chest, CArm(), FIT_SWEEP_DEG)
    assert widest >= 0.88 * SIZE_PX


def test_a_single_view_is_fitted_to_that_view_alone():
    chest = phantoms.chest(size=48, spacing_mm=6.0)
    assert fitted_detector_spacing_mm(chest, CArm(), SIZE_PX, [(0.0, 0.0)]) < fitted_detector_spacing_mm(
        chest, CArm(), SIZE_PX)
    assert assert_body_fits(chest, CArm(), [(0.0, 0.0)]) >= 0.88 * SIZE_PX


def test_tilted_views_fit_too():
    chest = phantoms.chest(size=48, spacing_mm=6.0)
    assert_body_fits(chest, CArm(), [(0.0, 40.0), (60.0, -30.0)])


def test_source_inside_the_body_is_refused():
    chest = phantoms.chest(size=48, spacing_mm=6.0)  # body 320 mm wide
    with pytest.raises(CT2XInputError, match="inside or behind the body"):
        fitted_detector_spacing_mm(chest, CArm(1020, 120), SIZE_PX, [(90.0, 0.0)])


@pytest.mark.realdata
@pytest.mark.slow
def test_real_abdomen_laterals_are_not_cut(data_dir):
    volume = load_ct(data_dir / "ct" / "abdomen_pelvis.nii.gz")
    assert_body_fits(volume, CArm(), [(-90.0, 0.0), (0.0, 0.0), (45.0, 0.0), (90.0, 0.0)])
