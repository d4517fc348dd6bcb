"""`ct2x prepare synth` end to end on phantoms and films built here; the real scans and style films (realdata)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import ct2x.data.prepare_synth as synth_module
from ct2x import phantoms
from ct2x.cli.main import main
from ct2x.data.prepare_synth import (
    SynthPreparation,
    case_paths,
    film_paths,
    find_films,
    load_case,
    load_film,
    prepare_synth,
)
from ct2x.drr import DRRRenderer, Physics
from ct2x.errors import CT2XInputError
from ct2x.io import save_ct, save_png
from ct2x.synth_inputs import camera_labels
from ct2x.volume import CTVolume

TINY = SynthPreparation(voxel_mm=8.0, ct_voxels=16, film_px=32, mip_px=16)  # a 128 mm cube of 16^3
SEVEN = (-90.0, -60.0, -30.0, 0.0, 30.0, 60.0, 90.0)


def chest_film(lateral: bool = False) -> np.ndarray:
    """(64, 64) uint8 bone-bright chest-like film: body, two dark lungs (one for a lateral) and a bright spine."""
    rows, columns = np.mgrid[0:64, 0:64] / 63.0
    film = np.where(((columns - 0.5) / 0.4) ** 2 + ((rows - 0.5) / 0.48) ** 2 <= 1, 0.55, 0.05)
    for centre in ((0.45,) if lateral else (0.3, 0.7)):
        film[((columns - centre) / 0.12) ** 2 + ((rows - 0.4) / 0.25) ** 2 <= 1] = 0.3
    film[:, 48:54 if lateral else 30:34] = 0.9
    return np.round(film * 255).astype(np.uint8)


@pytest.fixture
def inputs(tmp_path):
    """CTs p1_a, p1_b (one patient), p2_a, p3_a, a broken one and an empty one; films: five usable, four of them
    indexed, and a blank one."""
    cts = tmp_path / "cts"
    cts.mkdir()
    chest = phantoms.chest(size=32, spacing_mm=10.0)
    for name in ("p1_a", "p1_b", "p2_a", "p3_a"):
        save_ct(chest, cts / f"{name}.mha")
    (cts / "p4_broken.nii.gz").write_bytes(b"not a NIfTI file")
    slab = np.full((20, 20, 20), -1000.0, dtype=np.float32)  # (K, J, I) 400 mm of air, a 100 mm tissue slab ...
    slab[:5] = 40.0
    save_ct(CTVolume(slab, np.diag([20.0, 20.0, 20.0, 1.0])), cts / "p5_air.nrrd")  # ... outside the 128 mm cube
    films = tmp_path / "films"
    films.mkdir()
    for name, lateral in (("a-pa.png", False), ("a-lat.png", True), ("b.png", False), ("c.png", False),
                          ("d-L.png", True)):
        save_png(chest_film(lateral), films / name)
    save_png(np.full((64, 64), 128, dtype=np.uint8), films / "blank.png")  # every pixel alike: no film
    (films / "index.csv").write_text("file,view,patientid,license\na-pa.png,PA,7,CC BY\na-lat.png,L,7,CC BY\n"
                                     "b.png,AP Supine,8,CC BY-SA\nc.png,PA,9,CC BY-NC-SA\n")
    return cts, films


def test_prepare_end_to_end(inputs, tmp_path):
    cts, films = inputs
    out = tmp_path / "prepared"
    settings = SynthPreparation(voxel_mm=8.0, ct_voxels=16, film_px=32, mip_px=16, patient_pattern=r"^(p\d+)_",
                                val_fraction=0.3, test_fraction=0.3)
    manifest = prepare_synth([cts], [films], out, settings, progress=False)

    assert set(manifest["cases"]) == {"p1_a", "p1_b", "p2_a", "p3_a"}
    assert set(manifest["failed"]) == {"p4_broken", "p5_air"}
    assert "does not look like a CT" in manifest["failed"]["p5_air"]["reason"]  # the cube holds only air
    assert manifest["cases"]["p1_a"]["split"] == manifest["cases"]["p1_b"]["split"]  # one patient, one split
    assert {record["split"] for record in manifest["cases"].values()} == {"train", "val", "test"}
    assert [path.stem for path in case_paths(out)] == ["p1_a", "p1_b", "p2_a", "p3_a"]

    case = load_case(out / "cases" / "p2_a.npz")
    assert case["ct_hu"].shape == (16, 16, 16) and case["ct_hu"].dtype == np.int16
    assert np.allclose(np.abs(np.diag(case["affine"])[:3]), 8.0)  # 8 mm voxels, 128 mm cube
    assert case["ct_hu"].min() <= -800 and case["ct_hu"].max() > 300  # HU: lung (-850) and bone
    assert tuple(case["angles_deg"]) == SEVEN
    assert case["drr"].shape == (7, 32, 32) and case["drr"].dtype == np.float32
    assert np.allclose(case["drr"].max(axis=(1, 2)), 1.0) and case["drr"].min() >= 0 and (case["drr_max"] > 1).all()
    assert case["mips"].shape == (7, 16, 16) and 0 <= case["mips"].min() and case["mips"].max() <= 1

    stored = CTVolume(case["ct_hu"].astype(np.float32), case["affine"])  # the DRRs come from the stored CT
    renderer = DRRRenderer(stored, settings.carm(32), Physics(spectrum="60kV"))
    views = [renderer.view(angle) for angle in SEVEN]
    assert np.array_equal(case["labels"], camera_labels(views).numpy())
    assert case["labels"][3, 3:12:4].tolist() == pytest.approx([0.0, 530.0, 0.0])  # AP: source 530 mm anterior
    attenuation = renderer.render_view(views[5]).attenuation  # 60 deg
    np.testing.assert_allclose(case["drr"][5] * case["drr_max"][5], attenuation, rtol=1e-5, atol=1e-5)

    assert set(manifest["films"]) == {"a-pa", "a-lat", "b", "c", "d-L"} and set(manifest["failed_films"]) == {"blank"}
    assert "same value" in manifest["failed_films"]["blank"]["reason"]
    a_pa, a_lat, b, d = (manifest["films"][name] for name in ("a-pa", "a-lat", "b", "d-L"))
    assert (a_pa["view"], a_lat["view"], b["view"], d["view"]) == ("pa", "lateral", "pa", "lateral")
    assert "index.csv says view 'L'" in a_lat["view_from"] and "file name" in d["view_from"]
    assert (a_pa["patient"], a_pa["licence"], d["patient"]) == ("7", "CC BY", "d-L")
    assert a_pa["split"] == a_lat["split"] and any(choice.startswith("read PNG") for choice in a_pa["choices"])
    image = load_film(out / "films" / "a-lat.npz")
    assert image.shape == (32, 32) and image.dtype == np.float32 and 0 <= image.min() and image.max() <= 1
    assert len(film_paths(out)) == 5 and sum(len(film_paths(out, split)) for split in ("train", "val", "test")) == 5
    saved = json.loads((out / "preparation.json").read_text())
    assert saved["settings"]["angles_deg"] == list(SEVEN) and saved["settings"]["spectrum"] == "60kV"
    assert not list(out.rglob(".*"))  # no temporary file left


def test_prepare_resumes_without_redoing_anything_and_refuses_other_settings(inputs, tmp_path, monkeypatch):
    cts, films = inputs
    out = tmp_path / "prepared"
    prepare_synth([cts / "p1_a.mha"], [films / "a-pa.png"], out, TINY, progress=False)
    done = []
    for name in ("prepare_case", "prepare_film_file"):
        real = getattr(synth_module, name)
        monkeypatch.setattr(synth_module, name, lambda item, settings, real=real: done.append(item) or real(
            item, settings))
    manifest = prepare_synth([cts / "p1_a.mha", cts / "p2_a.mha"], [films / "a-pa.png", films / "c.png"], out, TINY,
                             progress=False)
    assert [getattr(item, "path", item).name for item in done] == ["p2_a.mha", "c.png"]
    assert set(manifest["cases"]) == {"p1_a", "p2_a"} and set(manifest["films"]) == {"a-pa", "c"}

    (out / "cases" / "p3_a.npz").write_bytes(b"")  # written, then stopped before the manifest: done
    manifest = prepare_synth([cts / "p3_a.mha"], [], out, TINY, progress=False)
    assert manifest["cases"]["p3_a"]["resumed"] and len(done) == 2
    with pytest.raises(CT2XInputError, match="other settings"):
        prepare_synth([cts], [], out, SynthPreparation(voxel_mm=8.0, ct_voxels=16, film_px=64, mip_px=16),
                      progress=False)


def test_prepare_command_line_on_two_workers(inputs, tmp_path, capsys):
    cts, films = inputs
    out = tmp_path / "cli"
    tiny = ["--voxel-mm", "8", "--voxels", "16", "--film-px", "32", "--mip-px", "16", "--angles", "-90,0,90",
            "--quiet"]
    assert main(["prepare", "synth", "--ct", str(cts / "p1_a.mha"), str(cts / "p4_broken.nii.gz"), "--xray",
                 str(films), "--out", str(out), "--workers", "2", "--sensor-mm", "600", *tiny]) == 0
    said = capsys.readouterr()
    assert "1 cases (1 train, 0 val, 0 test) and 5 films" in said.out and "1 CTs and 1 films skipped" in said.out
    assert "skipped" in said.err and "p4_broken" in said.err
    assert load_case(out / "cases" / "p1_a.npz")["drr"].shape == (3, 32, 32)
    assert json.loads((out / "preparation.json").read_text())["settings"]["sensor_mm"] == 600
    assert main(["prepare", "synth", "--ct", str(cts / "p4_broken.nii.gz"), "--out", str(tmp_path / "bad"),
                 *tiny]) == 2
    assert main(["prepare", "synth", "--ct", str(cts), "--out", str(tmp_path / "x"), "--angles", "90:-90:30"]) == 2
    assert "--angles" in capsys.readouterr().err


def test_settings_are_checked():
    with pytest.raises(CT2XInputError, match="below 1"):
        SynthPreparation(val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(CT2XInputError, match="spectrum"):
        SynthPreparation(spectrum="200kV")
    with pytest.raises(CT2XInputError, match="at least 8"):
        SynthPreparation(film_px=4)
    assert SynthPreparation().cube_mm == 128.0 and SynthPreparation().angles_deg == SEVEN


def test_film_views_come_from_the_index_then_the_name(inputs, tmp_path):
    _, films = inputs
    (films / "e.png").write_bytes((films / "c.png").read_bytes())
    with (films / "index.csv").open("a") as index:
        index.write("e.png,oblique,10,CC BY\n")
    found = find_films([films])
    assert (found["b"].view, found["d-L"].view, found["blank"].view, found["e"].view) == ("pa", "lateral", "pa", "")
    assert found["blank"].view_from.startswith("assumed PA") and found["blank"].patient == "blank"
    with pytest.raises(CT2XInputError, match="neither a PA/AP nor a lateral"):
        synth_module.prepare_film_file(found["e"], TINY)
    assert find_films([films / "a-lat.png"])["a-lat"].patient == "7"  # a film given alone finds its index too
    (films / "notes.csv").write_bytes(b"file,view\n\xff\xfe.png,PA\n")  # not UTF-8
    with pytest.raises(CT2XInputError, match="notes.csv: cannot be read"):
        find_films([films])


@pytest.mark.realdata
@pytest.mark.slow
def test_real_cts_and_style_films(data_dir, tmp_path):
    """Two real CTs at the paper's settings (1 mm, 128^3, 256^2 DRRs at the seven poses) and a few style films."""
    style = data_dir / "xray" / "style_set"
    names = ["000001-2.png", "000001-12.png"]
    laterals = [line.split(",")[0] for line in (style / "index.csv").read_text().splitlines()[1:]
                if line.split(",")[1] == "L"][:2]
    films = tmp_path / "style"
    films.mkdir()
    for name in names + laterals:
        (films / name).write_bytes((style / name).read_bytes())
    (films / "index.csv").write_text("\n".join(line for line in (style / "index.csv").read_text().splitlines()
                                               if line.split(",")[0] in ("file", *names, *laterals)) + "\n")
    hnscc = sorted((data_dir / "ct" / "hnscc_downsampled").glob("*.nii.gz"))[:2]
    out = tmp_path / "prepared"
    manifest = prepare_synth(hnscc, [films], out, progress=False)
    assert len(manifest["cases"]) == 2 and not manifest["failed"] and not manifest["failed_films"]
    assert all(record["stored_offset_hu"] == 1024 for record in manifest["cases"].values())  # HU + 1024 files
    for path in case_paths(out):
        case = load_case(path)
        assert case["ct_hu"].shape == (128, 128, 128) and case["drr"].shape == (7, 256, 256)
        assert case["mips"].shape == (7, 128, 128) and 1 < case["drr_max"].min() < case["drr_max"].max() < 15
        assert case["ct_hu"].min() < -900 and case["ct_hu"].max() > 1000  # air and bone in the 128 mm cube
    assert [manifest["films"][name[:-4]]["view"] for name in laterals] == ["lateral", "lateral"]
    assert all(load_film(path).shape == (256, 256) for path in film_paths(out))
