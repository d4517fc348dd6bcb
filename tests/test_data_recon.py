"""X2CT-GAN's data convention, `ct2x prepare recon` end to end on phantoms, and the training dataset."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

import ct2x.data.prepare_recon as prepare_module
from ct2x import phantoms
from ct2x.cli.main import main
from ct2x.data.prepare_recon import ReconPreparation, load_case, prepare_recon
from ct2x.data.recon_dataset import ReconAugmentation, ReconDataset
from ct2x.data.x2ct_convention import ct_cube, official_films
from ct2x.errors import CT2XInputError
from ct2x.io import save_ct
from ct2x.volume import CTVolume

MARKER_RAS = np.array([-60.0, 60.0, 80.0])  # patient's left, anterior, superior (mm from the phantom's centre)
SMALL = ReconPreparation(ct_voxels=32, film_px=32)


def chest_with_marker(marker=True) -> CTVolume:
    chest = phantoms.chest(size=64, spacing_mm=5.0)
    hu = chest.hu.copy()
    if marker:
        i, j, k = np.linalg.solve(chest.affine[:3, :3], MARKER_RAS - chest.affine[:3, 3]).round().astype(int)
        hu[k - 2:k + 3, j - 2:j + 3, i - 2:i + 3] = 3000.0  # a 25 mm bone block
    return CTVolume(hu, chest.affine, source="chest with marker")


@pytest.fixture(scope="module")
def marked_and_plain():
    return [(cube, official_films(cube)) for cube in (ct_cube(chest_with_marker(m)) for m in (True, False))]


def peak(image):
    return np.array(np.unravel_index(np.argmax(image), image.shape))


def test_cube_layout_is_superior_anterior_right_first(marked_and_plain):
    (marked, _), (plain, _) = marked_and_plain
    d, h, w = peak(marked.hu - plain.hu)  # a corner of the marker block, (D, H, W) voxels of 2.5 mm
    assert d < 64 - 20 and h < 64 - 15 and w > 64 + 15  # superior, anterior, patient's left


def test_films_show_the_marker_where_the_network_expects_it(marked_and_plain):
    """PA columns follow W (patient's left on the image right), lateral columns follow H (anterior on the left)."""
    (_, (pa, lateral)), (_, (pa0, lateral0)) = marked_and_plain
    row, column = peak(pa / pa.max() - pa0 / pa0.max())
    assert row < 64 - 15 and column > 64 + 15
    row, column = peak(lateral / lateral.max() - lateral0 / lateral0.max())
    assert row < 64 - 15 and column < 64 - 15


def test_films_match_the_ct_mean_projections(marked_and_plain):
    """models.md §1.7: the mean of the CT over H is the PA film, over W the lateral film (up to perspective)."""
    (cube, (pa, lateral)), _ = marked_and_plain
    ct = np.clip(cube.hu + 1024, 0, None)
    for film, axis in ((pa, 1), (lateral, 2)):
        mean = ct.mean(axis=axis)
        same = np.corrcoef(film.ravel(), mean.ravel())[0, 1]
        assert same > 0.7
        assert same > np.corrcoef(film.ravel(), mean[:, ::-1].ravel())[0, 1] + 0.02
        assert same > np.corrcoef(film.ravel(), mean[::-1].ravel())[0, 1] + 0.02


@pytest.fixture
def ct_files(tmp_path):
    folder = tmp_path / "cts"
    folder.mkdir()
    chest = phantoms.chest(size=32, spacing_mm=10.0)
    save_ct(chest, folder / "p1_a.mha")
    save_ct(CTVolume(chest.hu[::-1].copy(), chest.affine), folder / "p1_b.nrrd")
    image = sitk.GetImageFromArray((chest.hu + 1024).astype(np.int16))  # stored as HU + 1024, like X2CT's files
    image.SetSpacing((10.0, 10.0, 10.0))
    sitk.WriteImage(image, str(folder / "p2_a.nii.gz"))
    (folder / "p3_broken.nii.gz").write_bytes(b"not a NIfTI file")
    return folder


def test_prepare_end_to_end_with_a_bad_case_and_hu_plus_1024(ct_files, tmp_path):
    out = tmp_path / "prepared"
    settings = ReconPreparation(ct_voxels=32, film_px=32, test_fraction=0.5, patient_pattern=r"^(p\d+)_")
    manifest = prepare_recon([ct_files], out, settings, progress=False)
    assert set(manifest["cases"]) == {"p1_a", "p1_b", "p2_a"} and set(manifest["failed"]) == {"p3_broken"}
    assert manifest["cases"]["p2_a"]["stored_offset_hu"] == 1024.0 and "HU + 1024" in manifest["cases"]["p2_a"][
        "notices"][0]
    assert manifest["cases"]["p1_a"]["split"] == manifest["cases"]["p1_b"]["split"]  # one patient, one split
    assert {record["split"] for record in manifest["cases"].values()} == {"train", "test"}
    case = load_case(out / "cases" / "p2_a.npz")
    assert case["ct_hu"].shape == (32, 32, 32) and case["ct_hu"].dtype == np.int16
    assert case["pa"].shape == case["lateral"].shape == (32, 32) and 0.9 < case["pa"].max() <= 1.0
    assert -1024 <= case["ct_hu"].min() < -900 and case["ct_hu"].max() > 500  # converted to HU
    assert json.loads((out / "preparation.json").read_text())["settings"]["patient_pattern"] == r"^(p\d+)_"


def test_prepare_resumes_without_redoing_cases_and_refuses_other_settings(ct_files, tmp_path, monkeypatch):
    out = tmp_path / "prepared"
    prepare_recon([ct_files / "p1_a.mha"], out, SMALL, progress=False)
    done = []
    real = prepare_module.prepare_case
    monkeypatch.setattr(prepare_module, "prepare_case", lambda path, settings: done.append(path.name) or real(
        path, settings))
    manifest = prepare_recon([ct_files / "p1_a.mha", ct_files / "p2_a.nii.gz"], out, SMALL, progress=False)
    assert done == ["p2_a.nii.gz"] and set(manifest["cases"]) == {"p1_a", "p2_a"}
    with pytest.raises(CT2XInputError, match="other settings"):
        prepare_recon([ct_files], out, ReconPreparation(ct_voxels=64, film_px=32), progress=False)


def test_prepare_command_line(ct_files, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["prepare", "recon", str(ct_files / "p1_a.mha"), str(ct_files / "p2_a.nii.gz"), "--out", str(out),
                 "--voxels", "32", "--film-px", "32", "--quiet"]) == 0
    assert "2 cases" in capsys.readouterr().out
    assert main(["prepare", "recon", str(ct_files / "p3_broken.nii.gz"), "--out", str(tmp_path / "bad"),
                 "--quiet"]) == 2


def test_a_validation_split_leaves_the_test_split_as_it_was(ct_files, tmp_path, capsys):
    inputs = [ct_files / "p1_a.mha", ct_files / "p2_a.nii.gz"]
    for patient in ("p4", "p5"):
        shutil.copy(ct_files / "p1_a.mha", tmp_path / f"{patient}_a.mha")
        inputs.append(tmp_path / f"{patient}_a.mha")
    splits = {}
    for val_fraction in ("0", "0.25"):
        out = tmp_path / f"val{val_fraction}"
        assert main(["prepare", "recon", *map(str, inputs), "--out", str(out), "--voxels", "32", "--film-px", "32",
                     "--test-fraction", "0.25", "--val-fraction", val_fraction, "--quiet"]) == 0
        cases = json.loads((out / "manifest.json").read_text())["cases"]
        splits[val_fraction] = {case: record["split"] for case, record in cases.items()}
    assert "(2 train, 1 val, 1 test)" in capsys.readouterr().out.splitlines()[-1]
    without, with_val = splits["0"], splits["0.25"]
    assert [case for case in without if without[case] == "test"] == [case for case in with_val
                                                                      if with_val[case] == "test"]
    assert sorted(with_val.values()) == ["test", "train", "train", "val"] and "val" not in without.values()
    assert len(ReconDataset(tmp_path / "val0.25", "val")) == 1
    with pytest.raises(CT2XInputError, match="val_fraction"):
        ReconPreparation(test_fraction=0.5, val_fraction=0.5)


def test_dataset_samples_and_reproducible_augmentation(ct_files, tmp_path):
    out = tmp_path / "prepared"
    prepare_recon([ct_files / "p1_a.mha"], out, ReconPreparation(ct_voxels=32, film_px=32, test_fraction=0),
                  progress=False)
    plain = ReconDataset(out, "train")[0]
    assert plain["ct"].shape == (1, 32, 32, 32) and plain["pa"].shape == plain["lateral"].shape == (1, 32, 32)
    assert 0 <= float(plain["ct"].min()) and float(plain["ct"].max()) <= 1 and plain["case"] == "p1_a"

    augmented = ReconDataset(out, "train", ReconAugmentation(probability=1.0), seed=3)
    first, again = augmented[0], augmented[0]
    assert all(np.array_equal(first[key], again[key]) for key in ("ct", "pa", "lateral"))
    augmented.epoch = 1
    other = augmented[0]
    assert not np.array_equal(first["pa"], other["pa"]) and not np.array_equal(first["pa"], plain["pa"])
    for sample in (first, other):  # films rendered from the moved CT still match it
        mean = sample["ct"][0].numpy().mean(axis=1)  # (D, W)
        assert np.corrcoef(sample["pa"][0].numpy().ravel(), mean.ravel())[0, 1] > 0.7


def test_find_cts_takes_image_files_and_dicom_folders(tmp_path):
    from ct2x.data.prepare_recon import find_cts

    (tmp_path / "a.nii.gz").write_bytes(b"")
    series = tmp_path / "study" / "series1"
    series.mkdir(parents=True)
    (series / "IM0001").write_bytes(bytes(128) + b"DICM" + bytes(16))  # DICOM by its preamble, no suffix
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not a CT")
    assert find_cts([tmp_path]) == {"a": tmp_path / "a.nii.gz", "series1": series}
