"""Reconstruct CTs from pairs of X-ray films through CT2XReconstruct's logic, without the GUI.

    Slicer --no-splash --no-main-window --python-script CT2XReconstruct/Scripts/batch_reconstruct.py \\
        (--pairs PAIRS.csv | --pa DIR [--lateral DIR]) --model NAME_OR_FILE --output DIR \\
        [--invert auto|yes|no] [--crop auto|none] [--lateral-facing auto|left|right] [--device cpu|cuda:N] \\
        [--precision fp32|bf16]

(macOS: /Applications/Slicer.app/Contents/MacOS/Slicer; Windows: "C:\\...\\Slicer.exe", the rest alike.)
PAIRS.csv has a header and either one row per pair, columns `pa`, `lateral` (empty for single-view models) and
optionally `name`, or one row per film, columns `pair_id`, `view` (PA or L) and `filename`. Paths are relative to the
CSV's folder. With --pa/--lateral, the films of the two folders are paired by name: equal names once a trailing view
word (pa, ap, l, lat, lateral, after "-", "_" or " ") is dropped, case ignored ("case1-PA.jpg" with "case1_L.png").
Each pair is reconstructed into OUTPUT/<name>.nrrd (float32 HU, the model's cube, RAS) with
OUTPUT/<name>_network_input.png (the films as the network read them); the preprocessing decisions go to stderr.
A pair that fails is reported on stderr and skipped; the others still run.
Exit status: 0 every pair succeeded, 1 at least one failed (or none was found), 2 bad arguments.
The same job without Slicer: `ct2x reconstruct --pa FILE --lateral FILE --model MODEL --out CT`, once per pair.
"""

import argparse
import csv
import re
import sys
import time
import traceback
from pathlib import Path
from typing import List, NamedTuple, Optional, Sequence

import slicer

FILM_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
_VIEW_WORD = re.compile(r"[-_ ](pa|ap|l|lat|lateral)$", re.IGNORECASE)


class Pair(NamedTuple):
    name: str
    pa: Path
    lateral: Optional[Path]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="batch_reconstruct.py", description=__doc__.split("\n\n")[0])
    films = parser.add_mutually_exclusive_group(required=True)
    films.add_argument("--pairs", help="CSV file listing the pairs of films (see the script's docstring)")
    films.add_argument("--pa", help="folder of PA films, paired by name with those of --lateral")
    parser.add_argument("--lateral", help="folder of lateral films (with --pa; biplanar models)")
    parser.add_argument("--model", required=True, help="registry name or CT2X model file (.safetensors)")
    parser.add_argument("--output", required=True, help="output folder (created)")
    parser.add_argument("--invert", choices=("auto", "yes", "no"), default="auto", help="as ct2x reconstruct")
    parser.add_argument("--crop", choices=("auto", "none"), default="auto", help="as ct2x reconstruct")
    parser.add_argument("--lateral-facing", choices=("auto", "left", "right"), default="auto",
                        help="as ct2x reconstruct")
    parser.add_argument("--device", default="cpu", help="torch device: cpu or cuda:N (default cpu)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="default fp32")
    args = parser.parse_args(argv)
    if args.lateral and not args.pa:
        parser.error("--lateral goes with --pa")
    return args


def pair_key(path: Path) -> str:
    """The name two films of a pair share: the file name without suffix and trailing view word, lower case."""
    return _VIEW_WORD.sub("", path.stem).lower()


def pairs_from_folders(paFolder: Path, lateralFolder: Optional[Path]) -> List[Pair]:
    """One pair per PA film, with the lateral film of the same name (None without --lateral); ValueError for a PA
    film without a lateral, or two films of one name."""

    def films(folder: Path) -> dict:
        byKey = {}
        for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in FILM_SUFFIXES):
            if pair_key(path) in byKey:
                raise ValueError(f"{folder}: {byKey[pair_key(path)].name} and {path.name} have the same name")
            byKey[pair_key(path)] = path
        return byKey

    pas = films(paFolder)
    laterals = films(lateralFolder) if lateralFolder else {}
    if lateralFolder and set(pas) != set(laterals):
        unmatched = sorted(set(pas) ^ set(laterals))
        raise ValueError(f"films without a partner of the same name: {', '.join(unmatched)}")
    return [Pair(key, path, laterals.get(key)) for key, path in pas.items()]


def pairs_from_csv(csvPath: Path) -> List[Pair]:
    """The pairs a CSV lists, one row per pair (pa, lateral[, name]) or per film (pair_id, view, filename)."""
    folder = csvPath.parent
    with open(csvPath, newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    columns = set(rows[0]) if rows else set()
    if {"pa"} <= columns:
        return [Pair(row.get("name") or pair_key(Path(row["pa"])), folder / row["pa"],
                     folder / row["lateral"] if row.get("lateral") else None) for row in rows]
    if {"pair_id", "view", "filename"} <= columns:
        films: dict = {}
        for row in rows:
            view = {"PA": "pa", "AP": "pa", "L": "lateral", "LAT": "lateral"}.get(row["view"].strip().upper())
            if view is None:
                raise ValueError(f"{csvPath}: view {row['view']!r} of {row['pair_id']} is neither PA nor L")
            films.setdefault(row["pair_id"], {})[view] = folder / row["filename"]
        return [Pair(pairId, views.get("pa"), views.get("lateral")) for pairId, views in films.items()]
    raise ValueError(f"{csvPath}: needs the columns pa, lateral[, name] or pair_id, view, filename")


def reconstruct_pair(logic, pair: Pair, output: Path, args: argparse.Namespace) -> Path:
    """Reconstruct one pair into OUTPUT/<name>.nrrd and its network input picture; returns the CT's path."""
    from ct2x.errors import CT2XInputError
    from ct2x.io import save_png
    from ct2x.reconstruct import network_input_picture

    if pair.pa is None:
        raise CT2XInputError("no PA film listed")
    job = logic.prepareJob(args.model, str(pair.pa), str(pair.lateral) if pair.lateral else None,
                           invert=args.invert, crop=args.crop, lateralFacing=args.lateral_facing)
    print(logic.describeJob(job), file=sys.stderr)
    volume = logic.computeVolume(job, args.device, args.precision)
    node = logic.addOutputNode(job, volume, showResult=False)
    try:
        ctPath = output / f"{pair.name}.nrrd"
        if not slicer.util.saveNode(node, str(ctPath)):
            raise RuntimeError(f"could not write {ctPath}")
        save_png(network_input_picture(job.films), output / f"{pair.name}_network_input.png")
        return ctPath
    finally:
        slicer.mrmlScene.RemoveNode(node)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from CT2XReconstructLib import dependencies

    from CT2XReconstruct import CT2XReconstructLogic

    dependencies.add_core_to_path()
    from ct2x.errors import CT2XInputError

    try:
        if args.pairs:
            pairs = pairs_from_csv(Path(args.pairs))
        else:
            pairs = pairs_from_folders(Path(args.pa), Path(args.lateral) if args.lateral else None)
    except (OSError, ValueError) as error:
        print(f"batch_reconstruct: {error}", file=sys.stderr)
        return 2
    if not pairs:
        print("batch_reconstruct: no pairs of films found", file=sys.stderr)
        return 1
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    dependencies.ensure_torch()
    logic = CT2XReconstructLogic()
    failed = []
    for index, pair in enumerate(pairs, start=1):
        start = time.perf_counter()
        try:
            ctPath = reconstruct_pair(logic, pair, output, args)
        except Exception as error:
            failed.append(pair.name)
            print(f"batch_reconstruct: [{index}/{len(pairs)}] FAILED {pair.name}: {error}", file=sys.stderr)
            if not isinstance(error, CT2XInputError):
                traceback.print_exc()
            continue
        print(f"batch_reconstruct: [{index}/{len(pairs)}] {pair.name}: {ctPath} in "
              f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
    print(f"batch_reconstruct: {len(pairs) - len(failed)} of {len(pairs)} pairs reconstructed into {output}"
          + (f"; failed: {', '.join(failed)}" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


slicer.util.exit(main())  # run by Slicer --python-script: exit the application with the status
