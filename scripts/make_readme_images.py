"""Render the README's radiographs of the real chest CT, reproducibly.

    python scripts/make_readme_images.py [--data-dir ../shared/data] [--out docs/images]

Reads `ct/chest_popi_phase00.nii.gz` from the data folder (see its PROVENANCE.md) and writes, with the README's
geometry (source-to-detector 1020 mm, source-to-isocentre 700 mm, 430 mm square detector) and the 60 kV spectrum:

- `display_before_after.png`: AP (0 deg) and left lateral (+90 deg), 256 px each. Top row linear: one auto window
  for the seven-view series (`auto_window` of each view, lowest low to highest high, as `ct2x drr` does); bottom
  row processed (`ct2x.film.process_film`, per view).
- `chest_seven_views.png`: the seven views -90..90 deg in 30 deg steps, 192 px each, processed display.

Dev-time only: labels are drawn with Pillow, as in `scripts/make_slicer_images.py`; CT2X itself does not use it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ct2x.drr import DRRRenderer, Physics, Radiograph, auto_window, to_display
from ct2x.film import process_film
from ct2x.geometry import SEVEN_VIEWS_DEG, CArm, Detector
from ct2x.io import load_ct

ROOT = Path(__file__).resolve().parents[1]
CHEST_CT = Path("ct") / "chest_popi_phase00.nii.gz"
SOURCE_TO_DETECTOR_MM, SOURCE_TO_ISOCENTER_MM, DETECTOR_EDGE_MM = 1020.0, 700.0, 430.0
SPECTRUM = "60kV"
SEVEN_VIEWS_PX, BEFORE_AFTER_PX = 192, 256  # detector pixels per side
FONT_FILE = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
LABEL_COLOUR = (255, 214, 0)
GAP_PX = 4  # between the tiles of the before/after picture


def render_series(volume, size_px: int) -> List[Radiograph]:
    """The seven views (primary -90..90 deg) on a `size_px` detector `DETECTOR_EDGE_MM` wide."""
    carm = CArm(SOURCE_TO_DETECTOR_MM, SOURCE_TO_ISOCENTER_MM, Detector.square(size_px, DETECTOR_EDGE_MM / size_px))
    renderer = DRRRenderer(volume, carm, Physics(spectrum=SPECTRUM))
    return [renderer.render(primary, secondary) for primary, secondary in SEVEN_VIEWS_DEG]


def processed(film: Radiograph) -> np.ndarray:
    return process_film(film.attenuation, film.view.detector.pixel_spacing_mm)


def series_window(films: Sequence[Radiograph]) -> Tuple[float, float]:
    """`ct2x drr`'s default window: the lowest low and highest high of the views' auto windows."""
    windows = [auto_window(film.attenuation) for film in films]
    return min(w[0] for w in windows), max(w[1] for w in windows)


def label(image: Image.Image, xy: Tuple[int, int], text: str, size_px: int) -> None:
    try:
        font = ImageFont.truetype(FONT_FILE, size_px)
    except OSError:
        font = ImageFont.load_default(size_px)
    ImageDraw.Draw(image).text(xy, text, fill=LABEL_COLOUR, font=font)


def seven_views_picture(films: Sequence[Radiograph]) -> Image.Image:
    """Processed views side by side, each labelled with its primary angle."""
    picture = Image.fromarray(np.concatenate([processed(film) for film in films], axis=1)).convert("RGB")
    for index, (primary, _) in enumerate(SEVEN_VIEWS_DEG):
        label(picture, (index * SEVEN_VIEWS_PX + 4, 3), f"{primary:+.0f} deg", 11)
    return picture


def before_after_picture(films: Sequence[Radiograph]) -> Image.Image:
    """2 x 2: AP and left lateral; top linear with the series window, bottom processed."""
    window = series_window(films)
    by_angle = {primary: film for (primary, _), film in zip(SEVEN_VIEWS_DEG, films)}
    columns = [("AP", by_angle[0.0]), ("left lateral", by_angle[90.0])]
    rows = [("linear", lambda film: to_display(film.attenuation, window)),
            ("processed", processed)]
    size = BEFORE_AFTER_PX + GAP_PX
    picture = Image.new("RGB", (2 * size - GAP_PX, 2 * size - GAP_PX), (255, 255, 255))
    for row, (row_name, display) in enumerate(rows):
        for column, (view_name, film) in enumerate(columns):
            picture.paste(Image.fromarray(display(film)), (column * size, row * size))
            label(picture, (column * size + 5, row * size + 4), f"{view_name}, {row_name}", 12)
    return picture


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data",
                        help="real-data folder holding ct/chest_popi_phase00.nii.gz (default: ../shared/data beside "
                             "the repository)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images", help="folder for the PNGs")
    args = parser.parse_args()

    volume = load_ct(args.data_dir / CHEST_CT)
    args.out.mkdir(parents=True, exist_ok=True)
    pictures = {"chest_seven_views.png": seven_views_picture(render_series(volume, SEVEN_VIEWS_PX)),
                "display_before_after.png": before_after_picture(render_series(volume, BEFORE_AFTER_PX))}
    for name, picture in pictures.items():
        path = args.out / name
        picture.save(path, optimize=True)
        print(f"{path}: {picture.width} x {picture.height} px, {path.stat().st_size / 1024:.0f} kB")


if __name__ == "__main__":
    main()
