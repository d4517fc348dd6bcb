from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from ct2x.errors import CT2XInputError
from ct2x.io import list_dicom_series, load_ct, save_ct, save_image
from ct2x.volume import CTVolume

SERIES_A = "1.2.826.0.1.3680043.2.1125.77.1"
SERIES_B = "1.2.826.0.1.3680043.2.1125.77.2"


def write_dicom_series(volume: CTVolume, folder: Path, series_uid: str, description: str) -> None:
    """One int16 DICOM file per k slice, HU stored with rescale intercept -1024 (SimpleITK DicomSeriesFromArray)."""
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.Cast(sitk.Round(volume.to_sitk()), sitk.sitkInt16)
    d = image.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        slice_k = image[:, :, k]
        tags = {
            "0008|0060": "CT",
            "0008|103e": description,
            "0020|000d": series_uid + ".0",  # study
            "0020|000e": series_uid,
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(repr(v) for v in image.TransformIndexToPhysicalPoint((0, 0, k))),
            "0020|0037": "\\".join(repr(v) for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
            "0028|1052": "-1024",
            "0028|1053": "1",
        }
        for tag, value in tags.items():
            slice_k.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{description.replace(' ', '_')}_{k:03d}.dcm"))
        writer.Execute(slice_k)


def oblique(volume: CTVolume) -> CTVolume:
    """The same voxels, rotated 20 deg about an oblique axis (a proper rotation, as DICOM needs)."""
    axis = np.array([1.0, 2.0, 2.0]) / 3.0
    angle = np.deg2rad(20.0)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rotation = np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross  # Rodrigues
    affine = volume.affine.copy()
    affine[:3, :3] = rotation @ affine[:3, :3]
    return CTVolume(hu=volume.hu, affine=affine, source="oblique")


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"])
def test_load_image_files(ct_phantom, tmp_path, suffix):
    path = tmp_path / f"phantom{suffix}"
    sitk.WriteImage(ct_phantom.to_sitk(), str(path))
    volume = load_ct(path)
    assert volume.hu.dtype == np.float32 and volume.hu.shape == (32, 36, 40)
    np.testing.assert_array_equal(volume.hu, ct_phantom.hu)
    np.testing.assert_allclose(volume.affine, ct_phantom.affine, atol=1e-4)
    assert volume.source == str(path)


def test_load_int32_nifti(ct_phantom, tmp_path):
    path = tmp_path / "int32.nii.gz"
    sitk.WriteImage(sitk.Cast(ct_phantom.to_sitk(), sitk.sitkInt32), str(path))
    assert sitk.ReadImage(str(path)).GetPixelID() == sitk.sitkInt32
    volume = load_ct(path)
    assert volume.hu.dtype == np.float32
    np.testing.assert_array_equal(volume.hu, ct_phantom.hu)


def test_load_4d_with_one_time_point(ct_phantom, tmp_path):
    path = tmp_path / "t1.nrrd"
    sitk.WriteImage(sitk.JoinSeries([ct_phantom.to_sitk()]), str(path))
    volume = load_ct(path)
    np.testing.assert_array_equal(volume.hu, ct_phantom.hu)
    np.testing.assert_allclose(volume.affine, ct_phantom.affine, atol=1e-9)


@pytest.mark.parametrize("make_oblique", [False, True])
def test_load_dicom_series(ct_phantom, tmp_path, make_oblique):
    original = oblique(ct_phantom) if make_oblique else ct_phantom
    write_dicom_series(original, tmp_path / "dicom", SERIES_A, "phantom A")
    assert list_dicom_series(tmp_path / "dicom") == [(SERIES_A, 32, "phantom A")]
    volume = load_ct(tmp_path / "dicom")
    np.testing.assert_allclose(volume.hu, original.hu, atol=1.0)
    np.testing.assert_allclose(volume.affine, original.affine, atol=1e-4)


def test_dicom_folder_with_two_series(ct_phantom, tmp_path):
    folder = tmp_path / "two"
    write_dicom_series(ct_phantom, folder, SERIES_A, "phantom A")
    brighter = CTVolume(hu=ct_phantom.hu + 100.0, affine=ct_phantom.affine)
    write_dicom_series(brighter, folder, SERIES_B, "phantom B")
    with pytest.raises(CT2XInputError) as error:
        load_ct(folder)
    message = str(error.value)
    assert str(folder) in message and "2 DICOM series" in message and "series_uid=" in message
    assert SERIES_A in message and SERIES_B in message and "phantom B" in message and "32 files" in message
    np.testing.assert_allclose(load_ct(folder, series_uid=SERIES_B).hu, brighter.hu, atol=1.0)
    with pytest.raises(CT2XInputError, match=r"no DICOM series with series_uid='1\.2\.3'(.|\n)*phantom A"):
        load_ct(folder, series_uid="1.2.3")


def test_dicom_series_with_missing_slice(ct_phantom, tmp_path):
    folder = tmp_path / "gap"
    write_dicom_series(ct_phantom, folder, SERIES_A, "gap")
    (folder / "gap_010.dcm").unlink()
    with pytest.raises(CT2XInputError, match=r"gap.*not evenly spaced.*1\.5 to 3 mm"):
        load_ct(folder)


def _stack_phases(hu: np.ndarray) -> sitk.Image:
    """A 4-D scalar image with two time points (GetImageFromArray would make a vector image)."""
    return sitk.JoinSeries([sitk.GetImageFromArray(hu), sitk.GetImageFromArray(hu)])


def _with_nans(hu: np.ndarray) -> np.ndarray:
    """NaN in every 1000th voxel: 47 of 46080."""
    return np.where(np.arange(hu.size).reshape(hu.shape) % 1000 == 7, np.nan, hu)


@pytest.mark.parametrize(
    "name, make, expected",
    [
        ("flat.nrrd", lambda hu: hu[0], r"2-D image \(size \(40, 36\)\)"),
        ("phases.nrrd", _stack_phases, r"4-D image \(size \(40, 36, 32, 2\)\)"),
        ("thin.nrrd", lambda hu: hu[:4], r"only 4 voxels along an axis"),
        ("nan.nrrd", _with_nans, r"has 47 non-finite values \(NaN or inf\)"),
        ("mr.nii.gz", lambda hu: (hu + 1000.0) * 1.5, r"does not look like a CT.*range 0\.\.2550.*MR, a mask"),
        ("mask.nii.gz", lambda hu: (hu > 0).astype(np.uint8), r"range 0\.\.1; only the values 0 and 1"),
        ("normalised.mha", lambda hu: (hu + 1024.0) / 2500.0, r"does not look like a CT.*no air"),
        ("rgb.mha", lambda hu: np.repeat(hu[..., None], 3, axis=-1), r"3 components per voxel"),
    ],
)
def test_bad_image_files(ct_phantom, tmp_path, name, make, expected):
    path = tmp_path / name
    image = make(ct_phantom.hu)
    sitk.WriteImage(image if isinstance(image, sitk.Image) else sitk.GetImageFromArray(image), str(path))
    with pytest.raises(CT2XInputError, match=expected) as error:
        load_ct(path)
    assert str(error.value).startswith(str(path))


def test_missing_unreadable_and_unknown_files(tmp_path):
    with pytest.raises(CT2XInputError, match=r"nope\.nii\.gz: does not exist"):
        load_ct(tmp_path / "nope.nii.gz")
    text = tmp_path / "notes.nii.gz"
    text.write_text("not an image")
    with pytest.raises(CT2XInputError, match=r"notes\.nii\.gz: could not be read as NIfTI"):
        load_ct(text)
    picture = tmp_path / "film.png"
    picture.write_bytes(b"\x89PNG")
    with pytest.raises(CT2XInputError, match=r"film\.png: unknown format '\.png'; supported: NIfTI"):
        load_ct(picture)


def test_folder_without_dicom(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CT2XInputError, match=r"empty: folder holds no DICOM series \(0 files\)"):
        load_ct(empty)
    (empty / "readme.txt").write_text("hello")
    (empty / "sub").mkdir()
    with pytest.raises(CT2XInputError, match=r"\(1 files\)\. Subfolders are not searched: sub"):
        load_ct(empty)


def test_ct_volume_rejects_bad_arrays(ct_phantom):
    with pytest.raises(CT2XInputError, match=r"my scan: affine is singular"):
        CTVolume(hu=ct_phantom.hu, affine=np.diag([1.0, 0.0, 1.0, 1.0]), source="my scan")
    with pytest.raises(CT2XInputError, match=r"my scan: does not look like a CT.*nothing denser than fat"):
        CTVolume(hu=np.full((8, 8, 8), -1000.0), affine=np.eye(4), source="my scan")
    squeezed = CTVolume(hu=ct_phantom.hu[None].astype(np.int16), affine=ct_phantom.affine)
    assert squeezed.hu.shape == (32, 36, 40) and squeezed.hu.dtype == np.float32


@pytest.mark.parametrize("suffix, atol", [(".nrrd", 0.0), (".mha", 0.0), (".nii.gz", 1e-4)])
def test_save_ct_round_trip(tmp_path, suffix, atol):
    rng = np.random.default_rng(3)
    hu = rng.uniform(-1024, 2000, size=(9, 10, 11)).astype(np.float32)
    affine = np.eye(4)
    affine[:3, :3] = np.linalg.qr(rng.normal(size=(3, 3)))[0] * [0.77, 1.3, 2.1]
    affine[:3, 3] = rng.normal(size=3) * 100
    original = CTVolume(hu=hu, affine=affine)
    path = save_ct(original, tmp_path / f"ct{suffix}")
    loaded = load_ct(path)
    np.testing.assert_array_equal(loaded.hu, hu)
    np.testing.assert_allclose(loaded.affine, affine, atol=max(atol, 1e-12))
    assert os.listdir(tmp_path) == [f"ct{suffix}"]


def test_save_leaves_nothing_on_failure(ct_phantom, tmp_path, monkeypatch):
    def failing_write(image, path, useCompression=False):
        Path(path).write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(sitk, "WriteImage", failing_write)
    with pytest.raises(OSError, match=r"ct\.nrrd: could not be written: .*\(SimpleITK: disk full\)"):
        save_ct(ct_phantom, tmp_path / "ct.nrrd")
    assert os.listdir(tmp_path) == []
    with pytest.raises(CT2XInputError, match=r"ct\.png: cannot write '\.png'"):
        save_ct(ct_phantom, tmp_path / "ct.png")


def test_save_image_2d_with_spacing(tmp_path):
    drr = np.arange(20 * 30, dtype=np.float64).reshape(20, 30)  # (rows J, columns I)
    path = save_image(drr, tmp_path / "drr.mha", spacing_mm=(0.5, 0.25), origin_mm=(-7.5, -2.5))
    image = sitk.ReadImage(str(path))
    assert image.GetSize() == (30, 20) and image.GetPixelID() == sitk.sitkFloat32
    assert image.GetSpacing() == (0.5, 0.25) and image.GetOrigin() == (-7.5, -2.5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), drr)
    assert sitk.ReadImage(str(save_image(drr, tmp_path / "drr.nrrd", 0.4))).GetSpacing() == (0.4, 0.4)


@pytest.mark.realdata
def test_real_chest_nifti(data_dir):
    volume = load_ct(data_dir / "ct" / "chest_popi_phase00.nii.gz")
    assert volume.shape_ijk == (512, 512, 141)
    np.testing.assert_allclose(volume.spacing_mm, [0.9765625, 0.9765625, 2.0])
    assert volume.hu.min() == -1024 and volume.hu.max() == 2976
    # stored LPS with identity direction: i runs to the patient's left (-x), j posterior (-y), k superior
    assert volume.affine[0, 0] < 0 and volume.affine[1, 1] < 0 and volume.affine[2, 2] > 0


@pytest.mark.realdata
def test_real_abdomen_int32_nifti(data_dir):
    volume = load_ct(data_dir / "ct" / "abdomen_pelvis.nii.gz")
    assert volume.shape_ijk == (122, 101, 112) and volume.hu.dtype == np.float32
    np.testing.assert_allclose(volume.spacing_mm, [3.0, 3.0, 3.0])
    assert volume.hu.min() == -1207 and volume.hu.max() == 3382
    np.testing.assert_allclose(np.diag(volume.affine)[:3], [3.0, 3.0, 3.0])  # RAS axes (sform)


@pytest.mark.realdata
def test_real_dicom_series(data_dir):
    folder = data_dir / "ct" / "abdomen_dicom_series"
    assert list_dicom_series(folder) == [("", 20, "CT Body 3.0")]  # anonymised: empty SeriesInstanceUID
    volume = load_ct(folder)
    assert volume.shape_ijk == (512, 512, 20)
    np.testing.assert_allclose(volume.spacing_mm, [0.9765625, 0.9765625, 2.0])  # slice spacing, not 3 mm thickness
    assert volume.hu.min() == -1024 and volume.hu.max() == 1839
    assert volume.affine[0, 0] < 0 and volume.affine[2, 2] > 0
