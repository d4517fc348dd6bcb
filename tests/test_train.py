"""The trainer on a tiny X2CT network and phantom cases: the loss falls, files are written, resume is exact."""

from __future__ import annotations

import csv

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
from ct2x.train.config import TrainConfig
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


@pytest.mark.slow
def test_run_files_and_exact_resume(prepared, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    straight.mkdir()
    Trainer(tiny_config(prepared), straight, torch.device("cpu")).run(progress=False)
    assert {p.name for p in straight.iterdir()} >= {"log.csv", "checkpoint.pt", "model.safetensors", "samples"}
    assert (straight / "samples" / "step_000002.png").exists()
    network, info = models.load(straight / "model.safetensors")
    assert info.kind == "x2ct-biplanar" and info.config == TINY_GENERATOR
    assert info.inputs["film_px"] == 64 and info.outputs["field_of_view_mm"] == 320.0 and info.outputs["voxels"] == 64
    assert tuple(network(torch.rand(1, 1, 64, 64), torch.rand(1, 1, 64, 64)).shape) == (1, 1, 64, 64, 64)
    uninterrupted = list(csv.DictReader((straight / "log.csv").open()))

    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    real_step, calls = ReconGAN.step, []

    def stopped_at_the_third_step(self, batch, device):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C after the checkpoint of step 2
        return real_step(self, batch, device)

    monkeypatch.setattr(ReconGAN, "step", stopped_at_the_third_step)
    with pytest.raises(KeyboardInterrupt):
        Trainer(tiny_config(prepared), interrupted, torch.device("cpu")).run(progress=False)
    monkeypatch.setattr(ReconGAN, "step", real_step)
    Trainer(tiny_config(prepared), interrupted, torch.device("cpu"), resume=True).run(progress=False)
    resumed = list(csv.DictReader((interrupted / "log.csv").open()))
    assert [row["step"] for row in resumed] == ["1", "2", "3"]
    for key in ("g_total", "d_total", "g_voxel", "g_projection"):
        assert resumed[2][key] == uninterrupted[2][key]  # the step after resuming equals the uninterrupted run's


@pytest.mark.slow
def test_train_command_line(prepared, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "recon", "--data", str(prepared), "--out", str(run), "--preset", "scaled", "--width", "0.125",
            "--depth", "0.25", "--steps", "1", "--no-augment", "--quiet"]
    assert main(args) == 0 and (run / "model.safetensors").exists()
    assert main(args) == 2 and "--resume" in capsys.readouterr().err  # the folder is taken
