"""Views per second of our projector: batches of 256² views of a 128³ volume and of the real chest, CPU or GPU.

Issue 14's GPU goal is a 256² view of a 128³ volume in at most 0.1 ms per view within a batch of views. This times
`SliceWarpProjector.project` on batches of P views spread evenly over the primary angle -90 ... 90 deg (cone beam,
source-to-detector 1020 mm, source-to-isocentre 700 mm, a 430 mm square detector of 256² pixels: the geometry of
`bench_projector.py`), after `prepare` has re-sliced what they need. Volumes: the built-in chest phantom at 128³ x
2.5 mm (always there), and the real chest CT 512 x 512 x 141 when the data folder has it; attenuation as in
`bench_projector.py` (mu = 0.02 /mm x max(0, 1 + HU/1000)).

Both of the projector's paths are timed in the same run: per view (`batched=False`, the CPU default: numpy ray
planning per view, only the rays that meet a chunk of slabs sampled), whose numpy planning time per view is reported
too, as a GPU does not speed it up; and batched (`batched=True`, the GPU default, `ct2x/projector/view_batch.py`:
planning on the device, one sampling call per stack and chunk of slabs for all views), with the relative L2
difference of the batched path's films from the per-view path's.

    python bench/bench_views.py [--device cuda] [--data-dir ../shared/data] [--views 1,16,64] [--repeats 5]
                                [--ct CT_OR_NPZ]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import torch

from ct2x import phantoms
from ct2x.geometry import CArm, Detector
from ct2x.projector import SliceWarpProjector

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_projector import CHEST_CT, DETECTOR_MM, SOURCE_TO_DETECTOR_MM, SOURCE_TO_ISOCENTER_MM  # noqa: E402
from bench_reconstruct import load_average, load_bench_ct, machine_facts, synchronize  # noqa: E402
from peers import hu_to_mu  # noqa: E402

GOAL_MS_PER_VIEW = 0.1  # issue 14, GPU: a 256² view of a 128³ volume within a batch of views
SIZE_PX = 256


def volumes(path: Path) -> Dict[str, tuple]:
    """name -> (mu (K, J, I) float32 1/mm, voxel -> RAS affine)."""
    phantom = phantoms.chest(size=128, spacing_mm=2.5)
    found = {"chest phantom 128³": (hu_to_mu(phantom.hu), phantom.affine)}
    if path.is_file():
        chest = load_bench_ct(path)
        found["real chest 512²×141"] = (hu_to_mu(chest.hu), chest.affine)
    else:
        print(f"{path}: not found, the real chest is left out (pass --data-dir or --ct)")
    return found


def views_of(affine: np.ndarray, shape_kji: tuple, count: int) -> list:
    """`count` views spread over the primary angle -90 ... 90 deg about the volume centre."""
    center = affine[:3, :3] @ ((np.array(shape_kji[::-1], dtype=np.float64) - 1) / 2) + affine[:3, 3]  # RAS mm
    carm = CArm(SOURCE_TO_DETECTOR_MM, SOURCE_TO_ISOCENTER_MM, Detector.square(SIZE_PX, DETECTOR_MM / SIZE_PX))
    return [carm.view(float(angle), 0.0, center) for angle in np.linspace(-90.0, 90.0, count)]


def median_ms(call: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall time (ms) of `call` after one warm-up, the device synchronised around each."""
    times = []
    for index in range(repeats + 1):
        synchronize(str(device))
        start = time.perf_counter()
        call()
        synchronize(str(device))
        if index:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure(mu: np.ndarray, affine: np.ndarray, counts: List[int], device: torch.device, repeats: int) -> list:
    """One row per batch size and path: batch ms, ms per view, planning ms per view, preparation ms, and the
    batched films' relative L2 difference from the per-view path's."""
    volume = torch.from_numpy(mu).to(device)[None, None]  # (1, 1, K, J, I)
    workers = torch.get_num_threads() if device.type == "cpu" else 1
    rows = []
    for count in counts:
        views = views_of(affine, mu.shape, count)
        films = {}
        for batched in (False, True):
            projector = SliceWarpProjector(volume, affine, workers=workers, batched=batched)
            rows.append({"path": "batched" if batched else "per view",
                         **measure_batch(projector, views, device, repeats)})
            with torch.no_grad():
                films[batched] = projector.project(views).double()
        rows[-1]["difference"] = float(torch.norm(films[True] - films[False]) / torch.norm(films[False]))
    return rows


def measure_batch(projector: SliceWarpProjector, views: list, device: torch.device, repeats: int) -> dict:
    start = time.perf_counter()
    projector.prepare(views)
    prepare_ms = (time.perf_counter() - start) * 1e3
    with torch.no_grad():
        batch_ms = median_ms(lambda: projector.project(views), device, repeats)
    planning_ms = (median_ms(lambda: [projector._plans(view) for view in views], torch.device("cpu"), repeats)
                   if not projector.batched else math.nan)
    return {"views": len(views), "batch_ms": batch_ms, "per_view_ms": batch_ms / len(views),
            "planning_per_view_ms": planning_ms / len(views), "prepare_ms": prepare_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("CT2X_DATA_DIR", "../shared/data")))
    parser.add_argument("--views", default="1,16,64", help="batch sizes, comma-separated")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (CPU: as many projector workers)")
    parser.add_argument("--ct", type=Path, help="the real chest (default: the data folder's), or its .npz from "
                                                "bench/chest_npz.py on a machine without SimpleITK")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    counts = [int(count) for count in args.views.split(",")]
    facts = machine_facts(args.device)
    gpu = f", GPU {facts['gpu']} (CUDA {facts['cuda']})" if "gpu" in facts else ""
    print(f"Machine: {facts['cpu']}, {facts['cores']} cores, {facts['memory_gib']:.1f} GiB, Python {facts['python']}, "
          f"torch {facts['torch']}, {args.threads} threads{gpu}; device {device}; load average "
          f"{load_average() or 0:.2f}\n")
    print("| volume | views per batch | path | ms per batch | ms per view | of which numpy planning ms per view | "
          "preparation ms | films' relative L2 difference from the per-view path |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (mu, affine) in volumes(args.ct or args.data_dir / CHEST_CT).items():
        for row in measure(mu, affine, counts, device, args.repeats):
            planning = "" if math.isnan(row["planning_per_view_ms"]) else f"{row['planning_per_view_ms']:.2f}"
            difference = f"{row['difference']:.1e}" if "difference" in row else ""
            print(f"| {name} | {row['views']} | {row['path']} | {row['batch_ms']:.1f} | {row['per_view_ms']:.2f} | "
                  f"{planning} | {row['prepare_ms']:.0f} | {difference} |")
    print(f"\nGoal (issue 14, GPU): a 256² view of a 128³ volume in <= {GOAL_MS_PER_VIEW} ms within a batch of views.")


if __name__ == "__main__":
    main()
