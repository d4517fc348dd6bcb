"""The trainer on CT2X-GAN's tiny networks and a phantom synth folder: a step lowers the reconstruction loss, a run
writes its files and a model `ct2x.synthesize.Synthesizer` renders with, resume is exact."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_train import ctrl_c_at_the_third_step

from ct2x import phantoms
from ct2x.cli.main import main
from ct2x.data.ct_motion import CTMotion
from ct2x.data.prepare_synth import SynthPreparation, load_case, prepare_synth
from ct2x.data.synth_dataset import SynthAugmentation, SynthDataset
from ct2x.errors import CT2XInputError
from ct2x.io import save_ct, save_png
from ct2x.models import build_network
from ct2x.models import load as load_model
from ct2x.nets.ct2x_gan import PRESETS
from ct2x.nets.ct2x_gan_discriminator import PoseDiscriminatorConfig
from ct2x.synthesize import Synthesizer
from ct2x.train.config import CONFIG_FILE, TrainConfig
from ct2x.train.synth_gan import SynthGAN
from ct2x.train.trainer import Trainer
from ct2x.volume import CTVolume

TINY_GENERATOR = PRESETS["tiny32"].to_dict()
TINY_DISCRIMINATOR = PoseDiscriminatorConfig.scaled(32, 1 / 16).to_dict()
NO_LPIPS = {"lpips": 0.0}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Two phantom CTs (16^3 cube of 8 mm voxels, films 32 px) and three films, all in the train split."""
    folder = tmp_path_factory.mktemp("train_synth")
    for name, size in (("a", 32), ("b", 28)):
        save_ct(phantoms.chest(size=size, spacing_mm=10.0), folder / f"{name}.mha")
    rows, columns = np.mgrid[0:64, 0:64] / 63.0
    for number in range(3):
        film = np.where(((columns - 0.5) / 0.4) ** 2 + ((rows - 0.5) / 0.48) ** 2 <= 1, 0.5 + 0.1 * number, 0.05)
        film[:, 30:34] = 0.9
        save_png(np.round(film * 255).astype(np.uint8), folder / f"film{number}.png")
    out = folder / "prepared"
    prepare_synth([folder / "a.mha", folder / "b.mha"], [folder / f"film{n}.png" for n in range(3)], out,
                  SynthPreparation(voxel_mm=8.0, ct_voxels=16, film_px=32, mip_px=16, val_fraction=0,
                                   test_fraction=0), progress=False)
    return out


def tiny_config(prepared, **changes) -> TrainConfig:
    settings = dict(model="ct2x-gan", data=str(prepared), generator_config=TINY_GENERATOR,
                    discriminator_config=TINY_DISCRIMINATOR, loss_config=NO_LPIPS, steps=3, decay_steps=0,
                    batch_size=2, learning_rate=0.0025, betas=(0.0, 0.99), augment=False, log_every=1,
                    sample_every=2, checkpoint_every=1)
    return TrainConfig(**{**settings, **changes})


def test_dataset_gives_each_case_at_each_stored_pose_with_a_seeded_film(prepared):
    dataset = SynthDataset(prepared, "train", seed=3)
    assert len(dataset) == 2 * 7
    sample = dataset[8]  # the second case at its second pose
    assert sample["case"] == "b" and sample["angle_deg"] == -60.0
    assert sample["ct"].shape == (1, 16, 16, 16) and 0 <= sample["ct"].min() and sample["ct"].max() <= 1
    assert sample["label"].shape == (25,) and sample["mip"].shape == (1, 16, 16)
    for name in ("drr", "xray"):
        assert sample[name].shape == (1, 32, 32) and -1 <= sample[name].min() and sample[name].max() <= 1
    assert [dataset[i]["film"] for i in range(14)] == [SynthDataset(prepared, seed=3)[i]["film"] for i in range(14)]


def test_augmentation_renders_a_moved_ct_at_a_drawn_pose_reproducibly(prepared):
    still = SynthAugmentation(probability=1.0, motion=CTMotion(0.0, 0.0, 0.0), random_pose=False)
    stored, rendered = SynthDataset(prepared, seed=3)[8], SynthDataset(prepared, seed=3, augmentation=still)[8]
    for name in ("ct", "label", "mip", "drr"):  # rendering the stored pose of the unmoved CT gives the stored sample
        torch.testing.assert_close(rendered[name], stored[name], atol=1e-5, rtol=0)

    dataset = SynthDataset(prepared, seed=3, augmentation=SynthAugmentation(probability=1.0))
    sample, again = dataset[8], dataset[8]
    assert -90 <= sample["angle_deg"] <= 90 and sample["angle_deg"] not in (-90, -60, -30, 0, 30, 60, 90)
    assert not torch.equal(sample["ct"], stored["ct"]) and not torch.equal(sample["drr"], stored["drr"])
    for name in ("ct", "label", "mip", "drr", "xray"):
        assert torch.equal(sample[name], again[name])
    case = load_case(dataset.paths[1])
    view = SynthDataset(prepared).settings.carm(32).view(sample["angle_deg"], 0.0, CTVolume(
        case["ct_hu"].astype(np.float32), case["affine"]).center_ras)
    torch.testing.assert_close(sample["label"], torch.from_numpy(view.camera_label()))  # the drawn pose's label
    dataset.epoch = 1
    assert dataset[8]["angle_deg"] != sample["angle_deg"]


def test_a_step_lowers_the_reconstruction_loss_on_a_fixed_batch(prepared):
    torch.manual_seed(0)
    objective = SynthGAN(build_network("ct2x-gan", TINY_GENERATOR),
                         build_network("ct2x-gan-discriminator", TINY_DISCRIMINATOR), tiny_config(prepared))
    dataset = SynthDataset(prepared)
    batch = torch.utils.data.default_collate([dataset[3], dataset[10]])
    first = objective.step(batch, torch.device("cpu"))
    assert {"g_total", "g_adversarial", "g_reconstruction", "g_zero", "d_total", "d_r1"} <= set(first)
    with torch.no_grad():
        after = objective.loss.generator_terms(objective.inputs(batch, torch.device("cpu")))["reconstruction"]
    assert after.item() < first["g_reconstruction"]


def test_lazy_r1_steps_log_the_latest_r1(prepared, tmp_path):
    config = tiny_config(prepared, loss_config={**NO_LPIPS, "r1_interval": 2}, sample_every=5)
    Trainer(config, tmp_path, torch.device("cpu")).run(progress=False)
    rows = list(csv.DictReader((tmp_path / "log.csv").open()))
    r1 = [float(row["d_r1"]) for row in rows]  # R1 after 0 and 2 steps done; the step between repeats the first
    assert r1[0] >= 0 and r1[2] >= 0 and r1[1] == r1[0] and r1[2] != r1[0]
    for row in rows:
        assert float(row["d_total"]) == float(row["d_total"])  # a number on every step


def test_run_files_model_and_exact_resume(prepared, tmp_path, monkeypatch):
    torch.manual_seed(0)
    config, whole, stopped = tiny_config(prepared, augment=True), tmp_path / "whole", tmp_path / "stopped"
    whole.mkdir()
    stopped.mkdir()
    Trainer(config, whole, torch.device("cpu")).run(progress=False)
    assert {path.name for path in whole.iterdir()} >= {"log.csv", "checkpoint.pt", "model.safetensors", "samples"}
    assert [path.name for path in (whole / "samples").iterdir()] == ["step_000002.png"]
    rows = list(csv.DictReader((whole / "log.csv").open()))
    assert [row["step"] for row in rows] == ["1", "2", "3"]

    synthesizer = Synthesizer(whole / "model.safetensors", phantoms.chest(size=32, spacing_mm=10.0),
                              style=prepared.parent / "film0.png")
    film = synthesizer.render(30.0)
    assert film.shape == (32, 32) and np.isfinite(film).all()

    with ctrl_c_at_the_third_step(monkeypatch, SynthGAN):
        Trainer(config, stopped, torch.device("cpu")).run(progress=False)
    Trainer(config, stopped, torch.device("cpu"), resume=True).run(progress=False)
    resumed = list(csv.DictReader((stopped / "log.csv").open()))
    assert [row["step"] for row in resumed] == ["1", "2", "3"]
    for key in set(rows[2]) - {"seconds"}:
        assert resumed[2][key] == rows[2][key]  # the step after resuming equals the uninterrupted run's


@pytest.fixture(scope="module")
def prepared_with_val(prepared):
    """The same CTs and films, case b and a film in the validation split."""
    folder = prepared.parent
    out = folder / "with_val"
    prepare_synth([folder / "a.mha", folder / "b.mha"], [folder / f"film{n}.png" for n in range(3)], out,
                  SynthPreparation(voxel_mm=8.0, ct_voxels=16, film_px=32, mip_px=16, val_fraction=0.4,
                                   test_fraction=0), progress=False)
    return out


def mean_validation_error(model_path, data) -> float:
    """The mean of `SynthGAN.validation_error` over the validation split, the model file's network scoring."""
    network = load_model(model_path)[0].eval()
    objective = SynthGAN(network, build_network("ct2x-gan-discriminator", TINY_DISCRIMINATOR),
                         tiny_config(data))
    validation = SynthGAN.validation_set(tiny_config(data))
    with torch.no_grad():
        errors = [objective.validation_error(network, torch.utils.data.default_collate([validation[index]]),
                                             torch.device("cpu")) for index in range(len(validation))]
    return sum(errors) / len(errors)


def test_validation_keeps_the_best_model_and_resumes_alike(prepared_with_val, tmp_path, monkeypatch):
    torch.manual_seed(0)
    config = tiny_config(prepared_with_val, steps=4, validate_every=2)
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    whole.mkdir()
    stopped.mkdir()
    trainer = Trainer(config, whole, torch.device("cpu"))
    trainer.run(progress=False)
    rows = list(csv.DictReader((whole / "log.csv").open()))
    errors = [float(row["validation_error"]) for row in rows]  # scored after steps 2 and 4, the latest logged
    assert np.isnan(errors[0]) and errors[1] == errors[2] and errors[3] != errors[1] and errors[1] > 0
    best_step = 2 if errors[1] < errors[3] else 4
    assert trainer.validation["best_step"] == best_step
    assert mean_validation_error(whole / "best_model.safetensors", prepared_with_val) == pytest.approx(
        min(errors[1], errors[3]), rel=1e-5)  # the kept model scores what was logged for it
    assert mean_validation_error(whole / "model.safetensors", prepared_with_val) == pytest.approx(errors[3], rel=1e-5)
    description = load_model(whole / "best_model.safetensors")[1].description
    assert f"for {best_step} steps" in description and "lowest validation error" in description

    with ctrl_c_at_the_third_step(monkeypatch, SynthGAN):
        Trainer(config, stopped, torch.device("cpu")).run(progress=False)
    Trainer(config, stopped, torch.device("cpu"), resume=True).run(progress=False)
    resumed = list(csv.DictReader((stopped / "log.csv").open()))
    assert [row["validation_error"] for row in resumed] == [row["validation_error"] for row in rows]
    kept, resumed_best = (load_file(run / "best_model.safetensors") for run in (whole, stopped))
    assert all(torch.equal(kept[name], resumed_best[name]) for name in kept)


def test_a_checkpoint_written_before_validation_existed_resumes(prepared, tmp_path):
    Trainer(tiny_config(prepared), tmp_path, torch.device("cpu")).run(progress=False, time_limit_s=0)  # 1 step
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    del state["validation"]
    torch.save(state, tmp_path / "checkpoint.pt")
    trainer = Trainer(tiny_config(prepared), tmp_path, torch.device("cpu"), resume=True)
    assert trainer.step == 1 and trainer.validation["best_step"] == 0
    trainer.run(progress=False)
    assert trainer.step == 3


def test_validation_on_the_command_line_and_without_a_validation_split(prepared, prepared_with_val, tmp_path,
                                                                       capsys):
    common = ["--preset", "scaled", "--width", "0.0625", "--steps", "2", "--batch-size", "2", "--no-lpips", "--quiet",
              "--validate-every", "2"]
    assert main(["train", "synth", "--data", str(prepared_with_val), "--out", str(tmp_path / "run"), *common]) == 0
    assert TrainConfig.load(tmp_path / "run" / CONFIG_FILE).validate_every == 2
    assert "best_model.safetensors from step 2" in capsys.readouterr().out
    assert (tmp_path / "run" / "best_model.safetensors").exists()
    assert main(["train", "synth", "--data", str(prepared), "--out", str(tmp_path / "none"), *common]) == 2
    assert "no val" in capsys.readouterr().err and not (tmp_path / "none").exists()  # no half-made run folder
    with pytest.raises(CT2XInputError, match="validate_every"):
        tiny_config(prepared, validate_every=-1)


@pytest.mark.slow
def test_loader_workers_give_the_batches_of_one_process_across_epochs(prepared, tmp_path):
    def first_batches(workers: int) -> list:
        trainer = Trainer(tiny_config(prepared, augment=True, workers=workers), tmp_path / str(workers),
                          torch.device("cpu"))
        batches = trainer._batches()
        return [next(batches) for _ in range(9)]  # 14 samples in batches of 2: epoch 0 and two of epoch 1

    alone, with_workers = first_batches(0), first_batches(2)
    for one, other in zip(alone, with_workers):
        assert one["case"] == other["case"] and one["film"] == other["film"]
        for key in ("ct", "label", "mip", "drr", "xray", "angle_deg"):
            assert torch.equal(one[key], other[key])
    assert not torch.equal(alone[0]["drr"], alone[-1]["drr"])


def test_the_model_file_holds_the_moving_average_of_the_generator(prepared, tmp_path, monkeypatch):
    """With `ema_decay` the trainer averages the generator's weights after every step (ema <- d ema + (1 - d) w),
    writes the average as the model, and keeps it through a resume."""
    torch.manual_seed(0)
    config = tiny_config(prepared, ema_decay=0.25)
    after_each_step, real_step = [], SynthGAN.step

    def recorded_step(self, batch, device, done):
        losses = real_step(self, batch, device, done)
        after_each_step.append({name: value.detach().clone() for name, value in self.generator.named_parameters()})
        return losses

    monkeypatch.setattr(SynthGAN, "step", recorded_step)
    (tmp_path / "whole").mkdir()
    trainer = Trainer(config, tmp_path / "whole", torch.device("cpu"))
    expected = {name: value.detach().clone() for name, value in trainer.generator.named_parameters()}
    trainer.run(progress=False)
    monkeypatch.setattr(SynthGAN, "step", real_step)
    for weights in after_each_step:
        expected = {name: 0.25 * expected[name] + 0.75 * weights[name] for name in expected}
    written = load_file(str(tmp_path / "whole" / "model.safetensors"))
    for name, value in expected.items():
        torch.testing.assert_close(written[name], value)
    assert any(not torch.equal(written[name], after_each_step[-1][name]) for name in expected)  # not the last
    assert "EMA" in load_model(tmp_path / "whole" / "model.safetensors").info.description

    (tmp_path / "stopped").mkdir()
    with ctrl_c_at_the_third_step(monkeypatch, SynthGAN):
        Trainer(config, tmp_path / "stopped", torch.device("cpu")).run(progress=False)
    Trainer(config, tmp_path / "stopped", torch.device("cpu"), resume=True).run(progress=False)
    resumed = load_file(str(tmp_path / "stopped" / "model.safetensors"))
    for name in expected:
        torch.testing.assert_close(resumed[name], written[name], rtol=0, atol=0)


TWO_PROCESS_RUN = """
import sys, torch
from ct2x.train.config import TrainConfig
from ct2x.train.trainer import Trainer
config = TrainConfig.load(sys.argv[1])
trainer = Trainer(config, sys.argv[2], torch.device("cpu"))
trainer.run(progress=False)
torch.save({name: value for name, value in trainer.generator.named_parameters()},
           f"{sys.argv[2]}/rank{trainer.rank}.pt")
"""


@pytest.mark.slow
def test_two_processes_under_torchrun_take_the_same_steps(prepared, tmp_path):
    """Each process draws other samples and starts from other random weights (seed + rank): equal weights after
    the run need both the first process's weights shared and every gradient averaged."""
    tiny_config(prepared, steps=2, batch_size=1, augment=True, sample_every=5).save(tmp_path / "config.json")
    (tmp_path / "run.py").write_text(TWO_PROCESS_RUN)
    (tmp_path / "run").mkdir()
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(tmp_path / "run.py"), str(tmp_path / "config.json"), str(tmp_path / "run")],
                   check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    first, second = (torch.load(tmp_path / "run" / f"rank{rank}.pt", weights_only=True) for rank in (0, 1))
    for name, value in first.items():
        torch.testing.assert_close(value, second[name], rtol=0, atol=1e-6, msg=name)
    assert [row["step"] for row in csv.DictReader((tmp_path / "run" / "log.csv").open())] == ["1", "2"]
    assert (tmp_path / "run" / "model.safetensors").exists()


def test_train_synth_command_line(prepared, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "synth", "--data", str(prepared), "--out", str(out), "--preset", "scaled",
                 "--width", "0.0625", "--steps", "2", "--batch-size", "2", "--no-lpips", "--quiet"]) == 0
    config = TrainConfig.load(out / CONFIG_FILE)
    assert config.model == "ct2x-gan" and config.learning_rate == 0.0025 and config.betas == (0.0, 0.99)
    assert config.loss_config["lpips"] == 0 and config.generator_config["image_size"] == 32 and config.augment
    assert "real_samples" not in config.loss_config  # the paper's eq. 17: DRRs as real
    assert (out / "model.safetensors").exists()

    ablation = tmp_path / "ablation"
    assert main(["train", "synth", "--data", str(prepared), "--out", str(ablation), "--preset", "scaled",
                 "--width", "0.0625", "--steps", "1", "--batch-size", "2", "--no-lpips", "--no-pose-attention",
                 "--no-style-encoder", "--no-consistency", "--no-augment", "--real-films-as-real", "--quiet"]) == 0
    config = TrainConfig.load(ablation / CONFIG_FILE)
    assert not (config.generator_config["pose_attention"] or config.generator_config["style_encoder"])
    assert config.loss_config["consistency"] is False and not config.augment
    assert config.loss_config["real_samples"] == "xray"


def test_train_synth_refuses_other_models_and_folders(prepared, tmp_path, capsys):
    common = ["--out", str(tmp_path / "run"), "--steps", "1", "--quiet"]
    assert main(["train", "synth", "--model", "x2ct", "--data", str(prepared), *common]) == 2
    assert "`train synth` trains ct2x-gan" in capsys.readouterr().err
    assert main(["train", "recon", "--data", str(prepared), *common]) == 2
    assert "not a folder of `ct2x prepare recon`" in capsys.readouterr().err
    assert main(["train", "recon", "--data", str(prepared), "--no-pose-attention", *common]) == 2
    assert "--no-pose-attention is for `train synth`" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
