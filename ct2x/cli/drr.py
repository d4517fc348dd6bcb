"""`ct2x drr [CT] --out DIR`: render a series of C-arm radiographs of a CT (or of the built-in chest phantom).

Writes, per view i at primary angle a, `view_{i:03d}_{a:+06.1f}deg.png` (8-bit display), `..._attenuation.mha`
(float32 -ln(I / I_open), detector pixel spacing in mm) and, on the polychromatic path, `..._materials.mha`
(float32 area densities in g/cm^2, 3 slices: air, soft tissue, bone); plus `series.json` (input, physics, window,
every view's files and full geometry with its 25-number pose label) and `overview.png` (all views, labelled).

Output goes through `ct2x.output_folder.OutputFolder`: the series is rendered into a staging folder that also locks
DIR against a second run, and moved into place only when complete, so DIR is either as it was or the new series
whole; `--overwrite` replaces only an earlier ct2x output. Options are all checked before the CT is read.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import numpy as np

from ct2x import __version__
from ct2x.cli.options import option
from ct2x.errors import CT2XInputError
from ct2x.geometry import DETECTOR_SIZE_PX, SOURCE_TO_DETECTOR_MM, SOURCE_TO_ISOCENTER_MM
from ct2x.output_folder import OutputFolder

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
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output folder (created; must be new, empty or, with --overwrite, an earlier ct2x output)")
    parser.add_argument("--series", metavar="UID", help="SeriesInstanceUID when the DICOM folder holds several")
    parser.add_argument("--stored-values", choices=("auto", "hu", "hu+1024"), default="auto",
                        help="what the CT file stores: Hounsfield units, or HU + 1024 as X2CT-GAN's files do "
                             "(default %(default)s: recognised from the values, with a notice)")
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
    parser.add_argument("--display", choices=("processed", "linear"),
                        help="8-bit films: processed like a clinical radiograph (local contrast, edge enhancement; "
                             "the default) or linear (one window for the series; the default with --window); "
                             "the float attenuation files are the same either way")
    parser.add_argument("--window", type=float, nargs=2, metavar=("LOW", "HIGH"),
                        help="linear display: attenuation shown as black and white (default: one auto window for the "
                             "whole series)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier ct2x output in DIR (only once the new series is complete; "
                             "folders ct2x did not write are never replaced)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def run(args: argparse.Namespace) -> int:
    from ct2x.drr import DRRRenderer, auto_window, fitted_detector_spacing_mm, to_display
    from ct2x.film import FilmProcessing, process_film
    from ct2x.io import save_image, save_png
    from ct2x.physics import MATERIALS

    output = OutputFolder(args.out, overwrite=args.overwrite, name=f"--out {args.out}",
                          keep=[Path.cwd()] + ([] if args.ct is None else [Path(args.ct)]))
    output.check()  # claimed for real only once the CT is read, just before rendering
    out = output.path
    angles, carm, physics, device = _settings(args)
    display_mode = args.display or ("linear" if args.window is not None else "processed")

    progress = _Progress(len(angles), quiet=args.quiet)
    start = time.perf_counter()
    with progress.stage("reading CT"):
        volume = _read_volume(args)
    load_seconds = time.perf_counter() - start
    if args.spacing is None:
        with option("--sid"):
            carm = carm.with_detector(args.size, fitted_detector_spacing_mm(
                volume, carm, args.size, [(angle, args.secondary) for angle in angles]))

    with output as partial:  # published when the block ends; any exception leaves DIR as it was
        with progress.stage("preparing CT"):
            renderer = DRRRenderer(volume, carm, physics, device=str(device),
                                   window=None if args.window is None else tuple(args.window))
        stems = [f"view_{i:03d}_{angle:+06.1f}deg" for i, angle in enumerate(angles)]
        attenuations: List[np.ndarray] = []  # (H, W) float32 each, kept to window the whole series at the end
        view_records: List[dict] = []
        render_seconds: List[float] = []
        for stem, angle in progress.views(list(zip(stems, angles))):
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
        if display_mode == "processed":
            displays = [process_film(attenuation, carm.detector.pixel_spacing_mm) for attenuation in attenuations]
        else:
            displays = [to_display(attenuation, window) for attenuation in attenuations]  # (H, W) uint8 each
        for record, display in zip(view_records, displays):
            save_png(display, partial / record["files"]["display_png"])
        save_png(_contact_sheet(displays, angles), partial / "overview.png")
        series = {
            "created_by": f"ct2x {__version__} drr",
            "input": {"path": None if args.ct is None else str(Path(args.ct).expanduser().resolve()),
                      "description": volume.source, "dicom_series_uid": args.series,
                      "stored_offset_hu": volume.stored_offset_hu,
                      "shape_ijk": list(volume.shape_ijk), "spacing_mm": volume.spacing_mm.tolist(),
                      "affine_ijk_to_ras_mm": volume.affine.tolist()},
            "physics": physics.describe(),
            "device": str(device),
            "display": (FilmProcessing().describe() if display_mode == "processed" else
                        {"display": "linear", "attenuation_low_high": [float(w) for w in window],
                         "window_source": "--window" if args.window is not None else
                         "auto: lowest low and highest high of the per-view auto windows"}),
            "files": {"display_png": ("uint8, bone bright, radiological display; " +
                                      ("processed like a clinical film, each view to its own range"
                                       if display_mode == "processed" else "attenuation windowed to 0..255")),
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

    print(f"ct2x drr: {len(angles)} view{'s' * (len(angles) != 1)} in {out} (see overview.png and series.json)\n"
          f"  CT preparation {renderer.preparation_seconds:.2f} s once, then {statistics.median(render_seconds):.3f} "
          f"s per view (median) on {device}")
    return 0


def _settings(args: argparse.Namespace):
    """(angles, C-arm, physics, torch device) from the options, each checked before any work is done."""
    from ct2x.device import torch_device
    from ct2x.drr import Physics, check_window
    from ct2x.geometry import CArm, check_secondary_angle, parse_angles
    from ct2x.memory import VIEW_BYTES_PER_PIXEL, check_fits, drr_peak_bytes

    with option("--angles"):
        angles = parse_angles(args.angles)  # primary angles, deg
    with option("--secondary"):
        check_secondary_angle(args.secondary)
    with option("--window"):
        if args.window is not None:
            check_window(args.window)
            if args.display == "processed":
                raise CT2XInputError("sets the linear display's window; --display processed chooses each view's "
                                     "range itself (leave one of them out)")
    with _options({"source-to-detector": "--sdd", "source-to-isocentre": "--sid", "detector size": "--size",
                   "detector pixel spacing": "--spacing"}):
        carm = CArm(args.sdd, args.sid, beam=args.beam).with_detector(args.size, args.spacing)
    with _options({"spectrum": "--spectrum", "energy_kev": "--energy", "noise_photons": "--noise",
                   "seed": "--seed"}):
        physics = Physics(spectrum=args.spectrum or "60kV", energy_kev=args.energy, noise_photons=args.noise,
                          seed=args.seed)
    with option("--device"):
        device = torch_device(args.device)
    with option("--size"):
        check_fits(drr_peak_bytes(0, args.size**2, len(angles)), f"{len(angles)} views of {args.size}^2 px",
                   f"use a smaller --size (each pixel of a view in flight takes about {VIEW_BYTES_PER_PIXEL} bytes)")
    return angles, carm, physics, device


def _read_volume(args: argparse.Namespace):
    """The CT named on the command line, or the built-in chest phantom."""
    from ct2x.io import load_ct

    if args.ct is None:
        if args.series is not None:
            raise CT2XInputError("--series: choosing a DICOM series needs a CT folder; pass it before --out")
        from ct2x.phantoms import chest

        volume = chest()
        tqdm_write("ct2x drr: no CT given; rendering the built-in anatomical chest phantom (ct2x.phantoms.chest(), "
                   f"{volume.shape_ijk[0]}^3 voxels of {volume.spacing_mm[0]:g} mm)")
        return volume
    try:
        return load_ct(args.ct, series_uid=args.series, stored_values=args.stored_values)
    except CT2XInputError as error:
        if "series_uid=" not in str(error):
            raise
        raise CT2XInputError(f"{error}\n(on the command line, series_uid=UID is --series UID)") from None


def tqdm_write(message: str) -> None:
    """Print a line to stderr without breaking a progress bar on the terminal."""
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


class _Progress:
    """One progress bar for the whole run, shown from the first second: reading and preparing the CT, then views.

    While a long step runs, a background thread redraws the bar twice a second so the elapsed time keeps moving.
    """

    REFRESH_SECONDS = 0.5

    def __init__(self, n_views: int, quiet: bool):
        from tqdm import tqdm

        self._bar = tqdm(total=n_views, desc="ct2x drr: starting", unit="view", file=_own_stderr(), disable=quiet,
                         dynamic_ncols=True)

    @contextlib.contextmanager
    def stage(self, description: str) -> Iterator[None]:
        """Show `description` while the block runs, with a ticking clock."""
        self._bar.set_description(f"ct2x drr: {description}")
        stop = threading.Event()
        ticker = threading.Thread(target=self._tick, args=(stop,), daemon=True)
        ticker.start()
        try:
            yield
        finally:
            stop.set()
            ticker.join()

    def views(self, items: list) -> Iterator:
        """Iterate over `items`, one bar step per view."""
        self._bar.set_description("ct2x drr: rendering")
        self._bar.reset()  # rate and time left from the views alone
        for item in items:
            yield item
            self._bar.update(1)
        self._bar.close()

    def _tick(self, stop: threading.Event) -> None:
        while not stop.wait(self.REFRESH_SECONDS):
            self._bar.refresh()


def _own_stderr():
    """A stream on a copy of file descriptor 2, so the bar still shows while a reader silences ITK's stderr."""
    try:
        return os.fdopen(os.dup(sys.stderr.fileno()), "w", buffering=1)
    except (AttributeError, OSError, ValueError):  # stderr replaced by an object without a descriptor (e.g. tests)
        return sys.stderr


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
def _options(names: Dict[str, str]) -> Iterator[None]:
    """Name the command-line option of an input error that starts with a core parameter name, e.g. noise_photons."""
    try:
        yield
    except CT2XInputError as error:
        message = str(error)
        for parameter, option in names.items():
            if message.startswith(f"{parameter}="):  # "noise_photons=0.5: ..." -> "--noise 0.5: ..."
                raise CT2XInputError(f"{option} {message[len(parameter) + 1:]}") from None
            if message.startswith(parameter):
                raise CT2XInputError(f"{option}: {message}") from None
        raise


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
