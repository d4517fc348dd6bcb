"""`ct2x evaluate recon|synth --model MODEL --data DIR --out REPORT`: metrics of a model on the test cases.

recon (a films -> CT model, on a `ct2x prepare recon` folder): writes `metrics.csv` (one row per case and method),
`summary.json` and `summary.md` (mean and standard deviation of each metric per method, every metric named with its
convention) and `pictures/<case>.png` (mid slices: true, then each method, coronal | sagittal | axial). Baselines
(`--baselines mean,backprojection`) are evaluated beside the model.

synth (a CT2X-GAN model, on a `ct2x prepare synth` folder; `ct2x.evaluate_synth`): writes `metrics.csv` (one row per
case and pose: LPIPS, PSNR and SSIM of the DRR-style synthesis against the DRR), `distribution.csv` (FID and KID
against the split's real films of the X-ray-style and DRR-style syntheses and of the physics DRRs, with the feature
network named), `summary.json` and `summary.md` (with the floor: what real films of the folder's other splits, or of
--floor-films, score against the split's films at the same set size), and `pictures/<case>.png` (a column per pose;
rows DRR, DRR-style synthesis, X-ray-style synthesis).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Optional

from ct2x.errors import CT2XInputError


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "evaluate", help="measure a model on the test cases of a prepared folder",
        description="recon: reconstruct the test cases of a folder made by `ct2x prepare recon` from their films and "
                    "compare with their CTs: MAE, MSE, cosine, PSNR and 3-D SSIM on [0, 1], and X2CT-GAN's PSNR and "
                    "three-axis SSIM. synth: synthesise the test CTs of a folder made by `ct2x prepare synth` at "
                    "their poses in X-ray and in DRR style: FID and KID against the held-out real films (beside the "
                    "physics DRRs), LPIPS, PSNR and SSIM of the DRR-style films against the DRRs.")
    parser.add_argument("task", choices=("recon", "synth"), help="recon: films -> CT; synth: CT -> films (CT2X-GAN)")
    parser.add_argument("--model", metavar="MODEL",
                        help="CT2X model file (.safetensors); recon: leave out for baselines only; synth: required")
    parser.add_argument("--data", required=True, metavar="DIR",
                        help="prepared folder (`ct2x prepare recon` or `ct2x prepare synth`)")
    parser.add_argument("--out", required=True, metavar="REPORT", help="report folder (new or empty)")
    parser.add_argument("--baselines", default="mean,backprojection", metavar="NAMES",
                        help="recon: comma-separated baselines beside the model: mean, backprojection, or none "
                             "(default %(default)s); synth always adds the physics DRRs")
    parser.add_argument("--features", choices=("inception", "random"), default="inception",
                        help="synth: the feature network of FID and KID: inception (the FID Inception-v3, 2048-d, "
                             "torch-fidelity and its weight file needed) or random (fixed random convolutions, "
                             "64-d, built here; not comparable with Inception numbers) (default %(default)s)")
    parser.add_argument("--no-lpips", action="store_true",
                        help="synth: leave LPIPS out (it needs the lpips package and AlexNet's weights)")
    parser.add_argument("--split", choices=("test", "train"), default="test", help="(default %(default)s)")
    parser.add_argument("--floor-films", metavar="DIR",
                        help="synth: a `ct2x prepare synth` folder whose real films (all splits, less the evaluated "
                             "split's own) are scored against the split's films as the floor (default: the other "
                             "splits of --data)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default %(default)s)")
    return parser


def run(args: argparse.Namespace) -> int:
    if args.task == "synth":
        return _run_synth(args)
    from ct2x.evaluate import BASELINES, baseline_methods, comparison_pictures, evaluate, model_method, summary
    from ct2x.metrics import METRICS
    from ct2x.output_folder import OutputFolder

    names = [] if args.baselines == "none" else [n.strip() for n in args.baselines.split(",") if n.strip()]
    unknown = sorted(set(names) - set(BASELINES))
    if unknown:
        raise CT2XInputError(f"--baselines: unknown {unknown}; choose from {', '.join(BASELINES)} or none")
    if args.model is None and not names:
        raise CT2XInputError("nothing to evaluate: give --model, or baselines")
    output = OutputFolder(args.out, name=f"--out {args.out}")
    output.check()
    methods = {} if args.model is None else {Path(args.model).stem: model_method(args.model, args.device)}
    methods.update(baseline_methods(args.data, names) if names else {})
    rows = evaluate(methods, args.data, args.split)
    table = summary(rows)
    with output as folder:
        with (folder / "metrics.csv").open("w", newline="", encoding="utf-8") as file:
            writer = csv.DictWriter(file, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        report = {"data": str(Path(args.data).resolve()), "split": args.split, "cases": len(rows) // len(methods),
                  "metrics": METRICS, "summary": table}
        (folder / "summary.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        (folder / "summary.md").write_text(_markdown(table, report["cases"], args.split), encoding="utf-8")
        (folder / "pictures").mkdir()
        comparison_pictures(methods, args.data, folder / "pictures", args.split)
    print(_markdown(table, report["cases"], args.split))
    return 0


def _markdown(table: dict, cases: int, split: str) -> str:
    """The summary as a markdown table, then what each metric is."""
    from ct2x.metrics import METRICS

    metrics = list(METRICS)
    lines = [f"{cases} {split} cases; mean ± standard deviation over the cases", "",
             "| method | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for method, values in table.items():
        lines.append(f"| {method} | " + " | ".join(f"{values[m]['mean']:.4g} ± {values[m]['std']:.2g}"
                                                  for m in metrics) + " |")
    lines += [""] + [f"- `{name}`: {meaning}" for name, meaning in METRICS.items()]
    return "\n".join(lines) + "\n"


def _run_synth(args: argparse.Namespace) -> int:
    from ct2x.evaluate_synth import (
        SYNTH_METRICS,
        distribution_table,
        film_rows,
        picture_sheet,
        real_film_floor,
        summary,
        synthesize_split,
    )
    from ct2x.io import save_png
    from ct2x.metrics.fid import inception_features, random_features
    from ct2x.metrics.lpips import alexnet_lpips
    from ct2x.output_folder import OutputFolder
    from ct2x.synthesize import load_synth_model

    if args.model is None:
        raise CT2XInputError("ct2x evaluate synth: give --model, a CT2X-GAN model file")
    output = OutputFolder(args.out, name=f"--out {args.out}")
    output.check()
    # the pretrained measurements first: a missing package or weight file is reported before any synthesis
    features = random_features(device=args.device) if args.features == "random" else inception_features(args.device)
    lpips = None if args.no_lpips else alexnet_lpips(value_range=(0.0, 1.0), device=args.device)
    name = Path(args.model).stem
    network = load_synth_model(args.model, args.device).network
    syntheses = synthesize_split(network, args.data, args.split, args.device)
    rows = film_rows(syntheses, lpips)
    table = distribution_table(syntheses, args.data, features, name, args.split, args.device)
    films = summary(rows)
    floor = real_film_floor(args.data, features, len(rows), args.split, args.floor_films, device=args.device)
    report = {"data": str(Path(args.data).resolve()), "split": args.split, "model": args.model,
              "cases": len(syntheses), "poses": len(rows) // len(syntheses), "features": features.name,
              "metrics": {m: SYNTH_METRICS[m] for m in ("fid", "kid", *films)}, "distribution": table,
              "real_film_floor": floor, "films": films}
    with output as folder:
        for file_name, table_rows in (("metrics.csv", rows),
                                      ("distribution.csv", [{"method": m, **v} for m, v in table.items()])):
            with (folder / file_name).open("w", newline="", encoding="utf-8") as file:
                writer = csv.DictWriter(file, fieldnames=list(table_rows[0]))
                writer.writeheader()
                writer.writerows(table_rows)
        (folder / "summary.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        (folder / "summary.md").write_text(_synth_markdown(report), encoding="utf-8")
        (folder / "pictures").mkdir()
        for result in syntheses:
            save_png(picture_sheet(result), folder / "pictures" / f"{result.case}.png")
    print(_synth_markdown(report))
    return 0


def _synth_markdown(report: dict) -> str:
    """The synth report as two markdown tables (distribution, then films), then what each metric is."""
    features = report["features"]
    lines = [f"{report['cases']} {report['split']} cases x {report['poses']} poses", "",
             f"| method | FID ({features}) | KID ({features}) | films | real films |", "|---|---|---|---|---|"]
    for method, values in report["distribution"].items():
        lines.append(f"| {method} | {values['fid']:.4g} | {values['kid']:.4g} ± {values['kid_std']:.2g} "
                     f"| {values['films']} | {values['real_films']} |")
    lines += ["", _floor_line(report["real_film_floor"], report["split"])]
    films = report["films"]
    lines += ["", "DRR-style synthesis against the DRR, mean ± standard deviation over cases and poses", "",
              "| " + " | ".join(films) + " |", "|" + "---|" * len(films),
              "| " + " | ".join(f"{v['mean']:.4g} ± {v['std']:.2g}" for v in films.values()) + " |", ""]
    lines += [f"- `{name}`: {meaning}" for name, meaning in report["metrics"].items()]
    return "\n".join(lines) + "\n"


def _floor_line(floor: Optional[dict], split: str) -> str:
    """What real films score against the split's films, in words: the floor a method can come down to."""
    if floor is None:
        return (f"Floor: no real films outside the {split} split (--floor-films names a folder of them), so what real "
                "films score against real films on these features is not known here.")
    verdict = "cannot be told from real films on these features and set sizes."
    if floor["draws"] == 1:
        return (f"Floor: all {floor['films']} other real films against the {floor['real_films']} {split} films score "
                f"FID {floor['fid']:.4g} and KID {floor['kid']:.4g}; a method that comes as close {verdict}")
    return (f"Floor: {floor['films']} other real films, drawn {floor['draws']} times, against the "
            f"{floor['real_films']} {split} films score FID {floor['fid']:.4g} (90 % of the draws "
            f"{floor['fid_p5']:.4g} to {floor['fid_p95']:.4g}) and KID {floor['kid']:.4g} ({floor['kid_p5']:.4g} to "
            f"{floor['kid_p95']:.4g}); a method within those ranges {verdict}")
