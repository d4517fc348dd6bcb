"""FID, KID and the film metrics of `ct2x evaluate synth`: known answers, scikit-image and the libraries where present.

No test downloads anything: feature networks are built here or by ct2x (`random_features`), and the Inception's
weight file is looked for in temporary folders.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import ct2x.metrics.fid as fid_module
from ct2x.errors import CT2XInputError
from ct2x.metrics.fid import (
    INCEPTION_FILES,
    INCEPTION_URL,
    FeatureNetwork,
    frechet_distance,
    inception_features,
    inception_weights,
    kernel_inception_distance,
    polynomial_mmd2,
    random_features,
)
from ct2x.metrics.films import film_metrics, film_psnr, film_ssim


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty torch.hub folder; the Inception cache cleared before and after."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    fid_module._inception_network.cache_clear()
    yield tmp_path / "checkpoints"
    fid_module._inception_network.cache_clear()


def gaussian(n: int, dims: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dims))  # (n, dims)


def test_fid_of_identical_sets_is_zero_and_of_shifted_or_scaled_sets_the_closed_form():
    a = gaussian(200, 6, 0) @ np.random.default_rng(1).standard_normal((6, 6))  # correlated features
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    shift = np.array([1.0, -2.0, 0.5, 0.0, 3.0, 1.0])
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-9)  # |d|^2, equal covariances
    # b = 2a: mean 2 mu, covariance 4 S, (S 4S)^(1/2) = 2S, so FID = |mu|^2 + Tr(S) + 4 Tr(S) - 4 Tr(S)
    expected = float(a.mean(axis=0) @ a.mean(axis=0) + np.trace(np.cov(a, rowvar=False)))
    assert frechet_distance(a, 2 * a) == pytest.approx(expected, rel=1e-9)


def test_fid_of_two_gaussians_approaches_the_population_closed_form():
    """N(0, I) against N(m, diag(s^2)): FID = |m|^2 + sum (1 - s)^2 for the populations."""
    m, s = np.array([0.5, -1.0, 0.0, 2.0]), np.array([1.0, 2.0, 0.5, 1.5])
    a, b = gaussian(200_000, 4, 2), gaussian(200_000, 4, 3) * s + m
    assert frechet_distance(a, b) == pytest.approx(float(m @ m + ((1 - s) ** 2).sum()), abs=0.03)


def test_fid_matches_the_scipy_matrix_square_root_formula():
    """pytorch-fid's formula: |mu_a - mu_b|^2 + Tr(S_a) + Tr(S_b) - 2 Tr(sqrtm(S_a S_b))."""
    linalg = pytest.importorskip("scipy.linalg")
    a = gaussian(50, 8, 4)
    b = gaussian(60, 8, 5) @ np.random.default_rng(6).standard_normal((8, 8)) + 0.3
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = (((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b)
                - 2 * np.trace(linalg.sqrtm(cov_a @ cov_b).real))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)
    few = gaussian(5, 8, 7)  # fewer films than features: singular covariance, still defined
    assert np.isfinite(frechet_distance(few, b)) and frechet_distance(few, b) > 0


def test_unbiased_polynomial_mmd_on_known_inputs():
    # F = 1, k(x, y) = (x y + 1)^3: within a = k(0, 1) = 1; within b = k(2, 3) = 343;
    # across: k(0, 2) = k(0, 3) = 1, k(1, 2) = 27, k(1, 3) = 64, mean 23.25; MMD^2 = 1 + 343 - 2 * 23.25
    assert polynomial_mmd2(np.array([[0.0], [1.0]]), np.array([[2.0], [3.0]])) == pytest.approx(297.5)
    a = np.array([[0.0, 2.0], [2.0, 0.0], [1.0, 1.0]])  # F = 2, k = (x.y / 2 + 1)^3, sets of unequal size
    b = np.array([[1.0, 0.0], [0.0, 1.0]])
    k = lambda x, y: (x @ y / 2 + 1) ** 3  # noqa: E731
    within_a = sum(k(a[i], a[j]) for i in range(3) for j in range(3) if i != j) / 6
    within_b = 2 * k(b[0], b[1]) / 2
    across = sum(k(x, y) for x in a for y in b) / 6
    assert polynomial_mmd2(a, b) == pytest.approx(within_a + within_b - 2 * across)


def test_the_mmd_estimate_is_unbiased_for_one_distribution():
    """Over many pairs of sets drawn from one distribution the estimates average to 0 (a biased one stays > 0)."""
    estimates = [polynomial_mmd2(gaussian(10, 3, 2 * i), gaussian(10, 3, 2 * i + 1)) for i in range(400)]
    assert abs(np.mean(estimates)) < 3 * np.std(estimates) / np.sqrt(len(estimates))


def test_kid_averages_over_subsets_and_shrinks_them_to_the_smaller_set():
    a, b = gaussian(30, 4, 8), gaussian(12, 4, 9) + 1.0
    mean, std, size = kernel_inception_distance(a, b, subsets=1)
    assert size == 12 and std == 0.0
    assert mean == pytest.approx(polynomial_mmd2(a[np.random.RandomState(2020).choice(30, 12, replace=False)], b))
    mean, std, size = kernel_inception_distance(a, b, subsets=50, subset_size=8)
    assert size == 8 and std > 0 and mean > 0
    assert kernel_inception_distance(a, b, subsets=50, subset_size=8) == (mean, std, size)  # seeded
    with pytest.raises(CT2XInputError, match="at least 2 films"):
        kernel_inception_distance(a, b[:1])
    with pytest.raises(CT2XInputError, match="one F"):
        frechet_distance(a, b[:, :3])


def test_fid_and_kid_agree_with_torch_fidelity_where_it_is_installed():
    try:
        from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
        from torch_fidelity.metric_kid import kid_features_to_metric
    except (ImportError, RuntimeError) as error:  # RuntimeError: a torchvision built for another torch
        pytest.skip(f"torch-fidelity cannot be imported here: {error}")
    a = torch.from_numpy(gaussian(120, 16, 10)).float()
    b = torch.from_numpy(gaussian(100, 16, 11) * 1.3 + 0.2).float()
    theirs = fid_statistics_to_metric(fid_features_to_statistics(a), fid_features_to_statistics(b), verbose=False)
    assert frechet_distance(a, b) == pytest.approx(theirs["frechet_inception_distance"], rel=1e-4)
    kid = kid_features_to_metric(a, b, kid_subsets=20, kid_subset_size=50, verbose=False)
    mean, std, _ = kernel_inception_distance(a, b, subsets=20, subset_size=50)
    assert (mean, std) == pytest.approx((kid["kernel_inception_distance_mean"], kid["kernel_inception_distance_std"]),
                                        rel=1e-4)


def test_film_psnr_and_ssim_match_scikit_image():
    metrics = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(12)
    target = rng.random((40, 33))
    prediction = np.clip(target + 0.1 * rng.standard_normal(target.shape), 0, 1)
    assert film_psnr(prediction, target) == pytest.approx(
        metrics.peak_signal_noise_ratio(target, prediction, data_range=1), rel=1e-10)
    assert film_ssim(prediction, target) == pytest.approx(
        metrics.structural_similarity(prediction, target, data_range=1), rel=1e-10)
    assert film_metrics(torch.from_numpy(target)[None], target) == {"psnr": 100.0, "ssim": pytest.approx(1.0)}
    with pytest.raises(CT2XInputError, match="one shape"):
        film_psnr(target, target[:, :32])
    with pytest.raises(CT2XInputError, match="at least 7"):
        film_ssim(target[:6], target[:6])


def test_random_features_are_fixed_and_named():
    films = torch.rand(5, 1, 48, 48, generator=torch.Generator().manual_seed(13))
    network = random_features()
    features = network.features(films, batch=2)
    assert features.shape == (5, 64) and features.dtype == np.float64 and np.isfinite(features).all()
    np.testing.assert_allclose(features, random_features().features(films[:, 0]), atol=1e-6)  # (N, H, W) too
    assert "random conv features" in network.name and network.name.endswith("64-d")
    assert not np.allclose(features, random_features(seed=1).features(films))
    assert random_features(dim=8).features(films).shape == (5, 8)
    with pytest.raises(CT2XInputError, match="grey films"):
        network.features(torch.zeros(2, 3, 8, 8))


def test_missing_inception_weights_are_named_with_where_to_put_them(hub):
    with pytest.raises(CT2XInputError) as raised:
        inception_features()
    message = str(raised.value)
    assert str(hub / INCEPTION_FILES[0]) in message and INCEPTION_URL in message and "--features random" in message
    hub.mkdir()
    (hub / INCEPTION_FILES[1]).write_bytes(b"")  # pytorch-fid's name for the same weights is found too
    assert inception_weights() == hub / INCEPTION_FILES[1]


def test_inception_without_torch_fidelity_says_what_to_install(hub, monkeypatch):
    hub.mkdir()
    (hub / INCEPTION_FILES[0]).write_bytes(b"")
    for name in ("torch_fidelity", "torch_fidelity.feature_extractor_inceptionv3"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as when it is not installed
    with pytest.raises(CT2XInputError, match=r"torch-fidelity.*ct2x\[fid\]"):
        inception_features()


def test_inception_features_feed_8_bit_rgb_to_torch_fidelity_s_extractor(hub, monkeypatch):
    """The extractor (here a stand-in with its interface) gets (N, 3, H, W) uint8 grey and the weight file's path."""
    hub.mkdir()
    (hub / INCEPTION_FILES[0]).write_bytes(b"")
    seen = {}

    class StandInExtractor(torch.nn.Module):
        def __init__(self, name, features_list, feature_extractor_weights_path):
            super().__init__()
            seen.update(name=name, features=features_list, weights=feature_extractor_weights_path,
                        built=seen.get("built", 0) + 1)

        def forward(self, x: torch.Tensor):
            seen["input"] = x
            return (x.float().mean(dim=(2, 3)).repeat(1, 683)[:, :2048],)  # (N, 2048)

    package = type(sys)("torch_fidelity")
    extractor = type(sys)("torch_fidelity.feature_extractor_inceptionv3")
    extractor.FeatureExtractorInceptionV3 = StandInExtractor
    monkeypatch.setitem(sys.modules, "torch_fidelity", package)
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", extractor)
    network = inception_features()
    features = network.features(torch.full((3, 1, 20, 20), 0.5))
    assert features.shape == (3, 2048) and network.name.startswith("Inception-v3 pool3") and "2048-d" in network.name
    assert seen["input"].dtype == torch.uint8 and seen["input"].shape == (3, 3, 20, 20)
    assert int(seen["input"][0, 2, 0, 0]) == 128
    assert seen["weights"] == str(hub / INCEPTION_FILES[0]) and seen["features"] == ["2048"]
    inception_features()
    assert seen["built"] == 1  # built once, then shared


def test_a_feature_network_is_a_name_and_a_callable():
    network = FeatureNetwork("test-built features, 2-d", lambda films: films.mean(dim=(1, 2, 3))[:, None].repeat(1, 2))
    assert network.features(np.zeros((4, 8, 8))).shape == (4, 2)
