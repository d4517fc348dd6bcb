"""The CT2X-GAN synthesis engine (`ct2x.synthesize`) and `ct2x synth`, with tiny model files saved here (random
weights) and the chest phantom; the key check: the engine's inputs at a pose are those `prepare_case` stores."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from ct2x import phantoms
from ct2x.cli.main import main
from ct2x.cli.synth import _note_untrained_poses
from ct2x.data.films import prepare_film
from ct2x.data.prepare_synth import SynthPreparation, prepare_case
from ct2x.errors import CT2XInputError, CT2XWarning
from ct2x.io import load_ct, save_ct, save_png
from ct2x.models import LoadedModel, ModelInfo, load, read_info, save_model
from ct2x.nets.ct2x_gan import PRESETS, CT2XGANGenerator
from ct2x.nets.ct2x_gan_discriminator import PoseDiscriminator, PoseDiscriminatorConfig
from ct2x.preprocess import x2ct_normalize
from ct2x.synthesize import (
    StyleCode,
    Synthesizer,
    load_style_code,
    model_conventions,
    preparation_of,
    save_style_code,
)

TINY = PRESETS["tiny32"]  # 32 px films from 16^3 CTs, 16 px MIPs
SETTINGS = SynthPreparation(voxel_mm=8.0, ct_voxels=16, film_px=32, mip_px=16)  # a 128 mm cube, as the paper's
ABLATED = dataclasses.replace(TINY, style_encoder=False, pose_attention=False)


def save_generator(path: Path, config=TINY, seed: int = 0, settings: SynthPreparation = SETTINGS, **inputs) -> Path:
    torch.manual_seed(seed)
    conventions = model_conventions(settings)
    conventions["inputs"].update(inputs)
    info = ModelInfo(kind="ct2x-gan", config=config.to_dict(), license="CC0-1.0", description="tiny, random",
                     **conventions)
    return save_model(path, CT2XGANGenerator(config), info)


def chest_film() -> np.ndarray:
    """(64, 64) uint8 bone-bright PA-like film: body, two dark lungs, a bright spine."""
    rows, columns = np.mgrid[0:64, 0:64] / 63.0
    film = np.where(((columns - 0.5) / 0.4) ** 2 + ((rows - 0.5) / 0.48) ** 2 <= 1, 0.55, 0.05)
    for centre in (0.3, 0.7):
        film[((columns - centre) / 0.12) ** 2 + ((rows - 0.4) / 0.25) ** 2 <= 1] = 0.3
    film[:, 30:34] = 0.9
    return np.round(film * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("synth")
    return {
        "model": save_generator(folder / "tiny.safetensors"),
        "ablated": save_generator(folder / "ablated.safetensors", ABLATED),
        "other": save_generator(folder / "other.safetensors", seed=1),
        "ct": save_ct(phantoms.chest(size=32, spacing_mm=10.0), folder / "chest.mha"),
        "style": save_png(chest_film(), folder / "style.png"),
    }


@pytest.fixture(scope="module")
def engine(files) -> Synthesizer:
    return Synthesizer(files["model"], load_ct(files["ct"]), style=files["style"])


def test_films_have_the_model_size_and_range_and_repeat(engine) -> None:
    film = engine.render(30.0)
    assert film.shape == (32, 32) and film.dtype == np.float32
    assert 0.0 <= film.min() and film.max() <= 1.0 and film.std() > 0
    assert np.array_equal(engine.render(30.0), film)  # the same pose twice: the same film
    assert not np.array_equal(engine.render(-30.0), film)


def test_the_ct_and_the_style_are_encoded_once(files, monkeypatch) -> None:
    network, info = load(files["model"])
    calls = {"encode_ct": 0, "style_code": 0}
    for name, method in [(name, getattr(network, name)) for name in calls]:
        def counted(*args, _name=name, _method=method):
            calls[_name] += 1
            return _method(*args)
        monkeypatch.setattr(network, name, counted)
    reports = []
    synthesizer = Synthesizer(LoadedModel(network, info), load_ct(files["ct"]), files["style"], progress=reports.append)
    for angle in range(-90, 91, 15):
        synthesizer.render(float(angle))
    assert calls == {"encode_ct": 1, "style_code": 1}
    assert reports == sorted(reports) and reports[-1] == 1.0 and len(reports) == 7  # cube, 5 E_CT layers, MIPs


def test_the_engine_inputs_are_those_of_the_prepared_case(files, engine) -> None:
    """Cube, camera labels and pose MIPs as `ct2x prepare synth` stores them for training."""
    case = prepare_case(files["ct"], SETTINGS)
    np.testing.assert_array_equal(engine.cube.hu, case["ct_hu"].astype(np.float32))
    np.testing.assert_array_equal(engine.cube.affine, case["affine"])
    for index, angle in enumerate(SETTINGS.angles_deg):
        view, label, mip = engine.inputs(angle)
        np.testing.assert_array_equal(label[0].numpy(), case["labels"][index])
        np.testing.assert_allclose(mip[0, 0].numpy(), case["mips"][index], rtol=0, atol=1e-6)
        assert view.detector.shape == (32, 32)


@pytest.mark.parametrize("config", ["model", "ablated"])
def test_the_cached_engine_computes_the_network(files, config) -> None:
    """The engine's caching and unfused modulation give the network's own content_code + synthesize."""
    network, info = load(files[config])
    style = files["style"] if network.config.style_encoder else None
    synthesizer = Synthesizer(LoadedModel(network, info), load_ct(files["ct"]), style)
    with torch.no_grad():
        ct = x2ct_normalize(torch.from_numpy(synthesizer.cube.hu))[None, None]
        style_code = None if style is None else torch.from_numpy(synthesizer.style_code().code)[None]
        for angle in (-60.0, 0.0, 45.0):
            _, label, mip = synthesizer.inputs(angle, 10.0)
            film = network.synthesize(network.content_code(network.encode_ct(ct), label, mip), style_code)
            expected = ((film[0, 0] + 1) / 2).clamp(0, 1).numpy()
            np.testing.assert_allclose(synthesizer.render(angle, 10.0), expected, rtol=0, atol=1e-5)
    fast = Synthesizer(LoadedModel(network, info), load_ct(files["ct"]), style, precision="bf16")
    assert np.abs(fast.render(45.0, 10.0) - expected).mean() < 0.02


def test_style_from_a_file_or_an_array_or_a_saved_code(files, engine, tmp_path) -> None:
    pixels = sitk.GetArrayFromImage(sitk.ReadImage(str(files["style"])))
    from_array = Synthesizer(files["model"], load_ct(files["ct"]), pixels)
    np.testing.assert_array_equal(from_array.style_code().code, engine.style_code().code)
    prepared = Synthesizer(files["model"], load_ct(files["ct"]), prepare_film(files["style"], "pa", 32))
    np.testing.assert_array_equal(prepared.render(30.0), engine.render(30.0))
    assert engine.style_code().source == str(files["style"])

    saved = save_style_code(tmp_path / "style.safetensors", engine.style_code())
    code = load_style_code(saved)
    assert code.model == engine.style_code().model and code.source == str(files["style"])
    np.testing.assert_array_equal(code.code, engine.style_code().code)
    np.testing.assert_array_equal(Synthesizer(files["model"], load_ct(files["ct"]), saved).render(30.0),
                                  engine.render(30.0))
    with pytest.raises(CT2XInputError, match="made by another model"):
        Synthesizer(files["other"], load_ct(files["ct"]), saved)
    with pytest.raises(CT2XInputError, match="numbers"):
        engine.set_style(StyleCode(np.zeros(3, np.float32), code.model))
    with pytest.raises(CT2XInputError, match="not a ct2x style code"):
        load_style_code(files["model"])


def test_wrong_models_and_styles_are_refused(files, tmp_path) -> None:
    ct = load_ct(files["ct"])
    config = PoseDiscriminatorConfig.scaled(32, width=1 / 16)
    discriminator = save_model(tmp_path / "d.safetensors", PoseDiscriminator(config),
                               ModelInfo(kind="ct2x-gan-discriminator", config=config.to_dict(), license="CC0-1.0"))
    with pytest.raises(CT2XInputError, match="not CT2X-GAN's generator"):
        Synthesizer(discriminator, ct, files["style"])
    with pytest.raises(CT2XInputError, match="needs a style"):
        Synthesizer(files["model"], ct)
    with pytest.raises(CT2XInputError, match="no style encoder"):
        Synthesizer(files["ablated"], ct, files["style"])
    broken = tmp_path / "broken.png"
    broken.write_text("not a film")
    with pytest.raises(CT2XInputError, match="style film"):
        Synthesizer(files["model"], ct, broken)
    with pytest.raises(CT2XInputError, match="film_px is 64"):
        Synthesizer(save_generator(tmp_path / "wrong.safetensors", settings=dataclasses.replace(SETTINGS, film_px=64)),
                    ct, files["style"])
    unknown = save_generator(tmp_path / "unknown.safetensors")
    network, info = load(unknown)
    info = dataclasses.replace(info, inputs={"preparation": {"ct_voxels": 16, "flux": 1}})
    with pytest.raises(CT2XInputError, match="unknown fields"):
        Synthesizer(LoadedModel(network, info), ct, files["style"])
    with pytest.raises(CT2XInputError, match="precision"):
        Synthesizer(files["model"], ct, files["style"], precision="fp8")


def test_a_model_file_without_preparation_takes_the_defaults_and_its_own_sizes(files) -> None:
    info = dataclasses.replace(read_info(files["model"]), inputs={})
    assert preparation_of(info) == dataclasses.replace(SynthPreparation(), ct_voxels=16, film_px=32, mip_px=16)
    assert preparation_of(read_info(files["model"])) == SETTINGS


def test_the_command_writes_one_film_per_angle(files, tmp_path, capsys) -> None:
    out = tmp_path / "films"
    assert main(["synth", str(files["ct"]), "--model", str(files["model"]), "--style", str(files["style"]),
                 "--angles", "-30:30:30", "--out", str(out), "--quiet"]) == 0
    stems = ["view_000_-030.0deg", "view_001_+000.0deg", "view_002_+030.0deg"]
    assert {p.name for p in out.iterdir()} == {f"{stem}{end}" for stem in stems for end in (".png", "_film.mha")} | \
        {"overview.png", "series.json", "style_code.safetensors"}
    film = sitk.ReadImage(str(out / f"{stems[2]}_film.mha"))
    engine = Synthesizer(files["model"], load_ct(files["ct"]), files["style"])
    spacing = engine.view(30.0).detector.pixel_spacing_mm  # the 298 mm sensor over 32 px
    assert film.GetSize() == (32, 32) and film.GetSpacing() == pytest.approx(spacing)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(film), engine.render(30.0))
    series = json.loads((out / "series.json").read_text(encoding="utf-8"))
    assert [v["geometry"]["primary_angle_deg"] for v in series["views"]] == [-30.0, 0.0, 30.0]
    assert series["created_by"].startswith("ct2x") and series["style"]["source"] == str(files["style"].resolve())
    assert "style film: read" in capsys.readouterr().err

    again = tmp_path / "again"  # the saved style code gives the same films
    assert main(["synth", str(files["ct"]), "--model", str(files["model"]), "--style",
                 str(out / "style_code.safetensors"), "--angles", "30", "--out", str(again), "--quiet"]) == 0
    assert (again / "view_000_+030.0deg.png").read_bytes() == (out / f"{stems[2]}.png").read_bytes()


@pytest.mark.parametrize("change, message", [
    ({"--style": None}, "needs a style"),
    ({"--angles": "30:-30:10"}, "--angles"),
    ({"--model": "ct"}, "--model"),
    ({"--style": "ct"}, "--style"),
    ({"--device": "tpu"}, "--device"),
])
def test_the_command_refuses_bad_input_and_writes_nothing(files, tmp_path, capsys, change, message) -> None:
    options = {"--model": str(files["model"]), "--style": str(files["style"]), "--angles": "0", "--out": None}
    options.update({key: str(files[value]) if value in files else value for key, value in change.items()})
    out = tmp_path / "films"
    options["--out"] = str(out)
    argv = ["synth", str(files["ct"]), "--quiet"] + [token for key, value in options.items() if value is not None
                                                     for token in (key, value)]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []


def test_the_command_says_when_poses_leave_the_trained_ones() -> None:
    with pytest.warns(CT2XWarning, match="primary 120 deg and secondary 20 deg lie outside"):
        _note_untrained_poses([0.0, 120.0], 20.0, SETTINGS.angles_deg)
