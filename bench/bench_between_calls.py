"""What a caller does between two projector calls, and what it costs the next call (real chest CT, CPU).

    python bench/bench_between_calls.py [--case chest512-AP-256-fitted] [--threads 2] [--rounds 40]

The projector's workers run torch single-threaded; a torch op of the caller's on torch's own (OpenMP) threads, even
a conversion of the film, leaves those threads spinning for a while after it, beside the workers of the next call.
Each round renders the case's view once after each of these, in turn, in one process (so that the machine's drift
falls on all alike), and times the render alone:

- nothing: renders back to back;
- numpy: the film to float64 by numpy (`bench_projector.py` since the thirteenth stop);
- torch: the film to float64 by torch (`.double()`, on torch's threads; `bench_projector.py` before);
- torch, single-threaded: the same inside `single_threaded_ops` (as `ct2x.drr.DRRRenderer` runs its physics).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import torch

from ct2x.projector import SliceWarpProjector, single_threaded_ops

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ab_projector import run_conditions  # noqa: E402
from bench_projector import CASES, REPO_ROOT, load_case, prepare_volumes  # noqa: E402
from bench_reconstruct import load_average  # noqa: E402
from peers import cpu_snapshot  # noqa: E402


def in_single_thread(film: torch.Tensor) -> np.ndarray:
    with single_threaded_ops():
        return film.double().numpy()


BETWEEN: Dict[str, Callable[[torch.Tensor], object]] = {
    "nothing": lambda film: None,
    "numpy": lambda film: film.numpy().astype(np.float64),
    "torch": lambda film: film.double().numpy(),
    "torch, single-threaded": in_single_thread,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path,
                        default=Path(os.environ.get("CT2X_DATA_DIR") or REPO_ROOT.parent / "shared" / "data"))
    parser.add_argument("--work-dir", type=Path, default=REPO_ROOT / "bench" / "_work")
    parser.add_argument("--case", default="chest512-AP-256-fitted", choices=CASES)
    parser.add_argument("--threads", type=int, default=2, help="torch threads, and the projector's workers")
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    prepare_volumes(args.data_dir, args.work_dir)
    mu, affine, view = load_case(args.work_dir, args.case)  # (K, J, I) 1/mm
    projector = SliceWarpProjector(torch.from_numpy(mu)[None, None], affine, workers=args.threads)
    projector.prepare([view])
    load_before, cpu_before = load_average(), cpu_snapshot()
    times: Dict[str, List[float]] = {name: [] for name in BETWEEN}
    with torch.no_grad():
        film = projector.project([view])[0, 0, 0]  # warm-up
        for _ in range(args.rounds):
            for name, between in BETWEEN.items():
                between(film)
                start = time.perf_counter()
                film = projector.project([view])[0, 0, 0]
                times[name].append(time.perf_counter() - start)
    print(f"{run_conditions(args.threads, load_before, cpu_before)} {args.case}, {args.rounds} rounds.\n")
    print("| between calls | render ms, median | fastest |")
    print("|---|---|---|")
    for name, seconds in times.items():
        print(f"| {name} | {np.median(seconds) * 1e3:.1f} | {min(seconds) * 1e3:.1f} |")


if __name__ == "__main__":
    main()
