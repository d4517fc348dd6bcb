"""FID and KID between two sets of grey films, on the features of a named network.

- FID (Heusel et al., NeurIPS 2017): |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of the features' means and
  sample covariances (N - 1 in the denominator), as pytorch-fid and torch-fidelity compute it. Tr((S_a S_b)^(1/2)) is
  the sum of the square roots of the eigenvalues of S_a^(1/2) S_b S_a^(1/2), which is symmetric and positive
  semi-definite (same eigenvalues as S_a S_b), so `eigh` suffices and no imaginary parts arise.
- KID (Binkowski et al., ICLR 2018): the unbiased estimate of the squared MMD with the polynomial kernel
  k(x, y) = (x . y / F + 1)^3 (F features), averaged over `subsets` random pairs of subsets of `subset_size` films,
  with its standard deviation over the subsets: torch-fidelity's defaults (100 subsets of 1000, seed 2020). When a
  set holds fewer films than `subset_size`, the subsets take the smaller set's size (torch-fidelity refuses instead).
- Both grow with the feature network and with the number of films (FID is biased upwards for small sets): compare
  numbers only on one network and equal set sizes, and name the network with every number (`FeatureNetwork.name`).

Feature networks take films (N, 1, H, W) in [0, 1] (bone bright, as `ct2x prepare synth` stores them) and give
(N, F) features:
- `inception_features()`: the FID Inception-v3 (TensorFlow's 2015-12-05 graph converted to PyTorch), 2048-d pool3
  features, built by torch-fidelity's own code (`FeatureExtractorInceptionV3`, "inception-v3-compat") from its
  weight file, which is looked for first: nothing is downloaded here, and a missing file is named with where to put
  it. Grey films become 8-bit RGB (the grey level repeated), which the extractor resizes to 299 x 299 itself.
  Dependency: `pip install "ct2x[fid]"`; torch-fidelity imports torchvision, whose build must match the installed
  torch; it is imported here only, never on the path Slicer runs.
- `random_features()`: a small convolutional network with fixed seeded random weights, built here without any
  download, for machines without the Inception (randomly initialised embeddings rank generative models usefully:
  Naeem et al., ICML 2020). Its numbers are not comparable with Inception ones.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ct2x.device import torch_device
from ct2x.errors import CT2XInputError

Features = Union[np.ndarray, Tensor]  # (N, F)

INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")  # torch-fidelity's FID Inception weights
INCEPTION_FILES = (INCEPTION_URL.rsplit("/", 1)[1],  # torch-fidelity's name ...
                   "pt_inception-2015-12-05-6726825d.pth")  # ... and pytorch-fid's for the same weights
INCEPTION_NAME = "Inception-v3 pool3 (FID Inception, 2015-12-05 weights), 2048-d"
KID_SUBSETS, KID_SUBSET_SIZE, KID_SEED = 100, 1000, 2020  # torch-fidelity's defaults
RANDOM_FEATURE_PX = 128  # films are resized to this edge before the random network
RANDOM_WIDTHS = (16, 32, 64)  # channels of its stride-2 3x3 convolutions, before the last one (the features)


@dataclass(frozen=True)
class FeatureNetwork:
    """A feature network for FID and KID: `extract` maps films (N, 1, H, W) in [0, 1] to (N, F) features; `name`
    says which network it is, for reports (e.g. "Inception-v3 pool3 ..., 2048-d")."""

    name: str
    extract: Callable[[Tensor], Tensor]

    def features(self, films: Union[np.ndarray, Tensor], batch: int = 32, device: str = "cpu") -> np.ndarray:
        """(N, F) float64 features of films (N, H, W) or (N, 1, H, W) in [0, 1], `batch` films at a time."""
        films = torch.as_tensor(films, dtype=torch.float32)
        films = films[:, None] if films.dim() == 3 else films  # (N, 1, H, W)
        if films.dim() != 4 or films.shape[1] != 1 or len(films) == 0:
            raise CT2XInputError(f"features: need grey films (N, 1, H, W), got {tuple(films.shape)}")
        with torch.inference_mode():
            parts = [self.extract(films[start:start + batch].to(torch_device(device))).double().cpu()
                     for start in range(0, len(films), batch)]
        return torch.cat(parts).numpy()


def frechet_distance(features_a: Features, features_b: Features) -> float:
    """FID between two sets of features (N_a, F) and (N_b, F), each of at least two rows."""
    a, b = _feature_pair(features_a, features_b, minimum=2)
    mean_a, mean_b = a.mean(axis=0), b.mean(axis=0)  # (F,)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)  # (F, F), N - 1 in the denominator
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(values.clip(min=0))) @ vectors.T  # S_a^(1/2), symmetric
    product = np.linalg.eigvalsh(root_a @ cov_b @ root_a)  # eigenvalues of S_a^(1/2) S_b S_a^(1/2), >= 0 up to rounding
    trace_root = np.sqrt(product.clip(min=0)).sum()  # Tr((S_a S_b)^(1/2))
    return float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_root)


def polynomial_mmd2(features_a: Features, features_b: Features) -> float:
    """Unbiased squared MMD between (m, F) and (n, F) features with k(x, y) = (x . y / F + 1)^3:
    sum_{i != j} k(a_i, a_j) / (m (m - 1)) + sum_{i != j} k(b_i, b_j) / (n (n - 1))
    - 2 sum_{i, j} k(a_i, b_j) / (m n)."""
    a, b = _feature_pair(features_a, features_b, minimum=2)
    m, n, dims = len(a), len(b), a.shape[1]

    def kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return (x @ y.T / dims + 1.0) ** 3

    k_aa, k_bb = kernel(a, a), kernel(b, b)
    within_a = (k_aa.sum() - np.trace(k_aa)) / (m * (m - 1))  # off-diagonal pairs only: unbiased
    within_b = (k_bb.sum() - np.trace(k_bb)) / (n * (n - 1))
    return float(within_a + within_b - 2.0 * kernel(a, b).mean())


def kernel_inception_distance(features_a: Features, features_b: Features, subsets: int = KID_SUBSETS,
                              subset_size: int = KID_SUBSET_SIZE, seed: int = KID_SEED) -> Tuple[float, float, int]:
    """KID: (mean, standard deviation) of `polynomial_mmd2` over `subsets` random pairs of subsets (drawn without
    replacement) of min(`subset_size`, N_a, N_b) films each, and that size."""
    a, b = _feature_pair(features_a, features_b, minimum=2)
    size = min(subset_size, len(a), len(b))
    rng = np.random.RandomState(seed)  # torch-fidelity's generator and seed, for the same subsets
    values = [polynomial_mmd2(a[rng.choice(len(a), size, replace=False)], b[rng.choice(len(b), size, replace=False)])
              for _ in range(subsets)]
    return float(np.mean(values)), float(np.std(values)), size


def _feature_pair(features_a: Features, features_b: Features, minimum: int) -> Tuple[np.ndarray, np.ndarray]:
    pair = [np.asarray(torch.as_tensor(f).detach().cpu(), dtype=np.float64) for f in (features_a, features_b)]
    if any(f.ndim != 2 for f in pair) or pair[0].shape[1] != pair[1].shape[1]:
        raise CT2XInputError(f"FID/KID: need two feature sets (N, F) of one F, got {pair[0].shape} and {pair[1].shape}")
    if min(len(f) for f in pair) < minimum:
        raise CT2XInputError(f"FID/KID: need at least {minimum} films in each set, got {len(pair[0])} and "
                             f"{len(pair[1])}")
    if not all(np.isfinite(f).all() for f in pair):
        raise CT2XInputError("FID/KID: the features hold NaN or infinite values")
    return pair[0], pair[1]


def inception_features(device: str = "cpu") -> FeatureNetwork:
    """The FID Inception-v3's 2048-d pool3 features (torch-fidelity's code and weights) on `device`.

    CT2XInputError when torch-fidelity (or a torchvision matching torch) is not installed, or when its weight file
    is not on this computer (naming the file and where to put it).
    """
    network = _inception_network(str(torch_device(device)))

    def extract(films: Tensor) -> Tensor:  # (N, 1, H, W) in [0, 1] -> (N, 2048)
        rgb = (films.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1)  # (N, 3, H, W) 8-bit grey
        return network(rgb)[0]

    return FeatureNetwork(INCEPTION_NAME, extract)


def inception_weights() -> Path:
    """The FID Inception's weight file on this computer (torch-fidelity's or pytorch-fid's name, in torch.hub's
    checkpoint folder, where torch-fidelity would cache its download); CT2XInputError naming it when missing."""
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    for name in INCEPTION_FILES:
        if (folder / name).is_file():
            return folder / name
    raise CT2XInputError(f"FID/KID need the FID Inception weights, which are not on this computer (nothing is "
                         f"downloaded here): {folder / INCEPTION_FILES[0]} (download {INCEPTION_URL} on a computer "
                         "with internet and copy it there; $TORCH_HOME moves the folder), or use other features "
                         "(`ct2x evaluate synth --features random`)")


@functools.lru_cache(maxsize=None)
def _inception_network(device: str) -> nn.Module:
    weights = inception_weights()
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except (ImportError, RuntimeError) as error:  # RuntimeError: a torchvision built for another torch
        raise CT2XInputError(f"FID/KID with the Inception need the `torch-fidelity` package and a torchvision built "
                             f"for torch {torch.__version__} ({type(error).__name__}: {error}); pip install "
                             "\"ct2x[fid]\" with the torchvision release made for this torch, or use other features "
                             "(`ct2x evaluate synth --features random`)") from None
    network = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights))
    return network.to(device).eval().requires_grad_(False)


def random_features(dim: int = 64, seed: int = 0, device: str = "cpu") -> FeatureNetwork:
    """A fixed random convolutional feature network (`dim` features) on `device`: films resized to 128 x 128, four
    stride-2 3x3 convolutions (16, 32, 64, `dim` channels; He-normal weights drawn from `seed`, no bias), each
    followed by leaky ReLU 0.2, then the average over space (as Inception's pool3)."""
    generator = torch.Generator().manual_seed(seed)
    widths = (1,) + RANDOM_WIDTHS + (dim,)
    kernels: List[Tensor] = [
        torch.randn(widths[i + 1], widths[i], 3, 3, generator=generator) * (2.0 / (widths[i] * 9)) ** 0.5
        for i in range(len(widths) - 1)
    ]
    kernels = [kernel.to(torch_device(device)) for kernel in kernels]

    def extract(films: Tensor) -> Tensor:  # (N, 1, H, W) in [0, 1] -> (N, dim)
        x = F.interpolate(films * 2 - 1, size=(RANDOM_FEATURE_PX, RANDOM_FEATURE_PX), mode="bilinear",
                          align_corners=False, antialias=True)  # (N, 1, 128, 128) in [-1, 1]
        for kernel in kernels:
            x = F.leaky_relu(F.conv2d(x, kernel, stride=2, padding=1), 0.2)  # halves the edge: (N, dim, 8, 8) last
        return x.mean(dim=(2, 3))  # (N, dim)

    return FeatureNetwork(f"random conv features (seed {seed}), {dim}-d", extract)
