"""The trainer on a tiny X2CT network and phantom cases: the loss falls, files are written, resume is exact."""

from __future__ import annotations

import contextlib
import csv
import json
import shutil
from typing import Iterator

import pytest
import torch

from ct2x import models, phantoms
from ct2x.cli.main import main
from ct2x.data.prepare_recon import ReconPreparation, prepare_recon
from ct2x.data.recon_dataset import ReconDataset
from ct2x.errors import CT2XInputError
from ct2x.io import save_ct
from ct2x.models import build_network
from ct2x.nets.patch_discriminator import PatchDiscriminatorConfig
from ct2x.nets.x2ct import X2CTConfig
from ct2x.train.config import CONFIG_FILE, TrainConfig
from ct2x.train.recon_gan import ReconGAN
from ct2x.train.trainer import Trainer

TINY_GENERATOR = X2CTConfig.scaled(input_size=64, width=0.125, depth=0.25).to_dict()
TINY_DISCRIMINATOR = PatchDiscriminatorConfig(base_channels=4).to_dict()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train")
    chest = phantoms.chest(size=32, spacing_mm=10.0)
    save_ct(chest, folder / "a.mha")
    out = folder / "prepared"
    prepare_recon([folder / "a.mha"], out, ReconPreparation(ct_voxels=64, film_px=64, test_fraction=0),
                  progress=False)
    return out


@contextlib.contextmanager
def ctrl_c_at_the_third_step(monkeypatch, objective: type) -> Iterator[None]:
    """Runs the block with `objective.step` raising KeyboardInterrupt (Ctrl-C) at its third call, after the
    checkpoint of step 2; expects the block to stop there, then restores the step."""
    real_step, calls = objective.step, []

    def stopped_at_the_third_step(self, batch, device, done):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(self, batch, device, done)

    monkeypatch.setattr(objective, "step", stopped_at_the_third_step)
    with pytest.raises(KeyboardInterrupt):
        yield
    monkeypatch.setattr(objective, "step", real_step)

def tiny_config(prepared, **changes) -> TrainConfig:
    settings = dict(data=str(prepared), generator_config=TINY_GENERATOR, discriminator_config=TINY_DISCRIMINATOR,
                    steps=3, decay_steps=1, augment=False, log_every=1, sample_every=2, checkpoint_every=1)
    return TrainConfig(**{**settings, **changes})


def test_generator_steps_lower_the_loss_on_a_fixed_batch(prepared):
    torch.manual_seed(0)
    config = tiny_config(prepared, learning_rate=1e-3)
    objective = ReconGAN(build_network("x2ct-biplanar", TINY_GENERATOR),
                         build_network("patch-discriminator-3d", TINY_DISCRIMINATOR), ("pa", "lateral"), config)
    batch = torch.utils.data.default_collate([ReconDataset(prepared, "train")[0]])
    losses = [objective.step(batch, torch.device("cpu"))["g_voxel"] for _ in range(4)]
    assert losses[-1] < losses[0]


def test_without_gan_loss_no_discriminator_is_built_and_the_loss_falls(prepared, tmp_path):
    torch.manual_seed(0)
    trainer = Trainer(tiny_config(prepared, gan_weight=0.0, learning_rate=1e-3), tmp_path, torch.device("cpu"))
    assert trainer.discriminator is None and trainer.objective.discriminator_optimizer is None
    batch = torch.utils.data.default_collate([ReconDataset(prepared, "train")[0]])
    steps = [trainer.objective.step(batch, torch.device("cpu")) for _ in range(4)]
    assert set(steps[0]) == {"g_voxel", "g_projection", "g_total"}  # no adversarial term, no discriminator loss
    assert steps[-1]["g_voxel"] < steps[0]["g_voxel"]
    with pytest.raises(ValueError, match="needs no discriminator"):
        ReconGAN(trainer.generator, build_network("patch-discriminator-3d", TINY_DISCRIMINATOR), ("pa", "lateral"),
                 tiny_config(prepared, gan_weight=0.0))


def test_learning_rate_is_constant_then_falls_linearly():
    config = TrainConfig(data="x", steps=10, decay_steps=4)
    rates = [config.learning_rate_at(step) for step in range(10)]
    assert rates[:7] == [2e-4] * 7 and rates[7] < 2e-4 and rates[-1] > 0  # the last 4 of 10 steps decay ...
    assert rates[7] - rates[8] == pytest.approx(rates[8] - rates[9])  # ... linearly


def test_bad_settings_are_refused():
    with pytest.raises(CT2XInputError, match="unknown"):
        TrainConfig(model="no-such-model")
    with pytest.raises(CT2XInputError, match="decay_steps"):
        TrainConfig(steps=5, decay_steps=6)
    with pytest.raises(CT2XInputError, match="unknown settings"):
        TrainConfig.from_dict({"stepz": 3})
    with pytest.raises(CT2XInputError, match="gan_weight"):
        TrainConfig(gan_weight=-0.1)


@pytest.mark.parametrize("gan_weight", [0.1, 0.0])

@pytest.mark.slow
def test_run_files_and_exact_resume(prepared, tmp_path, monkeypatch, gan_weight):
    straight = tmp_path / "straight"
    straight.mkdir()
    Trainer(tiny_config(prepared, gan_weight=gan_weight), straight, torch.device("cpu")).run(progress=False)
    assert {p.name for p in straight.iterdir()} >= {"log.csv", "checkpoint.pt", "model.safetensors", "samples"}
    assert (straight / "samples" / "step_000002.png").exists()
    network, info = models.load(straight / "model.safetensors")
    assert info.kind == "x2ct-biplanar" and info.config == TINY_GENERATOR
    assert info.inputs["film_px"] == 64 and info.outputs["field_of_view_mm"] == 320.0 and info.outputs["voxels"] == 64
    assert tuple(network(torch.rand(1, 1, 64, 64), torch.rand(1, 1, 64, 64)).shape) == (1, 1, 64, 64, 64)
    uninterrupted = list(csv.DictReader((straight / "log.csv").open()))
    checkpoint = torch.load(straight / "checkpoint.pt", weights_only=True)
    adversarial = {"discriminator", "discriminator_optimizer", "g_gan", "d_total"}  # checkpoint entries, log columns
    assert adversarial & (set(checkpoint) | set(uninterrupted[0])) == (adversarial if gan_weight else set())

    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    with ctrl_c_at_the_third_step(monkeypatch, ReconGAN):
        Trainer(tiny_config(prepared, gan_weight=gan_weight), interrupted, torch.device("cpu")).run(progress=False)
    Trainer(tiny_config(prepared, gan_weight=gan_weight), interrupted, torch.device("cpu"),
            resume=True).run(progress=False)
    resumed = list(csv.DictReader((interrupted / "log.csv").open()))
    assert [row["step"] for row in resumed] == ["1", "2", "3"]
    for key in set(uninterrupted[2]) - {"seconds"}:
        assert resumed[2][key] == uninterrupted[2][key]  # the step after resuming equals the uninterrupted run's


def test_validation_scores_the_x2ct_generator_and_keeps_the_best(prepared, tmp_path):
    with_val = tmp_path / "with_val"
    source = json.loads((prepared / "manifest.json").read_text())["cases"]["a"]["source"]
    shutil.copy(source, tmp_path / "b.mha")
    prepare_recon([source, tmp_path / "b.mha"], with_val, ReconPreparation(ct_voxels=64, film_px=64, test_fraction=0,
                                                                           val_fraction=0.5), progress=False)
    run = tmp_path / "run"
    run.mkdir()
    trainer = Trainer(tiny_config(with_val, steps=2, decay_steps=0, validate_every=1), run, torch.device("cpu"))
    trainer.run(progress=False)
    errors = [float(row["validation_error"]) for row in csv.DictReader((run / "log.csv").open())]
    assert len(errors) == 2 and all(0 < error < 1 for error in errors)
    network = models.load(run / "best_model.safetensors")[0].eval()
    validation = ReconGAN.validation_set(trainer.config)
    with torch.no_grad():
        error = trainer.objective.validation_error(network, torch.utils.data.default_collate([validation[0]]),
                                                   torch.device("cpu"))
    assert error == pytest.approx(min(errors), rel=1e-5) and trainer.validation["best"] == pytest.approx(error)


@pytest.mark.slow
def test_train_command_line(prepared, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "recon", "--data", str(prepared), "--out", str(run), "--preset", "scaled", "--width", "0.125",
            "--depth", "0.25", "--steps", "1", "--no-augment", "--quiet"]
    assert main(args) == 0 and (run / "model.safetensors").exists()
    assert main(args) == 2 and "--resume" in capsys.readouterr().err  # the folder is taken
    assert main(["train", "recon", "--out", str(tmp_path / "new")]) == 2 and "give --data" in capsys.readouterr().err


def test_a_time_limit_stops_with_a_checkpoint_and_a_model_and_resume_finishes(prepared, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "recon", "--data", str(prepared), "--out", str(run), "--preset", "scaled", "--width", "0.125",
            "--depth", "0.25", "--steps", "3", "--checkpoint-every", "5", "--no-augment", "--quiet"]
    assert main([*args, "--time-limit", "0"]) == 0  # the limit has passed after the first step
    printed = capsys.readouterr().out
    assert "1 steps" in printed and f"`ct2x train recon --out {run} --resume` continues to 3" in printed
    assert (run / "model.safetensors").exists()
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 1  # saved although 1 % 5 != 0
    assert main(["train", "recon", "--data", str(tmp_path), "--out", str(run), "--resume"]) == 2  # another folder
    assert f"trains on {prepared.resolve()}" in capsys.readouterr().err
    assert main(["train", "recon", "--out", str(run), "--resume", "--quiet"]) == 0  # the run's own --data
    assert "3 steps" in capsys.readouterr().out
    assert [row["step"] for row in csv.DictReader((run / "log.csv").open())][-1] == "3"
    assert main([*args[:4], str(tmp_path / "other"), *args[5:], "--time-limit", "-1"]) == 2
    assert not (tmp_path / "other").exists()  # refused before any run folder is made


@pytest.mark.parametrize("options, expected", [
    (["--model", "cvaa", "--no-view-attention"], {"view_attention": False, "fine_distillation": True}),
    (["--model", "cvaa", "--no-fine-distillation"], {"view_attention": True, "fine_distillation": False}),
    (["--model", "x2ct", "--gan-weight", "0"], {}),
])
def test_train_options_reach_the_run_config(prepared, tmp_path, monkeypatch, options, expected):
    monkeypatch.setattr(Trainer, "run", lambda self, **options: None)  # the settings only, no training
    run = tmp_path / "run"
    assert main(["train", "recon", "--data", str(prepared), "--out", str(run), "--preset", "scaled", "--width",
                 "0.125", "--depth", "0.25", "--steps", "1", "--quiet", *options]) == 0
    saved = json.loads((run / CONFIG_FILE).read_text())
    assert {key: saved["generator_config"][key] for key in expected} == expected
    assert saved["gan_weight"] == (0.0 if "--gan-weight" in options else 0.1)
    build_network(TrainConfig.from_dict(saved).recipe["generator"], saved["generator_config"])  # a valid network


def test_cvaa_switches_are_refused_for_other_models(prepared, tmp_path, capsys):
    for model in ("x2ct", "x2ct-single"):
        assert main(["train", "recon", "--model", model, "--data", str(prepared), "--out", str(tmp_path / model),
                     "--no-fine-distillation"]) == 2
        assert "use --model cvaa" in capsys.readouterr().err
        assert not (tmp_path / model).exists()
