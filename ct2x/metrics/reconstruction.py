"""How close a reconstructed CT is to the real one: error, PSNR and SSIM, in plain and in X2CT-GAN's conventions.

Every function takes two volumes of the same (D, H, W) shape (numpy arrays or torch tensors) in X2CT's normalised
intensity: [0, 1] = HU -1024 ... 1476 (`ct2x.preprocess.x2ct_normalize`); values outside are clipped, as X2CT's test
does. Two families, never mixed in one report (`METRICS` names and explains each):

- plain: MAE, MSE, cosine similarity and PSNR on [0, 1] (peak 1); 3-D SSIM with an 11-voxel Gaussian window
  (sigma 1.5 voxels, Wang et al. 2004), computed over the whole volume.
- X2CT-GAN's (models.md §1.6): PSNR on the volume scaled to integers 0 ... 2500 with a peak of 4095 (which adds
  20 log10(4095 / 2500) = 4.29 dB to the plain PSNR), as one 3-D figure and as the mean of per-slice PSNRs along each
  axis; 2-D SSIM (7 x 7 uniform window, sample covariance) per slice along each axis, averaged over slices, then over
  the three axes. Slices that match exactly count as 100 dB.
"""

from __future__ import annotations

import math
from typing import Dict, Union

import numpy as np
import torch
import torch.nn.functional as F

from ct2x.errors import CT2XInputError

Volume = Union[np.ndarray, torch.Tensor]

X2CT_INTEGER_RANGE = 2500  # X2CT's test scales [0, 1] to integers 0 ... 2500 ...
X2CT_PEAK = 4095.0  # ... and measures PSNR against the 12-bit peak
EXACT_SLICE_PSNR_DB = 100.0  # X2CT's value for a slice with zero error
SSIM_K1, SSIM_K2 = 0.01, 0.03  # SSIM stabilising constants (times the data range 1)
GAUSSIAN_SIGMA_VOXELS = 1.5
GAUSSIAN_RADIUS_VOXELS = 5  # int(3.5 * sigma + 0.5): an 11-voxel window, as scikit-image and Wang et al.
X2CT_WINDOW = 7  # pixels per side of X2CT's uniform 2-D SSIM window (scikit-image's old default)

METRICS = {  # name -> what it is, for reports
    "mae": "mean absolute error on [0, 1] (1 = 2500 HU)",
    "mse": "mean squared error on [0, 1]",
    "cosine": "cosine similarity of the flattened [0, 1] volumes",
    "psnr": "PSNR on [0, 1], peak 1, whole volume (dB)",
    "ssim3d": "3-D SSIM, Gaussian window sigma 1.5 voxels, data range 1",
    "psnr_x2ct": "X2CT-GAN's PSNR: integers 0..2500, peak 4095, whole volume (dB; +4.29 dB against psnr)",
    "psnr_x2ct_3axis": "X2CT-GAN's PSNR-avg: per-slice PSNR (integers 0..2500, peak 4095) along D, H, W, averaged (dB)",
    "ssim2d_3axis": "X2CT-GAN's SSIM-avg: 2-D SSIM (7x7 uniform window) per slice along D, H, W, averaged",
}


def reconstruction_metrics(prediction: Volume, target: Volume) -> Dict[str, float]:
    """Every metric of `METRICS` for one (D, H, W) pair in [0, 1]."""
    prediction, target = _pair(prediction, target)
    return {name: float(function(prediction, target)) for name, function in _FUNCTIONS.items()}


def mae(prediction: Volume, target: Volume) -> float:
    prediction, target = _pair(prediction, target)
    return float((prediction - target).abs().mean())


def mse(prediction: Volume, target: Volume) -> float:
    prediction, target = _pair(prediction, target)
    return float(((prediction - target) ** 2).mean())


def cosine_similarity(prediction: Volume, target: Volume) -> float:
    prediction, target = _pair(prediction, target)
    return float(F.cosine_similarity(prediction.reshape(1, -1), target.reshape(1, -1), eps=1e-12)[0])


def psnr(prediction: Volume, target: Volume) -> float:
    """PSNR in dB on [0, 1] with peak 1 over the whole volume."""
    return _psnr_db(mse(prediction, target), peak=1.0)


def psnr_x2ct(prediction: Volume, target: Volume) -> float:
    """X2CT-GAN's psnr-3d: both volumes scaled to integers 0 ... 2500 (truncated, as `astype(int32)`), peak 4095."""
    prediction, target = (_x2ct_integers(v) for v in _pair(prediction, target))
    return _psnr_db(float(((prediction - target) ** 2).mean()), peak=X2CT_PEAK)


def psnr_x2ct_3axis(prediction: Volume, target: Volume) -> float:
    """X2CT-GAN's PSNR-avg: mean over D, H, W of the mean per-slice PSNR (integers 0 ... 2500, peak 4095)."""
    prediction, target = (_x2ct_integers(v) for v in _pair(prediction, target))
    squared = (prediction - target) ** 2  # (D, H, W)
    per_axis = []
    for axis in range(3):
        slice_mse = squared.mean(dim=[a for a in range(3) if a != axis])  # (n_slices,)
        per_axis.append(np.mean([_psnr_db(float(m), peak=X2CT_PEAK) for m in slice_mse]))
    return float(np.mean(per_axis))


def ssim3d(prediction: Volume, target: Volume) -> float:
    """3-D SSIM (Wang et al.): Gaussian window, sigma 1.5 voxels, 11 voxels wide, population covariance, range 1."""
    prediction, target = _pair(prediction, target)
    offsets = torch.arange(-GAUSSIAN_RADIUS_VOXELS, GAUSSIAN_RADIUS_VOXELS + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 * (offsets / GAUSSIAN_SIGMA_VOXELS) ** 2)
    weights = weights / weights.sum()  # (11,) normalised 1-D Gaussian

    def local_mean(volume: torch.Tensor) -> torch.Tensor:  # (D, H, W) -> (D-10, H-10, W-10), windows inside only
        out = volume[None, None]
        for axis in range(3):
            shape = [1, 1, 1, 1, 1]
            shape[2 + axis] = len(weights)
            out = F.conv3d(out, weights.reshape(shape).to(out))
        return out[0, 0]

    return float(_ssim_map(prediction, target, local_mean, sample_covariance_factor=1.0).mean())


def ssim2d_3axis(prediction: Volume, target: Volume) -> float:
    """X2CT-GAN's SSIM-avg: per-slice 2-D SSIM (7 x 7 uniform window, sample covariance) along D, H and W, averaged."""
    prediction, target = _pair(prediction, target)
    window_pixels = X2CT_WINDOW ** 2

    def local_mean(slices: torch.Tensor) -> torch.Tensor:  # (n, h, w) -> (n, h-6, w-6), windows inside only
        return F.avg_pool2d(slices[:, None], X2CT_WINDOW, stride=1)[:, 0]

    per_axis = []
    for axis in range(3):
        slices_p, slices_t = prediction.movedim(axis, 0), target.movedim(axis, 0)  # (n_slices, h, w)
        ssim_map = _ssim_map(slices_p, slices_t, local_mean, window_pixels / (window_pixels - 1))
        per_axis.append(ssim_map.mean(dim=(1, 2)).mean())  # mean over each slice, then over slices
    return float(torch.stack(per_axis).mean())


def _ssim_map(x: torch.Tensor, y: torch.Tensor, local_mean, sample_covariance_factor: float) -> torch.Tensor:
    """SSIM at every window position lying wholly inside the volume (data range 1)."""
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2
    mean_x, mean_y = local_mean(x), local_mean(y)
    var_x = sample_covariance_factor * (local_mean(x * x) - mean_x ** 2)
    var_y = sample_covariance_factor * (local_mean(y * y) - mean_y ** 2)
    cov_xy = sample_covariance_factor * (local_mean(x * y) - mean_x * mean_y)
    return ((2 * mean_x * mean_y + c1) * (2 * cov_xy + c2)) / ((mean_x ** 2 + mean_y ** 2 + c1) * (var_x + var_y + c2))


def _pair(prediction: Volume, target: Volume):
    """Both volumes as float64 (D, H, W) tensors clipped to [0, 1], or CT2XInputError."""
    volumes = [torch.as_tensor(v).detach().to("cpu", torch.float64).squeeze() for v in (prediction, target)]
    if volumes[0].shape != volumes[1].shape or volumes[0].dim() != 3:
        raise CT2XInputError(f"metrics: need two (D, H, W) volumes of one shape, got {tuple(volumes[0].shape)} and "
                             f"{tuple(volumes[1].shape)}")
    if min(volumes[0].shape) <= 2 * GAUSSIAN_RADIUS_VOXELS:
        raise CT2XInputError(f"metrics: volumes of {tuple(volumes[0].shape)} voxels are too small for the "
                             f"{2 * GAUSSIAN_RADIUS_VOXELS + 1}-voxel SSIM window")
    return tuple(v.clamp(0.0, 1.0) for v in volumes)


def _x2ct_integers(volume: torch.Tensor) -> torch.Tensor:
    return torch.floor(volume * X2CT_INTEGER_RANGE)


def _psnr_db(mean_squared_error: float, peak: float) -> float:
    return EXACT_SLICE_PSNR_DB if mean_squared_error == 0 else 10.0 * math.log10(peak ** 2 / mean_squared_error)


_FUNCTIONS = {"mae": mae, "mse": mse, "cosine": cosine_similarity, "psnr": psnr, "ssim3d": ssim3d,
              "psnr_x2ct": psnr_x2ct, "psnr_x2ct_3axis": psnr_x2ct_3axis, "ssim2d_3axis": ssim2d_3axis}
