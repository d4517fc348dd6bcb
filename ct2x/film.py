"""Film processing: float attenuation -> an 8-bit film that looks like a clinical radiograph's "for presentation" image.

A detector's raw log signal is never shown as is: clinical systems scale each exposure to its own range, equalise
local contrast, enhance edges with a large-kernel unsharp mask and apply a tone curve. `process_film` does the same
to one DRR attenuation image -ln(I / I_open) (already the logarithmic detector response): bone bright, air outside
the body black, every view using the full grey range. The float attenuation itself is never changed.

Display modes: "processed" (this module, the default) and "linear" (`ct2x.drr.to_display` with one window for a
series, which keeps grey levels comparable between views).

Every kernel is given in mm in the plane of `pixel_spacing_mm` (the detector's spacing, as in
`View.detector.pixel_spacing_mm`), so a film looks the same at any detector resolution.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk
import torch

from .errors import CT2XInputError

DISPLAY_MODES: Tuple[str, ...] = ("processed", "linear")
DEFAULT_DISPLAY_MODE = "processed"

HISTOGRAM_BINS = 256  # grey levels of the local-equalisation histograms
MIN_RANGE = 1e-3  # smallest attenuation range mapped to the full grey scale (as `ct2x.drr.auto_window`)
MIN_BLUR_PIXELS = 4  # SimpleITK's recursive Gaussian needs this many pixels along each axis
GAMMA_LIMITS = (0.5, 2.0)  # the mid-grey gamma stays within these, however dark or bright the body


@dataclass(frozen=True)
class FilmProcessing:
    """Settings of `process_film`. Attenuation values are -ln(I / I_open) (unitless); lengths in mm."""

    body_min_attenuation: float = 0.05  # pixels above this are the body; the rest is air, shown black
    range_percentiles: Tuple[float, float] = (0.5, 99.5)  # body attenuation percentiles shown as black and white
    equalisation_tile_mm: float = 80.0  # edge of the local-equalisation (CLAHE) tiles, mm
    equalisation_clip: float = 2.0  # CLAHE clip limit, in multiples of a tile's mean histogram count (1 = none)
    equalisation_weight: float = 0.5  # share of the equalised image in the blend with its input (0 = off)
    unsharp_sigma_mm: float = 20.0  # Gaussian sigma of the unsharp mask's blur, mm
    unsharp_gain: float = 0.6  # edge enhancement: image + gain * (image - blurred image); 0 = off
    mid_grey: float = 0.55  # display level (0..1) of the body's median after processing, set by a gamma
    contrast: float = 1.0  # slope of the final S-curve (tanh); 0 = straight line

    def __post_init__(self) -> None:
        low, high = self.range_percentiles
        problems = [
            (0 <= low < high <= 100, f"range_percentiles={self.range_percentiles}: need 0 <= low < high <= 100"),
            (self.equalisation_tile_mm > 0 and self.unsharp_sigma_mm > 0, "kernel sizes must be positive (mm)"),
            (self.equalisation_clip >= 1, f"equalisation_clip={self.equalisation_clip}: must be at least 1"),
            (0 <= self.equalisation_weight <= 1, f"equalisation_weight={self.equalisation_weight}: must be 0..1"),
            (self.unsharp_gain >= 0 and self.contrast >= 0, "unsharp_gain and contrast must not be negative"),
            (0 < self.mid_grey < 1, f"mid_grey={self.mid_grey}: must lie strictly between 0 and 1"),
        ]
        for ok, message in problems:
            if not ok:
                raise CT2XInputError(f"film processing: {message}")

    def describe(self) -> dict:
        """JSON-serialisable record of these settings."""
        return {"display": "processed", **asdict(self)}


def process_film(attenuation: np.ndarray, pixel_spacing_mm: Union[float, Sequence[float]],
                 settings: Optional[FilmProcessing] = None) -> np.ndarray:
    """(H, W) attenuation -ln(I / I_open) -> (H, W) uint8 processed film, bone bright, air black.

    `pixel_spacing_mm`: one spacing or (column, row) spacings, mm. Steps, each on the body (pixels above
    `settings.body_min_attenuation`) only: scale the body's percentile range to 0..1, equalise local contrast
    (CLAHE, tiles `equalisation_tile_mm` wide), unsharp-mask with a `unsharp_sigma_mm` Gaussian, bring the body's
    median to `mid_grey` with a gamma, apply an S-curve. `settings` default: `FilmProcessing()`. Deterministic;
    non-finite input counts as air (NaN, -inf) or as the densest pixel (+inf).
    """
    settings = settings or FilmProcessing()
    image = _finite(np.asarray(attenuation, dtype=np.float32))
    if image.ndim != 2:
        raise CT2XInputError(f"attenuation must be a 2-D (H, W) image, got shape {image.shape}")
    spacing = _spacing_column_row(pixel_spacing_mm)
    body = image > settings.body_min_attenuation
    if not body.any():
        return np.zeros(image.shape, dtype=np.uint8)

    low, high = np.percentile(image[body], settings.range_percentiles)
    film = np.clip((image - low) / max(high - low, MIN_RANGE), 0.0, 1.0)
    if settings.equalisation_weight > 0:
        equalised = _equalise_locally(film, body, spacing, settings.equalisation_tile_mm, settings.equalisation_clip)
        film = (1.0 - settings.equalisation_weight) * film + settings.equalisation_weight * equalised
    if settings.unsharp_gain > 0:
        film = film + settings.unsharp_gain * (film - _blur_inside(film, body, spacing, settings.unsharp_sigma_mm))
    film = np.clip(film, 0.0, 1.0)
    median = float(np.clip(np.median(film[body]), 0.01, 0.99))
    film = film ** float(np.clip(np.log(settings.mid_grey) / np.log(median), *GAMMA_LIMITS))
    if settings.contrast > 0:
        film = 0.5 + 0.5 * np.tanh(settings.contrast * (film - 0.5)) / np.tanh(0.5 * settings.contrast)
    film[~body] = 0.0
    return np.round(np.clip(film, 0.0, 1.0) * 255.0).astype(np.uint8)


def _finite(image: np.ndarray) -> np.ndarray:
    """NaN and -inf -> 0 (air), +inf -> the largest finite value (or 0 when there is none)."""
    finite = np.isfinite(image)
    if finite.all():
        return image
    densest = float(image[finite].max()) if finite.any() else 0.0
    return np.nan_to_num(image, nan=0.0, posinf=densest, neginf=0.0)


def _spacing_column_row(pixel_spacing_mm: Union[float, Sequence[float]]) -> Tuple[float, float]:
    """(column, row) spacing in mm from one number or a pair; both must be positive and finite."""
    values = np.asarray(pixel_spacing_mm, dtype=np.float64).ravel()
    if values.size == 1:
        values = np.repeat(values, 2)
    if not (values.size == 2 and np.isfinite(values).all() and (values > 0).all()):
        raise CT2XInputError(f"pixel spacing {pixel_spacing_mm} mm: give one or two (column, row) positive finite "
                             "numbers")
    return float(values[0]), float(values[1])


def _blur_inside(image: np.ndarray, body: np.ndarray, spacing: Tuple[float, float], sigma_mm: float) -> np.ndarray:
    """Gaussian blur (sigma in mm) that averages body pixels only (normalised convolution): no halo at the skin."""
    if min(image.shape) < MIN_BLUR_PIXELS:
        return np.full(image.shape, image[body].mean(), dtype=np.float32)  # the kernel dwarfs such an image

    def blur(values: np.ndarray) -> np.ndarray:
        itk_image = sitk.GetImageFromArray(values.astype(np.float32))
        itk_image.SetSpacing(spacing)
        return sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(itk_image, sigma_mm))

    weight = body.astype(np.float32)
    return blur(image * weight) / np.maximum(blur(weight), 1e-6)


def _equalise_locally(image: np.ndarray, body: np.ndarray, spacing: Tuple[float, float], tile_mm: float,
                      clip_limit: float) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation of `image` (0..1) from body pixels' histograms.

    Tiles of about `tile_mm`; each tile's histogram is clipped at `clip_limit` times its mean count (the excess
    spread evenly) and its cumulative sum is the tile's mapping; mappings are interpolated between tile centres and
    between histogram bins. A tile without body pixels uses the whole body's histogram.
    """
    height, width = image.shape
    tiles_y = max(1, int(round(height * spacing[1] / tile_mm)))
    tiles_x = max(1, int(round(width * spacing[0] / tile_mm)))
    tile_of_row = np.minimum(np.arange(height) * tiles_y // height, tiles_y - 1)
    tile_of_column = np.minimum(np.arange(width) * tiles_x // width, tiles_x - 1)
    tile = tile_of_row[:, None] * tiles_x + tile_of_column[None, :]  # (H, W) tile index
    grey_bin = np.minimum((image * HISTOGRAM_BINS).astype(np.int64), HISTOGRAM_BINS - 1)
    histograms = np.bincount((tile * HISTOGRAM_BINS + grey_bin)[body], minlength=tiles_y * tiles_x * HISTOGRAM_BINS)
    histograms = histograms.reshape(tiles_y * tiles_x, HISTOGRAM_BINS).astype(np.float64)
    counts = histograms.sum(axis=1, keepdims=True)
    histograms = np.where(counts > 0, histograms, histograms.sum(axis=0, keepdims=True))
    limit = clip_limit * histograms.sum(axis=1, keepdims=True) / HISTOGRAM_BINS
    excess = np.maximum(histograms - limit, 0.0).sum(axis=1, keepdims=True)
    histograms = np.minimum(histograms, limit) + excess / HISTOGRAM_BINS
    mapping = np.concatenate([np.zeros((tiles_y * tiles_x, 1)), np.cumsum(histograms, axis=1)], axis=1)
    mapping /= mapping[:, -1:]  # (tiles, bins + 1): value at each bin edge, 0..1

    def tile_coordinate(size: int, tiles: int) -> np.ndarray:
        """Pixel centres in grid_sample's -1..1 coordinates, tile centres at the nodes (clamped at the edges)."""
        if tiles == 1:
            return np.zeros(size)
        position = (np.arange(size) + 0.5) * tiles / size - 0.5  # in tile-centre units
        return np.clip(position, 0, tiles - 1) / (tiles - 1) * 2.0 - 1.0

    grid = np.stack([image * 2.0 - 1.0,  # x: histogram bin edges, 0..1 -> -1..1
                     np.broadcast_to(tile_coordinate(width, tiles_x)[None, :], image.shape),  # y: tile column
                     np.broadcast_to(tile_coordinate(height, tiles_y)[:, None], image.shape)], axis=-1)  # z: tile row
    lookup = torch.from_numpy(mapping.reshape(1, 1, tiles_y, tiles_x, HISTOGRAM_BINS + 1)).float()
    equalised = torch.nn.functional.grid_sample(lookup, torch.from_numpy(grid[None, None]).float(), mode="bilinear",
                                                padding_mode="border", align_corners=True)
    return equalised[0, 0, 0].numpy()
