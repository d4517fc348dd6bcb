"""Damaged or implausible CT input is refused or warned about, never rendered as if it were fine.

Each damage class is built from a small phantom written by the test (32^3 voxels, int16 unless a case needs float),
in every format CT2X reads. Nothing may reach stderr: ITK's own warnings become CT2X's messages.
"""

from __future__ import annotations

import errno
import gzip
import os
import re
import shutil
import struct
import warnings
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from test_io import SERIES_A, write_dicom_series

from ct2x.errors import CT2XInputError, CT2XWarning
from ct2x.io import load_ct, save_ct, save_image
from ct2x.volume import CTVolume, interpret_stored_values

SPACING_MM = (0.8, 0.9, 1.5)  # i, j, k
VOXEL_BYTES = 32**3 * 2  # int16 phantom: 65.5 kB
HALF = VOXEL_BYTES // 2  # 32.8 kB
NIFTI1_DATA_OFFSET = 352
DiskUsage = namedtuple("DiskUsage", "total used free")  # as shutil.disk_usage returns


def phantom_hu(noise_hu: float = 0.0) -> np.ndarray:
    """(32, 32, 32) int16 KJI: air -1000, a soft-tissue block 40 HU and a bone block 700 HU (+ Gaussian noise)."""
    hu = np.full((32, 32, 32), -1000.0)
    hu[6:26, 8:24, 8:24] = 40.0
    hu[12:18, 12:16, 10:14] = 700.0
    if noise_hu:
        hu += np.random.default_rng(7).normal(0.0, noise_hu, hu.shape)
    return np.round(hu).astype(np.int16)


def write_image(array: np.ndarray, path: Path, compress: bool = False) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING_MM)
    sitk.WriteImage(image, str(path), useCompression=compress)
    return path


def nifti1_bytes(array: np.ndarray, byte_order: str, spacing=SPACING_MM) -> bytes:
    """A minimal single-file NIfTI-1 (sform, mm) of a float32 or int16 KJI array in either byte order."""
    datatype = {np.dtype(np.float32): 16, np.dtype(np.int16): 4}[array.dtype]
    header = bytearray(NIFTI1_DATA_OFFSET)
    struct.pack_into(byte_order + "i", header, 0, 348)
    struct.pack_into(byte_order + "8h", header, 40, 3, *array.shape[::-1], 1, 1, 1, 1)
    struct.pack_into(byte_order + "hh", header, 70, datatype, array.dtype.itemsize * 8)
    struct.pack_into(byte_order + "8f", header, 76, 1.0, *spacing, 0, 0, 0, 0)
    struct.pack_into(byte_order + "3f", header, 108, NIFTI1_DATA_OFFSET, 1.0, 0.0)  # vox_offset, scl_slope, inter
    header[123] = 2  # xyzt_units: mm
    struct.pack_into(byte_order + "h", header, 254, 1)  # sform_code
    for row, values in enumerate(np.diag(list(spacing) + [1.0])[:3]):
        struct.pack_into(byte_order + "4f", header, 280 + 16 * row, *values)
    header[344:348] = b"n+1\0"
    return bytes(header) + array.astype(array.dtype.newbyteorder(byte_order)).tobytes()


def size_text(n_bytes: int) -> str:
    return f"{n_bytes} bytes" if n_bytes < 1000 else f"{n_bytes / 1000:.1f} kB"


def data_file_of(path: Path) -> Path:
    """The file holding the voxel data: ``path`` itself, or the .raw/.zraw an .mhd names."""
    if path.suffix != ".mhd":
        return path
    name = [line for line in path.read_text().splitlines() if line.startswith("ElementDataFile")][0]
    return path.parent / name.split("=")[1].strip()


def header_field(path: Path, key: str) -> int:
    line = [line for line in path.read_bytes().split(b"\n") if line.startswith(key.encode())][0]
    return int(line.split(b"=")[1])


def cut_end(path: Path, n_bytes: int) -> None:
    path.write_bytes(path.read_bytes()[:-n_bytes])


@pytest.fixture
def quiet_stderr(capfd):
    """Fails the test when anything (e.g. a raw ITK or MetaIO warning) was printed on stderr."""
    yield
    assert capfd.readouterr().err == ""


def load_refused(path: Path, **options) -> str:
    """The refusal message of load_ct(path); it must start with the path."""
    with pytest.raises(CT2XInputError) as refusal:
        load_ct(path, **options)
    message = str(refusal.value)
    assert message.startswith(str(path)), message
    return message


# 1. Incomplete files: every format refuses, naming the file and how much voxel data is there.

UNCOMPRESSED_HALF = (rf"holds {size_text(HALF)} of the {size_text(VOXEL_BYTES)} of voxel data its header declares "
                     r"\(50 %\)")


def truncate_uncompressed(path: Path) -> str:
    cut_end(data_file_of(path), HALF)
    return UNCOMPRESSED_HALF


def truncate_nifti_gz_data(path: Path) -> str:
    """A complete gzip stream whose NIfTI data stops half way (as a file gzipped after an interrupted copy)."""
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:NIFTI1_DATA_OFFSET + HALF]))
    return UNCOMPRESSED_HALF


def cut_gzip_stream(path: Path) -> str:
    cut_end(path, 200)  # inside the compressed voxel data
    return r"holds [\d.]+ kB of the 65\.5 kB of voxel data its header declares \(\d\d %\); its gzip data is cut short"


def truncate_compressed_metaimage(path: Path) -> str:
    declared = header_field(path, "CompressedDataSize")
    cut_end(data_file_of(path), declared // 2)
    present = declared - declared // 2
    return (rf"holds {size_text(present)} of the {size_text(declared)} of compressed voxel data its header declares "
            rf"\({100 * present // declared} %\)")


@pytest.mark.parametrize(
    "name, compress, damage",
    [
        ("ct.nii", False, truncate_uncompressed),
        ("ct.nii.gz", True, truncate_nifti_gz_data),
        ("cut.nii.gz", True, cut_gzip_stream),
        ("ct.nrrd", False, truncate_uncompressed),
        ("gz.nrrd", True, cut_gzip_stream),
        ("ct.mha", False, truncate_uncompressed),
        ("z.mha", True, truncate_compressed_metaimage),
        ("ct.mhd", False, truncate_uncompressed),
        ("z.mhd", True, truncate_compressed_metaimage),
    ],
)
def test_incomplete_files_are_refused(tmp_path, quiet_stderr, name, compress, damage):
    path = write_image(phantom_hu(), tmp_path / name, compress)
    expected = damage(path)
    message = load_refused(path)
    assert ": is incomplete: " in message
    assert re.search(expected, message), message
    if path.suffix == ".mhd":
        assert f"its data file {data_file_of(path).name} holds" in message


def test_damaged_gzip_is_refused(tmp_path, quiet_stderr):
    path = write_image(phantom_hu(), tmp_path / "flipped.nii.gz", compress=True)
    data = bytearray(path.read_bytes())
    data[-8] ^= 0xFF  # the CRC-32 of the decompressed data
    path.write_bytes(bytes(data))
    assert re.search(r"its gzip data is damaged \(.*incorrect data check\)\. Copy the file again", load_refused(path))


# 2. Non-finite voxels: counted and refused in every format (ITK's NIfTI reader would make them 0 HU).

def with_non_finite(hu: np.ndarray, dtype=np.float32) -> np.ndarray:
    values = hu.astype(dtype)
    values[0, 0, :5] = np.nan
    values[1, 1, :3] = np.inf
    values[2, 2, :2] = -np.inf
    return values


NON_FINITE = r"has 10 non-finite values \(NaN or inf\) of 32768 \(5 NaN, 3 \+inf, 2 -inf\)"


@pytest.mark.parametrize("name, compress", [("nan.nii", False), ("nan.nii.gz", True), ("nan.nrrd", True),
                                            ("nan.mha", True), ("nan.mhd", False)])
def test_non_finite_voxels_are_refused(tmp_path, quiet_stderr, name, compress):
    path = write_image(with_non_finite(phantom_hu()), tmp_path / name, compress)
    assert re.search(NON_FINITE, load_refused(path))


@pytest.mark.parametrize("byte_order", ["<", ">"])
def test_non_finite_in_hand_written_nifti_of_either_byte_order(tmp_path, quiet_stderr, byte_order):
    path = tmp_path / f"endian{'big' if byte_order == '>' else 'little'}.nii"
    path.write_bytes(nifti1_bytes(phantom_hu().astype(np.float32), byte_order))
    np.testing.assert_array_equal(load_ct(path).hu, phantom_hu())  # the header is one ITK reads
    path.write_bytes(nifti1_bytes(with_non_finite(phantom_hu()), byte_order))
    assert re.search(NON_FINITE, load_refused(path))


def test_float64_and_all_nan_nifti(tmp_path, quiet_stderr):
    path = write_image(with_non_finite(phantom_hu(), np.float64), tmp_path / "f64.nii.gz")
    assert re.search(NON_FINITE, load_refused(path))
    path = write_image(np.full((32, 32, 32), np.nan, np.float32), tmp_path / "all_nan.nii")
    message = load_refused(path)
    assert "has 32768 non-finite values (NaN or inf) of 32768 (32768 NaN)" in message and "mask" not in message


# 3. Values and geometry no CT has.

def phantom_volume(hu: np.ndarray, spacing=SPACING_MM, source: str = "phantom") -> CTVolume:
    return CTVolume(hu=hu, affine=np.diag(list(spacing) + [1.0]), source=source)


def test_values_beyond_any_ct_scale_are_refused(quiet_stderr):
    hu = phantom_hu().astype(np.float32)
    hu[:4, :4, :4] = 1e9
    with pytest.raises(CT2XInputError, match=r"phantom: has 64 above 36000 HU \(up to 1e\+09\) of 32768 voxels"):
        phantom_volume(hu)
    n_air, n_denser = np.count_nonzero(phantom_hu() == -1000), np.count_nonzero(phantom_hu() > 36)
    with pytest.raises(CT2XInputError, match=rf"has {n_air} below -36000 HU \(down to -1e\+06\) and {n_denser} above "
                                             r"36000 HU \(up to 700000\) of 32768 voxels.*rescale slope wrong"):
        phantom_volume(phantom_hu().astype(np.float32) * 1000)


def test_wrong_rescale_slope_in_a_nifti_header_is_refused(tmp_path, quiet_stderr):
    path = write_image(phantom_hu(), tmp_path / "slope.nii")
    data = bytearray(path.read_bytes())
    data[112:116] = struct.pack("<f", 1000.0)  # scl_slope: HU x 1000
    path.write_bytes(bytes(data))
    assert "below -36000 HU (down to -1e+06)" in load_refused(path)


def test_air_far_below_minus_1000_warns(quiet_stderr):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        phantom_volume(phantom_hu(noise_hu=20.0))  # noisy air about -1000: fine
        padded = phantom_hu(noise_hu=20.0)
        padded[:, :6, :6] = -3024  # padding outside the field of view is left out
        phantom_volume(padded)
    with pytest.warns(CT2XWarning, match=r"phantom: air lies at about -100\d\d HU.*wrong rescale slope"):
        phantom_volume(phantom_hu(noise_hu=20.0).astype(np.float32) * 10)


@pytest.mark.parametrize(
    "spacing, expected",
    [
        ((0.8, 0.9, 10000.0), r"10000 mm along k is coarser than any CT \(100 mm at most\).*micrometres"),
        ((0.0008, 0.0008, 0.002), r"0\.0008 mm along i is finer than any CT \(0\.01 mm at least\).*metres"),
    ],
)
def test_impossible_spacing_is_refused(quiet_stderr, spacing, expected):
    with pytest.raises(CT2XInputError, match=r"phantom: voxel spacing \(.*\) mm along \(i, j, k\): " + expected):
        phantom_volume(phantom_hu(), spacing)


def test_unusual_spacing_warns(quiet_stderr):
    with pytest.warns(CT2XWarning, match=r"phantom: voxel spacing \(0\.8, 0\.9, 30\) mm .* unusual for a CT along k"):
        phantom_volume(phantom_hu(), (0.8, 0.9, 30.0))
    with pytest.warns(CT2XWarning, match=r"unusual for a CT along i, j .*centimetres"):
        phantom_volume(phantom_hu(), (0.05, 0.05, 0.2))


def test_zero_nifti_slice_spacing_is_refused(tmp_path, quiet_stderr):
    path = write_image(phantom_hu(), tmp_path / "flat.nii")
    data = bytearray(path.read_bytes())
    data[88:92] = struct.pack("<f", 0.0)  # pixdim[3]; the sform still says 1.5 mm
    path.write_bytes(bytes(data))
    message = load_refused(path)
    assert "no voxel size along k (pixdim[3] = 0; its sform suggests 1.5 mm), so the slice spacing is unknown" in (
        message)
    assert "ITK would read it as 1 mm" in message


def test_sform_pixdim_disagreement_becomes_a_warning(tmp_path, quiet_stderr):
    path = write_image(phantom_hu(), tmp_path / "disagree.nii")
    data = bytearray(path.read_bytes())
    data[88:92] = struct.pack("<f", 3.0)  # pixdim[3] 3 mm, sform 1.5 mm
    path.write_bytes(bytes(data))
    with pytest.warns(CT2XWarning, match=r"disagree\.nii: its sform and its pixdim disagree on the voxel size"):
        assert load_ct(path).spacing_mm[2] == pytest.approx(3.0)


# 4. Stored values HU + 1024 (X2CT-GAN's files): recognised, converted with a notice, with an override.

def write_hu_plus_1024(tmp_path: Path) -> Path:
    return write_image((phantom_hu(noise_hu=15.0).astype(np.int32) + 1024).astype(np.int16),
                       tmp_path / "x2ct.nii.gz")


def test_hu_plus_1024_file_is_converted_with_a_notice(tmp_path, quiet_stderr):
    path = write_hu_plus_1024(tmp_path)
    with pytest.warns(CT2XWarning) as notices:
        volume = load_ct(path)
    (notice,) = [str(n.message) for n in notices]
    assert notice.startswith(f"{path}: stored values look like HU + 1024, not HU (lowest value ")
    assert "% of voxels below 300 (air) and soft tissue peaking at 10" in notice
    assert "converted to HU by subtracting 1024. If they are HU already, say so: stored_values='hu'" in notice
    np.testing.assert_array_equal(volume.hu, phantom_hu(noise_hu=15.0))
    assert volume.stored_offset_hu == 1024.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        forced = load_ct(path, stored_values="hu+1024")  # explicit: no notice
    np.testing.assert_array_equal(forced.hu, volume.hu)
    message = load_refused(path, stored_values="hu")
    assert "values look like HU + 1024, not HU" in message and "stored_values='auto' or 'hu+1024'" in message


def test_hu_file_is_not_converted(tmp_path, quiet_stderr):
    path = write_image(phantom_hu(noise_hu=15.0), tmp_path / "hu.nrrd")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        volume = load_ct(path)
    assert volume.stored_offset_hu == 0.0
    np.testing.assert_array_equal(volume.hu, phantom_hu(noise_hu=15.0))
    assert "nothing denser than fat" in load_refused(path, stored_values="hu+1024")  # the override misused on HU
    with pytest.raises(CT2XInputError, match=r"stored_values='HU': choose one of 'auto', 'hu', 'hu\+1024'"):
        load_ct(path, stored_values="HU")


def test_ct_volume_from_hu_plus_1024_array_names_the_fix(quiet_stderr):
    stored = phantom_hu(noise_hu=15.0).astype(np.float32) + 1024
    with pytest.raises(CT2XInputError, match=r"array: values look like HU \+ 1024.*CTVolume\(hu=values - 1024"):
        phantom_volume(stored, source="array")
    hu, offset = interpret_stored_values(stored, "hu+1024", "array")
    assert offset == 1024.0 and hu.dtype == np.float32
    np.testing.assert_array_equal(hu, phantom_hu(noise_hu=15.0))


def test_volume_from_vtk_interprets_stored_values(quiet_stderr):
    from ct2x.vtk_bridge import volume_from_vtk, vtk_from_array

    image_data = vtk_from_array((phantom_hu(noise_hu=15.0).astype(np.int32) + 1024).astype(np.int16))
    with pytest.warns(CT2XWarning, match=r"CT node: stored values look like HU \+ 1024"):
        volume = volume_from_vtk(image_data, np.eye(4), source="CT node")
    assert volume.stored_offset_hu == 1024.0
    np.testing.assert_array_equal(volume.hu, phantom_hu(noise_hu=15.0))
    with pytest.raises(CT2XInputError, match=r"CT node: values look like HU \+ 1024"):
        volume_from_vtk(image_data, np.eye(4), source="CT node", stored_values="hu")


# 5. Messages: permission, missing data files, damaged DICOM files.

def test_permission_denied_is_not_does_not_exist(tmp_path, monkeypatch, quiet_stderr):
    path = write_image(phantom_hu(), tmp_path / "locked.nrrd")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == path else real_access(p, mode))
    assert "locked.nrrd: permission denied: this user may not read the file" in load_refused(path)
    real_stat = Path.stat

    def stat(self, *args, **kwargs):  # as in a folder this user may not search
        if self == path:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", stat)
    assert "locked.nrrd: permission denied: a folder on its path may not be searched" in load_refused(path)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_says_permission_denied(tmp_path):
    path = write_image(phantom_hu(), tmp_path / "locked.mha")
    path.chmod(0)
    try:
        assert "permission denied" in load_refused(path)
    finally:
        path.chmod(0o644)


@pytest.mark.parametrize("name, field", [("ct.mhd", "ElementDataFile"), ("ct.nhdr", "data file")])
def test_missing_data_file_is_named(tmp_path, quiet_stderr, name, field):
    path = write_image(phantom_hu(), tmp_path / name)
    (data_file,) = [p for p in tmp_path.iterdir() if p != path]
    data_file.unlink()
    message = load_refused(path)
    assert f"its voxel data file {data_file} ({field} in the header) does not exist" in message


def test_nifti2_is_named(tmp_path, quiet_stderr):
    header = bytearray(544)
    struct.pack_into("<i8s2h8q", header, 0, 540, b"n+2\0\r\n\x1a\n", 4, 16, 3, 32, 32, 32, 1, 1, 1, 1)
    struct.pack_into("<8dq", header, 104, 1.0, *SPACING_MM, 0, 0, 0, 0, 544)
    path = tmp_path / "v2.nii"
    path.write_bytes(bytes(header) + phantom_hu().tobytes())
    assert "is NIfTI-2, which SimpleITK" in load_refused(path)


def damage_dicom(folder: Path, how: str) -> Path:
    victim = sorted(folder.iterdir())[10]
    data = victim.read_bytes()
    victim.write_bytes({"truncated": data[: len(data) // 2], "garbage": os.urandom(len(data)), "empty": b""}[how])
    return victim


@pytest.mark.parametrize("how", ["truncated", "garbage", "empty"])
def test_damaged_dicom_file_is_named(ct_phantom, tmp_path, quiet_stderr, how):
    folder = tmp_path / "series"
    write_dicom_series(ct_phantom, folder, SERIES_A, "slice")
    typical = size_text((folder / "slice_000.dcm").stat().st_size)
    victim = damage_dicom(folder, how)
    message = load_refused(folder)
    assert "DICOM slices are not evenly spaced (gaps 1.5 to 3 mm): slices are missing" in message
    described = {"truncated": f"{size_text(victim.stat().st_size)}, the series' files {typical}: damaged or truncated",
                 "garbage": f"{typical}, the series' files {typical}: damaged or truncated",
                 "empty": "empty"}[how]
    assert f"probably the missing slices: {victim.name} ({described})" in message


def test_damaged_end_slice_is_named_in_a_warning(ct_phantom, tmp_path, quiet_stderr):
    folder = tmp_path / "series"
    write_dicom_series(ct_phantom, folder, SERIES_A, "slice")
    last = folder / "slice_031.dcm"
    last.write_bytes(last.read_bytes()[:1000])  # no gap: the series is just one slice shorter
    with pytest.warns(CT2XWarning, match=r"series: these files in the folder look like DICOM but are in no series "
                                         r".*built without them: slice_031\.dcm \(1\.0 kB, the series' files"):
        assert load_ct(folder).shape_ijk == (40, 36, 31)


def test_folder_of_damaged_dicom_files(ct_phantom, tmp_path, quiet_stderr):
    folder = tmp_path / "broken"
    write_dicom_series(ct_phantom, folder, SERIES_A, "s")
    for path in folder.iterdir():
        path.write_bytes(path.read_bytes()[:-500])
    message = load_refused(folder)
    assert "folder holds no DICOM series (32 files)" in message
    assert "look like DICOM but could not be read: s_000.dcm (" in message and ", and 27 more." in message


# 6. Writing: ordinary file modes; a failed write is an OSError naming the file and the cause, leaving nothing.

@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_get_ordinary_modes(ct_phantom, tmp_path, umask):
    previous = os.umask(umask)
    try:
        written = [save_ct(ct_phantom, tmp_path / "ct.mha"), save_ct(ct_phantom, tmp_path / "ct.nii.gz"),
                   save_image(np.zeros((4, 5)), tmp_path / "drr.nrrd", 0.5)]
    finally:
        os.umask(previous)
    assert {oct(path.stat().st_mode & 0o777) for path in written} == {oct(0o666 & ~umask)}


@pytest.mark.parametrize(
    "reason, free_bytes, code, cause",
    [
        ("Could not open file for writing: No space left on device", 10**12, errno.ENOSPC, "the disk is full"),
        ("ImageFileWriter: write failed", 1000, errno.ENOSPC, r"the disk is full \(1\.0 kB free, the image needs up "
                                                              r"to 184\.3 kB\)"),
        ("ImageFileWriter: write failed", 10**12, errno.EIO, "the write failed; is the disk full, removed or failing"),
        ("Permission denied", 10**12, errno.EACCES, "permission denied"),
    ],
)
def test_failed_write_is_an_os_error(ct_phantom, tmp_path, monkeypatch, reason, free_bytes, code, cause):
    def failing_write(image, path, useCompression=False):
        Path(path).write_bytes(b"half")
        raise RuntimeError(f"Exception thrown in SimpleITK ImageFileWriter_Execute: ...\nsitk::ERROR: {reason}")

    monkeypatch.setattr(sitk, "WriteImage", failing_write)
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: DiskUsage(10**13, 0, free_bytes))
    with pytest.raises(OSError) as failure:
        save_ct(ct_phantom, tmp_path / "ct.nrrd")
    assert failure.value.errno == code
    assert re.search(rf"ct\.nrrd: could not be written: {cause}.*\(SimpleITK: {reason}\)", str(failure.value))
    assert os.listdir(tmp_path) == []


# Real scans: HU + 1024 is recognised in all 8 HNSCC volumes and in none of the real HU scans.

@pytest.mark.realdata
@pytest.mark.slow
def test_real_hu_scans_are_not_converted(data_dir, quiet_stderr):
    ct = data_dir / "ct"
    paths = [ct / "chest_popi_phase00.nii.gz", ct / "abdomen_pelvis.nii.gz", ct / "chest_abdomen_cip_lowres.nrrd",
             ct / "abdomen_dicom_series"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for path in paths:
            assert load_ct(path).stored_offset_hu == 0.0, path


@pytest.mark.realdata
@pytest.mark.slow
def test_real_hu_plus_1024_scans_are_converted(data_dir, quiet_stderr):
    paths = sorted((data_dir / "ct" / "hnscc_downsampled").glob("*.nii.gz"))
    assert len(paths) == 8
    for path in paths:
        with pytest.warns(CT2XWarning, match="stored values look like HU \\+ 1024") as notices:
            volume = load_ct(path)
        assert len(notices) == 1 and str(notices[0].message).startswith(str(path))
        assert volume.stored_offset_hu == 1024.0
        assert -1024 <= volume.hu.min() <= -999 and 2500 < volume.hu.max() <= 3100, path
        soft_tissue = volume.hu[(volume.hu >= -100) & (volume.hu < 150)]
        peak_hu = -100 + 10 * np.argmax(np.bincount(((soft_tissue + 100) // 10).astype(int))) + 5  # 10 HU bins
        assert 20 < peak_hu < 70, path  # muscle and blood, about 40 HU
