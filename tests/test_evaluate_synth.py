"""`ct2x evaluate synth`: a tiny random CT2X-GAN on the test cases of a prepared phantom folder, report files.

Feature networks and the LPIPS are built here (or by ct2x: `--features random`); nothing is downloaded.
"""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from torch import nn

import ct2x.metrics.fid as fid_module
import ct2x.metrics.lpips as lpips_module
from ct2x import models, phantoms
from ct2x.cli.main import main
from ct2x.data.prepare_synth import (
    SynthPreparation,
    case_paths,
    film_paths,
    load_case,
    load_film,
    prepare_synth,
)
from ct2x.evaluate_synth import (
    DRR_BASELINE,
    CaseSyntheses,
    distribution_table,
    film_rows,
    picture_sheet,
    real_film_floor,
    summary,
    synthesize_split,
)
from ct2x.io import save_ct, save_png
from ct2x.metrics.fid import FeatureNetwork, frechet_distance, kernel_inception_distance
from ct2x.metrics.lpips import GreyLPIPS
from ct2x.models import ModelInfo
from ct2x.nets.ct2x_gan import PRESETS, CT2XGANGenerator
from ct2x.nets.ct2x_gan_discriminator import PoseDiscriminator, PoseDiscriminatorConfig
from ct2x.volume import CTVolume

TINY = SynthPreparation(voxel_mm=8.0, ct_voxels=16, film_px=32, mip_px=16, val_fraction=0.0, test_fraction=0.5)
POSES = 7


def chest_film(seed: int) -> np.ndarray:
    """(64, 64) uint8 bone-bright chest-like film, its body, lungs and spine varied by `seed`, with noise."""
    rng = np.random.default_rng(seed)
    rows, columns = np.mgrid[0:64, 0:64] / 63.0
    width, lung = rng.uniform(0.35, 0.45), rng.uniform(0.1, 0.14)
    film = np.where(((columns - 0.5) / width) ** 2 + ((rows - 0.5) / 0.48) ** 2 <= 1, rng.uniform(0.5, 0.6), 0.05)
    for centre in (0.3, 0.7):
        film[((columns - centre) / lung) ** 2 + ((rows - 0.4) / 0.25) ** 2 <= 1] = rng.uniform(0.25, 0.35)
    film[:, 30:34] = 0.9
    return np.round(np.clip(film + rng.normal(0, 0.02, film.shape), 0, 1) * 255).astype(np.uint8)


def test_built_features() -> FeatureNetwork:
    """A feature network built here: 16 features, the means of the film's 4 x 4 blocks."""
    return FeatureNetwork("test-built block means, 16-d",
                          lambda films: nn.functional.adaptive_avg_pool2d(films, 4).flatten(1))  # (N, 16)


test_built_features.__test__ = False  # a builder, not a test


class SquaredDifference(nn.Module):
    """LPIPS's interface, built here: the mean squared difference of two (N, 3, H, W) batches, (N, 1, 1, 1)."""

    def forward(self, in0: torch.Tensor, in1: torch.Tensor) -> torch.Tensor:
        return (in0 - in1).square().mean(dim=(1, 2, 3), keepdim=True)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Four phantom CTs (two test cases) and eight films (four test films, each its own patient), at 32^2."""
    folder = tmp_path_factory.mktemp("evaluate_synth")
    cts, films = folder / "cts", folder / "films"
    cts.mkdir()
    films.mkdir()
    chest = phantoms.chest(size=32, spacing_mm=10.0)
    for n, scale in enumerate((1.0, 0.9, 1.1, 1.2)):  # four patients with different soft-tissue contrast
        save_ct(CTVolume(np.where(chest.hu > -900, chest.hu * scale, chest.hu), chest.affine), cts / f"p{n}.mha")
    for n in range(8):
        save_png(chest_film(n), films / f"film{n}-PA.png")
    out = folder / "prepared"
    prepare_synth([cts], [films], out, TINY, progress=False)
    return out


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    models.save_model(path, CT2XGANGenerator(PRESETS["tiny32"]),
                      ModelInfo(kind="ct2x-gan", config=PRESETS["tiny32"].to_dict(), license="Apache-2.0"))
    return path


def test_syntheses_at_every_pose_take_the_test_films_in_turn(prepared, model_file):
    network = models.load(model_file).network
    syntheses = synthesize_split(network, prepared)
    test_films = [path.stem for path in film_paths(prepared, "test")]
    assert [s.case for s in syntheses] == [path.stem for path in case_paths(prepared, "test")] and len(syntheses) == 2
    assert len(test_films) == 4
    for result in syntheses:
        for films in (result.drr, result.drr_style, result.xray_style):
            assert films.shape == (POSES, 32, 32) and 0 <= films.min() and films.max() <= 1
        np.testing.assert_array_equal(result.drr, load_case(prepared / "cases" / f"{result.case}.npz")["drr"])
        assert not np.allclose(result.drr_style, result.xray_style)  # two styles, two films
    assert syntheses[0].style_films + syntheses[1].style_films == [test_films[i % 4] for i in range(2 * POSES)]


def test_film_metrics_per_case_and_pose_and_a_perfect_synthesis(prepared):
    drr = load_case(case_paths(prepared, "test")[0])["drr"]  # (7, 32, 32)
    perfect = CaseSyntheses("p", np.arange(POSES, dtype=np.float32), drr, drr.copy(), drr.copy(), ["f"] * POSES)
    rows = film_rows([perfect], GreyLPIPS(SquaredDifference(), value_range=(0.0, 1.0)))
    assert len(rows) == POSES and list(rows[0]) == ["case", "angle_deg", "style_film", "lpips", "psnr", "ssim"]
    table = summary(rows)
    assert table["lpips"]["mean"] == 0 and table["psnr"]["mean"] == 100 and table["ssim"]["mean"] == pytest.approx(1)
    worse = CaseSyntheses("p", perfect.angles_deg, drr, np.clip(drr + 0.1, 0, 1), drr, ["f"] * POSES)
    rows = film_rows([worse])
    assert "lpips" not in rows[0] and 15 < summary(rows)["psnr"]["mean"] < 25 and summary(rows)["ssim"]["mean"] < 1


def test_distribution_table_scores_each_method_against_the_test_films(prepared, model_file):
    syntheses = synthesize_split(models.load(model_file).network, prepared)
    table = distribution_table(syntheses, prepared, test_built_features(), "tiny")
    assert list(table) == ["tiny (X-ray style)", "tiny (DRR style)", DRR_BASELINE]
    for values in table.values():
        assert values["films"] == 2 * POSES and values["real_films"] == 4 and values["kid_subset_size"] == 4
        assert np.isfinite([values["fid"], values["kid"], values["kid_std"]]).all() and values["fid"] > 0
    perfect = [CaseSyntheses(s.case, s.angles_deg, s.drr, s.drr, s.drr, s.style_films) for s in syntheses]
    same = distribution_table(perfect, prepared, test_built_features(), "tiny")
    assert same["tiny (X-ray style)"] == same[DRR_BASELINE]  # the DRRs themselves score as the baseline


def test_floor_scores_the_other_splits_real_films_against_the_splits(prepared):
    features = test_built_features()
    train, test = (features.features(np.stack([load_film(p) for p in film_paths(prepared, split)]))
                   for split in ("train", "test"))
    whole = real_film_floor(prepared, features, films=2 * POSES)  # more than the 4 other films: all of them, once
    assert (whole["draws"], whole["films"], whole["real_films"]) == (1, 4, 4)
    assert whole["fid_p5"] == whole["fid"] == whole["fid_p95"] == frechet_distance(train, test)
    assert whole["kid"] == pytest.approx(kernel_inception_distance(train, test)[0], rel=1e-12)
    drawn = real_film_floor(prepared, features, films=3, draws=5)
    assert (drawn["draws"], drawn["films"]) == (5, 3)
    assert drawn["fid_p5"] < drawn["fid"] < drawn["fid_p95"] and drawn["kid_p5"] < drawn["kid"] < drawn["kid_p95"]


def test_floor_from_another_folder_when_the_split_holds_every_film(prepared, tmp_path):
    test_only = tmp_path / "test_only"  # as a folder of the test films alone (--val-fraction 0 --test-fraction 0)
    shutil.copytree(prepared, test_only)
    manifest = json.loads((test_only / "manifest.json").read_text())
    manifest["films"] = {film: record for film, record in manifest["films"].items() if record["split"] == "test"}
    (test_only / "manifest.json").write_text(json.dumps(manifest))
    features = test_built_features()
    assert real_film_floor(test_only, features, films=2 * POSES) is None
    assert real_film_floor(test_only, features, films=2 * POSES, pool=test_only) is None  # only the split's own films
    assert real_film_floor(test_only, features, films=2 * POSES, pool=prepared) == real_film_floor(
        prepared, features, films=2 * POSES)  # the other folder's train films


def test_picture_sheet_has_a_column_per_pose_and_three_rows():
    drr = np.full((POSES, 32, 32), 0.5, dtype=np.float32)
    sheet = picture_sheet(CaseSyntheses("p", np.zeros(POSES), drr, drr * 0, drr * 0 + 1, ["f"] * POSES))
    assert sheet.shape == (3 * 34, POSES * 34) and sheet.dtype == np.uint8
    assert (sheet[0, 0], sheet[34, 0], sheet[68, 0]) == (128, 0, 255)


def test_evaluate_synth_command_writes_the_report(prepared, model_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fid_module, "inception_features", lambda device="cpu": test_built_features())
    monkeypatch.setattr(lpips_module, "alexnet_lpips",
                        lambda value_range, device="cpu": GreyLPIPS(SquaredDifference(), value_range))
    report = tmp_path / "report"
    assert main(["evaluate", "synth", "--model", str(model_file), "--data", str(prepared), "--out", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "FID (test-built block means, 16-d)" in printed and "| lpips | psnr | ssim |" in printed

    summary_json = json.loads((report / "summary.json").read_text())
    assert summary_json["features"] == "test-built block means, 16-d"
    assert (summary_json["cases"], summary_json["poses"]) == (2, POSES)
    assert set(summary_json["distribution"]) == {"tiny (X-ray style)", "tiny (DRR style)", DRR_BASELINE}
    assert set(summary_json["films"]) == {"lpips", "psnr", "ssim"} and set(summary_json["metrics"]) >= {"fid", "kid"}
    with (report / "metrics.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 2 * POSES and {float(row["angle_deg"]) for row in rows} == {-90, -60, -30, 0, 30, 60, 90}
    assert np.isfinite([float(row[m]) for row in rows for m in ("lpips", "psnr", "ssim")]).all()
    with (report / "distribution.csv").open() as file:
        distribution = list(csv.DictReader(file))
    assert [row["method"] for row in distribution] == list(summary_json["distribution"])
    assert np.isfinite([float(row[m]) for row in distribution for m in ("fid", "kid", "kid_std")]).all()
    assert sorted(p.name for p in (report / "pictures").glob("*.png")) == [f"{p.stem}.png" for p in
                                                                            case_paths(prepared, "test")]
    assert "test-built block means" in (report / "summary.md").read_text()
    assert summary_json["real_film_floor"]["films"] == 4 and "Floor: all 4 other real films" in printed


def test_evaluate_synth_with_random_features_and_without_lpips(prepared, model_file, tmp_path):
    report = tmp_path / "report"
    assert main(["evaluate", "synth", "--model", str(model_file), "--data", str(prepared), "--out", str(report),
                 "--features", "random", "--no-lpips"]) == 0
    summary_json = json.loads((report / "summary.json").read_text())
    assert summary_json["features"].startswith("random conv features") and "lpips" not in summary_json["films"]
    assert all(np.isfinite(values["fid"]) for values in summary_json["distribution"].values())


def test_evaluate_synth_refuses_what_it_cannot_measure(prepared, model_file, tmp_path, capsys):
    arguments = ["evaluate", "synth", "--data", str(prepared), "--features", "random", "--no-lpips", "--out"]
    assert main([*arguments, str(tmp_path / "a")]) == 2  # no model
    assert "--model" in capsys.readouterr().err
    other = tmp_path / "other.safetensors"
    config = PRESETS["tiny32"].scaled(64, 16, width=1 / 16)  # 64 px films: the folder has 32
    models.save_model(other, CT2XGANGenerator(config),
                      ModelInfo(kind="ct2x-gan", config=config.to_dict(), license="Apache-2.0"))
    assert main([*arguments, str(tmp_path / "b"), "--model", str(other)]) == 2
    assert "film 32 px (the model's 64)" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    discriminator = tmp_path / "d.safetensors"
    config = PoseDiscriminatorConfig.scaled(32, 1 / 16)
    models.save_model(discriminator, PoseDiscriminator(config),
                      ModelInfo(kind="ct2x-gan-discriminator", config=config.to_dict(), license="Apache-2.0"))
    assert main([*arguments, str(tmp_path / "c"), "--model", str(discriminator)]) == 2
    assert "not CT2X-GAN's generator" in capsys.readouterr().err
