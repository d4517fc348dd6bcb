"""Peak memory of a DRR job against `ct2x.memory.drr_peak_bytes`, the estimate that refuses jobs before they start.

Each case runs in its own process (so its peak resident size is its own): build or load the CT, prepare a
`DRRRenderer` (60 kV, 3 material channels) and render four views (0, 30, 45, 90 deg). Prints a markdown table of the
measured peak, the estimate and their ratio (estimate / measured: above 1 means the estimate is conservative).

    python bench/bench_memory.py [--data-dir ../shared/data]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np

SYNTHETIC = [  # (voxels i = j, voxels k, voxel mm, detector px): an ellipsoidal body in air, 1 x 1 x 2 mm voxels
    (128, 128, 1.0, 256),
    (256, 128, 1.0, 256),
    (256, 256, 1.0, 256),
    (384, 256, 1.0, 256),
    (512, 300, 1.0, 256),
    (128, 128, 1.0, 1024),
    (128, 128, 1.0, 2048),
]
VIEWS_DEG = (0.0, 30.0, 45.0, 90.0)


def measure(case: dict) -> dict:
    """Run one case in this process; peak resident bytes and the estimate."""
    import torch

    from ct2x.drr import DRRRenderer, _crop_to_body, fitted_detector_spacing_mm
    from ct2x.geometry import CArm
    from ct2x.io import load_ct
    from ct2x.memory import drr_peak_bytes
    from ct2x.volume import CTVolume

    torch.set_num_threads(2)
    if "path" in case:
        volume = load_ct(case["path"])
    else:
        n, k = case["n"], case["k"]
        kk, jj, ii = np.ogrid[:k, :n, :n]
        body = ((ii - n / 2) / (0.4 * n)) ** 2 + ((jj - n / 2) / (0.3 * n)) ** 2 + ((kk - k / 2) / (0.45 * k)) ** 2 <= 1
        hu = np.where(body, np.float32(40.0), np.float32(-1000.0))  # (K, J, I) HU
        hu[k // 3:k // 2, n // 3:n // 2, n // 3:n // 2] = 700.0  # a bone block
        volume = CTVolume(hu, np.diag([case["mm"], case["mm"], 2 * case["mm"], 1.0]))
        del hu, body
    carm = CArm()
    carm = carm.with_detector(case["px"], fitted_detector_spacing_mm(volume, carm, case["px"]))
    body_voxels = _crop_to_body(volume)[0].size
    renderer = DRRRenderer(volume, carm)
    for angle in VIEWS_DEG:
        renderer.render(angle)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kB
    return {"peak_bytes": peak, "estimate_bytes": drr_peak_bytes(body_voxels, case["px"] ** 2, len(VIEWS_DEG)),
            "volume": f"{volume.shape_ijk[0]}x{volume.shape_ijk[1]}x{volume.shape_ijk[2]}", "body_voxels": body_voxels}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("CT2X_DATA_DIR", "../shared/data")))
    parser.add_argument("--case", help=argparse.SUPPRESS)  # worker mode: one case as JSON
    args = parser.parse_args()
    if args.case:
        print(json.dumps(measure(json.loads(args.case))))
        return

    cases = [{"n": n, "k": k, "mm": mm, "px": px, "name": f"synthetic {n}x{n}x{k}"} for n, k, mm, px in SYNTHETIC]
    chest = args.data_dir / "ct" / "chest_popi_phase00.nii.gz"
    if chest.exists():
        cases.append({"path": str(chest), "px": 256, "name": "real chest"})
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"peak resident size of one process per case, {len(VIEWS_DEG)} views at 60 kV\n")
    print("| case | volume | body voxels | detector | measured peak MiB | estimate MiB | estimate / measured |")
    print("|---|---|---|---|---|---|---|")
    for case in cases:
        result = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)], capture_output=True,
                                text=True, check=True)
        row = json.loads(result.stdout.strip().splitlines()[-1])
        print(f"| {case['name']} | {row['volume']} | {row['body_voxels'] / 1e6:.1f} M | {case['px']}² | "
              f"{row['peak_bytes'] / 2**20:.0f} | {row['estimate_bytes'] / 2**20:.0f} | "
              f"{row['estimate_bytes'] / row['peak_bytes']:.2f} |")


if __name__ == "__main__":
    main()
