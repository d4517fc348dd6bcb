"""`ct2x evaluate recon --model MODEL --data DIR --out REPORT`: metrics of a films -> CT model on the test cases.

Writes `metrics.csv` (one row per case and method), `summary.json` and `summary.md` (mean and standard deviation of
each metric per method, every metric named with its convention) and `pictures/<case>.png` (mid slices: true, then each
method, coronal | sagittal | axial). Baselines (`--baselines mean,backprojection`) are evaluated beside the model.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from ct2x.errors import CT2XInputError


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "evaluate", help="measure a model on the test cases of a prepared folder",
        description="Reconstruct the test cases of a folder made by `ct2x prepare recon` from their films and compare "
                    "with their CTs: MAE, MSE, cosine, PSNR and 3-D SSIM on [0, 1], and X2CT-GAN's PSNR and "
                    "three-axis SSIM.")
    parser.add_argument("task", choices=("recon",), help="recon: films -> CT")
    parser.add_argument("--model", metavar="MODEL", help="CT2X model file (.safetensors); leave out for baselines only")
    parser.add_argument("--data", required=True, metavar="DIR", help="prepared folder (`ct2x prepare recon`)")
    parser.add_argument("--out", required=True, metavar="REPORT", help="report folder (new or empty)")
    parser.add_argument("--baselines", default="mean,backprojection", metavar="NAMES",
                        help="comma-separated baselines beside the model: mean, backprojection, or none "
                             "(default %(default)s)")
    parser.add_argument("--split", choices=("test", "train"), default="test", help="(default %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default %(default)s)")
    return parser


def run(args: argparse.Namespace) -> int:
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
