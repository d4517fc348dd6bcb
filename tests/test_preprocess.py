from __future__ import annotations

import numpy as np
import pytest
import torch

from ct2x.conventions import voxel_to_world, world_to_voxel
from ct2x.errors import CT2XInputError
from ct2x.preprocess import clip_hu, crop_or_pad_cube, resample_isotropic, x2ct_denormalize, x2ct_normalize
from ct2x.volume import CTVolume


def _bone_centre_ras(volume: CTVolume) -> np.ndarray:
    """(3,) RAS mm of the centroid of voxels above 300 HU."""
    k, j, i = np.nonzero(volume.hu > 300.0)
    return voxel_to_world(volume.affine, np.stack([i, j, k], axis=1).mean(axis=0)[None])[0]


def test_resample_isotropic_keeps_centre_extent_and_anatomy(ct_phantom):
    volume = resample_isotropic(ct_phantom, spacing_mm=0.5)
    np.testing.assert_allclose(volume.spacing_mm, [0.5, 0.5, 0.5])
    assert volume.shape_ijk == (64, 65, 96)  # round([32.0, 32.4, 48.0] / 0.5)
    np.testing.assert_allclose(volume.center_ras, ct_phantom.center_ras, atol=1e-9)
    assert np.all(np.abs(volume.extent_mm - ct_phantom.extent_mm) <= 0.5)
    np.testing.assert_allclose(np.sign(np.diag(volume.affine)[:3]), [-1, -1, 1])  # orientation kept
    np.testing.assert_allclose(_bone_centre_ras(volume), _bone_centre_ras(ct_phantom), atol=0.3)
    assert volume.hu.dtype == np.float32 and volume.hu.min() >= -1024.0 and volume.hu.max() <= 700.0


def test_resample_nearest_keeps_values(ct_phantom):
    volume = resample_isotropic(ct_phantom, spacing_mm=1.0, order="nearest")
    assert set(np.unique(volume.hu)) <= {-1024.0, -1000.0, 40.0, 700.0}
    with pytest.raises(CT2XInputError, match="order must be one of nearest, linear, bspline, got 'cubic'"):
        resample_isotropic(ct_phantom, order="cubic")


def test_crop_or_pad_cube_shape_spacing_centre(ct_phantom):
    cube = crop_or_pad_cube(ct_phantom, 128.0, spacing_mm=1.0)  # pads: the phantom is about 32 x 32 x 48 mm
    assert cube.hu.shape == (128, 128, 128)
    np.testing.assert_allclose(cube.spacing_mm, [1.0, 1.0, 1.0])
    np.testing.assert_allclose(cube.center_ras, ct_phantom.center_ras, atol=1e-9)
    assert cube.hu[0, 0, 0] == -1024.0 and cube.hu.max() > 600.0
    np.testing.assert_allclose(_bone_centre_ras(cube), _bone_centre_ras(ct_phantom), atol=0.5)


def test_crop_cube_about_a_given_centre(ct_phantom):
    bone = _bone_centre_ras(ct_phantom)
    cube = crop_or_pad_cube(ct_phantom, 10.0, spacing_mm=0.5, center_ras=bone)  # crops: 20^3 inside the phantom
    assert cube.shape_ijk == (20, 20, 20)
    np.testing.assert_allclose(cube.center_ras, bone, atol=1e-9)
    np.testing.assert_allclose(world_to_voxel(cube.affine, bone[None])[0], [9.5, 9.5, 9.5], atol=1e-9)
    assert cube.hu[10, 10, 10] == pytest.approx(700.0)


def test_crop_cube_needs_isotropic_spacing_or_spacing_mm(ct_phantom):
    with pytest.raises(CT2XInputError, match=r"ct_phantom has anisotropic spacing \[0\.8, 0\.9, 1\.5\] mm"):
        crop_or_pad_cube(ct_phantom, 64.0)
    iso = resample_isotropic(ct_phantom, spacing_mm=2.0)
    assert crop_or_pad_cube(iso, 64.0).shape_ijk == (32, 32, 32)


def test_clip_hu_keeps_the_kind(ct_phantom):
    clipped = clip_hu(ct_phantom, -1000.0, 500.0)
    assert isinstance(clipped, CTVolume) and clipped.hu.max() == 500.0
    np.testing.assert_array_equal(clipped.affine, ct_phantom.affine)
    assert clip_hu(np.array([-2000.0, 0.0, 3000.0]), -1024, 2000).tolist() == [-1024.0, 0.0, 2000.0]
    assert clip_hu(torch.tensor([-2000.0, 3000.0]), -1024, 2000).tolist() == [-1024.0, 2000.0]
    with pytest.raises(CT2XInputError, match="clip the array volume.hu instead"):
        clip_hu(ct_phantom, 0.0, 80.0)


def test_x2ct_normalisation_round_trip():
    hu = np.array([-3000.0, -1024.0, 0.0, 476.0, 1476.0, 3000.0], dtype=np.float32)
    x = x2ct_normalize(hu)
    assert x.dtype == np.float32
    np.testing.assert_allclose(x, [0.0, 0.0, 0.4096, 0.6, 1.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(x2ct_denormalize(x), [-1024.0, -1024.0, 0.0, 476.0, 1476.0, 1476.0], atol=1e-3)
    tensor = torch.from_numpy(hu)
    torch.testing.assert_close(x2ct_normalize(tensor), torch.from_numpy(x))
    torch.testing.assert_close(x2ct_denormalize(x2ct_normalize(tensor)), torch.from_numpy(hu).clamp(-1024, 1476))
