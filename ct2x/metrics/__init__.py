"""Metrics of CT2X's models; each report names the convention it uses (see `reconstruction.METRICS`)."""

from ct2x.metrics.reconstruction import (
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

__all__ = ["METRICS", "cosine_similarity", "mae", "mse", "psnr", "psnr_x2ct", "psnr_x2ct_3axis",
           "reconstruction_metrics", "ssim2d_3axis", "ssim3d"]
