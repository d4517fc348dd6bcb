"""Slider benchmark: the core part of one CT2XSynth slider update (render + conversion to the output image).

Times what the module's Logic does per view for the real chest CT (512 x 512 x 141): `DRRRenderer.render` at the
module's defaults (SDD 1020 mm, source-to-isocentre 530 mm, 256^2 detector fitted to the body, 60 kV) followed by
`ct2x.vtk_bridge.radiograph_to_vtk`, the array + geometry handed to the volume node. The first render, which
includes the per-CT preparation, is reported separately; then a drag: one update per degree from -90 to +90 deg, each
angle met for the first time (median and slowest update, which shows any stall); then a sweep of primary angles,
median of repeats. A second table does the same for the vertical angle (C-arm tilt, -45 to +45 deg in the module).

`--busy` runs everything a second time beside one competing busy process that this script starts (a Python loop
that keeps one core busy, as another program on a desktop would) and prints the ratios busy / quiet.

    python bench/bench_slider.py [--data-dir ../shared/data] [--repeats 5] [--step 15] [--threads 2] [--busy]
                                 [--device cuda] [--ct CT_OR_NPZ]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List

import torch

from ct2x.drr import DRRRenderer, Physics, fitted_detector_spacing_mm
from ct2x.geometry import CArm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_reconstruct import (  # noqa: E402  (bench/ is no package)
    cpu_snapshot,
    foreign_cpu_percent,
    load_average,
    load_bench_ct,
    machine_facts,
)

try:
    from ct2x.vtk_bridge import radiograph_to_vtk
except ImportError:  # no vtk (the lent GPU machine): the render alone is timed, and the output says so
    radiograph_to_vtk = None

#: Rows of the tables: physics and whether the renderer keeps the material maps. The module keeps none at 60 kV
#: (two projected channels, `DRRRenderer(material_maps=False)`); the second row is the three-channel path of `ct2x drr`.
RENDERINGS = {"60 kV polychromatic (the module)": (Physics(), False),
              "60 kV polychromatic, material maps": (Physics(), True),
              "50 keV monochromatic": (Physics(energy_kev=50.0), True)}
TILTED = [(0.0, 30.0), (45.0, 15.0), (45.0, 30.0), (45.0, 45.0), (90.0, 30.0)]  # (primary, secondary) deg


def to_output_image(radiograph) -> None:
    """The film handed to the module's output image (vtkImageData), as CT2XSynth does; nothing without vtk."""
    if radiograph_to_vtk is not None:
        radiograph_to_vtk(radiograph)


def update_ms(renderer: DRRRenderer, primary: float, secondary: float, repeats: int) -> float:
    """Median time (ms) of render + conversion at one view, after one warm-up."""
    return statistics.median(drag_ms(renderer, [(primary, secondary)] * (repeats + 1))[1:])


def drag_ms(renderer: DRRRenderer, views: list) -> list:
    """Time (ms) of render + conversion for each (primary, secondary) view in turn."""
    times = []
    for primary, secondary in views:
        start = time.perf_counter()
        to_output_image(renderer.render(primary, secondary))
        times.append((time.perf_counter() - start) * 1e3)
    return times


def measure(volume, carm: CArm, physics: Physics, material_maps: bool, angles: List[float], repeats: int,
            device: str = "cpu") -> Dict[str, object]:
    """Every figure of one row of both tables (ms), and the foreign CPU share (%) while they were taken."""
    before = cpu_snapshot()
    start = time.perf_counter()
    renderer = DRRRenderer(volume, carm, physics, device=device,  # a film comes back as numpy: synchronised
                           material_maps=material_maps)
    to_output_image(renderer.render(0.0))
    first = (time.perf_counter() - start) * 1e3
    drag = drag_ms(renderer, [(float(a), 0.0) for a in range(-90, 91)])
    per_angle = [update_ms(renderer, angle, 0.0, repeats) for angle in angles]
    tilt_drags = [drag_ms(renderer, [(primary, float(t)) for t in range(-45, 46)]) for primary in (0.0, 45.0)]
    tilted = [update_ms(renderer, primary, tilt, repeats) for primary, tilt in TILTED]
    return {"first": first, "drag": drag, "per_angle": per_angle, "tilt_drags": tilt_drags, "tilted": tilted,
            "foreign_percent": foreign_cpu_percent(before, cpu_snapshot())}


@contextlib.contextmanager
def busy_process() -> Iterator[subprocess.Popen]:
    """One competing process that keeps a core busy until the block ends."""
    process = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # let it settle on a core
        yield process
    finally:
        process.terminate()
        process.wait()


def table(header: list, rows: list) -> str:
    return "\n".join([f"| {' | '.join(header)} |", "|" + "---|" * len(header)]
                     + [f"| {' | '.join(row)} |" for row in rows])


def print_tables(results: Dict[str, dict], angles: List[float]) -> None:
    horizontal = [[label, f"{r['first']:.0f}", f"{statistics.median(r['drag']):.0f}", f"{max(r['drag']):.0f}",
                   *(f"{t:.0f}" for t in r["per_angle"]), f"{statistics.median(r['per_angle']):.0f}",
                   f"{r['foreign_percent']:.0f}"] for label, r in results.items()]
    vertical = [[label, *(f"{statistics.median(d):.0f} / {max(d):.0f}" for d in r["tilt_drags"]),
                 *(f"{t:.0f}" for t in r["tilted"])] for label, r in results.items()]
    print(table(["physics", "first render incl. preparation ms", "first drag median ms", "first drag slowest ms",
                 *(f"{a:+.0f} deg" for a in angles), "median over angles", "foreign CPU %"], horizontal))
    print("\nVertical angle (tilt), after the drag above: first tilt drags from -45 to +45 deg in 1 deg steps, "
          "median / slowest ms; then tilted views, median ms\n")
    print(table(["physics", "tilt drag at primary 0 deg", "tilt drag at primary 45 deg",
                 *(f"{p:+.0f} / {t:+.0f} deg" for p, t in TILTED)], vertical))


def print_ratios(quiet: Dict[str, dict], busy: Dict[str, dict]) -> None:
    """Busy / quiet per figure (the goal: within 3x)."""
    def ratio(key) -> str:
        return f"{key(b) / key(q):.1f}x"

    rows = []
    for label in quiet:
        q, b = quiet[label], busy[label]
        rows.append([label, ratio(lambda r: r["first"]), ratio(lambda r: statistics.median(r["drag"])),
                     ratio(lambda r: max(r["drag"])), ratio(lambda r: statistics.median(r["per_angle"])),
                     ratio(lambda r: max(r["per_angle"])), ratio(lambda r: statistics.median(r["tilted"])),
                     ratio(lambda r: max(r["tilted"]))])
    print(table(["physics", "first render", "first drag median", "first drag slowest", "median over angles",
                 "slowest angle", "tilted median", "slowest tilted"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("CT2X_DATA_DIR", "../shared/data")))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--step", type=float, default=15.0, help="primary-angle step of the sweep, deg")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads; the renderer projects with as many single-threaded workers")
    parser.add_argument("--busy", action="store_true", help="run again beside one competing busy process")
    parser.add_argument("--device", default="cpu", help="where the renderer projects: cpu (default) or cuda")
    parser.add_argument("--ct", type=Path, help="the CT (default: the data folder's chest), or its .npz from "
                                                "bench/chest_npz.py on a machine without SimpleITK")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    volume = load_bench_ct(args.ct or args.data_dir / "ct" / "chest_popi_phase00.nii.gz")
    carm = CArm()
    carm = carm.with_detector(256, fitted_detector_spacing_mm(volume, carm, 256))
    angles = [-90.0 + i * args.step for i in range(int(180 / args.step) + 1)]
    facts = machine_facts(args.device)
    print(f"Machine: {facts['cpu']}, {facts['cores']} cores (flags: {', '.join(facts['cpu_flags']) or 'none of note'}),"
          f" {facts['memory_gib']:.1f} GiB, Python {facts['python']}, torch {facts['torch']}, {args.threads} threads"
          + (f", GPU {facts['gpu']} (CUDA {facts['cuda']})" if "gpu" in facts else "") + f"; device {args.device}")
    print(f"chest CT {volume.hu.shape[::-1]} voxels, 256^2 detector at {carm.detector.pixel_spacing_mm[0]:.2f} mm, "
          f"median of {args.repeats} after a warm-up"
          + ("" if radiograph_to_vtk else "; vtk is missing: the render alone, not its conversion to vtkImageData")
          + "\n")
    runs = [("without a competing process", contextlib.nullcontext())]
    if args.busy:
        runs.append(("beside one busy process", busy_process()))
    results = {}
    for name, context in runs:
        load_before = load_average()
        with context:
            results[name] = {label: measure(volume, carm, physics, maps, angles, args.repeats, args.device)
                             for label, (physics, maps) in RENDERINGS.items()}
        print(f"### {name} (load average {load_before or 0:.2f} -> {load_average() or 0:.2f}; foreign CPU: the "
              "share of the machine other processes used while timing)\n")
        print_tables(results[name], angles)
        print()
    if args.busy:
        print("Busy / quiet (goal: within 3x)\n")
        print_ratios(results["without a competing process"], results["beside one busy process"])


if __name__ == "__main__":
    main()
