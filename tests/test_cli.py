"""The `ct2x` command line, run in-process on a 32^3 phantom with a 32 px detector (plus one subprocess smoke test)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from ct2x.cli.drr import OVERVIEW_MAX_WIDTH_PX, _contact_sheet
from ct2x.cli.main import main
from ct2x.drr import DRRRenderer
from ct2x.io import save_ct
from ct2x.phantoms import chest

FAST = ["--size", "32", "--quiet"]


@pytest.fixture
def ct_file(tmp_path) -> Path:
    return save_ct(chest(size=32, spacing_mm=10), tmp_path / "chest.mha")


def view_files(stem: str, materials: bool = True) -> set:
    return {f"{stem}.png", f"{stem}_attenuation.mha"} | ({f"{stem}_materials.mha"} if materials else set())


def leftovers(out: Path) -> list:
    """Temporary siblings of `out` that a run must never leave behind."""
    return [p.name for p in out.parent.iterdir() if ".partial-" in p.name or ".replaced-" in p.name]


def listing(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_series_files_geometry_and_sidecar(ct_file, tmp_path, capsys):
    out = tmp_path / "drr"
    # "--angles -30:30:30" as two tokens: argparse alone would take the value for an option.
    assert main(["drr", str(ct_file), "--out", str(out), "--angles", "-30:30:30", "--spacing", "2.5",
                 "--display", "linear"] + FAST) == 0

    stems = ["view_000_-030.0deg", "view_001_+000.0deg", "view_002_+030.0deg"]
    assert {p.name for p in out.iterdir()} == set().union(*map(view_files, stems)) | {"overview.png", "series.json"}
    assert str(out) in capsys.readouterr().out and not leftovers(out)

    png = sitk.ReadImage(str(out / f"{stems[1]}.png"))
    assert png.GetSize() == (32, 32) and png.GetPixelID() == sitk.sitkUInt8
    assert sitk.GetArrayFromImage(png).std() > 10  # an image, not a blank
    attenuation = sitk.ReadImage(str(out / f"{stems[1]}_attenuation.mha"))
    assert attenuation.GetSize() == (32, 32) and attenuation.GetSpacing() == (2.5, 2.5)
    assert attenuation.GetPixelID() == sitk.sitkFloat32 and sitk.GetArrayFromImage(attenuation).max() > 1.0
    materials = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{stems[1]}_materials.mha")))  # (3, H, W) g/cm^2
    assert materials.shape == (3, 32, 32) and materials[2].max() > 0 and materials.min() >= 0

    series = json.loads((out / "series.json").read_text(encoding="utf-8"))
    assert series["input"]["path"] == str(ct_file.resolve()) and series["input"]["shape_ijk"] == [32, 32, 32]
    assert series["physics"]["spectrum"] == "60kV" and "air, soft_tissue, bone" in series["files"]["materials_mha"]
    assert series["display"]["display"] == "linear"
    low, high = series["display"]["attenuation_low_high"]
    assert low == min(v["auto_window"][0] for v in series["views"]) and high > low
    assert [v["geometry"]["primary_angle_deg"] for v in series["views"]] == [-30.0, 0.0, 30.0]
    for stem, view in zip(stems, series["views"]):
        assert set(view["files"].values()) == view_files(stem)
        assert len(view["geometry"]["camera_label_25"]) == 25
        assert view["geometry"]["pixel_spacing_mm"] == [2.5, 2.5]
        assert view["geometry"]["source_to_detector_mm"] == 1020.0
        assert view["geometry"]["source_to_isocenter_mm"] == pytest.approx(530.0)

    overview = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "overview.png")))
    assert overview.shape == (32 + 7, 3 * 32 + 2 * 4)  # one row of tiles, a 7 px label strip, 4 px gaps
    assert overview[32:].max() == 255  # the angle labels


def test_default_phantom_and_monochromatic_path(tmp_path, capsys):
    out = tmp_path / "phantom"
    args = ["--size", "32", "--angles", "0", "--energy", "60", "--beam", "parallel"]
    assert main(["drr", "--out", str(out)] + args) == 0
    assert "phantom" in capsys.readouterr().err
    assert {p.name for p in out.iterdir()} == view_files("view_000_+000.0deg", materials=False) | {
        "overview.png", "series.json"}
    series = json.loads((out / "series.json").read_text(encoding="utf-8"))
    assert series["input"]["path"] is None and series["physics"]["energy_kev"] == 60.0
    assert series["files"]["materials_mha"] is None and series["views"][0]["geometry"]["beam"] == "parallel"
    spacing = series["views"][0]["geometry"]["pixel_spacing_mm"]  # default: the phantom's 320 mm body fits
    assert spacing[0] == spacing[1] and 320 < 32 * spacing[0] < 320 * 1.15


def test_default_display_is_a_processed_film_per_view(ct_file, tmp_path):
    out = tmp_path / "processed"
    assert main(["drr", str(ct_file), "--out", str(out), "--angles", "0,90"] + FAST) == 0
    series = json.loads((out / "series.json").read_text(encoding="utf-8"))
    assert series["display"]["display"] == "processed" and series["display"]["unsharp_sigma_mm"] > 0
    for view in series["views"]:
        film = sitk.GetArrayFromImage(sitk.ReadImage(str(out / view["files"]["display_png"])))
        assert film.max() == 255 and film.min() == 0  # every view uses the full grey range


def test_window_belongs_to_the_linear_display(ct_file, tmp_path, capsys):
    args = ["drr", str(ct_file), "--out", str(tmp_path / "w"), "--window", "0.5", "3"] + FAST
    assert main(args) == 0
    assert json.loads((tmp_path / "w" / "series.json").read_text(encoding="utf-8"))["display"]["display"] == "linear"
    assert main(args[:3] + [str(tmp_path / "w2"), "--display", "processed"] + args[4:]) == 2
    assert "--window" in capsys.readouterr().err


@pytest.mark.parametrize("args, problem", [
    (["missing.nii.gz"], "does not exist"),
    (["--angles", "1:x"], "--angles"),
    (["--angles", "30:-30:10"], "--angles"),
    (["--sid", "1100", "--sdd", "1020"], "--sid"),
    (["--spectrum", "80kV"], "--spectrum"),
    (["--noise", "0"], "--noise"),
    (["--size", "-3"], "--size"),
    (["--energy", "60", "--spectrum", "90kV"], "not allowed with"),
    (["--window", "3", "1"], "--window"),
    (["--device", "tpu"], "--device"),
])
def test_bad_input_exits_2_naming_the_problem(ct_file, tmp_path, capsys, args, problem):
    out = tmp_path / "drr"
    if args[0].endswith(".nii.gz"):
        args = [str(tmp_path / args[0])] + args[1:]
    else:
        args = [str(ct_file)] + args
    assert main(["drr"] + args + ["--out", str(out)] + FAST) == 2
    err = capsys.readouterr().err
    assert "ct2x drr: error:" in err and problem in err and "Traceback" not in err
    assert not out.exists() and not leftovers(out)


def test_series_needs_a_dicom_folder(tmp_path, capsys):
    assert main(["drr", "--series", "1.2.3", "--out", str(tmp_path / "drr")] + FAST) == 2
    assert "--series" in capsys.readouterr().err and not (tmp_path / "drr").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_on_cpu_only_machine(ct_file, tmp_path, capsys):
    assert main(["drr", str(ct_file), "--out", str(tmp_path / "drr"), "--device", "cuda"] + FAST) == 2
    assert "--device: device 'cuda': CUDA is not available" in capsys.readouterr().err


def test_non_empty_out_needs_overwrite(ct_file, tmp_path, capsys):
    out = tmp_path / "drr"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["drr", str(ct_file), "--out", str(out)] + FAST) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert listing(out) == {"notes.txt": b"keep me"}


def test_overwrite_never_deletes_the_input_ct(ct_file, capsys):
    folder = ct_file.parent
    before = listing(folder)
    assert main(["drr", str(ct_file), "--out", str(folder), "--overwrite"] + FAST) == 2
    assert "would delete" in capsys.readouterr().err and listing(folder) == before


@pytest.mark.parametrize("interruption, status", [(RuntimeError("GPU fell over"), None), (KeyboardInterrupt(), 130)])
def test_failure_on_second_view_leaves_out_untouched(ct_file, tmp_path, monkeypatch, interruption, status):
    out = tmp_path / "drr"
    assert main(["drr", str(ct_file), "--out", str(out), "--angles", "0"] + FAST) == 0
    before = listing(out)
    render_view = DRRRenderer.render_view
    calls = []

    def failing_render_view(self, view):
        calls.append(view)
        if len(calls) == 2:
            raise interruption
        return render_view(self, view)

    monkeypatch.setattr(DRRRenderer, "render_view", failing_render_view)

    def run_interrupted(out_dir: Path, *extra: str) -> None:
        calls.clear()
        args = ["drr", str(ct_file), "--out", str(out_dir), "--angles", "-30:30:30", *extra] + FAST
        if status is None:
            with pytest.raises(RuntimeError, match="GPU fell over"):
                main(args)
        else:
            assert main(args) == status
        assert len(calls) == 2

    run_interrupted(out, "--overwrite")
    assert listing(out) == before and not leftovers(out)
    run_interrupted(tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists() and not leftovers(out)


def test_overwrite_replaces_the_whole_series(ct_file, tmp_path):
    out = tmp_path / "drr"
    assert main(["drr", str(ct_file), "--out", str(out), "--angles", "-30,0,30"] + FAST) == 0
    (out / "stale.txt").write_text("old")
    assert main(["drr", str(ct_file), "--out", str(out), "--angles", "45", "--overwrite"] + FAST) == 0
    assert {p.name for p in out.iterdir()} == view_files("view_000_+045.0deg") | {"overview.png", "series.json"}
    assert not leftovers(out)


def test_same_seed_same_noise(ct_file, tmp_path):
    def attenuation(name: str, *extra: str) -> np.ndarray:
        out = tmp_path / name
        assert main(["drr", str(ct_file), "--out", str(out), "--angles", "0,90", *extra] + FAST) == 0
        return np.stack([sitk.GetArrayFromImage(sitk.ReadImage(str(p)))
                         for p in sorted(out.glob("*_attenuation.mha"))])  # (2, 32, 32)

    first = attenuation("a", "--noise", "1000", "--seed", "7")
    np.testing.assert_array_equal(first, attenuation("b", "--noise", "1000", "--seed", "7"))
    assert not np.array_equal(first, attenuation("c", "--noise", "1000", "--seed", "8"))
    assert np.abs(first - attenuation("d")).mean() > 1e-3  # the noise is really there


def test_contact_sheet_stays_narrow_for_many_views():
    displays = [np.full((256, 256), 200, dtype=np.uint8)] * 24
    sheet = _contact_sheet(displays, [float(a) for a in range(0, 360, 15)])
    assert sheet.shape[1] <= OVERVIEW_MAX_WIDTH_PX and sheet.dtype == np.uint8
    assert (sheet == 200).sum() > 0.5 * 24 * (sheet.shape[1] / 5) ** 2  # every view still visible as a tile


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("ct2x ")


def test_help_runs_fast_without_torch():
    command = [shutil.which("ct2x")] if shutil.which("ct2x") else [sys.executable, "-m", "ct2x.cli.main"]
    result = subprocess.run(command + ["--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "drr" in result.stdout
    probe = ("import sys; from ct2x.cli.main import build_parser; build_parser().parse_args(['drr', '--out', 'x']); "
             "assert 'torch' not in sys.modules and 'SimpleITK' not in sys.modules")
    assert subprocess.run([sys.executable, "-c", probe], timeout=60).returncode == 0
