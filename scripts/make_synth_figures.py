"""Draw docs/ct2x_gan.md's training figures: loss curves of several `ct2x train synth` runs, and a grid of one
prepared case at its poses: the physics DRR, each model's X-ray-style synthesis (styled by the same real films of one
split), the first model's DRR-style synthesis, and the style films; with `--report`, FID against the training step
from `ct2x evaluate synth` reports of one run's models, beside the physics DRR and the real films' floor.

    python scripts/make_synth_figures.py --run NAME=RUN [--run NAME=RUN ...] --data PREPARED --case CASE \
        [--split test] [--report STEP=REPORT ...] --out-prefix docs/images/synth_cpu

Writes PREFIX_curves.png, PREFIX_grid.png and, with --report, PREFIX_fid.png. Dev-time only: needs matplotlib.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Dict, List

import numpy as np

from ct2x.data.prepare_synth import film_paths, load_case, load_film
from ct2x.evaluate_synth import synthesize_case
from ct2x.io import save_png
from ct2x.synthesize import load_synth_model

CURVES = (("g_reconstruction", "reconstruction (eq. 8, MAE x 10)"), ("g_adversarial", "generator adversarial"),
          ("d_adversarial", "discriminator adversarial"))
SMOOTHING = 5  # running mean over this many logged values
ZOOM = 2  # grid pixels per film pixel


def parse_runs(pairs: List[str]) -> Dict[str, Path]:
    runs = {}
    for pair in pairs:
        name, _, folder = pair.partition("=")
        runs[name] = Path(folder)
    return runs


def draw_curves(runs: Dict[str, Path], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(CURVES), figsize=(4.2 * len(CURVES), 3.2))
    for name, folder in runs.items():
        if not (folder / "log.csv").exists():
            print(f"{folder} has no log.csv: {name} is left out of the curves")
            continue
        rows = list(csv.DictReader((folder / "log.csv").open()))
        steps = np.array([int(row["step"]) for row in rows])
        for axis, (column, title) in zip(axes, CURVES):
            values = np.array([float(row[column]) for row in rows])
            smooth = np.convolve(values, np.ones(SMOOTHING) / SMOOTHING, mode="valid")
            axis.plot(steps[SMOOTHING - 1:], smooth, label=name)
            axis.set_title(title, fontsize=9)
            axis.set_xlabel("step")
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out, dpi=110)


def draw_fid(reports: Dict[int, Path], out: Path) -> None:
    """Left: FID of the X-ray-style and DRR-style syntheses against the step, from `ct2x evaluate synth` reports (one
    per step), with the physics DRR's FID as a line and the floor's 5th-95th percentiles as a band. Right: PSNR and
    SSIM of the DRR-style synthesis against the DRR (the anatomy kept), mean and standard deviation over the films."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted(reports)
    summaries = [json.loads((reports[step] / "summary.json").read_text()) for step in steps]
    figure, (axis, anatomy) = plt.subplots(1, 2, figsize=(10.4, 3.4))
    for style in ("X-ray style", "DRR style"):
        fids = [next(v["fid"] for method, v in summary["distribution"].items() if method.endswith(f"({style})"))
                for summary in summaries]
        axis.plot(steps, fids, marker="o", label=f"model, {style}")
    last = summaries[-1]
    axis.axhline(last["distribution"]["physics DRR"]["fid"], color="black", linestyle="--", label="physics DRR")
    floor = last["real_film_floor"]
    if floor is not None:
        axis.axhspan(floor["fid_p5"], floor["fid_p95"], color="grey", alpha=0.3,
                     label="real films (5th-95th percentile)")
    axis.set_yscale("log")
    axis.set_xlabel("step")
    axis.set_ylabel(f"FID ({last['features']})", fontsize=8)
    axis.legend(fontsize=8)
    ssim_axis = anatomy.twinx()
    for target, metric, colour in ((anatomy, "psnr", "tab:blue"), (ssim_axis, "ssim", "tab:red")):
        means = np.array([summary["films"][metric]["mean"] for summary in summaries])
        spreads = np.array([summary["films"][metric]["std"] for summary in summaries])
        target.errorbar(steps, means, yerr=spreads, marker="o", capsize=3, color=colour)
        target.set_ylabel("PSNR (dB)" if metric == "psnr" else "SSIM", color=colour, fontsize=8)
    anatomy.set_xlabel("step")
    anatomy.set_title("DRR-style synthesis against the DRR", fontsize=9)
    figure.tight_layout()
    figure.savefig(out, dpi=110)


def draw_grid(runs: Dict[str, Path], data: Path, case_name: str, split: str, out: Path, gap_px: int = 2) -> None:
    case = load_case(data / "cases" / f"{case_name}.npz")
    films = film_paths(data, split)
    style = np.stack([load_film(films[pose % len(films)]) for pose in range(len(case["angles_deg"]))])  # (P, F, F)
    rows = [case["drr"]]
    for number, folder in enumerate(runs.values()):
        network = load_synth_model(folder / "model.safetensors").network
        xray_style, drr_style = synthesize_case(network, case, style)
        rows.append(xray_style)
        if number == 0:
            rows.append(drr_style)
    rows.append(style)
    sheet = np.concatenate([np.concatenate([np.pad(film, ((0, gap_px), (0, gap_px))) for film in row], axis=1)
                            for row in rows], axis=0)
    sheet = np.kron(sheet, np.ones((ZOOM, ZOOM)))  # each pixel ZOOM x ZOOM, so 64^2 films stay readable
    save_png((np.clip(sheet, 0, 1) * 255).round().astype(np.uint8), out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", required=True, metavar="NAME=RUN", help="a run folder, named")
    parser.add_argument("--data", required=True, type=Path, help="prepared synth folder holding the case")
    parser.add_argument("--case", required=True, help="case id in the folder")
    parser.add_argument("--split", default="test", help="split of the real films that give the style")
    parser.add_argument("--report", action="append", default=[], metavar="STEP=REPORT",
                        help="a `ct2x evaluate synth` report folder of the model at STEP")
    parser.add_argument("--out-prefix", required=True, type=Path)
    args = parser.parse_args()
    runs = parse_runs(args.run)
    args.out_prefix.parent.mkdir(parents=True, exist_ok=True)
    if args.report:
        reports = {int(step): folder for step, folder in parse_runs(args.report).items()}
        draw_fid(reports, args.out_prefix.with_name(args.out_prefix.name + "_fid.png"))
    draw_curves(runs, args.out_prefix.with_name(args.out_prefix.name + "_curves.png"))
    draw_grid(runs, args.data, args.case, args.split, args.out_prefix.with_name(args.out_prefix.name + "_grid.png"))


if __name__ == "__main__":
    main()
