from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from ct2x.conventions import (
    LPS_TO_RAS,
    affine_from_sitk,
    ijk_to_kji,
    kji_to_ijk,
    lps_to_ras,
    ras_to_lps,
    sitk_geometry_from_affine,
    spacing_from_affine,
    voxel_to_world,
    world_to_voxel,
)


def _oblique_image(rng: np.random.Generator) -> sitk.Image:
    """A small (I, J, K) = (7, 6, 5) image with a random rotation + reflection, anisotropic spacing and an origin."""
    image = sitk.GetImageFromArray(rng.normal(size=(5, 6, 7)).astype(np.float32))
    rotation, _ = np.linalg.qr(rng.normal(size=(3, 3)))  # (3, 3) orthonormal, det +-1
    image.SetDirection(rotation.ravel().tolist())
    image.SetSpacing((0.7, 1.1, 2.5))
    image.SetOrigin((-12.0, 35.5, 101.25))
    return image


def test_lps_ras_round_trip(rng):
    affine = np.eye(4)
    affine[:3, :] = rng.normal(size=(3, 4))
    assert np.array_equal(ras_to_lps(lps_to_ras(affine)), affine)
    assert np.array_equal(LPS_TO_RAS @ LPS_TO_RAS, np.eye(4))
    np.testing.assert_array_equal(lps_to_ras(affine)[:2], -affine[:2])
    np.testing.assert_array_equal(lps_to_ras(affine)[2:], affine[2:])


def test_affine_from_sitk_matches_itk_physical_points(rng):
    image = _oblique_image(rng)
    affine = affine_from_sitk(image)
    indices = [(0, 0, 0), (6, 0, 0), (0, 5, 0), (0, 0, 4), (3, 2, 1), (6, 5, 4)]
    for ijk in indices:
        lps = np.array(image.TransformIndexToPhysicalPoint(ijk))
        ras = voxel_to_world(affine, np.array([ijk]))[0]
        np.testing.assert_allclose(ras, lps * [-1, -1, 1], atol=1e-9)
    np.testing.assert_allclose(spacing_from_affine(affine), image.GetSpacing(), rtol=1e-12)


def test_sitk_geometry_round_trip(rng):
    image = _oblique_image(rng)
    origin, spacing, direction = sitk_geometry_from_affine(affine_from_sitk(image))
    np.testing.assert_allclose(origin, image.GetOrigin(), atol=1e-12)
    np.testing.assert_allclose(spacing, image.GetSpacing(), atol=1e-12)
    np.testing.assert_allclose(direction, image.GetDirection(), atol=1e-12)


def test_kji_ijk_matches_sitk_pixel_access(rng):
    image = _oblique_image(rng)
    kji = sitk.GetArrayFromImage(image)  # (K, J, I)
    ijk = kji_to_ijk(kji)
    assert kji.shape == (5, 6, 7) and ijk.shape == (7, 6, 5)
    assert ijk[6, 2, 1] == kji[1, 2, 6] == image.GetPixel(6, 2, 1)
    assert np.array_equal(ijk_to_kji(ijk), kji)
    batched = np.zeros((2, 1, 5, 6, 7))  # (B, C, K, J, I)
    assert kji_to_ijk(batched).shape == (2, 1, 7, 6, 5)


def test_world_to_voxel_inverts_voxel_to_world(rng):
    affine = affine_from_sitk(_oblique_image(rng))
    ijk = rng.uniform(-2, 10, size=(20, 3))
    ras = voxel_to_world(affine, ijk)
    assert ras.shape == (20, 3) and ras.dtype == np.float64
    np.testing.assert_allclose(world_to_voxel(affine, ras), ijk, atol=1e-9)


def test_ct_volume_geometry(ct_phantom):
    assert ct_phantom.hu.shape == (32, 36, 40)
    assert ct_phantom.shape_ijk == (40, 36, 32)
    np.testing.assert_allclose(ct_phantom.spacing_mm, [0.8, 0.9, 1.5])
    np.testing.assert_allclose(ct_phantom.extent_mm, [32.0, 32.4, 48.0])
    # centre = voxel (19.5, 17.5, 15.5); i and j run to -x (left) and -y (posterior)
    np.testing.assert_allclose(ct_phantom.center_ras, [12.5 - 19.5 * 0.8, -30.0 - 17.5 * 0.9, 40.0 + 15.5 * 1.5])
    image = ct_phantom.to_sitk()
    assert image.GetSize() == (40, 36, 32)
    np.testing.assert_allclose(affine_from_sitk(image), ct_phantom.affine, atol=1e-12)
