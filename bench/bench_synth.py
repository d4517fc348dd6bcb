"""CT2X-GAN synthesis speed (issue 12 §6): the CT encoded once, then one film per pose (goal: <= 200 ms per 256^2
view on the 2-core CPU, <= 10 ms on a GPU).

For each configuration (random initialisation, seed 0; `--configs`) and precision, a `ct2x.synthesize.Synthesizer` is
built for the real chest CT (or the built-in phantom when `--data-dir` lacks it) with a real PA film as the style, and
timed: the CT encoding (construction: cube, E_CT, MIP projector; its parts from the progress callback), then over a
sweep of primary angles -90 ... 90 deg (a slider drag): `render` (the film, as a caller gets it), and apart its two
parts, the pose inputs (camera label and MIP, `Synthesizer.inputs`) and the generator on them (PAM + G, the engine's
cached form), plus the network's own path on the same inputs (`content_code` + `synthesize`, no caching) for
comparison. Each figure is the median over the sweep, with the share of the machine's CPU that other processes took
meanwhile (bench_reconstruct.py's helpers).

    python bench/bench_synth.py --data-dir ../shared/data                       # paper, paper-cmax256, cpu64
    python bench/bench_synth.py --configs paper --precisions bf16 --profile     # + where the time of one view goes
    python bench/bench_synth.py --device cuda                                   # on a GPU

Results go to bench/_work/synth/results.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from bench_reconstruct import (  # noqa: E402  (bench/ is no package)
    load_average,
    machine_facts,
    peak_rss_mib,
    timed_call,
)

WORK = BENCH / "_work" / "synth"
CHEST_CT = "ct/chest_popi_phase00.nii.gz"
STYLE_FILM = "xray/style_set/ARDSSevere.png"  # a real PA film of the style set (CC BY-SA)
WEIGHT_SEED = 0
SWEEP_DEG = tuple(float(angle) for angle in range(-90, 91, 10))  # 19 poses
FOREIGN_WARN_PERCENT = 10.0


def configs() -> Dict[str, Any]:
    """name -> CT2XGANConfig: the paper's, the paper's with G at most 256 channels wide (a network change, for
    comparison), and the scaled CPU configuration."""
    import dataclasses

    from ct2x.nets.ct2x_gan import PRESETS

    return {"paper": PRESETS["paper"], "paper-cmax256": dataclasses.replace(PRESETS["paper"], channel_max=256),
            "cpu64": PRESETS["cpu64"]}


def inputs(data_dir: Path):
    """(CT, its description, style film or array, its description)."""
    from ct2x.io import load_ct
    from ct2x.phantoms import chest

    ct_path, film_path = data_dir / CHEST_CT, data_dir / STYLE_FILM
    if ct_path.exists():
        ct, ct_text = load_ct(ct_path), f"real chest CT {CHEST_CT}"
    else:
        ct, ct_text = chest(), "built-in chest phantom"
    if film_path.exists():
        return ct, ct_text, film_path, f"real PA film {STYLE_FILM}"
    rows, columns = np.mgrid[0:256, 0:256] / 255.0
    film = (0.3 + 0.5 * np.exp(-((columns - 0.5) / 0.1) ** 2) * (rows < 0.9)).astype(np.float32)  # a bright spine
    return ct, ct_text, film, "a synthetic film (no style set in --data-dir)"


def run(name: str, config, precision: str, args, ct, style) -> Dict[str, Any]:
    """Times of one configuration and precision."""
    import torch

    from ct2x.data.prepare_synth import SynthPreparation
    from ct2x.models import LoadedModel, ModelInfo
    from ct2x.nets.ct2x_gan import CT2XGANGenerator
    from ct2x.synthesize import Synthesizer, model_conventions

    torch.manual_seed(WEIGHT_SEED)
    network = CT2XGANGenerator(config).eval()
    settings = SynthPreparation(voxel_mm=128.0 / config.ct_size, ct_voxels=config.ct_size,
                                film_px=config.image_size, mip_px=config.mip_size)  # a 128 mm cube, as the paper's
    model = LoadedModel(network, ModelInfo(kind="ct2x-gan", config=config.to_dict(), license="CC0-1.0",
                                           **model_conventions(settings)))
    marks: List[float] = []
    encode = timed_call(lambda: Synthesizer(model, ct, style, device=args.device, precision=precision,
                                       progress=lambda fraction: marks.append(time.perf_counter())), args.device)
    synthesizer = encode["result"]
    start = marks[-1] - encode["s"]  # about: the last mark comes just before the constructor returns
    parts = {}
    for part, mark in zip(("style + cube", "E_CT", "MIP projector"), (marks[0], marks[-2], marks[-1])):
        parts[part], start = mark - start, mark
    synthesizer.render(0.0)  # first call apart: oneDNN builds its kernels
    rows: Dict[str, List[Dict[str, Any]]] = {"render": [], "pose inputs (label + MIP)": [],
                                             "generator (engine: PAM + G)": [],
                                             "network's own path (content_code + synthesize)": []}
    network, generator = synthesizer.network, synthesizer._generator
    style_code = None if synthesizer.style_code() is None else \
        torch.from_numpy(synthesizer.style_code().code).to(synthesizer.device)[None]
    ct_code = network.encode_ct(torch.zeros(1, 1, *(config.ct_size,) * 3, device=synthesizer.device)) \
        if args.network_path else None
    for angle in SWEEP_DEG:
        rows["render"].append(timed_call(lambda angle=angle: synthesizer.render(angle), args.device))
        pose = timed_call(lambda angle=angle: synthesizer.inputs(angle), args.device)
        rows["pose inputs (label + MIP)"].append(pose)
        _, label, mip = pose["result"]
        with torch.inference_mode():
            rows["generator (engine: PAM + G)"].append(timed_call(lambda label=label, mip=mip: generator(label, mip),
                                                             args.device))
            if ct_code is not None:
                rows["network's own path (content_code + synthesize)"].append(timed_call(
                    lambda label=label, mip=mip: network.synthesize(network.content_code(ct_code, label, mip),
                                                                    style_code), args.device))
    result = {"config": name, "precision": precision, "encode_s": encode["s"],
              "encode_foreign_percent": encode["foreign_percent"], "encode_parts_s": parts,
              "peak_rss_mib": peak_rss_mib()}
    for what, calls in rows.items():
        if calls:
            foreign = [c["foreign_percent"] for c in calls if c["foreign_percent"] is not None]
            result[what] = {"median_s": statistics.median(c["s"] for c in calls), "min_s": min(c["s"] for c in calls),
                            "max_s": max(c["s"] for c in calls),
                            "foreign_percent": statistics.median(foreign) if foreign else None}
    if args.profile:
        result["profile"] = profile(synthesizer, args.device)
    return result


def profile(synthesizer, device: str) -> List[List[Any]]:
    """[op, input shapes, ms] of one render at 30 deg, the heaviest 12 ops by self CPU (or GPU) time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with torch_profile(activities=activities, record_shapes=True) as profiler:
        synthesizer.render(30.0)
    events = profiler.key_averages(group_by_input_shape=True)
    key = "self_device_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    heaviest = sorted(events, key=lambda event: -getattr(event, key))[:12]
    return [[event.key, str(event.input_shapes)[:80], round(getattr(event, key) / 1000.0, 2)] for event in heaviest]


def fmt(seconds: Optional[float], scale: float = 1000.0, digits: int = 0) -> str:
    return "-" if seconds is None else f"{seconds * scale:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=BENCH.parent.parent / "shared" / "data")
    parser.add_argument("--configs", default="paper,paper-cmax256,cpu64")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--no-network-path", dest="network_path", action="store_false",
                        help="skip timing the network's own uncached path")
    parser.add_argument("--profile", action="store_true", help="where one render's time goes")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    known = configs()
    names = args.configs.split(",")
    unknown = [name for name in names if name not in known]
    if unknown:
        raise SystemExit(f"unknown configurations {unknown}; known: {list(known)}")
    ct, ct_text, style, style_text = inputs(args.data_dir)
    facts = machine_facts(args.device)
    load_start = load_average()
    print(f"{facts}\n{torch.get_num_threads()} threads; CT: {ct_text}; style: {style_text}; load average "
          f"{load_start}\n", flush=True)
    results = []
    for name in names:
        for precision in args.precisions.split(","):
            print(f"  {name} {precision} ...", end="", flush=True)
            results.append(run(name, known[name], precision, args, ct, style))
            print(f" render {fmt(results[-1]['render']['median_s'])} ms", flush=True)
    load_end = load_average()

    print(f"\nload average {load_start} at the start, {load_end} at the end; medians over {len(SWEEP_DEG)} poses "
          "(-90 ... 90 deg, step 10), ms\n")
    print("| configuration | precision | film px | encode s (style + cube / E_CT / MIP projector) | foreign CPU % | "
          "**render** | pose inputs (label + MIP) | generator (engine) | network's own path (fp32, uncached) | "
          "foreign CPU % | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    busy = []
    for result in results:
        config = known[result["config"]]
        parts = " / ".join(f"{seconds:.2f}" for seconds in result["encode_parts_s"].values())
        render = result["render"]
        network_path = result.get("network's own path (content_code + synthesize)", {}).get("median_s")
        print(f"| {result['config']} | {result['precision']} | {config.image_size} | {result['encode_s']:.2f} "
              f"({parts}) | {fmt(result['encode_foreign_percent'], 1)} | **{fmt(render['median_s'])}** "
              f"({fmt(render['min_s'])}-{fmt(render['max_s'])}) | "
              f"{fmt(result['pose inputs (label + MIP)']['median_s'])} | "
              f"{fmt(result['generator (engine: PAM + G)']['median_s'])} | {fmt(network_path)} | "
              f"{fmt(render['foreign_percent'], 1)} | {result['peak_rss_mib']:.0f} |")
        if (render["foreign_percent"] or 0.0) > FOREIGN_WARN_PERCENT:
            busy.append(f"{result['config']} {result['precision']} ({render['foreign_percent']:.0f} %)")
    for result in results:
        for op, shapes, ms in result.get("profile", []):
            print(f"profile {result['config']} {result['precision']}: {op} {shapes} {ms} ms")
    if busy:
        print(f"\nWarning: other processes used the CPU while timing {', '.join(busy)} (median share of the "
              "machine); those times are disturbed: run again on a quiet machine.")
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "results.json").write_text(json.dumps({"machine": facts, "args": {k: str(v) for k, v in vars(args).items()},
                                                   "ct": ct_text, "style": style_text, "results": results,
                                                   "load_average": [load_start, load_end]}, indent=1))


if __name__ == "__main__":
    main()
