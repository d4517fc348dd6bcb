"""`ct2x drr [CT] --out DIR`: render a series of C-arm radiographs of a CT (or of the built-in chest phantom).

Writes, per view i at primary angle a, `view_{i:03d}_{a:+06.1f}deg.png` (8-bit display), `..._attenuation.mha`
(float32 -ln(I / I_open), detector pixel spacing in mm) and, on the polychromatic path, `..._materials.mha`
(float32 area densities in g/cm^2, 3 slices: air, soft tissue, bone); plus `series.json` (input, physics, window,
every view's files and full geometry with its 25-number pose label) and `overview.png` (all views, labelled).

The series is rendered into `DIR.partial-<pid>` next to DIR and moved into place only when complete, so DIR is
either the previous series untouched or the new one whole.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import numpy as np

from ct2x import __version__
from ct2x.geometry import DETECTOR_SIZE_PX, SOURCE_TO_DETECTOR_MM, SOURCE_TO_ISOCENTER_MM

DEFAULT_ANGLES = "-90:90:30"  # the CT2X-GAN paper's seven views, degrees
OVERVIEW_MAX_WIDTH_PX = 2000
OVERVIEW_GAP_PX = 4
OVERVIEW_ONE_ROW_MAX_VIEWS = 10  # more views than this are laid out on a grid


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "drr", help="render digitally reconstructed radiographs (X-ray images) of a CT",
        description="Render C-arm radiographs of a CT (NIfTI, NRRD, MHA/MHD file or DICOM folder), or of the "
                    "built-in chest phantom when no CT is given. Angles in degrees, lengths in mm.")
    parser.add_argument("ct", nargs="?", metavar="CT",
                        help="CT file or DICOM folder (default: the built-in anatomical chest phantom)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (created; must be new or empty)")
    parser.add_argument("--series", metavar="UID", help="SeriesInstanceUID when the DICOM folder holds several")
    parser.add_argument("--angles", default=DEFAULT_ANGLES, metavar="ANGLES",
                        help="primary C-arm angles, deg: START:STOP:STEP, a,b,c or one number (0 = AP, +90 = left "
                             "lateral; default %(default)s)")
    parser.add_argument("--secondary", type=float, default=0.0, metavar="DEG",
                        help="secondary (cranial +, caudal -) angle, deg (default %(default)s)")
    parser.add_argument("--sdd", type=_positive(float), default=SOURCE_TO_DETECTOR_MM,
                        metavar="MM", help="source-to-detector, mm (default %(default)s)")
    parser.add_argument("--sid", type=_positive(float), default=SOURCE_TO_ISOCENTER_MM,
                        metavar="MM", help="source-to-isocentre, mm (default %(default)s)")
    parser.add_argument("--size", type=_positive(int), default=DETECTOR_SIZE_PX,
                        metavar="PX", help="detector size, px, square (default %(default)s)")
    parser.add_argument("--spacing", type=_positive(float), metavar="MM",
                        help="detector pixel spacing, mm (default: fit the body in view; "
                             "298/size gives the mobile C-arm's 298 mm sensor)")
    parser.add_argument("--beam", choices=("cone", "parallel"), default="cone", help="beam shape (default %(default)s)")
    energy = parser.add_mutually_exclusive_group()
    energy.add_argument("--spectrum", metavar="NAME", help="tube spectrum: 60kV, 90kV or 120kV (default 60kV)")
    energy.add_argument("--energy", type=_positive(float), metavar="KEV",
                        help="monochromatic energy, keV (fast path, no material maps)")
    parser.add_argument("--noise", type=_positive(float), metavar="PHOTONS",
                        help="add Poisson quantum noise with this many photons per pixel (default: noiseless)")
    parser.add_argument("--seed", type=int, metavar="N", help="noise seed: the same seed gives the same images")
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda or cuda:N (default %(default)s)")
    parser.add_argument("--window", type=float, nargs=2, metavar=("LOW", "HIGH"),
                        help="attenuation shown as black and white (default: one auto window for the whole series)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty DIR (only once the new series is complete)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from ct2x.drr import DRRRenderer, Physics, auto_window, fitted_detector_spacing_mm, to_display
    from ct2x.errors import CT2XInputError
    from ct2x.geometry import CArm, parse_angles
    from ct2x.io import load_ct, save_image
    from ct2x.physics import MATERIALS, load_spectrum

    out = _output_folder(args.out, args.overwrite)
    _check_overwrite_keeps(out, [Path.cwd()] + ([] if args.ct is None else [Path(args.ct)]), args.overwrite)
    with _option("--angles"):
        angles = parse_angles(args.angles)  # primary angles, deg
    with _option("--secondary"):
        if not abs(args.secondary) < 90:
            raise CT2XInputError(f"{args.secondary} deg: the secondary angle must lie strictly between -90 and 90")
    if args.window is not None and not args.window[0] < args.window[1]:
        raise CT2XInputError(f"--window {args.window[0]} {args.window[1]}: LOW must be smaller than HIGH")
    with _option("--sid/--sdd"):
        carm = CArm(args.sdd, args.sid, beam=args.beam).with_detector(args.size, args.spacing)
    with _option("--spectrum"):
        spectrum = load_spectrum(args.spectrum or "60kV").name
    physics = Physics(spectrum=spectrum, energy_kev=args.energy, noise_photons=args.noise, seed=args.seed)
    device = _check_device(args.device, torch)

    start = time.perf_counter()
    if args.ct is None:
        if args.series is not None:
            raise CT2XInputError("--series: choosing a DICOM series needs a CT folder; pass it before --out")
        from ct2x.phantoms import chest

        volume = chest()
        print("ct2x drr: no CT given; rendering the built-in anatomical chest phantom (ct2x.phantoms.chest(), "
              f"{volume.shape_ijk[0]}^3 voxels of {volume.spacing_mm[0]:g} mm)", file=sys.stderr)
    else:
        try:
            volume = load_ct(args.ct, series_uid=args.series)
        except CT2XInputError as error:
            if "series_uid=" not in str(error):
                raise
            raise CT2XInputError(f"{error}\n(on the command line, series_uid=UID is --series UID)") from None
    load_seconds = time.perf_counter() - start
    if args.spacing is None:
        carm = carm.with_detector(args.size, fitted_detector_spacing_mm(volume, carm, args.size))

    partial = out.with_name(f"{out.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)  # left by an earlier run killed with this same process id
    partial.mkdir(parents=True)
    try:
        renderer = DRRRenderer(volume, carm, physics, device=str(device),
                               window=None if args.window is None else tuple(args.window))
        stems = [f"view_{i:03d}_{angle:+06.1f}deg" for i, angle in enumerate(angles)]
        attenuations: List[np.ndarray] = []  # (H, W) float32 each, kept to window the whole series at the end
        view_records: List[dict] = []
        render_seconds: List[float] = []
        for stem, angle in tqdm(list(zip(stems, angles)), desc="ct2x drr", unit="view", file=sys.stderr,
                                disable=args.quiet):
            tic = time.perf_counter()
            radiograph = renderer.render(angle, args.secondary)
            render_seconds.append(time.perf_counter() - tic)
            spacing = radiograph.view.detector.pixel_spacing_mm  # (column, row) mm
            files = {"display_png": f"{stem}.png", "attenuation_mha": f"{stem}_attenuation.mha"}
            save_image(radiograph.attenuation, partial / files["attenuation_mha"], spacing)
            if radiograph.area_density_g_cm2:
                files["materials_mha"] = f"{stem}_materials.mha"
                maps = np.stack([radiograph.area_density_g_cm2[m] for m in MATERIALS])  # (3, H, W) g/cm^2
                save_image(maps, partial / files["materials_mha"], (*spacing, 1.0))
            attenuations.append(radiograph.attenuation)
            view_records.append({"index": len(view_records), "files": files,
                                 "auto_window": list(auto_window(radiograph.attenuation)),
                                 "render_seconds": round(render_seconds[-1], 4),
                                 "geometry": radiograph.view.to_dict()})

        if args.window is None:
            windows = [record["auto_window"] for record in view_records]
            window = (min(w[0] for w in windows), max(w[1] for w in windows))  # one window for the series
        else:
            window = tuple(args.window)
        displays = [to_display(attenuation, window) for attenuation in attenuations]  # (H, W) uint8 each
        for record, display in zip(view_records, displays):
            _write_png(display, partial / record["files"]["display_png"])
        _write_png(_contact_sheet(displays, angles), partial / "overview.png")
        series = {
            "created_by": f"ct2x {__version__} drr",
            "input": {"path": None if args.ct is None else str(Path(args.ct).expanduser().resolve()),
                      "description": volume.source, "dicom_series_uid": args.series,
                      "shape_ijk": list(volume.shape_ijk), "spacing_mm": volume.spacing_mm.tolist(),
                      "affine_ijk_to_ras_mm": volume.affine.tolist()},
            "physics": physics.describe(),
            "device": str(device),
            "window": {"attenuation_low_high": [float(w) for w in window],
                       "source": "--window" if args.window is not None else
                       "auto: lowest low and highest high of the per-view auto windows"},
            "files": {"display_png": "uint8, attenuation windowed to 0..255, bone bright, radiological display",
                      "attenuation_mha": "float32 -ln(I / I_open), unitless; pixel spacing in mm",
                      "materials_mha": (None if physics.energy_kev else
                                        f"float32 area density, g/cm^2; 3 slices k = 0, 1, 2 = {', '.join(MATERIALS)}"),
                      "overview": "overview.png"},
            "timing_seconds": {"load": round(load_seconds, 4),
                               "preparation": round(renderer.preparation_seconds, 4),
                               "median_view": round(statistics.median(render_seconds), 4)},
            "views": view_records,
        }
        (partial / "series.json").write_text(json.dumps(series, indent=2) + "\n")
        _move_into_place(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise

    print(f"ct2x drr: {len(angles)} view{'s' * (len(angles) != 1)} in {out} (see overview.png and series.json)\n"
          f"  CT preparation {renderer.preparation_seconds:.2f} s once, then {statistics.median(render_seconds):.3f} "
          f"s per view (median) on {device}")
    return 0


def _positive(kind: type):
    """argparse type: a positive int or float, with a message naming what is wrong."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
        if not (value > 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"{text!r} must be a positive finite number")
        return value
    parse.__name__ = kind.__name__
    return parse


@contextlib.contextmanager
def _option(name: str) -> Iterator[None]:
    """Prefix input errors raised by the core with the command-line option that caused them."""
    from ct2x.errors import CT2XInputError

    try:
        yield
    except CT2XInputError as error:
        raise CT2XInputError(f"{name}: {error}") from None


def _check_device(name: str, torch):
    """A torch.device for --device, or an input error saying why it cannot be used here."""
    from ct2x.errors import CT2XInputError

    try:
        device = torch.device(name)
    except RuntimeError:
        raise CT2XInputError(f"--device {name!r}: not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise CT2XInputError(f"--device {name!r}: only cpu and cuda devices are supported")
    if not torch.cuda.is_available():
        reason = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise CT2XInputError(f"--device {name}: CUDA is not available ({reason}); use --device cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise CT2XInputError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here, "
                             f"numbered from 0")
    return device


def _output_folder(text: str, overwrite: bool) -> Path:
    """Absolute output folder; an input error if it is a file, or non-empty without --overwrite."""
    from ct2x.errors import CT2XInputError

    out = Path(text).expanduser().resolve()
    if out.parent == out:
        raise CT2XInputError(f"--out {text}: is a filesystem root; choose a folder for the images")
    if out.exists() and not out.is_dir():
        raise CT2XInputError(f"--out {text}: is a file; choose a folder for the images")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CT2XInputError(f"--out {text}: folder exists and is not empty; choose a new folder or pass "
                             "--overwrite to replace its contents")
    return out


def _check_overwrite_keeps(out: Path, keep: List[Path], overwrite: bool) -> None:
    """--overwrite must not delete the working directory or the input CT along with the old series."""
    from ct2x.errors import CT2XInputError

    if not (overwrite and out.is_dir()):
        return
    for path in (p.expanduser().resolve() for p in keep):
        if path == out or out in path.parents:
            raise CT2XInputError(f"--out {out}: replacing it would delete {path}; choose another folder")


def _move_into_place(partial: Path, out: Path) -> None:
    """Rename the finished series to `out`; an existing `out` is swapped out first and deleted only afterwards."""
    if not out.exists():
        os.replace(partial, out)
        return
    previous = out.with_name(f"{out.name}.replaced-{os.getpid()}")
    os.replace(out, previous)
    try:
        os.replace(partial, out)
    except BaseException:
        os.replace(previous, out)
        raise
    shutil.rmtree(previous)


def _write_png(image: np.ndarray, path: Path) -> None:
    """(H, W) uint8 -> 8-bit greyscale PNG (SimpleITK; no imaging library needed)."""
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(image), str(path))


def _contact_sheet(displays: List[np.ndarray], angles: List[float]) -> np.ndarray:
    """(H, W) uint8 sheet of all views side by side (a grid beyond OVERVIEW_ONE_ROW_MAX_VIEWS), angles beneath."""
    count = len(displays)
    columns = count if count <= OVERVIEW_ONE_ROW_MAX_VIEWS else math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    height, width = displays[0].shape
    scale = min(1.0, (OVERVIEW_MAX_WIDTH_PX - OVERVIEW_GAP_PX * (columns - 1)) / (columns * width))
    tile_h, tile_w = max(1, int(height * scale)), max(1, int(width * scale))  # px
    glyph_scale = max(1, tile_w // 64)  # label glyphs are 3x5 font pixels, each glyph_scale px wide
    label_h = 7 * glyph_scale
    sheet = np.zeros((rows * (tile_h + label_h) + (rows - 1) * OVERVIEW_GAP_PX,
                      columns * tile_w + (columns - 1) * OVERVIEW_GAP_PX), dtype=np.uint8)
    for index, (display, angle) in enumerate(zip(displays, angles)):
        top = (index // columns) * (tile_h + label_h + OVERVIEW_GAP_PX)
        left = (index % columns) * (tile_w + OVERVIEW_GAP_PX)
        sheet[top:top + tile_h, left:left + tile_w] = _resize(display, (tile_h, tile_w))
        label = _text(f"{angle:+.1f}°", glyph_scale)[:, :tile_w]
        label_left = left + (tile_w - label.shape[1]) // 2
        label_top = top + tile_h + glyph_scale
        sheet[label_top:label_top + label.shape[0], label_left:label_left + label.shape[1]] = label
    return sheet


def _resize(image: np.ndarray, shape: Tuple[int, int]) -> np.ndarray:
    """uint8 (H, W) -> uint8 `shape` by area averaging (only ever shrinks here)."""
    if image.shape == shape:
        return image
    import torch

    resized = torch.nn.functional.interpolate(torch.from_numpy(image).float()[None, None], size=shape, mode="area")
    return resized[0, 0].round().clamp(0, 255).numpy().astype(np.uint8)


_FONT: Dict[str, str] = {  # 3x5 pixel glyphs, rows top to bottom
    "0": "111 101 101 101 111", "1": "010 110 010 010 111", "2": "111 001 111 100 111", "3": "111 001 111 001 111",
    "4": "101 101 111 001 001", "5": "111 100 111 001 111", "6": "111 100 111 101 111", "7": "111 001 001 001 001",
    "8": "111 101 111 101 111", "9": "111 101 111 001 111", "+": "000 010 111 010 000", "-": "000 000 111 000 000",
    ".": "000 000 000 000 010", "°": "010 101 010 000 000",
}


def _text(text: str, scale: int) -> np.ndarray:
    """(5 * scale, 4 * scale * len(text)) uint8 white-on-black rendering of `text` (digits, sign, point, degree)."""
    glyphs = [np.array([[c == "1" for c in row] + [False] for row in _FONT[char].split()]) for char in text]
    bitmap = np.concatenate(glyphs, axis=1)  # (5, 4 * len(text)) bool, one blank column after each glyph
    return np.kron(bitmap, np.ones((scale, scale), dtype=bool)).astype(np.uint8) * 255
