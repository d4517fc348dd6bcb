"""The one trainer of CT2X's networks: one process, or many with `torchrun` (DistributedDataParallel, or for an
objective that says so, `wraps_in_ddp = False`, gradients it averages itself through `ct2x.train.distributed`).

A run folder holds `config.json` (every setting), `log.csv` (losses and learning rate per logged step), TensorBoard
events when the `tensorboard` package is installed, `samples/step_NNNNNN.png` (the objective's sample picture: for
X-ray -> CT mid slices, true above and predicted below), `checkpoint.pt` (written atomically every `checkpoint_every`
steps and at the end) and, at the end, `model.safetensors` (the generator as a CT2X model file, `ct2x.models`, with
the metadata the objective gives; with `ema_decay` the moving average of its weights, which the trainer keeps beside
it whatever the network). With `validate_every`, that network is scored on the data folder's validation split every
so many steps (the objective's `validation_error`, lower is better; logged as "validation_error") and the best so
far is written as `best_model.safetensors`: a small set can overfit long before the last step. The objective
(RECIPES' "objective") builds the training and validation sets and decides whether a discriminator is trained:
X2CT's with `gan_weight` 0 builds, trains and checkpoints none.

Resuming continues exactly: the checkpoint holds the networks, optimisers, random-number state and the position in
the seeded data order, so with a fixed seed the next step's losses equal those of a run that was never stopped.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

from ct2x.errors import CT2XInputError
from ct2x.models import build_network, save_model
from ct2x.train.config import TrainConfig

CHECKPOINT = "checkpoint.pt"
LOG = "log.csv"
MODEL = "model.safetensors"
BEST_MODEL = "best_model.safetensors"


class Trainer:
    """Trains the generator and discriminator a `TrainConfig` names, in the run folder `run_dir`."""

    def __init__(self, config: TrainConfig, run_dir: Path, device: torch.device, resume: bool = False):
        self.config, self.run_dir, self.device = config, Path(run_dir), device
        self.rank, self.world = _distributed_rank_and_size(device)
        self.is_main = self.rank == 0
        torch.manual_seed(config.seed + self.rank)
        recipe, objective = config.recipe, config.objective_class
        self.generator = build_network(recipe["generator"], config.generator_config).to(device)
        self.discriminator = (build_network(recipe["discriminator"], config.discriminator_config).to(device)
                              if objective.uses_discriminator(config) else None)
        if self.world > 1 and objective.wraps_in_ddp:
            wrap = torch.nn.parallel.DistributedDataParallel
            ids = [device.index] if device.type == "cuda" else None
            # The generator's per-view heads (X2CT's auxiliary outputs) take no part in the loss.
            self.generator = wrap(self.generator, ids, find_unused_parameters=True)
            if self.discriminator is not None:
                self.discriminator = wrap(self.discriminator, ids)
        self.objective = objective.for_run(self.generator, self.discriminator, config)
        self.dataset = objective.training_set(config)
        self.generator_ema = _WeightAverage(_unwrap(self.generator), config.ema_decay) if config.ema_decay else None
        self.step = 0  # generator updates done, one batch each
        self.validation_set = self._validation_set() if config.validate_every and self.is_main else None
        self.validation = {"latest": float("nan"), "best": float("inf"), "best_step": 0}  # errors; the best's step
        if resume:
            self._load_checkpoint()

    def run(self, progress: bool = True, time_limit_s: Optional[float] = None) -> None:
        """Train until `config.steps`, logging, sampling and checkpointing on the way. With `time_limit_s`, stop
        after the step during which that many seconds have passed, checkpoint, and write the model as at the end
        (`resume` continues the run)."""
        from tqdm import tqdm

        config = self.config
        bar = tqdm(total=config.steps, initial=self.step, desc=f"ct2x train {config.model}", unit="step",
                   file=sys.stderr, disable=not (progress and self.is_main), dynamic_ncols=True)
        log = _CsvLog(self.run_dir / LOG) if self.is_main else None
        board = _tensorboard(self.run_dir) if self.is_main else None
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                    and config.mixed_precision else nullcontext())
        batches = self._batches()
        started = time.perf_counter()
        while self.step < config.steps:
            batch = next(batches)
            self.objective.set_learning_rate(config.learning_rate_at(self.step))
            with autocast:
                losses = self.objective.step(batch, self.device, self.step)
            if self.generator_ema is not None:
                self.generator_ema.update(_unwrap(self.generator))
            self.step += 1
            bar.update(1)
            bar.set_postfix({key: f"{losses[name]:.3f}" for key, name in (("g", "g_total"), ("d", "d_total"))
                             if name in losses})
            out_of_time = (time_limit_s is not None and self.step < config.steps
                           and self._out_of_time(started, time_limit_s))
            last = self.step == config.steps or out_of_time
            if self.validation_set is not None:  # not at a --time-limit stop, so that a resumed run scores alike
                if self.step % config.validate_every == 0 or self.step == config.steps:
                    self._validate(autocast)
                losses = {**losses, "validation_error": self.validation["latest"]}
            if self.is_main and (self.step % config.log_every == 0 or last):
                row = {"step": self.step, "learning_rate": config.learning_rate_at(self.step - 1),
                       "seconds": round(time.perf_counter() - started, 2), **losses}
                log.write(row)
                if board is not None:
                    for name, value in losses.items():
                        board.add_scalar(f"loss/{name}", value, self.step)
            if self.is_main and self.step % config.sample_every == 0:
                self._save_sample(batch)
            if self.step % config.checkpoint_every == 0 or last:
                self._save_checkpoint()
            if out_of_time:
                break
        bar.close()
        if self.is_main:
            self._save_model()
        if board is not None:
            board.close()

    def _out_of_time(self, started: float, time_limit_s: float) -> bool:
        """Whether `time_limit_s` has passed since `started`; under torchrun, whether it has for any process, so that
        all stop at the same step."""
        out = time.perf_counter() - started >= time_limit_s
        if self.world == 1:
            return out
        flag = torch.tensor(float(out), device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag)

    # --- data order ---------------------------------------------------------------------------------------------
    def _batches(self) -> Iterator[Dict[str, torch.Tensor]]:
        """Batches in a seeded order per epoch, split across processes; one batch per step, so a resumed run
        continues at batch `step % per_epoch` of epoch `step // per_epoch`. The loader's workers make single
        samples, all the batch's at once, and live across epochs (a small set has few batches per epoch)."""
        batch_size = self.config.batch_size
        per_epoch = len(self.dataset) // (batch_size * self.world)  # batches per process and epoch
        if per_epoch < 1:
            raise CT2XInputError(f"{self.config.data}: {len(self.dataset)} training cases are fewer than one batch "
                                 f"per process ({batch_size} x {self.world}); lower --batch-size")

        def keys() -> Iterator[Tuple[int, int]]:
            """(epoch, case index) of every sample this process trains on from the current step on."""
            epoch, start = divmod(self.step, per_epoch)
            while True:
                order = torch.randperm(len(self.dataset),
                                       generator=torch.Generator().manual_seed(self.config.seed + epoch))
                for index in order.tolist()[self.rank::self.world][start * batch_size: per_epoch * batch_size]:
                    yield epoch, index
                epoch, start = epoch + 1, 0

        workers = self.config.workers
        loader_seed = torch.Generator().manual_seed(self.config.seed + self.step)  # not the RNG a resume restores
        samples = iter(torch.utils.data.DataLoader(_AtEpoch(self.dataset), sampler=keys(), batch_size=None,
                                                   num_workers=workers, prefetch_factor=4 if workers else None,
                                                   persistent_workers=workers > 0, generator=loader_seed))
        while True:
            yield torch.utils.data.default_collate([next(samples) for _ in range(batch_size)])

    # --- files ----------------------------------------------------------------------------------------------------
    def _save_checkpoint(self) -> None:
        if not self.is_main:
            return
        networks = {"generator": _unwrap(self.generator).state_dict()}
        if self.discriminator is not None:
            networks["discriminator"] = _unwrap(self.discriminator).state_dict()
        if self.generator_ema is not None:
            networks["generator_ema"] = self.generator_ema.network.state_dict()
        state = {"step": self.step, "config": self.config.to_dict(), "validation": self.validation, **networks,
                 **self.objective.optimizer_states(), "torch_rng": torch.get_rng_state(),
                 "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        temporary = self.run_dir / f".{CHECKPOINT}.{os.getpid()}"
        torch.save(state, temporary)
        os.replace(temporary, self.run_dir / CHECKPOINT)

    def _load_checkpoint(self) -> None:
        path = self.run_dir / CHECKPOINT
        if not path.exists():
            raise CT2XInputError(f"{self.run_dir}: no {CHECKPOINT} to resume from; start without --resume")
        state = torch.load(path, map_location=self.device, weights_only=True)
        if TrainConfig.from_dict(state["config"]).to_dict() != self.config.to_dict():  # settings added since: defaults
            raise CT2XInputError(f"{path}: was written with other settings; resume with the run's own config.json")
        _unwrap(self.generator).load_state_dict(state["generator"])
        if self.discriminator is not None:
            _unwrap(self.discriminator).load_state_dict(state["discriminator"])
        if self.generator_ema is not None:
            self.generator_ema.network.load_state_dict(state["generator_ema"])
        self.objective.load_optimizer_states(state)
        torch.set_rng_state(state["torch_rng"].cpu())
        if state["cuda_rng"]:
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
        self.step = int(state["step"])
        self.validation = dict(state.get("validation", self.validation))  # checkpoints before validation: none

    def _save_sample(self, batch: Dict[str, torch.Tensor]) -> None:
        from ct2x.io import save_png

        with torch.no_grad():
            picture = self.objective.sample_picture(batch, self.device)
        (self.run_dir / "samples").mkdir(exist_ok=True)
        save_png(picture, self.run_dir / "samples" / f"step_{self.step:06d}.png")

    def _save_model(self, name: str = MODEL, note: str = "") -> None:
        info = self.objective.model_info(self.step, len(self.dataset))
        if self.generator_ema is not None:
            note = f", weights averaged (EMA, decay {self.config.ema_decay} per step){note}"
        save_model(self.run_dir / name, self._model_network(), dataclasses.replace(
            info, description=info.description + note))

    def _model_network(self) -> torch.nn.Module:
        """The network a model file holds: the generator, or its moving average with `ema_decay`."""
        return _unwrap(self.generator) if self.generator_ema is None else self.generator_ema.network

    # --- validation -----------------------------------------------------------------------------------------------
    def _validation_set(self) -> torch.utils.data.Dataset:
        try:
            return self.config.objective_class.validation_set(self.config)
        except CT2XInputError as error:
            raise CT2XInputError(f"{error}; --validate-every scores the model on that split: prepare the folder with "
                                 "a --val-fraction above 0, or train without --validate-every") from None

    def _validate(self, autocast) -> None:
        """Scores the model file's network on the validation split, one sample at a time, and writes it as
        BEST_MODEL when its mean error is the lowest yet."""
        network = self._model_network()
        training = network.training
        network.eval()
        with torch.no_grad(), autocast:
            errors = [self.objective.validation_error(
                network, torch.utils.data.default_collate([self.validation_set[index]]), self.device)
                for index in range(len(self.validation_set))]
        network.train(training)
        error = sum(errors) / len(errors)
        self.validation["latest"] = error
        if error < self.validation["best"]:
            self.validation.update(best=error, best_step=self.step)
            self._save_model(BEST_MODEL, f"; the lowest validation error ({error:.6g}) of those every "
                                         f"{self.config.validate_every} steps")


class _AtEpoch(torch.utils.data.Dataset):
    """A training set indexed by (epoch, case index): its augmentation draws depend on (seed, epoch, case)."""

    def __init__(self, dataset: torch.utils.data.Dataset):
        self.dataset = dataset

    def __getitem__(self, key: Tuple[int, int]):
        epoch, index = key
        self.dataset.epoch = epoch
        return self.dataset[index]


class _WeightAverage:
    """An exponential moving average of a network's weights, in a copy of it; buffers (BatchNorm statistics) are
    the network's latest."""

    def __init__(self, network: torch.nn.Module, decay: float):
        self.network = copy.deepcopy(network).eval().requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, network: torch.nn.Module) -> None:
        for average, weight in zip(self.network.parameters(), network.parameters()):
            average.lerp_(weight.detach().to(average.dtype), 1.0 - self.decay)
        for average, buffer in zip(self.network.buffers(), network.buffers()):
            average.copy_(buffer)


def _unwrap(network: torch.nn.Module) -> torch.nn.Module:
    return network.module if isinstance(network, torch.nn.parallel.DistributedDataParallel) else network


def _distributed_rank_and_size(device: torch.device):
    """(rank, world size): from torchrun's environment, initialising the process group once; (0, 1) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


class _CsvLog:
    """Appends rows to a CSV file, writing the header once (a resumed run keeps appending) and every row in the
    header's column order."""

    def __init__(self, path: Path):
        self.path = path
        self.columns: Optional[List[str]] = None  # the header's, read once

    def write(self, row: Dict[str, float]) -> None:
        new = not self.path.exists()
        if new:
            self.columns = list(row)
        elif self.columns is None:
            with self.path.open(newline="", encoding="utf-8") as file:
                self.columns = next(csv.reader(file))
        with self.path.open("a", newline="", encoding="utf-8") as file:
            writer = csv.DictWriter(file, fieldnames=self.columns)
            if new:
                writer.writeheader()
            writer.writerow({key: f"{value:.6g}" if isinstance(value, float) else value for key, value in row.items()})


def _tensorboard(run_dir: Path) -> Optional[object]:
    """A TensorBoard SummaryWriter in the run folder, or None when the tensorboard package is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))
