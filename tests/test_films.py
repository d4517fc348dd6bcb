"""Real-film preparation (ct2x.data.films): every film kind, borders, inversion and lateral facing both ways, the
convention's intensities, bad films; the six real PA + lateral pairs (realdata)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from ct2x.data.films import CONVENTION_BODY_LEVELS, PreparedFilm, anterior_side, prepare_film
from ct2x.data.x2ct_convention import ct_cube, official_films
from ct2x.errors import CT2XInputError
from ct2x.phantoms import chest

SIZE = 64  # px of the prepared films
PAIRS = "xray/chest_pa_lateral"


@pytest.fixture(scope="module")
def phantom_films():
    """The chest phantom's (PA, lateral) as the convention renders them: (256, 256) float32 in [0, 1], bone bright."""
    return official_films(chest(size=64, spacing_mm=5.0), film_px=256)


def eight_bit(film: np.ndarray) -> np.ndarray:
    return np.round(np.clip(film, 0, 1) * 255).astype(np.uint8)


def write(path: Path, pixels: np.ndarray) -> Path:
    """`pixels` (H, W) or (H, W, C) written by SimpleITK, the format by the name's ending."""
    sitk.WriteImage(sitk.GetImageFromArray(pixels, isVector=pixels.ndim == 3 and pixels.shape[-1] <= 4), str(path))
    return path


def write_dicom(path: Path, stored: np.ndarray, photometric: str) -> Path:
    """A DICOM film of `stored` uint16 values. SimpleITK's writer always declares MONOCHROME2; MONOCHROME1 is then
    set in the file's bytes (same length, so the file stays valid)."""
    write(path, stored)
    if photometric == "MONOCHROME1":
        path.write_bytes(path.read_bytes().replace(b"MONOCHROME2 ", b"MONOCHROME1 "))
    assert sitk.ReadImage(str(path)).GetMetaData("0028|0004").strip() == photometric
    return path


def close(prepared: PreparedFilm, reference: PreparedFilm, tolerance: float = 0.02) -> bool:
    """The two films agree to `tolerance` on average (of [0, 1])."""
    assert prepared.image.shape == (SIZE, SIZE) and prepared.image.dtype == np.float32
    assert 0.0 <= prepared.image.min() and prepared.image.max() <= 1.0
    return float(np.abs(prepared.image - reference.image).mean()) < tolerance


def said(prepared: PreparedFilm, start: str) -> bool:
    return any(choice.startswith(start) for choice in prepared.choices)


@pytest.fixture(scope="module")
def pa_reference(phantom_films) -> PreparedFilm:
    return prepare_film(eight_bit(phantom_films[0]), "pa", SIZE)


def test_phantom_lateral_has_a_bright_posterior_spine():
    phantom = chest(size=64, spacing_mm=5.0)
    j = np.arange(64) * 5.0 + phantom.affine[1, 3]  # (J,) RAS y, mm: the phantom's j runs anterior
    bone = phantom.hu[16:48] > 200  # (K, J, I): bone of the middle slices
    assert bone[:, j < -40].sum() > 3 * bone[:, j > 40].sum()  # the spine posterior, only the sternum in front


@pytest.mark.parametrize("kind", ["png8", "png16", "rgb_png", "rgba_png", "jpeg", "dicom_mono2", "dicom_mono1"])
def test_every_film_kind_gives_the_same_network_input(kind, phantom_films, pa_reference, tmp_path):
    film = eight_bit(phantom_films[0])  # (256, 256) uint8
    wide = film.astype(np.uint16) * 257  # 16-bit
    files = {
        "png8": lambda: write(tmp_path / "film.png", film),
        "png16": lambda: write(tmp_path / "film.png", wide),
        "rgb_png": lambda: write(tmp_path / "film.png", np.stack([film] * 3, axis=-1)),
        "rgba_png": lambda: write(tmp_path / "film.png", np.stack([film] * 3 + [np.full_like(film, 255)], axis=-1)),
        "jpeg": lambda: write(tmp_path / "film.jpg", np.stack([film] * 3, axis=-1)),
        "dicom_mono2": lambda: write_dicom(tmp_path / "film.dcm", wide, "MONOCHROME2"),
        "dicom_mono1": lambda: write_dicom(tmp_path / "film.dcm", 65535 - wide, "MONOCHROME1"),  # smallest is white
    }
    prepared = prepare_film(files[kind](), "pa", SIZE)
    assert close(prepared, pa_reference, 0.03 if kind == "jpeg" else 0.01)
    described = {"png16": "16-bit grey", "rgb_png": "8-bit RGB", "rgba_png": "8-bit RGBA", "jpeg": "RGB"}
    assert described.get(kind, "") in prepared.choices[0]
    expected = {"dicom_mono1": "inverted (MONOCHROME1)", "dicom_mono2": "not inverted (MONOCHROME2)"}
    assert said(prepared, expected.get(kind, "not inverted (auto: bone-bright score +"))


def test_alpha_composites_over_black(phantom_films):
    film = eight_bit(phantom_films[0])
    alpha = np.full_like(film, 255)
    alpha[:, :128] = 0  # the left half transparent: no film there
    rgba = np.stack([film] * 3 + [alpha], axis=-1)
    prepared = prepare_film(rgba, "pa", SIZE, invert="no", crop="none")
    assert prepared.image[:, : SIZE // 2 - 1].max() == 0 and prepared.image[:, SIZE // 2 + 1:].max() > 0.5


@pytest.mark.parametrize("value, name", [(0, "black"), (255, "white")])
def test_uniform_borders_are_cropped(value, name, phantom_films, pa_reference):
    film = eight_bit(phantom_films[0])
    bordered = np.pad(film, ((20, 6), (12, 0)), constant_values=value)  # (282, 268)
    bordered[4:10, 2:8] = 255 - value  # a burned-in marker in the border
    prepared = prepare_film(bordered, "pa", SIZE)
    assert "cropped uniform borders: top 20, bottom 6, left 12, right 0 px" in prepared.choices, name
    assert close(prepared, pa_reference)
    assert not close(prepare_film(bordered, "pa", SIZE, crop="none"), pa_reference)  # crop="none" keeps them


@pytest.mark.parametrize("role", ["pa", "lateral"])
def test_inversion_is_detected_both_ways_and_can_be_overruled(role, phantom_films, tmp_path):
    film = phantom_films[0 if role == "pa" else 1]
    bright = write(tmp_path / "bright.png", eight_bit(film))
    dark = write(tmp_path / "dark.png", 255 - eight_bit(film))  # bone dark
    reference = prepare_film(bright, role, SIZE)
    assert said(reference, "not inverted (auto:")
    inverted = prepare_film(dark, role, SIZE)
    assert said(inverted, "inverted (auto:") and close(inverted, reference)
    assert said(prepare_film(dark, role, SIZE, invert="yes"), "inverted (as asked)")
    kept = prepare_film(dark, role, SIZE, invert="no")
    assert said(kept, "not inverted (as asked)") and not close(kept, reference, 0.1)


def test_lateral_facing_is_detected_both_ways_and_can_be_overruled(phantom_films, tmp_path):
    lateral = eight_bit(phantom_films[1])  # the convention's: anterior on the image left
    facing_left = prepare_film(write(tmp_path / "left.png", lateral), "lateral", SIZE)
    facing_right = prepare_film(write(tmp_path / "right.png", lateral[:, ::-1]), "lateral", SIZE)
    assert said(facing_left, "anterior on the image left (auto:")
    assert said(facing_right, "anterior on the image right (auto:") and close(facing_right, facing_left)
    forced = prepare_film(lateral, "lateral", SIZE, facing="right")
    assert said(forced, "anterior on the image right (as asked)")
    assert np.abs(forced.image - facing_left.image[:, ::-1]).mean() < 0.02  # mirrored, up to a pixel of padding
    assert anterior_side(phantom_films[1])[0] == "left"


@pytest.mark.parametrize("role", ["pa", "lateral"])
def test_intensities_match_the_convention(role, phantom_films):
    prepared = prepare_film(phantom_films[0 if role == "pa" else 1], role, SIZE)
    body = prepared.image[prepared.image > 0.1]
    assert np.allclose(np.percentile(body, [50, 99]), CONVENTION_BODY_LEVELS[role][1:], atol=0.06)
    if role == "lateral":  # air in front of and behind the body
        assert said(prepared, "intensities: air") and prepared.image[:, :3].max() < 0.05


def test_a_pa_is_never_mirrored(phantom_films):
    with pytest.raises(CT2XInputError, match="for laterals"):
        prepare_film(phantom_films[0], "pa", SIZE, facing="right")
    heart_side = prepare_film(phantom_films[0], "pa", SIZE).image[40:52]  # rows through the heart
    assert heart_side[:, 36:48].mean() > heart_side[:, 16:28].mean()  # the heart (patient's left) on the image right


def bad_films(folder: Path):
    yield folder / "missing.png", "no such file"
    (folder / "empty.png").write_bytes(b"")
    yield folder / "empty.png", "the file is empty"
    (folder / "text.png").write_text("not an image")
    yield folder / "text.png", "cannot be read as a film"
    yield folder, "is a folder"
    yield write(folder / "volume.nrrd", np.zeros((4, 40, 40), np.int16)), "3-D image"
    yield write(folder / "flat.png", np.full((64, 64), 7, np.uint8)), "the film is empty"
    yield write(folder / "tiny.png", np.arange(64, dtype=np.uint8).reshape(8, 8)), "too small"


def test_bad_films_are_refused_naming_the_file(tmp_path):
    for path, problem in bad_films(tmp_path):
        with pytest.raises(CT2XInputError, match=problem) as refusal:
            prepare_film(path, "pa", SIZE)
        assert str(path) in str(refusal.value)


@pytest.mark.parametrize("array, problem", [
    (np.full((64, 64), np.nan, np.float32), "NaN"),
    (np.zeros((64, 64, 5)), "not a film"),
    (np.zeros((64, 64), bool), "no film's"),
])
def test_bad_arrays_are_refused(array, problem):
    with pytest.raises(CT2XInputError, match=problem):
        prepare_film(array, "pa", SIZE)


@pytest.mark.parametrize("option", [{"role": "ap"}, {"invert": "maybe"}, {"facing": "up"}, {"crop": "some"},
                                    {"size": 0}])
def test_bad_choices_are_refused(option, phantom_films):
    with pytest.raises(CT2XInputError, match=next(iter(option))):
        prepare_film(phantom_films[0], **{"role": "lateral", **option})


@pytest.mark.realdata
@pytest.mark.slow
def test_convention_levels_are_those_of_a_real_chest_ct(data_dir):
    from ct2x.io import load_ct

    films = official_films(ct_cube(load_ct(data_dir / "ct" / "chest_popi_phase00.nii.gz")))
    for role, film in zip(("pa", "lateral"), films):
        body = film[film > 0.05]
        assert np.allclose(np.percentile(body, [5, 50, 99]), CONVENTION_BODY_LEVELS[role], atol=0.01), role


@pytest.mark.realdata
@pytest.mark.slow
def test_real_pairs_facing_and_network_input(data_dir, capsys):
    with open(data_dir / PAIRS / "pairs.csv", newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    hits = []
    for row in rows:
        role = "pa" if row["view"] == "PA" else "lateral"
        prepared = prepare_film(data_dir / PAIRS / row["filename"], role, 128)
        image = prepared.image
        assert image.shape == (128, 128) and np.isfinite(image).all() and 0 <= image.min() and image.max() <= 1
        assert (image > 0.1).mean() > (0.85 if role == "pa" else 0.6), row["filename"]  # the body fills the square
        assert said(prepared, "not inverted (auto:"), row["filename"]
        if role == "lateral":
            facing = next(c for c in prepared.choices if c.startswith("anterior on the image")).split()[4]
            hits.append(facing == row["lateral_anterior_side_visual"])
    with capsys.disabled():
        print(f"\nlateral facing detected as judged by eye: {sum(hits)} of {len(hits)}")
    assert all(hits)
