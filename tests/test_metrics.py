"""Reconstruction metrics against scikit-image and against their definitions, on volumes with known differences."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ct2x.errors import CT2XInputError
from ct2x.metrics import (
    METRICS,
    cosine_similarity,
    mae,
    mse,
    psnr,
    psnr_x2ct,
    psnr_x2ct_3axis,
    reconstruction_metrics,
    ssim2d_3axis,
    ssim3d,
)

metrics = pytest.importorskip("skimage.metrics")


@pytest.fixture(scope="module")
def pair():
    """A smooth (24, 20, 28) volume in [0, 1] and a noisy, blurred, shifted copy."""
    rng = np.random.default_rng(7)
    d, h, w = np.meshgrid(np.arange(24), np.arange(20), np.arange(28), indexing="ij")
    target = 0.5 + 0.3 * np.sin(d / 4) * np.cos(h / 5) + 0.15 * np.cos(w / 3)  # (D, H, W)
    prediction = np.clip(0.9 * target + 0.04 + rng.normal(0, 0.05, target.shape), 0, 1)
    return prediction, target


def test_plain_errors_and_psnr_against_definitions(pair):
    prediction, target = pair
    assert mae(prediction, target) == pytest.approx(np.abs(prediction - target).mean())
    assert mse(prediction, target) == pytest.approx(((prediction - target) ** 2).mean())
    expected_cosine = (prediction * target).sum() / np.linalg.norm(prediction) / np.linalg.norm(target)
    assert cosine_similarity(prediction, target) == pytest.approx(expected_cosine)
    assert psnr(prediction, target) == pytest.approx(metrics.peak_signal_noise_ratio(target, prediction,
                                                                                     data_range=1.0))


def test_ssim3d_matches_scikit_image_gaussian_ssim(pair):
    prediction, target = pair
    expected = metrics.structural_similarity(target, prediction, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                             use_sample_covariance=False)
    assert ssim3d(prediction, target) == pytest.approx(expected, abs=1e-9)


def test_x2ct_ssim_is_per_slice_2d_ssim_over_three_axes(pair):
    prediction, target = pair
    per_axis = []
    for axis in range(3):  # X2CT: compare_ssim(multichannel=True) with the slice axis as the channels
        per_axis.append(metrics.structural_similarity(np.moveaxis(target, axis, -1), np.moveaxis(prediction, axis, -1),
                                                      data_range=1.0, channel_axis=-1, win_size=7))
    assert ssim2d_3axis(prediction, target) == pytest.approx(np.mean(per_axis), abs=1e-9)
    assert ssim2d_3axis(prediction, target) != pytest.approx(ssim3d(prediction, target), abs=1e-3)


def test_x2ct_psnr_uses_integers_to_2500_and_peak_4095(pair):
    prediction, target = pair
    p, t = np.floor(prediction * 2500), np.floor(target * 2500)
    assert psnr_x2ct(prediction, target) == pytest.approx(10 * math.log10(4095 ** 2 / ((p - t) ** 2).mean()))
    assert psnr_x2ct(prediction, target) - psnr(prediction, target) == pytest.approx(20 * math.log10(4095 / 2500),
                                                                                      abs=0.02)
    per_axis = [np.mean([metrics.peak_signal_noise_ratio(np.moveaxis(t, a, 0)[i], np.moveaxis(p, a, 0)[i],
                                                         data_range=4095) for i in range(t.shape[a])])
                for a in range(3)]
    assert psnr_x2ct_3axis(prediction, target) == pytest.approx(np.mean(per_axis))


def test_identical_volumes_and_clipping(pair):
    _, target = pair
    scores = reconstruction_metrics(target, target)
    assert scores["mae"] == 0 and scores["psnr_x2ct_3axis"] == 100.0 and scores["ssim3d"] == pytest.approx(1.0)
    assert set(scores) == set(METRICS)
    assert mae(target + 5.0, np.ones_like(target)) == 0.0  # values above 1 are clipped, as X2CT's test does


def test_bad_shapes_are_refused():
    with pytest.raises(CT2XInputError, match="one shape"):
        mae(np.zeros((16, 16, 16)), np.zeros((16, 16, 17)))
    with pytest.raises(CT2XInputError, match="too small"):
        ssim3d(np.zeros((8, 16, 16)), np.zeros((8, 16, 16)))
