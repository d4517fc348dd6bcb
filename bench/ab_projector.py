"""Our projector at a base revision against the working tree's, alternating in one process on the real chest CT.

    python bench/ab_projector.py --base HEAD [--cases 'chest512-*-256-*'] [--threads 2] [--rounds 16]

A change to the projector that saves a millisecond or two is lost in the drift of a shared machine between two runs
of `bench_projector.py`. Here both projectors render each case's view in turn, round after round, in one process, so
that whatever the machine does in between falls on both alike. The table gives each one's median and their ratio,
the ratio of their fastest rounds (which the machine's noise, only ever adding time, disturbs least), the set-up
alone (planning and starting the regions, no sampling; one thread) and the largest difference between their images.
The base's `ct2x/projector/slicewarp.py` is read from git (`git show BASE:...`) and imported beside the working
tree's; the rest of ct2x is the working tree's. Cases, volumes and views are `bench_projector.py`'s.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from ct2x.drr import RENDER_SLAB_LENGTHS
from ct2x.projector import slicewarp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_projector import CASES, REPO_ROOT, load_case, prepare_volumes  # noqa: E402
from bench_reconstruct import load_average, machine_facts  # noqa: E402
from peers import cpu_snapshot, foreign_cpu_percent  # noqa: E402


def projector_at(revision: str):
    """The `slicewarp` module as it was at a git revision, imported as a sibling of today's (its relative imports
    resolve in today's ct2x)."""
    source = subprocess.run(["git", "show", f"{revision}:ct2x/projector/slicewarp.py"], cwd=REPO_ROOT, check=True,
                            capture_output=True, text=True).stdout
    name = "ct2x.projector._slicewarp_base"
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader=None))
    module.__package__ = "ct2x.projector"
    sys.modules[name] = module  # dataclasses look their module up there
    exec(compile(source, f"{revision}:ct2x/projector/slicewarp.py", "exec"), module.__dict__)  # noqa: S102
    return module


def run_conditions(threads: int, load_before: Optional[float], cpu_before) -> str:
    """The machine line of a run in this process: CPU, flags, Python, torch, threads and workers, load average and
    the foreign CPU share since `load_before` / `cpu_before` (`load_average()`, `cpu_snapshot()`)."""
    facts, cpu_after = machine_facts("cpu"), cpu_snapshot()
    foreign = f"{foreign_cpu_percent(cpu_before, cpu_after):.0f} %" if cpu_before and cpu_after else "unknown"
    flags = ", ".join(facts["cpu_flags"]) or "none of note"
    return (f"Machine: {facts['cpu']}, {facts['cores']} cores (flags: {flags}), Python {facts['python']}, torch "
            f"{facts['torch']}, {threads} threads and workers; load average {load_before or 0:.2f} -> "
            f"{load_average() or 0:.2f}, foreign CPU {foreign} over the run.")


def median_ms(times: List[float]) -> float:
    return float(np.median(times)) * 1e3


def set_up(projector, view) -> Callable[[], None]:
    """One view's planning and region start-up, without sampling: a projector without workers starts a region's
    chunks only when its result is asked for, which this never does."""
    def run() -> None:
        for plan in projector._plans(view):
            projector._start_region(view, plan, "sum")
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="HEAD", help="git revision of the projector to compare with")
    parser.add_argument("--data-dir", type=Path,
                        default=Path(os.environ.get("CT2X_DATA_DIR") or REPO_ROOT.parent / "shared" / "data"))
    parser.add_argument("--work-dir", type=Path, default=REPO_ROOT / "bench" / "_work")
    parser.add_argument("--cases", default="chest512-*-256-*", help="comma-separated patterns of bench_projector's")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, and the projectors' workers")
    parser.add_argument("--rounds", type=int, default=16, help="renders of each projector per case, alternating")
    parser.add_argument("--renderer", action="store_true",
                        help="the CT2XSynth renderer's projector settings (`ct2x.drr.DRRRenderer`): two channels, "
                             "straight slabs of its lengths, bands of rows, float16 stacks")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    prepare_volumes(args.data_dir, args.work_dir)
    cases = [case for case in CASES if any(fnmatch.fnmatchcase(case, pattern) for pattern in args.cases.split(","))]
    engines = {"base": projector_at(args.base).SliceWarpProjector, "working tree": slicewarp.SliceWarpProjector}
    load_before, cpu_before = load_average(), cpu_snapshot()
    rows = []
    for case in cases:
        mu, affine, view = load_case(args.work_dir, case)  # (K, J, I) 1/mm
        volume = torch.from_numpy(mu)[None, None]
        settings = {}
        if args.renderer:
            volume = volume.expand(1, 2, *mu.shape).contiguous()  # the renderer's soft-tissue and bone channels
            settings = dict(shear=False, merge_slabs=True, row_bands=True, slab_lengths=RENDER_SLAB_LENGTHS,
                            stack_dtype=torch.float16)
        projectors = {name: engine(volume, affine, workers=args.threads, **settings)
                      for name, engine in engines.items()}
        times: Dict[str, List[float]] = {name: [] for name in projectors}
        setups: Dict[str, List[float]] = {name: [] for name in projectors}
        images = {}
        with torch.no_grad():
            for projector in projectors.values():
                projector.prepare([view])
                projector.project([view])  # warm-up
            for _ in range(args.rounds):
                for name, projector in projectors.items():
                    start = time.perf_counter()
                    images[name] = projector.project([view])
                    times[name].append(time.perf_counter() - start)
            del projectors  # the set-up alone: projectors without workers, whose regions start nothing
            planners = {name: engine(volume, affine, **settings) for name, engine in engines.items()}
            for planner in planners.values():
                planner.prepare([view])
            with slicewarp.single_threaded_ops():
                for _ in range(args.rounds):
                    for name, planner in planners.items():
                        run = set_up(planner, view)
                        start = time.perf_counter()
                        run()
                        setups[name].append(time.perf_counter() - start)
        base, new = (median_ms(times[name]) for name in engines)
        base_least, new_least = (min(times[name]) * 1e3 for name in engines)
        difference = float((images["base"] - images["working tree"]).abs().max() / images["base"].abs().max())
        rows.append(f"| {case} | {base:.1f} | {new:.1f} | {base / new:.2f}x | {base_least / new_least:.2f}x | "
                    f"{median_ms(setups['base']):.2f} | "
                    f"{median_ms(setups['working tree']):.2f} | {difference:.1e} |")
        print(rows[-1], file=sys.stderr, flush=True)
    print(f"{run_conditions(args.threads, load_before, cpu_before)} Base: {args.base}; {args.rounds} alternating "
          f"rounds per case, medians{'; the renderer projector settings' if args.renderer else ''}.\n")
    print("| case | base ms | working tree ms | base / working tree | the same, fastest rounds | set-up ms, base "
          "(1 thread) | set-up ms, working tree | largest image difference / largest value |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
