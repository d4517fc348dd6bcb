"""`ct2x train recon --model x2ct --data DIR --out RUN`: train an X-ray -> CT network on a prepared folder.

The same command runs on one process or, under `torchrun --nproc_per_node N -m ct2x.cli.main train recon ...`, on
many (DistributedDataParallel, on one machine or several).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ct2x.errors import CT2XInputError

PRESETS = ("full", "scaled")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train", help="train a network",
        description="Train an X-ray -> CT network (X2CT-GAN's losses and optimiser) on a folder made by "
                    "`ct2x prepare recon`. Writes config.json, log.csv, samples/, checkpoint.pt and model.safetensors "
                    "into the run folder; --resume continues a stopped run exactly.")
    parser.add_argument("task", choices=("recon",), help="recon: films -> CT")
    parser.add_argument("--model", choices=("x2ct", "x2ct-single", "cvaa"), default="x2ct",
                        help="x2ct: PA + lateral (X2CT-GAN+B); x2ct-single: PA only (+S); cvaa: PA + lateral "
                             "(CVAA-GAN, view-attention fusion) (default %(default)s)")
    parser.add_argument("--data", required=True, metavar="DIR", help="prepared folder (`ct2x prepare recon`)")
    parser.add_argument("--out", required=True, metavar="RUN", help="run folder (new, or the run to --resume)")
    parser.add_argument("--preset", choices=PRESETS, default="full",
                        help="network size: the official one, or scaled by --width and --depth for CPU training "
                             "(default %(default)s)")
    parser.add_argument("--width", type=float, default=0.25, help="scaled preset: channel factor (default 0.25)")
    parser.add_argument("--depth", type=float, default=0.5, help="scaled preset: dense-layer factor (default 0.5)")
    parser.add_argument("--steps", type=int, default=1000, help="generator updates (default %(default)s)")
    parser.add_argument("--decay-steps", type=int, metavar="N",
                        help="learning rate falls linearly to 0 over the last N steps (default: half of --steps)")
    parser.add_argument("--batch-size", type=int, default=1, help="per process (default %(default)s)")
    parser.add_argument("--learning-rate", type=float, default=2e-4, help="Adam (default %(default)s)")
    parser.add_argument("--gan-weight", type=float, default=0.1, metavar="W",
                        help="weight of the LSGAN loss (default %(default)s, X2CT-GAN's); 0 trains no discriminator: "
                             "the generator learns from the voxel and projection losses alone")
    parser.add_argument("--no-view-attention", action="store_true",
                        help="--model cvaa only: ablation without view attention alignment (the views are added)")
    parser.add_argument("--no-fine-distillation", action="store_true",
                        help="--model cvaa only: ablation without fine distillation")
    parser.add_argument("--no-augment", action="store_true", help="train on the stored films only")
    parser.add_argument("--seed", type=int, default=0, help="(default %(default)s)")
    parser.add_argument("--workers", type=int, default=0, help="data-loading processes (default %(default)s)")
    parser.add_argument("--checkpoint-every", type=int, default=200, metavar="N", help="(default %(default)s)")
    parser.add_argument("--sample-every", type=int, default=100, metavar="N", help="(default %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default %(default)s; under torchrun "
                                                        "with cuda each process takes its LOCAL_RANK's GPU)")
    parser.add_argument("--resume", action="store_true", help="continue the run in RUN from its checkpoint")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def run(args: argparse.Namespace) -> int:
    import os

    from ct2x.data.prepare_recon import SETTINGS_FILE
    from ct2x.device import torch_device
    from ct2x.train.config import CONFIG_FILE, TrainConfig, network_configs
    from ct2x.train.trainer import Trainer

    run_dir = Path(args.out).expanduser()
    device_name = args.device
    if device_name == "cuda" and "LOCAL_RANK" in os.environ:
        device_name = f"cuda:{os.environ['LOCAL_RANK']}"
    device = torch_device(device_name)
    first_process = int(os.environ.get("RANK", "0")) == 0  # under torchrun only the first sets up the folder
    switches = {"view_attention": not args.no_view_attention, "fine_distillation": not args.no_fine_distillation}
    if args.model != "cvaa" and not all(switches.values()):
        raise CT2XInputError(f"--no-view-attention and --no-fine-distillation switch parts of CVAA-GAN off; --model "
                             f"{args.model} has neither (use --model cvaa)")
    if args.resume:
        config = TrainConfig.load(run_dir / CONFIG_FILE)
    else:
        if first_process and run_dir.exists() and any(run_dir.iterdir()):
            raise CT2XInputError(f"--out {run_dir}: folder exists and is not empty; choose a new folder, or pass "
                                 "--resume to continue the run in it")
        settings_file = Path(args.data).expanduser() / SETTINGS_FILE
        if not settings_file.exists():
            raise CT2XInputError(f"--data {args.data}: no {SETTINGS_FILE}; prepare it with `ct2x prepare recon`")
        prepared = json.loads(settings_file.read_text(encoding="utf-8"))["settings"]
        if prepared["ct_voxels"] != prepared["film_px"]:
            raise CT2XInputError(f"--data {args.data}: the networks need films as wide as the CT cube; it has "
                                 f"{prepared['film_px']} px films and {prepared['ct_voxels']}^3 voxels")
        generator, discriminator = network_configs(args.model, prepared["ct_voxels"],
                                                   None if args.preset == "full" else args.width, args.depth)
        if args.model == "cvaa":
            generator = {**generator, **switches}
        config = TrainConfig(
            model=args.model, data=str(Path(args.data).expanduser().resolve()),
            generator_config=generator, discriminator_config=discriminator, steps=args.steps,
            decay_steps=args.steps // 2 if args.decay_steps is None else args.decay_steps,
            batch_size=args.batch_size, learning_rate=args.learning_rate, gan_weight=args.gan_weight,
            augment=not args.no_augment,
            seed=args.seed, workers=args.workers, checkpoint_every=args.checkpoint_every,
            sample_every=args.sample_every)
        if first_process:
            run_dir.mkdir(parents=True, exist_ok=True)
            config.save(run_dir / CONFIG_FILE)
    Trainer(config, run_dir, device, resume=args.resume).run(progress=not args.quiet)
    if first_process:
        print(f"ct2x train: {config.steps} steps of {config.model} in {run_dir} (model.safetensors, log.csv, "
              "samples/)")
    return 0
