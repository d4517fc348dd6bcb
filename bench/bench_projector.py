"""Benchmark our slice-warp projector against DiffDRR, nanodrr and plastimatch on the real chest CT (CPU).

    python bench/bench_projector.py [--data-dir ../shared/data] [--repeats 7] [--min-seconds 2] [--warmups 1]
                                    [--peers diffdrr,nanodrr,plastimatch]
                                    [--cases 'chest512-*-256-*']

Cases (VOLUME-VIEW-SIZE-DETECTOR): the chest CT at full resolution (512 x 512 x 141) and resampled to 128^3, AP and
lateral views on a 430 mm square detector of 128^2 and 256^2 pixels; at full resolution and 256^2 also the oblique
views 30, 45 and 60 deg, and all five views at the body-fitted pitch and at the CT2X-GAN paper's 1.164 mm pitch
(C-arm: source-to-detector 1020 mm, source-to-isocentre 700 mm, isocentre at the volume centre, cone beam). Every
engine integrates the same mu = 0.02/mm * max(0, 1 + HU/1000). Each engine runs each case in its own worker process
(this script with --engine/--case) so that peak memory and the whole-process time are its own. The exact reference
(`ct2x.projector.reference_projection`, 0.5 mm steps) is computed once per case and cached in bench/_work/.
See bench/README.md for the columns.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import SimpleITK as sitk
import torch

from ct2x.drr import fitted_detector_spacing_mm
from ct2x.geometry import CArm, Detector, View
from ct2x.io import load_ct
from ct2x.projector import SliceWarpProjector, reference_projection
from ct2x.volume import CTVolume

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_reconstruct import load_average, machine_facts  # noqa: E402
from peers import (  # noqa: E402
    DEFAULT_PEERS,
    MU_WATER_PER_MM,
    PEERS,
    Renderer,
    cpu_snapshot,
    foreign_cpu_percent,
    hu_to_mu,
    missing,
    peak_rss_mb,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
CHEST_CT = "ct/chest_popi_phase00.nii.gz"
SOURCE_TO_DETECTOR_MM = 1020.0
SOURCE_TO_ISOCENTER_MM = 700.0
DETECTOR_MM = 430.0  # square detector edge
VIEWS = {"AP": 0.0, "30deg": 30.0, "45deg": 45.0, "60deg": 60.0, "lateral": 90.0}  # C-arm primary angle, degrees
VOLUMES = {"chest512": "512²×141", "chest128": "128³"}  # cache name -> label
PAPER_PITCH_MM = 1.164  # the CT2X-GAN paper's mobile C-arm detector pitch
DETECTORS = {"430mm": "430 mm", "fitted": "body-fitted", "paper": f"{PAPER_PITCH_MM} mm"}  # pitch rule -> label
CASES = ([f"{volume}-{view}-{size}-430mm" for volume in VOLUMES for size in (128, 256) for view in ("AP", "lateral")]
         + [f"chest512-{view}-256-430mm" for view in ("30deg", "45deg", "60deg")]
         + [f"chest512-{view}-256-{detector}" for detector in ("fitted", "paper") for view in VIEWS])
RESAMPLED_SIZE = 128  # voxels per axis of the resampled volume
REFERENCE_STEP_MM = 0.5
PREP_REPEATS = 3  # our per-CT preparation is timed this many times (median)
ENGINE_LABELS = {"ours": "ours", "diffdrr": "DiffDRR", "diffdrr-trilinear": "DiffDRR-tri", "nanodrr": "nanodrr",
                 "plastimatch": "plastimatch"}


# --- cases and views -------------------------------------------------------------------------------------------
def parse_case(case: str) -> Tuple[str, str, int, str]:
    volume, view, size, detector = case.split("-")
    return volume, view, int(size), detector


def case_label(case: str, pitch_mm: Optional[float] = None) -> str:
    volume, view, size, detector = parse_case(case)
    pitch = f" ({pitch_mm:.2f} mm)" if detector == "fitted" and pitch_mm else ""
    return f"{VOLUMES[volume]} {view} {size}² {DETECTORS[detector]}{pitch}"


def reference_file(case: str) -> str:
    """Cached exact reference of a case (the 430 mm detector keeps the name of earlier runs' caches)."""
    _, view, size, detector = parse_case(case)
    return f"reference_{view}_{size}.npy" if detector == "430mm" else f"reference_{view}_{size}_{detector}.npy"


def make_view(mu: np.ndarray, affine: np.ndarray, view: str, size: int, detector: str) -> View:
    """The benchmark view of a mu volume (K, J, I; 1/mm): isocentre at the volume centre (RAS mm), size^2 pixels at
    the detector's pitch: 430 mm / size, body-fitted over the slider's sweep, or the paper's 1.164 mm."""
    center_ijk = (np.array(mu.shape[::-1], dtype=np.float64) - 1.0) / 2.0  # (3,) voxel index
    center_ras = affine[:3, :3] @ center_ijk + affine[:3, 3]
    carm = CArm(SOURCE_TO_DETECTOR_MM, SOURCE_TO_ISOCENTER_MM, Detector.square(size, DETECTOR_MM / size))
    if detector == "paper":
        carm = carm.with_detector(size, PAPER_PITCH_MM)
    elif detector == "fitted":  # mu back to HU: the body (above -500 HU) is what counts
        hu_like = CTVolume(hu=mu / MU_WATER_PER_MM * 1000.0 - 1000.0, affine=affine)
        carm = carm.with_detector(size, fitted_detector_spacing_mm(hu_like, carm, size))
    return carm.view(VIEWS[view], 0.0, center_ras)


# --- volumes (cached as mu in bench/_work/<volume>/) ------------------------------------------------------------
def resample_to_cube(volume: CTVolume, size: int) -> CTVolume:
    """The whole volume resampled (linear) to `size` voxels per axis, covering the same box."""
    image = volume.to_sitk()
    old_size = np.array(image.GetSize(), dtype=np.float64)
    old_spacing = np.array(image.GetSpacing())
    new_spacing = old_size * old_spacing / size  # (3,) mm, same extent
    direction = np.array(image.GetDirection()).reshape(3, 3)
    origin = np.array(image.GetOrigin()) + direction @ ((new_spacing - old_spacing) / 2.0)  # LPS mm, voxel 0 centre
    resampled = sitk.Resample(image, [size] * 3, sitk.Transform(), sitk.sitkLinear, origin.tolist(),
                              new_spacing.tolist(), image.GetDirection(), -1024.0, sitk.sitkFloat32)
    return CTVolume.from_sitk(resampled, source=f"{volume.source} resampled to {size}^3")


def prepare_volumes(data_dir: Path, work_root: Path) -> None:
    """Write mu.npy (K, J, I float32 1/mm) and affine.npy (ijk -> RAS) for each volume, unless already current."""
    path = data_dir / CHEST_CT
    if not path.is_file():
        raise SystemExit(f"{path}: not found; pass --data-dir (the shared data folder) or set CT2X_DATA_DIR")
    stamp = {"source": str(path.resolve()), "mtime": path.stat().st_mtime, "resampled_size": RESAMPLED_SIZE}
    if all(_read_json(work_root / name / "volume.json") == stamp for name in VOLUMES):
        return
    full = load_ct(path)
    for name, volume in (("chest512", full), ("chest128", resample_to_cube(full, RESAMPLED_SIZE))):
        folder = work_root / name
        shutil.rmtree(folder, ignore_errors=True)  # references, results and plastimatch input of an older volume
        folder.mkdir(parents=True)
        np.save(folder / "mu.npy", hu_to_mu(volume.hu))
        np.save(folder / "affine.npy", volume.affine)
        (folder / "volume.json").write_text(json.dumps(stamp))


def _read_json(path: Path) -> Optional[dict]:
    return json.loads(path.read_text()) if path.is_file() else None


# --- worker: one engine, one case ------------------------------------------------------------------------------
class OursRenderer(Renderer):
    """`SliceWarpProjector` (anti-aliased, the default) with as many single-threaded workers as torch threads (the
    DRR renderer's policy); setup = constructor + prepare([view])."""

    name = "ours"

    def __init__(self, mu: np.ndarray, affine: np.ndarray, view: View, work_dir: Path):
        super().__init__(mu, affine, view, work_dir)
        self.volume = torch.from_numpy(mu)[None, None]  # (1, 1, K, J, I) 1/mm
        self.affine = affine
        self.prep_seconds = []
        for _ in range(PREP_REPEATS):
            start = time.perf_counter()
            self.projector = SliceWarpProjector(self.volume, affine, workers=torch.get_num_threads())
            self.projector.prepare([view])
            self.prep_seconds.append(time.perf_counter() - start)

    def render(self) -> np.ndarray:
        # float64 by numpy, not torch: a torch op here, outside the projector, would run on torch's OpenMP threads,
        # which then spin for milliseconds and take the cores from the workers of the next render (the fitted AP
        # view's median 10.4 -> 6.6 ms; bench/RESULTS.md, thirteenth stop).
        with torch.no_grad():
            return self.projector.project([self.view])[0, 0, 0].numpy().astype(np.float64)


def load_case(work_dir: Path, case: str) -> Tuple[np.ndarray, np.ndarray, View]:
    """A case's cached volume and its view: mu (K, J, I) float32 1/mm, the voxel -> RAS affine, the View."""
    volume, view_name, size, detector = parse_case(case)
    mu = np.load(work_dir / volume / "mu.npy")
    affine = np.load(work_dir / volume / "affine.npy")
    return mu, affine, make_view(mu, affine, view_name, size, detector)


def run_worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    folder = args.work_dir / parse_case(args.case)[0]
    mu, affine, view = load_case(args.work_dir, args.case)
    out = folder / "results" / args.case
    out.mkdir(parents=True, exist_ok=True)
    result = {"engine": args.engine, "case": args.case, "threads": args.threads,
              "pitch_mm": view.detector.pixel_spacing_mm[0], "rss_before_engine_mb": peak_rss_mb()}
    if args.engine == "reference":
        start = time.perf_counter()
        image = reference_projection(torch.from_numpy(mu)[None], affine, view, REFERENCE_STEP_MM)[0].numpy()
        result["seconds"] = [time.perf_counter() - start]
        np.save(folder / reference_file(args.case), image)
    else:
        renderer_class = OursRenderer if args.engine == "ours" else PEERS[args.engine]
        start = time.perf_counter()
        renderer = renderer_class(mu, affine, view, folder)
        result["setup_seconds"] = time.perf_counter() - start
        renderer.render()  # the first image: the warm-up
        # Whole process: from the driver starting this worker (Python, imports, reading mu.npy, one setup) to the
        # first image; plastimatch's own process does all that per image, so its figure is that process's wall time.
        result["whole_seconds"] = time.time() - args.launched_at
        if isinstance(renderer, OursRenderer):
            result["prep_seconds"] = renderer.prep_seconds
            result["whole_seconds"] -= sum(renderer.prep_seconds[1:])  # the repeats of the setup are not paid
        before = cpu_snapshot()
        result["seconds"], image = renderer.timed_renders(args.warmups - 1, args.repeats, args.max_seconds,
                                                          args.min_seconds)
        after = cpu_snapshot()
        if before and after:
            result["foreign_cpu_percent"] = foreign_cpu_percent(before, after)
        if isinstance(renderer, PEERS["plastimatch"]):
            result["whole_seconds"] = float(np.median(renderer.process_seconds))
        result["peak_rss_mb"] = renderer.peak_rss_mb()
        np.save(out / f"{args.engine}.npy", image)
    (out / f"{args.engine}.json").write_text(json.dumps(result))


# --- driver ----------------------------------------------------------------------------------------------------
def spawn(args: argparse.Namespace, engine: str, case: str) -> Optional[str]:
    """Run one worker; None on success, else a short reason."""
    command = [sys.executable, str(Path(__file__).resolve()), "--engine", engine, "--case", case,
               "--work-dir", str(args.work_dir), "--repeats", str(args.repeats), "--warmups", str(args.warmups),
               "--max-seconds", str(args.max_seconds), "--min-seconds", str(args.min_seconds),
               "--threads", str(args.threads),
               "--launched-at", repr(time.time())]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return f"timed out after {args.timeout:.0f} s"
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines() or [f"exit status {done.returncode}"]
        sys.stderr.write(f"[{engine} {case}] failed:\n{done.stderr[-3000:]}\n")
        return "failed: " + lines[-1][:80]
    return None


def relative_l2(ours: np.ndarray, other: np.ndarray) -> float:
    """||ours - other|| / ||other|| over the whole image."""
    return float(np.linalg.norm(ours - other) / np.linalg.norm(other))


def run_case(args: argparse.Namespace, case: str, peers: List[str], unavailable: Dict[str, str]) -> dict:
    volume = parse_case(case)[0]
    folder = args.work_dir / volume
    reference_path = folder / reference_file(case)
    row = {"case": case, "engines": {}}
    if not reference_path.is_file():
        print(f"  {case}: exact reference (once; cached in {reference_path.parent})", file=sys.stderr, flush=True)
        error = spawn(args, "reference", case)
        if error:
            raise SystemExit(f"reference projection failed for {case}: {error}")
    reference = np.load(reference_path)
    ours = None
    for engine in ["ours"] + peers:
        if engine in unavailable:
            row["engines"][engine] = {"status": unavailable[engine]}
            continue
        print(f"  {case}: {engine}", file=sys.stderr, flush=True)
        error = spawn(args, engine, case)
        if error:
            row["engines"][engine] = {"status": error}
            continue
        out = folder / "results" / case
        result = json.loads((out / f"{engine}.json").read_text())
        image = np.load(out / f"{engine}.npy")
        result["status"] = "ok"
        result["median_ms"] = 1000.0 * float(np.median(result["seconds"]))
        result["l2_vs_reference"] = relative_l2(image, reference)
        if engine == "ours":
            ours = image
            result["prep_ms"] = 1000.0 * float(np.median(result["prep_seconds"]))
        elif ours is not None:
            result["l2_ours_vs_this"] = relative_l2(ours, image)
        row["engines"][engine] = result
    return row


def _ms(value: float) -> str:
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def _times(value: float) -> str:
    return f"{value:.1f}×" if value < 10 else f"{value:.0f}×"


def _percent(value: float) -> str:
    return f"{value:.2%}"


def _seconds(value: float) -> str:
    return f"{value:.2f}" if value < 10 else f"{value:.0f}"


def _megabytes(value: float) -> str:
    return f"{value:.0f}"


def _cell(result: dict, key: str, fmt, repeats: int = 0) -> str:
    """An engine's value (with the run count when below `repeats`), "not installed", "failed" (why: under the
    tables) or "–"."""
    if result.get("status") != "ok":
        return result.get("status", "–").split(":")[0]
    if key not in result:
        return "–"
    text = fmt(result[key])
    if key == "median_ms" and len(result["seconds"]) < repeats:
        text += f" (n={len(result['seconds'])})"
    return text


def _ratio(result: dict, ours: dict) -> str:
    if result.get("status") != "ok" or ours.get("status") != "ok":
        return "–"
    return _times(result["median_ms"] / ours["median_ms"])


def format_tables(rows: List[dict], peers: List[str], repeats: int) -> str:
    """Markdown: speed and memory per case, then agreement of the images."""
    labels = [ENGINE_LABELS.get(p, p) for p in peers]
    speed_columns = ["case", "ours ms", "ours prep ms",
                     *(f"{label} ms{' (own clock)' if p == 'plastimatch' else ''}" for p, label in zip(peers, labels)),
                     *(f"{label}/ours" for label in labels), "whole process s: ours", *labels,
                     "peak RSS MB: ours", *labels]
    agreement_columns = ["case", "ours vs exact", *(f"ours vs {label}" for label in labels),
                         *(f"{label} vs exact" for label in labels)]
    speed, agreement = ([f"| {' | '.join(columns)} |", "|" + "---|" * len(columns)]
                        for columns in (speed_columns, agreement_columns))
    for row in rows:
        engines = row["engines"]
        ours = engines["ours"]
        label = case_label(row["case"], ours.get("pitch_mm"))
        speed.append(" | ".join([f"| {label}", _cell(ours, "median_ms", _ms, repeats), _cell(ours, "prep_ms", _ms)]
                                + [_cell(engines[p], "median_ms", _ms, repeats) for p in peers]
                                + [_ratio(engines[p], ours) for p in peers]
                                + [_cell(engines[e], "whole_seconds", _seconds) for e in ["ours"] + peers]
                                + [_cell(engines[e], "peak_rss_mb", _megabytes) for e in ["ours"] + peers]) + " |")
        agreement.append(" | ".join([f"| {label}", _cell(ours, "l2_vs_reference", _percent)]
                                    + [_cell(engines[p], "l2_ours_vs_this", _percent) for p in peers]
                                    + [_cell(engines[p], "l2_vs_reference", _percent) for p in peers]) + " |")
    return "\n".join(speed) + "\n\n" + "\n".join(agreement)


def failure_notes(rows: List[dict]) -> str:
    """One line per engine failure, the first line of its error (the full traceback went to stderr)."""
    failures = {f"{engine}: {result['status']}" for row in rows for engine, result in row["engines"].items()
                if result.get("status", "").startswith("failed")}
    return "".join(f"\n\n{failure}" for failure in sorted(failures))


def busy_warning(rows: List[dict], limit_percent: float = 10.0) -> str:
    """A note naming the timings taken while something else used more than `limit_percent` of the machine's CPU."""
    busy = [f"{row['case']} {engine} ({result['foreign_cpu_percent']:.0f} %)" for row in rows
            for engine, result in row["engines"].items() if result.get("foreign_cpu_percent", 0.0) > limit_percent]
    if not busy:
        return ""
    return ("\n\nWarning: other processes or the hypervisor used the CPU while timing " + ", ".join(busy)
            + "; those times are unreliable, run again on a quiet machine.")


def _foreign_range(rows: List[dict]) -> str:
    """The smallest and largest foreign CPU share (%) of any timing, e.g. "0-3 %"."""
    shares = [result["foreign_cpu_percent"] for row in rows for result in row["engines"].values()
              if "foreign_cpu_percent" in result]
    return f"{min(shares):.0f}-{max(shares):.0f} %" if shares else "not measured"


def run_driver(args: argparse.Namespace) -> None:
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        raise SystemExit(f"unknown peer(s) {unknown}; choose from {sorted(PEERS)}")
    unavailable = {p: reason for p in peers if (reason := missing(p))}
    print(f"preparing volumes in {args.work_dir}", file=sys.stderr, flush=True)
    prepare_volumes(args.data_dir, args.work_dir)
    cases = [case for case in CASES if any(fnmatch.fnmatchcase(case, pattern) for pattern in args.cases.split(","))]
    if not cases:
        raise SystemExit(f"--cases {args.cases!r} matches none of {', '.join(CASES)}")
    start = time.perf_counter()
    load_before = load_average()
    rows = [run_case(args, case, peers, unavailable) for case in cases]
    facts = machine_facts("cpu")
    flags = ", ".join(facts["cpu_flags"]) or "none of note"
    header = (f"Machine: {facts['cpu']}, {facts['cores']} cores (flags: {flags}), {facts['memory_gib']:.1f} GiB, "
              f"Python {facts['python']}, torch {facts['torch']}, {args.threads} threads "
              f"per engine (ours: as many single-threaded workers); load average {load_before or 0:.2f} -> "
              f"{load_average() or 0:.2f}, foreign CPU {_foreign_range(rows)} while timing.\n\n"
              f"Median of at least {args.repeats} runs"
              + (f" and {args.min_seconds:g} s" if args.min_seconds > 0 else "")
              + f" after {args.warmups} warm-up{'s' if args.warmups > 1 else ''}; "
              "plastimatch ms is its own clock (\"Total time\" "
              "minus \"I/O time\": after reading the volume, before writing the image; no process start-up), its "
              "whole-process figure the wall time of one `plastimatch drr` process; the others' whole process: a "
              "fresh worker from start to its first image. Relative L2 = ||ours - X|| / ||X|| (and ||X - exact|| / "
              "||exact||).")
    text = header + "\n\n" + format_tables(rows, peers, args.repeats) + failure_notes(rows) + busy_warning(rows)
    print(text)
    summary = {"settings": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
               "wall_seconds": time.perf_counter() - start, "table": text}
    (args.work_dir / "results.json").write_text(json.dumps(summary, indent=1))


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_data = os.environ.get("CT2X_DATA_DIR") or str(REPO_ROOT.parent / "shared" / "data")
    parser.add_argument("--data-dir", type=Path, default=Path(default_data),
                        help="folder holding ct/chest_popi_phase00.nii.gz (default: $CT2X_DATA_DIR or ../shared/data)")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per engine and case (after the warm-ups)")
    parser.add_argument("--warmups", type=lambda text: max(1, int(text)), default=1,
                        help="untimed renders first, per engine and case (at least 1: the first image is the "
                             "whole-process figure's). A fresh process's first renders also fault in the memory its "
                             "allocator maps, until the allocator settles (about 6 renders of ours; bench/RESULTS.md, "
                             "fourteenth stop)")
    parser.add_argument("--min-seconds", type=float, default=2.0,
                        help="keep timing an engine on a case until this much wall time has passed (after at least "
                             "--repeats runs), so that every engine's median spans seconds of this machine's changing "
                             "pace, as plastimatch's processes do; 0: exactly --repeats runs, the protocol before the "
                             "fifteenth stop")
    parser.add_argument("--max-seconds", type=float, default=30.0,
                        help="stop timing an engine on a case once its timed runs add up to this (at least 3 runs)")
    parser.add_argument("--peers", default=",".join(DEFAULT_PEERS),
                        help=f"comma-separated, from {', '.join(sorted(PEERS))}")
    parser.add_argument("--threads", type=int, default=2, help="torch / OpenMP threads per engine")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds before a worker is given up")
    parser.add_argument("--work-dir", type=Path, default=REPO_ROOT / "bench" / "_work",
                        help="cache of volumes, references and results (git-ignored)")
    parser.add_argument("--engine", help="worker mode: run one engine ('ours', 'reference' or a peer) on --case")
    parser.add_argument("--cases", default="*",
                        help="comma-separated patterns of the cases to run (VOLUME-VIEW-SIZE-DETECTOR, e.g. "
                             "'chest512-*-256-paper'); default all: " + ", ".join(CASES))
    parser.add_argument("--case", help="worker mode: one case, e.g. chest512-AP-256-430mm")
    parser.add_argument("--launched-at", type=float, help="worker mode: time.time() when the driver started it")
    args = parser.parse_args(argv)
    if args.engine:
        run_worker(args)
    else:
        run_driver(args)


if __name__ == "__main__":
    main()
