"""Writes the real chest CT as an .npz (`hu` int16 (K, J, I), `affine` float64 (4, 4) voxel -> RAS mm, 37 MB) that
`bench_slider.py --ct` and `bench_views.py --ct` read on a machine without SimpleITK (the lent GPU machine has none
and cannot install it; `bench/gpu_lease.sh`).

    python bench/chest_npz.py [--data-dir ../shared/data] [--out bench/_work/chest.npz]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from ct2x.io import load_ct

BENCH = Path(__file__).resolve().parent
CHEST_CT = "ct/chest_popi_phase00.nii.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("CT2X_DATA_DIR", "../shared/data")))
    parser.add_argument("--out", type=Path, default=BENCH / "_work" / "chest.npz")
    args = parser.parse_args()
    chest = load_ct(args.data_dir / CHEST_CT)
    hu = np.rint(chest.hu)
    if hu.min() < np.iinfo(np.int16).min or hu.max() > np.iinfo(np.int16).max or not np.array_equal(hu, chest.hu):
        raise SystemExit(f"{chest.source}: HU are not whole numbers within int16; not written")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_name(args.out.name + ".partial.npz")
    np.savez_compressed(partial, hu=hu.astype(np.int16), affine=chest.affine)
    partial.replace(args.out)
    print(f"{args.out}: {chest.hu.shape[::-1]} voxels (i, j, k), {args.out.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
