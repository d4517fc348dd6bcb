"""A CT volume: Hounsfield units on a voxel grid placed in patient RAS space (see ``ct2x.conventions``)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import SimpleITK as sitk

from ct2x.conventions import (
    affine_from_sitk,
    sitk_geometry_from_affine,
    spacing_from_affine,
    voxel_to_world,
)
from ct2x.errors import CT2XInputError, CT2XWarning

MIN_VOXELS_PER_AXIS = 8
AIR_ABOVE_HU = -500.0  # a CT has air (about -1000 HU) somewhere: its minimum must be below this
DENSE_BELOW_HU = -200.0  # ... and something denser than fat (about -100 HU): its maximum must be above this
# No CT stores values beyond the 16-bit range: DICOM CT pixels are 16-bit, extended-scale scanners reach about
# 30700 HU for metal and padding outside the field of view goes down to -32768. 10 % more allows for the overshoot
# of B-spline resampling; anything beyond is a wrong rescale slope (e.g. values x 1000) or damaged data.
STORABLE_HU = (-36000.0, 36000.0)
# Air is -1000 HU by definition; noise and beam hardening move it by tens of HU, a wrong rescale slope by hundreds.
AIR_BELOW_HU_DOUBTED = -1500.0  # warn when the typical air voxel lies below this
# Voxel spacing in mm. Refused outside: no CT of a body has voxels finer than 10 um (micro-CT of small animals goes
# down to about that) or coarser than 100 mm (a 32-voxel preview of a 2 m whole-body scan has 63 mm voxels); such
# spacings come from a unit error (metres, micrometres) or a damaged header.
SPACING_MM_POSSIBLE = (0.01, 100.0)
# Warned outside: clinical CT reconstructs 0.2 to 10 mm voxels; downsampled volumes reach a few mm more.
SPACING_MM_USUAL = (0.1, 20.0)
SAMPLE_VOXELS = 1 << 20  # statistics of the values (air level, HU + 1024 detection) use about this many voxels

STORED_VALUES = ("auto", "hu", "hu+1024")  # how stored values relate to HU (see ``interpret_stored_values``)
HU_PLUS_1024_OFFSET = 1024.0  # X2CT-GAN's files and some NIfTI exports store HU + 1024, int16 without a rescale
# HU + 1024 is recognised (stored units) by air near 0 and soft tissue near 1024 with nothing as low as HU air:
STORED_AIR_BELOW = 300.0  # air and lung, below about -724 HU
STORED_TISSUE = (924.0, 1174.0)  # fat to blood, -100..150 HU
STORED_TISSUE_PEAK = (974.0, 1124.0)  # where the soft-tissue peak lies, -50..100 HU
MIN_AIR_FRACTION = 0.01  # of the voxels; real scans have far more (the 8 HNSCC volumes: 71 to 87 %)
MIN_TISSUE_FRACTION = 0.02  # (the HNSCC volumes: 7 to 18 %)
TISSUE_BIN = 10.0  # stored units per histogram bin when locating the soft-tissue peak


def interpret_stored_values(
    values: np.ndarray, stored_values: str = "auto", source: str = ""
) -> Tuple[np.ndarray, float]:
    """(HU as float32, offset) from stored voxel values; HU = stored - offset.

    ``stored_values``: "hu" keeps the values; "hu+1024" subtracts 1024 (offset 1024); "auto" subtracts 1024 with a
    CT2XWarning when the values look like HU + 1024 (air near 0, soft tissue near 1024, nothing as low as HU air),
    else keeps them. Arrays that are not real numbers are returned unchanged for ``validate_ct`` to refuse.
    """
    check_stored_values(stored_values)
    values = np.asarray(values)
    if values.dtype.kind not in "biuf":
        return values, 0.0
    if stored_values == "auto":
        evidence = hu_plus_1024_evidence(values)
        if evidence is None:
            stored_values = "hu"
        else:
            warnings.warn(
                f"{source or 'volume'}: stored values look like HU + 1024, not HU ({evidence}); converted to HU by "
                "subtracting 1024. If they are HU already, say so: stored_values='hu' (command line: "
                "--stored-values hu).",
                CT2XWarning,
                stacklevel=2,
            )
    if stored_values == "hu":
        return np.asarray(values, dtype=np.float32), 0.0
    return np.asarray(values, dtype=np.float32) - np.float32(HU_PLUS_1024_OFFSET), HU_PLUS_1024_OFFSET


def check_stored_values(stored_values: str) -> None:
    """Refuse a ``stored_values`` option that is not one of STORED_VALUES."""
    if stored_values not in STORED_VALUES:
        raise CT2XInputError(f"stored_values={stored_values!r}: choose one of {', '.join(map(repr, STORED_VALUES))}.")


def hu_plus_1024_evidence(values: np.ndarray) -> Optional[str]:
    """Why ``values`` look like HU + 1024 (a phrase for messages), or None when they do not."""
    values = np.asarray(values)
    if values.dtype.kind not in "iuf" or values.size == 0:
        return None
    sample = _sample(values).astype(np.float32)
    if not np.all(np.isfinite(sample)):
        return None
    lowest = float(np.min(values))
    if lowest <= AIR_ABOVE_HU:
        return None  # holds HU air
    air_fraction = float(np.mean(sample < STORED_AIR_BELOW))
    tissue = sample[(sample >= STORED_TISSUE[0]) & (sample <= STORED_TISSUE[1])]
    if air_fraction < MIN_AIR_FRACTION or tissue.size < MIN_TISSUE_FRACTION * sample.size:
        return None
    counts = np.bincount(((tissue - STORED_TISSUE[0]) // TISSUE_BIN).astype(np.int64))
    peak = STORED_TISSUE[0] + (int(np.argmax(counts)) + 0.5) * TISSUE_BIN  # stored units
    if not STORED_TISSUE_PEAK[0] <= peak <= STORED_TISSUE_PEAK[1]:
        return None
    return (
        f"lowest value {lowest:g}, {100 * air_fraction:.0f} % of voxels below {STORED_AIR_BELOW:g} (air) and "
        f"soft tissue peaking at {peak:g}, {peak - HU_PLUS_1024_OFFSET:+g} HU once 1024 is subtracted"
    )


def validate_ct(hu: np.ndarray, affine: np.ndarray, source: str = "") -> np.ndarray:
    """Return ``hu`` as a float32 (K, J, I) array (no copy if it already is one) or raise CT2XInputError.

    A 4-D array with a leading or trailing singleton axis is squeezed to 3-D. ``source`` names the input in messages.
    Refuses what no CT can be (see STORABLE_HU, SPACING_MM_POSSIBLE); warns (CT2XWarning) about unusual spacing and
    about air far below -1000 HU (a wrong rescale slope).
    """
    name = source or "CT volume"
    _validate_affine(affine, name)
    _validate_spacing(spacing_from_affine(np.asarray(affine, dtype=np.float64)), name)
    hu = np.asarray(hu)
    if hu.ndim == 4 and 1 in (hu.shape[0], hu.shape[-1]):
        hu = hu[0] if hu.shape[0] == 1 else hu[..., 0]
    if hu.ndim != 3:
        raise CT2XInputError(
            f"{name}: is a {hu.ndim}-D array (shape {hu.shape}); CT2X needs one 3-D CT volume (K, J, I). "
            "For a 2-D image use the X-ray tools; for a 4-D CT choose one phase."
        )
    if min(hu.shape) < MIN_VOXELS_PER_AXIS:
        raise CT2XInputError(
            f"{name}: has only {min(hu.shape)} voxels along an axis (shape_ijk {hu.shape[::-1]}); "
            f"CT2X needs at least {MIN_VOXELS_PER_AXIS} along each axis. Is it a single slice or a thin slab?"
        )
    if hu.dtype.kind not in "biuf":  # bool, signed, unsigned, float
        raise CT2XInputError(f"{name}: voxel type {hu.dtype} is not a real number; a CT holds Hounsfield units.")
    hu = np.asarray(hu, dtype=np.float32)
    if not np.all(np.isfinite(hu)):
        n_nan, n_pos_inf = int(np.count_nonzero(np.isnan(hu))), int(np.count_nonzero(hu == np.inf))
        raise non_finite_error(name, n_nan, n_pos_inf, int(np.count_nonzero(hu == -np.inf)), hu.size)
    lo, hi = float(hu.min()), float(hu.max())
    _validate_hu_range(hu, lo, hi, name)
    if lo >= 0.0 and hi <= 1.0 and np.all((hu == 0.0) | (hu == 1.0)):
        reason = "only the values 0 and 1"
    elif lo > AIR_ABOVE_HU:
        evidence = hu_plus_1024_evidence(hu)
        if evidence is not None:
            raise CT2XInputError(
                f"{name}: values look like HU + 1024, not HU ({evidence}); subtract 1024 first "
                "(CTVolume(hu=values - 1024, ...)), or read the file with load_ct or volume_from_vtk, which convert "
                "such values (stored_values='auto' or 'hu+1024')."
            )
        reason = f"no air: nothing below {AIR_ABOVE_HU:g} HU"
    elif hi < DENSE_BELOW_HU:
        reason = f"nothing denser than fat: nothing above {DENSE_BELOW_HU:g} HU"
    else:
        _warn_if_air_misplaced(hu, name)
        return hu
    raise CT2XInputError(
        f"{name}: does not look like a CT in Hounsfield units (range {lo:g}..{hi:g}; {reason}); "
        "is it an MR, a mask or a normalised image? CT2X needs HU (air about -1000, water 0)."
    )


def non_finite_error(name: str, n_nan: int, n_pos_inf: int, n_neg_inf: int, n_voxels: int) -> CT2XInputError:
    """The refusal of a volume with NaN or infinite voxels, with their counts."""
    kinds = ", ".join(f"{n} {kind}" for n, kind in ((n_nan, "NaN"), (n_pos_inf, "+inf"), (n_neg_inf, "-inf")) if n)
    return CT2XInputError(
        f"{name}: has {n_nan + n_pos_inf + n_neg_inf} non-finite values (NaN or inf) of {n_voxels} ({kinds}); "
        "replace them (e.g. by -1024 HU, air) first."
    )


def _validate_hu_range(hu: np.ndarray, lo: float, hi: float, name: str) -> None:
    if STORABLE_HU[0] <= lo and hi <= STORABLE_HU[1]:
        return
    n_low = int(np.count_nonzero(hu < STORABLE_HU[0]))
    n_high = int(np.count_nonzero(hu > STORABLE_HU[1]))
    beyond = " and ".join(
        text for n, text in ((n_low, f"{n_low} below {STORABLE_HU[0]:g} HU (down to {lo:g})"),
                             (n_high, f"{n_high} above {STORABLE_HU[1]:g} HU (up to {hi:g})")) if n
    )
    raise CT2XInputError(
        f"{name}: has {beyond} of {hu.size} voxels, beyond what any CT stores (16-bit values; extended-scale "
        "scanners reach about 30000 HU for metal). Is the rescale slope wrong (e.g. values x 1000) or the data "
        "damaged? Check the file's rescale slope and intercept."
    )


def _warn_if_air_misplaced(hu: np.ndarray, name: str) -> None:
    """Warn when the typical air voxel is far below -1000 HU (values scaled by a wrong rescale slope)."""
    low = _sample(hu)
    low = low[low < AIR_ABOVE_HU]
    if low.size == 0:
        return
    values, counts = np.unique(low, return_counts=True)
    padding = values[np.argmax(counts)]  # padding outside the field of view is one value; real air is noisy
    if counts.max() < low.size:
        low = low[low != padding]
    air_hu = float(np.median(low))
    if air_hu < AIR_BELOW_HU_DOUBTED:
        warnings.warn(
            f"{name}: air lies at about {air_hu:.0f} HU (median of the voxels below {AIR_ABOVE_HU:g} HU, padding "
            "left out) instead of about -1000 HU: are the values scaled by a wrong rescale slope? They are used as "
            "they are, so the X-rays will be too dense; check the file's rescale slope and intercept.",
            CT2XWarning,
            stacklevel=3,
        )


def _validate_spacing(spacing_ijk: np.ndarray, name: str) -> None:
    """Refuse voxel spacings no CT has, warn about unusual ones; ``spacing_ijk`` (3,) mm."""
    text = ", ".join(f"{s:.6g}" for s in spacing_ijk)
    for axis, spacing in zip("ijk", spacing_ijk.tolist()):
        if spacing > SPACING_MM_POSSIBLE[1]:
            raise CT2XInputError(
                f"{name}: voxel spacing ({text}) mm along (i, j, k): {spacing:.6g} mm along {axis} is coarser than "
                f"any CT ({SPACING_MM_POSSIBLE[1]:g} mm at most); is the spacing in micrometres or the header "
                "damaged? Fix the spacing in the file's header."
            )
        if spacing < SPACING_MM_POSSIBLE[0]:
            raise CT2XInputError(
                f"{name}: voxel spacing ({text}) mm along (i, j, k): {spacing:.6g} mm along {axis} is finer than "
                f"any CT ({SPACING_MM_POSSIBLE[0]:g} mm at least); is the spacing in metres or the header damaged? "
                "Fix the spacing in the file's header."
            )
    usual_low, usual_high = SPACING_MM_USUAL
    unusual = [axis for axis, s in zip("ijk", spacing_ijk.tolist()) if not usual_low <= s <= usual_high]
    if unusual:
        warnings.warn(
            f"{name}: voxel spacing ({text}) mm along (i, j, k) is unusual for a CT along {', '.join(unusual)} "
            f"(clinical scans have {SPACING_MM_USUAL[0]:g} to {SPACING_MM_USUAL[1]:g} mm); is the spacing in "
            "centimetres, or the header wrong? It is used as it is.",
            CT2XWarning,
            stacklevel=3,
        )


def _sample(values: np.ndarray) -> np.ndarray:
    """About SAMPLE_VOXELS values of ``values``, evenly strided over the flattened array (odd stride)."""
    flat = values.reshape(-1)
    return flat[:: max(1, flat.size // SAMPLE_VOXELS) | 1]


def _validate_affine(affine: np.ndarray, name: str) -> None:
    affine = np.asarray(affine)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise CT2XInputError(f"{name}: affine must be a finite 4x4 matrix (ijk -> RAS mm), got shape {affine.shape}.")
    if not np.allclose(affine[3], [0.0, 0.0, 0.0, 1.0]):
        raise CT2XInputError(f"{name}: affine's last row is {affine[3].tolist()}, expected [0, 0, 0, 1].")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise CT2XInputError(
            f"{name}: affine is singular (zero spacing or parallel axes): {affine[:3, :3].tolist()}; "
            "check the file's spacing and direction."
        )


@dataclass(eq=False)
class CTVolume:
    """A CT in Hounsfield units with its placement in patient space.

    Args:
        hu: float32 (K, J, I) array in HU (``hu[k, j, i]``); not copied when it already is float32.
        affine: float64 (4, 4) voxel index (i, j, k, 1) -> RAS mm.
        source: path or description of where the volume came from, used in messages.
        stored_offset_hu: what the input's stored values added to HU (1024 for files holding HU + 1024, see
            ``interpret_stored_values``); 0 when they were HU. Recorded so callers can report the conversion.
    """

    hu: np.ndarray
    affine: np.ndarray
    source: str = ""
    stored_offset_hu: float = 0.0

    def __post_init__(self) -> None:
        self.hu = validate_ct(self.hu, self.affine, self.source)
        self.affine = np.array(self.affine, dtype=np.float64)  # own copy: callers may reuse theirs

    def __repr__(self) -> str:
        spacing = tuple(round(s, 4) for s in self.spacing_mm.tolist())
        offset = f", stored_offset_hu={self.stored_offset_hu:g}" if self.stored_offset_hu else ""
        return f"CTVolume(shape_ijk={self.shape_ijk}, spacing_mm={spacing}, source={self.source!r}{offset})"

    @property
    def shape_ijk(self) -> Tuple[int, int, int]:
        """Number of voxels along i, j, k."""
        k, j, i = self.hu.shape
        return (i, j, k)

    @property
    def spacing_mm(self) -> np.ndarray:
        """(3,) voxel spacing in mm along i, j, k."""
        return spacing_from_affine(self.affine)

    @property
    def center_ras(self) -> np.ndarray:
        """(3,) RAS mm of the grid's geometric centre, voxel index ((n - 1) / 2) along each axis."""
        center_ijk = (np.array(self.shape_ijk, dtype=np.float64) - 1.0) / 2.0  # (3,) voxel index
        return voxel_to_world(self.affine, center_ijk[None])[0]

    @property
    def extent_mm(self) -> np.ndarray:
        """(3,) physical size in mm along i, j, k covered by the voxels (voxel count x spacing)."""
        return np.array(self.shape_ijk, dtype=np.float64) * self.spacing_mm

    def to_sitk(self) -> sitk.Image:
        """A float32 SimpleITK image (LPS geometry) holding a copy of the HU values."""
        image = sitk.GetImageFromArray(self.hu)
        origin, spacing, direction = sitk_geometry_from_affine(self.affine)
        image.SetOrigin(origin)
        image.SetSpacing(spacing)
        image.SetDirection(direction)
        return image

    @classmethod
    def from_sitk(cls, image: sitk.Image, source: str = "", stored_values: str = "auto") -> CTVolume:
        """A CTVolume from a scalar 3-D SimpleITK image (a 4-D one with a single time point is accepted).

        ``stored_values``: how the voxel values relate to HU, see ``interpret_stored_values``.
        """
        name = source or "image"
        if image.GetNumberOfComponentsPerPixel() != 1:
            raise CT2XInputError(
                f"{name}: has {image.GetNumberOfComponentsPerPixel()} components per voxel (colour or vector "
                "image); a CT has one Hounsfield value per voxel."
            )
        if image.GetDimension() == 4 and image.GetSize()[3] == 1:
            image = sitk.Extract(image, list(image.GetSize()[:3]) + [0], [0, 0, 0, 0])  # drop the time axis
        if image.GetDimension() != 3:
            raise CT2XInputError(
                f"{name}: is a {image.GetDimension()}-D image (size {image.GetSize()}); CT2X needs one 3-D CT volume. "
                "For a 2-D image use the X-ray tools; for a 4-D CT choose one phase."
            )
        values = sitk.GetArrayFromImage(image)  # (K, J, I) stored values
        hu, offset = interpret_stored_values(values, stored_values, name)  # (K, J, I) float32 HU
        return cls(hu=hu, affine=affine_from_sitk(image), source=source, stored_offset_hu=offset)
