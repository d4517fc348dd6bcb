"""`ct2x prepare recon CT... --out DIR` and `ct2x prepare synth --ct CT... --xray FILM... --out DIR`: training data.

recon: CTs -> cases (cube CT + PA and lateral films) for X-ray -> CT networks. synth: CTs -> cases (1 mm cube CT,
DRRs, pose labels and MIPs at seven poses) and real films -> the X-ray style domain, for CT2X-GAN.
"""

from __future__ import annotations

import argparse
import os
from collections import Counter

from ct2x.cli.options import option
from ct2x.errors import CT2XInputError
from ct2x.geometry import MOBILE_CARM_SENSOR_MM, SOURCE_TO_DETECTOR_MM, SOURCE_TO_ISOCENTER_MM


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "prepare", help="prepare training data from CTs (and real films)",
        description="Turn CTs (and real X-ray films) into training data for CT2X's networks. Resumes an interrupted "
                    "folder; skips and reports bad inputs. Run `ct2x prepare TASK --help` for a task's options.")
    tasks = parser.add_subparsers(dest="task", metavar="TASK", required=True)
    recon = tasks.add_parser(
        "recon", help="X-ray -> CT networks (X2CT-GAN, CVAA-GAN)",
        description="Turn CTs into training cases for X-ray -> CT networks: each CT resampled onto X2CT-GAN's "
                    "cube (D superior->inferior, H anterior->posterior, W right->left) with its PA and lateral films "
                    "rendered as the official pipeline does. Resumes an interrupted folder; skips and reports bad CTs.")
    recon.add_argument("inputs", nargs="+", metavar="CT",
                       help="CT files, DICOM series folders, or folders searched recursively for CT files")
    recon.add_argument("--out", required=True, metavar="DIR", help="prepared folder (new, or one to resume)")
    recon.add_argument("--cube-mm", type=float, default=320.0, metavar="MM",
                       help="cube edge about each CT's centre, mm (default %(default)s, X2CT's)")
    recon.add_argument("--voxels", type=int, default=128, help="CT voxels per cube edge (default %(default)s)")
    recon.add_argument("--film-px", type=int, default=128, help="film pixels per side (default %(default)s)")
    recon.add_argument("--test-fraction", type=float, default=0.1, metavar="F",
                       help="share of patients held out for testing (default %(default)s; at least one)")
    recon.add_argument("--val-fraction", type=float, default=0.0, metavar="F",
                       help="share of patients held out for validation, for `ct2x train --validate-every` (default "
                            "%(default)s: none; at least one when above 0)")
    _add_common(recon)

    synth = tasks.add_parser(
        "synth", help="CT -> X-ray synthesis (CT2X-GAN)",
        description="Turn CTs into CT2X-GAN cases as its paper does: each CT resampled to 1 mm and cut to a 128^3 "
                    "cube about its centre, with noiseless DRRs (60 kVp, 3.5 mm Al; source-to-detector 1020 mm, "
                    "source-to-isocentre 530 mm), camera labels and pose MIPs at seven C-arm poses (-90...90 deg, "
                    "step 30). Real X-ray films (PNG, JPEG, DICOM) are prepared for the style domain as `ct2x "
                    "reconstruct` prepares films; their views, patients and licences come from index CSVs in their "
                    "folders. CTs and films are split into train, val and test by patient. Resumes an interrupted "
                    "folder; skips and reports bad CTs and films.")
    synth.add_argument("--ct", nargs="+", required=True, metavar="CT",
                       help="CT files, DICOM series folders, or folders searched recursively for CT files")
    synth.add_argument("--xray", nargs="+", default=[], metavar="FILM",
                       help="real X-ray films, or folders searched recursively for them (and for index CSVs)")
    synth.add_argument("--out", required=True, metavar="DIR", help="prepared folder (new, or one to resume)")
    synth.add_argument("--voxel-mm", type=float, default=1.0, metavar="MM",
                       help="CT voxel edge, mm (default %(default)s, the paper's)")
    synth.add_argument("--voxels", type=int, default=128,
                       help="CT voxels per cube edge (default %(default)s, the paper's: a 128 mm cube)")
    synth.add_argument("--angles", default="-90:90:30", metavar="ANGLES",
                       help="primary C-arm angles of the DRRs, deg: START:STOP:STEP or a,b,c (0 = AP, +90 = left "
                            "lateral; default %(default)s, the paper's seven)")
    synth.add_argument("--film-px", type=int, default=256,
                       help="DRR and real film pixels per side (default %(default)s)")
    synth.add_argument("--mip-px", type=int, default=128, help="pose MIP pixels per side (default %(default)s)")
    synth.add_argument("--sensor-mm", type=float, default=MOBILE_CARM_SENSOR_MM, metavar="MM",
                       help="detector edge, mm (default %(default).0f, the paper's mobile C-arm, which sees a "
                            f"{MOBILE_CARM_SENSOR_MM * SOURCE_TO_ISOCENTER_MM / SOURCE_TO_DETECTOR_MM:.0f} mm field "
                            "at the isocentre; a whole chest film's field of about 350 mm needs about 680)")
    synth.add_argument("--spectrum", choices=("60kV", "90kV", "120kV"), default="60kV",
                       help="tube spectrum (default %(default)s: 60 kVp, 3.5 mm Al, the paper's)")
    synth.add_argument("--val-fraction", type=float, default=0.1, metavar="F",
                       help="share of patients held out for validation (default %(default)s; at least one)")
    synth.add_argument("--test-fraction", type=float, default=0.1, metavar="F",
                       help="share of patients held out for testing (default %(default)s; at least one)")
    _add_common(synth)
    return parser


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stored-values", choices=("auto", "hu", "hu+1024"), default="auto",
                        help="what the CT files store (default %(default)s: HU + 1024 recognised, with a notice)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the patient split (default %(default)s)")
    parser.add_argument("--patient-pattern", default="", metavar="REGEX",
                        help="regular expression whose first group is the patient id in a CT's case id "
                             "(default: every CT is its own patient)")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help=f"parallel processes (default %(default)s; this computer has {os.cpu_count()} CPUs)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    if args.workers < 1:
        raise CT2XInputError(f"--workers {args.workers}: must be at least 1")
    return _run_synth(args) if args.task == "synth" else _run_recon(args)


def _run_recon(args: argparse.Namespace) -> int:
    from ct2x.data.prepare_recon import ReconPreparation, prepare_recon

    settings = ReconPreparation(cube_mm=args.cube_mm, ct_voxels=args.voxels, film_px=args.film_px,
                                stored_values=args.stored_values, test_fraction=args.test_fraction,
                                val_fraction=args.val_fraction, seed=args.seed, patient_pattern=args.patient_pattern)
    manifest = prepare_recon(args.inputs, args.out, settings, workers=args.workers, progress=not args.quiet)
    splits = Counter(record["split"] for record in manifest["cases"].values())
    validation = f"{splits['val']} val, " if splits["val"] else ""
    print(f"ct2x prepare recon: {len(manifest['cases'])} cases in {args.out} ({splits['train']} train, {validation}"
          f"{splits['test']} test); {len(manifest['failed'])} CTs skipped" +
          ("" if not manifest["failed"] else f" (see {args.out}/manifest.json)"))
    return 0 if manifest["cases"] else 2


def _run_synth(args: argparse.Namespace) -> int:
    from ct2x.data.prepare_synth import SynthPreparation, prepare_synth
    from ct2x.geometry import parse_angles

    with option("--angles"):
        angles = tuple(parse_angles(args.angles))
    settings = SynthPreparation(voxel_mm=args.voxel_mm, ct_voxels=args.voxels, angles_deg=angles,
                                film_px=args.film_px, mip_px=args.mip_px, spectrum=args.spectrum,
                                sensor_mm=args.sensor_mm, stored_values=args.stored_values,
                                val_fraction=args.val_fraction, test_fraction=args.test_fraction, seed=args.seed,
                                patient_pattern=args.patient_pattern)
    manifest = prepare_synth(args.ct, args.xray, args.out, settings, workers=args.workers, progress=not args.quiet)
    counts = []
    for section, noun in (("cases", "cases"), ("films", "films")):
        splits = Counter(record["split"] for record in manifest[section].values())
        counts.append(f"{len(manifest[section])} {noun} ({splits['train']} train, {splits['val']} val, "
                      f"{splits['test']} test)")
    skipped = len(manifest["failed"]) + len(manifest["failed_films"])
    print(f"ct2x prepare synth: {' and '.join(counts)} in {args.out}; {len(manifest['failed'])} CTs and "
          f"{len(manifest['failed_films'])} films skipped" + ("" if not skipped else
                                                              f" (see {args.out}/manifest.json)"))
    return 0 if manifest["cases"] else 2
