"""How close a synthesised film is to its reference film: PSNR and SSIM on [0, 1], as scikit-image computes them.

Every function takes two films of the same (H, W) shape (numpy arrays or torch tensors, a leading axis of 1 allowed)
in [0, 1], bone bright, as `ct2x prepare synth` stores its DRRs; values outside are clipped.

- PSNR: 10 log10(1 / MSE) over the whole film (peak 1, `skimage.metrics.peak_signal_noise_ratio` with
  data_range=1); films that match exactly count as 100 dB (as in `ct2x.metrics.reconstruction`), not infinity.
- SSIM: `skimage.metrics.structural_similarity(..., data_range=1)` with its defaults: a 7 x 7 uniform window, sample
  covariance, K1 = 0.01, K2 = 0.03, the mean over the window positions lying wholly inside the film.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F

from ct2x.errors import CT2XInputError
from ct2x.metrics.reconstruction import Volume, _psnr_db, _ssim_map

SKIMAGE_WINDOW = 7  # pixels per side of scikit-image's default uniform SSIM window

FILM_METRICS = {  # name -> what it is, for reports
    "psnr": "PSNR on [0, 1], peak 1, whole film (dB; scikit-image's, 100 dB for identical films)",
    "ssim": "SSIM with scikit-image's defaults: 7x7 uniform window, sample covariance, data range 1",
}


def film_psnr(prediction: Volume, target: Volume) -> float:
    """PSNR in dB of two (H, W) films in [0, 1] with peak 1; 100 dB when they are equal."""
    prediction, target = _film_pair(prediction, target)
    return _psnr_db(float(((prediction - target) ** 2).mean()), peak=1.0)


def film_ssim(prediction: Volume, target: Volume) -> float:
    """SSIM of two (H, W) films in [0, 1], as `skimage.metrics.structural_similarity(p, t, data_range=1)`."""
    prediction, target = _film_pair(prediction, target)
    if min(prediction.shape) < SKIMAGE_WINDOW:
        raise CT2XInputError(f"SSIM: films must be at least {SKIMAGE_WINDOW} pixels per side, got "
                             f"{tuple(prediction.shape)}")
    window_pixels = SKIMAGE_WINDOW ** 2

    def local_mean(film: torch.Tensor) -> torch.Tensor:  # (H, W) -> (H-6, W-6), windows inside only
        return F.avg_pool2d(film[None, None], SKIMAGE_WINDOW, stride=1)[0, 0]

    return float(_ssim_map(prediction, target, local_mean, window_pixels / (window_pixels - 1)).mean())


def film_metrics(prediction: Volume, target: Volume) -> Dict[str, float]:
    """Every metric of `FILM_METRICS` for one pair of (H, W) films in [0, 1]."""
    return {"psnr": film_psnr(prediction, target), "ssim": film_ssim(prediction, target)}


def _film_pair(prediction: Volume, target: Volume) -> Tuple[torch.Tensor, torch.Tensor]:
    """Both films as float64 (H, W) tensors clipped to [0, 1], or CT2XInputError."""
    films = [torch.as_tensor(f).detach().to("cpu", torch.float64).squeeze() for f in (prediction, target)]
    if films[0].shape != films[1].shape or films[0].dim() != 2:
        raise CT2XInputError(f"film metrics: need two (H, W) films of one shape, got {tuple(films[0].shape)} and "
                             f"{tuple(films[1].shape)}")
    return films[0].clamp(0, 1), films[1].clamp(0, 1)

