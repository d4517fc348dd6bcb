"""`ct2x train recon --model x2ct --data DIR --out RUN`: train an X-ray -> CT network on a prepared folder;
`ct2x train synth --data DIR --out RUN`: train CT2X-GAN (CT -> X-ray synthesis) on a `prepare synth` folder.

Both run on one process or, under `torchrun --nproc_per_node N -m ct2x.cli.main train ...`, on many (on one machine
or several; `ct2x.train.trainer`).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from ct2x.errors import CT2XInputError

PRESETS = ("full", "scaled")
TASKS = {"recon": "x2ct", "synth": "ct2x-gan"}  # task -> default model
DEFAULTS = {  # task -> the defaults of the options that differ: X2CT-GAN's; CT2X-GAN's paper (lr 0.0025, batch 16)
    # with StyleGAN2's betas and constant learning rate (ct2x.train.synth_gan)
    "recon": {"learning_rate": 2e-4, "batch_size": 1, "betas": (0.5, 0.99)},
    "synth": {"learning_rate": 0.0025, "batch_size": 16, "betas": (0.0, 0.99)},
}


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train", help="train a network",
        description="Train an X-ray -> CT network (X2CT-GAN's losses and optimiser) on a folder made by "
                    "`ct2x prepare recon`, or CT2X-GAN (CT -> X-ray synthesis, its paper's losses) on a folder made "
                    "by `ct2x prepare synth`. Writes config.json, log.csv, samples/, checkpoint.pt and "
                    "model.safetensors into the run folder; --resume continues a stopped run exactly.")
    parser.add_argument("task", choices=TASKS, help="recon: films -> CT; synth: CT -> X-ray films (CT2X-GAN)")
    parser.add_argument("--model", choices=("x2ct", "x2ct-single", "cvaa", "ct2x-gan"),
                        help="recon: x2ct: PA + lateral (X2CT-GAN+B, the default); x2ct-single: PA only (+S); cvaa: "
                             "PA + lateral (CVAA-GAN, view-attention fusion); synth: ct2x-gan (the default)")
    parser.add_argument("--data", metavar="DIR",
                        help="prepared folder (`ct2x prepare recon` or `ct2x prepare synth`); with --resume, the "
                             "run's own unless given")
    parser.add_argument("--out", required=True, metavar="RUN", help="run folder (new, or the run to --resume)")
    parser.add_argument("--preset", choices=PRESETS, default="full",
                        help="network size: the official one, or scaled by --width and --depth for CPU training "
                             "(default %(default)s)")
    parser.add_argument("--width", type=float, default=0.25, help="scaled preset: channel factor (default 0.25)")
    parser.add_argument("--depth", type=float, default=0.5,
                        help="scaled preset, recon only: dense-layer factor (default 0.5)")
    parser.add_argument("--steps", type=int, default=1000, help="generator updates (default %(default)s)")
    parser.add_argument("--decay-steps", type=int, metavar="N",
                        help="learning rate falls linearly to 0 over the last N steps (default: recon half of "
                             "--steps; synth 0, a constant rate as StyleGAN2's)")
    parser.add_argument("--batch-size", type=int, help="per process (default: recon 1; synth 16, the paper's)")
    parser.add_argument("--learning-rate", type=float,
                        help="Adam (default: recon 2e-4, X2CT-GAN's; synth 0.0025, CT2X-GAN's)")
    parser.add_argument("--gan-weight", type=float, metavar="W",
                        help="recon: weight of the LSGAN loss (default 0.1, X2CT-GAN's); 0 trains no discriminator: "
                             "the generator learns from the voxel and projection losses alone; synth: lambda_adv "
                             "(default 1)")
    parser.add_argument("--no-lpips", action="store_true",
                        help="synth only: leave LPIPS out of the reconstruction loss (no pretrained AlexNet needed)")
    parser.add_argument("--no-view-attention", action="store_true",
                        help="--model cvaa only: ablation without view attention alignment (the views are added)")
    parser.add_argument("--no-fine-distillation", action="store_true",
                        help="--model cvaa only: ablation without fine distillation")
    parser.add_argument("--r1-every", type=int, metavar="N",
                        help="synth only: the R1 penalty every N-th discriminator step, weighted by N (default 1, "
                             "every step, as the paper's eq. 19; StyleGAN2's lazy R1 is 16)")
    parser.add_argument("--no-style-encoder", action="store_true",
                        help="synth only: ablation without E_sty (the style layers take one learned code)")
    parser.add_argument("--no-pose-attention", action="store_true",
                        help="synth only: ablation without the pose attention module (no MIP; the pose enters "
                             "through its label)")
    parser.add_argument("--no-consistency", action="store_true",
                        help="synth only: ablation without the content and style consistency losses")
    parser.add_argument("--real-films-as-real", action="store_true",
                        help="synth only, ours: the discriminator tells the X-ray-style synthesis from the real films "
                             "(no pose), instead of from the DRRs at its pose (the paper's eq. 17)")
    parser.add_argument("--no-augment", action="store_true",
                        help="train on the stored films only (no CT motion; synth: no poses between the stored ones)")
    parser.add_argument("--ema-decay", type=float, default=0.0, metavar="D",
                        help="keep an exponential moving average of the generator's weights, decay D per step, and "
                             "write it as the model (e.g. 0.993: a half-life of 100 steps; default 0, none)")
    parser.add_argument("--validate-every", type=int, default=0, metavar="N",
                        help="score the model on the data folder's validation split every N steps and keep the best "
                             "as best_model.safetensors (default 0: never)")
    parser.add_argument("--seed", type=int, default=0, help="(default %(default)s)")
    parser.add_argument("--workers", type=int, default=0, help="data-loading processes (default %(default)s)")
    parser.add_argument("--checkpoint-every", type=int, default=200, metavar="N", help="(default %(default)s)")
    parser.add_argument("--sample-every", type=int, default=100, metavar="N", help="(default %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default %(default)s; under torchrun "
                                                        "with cuda each process takes its LOCAL_RANK's GPU)")
    parser.add_argument("--time-limit", type=float, metavar="MINUTES",
                        help="stop after the step during which this much time has passed, with a checkpoint and the "
                             "model written (--resume continues; default: none)")
    parser.add_argument("--resume", action="store_true", help="continue the run in RUN from its checkpoint")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def run(args: argparse.Namespace) -> int:
    import os

    from ct2x.device import torch_device
    from ct2x.train.config import CONFIG_FILE, TrainConfig
    from ct2x.train.trainer import Trainer

    run_dir = Path(args.out).expanduser()
    device_name = args.device
    if device_name == "cuda" and "LOCAL_RANK" in os.environ:
        device_name = f"cuda:{os.environ['LOCAL_RANK']}"
    device = torch_device(device_name)
    first_process = int(os.environ.get("RANK", "0")) == 0  # under torchrun only the first sets up the folder
    model = args.model or TASKS[args.task]
    if (model == "ct2x-gan") != (args.task == "synth"):
        raise CT2XInputError(f"--model {model} does not do `train {args.task}`; `train synth` trains ct2x-gan, "
                             "`train recon` the others")
    switches = {"view_attention": not args.no_view_attention, "fine_distillation": not args.no_fine_distillation}
    if model != "cvaa" and not all(switches.values()):
        raise CT2XInputError(f"--no-view-attention and --no-fine-distillation switch parts of CVAA-GAN off; --model "
                             f"{model} has neither (use --model cvaa)")
    synth_only = [name for name in ("no_lpips", "r1_every", "no_style_encoder", "no_pose_attention",
                                    "no_consistency", "real_films_as_real") if getattr(args, name)]
    if synth_only and args.task != "synth":
        raise CT2XInputError(f"--{synth_only[0].replace('_', '-')} is for `train synth` (CT2X-GAN)")
    if args.time_limit is not None and args.time_limit < 0:
        raise CT2XInputError(f"--time-limit {args.time_limit}: must be minutes >= 0")
    if args.resume:
        config = TrainConfig.load(run_dir / CONFIG_FILE)
        if args.data is not None and str(Path(args.data).expanduser().resolve()) != config.data:
            raise CT2XInputError(f"--data {args.data}: the run in {run_dir} trains on {config.data}; leave --data out "
                                 "to resume it")
    elif args.data is None:
        raise CT2XInputError(f"ct2x train {args.task}: give --data, a folder made by `ct2x prepare {args.task}` "
                             "(only --resume takes the run's own)")
    else:
        if first_process and run_dir.exists() and any(run_dir.iterdir()):
            raise CT2XInputError(f"--out {run_dir}: folder exists and is not empty; choose a new folder, or pass "
                                 "--resume to continue the run in it")
        defaults = DEFAULTS[args.task]
        settings = (_recon_settings(args, model, switches) if args.task == "recon" else _synth_settings(args))
        config = TrainConfig(
            model=model, data=str(Path(args.data).expanduser().resolve()), steps=args.steps,
            batch_size=defaults["batch_size"] if args.batch_size is None else args.batch_size,
            learning_rate=defaults["learning_rate"] if args.learning_rate is None else args.learning_rate,
            betas=defaults["betas"], seed=args.seed, workers=args.workers, checkpoint_every=args.checkpoint_every,
            sample_every=args.sample_every, ema_decay=args.ema_decay, validate_every=args.validate_every, **settings)
    trainer = Trainer(config, run_dir, device, resume=args.resume)  # refuses missing data before the folder is made
    if first_process and not args.resume:
        run_dir.mkdir(parents=True, exist_ok=True)
        config.save(run_dir / CONFIG_FILE)
    trainer.run(progress=not args.quiet, time_limit_s=None if args.time_limit is None else args.time_limit * 60)
    if first_process:
        stopped = (f" (stopped by --time-limit; `ct2x train {args.task} --out {run_dir} --resume` continues to "
                   f"{config.steps})"
                   if trainer.step < config.steps else "")
        best = trainer.validation["best_step"]
        best_model = f"best_model.safetensors from step {best}, " if best else ""
        print(f"ct2x train: {trainer.step} steps of {config.model} in {run_dir} (model.safetensors, {best_model}"
              f"log.csv, samples/){stopped}")
    return 0


def _prepared_settings(args: argparse.Namespace) -> dict:
    """The `preparation.json` settings of --data."""
    from ct2x.data.preparation import SETTINGS_FILE, prepared_settings

    folder = Path(args.data).expanduser()
    if not (folder / SETTINGS_FILE).exists():
        raise CT2XInputError(f"--data {args.data}: no {SETTINGS_FILE}; prepare it with `ct2x prepare {args.task}`")
    prepared = prepared_settings(folder)
    if ("mip_px" in prepared) != (args.task == "synth"):  # only `prepare synth` makes pose MIPs
        raise CT2XInputError(f"--data {args.data}: not a folder of `ct2x prepare {args.task}`")
    return prepared


def _recon_settings(args: argparse.Namespace, model: str, switches: dict) -> dict:
    """TrainConfig settings of `train recon` from the options and the prepared folder."""
    from ct2x.train.config import network_configs

    prepared = _prepared_settings(args)
    if prepared["ct_voxels"] != prepared["film_px"]:
        raise CT2XInputError(f"--data {args.data}: the networks need films as wide as the CT cube; it has "
                             f"{prepared['film_px']} px films and {prepared['ct_voxels']}^3 voxels")
    generator, discriminator = network_configs(model, prepared["ct_voxels"],
                                               None if args.preset == "full" else args.width, args.depth)
    if model == "cvaa":
        generator = {**generator, **switches}
    return {"generator_config": generator, "discriminator_config": discriminator,
            "decay_steps": args.steps // 2 if args.decay_steps is None else args.decay_steps,
            "gan_weight": 0.1 if args.gan_weight is None else args.gan_weight, "augment": not args.no_augment}


def _synth_settings(args: argparse.Namespace) -> dict:
    """TrainConfig settings of `train synth`: CT2X-GAN's networks at the prepared folder's sizes (the paper's design,
    or every width times --width) and its loss weights."""
    from ct2x.nets.ct2x_gan import CT2XGANConfig
    from ct2x.nets.ct2x_gan_discriminator import PoseDiscriminatorConfig

    prepared = _prepared_settings(args)
    film_px, ct_voxels, mip_px = prepared["film_px"], prepared["ct_voxels"], prepared["mip_px"]
    try:
        if args.preset == "full":
            generator = CT2XGANConfig(image_size=film_px, ct_size=ct_voxels, mip_size=mip_px)
            discriminator = PoseDiscriminatorConfig(image_size=film_px)
        else:
            generator = CT2XGANConfig.scaled(film_px, ct_voxels, args.width)
            discriminator = PoseDiscriminatorConfig.scaled(film_px, args.width)
    except ValueError as error:
        raise CT2XInputError(f"--data {args.data}: its sizes do not fit CT2X-GAN's networks ({error})") from None
    generator = dataclasses.replace(generator, style_encoder=not args.no_style_encoder,
                                    pose_attention=not args.no_pose_attention)
    if generator.mip_size != mip_px:
        raise CT2XInputError(f"--data {args.data}: {mip_px} px MIPs, but the scaled networks take {ct_voxels} px "
                             "(as wide as the CT cube); prepare with --mip-px equal to --voxels, or use --preset full")
    loss = {"lpips": 0.0} if args.no_lpips else {}
    if args.no_consistency:
        loss["consistency"] = False
    if args.real_films_as_real:
        loss["real_samples"] = "xray"
    if args.r1_every is not None:
        if args.r1_every < 1:
            raise CT2XInputError(f"--r1-every {args.r1_every}: must be at least 1")
        loss["r1_interval"] = args.r1_every
    if args.gan_weight is not None:
        loss["adversarial"] = args.gan_weight
    return {"generator_config": generator.to_dict(), "discriminator_config": discriminator.to_dict(),
            "loss_config": loss, "decay_steps": 0 if args.decay_steps is None else args.decay_steps,
            "augment": not args.no_augment}
