"""`ct2x prepare recon CT... --out DIR`: CTs -> cases (cube CT + PA and lateral films) for X-ray -> CT training."""

from __future__ import annotations

import argparse
import os
from collections import Counter

from ct2x.errors import CT2XInputError


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "prepare", help="prepare training data from CTs",
        description="Turn CTs into training cases for X-ray -> CT networks: each CT resampled onto X2CT-GAN's "
                    "cube (D superior->inferior, H anterior->posterior, W right->left) with its PA and lateral films "
                    "rendered as the official pipeline does. Resumes an interrupted folder; skips and reports bad CTs.")
    parser.add_argument("task", choices=("recon",), help="what the data is for: recon (X-ray -> CT)")
    parser.add_argument("inputs", nargs="+", metavar="CT",
                        help="CT files, DICOM series folders, or folders searched recursively for CT files")
    parser.add_argument("--out", required=True, metavar="DIR", help="prepared folder (new, or one to resume)")
    parser.add_argument("--cube-mm", type=float, default=320.0, metavar="MM",
                        help="cube edge about each CT's centre, mm (default %(default)s, X2CT's)")
    parser.add_argument("--voxels", type=int, default=128, help="CT voxels per cube edge (default %(default)s)")
    parser.add_argument("--film-px", type=int, default=128, help="film pixels per side (default %(default)s)")
    parser.add_argument("--stored-values", choices=("auto", "hu", "hu+1024"), default="auto",
                        help="what the CT files store (default %(default)s: HU + 1024 recognised, with a notice)")
    parser.add_argument("--test-fraction", type=float, default=0.1, metavar="F",
                        help="share of patients held out for testing (default %(default)s; at least one)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the patient split (default %(default)s)")
    parser.add_argument("--patient-pattern", default="", metavar="REGEX",
                        help="regular expression whose first group is the patient id in a case id "
                             "(default: every CT is its own patient)")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help=f"parallel processes (default %(default)s; this computer has {os.cpu_count()} CPUs)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def run(args: argparse.Namespace) -> int:
    from ct2x.data.prepare_recon import ReconPreparation, prepare_recon

    if args.workers < 1:
        raise CT2XInputError(f"--workers {args.workers}: must be at least 1")
    settings = ReconPreparation(cube_mm=args.cube_mm, ct_voxels=args.voxels, film_px=args.film_px,
                                stored_values=args.stored_values, test_fraction=args.test_fraction, seed=args.seed,
                                patient_pattern=args.patient_pattern)
    manifest = prepare_recon(args.inputs, args.out, settings, workers=args.workers, progress=not args.quiet)
    splits = Counter(record["split"] for record in manifest["cases"].values())
    print(f"ct2x prepare recon: {len(manifest['cases'])} cases in {args.out} ({splits['train']} train, "
          f"{splits['test']} test); {len(manifest['failed'])} CTs skipped" +
          ("" if not manifest["failed"] else f" (see {args.out}/manifest.json)"))
    return 0 if manifest["cases"] else 2
