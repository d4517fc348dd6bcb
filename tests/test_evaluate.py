"""`ct2x evaluate recon`: methods on the test cases of a prepared phantom folder, baselines, report files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ct2x import models, phantoms
from ct2x.cli.main import main
from ct2x.data.prepare_recon import ReconPreparation, case_paths, load_case, prepare_recon
from ct2x.evaluate import backprojection, baseline_methods, evaluate, summary
from ct2x.io import save_ct
from ct2x.models import ModelInfo
from ct2x.nets.x2ct import X2CTConfig, X2CTGenerator
from ct2x.preprocess import x2ct_normalize
from ct2x.volume import CTVolume


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    folder = tmp_path_factory.mktemp("evaluate")
    chest = phantoms.chest(size=32, spacing_mm=10.0)
    for n, scale in enumerate((1.0, 0.9, 1.1)):  # three patients with different soft-tissue contrast
        save_ct(CTVolume(np.where(chest.hu > -900, chest.hu * scale, chest.hu), chest.affine), folder / f"p{n}.mha")
    out = folder / "prepared"
    prepare_recon([folder], out, ReconPreparation(ct_voxels=64, film_px=64, test_fraction=0.34), progress=False)
    return out


def test_backprojection_spreads_each_film_along_its_own_axis():
    pa, lateral = np.zeros((4, 4)), np.zeros((4, 4))
    pa[1, 2] = 1.0  # (D, W)
    lateral[3, 0] = 1.0  # (D, H)
    volume = backprojection(pa, lateral)
    assert volume.shape == (4, 4, 4)
    assert np.all(volume[1, :, 2] == 0.5) and np.all(volume[3, 0, :] == 0.5) and volume.sum() == 4.0


def test_a_perfect_method_scores_perfectly_and_baselines_do_worse(prepared):
    truths = {}
    for path in case_paths(prepared, "test"):
        case = load_case(path)
        truths[case["pa"].tobytes()] = x2ct_normalize(case["ct_hu"].astype(np.float32))
    methods = {"perfect": lambda pa, lateral: truths[pa.tobytes()], **baseline_methods(prepared)}
    rows = evaluate(methods, prepared)
    assert [row["method"] for row in rows] == ["perfect", "mean", "backprojection"]
    table = summary(rows)
    assert table["perfect"]["mae"]["mean"] == 0 and table["perfect"]["ssim3d"]["mean"] == pytest.approx(1.0)
    for baseline in ("mean", "backprojection"):
        assert 0 < table[baseline]["mae"]["mean"] < 0.2 and table[baseline]["ssim3d"]["mean"] < 1.0


def test_evaluate_command_writes_the_report(prepared, tmp_path, capsys):
    model = tmp_path / "tiny.safetensors"
    config = X2CTConfig.scaled(input_size=64, width=0.125, depth=0.25)
    info = ModelInfo(kind="x2ct-biplanar", config=config.to_dict(), license="Apache-2.0",
                     inputs={"films": ["pa", "lateral"]})
    models.save_model(model, X2CTGenerator(config), info)
    report = tmp_path / "report"
    assert main(["evaluate", "recon", "--model", str(model), "--data", str(prepared), "--out", str(report)]) == 0
    assert "psnr_x2ct" in capsys.readouterr().out
    summary_json = json.loads((report / "summary.json").read_text())
    assert set(summary_json["summary"]) == {"tiny", "mean", "backprojection"} and summary_json["cases"] == 1
    assert (report / "metrics.csv").read_text().count("\n") == 1 + 3
    assert len(list((report / "pictures").glob("*.png"))) == 1
    assert main(["evaluate", "recon", "--data", str(prepared), "--out", str(tmp_path / "r2"), "--baselines",
                 "median"]) == 2
