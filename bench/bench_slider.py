"""Slider benchmark: the core part of one CT2XSynth slider update (render + conversion to the output image).

Times what the module's Logic does per view for the real chest CT (512 x 512 x 141): `DRRRenderer.render` at the
module's defaults (SDD 1020 mm, source-to-isocentre 530 mm, 256^2 detector fitted to the body, 60 kV) followed by
`ct2x.vtk_bridge.radiograph_to_vtk`, the array + geometry handed to the volume node. The first render, which
includes the per-CT preparation, is reported separately; then a drag: one update per degree from -90 to +90 deg, each
angle met for the first time (median and slowest update, which shows any stall); then a sweep of primary angles,
median of repeats. A second table does the same for the vertical angle (C-arm tilt, -45 to +45 deg in the module).

    python bench/bench_slider.py [--data-dir ../shared/data] [--repeats 5] [--step 15]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from ct2x.drr import DRRRenderer, Physics, fitted_detector_spacing_mm
from ct2x.geometry import CArm
from ct2x.io import load_ct
from ct2x.vtk_bridge import radiograph_to_vtk


def update_ms(renderer: DRRRenderer, primary: float, secondary: float, repeats: int) -> float:
    """Median time (ms) of render + conversion at one view, after one warm-up."""
    return statistics.median(drag_ms(renderer, [(primary, secondary)] * (repeats + 1))[1:])


def drag_ms(renderer: DRRRenderer, views: list) -> list:
    """Time (ms) of render + conversion for each (primary, secondary) view in turn."""
    times = []
    for primary, secondary in views:
        start = time.perf_counter()
        radiograph_to_vtk(renderer.render(primary, secondary))
        times.append((time.perf_counter() - start) * 1e3)
    return times


def table(header: list, rows: list) -> str:
    return "\n".join([f"| {' | '.join(header)} |", "|" + "---|" * len(header)]
                     + [f"| {' | '.join(row)} |" for row in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("CT2X_DATA_DIR", "../shared/data")))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--step", type=float, default=15.0, help="primary-angle step of the sweep, deg")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    volume = load_ct(args.data_dir / "ct" / "chest_popi_phase00.nii.gz")
    carm = CArm()
    carm = carm.with_detector(256, fitted_detector_spacing_mm(volume, carm, 256))
    angles = [-90.0 + i * args.step for i in range(int(180 / args.step) + 1)]
    tilted = [(0.0, 30.0), (45.0, 15.0), (45.0, 30.0), (45.0, 45.0), (90.0, 30.0)]  # (primary, secondary) deg
    horizontal, vertical = [], []
    for label, physics in (("60 kV polychromatic", Physics()), ("50 keV monochromatic", Physics(energy_kev=50.0))):
        start = time.perf_counter()
        renderer = DRRRenderer(volume, carm, physics)
        radiograph_to_vtk(renderer.render(0.0))
        first_ms = (time.perf_counter() - start) * 1e3
        drag = drag_ms(renderer, [(float(a), 0.0) for a in range(-90, 91)])
        per_angle = [update_ms(renderer, angle, 0.0, args.repeats) for angle in angles]
        horizontal.append([label, f"{first_ms:.0f}", f"{statistics.median(drag):.0f}", f"{max(drag):.0f}",
                           *(f"{t:.0f}" for t in per_angle), f"{statistics.median(per_angle):.0f}"])
        tilt_drags = [drag_ms(renderer, [(primary, float(t)) for t in range(-45, 46)]) for primary in (0.0, 45.0)]
        vertical.append([label, *(f"{statistics.median(d):.0f} / {max(d):.0f}" for d in tilt_drags),
                         *(f"{update_ms(renderer, p, t, args.repeats):.0f}" for p, t in tilted)])

    print(f"chest CT {volume.hu.shape[::-1]} voxels, 256^2 detector at {carm.detector.pixel_spacing_mm[0]:.2f} mm, "
          f"CPU {args.threads} threads, median of {args.repeats} after a warm-up\n")
    print(table(["physics", "first render incl. preparation ms", "first drag median ms", "first drag slowest ms",
                 *(f"{a:+.0f} deg" for a in angles), "median over angles"], horizontal))
    print("\nVertical angle (tilt), after the drag above: first tilt drags from -45 to +45 deg in 1 deg steps, "
          "median / slowest ms; then tilted views, median ms\n")
    print(table(["physics", "tilt drag at primary 0 deg", "tilt drag at primary 45 deg",
                 *(f"{p:+.0f} / {t:+.0f} deg" for p, t in tilted)], vertical))


if __name__ == "__main__":
    main()
