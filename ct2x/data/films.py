"""Real X-ray films -> the films X2CT networks read (`ct2x.data.x2ct_convention`), each decision reported.

`prepare_film` turns a PNG, JPEG or DICOM film (8 or 16 bit, grey, RGB or RGBA, any size) or an array into a
(size, size) float32 image in [0, 1] laid out and scaled like the convention's films:

1. grey: colour by luminance, alpha composited over black; DICOM MONOCHROME1 taken as stored (smallest = white).
   Films larger than WORKING_PX are area-averaged down to it first.
2. borders: uniform margins (black, white or grey padding, flat collimator shadows) are cropped from each side.
3. polarity, bone bright: DICOM says so (MONOCHROME1: inverted); otherwise a score of the anatomy decides, the sum of
   the mediastinum minus the lung fields (PA) or the body minus its front and back edges (lateral), the abdomen minus
   the chest, and the median minus mid-grey (a chest film is mostly brighter than mid-grey). Each term changes sign
   when the film is turned over; on the 219 real films at hand (the six pairs and the style set) it is right every
   time, in both polarities.
4. body: the air level is read from the film's outer frame; then the film is cropped to the rows and columns that
   hold body and made a square about it, never stretched: the film's height is the square's side, so that the rows of
   a PA and a lateral cover the same heights as the network assumes (both films span the same collimated height);
   a narrower body is padded with air, a wider one (a PA with the arms) loses its sides, as the convention's PA, cut
   by its 285 mm field of view, does. Then it is resized to `size` (area-averaged).
5. lateral facing: the convention's lateral has the anterior on the image left. The spine and the posterior ribs make
   the posterior third of the middle rows brighter than the anterior third; a lateral whose left third is the brighter
   faces right and is mirrored. (A real PA is displayed radiologically, the patient's left on the image right, exactly
   as the convention's PA: it is never mirrored.)
6. intensities: the convention's films are attenuation divided by each film's own maximum: air 0, the densest bone
   about 1. The body's 5th, 50th and 99th percentiles and the air level are mapped piecewise-linearly onto those of
   the convention's films (`CONVENTION_BODY_LEVELS`) and 0; values beyond continue the nearest piece; clipped to
   [0, 1]. Matching three body levels, not the whole histogram, keeps a film's own anatomy (more abdomen, say) from
   being bent into another's.

`invert`, `facing` and `crop` overrule the detection.
"""

from __future__ import annotations

import functools
import os
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from ct2x.data.x2ct_convention import FILM_PX
from ct2x.errors import CT2XInputError
from ct2x.io.native_output import quietly, sitk_reason

PathLike = Union[str, os.PathLike]
ROLES = ("pa", "lateral")
INVERT_CHOICES = ("auto", "yes", "no")
FACING_CHOICES = ("auto", "left", "right")  # the side of the image the patient's front faces
CROP_CHOICES = ("auto", "none")
MIN_FILM_PX = 32  # shortest side of a usable film, pixels
WORKING_PX = 1024  # films are analysed and resampled from at most this many pixels per side
PHOTOMETRIC_TAG = "0028|0004"  # DICOM Photometric Interpretation

# Body percentiles of the convention's films, and their levels: measured on `official_films` of a real chest CT (POPI,
# resampled onto the 320 mm cube), body = pixels above 0.05; tests/test_films.py measures them again.
BODY_PERCENTILES = (5.0, 50.0, 99.0)
CONVENTION_BODY_LEVELS = {"pa": (0.39, 0.65, 0.97), "lateral": (0.27, 0.57, 0.90)}

BORDER_TOLERANCE = 0.03  # a margin line's pixels lie within this (fraction of the film's range) of its median ...
BORDER_FRACTION = 0.97  # ... for at least this fraction of them (markers in a margin are tolerated)
BODY_LEVEL = 0.15  # body is brighter than air by this fraction of the way from air (1st pct) to bone (99th pct)
BODY_LINE_FRACTION = 0.1  # a row or column holds body when at least this fraction of it is body
AIR_FRAME = 0.06  # air around the body is looked for in this outer fraction of the film's height and width ...
AIR_MIN_FRACTION = 0.02  # ... and found when at least this fraction of that frame is dark


@dataclass(frozen=True, eq=False)
class PreparedFilm:
    """A film as the network reads it: `image` (size, size) float32 in [0, 1], bone bright, in the convention's
    orientation (rows superior -> inferior; PA columns patient's right -> left, lateral anterior -> posterior), and
    `choices`, one line per decision taken on the way."""

    image: np.ndarray
    choices: Tuple[str, ...]


def prepare_film(film: Union[PathLike, np.ndarray], role: str = "pa", size: int = FILM_PX, invert: str = "auto",
                 facing: str = "auto", crop: str = "auto") -> PreparedFilm:
    """The film at `film` (a PNG, JPEG or DICOM file) or in `film` (an array: (H, W) grey, (H, W, 3) RGB or (H, W, 4)
    RGBA) prepared as the convention's `role` film ("pa" or "lateral") of `size` x `size` pixels.

    invert: "auto" (detect), "yes" (the film shows bone dark) or "no". facing, laterals only: the side of the image
    the patient's front faces, "auto", "left" or "right". crop: "auto" (cut borders and the air around the body) or
    "none" (the whole film). CT2XInputError naming the film for a film that cannot be used.
    """
    _check_choice("role", role, ROLES)
    _check_choice("invert", invert, INVERT_CHOICES)
    _check_choice("facing", facing, FACING_CHOICES)
    _check_choice("crop", crop, CROP_CHOICES)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise CT2XInputError(f"size must be a positive number of pixels, got {size!r}")
    if role == "pa" and facing != "auto":
        raise CT2XInputError(f"facing={facing!r} is for laterals; a PA film is displayed radiologically and never "
                             "mirrored")
    if isinstance(film, np.ndarray):
        (grey, description), photometric = _grey_from_array(film, "array"), None
    else:
        grey, description, photometric = read_film(Path(film).expanduser())
    choices = [f"read {description}"]

    working, scale = _working_copy(grey)  # (h, w) float32; one working pixel is `scale` film pixels
    corner = (0, 0)  # working row and column of the film's kept top-left corner
    if crop == "auto":
        working, corner, choice = _crop_borders(working, scale)
        choices += [choice] if choice else []
    working, choice = _bone_bright(working, role, photometric, invert)
    choices.append(choice)
    air = air_level(working)
    if crop == "auto":
        working, choice = _crop_body(working, corner, scale)
        choices.append(choice)
    if role == "lateral":
        working, choice = _anterior_left(working, facing)
        choices.append(choice)
    working, choice = _convention_intensities(working, role, air)
    choices.append(choice)
    square, lines, how = square_about_body(working, crop_sides=crop == "auto")
    added = " + ".join(str(round(n * scale)) for n in lines)
    span = " (the rows span the film's height, as the other view's do)" if "cut" in how else ""
    choices.append(f"squared about the body: {added} px {how}{span}; resized to {size} x {size} px")
    return PreparedFilm(_resize(square, size), tuple(choices))


def read_film(path: Path) -> Tuple[np.ndarray, str, Optional[str]]:
    """(grey (H, W) float32 in stored-value order, a description, the DICOM photometric interpretation or None) of
    the film file at `path`; CT2XInputError naming it when it cannot be read or is not a 2-D picture."""
    if not path.is_file():
        raise CT2XInputError(f"{path}: {'is a folder, not a film' if path.is_dir() else 'no such file'}")
    if path.stat().st_size == 0:
        raise CT2XInputError(f"{path}: the file is empty")
    image, failure, _ = quietly(partial(sitk.ReadImage, str(path)))  # what the readers print is not the user's concern
    if failure is not None:
        raise CT2XInputError(f"{path}: cannot be read as a film ({sitk_reason(failure)}); give a PNG, JPEG or DICOM "
                             "file")
    photometric = (image.GetMetaData(PHOTOMETRIC_TAG).strip().upper()
                   if image.HasMetaDataKey(PHOTOMETRIC_TAG) else None)
    size = image.GetSize()
    if image.GetDimension() == 3 and size[2] == 1:  # a DICOM film reads as one slice
        image = image[:, :, 0]
    if image.GetDimension() != 2:
        raise CT2XInputError(f"{path}: is a {image.GetDimension()}-D image of {' x '.join(map(str, size))} pixels; a "
                             "film is one 2-D picture")
    grey, description = _grey_from_array(sitk.GetArrayFromImage(image), str(path))  # (H, W) or (H, W, C) pixels
    if photometric == "MONOCHROME1" and _reader_inverts_monochrome1():
        grey = -grey  # back to the stored order, whose smallest value is white
    kind = f"DICOM {photometric}" if photometric else (path.suffix.lstrip(".").upper() or "image")
    return grey, f"{kind} {description}", photometric


def uniform_margins(image: np.ndarray) -> Tuple[int, int, int, int]:
    """(top, bottom, left, right): how many edge rows and columns of `image` (H, W) are uniform margins, lines that
    are nearly one value (padding, flat collimator shadows, air beyond the body); markers in them are tolerated."""
    tolerance = BORDER_TOLERANCE * float(np.ptp(image))
    margins = [0, 0, 0, 0]  # top, bottom, left, right
    changed = True
    while changed:  # a margin on one side can hide one on another (its values lie across the other's lines)
        changed = False
        for side in range(4):
            region = image[margins[0]:image.shape[0] - margins[1], margins[2]:image.shape[1] - margins[3]]
            lines = (region, region[::-1], region.T, region.T[::-1])[side]  # (N, L): from this side inwards
            medians = np.median(lines, axis=1, keepdims=True)  # (N, 1)
            uniform = (np.abs(lines - medians) <= tolerance).mean(axis=1) >= BORDER_FRACTION  # (N,)
            count = len(uniform) if uniform.all() else int(np.argmin(uniform))
            if count and len(uniform) - count >= MIN_FILM_PX // 2:
                margins[side] += count
                changed = True
    return tuple(margins)


def body_box(image: np.ndarray) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """((first row, end row), (first column, end column)) of the body in a bone-bright `image` (H, W) in [0, 1]: the
    rows and columns of which at least BODY_LINE_FRACTION is brighter than air."""
    body = _smooth(image) > _body_threshold(image)  # (H, W)
    boxes = []
    for fraction in (body.mean(axis=1), body.mean(axis=0)):  # rows, then columns
        inside = np.flatnonzero(fraction >= BODY_LINE_FRACTION)
        boxes.append((0, len(fraction)) if inside.size == 0 else (int(inside[0]), int(inside[-1]) + 1))
    return boxes[0], boxes[1]


def air_level(image: np.ndarray) -> Optional[float]:
    """The level of the air around the body in a bone-bright `image` (H, W) in [0, 1]: the median of the dark pixels
    of its outer frame; None when the frame holds almost none (the body fills the film)."""
    height, width = image.shape
    dark = _smooth(image) <= _body_threshold(image)  # (H, W)
    frame = np.zeros_like(dark)
    rows, columns = max(1, round(AIR_FRAME * height)), max(1, round(AIR_FRAME * width))
    frame[:rows], frame[-rows:], frame[:, :columns], frame[:, -columns:] = True, True, True, True
    outside = dark & frame
    return float(np.median(image[outside])) if outside.sum() >= AIR_MIN_FRACTION * frame.sum() else None


def anterior_side(lateral: np.ndarray) -> Tuple[str, str]:
    """("left" or "right", evidence): the side of a bone-bright, body-cropped lateral (H, W) the patient's front
    faces: the posterior third (spine, posterior ribs) of the middle rows is brighter than the anterior third."""
    height, width = lateral.shape
    profile = lateral[int(0.25 * height):max(int(0.75 * height), 1)].mean(axis=0)  # (W,) column brightness
    third = max(1, width // 3)
    left, right = float(profile[:third].mean()), float(profile[-third:].mean())
    return ("left" if right > left else "right",
            f"auto: the spine's side is the brighter; middle rows' left third {left:.2f}, right third {right:.2f}")


def match_intensities(image: np.ndarray, role: str, air: Optional[float]) -> Tuple[np.ndarray, Tuple[float, ...]]:
    """(`image` (H, W) in [0, 1] mapped piecewise-linearly so that its body percentiles land on the convention's and
    `air` (when known) on 0, values beyond continuing the nearest piece, clipped to [0, 1]; the film's own levels,
    air first when used)."""
    body = image[image > _body_threshold(image)]
    levels = tuple(float(v) for v in np.percentile(body if body.size else image, BODY_PERCENTILES))
    targets = CONVENTION_BODY_LEVELS[role]
    if air is not None and air < levels[0]:
        levels, targets = (air, *levels), (0.0, *targets)
    given = np.maximum.accumulate(np.asarray(levels) + 1e-6 * np.arange(len(levels)))  # strictly increasing
    wanted = np.asarray(targets)
    slopes = np.diff(wanted) / np.diff(given)  # (pieces,)
    mapped = np.interp(image, given, wanted)
    mapped = np.where(image < given[0], wanted[0] + (image - given[0]) * slopes[0], mapped)
    mapped = np.where(image > given[-1], wanted[-1] + (image - given[-1]) * slopes[-1], mapped)
    return np.clip(mapped, 0.0, 1.0).astype(np.float32), levels


def square_about_body(image: np.ndarray, crop_sides: bool) -> Tuple[np.ndarray, Tuple[int, int], str]:
    """`image` (H, W), cropped to the body, made a square without stretching, with the (before, after) lines added
    or cut and what was done: columns of air (0) added when it is narrower; when it is wider, columns cut at its sides
    if `crop_sides` (the side is then its height, which the other film of the pair spans too), else rows of air
    added."""
    height, width = image.shape
    extra = abs(height - width)
    lines = (extra // 2, extra - extra // 2)
    if height >= width:
        return np.pad(image, ((0, 0), lines)), lines, "columns of air added"
    if crop_sides:
        return image[:, lines[0]:width - lines[1]], lines, "columns cut at the sides"
    return np.pad(image, (lines, (0, 0))), lines, "rows of air added"


def _crop_borders(image: np.ndarray, scale: float) -> Tuple[np.ndarray, Tuple[int, int], str]:
    top, bottom, left, right = uniform_margins(image)
    if not (top or bottom or left or right):
        return image, (0, 0), ""
    return (image[top:image.shape[0] - bottom, left:image.shape[1] - right], (top, left),
            f"cropped uniform borders: top {round(top * scale)}, bottom {round(bottom * scale)}, left "
            f"{round(left * scale)}, right {round(right * scale)} px")


def _bone_bright(image: np.ndarray, role: str, photometric: Optional[str], invert: str) -> Tuple[np.ndarray, str]:
    """`image` turned over where it shows bone dark, scaled to [0, 1] (`_unit_range`), and the decision."""
    if invert == "auto":
        bone_dark, evidence = _bone_dark(image, role, photometric)
    else:
        bone_dark, evidence = invert == "yes", "as asked"
    return _unit_range(-image if bone_dark else image), f"{'inverted' if bone_dark else 'not inverted'} ({evidence})"


def _bone_dark(image: np.ndarray, role: str, photometric: Optional[str]) -> Tuple[bool, str]:
    """(whether `image` (H, W), border-cropped, shows bone dark, the evidence): DICOM's photometric interpretation
    where given, else the bone-bright score (module docstring, step 3)."""
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        return photometric == "MONOCHROME1", photometric
    unit = _unit_range(image)
    height, width = unit.shape

    def median(rows: Tuple[float, float], columns: Tuple[float, float]) -> float:
        r0, c0 = int(rows[0] * height), int(columns[0] * width)
        return float(np.median(unit[r0:max(int(rows[1] * height), r0 + 1), c0:max(int(columns[1] * width), c0 + 1)]))

    chest = (0.2, 0.7)  # rows of the lung fields
    if role == "pa":
        centre = median(chest, (0.42, 0.58)) - (median(chest, (0.15, 0.32)) + median(chest, (0.68, 0.85))) / 2
        centre_text = "mediastinum - lung fields"
    else:
        centre = median(chest, (0.3, 0.7)) - (median(chest, (0.0, 0.1)) + median(chest, (0.9, 1.0))) / 2
        centre_text = "body - front and back edges"
    below = median((0.8, 0.95), (0.2, 0.8)) - median((0.3, 0.6), (0.2, 0.8))
    overall = float(np.median(unit)) - 0.5
    score = centre + below + overall
    return score < 0, (f"auto: bone-bright score {score:+.2f} = {centre_text} {centre:+.2f}, abdomen - chest "
                       f"{below:+.2f}, median - mid-grey {overall:+.2f}")


def _crop_body(image: np.ndarray, corner: Tuple[int, int], scale: float) -> Tuple[np.ndarray, str]:
    (top, bottom), (left, right) = body_box(image)
    if (bottom - top, right - left) == image.shape:
        return image, "the body fills the film: nothing to crop around it"
    rows = f"{round((corner[0] + top) * scale)}-{round((corner[0] + bottom) * scale)}"
    columns = f"{round((corner[1] + left) * scale)}-{round((corner[1] + right) * scale)}"
    return image[top:bottom, left:right], f"cropped to the body: rows {rows}, columns {columns} px of the film"


def _anterior_left(lateral: np.ndarray, facing: str) -> Tuple[np.ndarray, str]:
    """The lateral with its anterior on the image left, as the convention's, and the decision."""
    facing, evidence = anterior_side(lateral) if facing == "auto" else (facing, "as asked")
    if facing == "left":
        return lateral, f"anterior on the image left ({evidence}), as the convention's lateral"
    return lateral[:, ::-1], f"anterior on the image right ({evidence}): mirrored to the convention's (anterior left)"


def _convention_intensities(image: np.ndarray, role: str, air: Optional[float]) -> Tuple[np.ndarray, str]:
    mapped, levels = match_intensities(image, role, air)
    targets = CONVENTION_BODY_LEVELS[role]
    percentiles = "/".join(f"{p:g}" for p in BODY_PERCENTILES)
    if len(levels) > len(targets):
        return mapped, (f"intensities: air {levels[0]:.2f} -> 0, body percentiles {percentiles} "
                        f"{_levels_text(levels[1:])} -> {_levels_text(targets)} as in the convention's films")
    return mapped, (f"intensities: body percentiles {percentiles} {_levels_text(levels)} -> {_levels_text(targets)} "
                    "as in the convention's films (no air around the body)")


@functools.lru_cache(maxsize=None)
def _reader_inverts_monochrome1() -> bool:
    """Whether this SimpleITK's DICOM reader turns MONOCHROME1 pixels over itself (ITK 5.4 does): a two-pixel
    MONOCHROME1 file is written and read back, once."""
    try:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "probe.dcm"
            sitk.WriteImage(sitk.GetImageFromArray(np.array([[0, 200]], dtype=np.uint8)), str(path))
            path.write_bytes(path.read_bytes().replace(b"MONOCHROME2 ", b"MONOCHROME1 "))  # the writer says MONOCHROME2
            return int(sitk.GetArrayFromImage(sitk.ReadImage(str(path))).ravel()[0]) != 0
    except (OSError, RuntimeError):  # no temporary folder to write in: assume today's ITK
        return True


def _grey_from_array(pixels: np.ndarray, name: str) -> Tuple[np.ndarray, str]:
    """(grey (H, W) float32, a description) of (H, W) grey, (H, W, 2) grey + alpha, (H, W, 3) RGB or (H, W, 4) RGBA
    pixels; alpha composites over black (no X-rays)."""
    pixels = np.asarray(pixels)
    if pixels.dtype == bool or not np.issubdtype(pixels.dtype, np.number) or np.iscomplexobj(pixels):
        raise CT2XInputError(f"{name}: pixels of type {pixels.dtype} are no film's; give numbers")
    channels = pixels.shape[2] if pixels.ndim == 3 else 1
    if pixels.ndim not in (2, 3) or channels not in (1, 2, 3, 4):
        raise CT2XInputError(f"{name}: an array of shape {pixels.shape} is not a film: give (H, W) grey, (H, W, 3) RGB "
                             "or (H, W, 4) RGBA pixels")
    if min(pixels.shape[:2]) < MIN_FILM_PX:
        raise CT2XInputError(f"{name}: {pixels.shape[0]} x {pixels.shape[1]} pixels is too small for a film (at least "
                             f"{MIN_FILM_PX} x {MIN_FILM_PX})")
    values = pixels.astype(np.float32)
    if not np.isfinite(values).all():
        raise CT2XInputError(f"{name}: holds NaN or infinite values")
    if channels >= 3:
        grey = values[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601 luminance
    else:
        grey = values[..., 0] if pixels.ndim == 3 else values
    if channels in (2, 4):
        grey = grey * (values[..., -1] / max(float(values[..., -1].max()), 1e-12))
    if np.ptp(grey) == 0:
        raise CT2XInputError(f"{name}: every pixel has the same value: the film is empty")
    colour = {1: "grey", 2: "grey + alpha", 3: "RGB", 4: "RGBA"}[channels]
    bits = f"{pixels.dtype.itemsize * 8}-bit " if np.issubdtype(pixels.dtype, np.integer) else ""
    return grey, f"{pixels.shape[1]} x {pixels.shape[0]} px {bits}{colour}"


def _working_copy(grey: np.ndarray) -> Tuple[np.ndarray, float]:
    """`grey` area-averaged to at most WORKING_PX per side, and film pixels per working pixel."""
    scale = max(grey.shape) / WORKING_PX
    if scale <= 1:
        return grey.astype(np.float32), 1.0
    shape = tuple(max(1, round(n / scale)) for n in grey.shape)
    small = F.interpolate(torch.from_numpy(np.ascontiguousarray(grey, dtype=np.float32))[None, None], size=shape,
                          mode="area")[0, 0]
    return small.numpy(), max(grey.shape) / max(shape)


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    """(size, size) float32 of a square `image`: area-averaged when shrinking, bilinear when enlarging."""
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    if image.shape[0] >= size:
        resized = F.interpolate(tensor, size=(size, size), mode="area")
    else:
        resized = F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False)
    return resized[0, 0].clamp(0.0, 1.0).numpy()


def _unit_range(image: np.ndarray) -> np.ndarray:
    """`image` scaled so that its 0.5th percentile is 0 and its 99.5th is 1, clipped (burned-in markers saturate)."""
    low, high = np.percentile(image, [0.5, 99.5])
    return np.clip((image - low) / max(high - low, 1e-12), 0.0, 1.0).astype(np.float32)


def _body_threshold(image: np.ndarray) -> float:
    """The level above which a bone-bright `image` in [0, 1] is body rather than air."""
    low, high = np.percentile(image, [1.0, 99.0])
    return float(low + BODY_LEVEL * (high - low))


def _smooth(image: np.ndarray, radius: int = 2) -> np.ndarray:
    """A (2 radius + 1)^2 box average of `image` (H, W): noise and JPEG blocks gone."""
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    return F.avg_pool2d(tensor, 2 * radius + 1, stride=1, padding=radius, count_include_pad=False)[0, 0].numpy()


def _levels_text(levels: Tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:.2f}" for v in levels) + ")"


def _check_choice(name: str, value: str, allowed: Tuple[str, ...]) -> None:
    if value not in allowed:
        raise CT2XInputError(f"{name}={value!r}: choose one of {', '.join(allowed)}")
