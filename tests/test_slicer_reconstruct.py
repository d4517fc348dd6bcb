"""CT2XReconstruct against Slicer's real MRML (slicer-core): logic, self-test and batch script on real nodes.

Films are loaded as Slicer loads them (slicer.util.loadVolume -> vtkITK) and reconstructed with tiny models made by
tests/test_reconstruct.py's fixtures: the back-projecting oracle (its output shows where the films put things) and an
untrained tiny X2CT-GAN (for progress and cancel). slicer-core's ITK has no PNG or JPEG reader, so films go to Slicer
as 2-D NRRD files holding the PNG's pixels: the same ITK index order Slicer's PNG reader gives. Skipped when
slicer-core is missing.
"""

from __future__ import annotations

import csv
import shutil
import threading
import time
import types

import numpy as np
import pytest
import SimpleITK as sitk
import vtk

try:
    import slicer_core  # noqa: F401
except ImportError as error:
    pytest.skip(f"slicer-core cannot be imported ({error}); pip install slicer-core (CPython 3.10-3.13)",
                allow_module_level=True)

import test_reconstruct as engine_tests  # noqa: E402  (registers the oracle's architecture)
from slicer_stand_ins import RECONSTRUCT_MODULE_DIR, run_python_script  # noqa: E402
from test_reconstruct import ORACLE, PX, BackprojectionOracle  # noqa: E402

from ct2x.data.films import prepare_film  # noqa: E402
from ct2x.data.x2ct_convention import cube_affine  # noqa: E402
from ct2x.errors import CT2XInputError  # noqa: E402
from ct2x.io import save_ct  # noqa: E402
from ct2x.metrics import METRICS  # noqa: E402
from ct2x.models import ModelInfo, save_model  # noqa: E402
from ct2x.reconstruct import compare_to_reference, network_input_picture  # noqa: E402
from ct2x.volume import CTVolume  # noqa: E402
from ct2x.vtk_bridge import vtk_from_array  # noqa: E402

pytestmark = pytest.mark.slicer
models = engine_tests.models  # fixtures: model files of the oracle and tiny X2CT-GANs; films of a chest with a marker
real_films = engine_tests.real_films

BATCH_SCRIPT = RECONSTRUCT_MODULE_DIR / "Scripts" / "batch_reconstruct.py"
SMALL_CUBE_MM = 160.0  # field of view of the small oracle: its films are simulated from a 160^3 mm^3 cube at 1 mm
SMALL_MARKER_RAS = np.array([-35.0, 20.0, 40.0])  # mm: the patient's left, anterior, superior


@pytest.fixture
def module(slicer):
    """The CT2XReconstruct module file, imported as Slicer imports it (its folder on the module path)."""
    import CT2XReconstruct

    return CT2XReconstruct


@pytest.fixture(scope="module")
def small_oracle(tmp_path_factory):
    """The back-projecting oracle as a model of 64^2 films -> 64^3 voxels over a 160 mm cube."""
    path = tmp_path_factory.mktemp("small") / "oracle160.safetensors"
    return save_model(path, BackprojectionOracle(), ModelInfo(
        kind=ORACLE, config={}, license="Apache-2.0", inputs={"films": ["pa", "lateral"], "film_px": PX},
        outputs={"volume": "(N, 1, D, H, W), X2CT normalisation", "voxels": PX, "field_of_view_mm": SMALL_CUBE_MM}))


def small_chest(marker: bool) -> CTVolume:
    """The chest phantom on a 160 mm cube about RAS (0, 0, 0), 64^3, with a dense sphere at SMALL_MARKER_RAS or
    without."""
    return engine_tests.chest_with_marker(marker, SMALL_CUBE_MM, SMALL_MARKER_RAS, radius_mm=8.0)


def load_film(slicer, picture: np.ndarray, path):
    """Write a film's pixels ((H, W) grey or (H, W, C) colour) as a 2-D image file and load it as Slicer does."""
    image = sitk.GetImageFromArray(picture, isVector=picture.ndim == 3)  # row 0 of the array = the file's top row
    sitk.WriteImage(image, str(path))
    return slicer.util.loadVolume(str(path))


def png_pixels(path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))  # (H, W) as stored in the PNG, row 0 on top


def ijk_to_ras(slicer, volumeNode) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def marker_ras(slicer, withMarker, without) -> np.ndarray:
    """RAS mm of the voxel the marker changes most between two reconstructed CT nodes."""
    difference = slicer.util.arrayFromVolume(withMarker) - slicer.util.arrayFromVolume(without)  # (K, J, I)
    k, j, i = np.unravel_index(np.argmax(difference), difference.shape)
    return (ijk_to_ras(slicer, withMarker) @ [i, j, k, 1.0])[:3]


def on_ras_axes(slicer, volumeNode):
    """(RAS mm of the voxel nearest -x -y -z, spacing, array (K, J, I) with each index along +x, +y, +z) of an
    axis-aligned volume node: the same for two nodes that hold the same volume, whatever their index order (Slicer's
    reader may reverse the slice order of a file: what matters is where each value lies)."""
    matrix = ijk_to_ras(slicer, volumeNode)
    array = slicer.util.arrayFromVolume(volumeNode)  # (K, J, I)
    assert np.count_nonzero(matrix[:3, :3]) == 3, "not axis-aligned"
    corner = np.zeros(3)
    for axis in range(3):  # i, j, k
        step = matrix[axis, axis]
        if step < 0:
            array = np.flip(array, axis=2 - axis)
            corner[axis] = array.shape[2 - axis] - 1
    origin = (matrix @ np.append(corner, 1.0))[:3]
    return origin, np.abs(np.diag(matrix)[:3]), array


def volume_nodes(slicer) -> int:
    return slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")


# --- films in ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3, 4], ids=["grey", "RGB", "RGBA"])
def test_a_film_reaches_the_logic_as_the_file_shows_it(slicer, module, tmp_path, channels):
    from CT2XSynthLib.mrml_geometry import film_array

    rows = np.linspace(0, 200, 20)[:, None] + np.linspace(0, 50, 30)[None, :]  # (20, 30): brighter downwards
    picture = np.round(np.repeat(rows[..., None], channels, axis=-1)).astype(np.uint8).squeeze()
    node = load_film(slicer, picture, tmp_path / "film.nrrd")

    pixels = film_array(node)

    assert node.GetClassName() == ("vtkMRMLScalarVolumeNode" if channels == 1 else "vtkMRMLVectorVolumeNode")
    assert node.GetImageData().GetDimensions() == (30, 20, 1)  # one slice: columns, rows
    np.testing.assert_array_equal(pixels, picture)  # row 0 is the file's top row, column 0 its left column
    # Slicer shows a loaded picture in the axial (Red) view: columns to screen right (RAS -x), rows down (RAS -y).
    np.testing.assert_allclose(ijk_to_ras(slicer, node)[:3, :2], [[-1, 0], [0, -1], [0, 0]])


def test_grey_rgb_and_file_films_give_the_same_ct_with_the_patients_left_on_the_left(slicer, module, models,
                                                                                       real_films, tmp_path):
    logic = module.CT2XReconstructLogic()
    cts = {}
    for prefix in ("", "plain "):
        grey = {view: png_pixels(real_films[prefix + view]) for view in ("pa", "lateral")}  # (H, W) uint8
        nodes = {view: load_film(slicer, grey[view], tmp_path / f"{prefix.strip()}{view}.nrrd") for view in grey}
        cts[prefix] = logic.reconstruct(models["oracle"], nodes["pa"], nodes["lateral"])
    rgb = {view: load_film(slicer, np.repeat(png_pixels(real_films[view])[..., None], 3, axis=-1),
                           tmp_path / f"rgb {view}.nrrd") for view in ("pa", "lateral")}
    fromRgb = logic.reconstruct(models["oracle"], rgb["pa"], rgb["lateral"])
    fromFiles = logic.reconstruct(models["oracle"], str(real_films["pa"]), str(real_films["lateral"]))

    x, y, z = marker_ras(slicer, cts[""], cts["plain "])
    assert x < -20 and y > 10 and z > 20  # the patient's left (RAS x < 0), anterior, superior, as in the CT
    assert rgb["pa"].IsA("vtkMRMLVectorVolumeNode")
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(fromFiles), slicer.util.arrayFromVolume(cts[""]))
    np.testing.assert_allclose(slicer.util.arrayFromVolume(fromRgb), slicer.util.arrayFromVolume(cts[""]),
                               atol=0.01)  # HU: grey from RGB by luminance, float rounding apart
    lateralChoices = cts[""].GetAttribute("CT2X.lateralPreprocessing").split("\n")
    assert lateralChoices[0] == "read volume lateral"
    assert any(line.startswith("anterior on the image right (auto:") for line in lateralChoices)  # mirrored


def test_preprocessing_overrides_reach_prepare_film(slicer, module, models, real_films, tmp_path):
    lateral = load_film(slicer, png_pixels(real_films["lateral"]), tmp_path / "lateral.nrrd")
    pa = load_film(slicer, png_pixels(real_films["pa"]), tmp_path / "pa.nrrd")
    logic = module.CT2XReconstructLogic()

    job = logic.prepareJob(str(models["oracle"]), pa, lateral, invert="no", crop="none", lateralFacing="left")

    expected = prepare_film(png_pixels(real_films["lateral"]), "lateral", PX, invert="no", crop="none",
                            facing="left")
    np.testing.assert_array_equal(job.films[1].image, expected.image)
    assert job.films[1].choices[1:] == expected.choices[1:]
    assert any(choice.startswith("anterior on the image left (as asked)") for choice in job.films[1].choices)
    preview = logic.updatePreviewNode(job)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(preview)[0], network_input_picture(job.films))
    assert "lateral: anterior on the image left (as asked)" in logic.describeJob(job)


@pytest.mark.parametrize("films, problem", [
    (("pa",), "give the lateral film too"),
    (("stack", "lateral"), "a film is one 2-D picture"),
    ((None,), "choose the PA film"),
])
def test_bad_inputs_are_refused_with_a_message_and_no_node(slicer, module, models, real_films, tmp_path, films,
                                                           problem):
    nodes = {view: load_film(slicer, png_pixels(real_films[view]), tmp_path / f"{view}.nrrd")
             for view in ("pa", "lateral")}
    nodes["stack"] = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "stack")
    nodes["stack"].SetAndObserveImageData(vtk_from_array(np.zeros((3, 8, 8), np.float32)))  # 3 slices
    before = volume_nodes(slicer)

    with pytest.raises(CT2XInputError, match=problem):
        module.CT2XReconstructLogic().reconstruct(models["biplanar"], *(nodes.get(view) for view in films))
    assert volume_nodes(slicer) == before


# --- the output node ------------------------------------------------------------------------------------------


def test_output_geometry_attributes_display_and_place_next_to_the_films(slicer, module, models, real_films, tmp_path):
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    study = shNode.CreateStudyItem(shNode.CreateSubjectItem(shNode.GetSceneItemID(), "patient"), "study")
    nodes = {view: load_film(slicer, png_pixels(real_films[view]), tmp_path / f"{view}.nrrd")
             for view in ("pa", "lateral")}
    for node in nodes.values():
        shNode.SetItemParent(shNode.GetItemByDataNode(node), study)
    logic = module.CT2XReconstructLogic()
    job = logic.prepareJob(str(models["oracle"]), nodes["pa"], nodes["lateral"])

    ct = logic.reconstruct(models["oracle"], nodes["pa"], nodes["lateral"])

    assert ct.GetName() == "pa CT (x2ct-backprojection-oracle)"
    assert shNode.GetItemParent(shNode.GetItemByDataNode(ct)) == study
    np.testing.assert_allclose(ijk_to_ras(slicer, ct), cube_affine(np.zeros(3), PX, 320.0), atol=1e-9)
    assert ct.GetImageData().GetDimensions() == (PX, PX, PX)
    assert ct.GetImageData().GetScalarTypeAsString() == "float"
    np.testing.assert_allclose(ct.GetSpacing(), [320.0 / PX] * 3)
    hu = slicer.util.arrayFromVolume(ct)
    assert -1024.0 <= hu.min() < hu.max() <= 1476.0  # HU, X2CT's range
    display = ct.GetDisplayNode()
    assert display.GetColorNodeID() == "vtkMRMLColorTableNodeGrey" and not display.GetAutoWindowLevel()
    assert (display.GetWindow(), display.GetLevel()) == (1400.0, -500.0)
    assert slicer.app.layoutManager().sliceWidget("Red").sliceLogic().GetSliceCompositeNode(
    ).GetBackgroundVolumeID() == ct.GetID()
    attributes = {name: ct.GetAttribute(name) for name in ct.GetAttributeNames()}
    assert attributes["CT2X.model"] == str(models["oracle"])
    assert attributes["CT2X.modelFile"] == str(models["oracle"])
    assert attributes["CT2X.modelKind"] == ORACLE
    assert attributes["CT2X.version"] and attributes["CT2X.modelCreatedBy"].startswith("ct2x ")
    assert attributes["CT2X.modelLicense"] == "Apache-2.0" and attributes["CT2X.modelSource"] == "{}"
    assert (attributes["CT2X.paFilm"], attributes["CT2X.lateralFilm"]) == ("pa", "lateral")
    for view, film in zip(("pa", "lateral"), job.films):
        assert attributes[f"CT2X.{view}Preprocessing"] == "\n".join(film.choices)
    assert attributes["CT2X.geometry"].startswith(f"CT of {PX}^3 voxels of 5 mm")


def test_films_from_files_give_a_ct_at_the_scene_level_and_fill_a_chosen_node(slicer, module, models, real_films):
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    chosen = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "my CT")
    chosen.SetAttribute("CT2X.singleFilm", "from an earlier reconstruction")
    logic = module.CT2XReconstructLogic()

    made = logic.reconstruct(models["oracle"], str(real_films["pa"]), str(real_films["lateral"]))
    filled = logic.reconstruct(models["oracle"], str(real_films["pa"]), str(real_films["lateral"]),
                               outputNode=chosen)

    assert made.GetName() == "marker_pa CT (x2ct-backprojection-oracle)"
    assert shNode.GetItemParent(shNode.GetItemByDataNode(made)) == shNode.GetSceneItemID()
    assert filled is chosen and chosen.GetName() == "my CT"
    assert chosen.GetAttribute("CT2X.singleFilm") is None and chosen.GetAttribute("CT2X.paFilm")
    assert "lateral: anterior on the image right (auto:" in logic.lastStatus  # the choices, shown to the user
    assert made.GetAttribute("CT2X.paFilm") == str(real_films["pa"])
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(chosen), slicer.util.arrayFromVolume(made))


# --- running: progress, cancel, GPU fall-back -------------------------------------------------------------------


def test_cancel_mid_run_leaves_no_node_and_an_existing_output_untouched(slicer, module, models, real_films):
    chosen = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "my CT")
    logic = module.CT2XReconstructLogic()
    cancel, seen = threading.Event(), []

    def cancelOnTheWay(fraction: float) -> None:
        seen.append(fraction)
        if fraction >= 0.3:
            cancel.set()

    before = volume_nodes(slicer)
    for output in (None, chosen):
        with pytest.raises(module.Cancelled):
            logic.reconstruct(models["biplanar"], str(real_films["pa"]), str(real_films["lateral"]),
                              outputNode=output, progress=cancelOnTheWay, cancel=cancel)
        cancel.clear()
    assert volume_nodes(slicer) == before
    assert chosen.GetImageData() is None and chosen.GetAttribute("CT2X.model") is None
    assert 0.3 <= max(seen) < 1.0  # it stopped on the way, at the report after the flag was set


def test_background_run_reports_progress_and_eta_and_cancels(slicer, module, models, real_films):
    from CT2XReconstructLib.background import BackgroundRun

    logic = module.CT2XReconstructLogic()
    job = logic.prepareJob(str(models["biplanar"]), str(real_films["pa"]), str(real_films["lateral"]))
    logic.computeVolume(job)  # the network loaded once
    fractions = []

    run = BackgroundRun(lambda progress: logic.computeVolume(
        job, progress=lambda f: (progress(f), fractions.append(f)))).start()
    while not run.done:
        time.sleep(0.01)
    volume = run.result()

    assert volume.hu.shape == (PX,) * 3
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0) and len(fractions) > 10
    assert run.fraction == pytest.approx(1.0) and run.eta_s() == pytest.approx(0.0)

    stopped = BackgroundRun(lambda progress: logic.computeVolume(job, progress=progress)).start()
    while stopped.fraction == 0.0 and not stopped.done:
        time.sleep(0.001)
    stopped.cancel()
    with pytest.raises(module.Cancelled):
        stopped.result()
    assert stopped.fraction < 1.0


def test_cuda_out_of_memory_falls_back_to_the_cpu_with_a_notice(slicer, module, models, real_films, monkeypatch):
    import torch

    import ct2x.reconstruct

    engine = ct2x.reconstruct.reconstruct
    devices = []

    def reconstructOnASmallGpu(model, *films, device="cpu", **options):
        devices.append(device)
        if device != "cpu":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return engine(model, *films, device=device, **options)

    logic = module.CT2XReconstructLogic()
    monkeypatch.setattr(ct2x.reconstruct, "reconstruct", reconstructOnASmallGpu)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(logic, "loadedModel", lambda modelFile, device: modelFile)

    ct = logic.reconstruct(models["oracle"], str(real_films["pa"]), str(real_films["lateral"]), device="cuda:0")

    assert devices == ["cuda:0", "cpu"]
    assert ct.GetImageData().GetDimensions() == (PX, PX, PX)
    assert logic.notices == ["the GPU (cuda:0) ran out of memory: reconstructed on the CPU instead"]
    assert "Note: the GPU (cuda:0) ran out of memory" in logic.lastStatus


# --- reference CT and simulated films -------------------------------------------------------------------------


def test_simulated_films_round_trip_puts_a_marker_on_the_patients_left(slicer, module, small_oracle, tmp_path):
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    logic = module.CT2XReconstructLogic()
    cts = {}
    for marker in (True, False):
        save_ct(small_chest(marker), tmp_path / f"chest{int(marker)}.nrrd")
        ctNode = slicer.util.loadVolume(str(tmp_path / f"chest{int(marker)}.nrrd"))
        films = logic.simulateFilms(ctNode, str(small_oracle))
        assert [film.GetName() for film in films] == [f"chest{int(marker)} PA film", f"chest{int(marker)} lateral film"]
        assert [film.GetAttribute("CT2X.filmView") for film in films] == ["pa", "lateral"]
        assert all(shNode.GetItemParent(shNode.GetItemByDataNode(film)) == shNode.GetItemParent(
            shNode.GetItemByDataNode(ctNode)) for film in films)
        assert films[0].GetImageData().GetDimensions() == (PX, PX, 1)
        cts[marker] = logic.reconstruct(str(small_oracle), *films)

    x, y, z = marker_ras(slicer, cts[True], cts[False])
    assert x < -15 and y > 5 and z > 15  # SMALL_MARKER_RAS: the patient's left, anterior, superior
    assert "used as it is" in cts[True].GetAttribute("CT2X.paPreprocessing")


def test_reference_ct_gives_the_metrics_table_and_a_difference_volume(slicer, module, small_oracle, tmp_path):
    save_ct(small_chest(True), tmp_path / "chest.nrrd")
    ctNode = slicer.util.loadVolume(str(tmp_path / "chest.nrrd"))
    logic = module.CT2XReconstructLogic()
    output = logic.reconstruct(str(small_oracle), *logic.simulateFilms(ctNode, str(small_oracle)))

    table, difference = logic.compareToReference(output, ctNode, makeDifference=True)

    from CT2XReconstructLib.mrml_nodes import ct_volume_from_node

    expected = compare_to_reference(ct_volume_from_node(output, "hu"), ct_volume_from_node(ctNode))
    rows = {table.GetTable().GetValue(r, 0).ToString(): table.GetTable().GetValue(r, 1).ToDouble()
            for r in range(table.GetNumberOfRows())}
    assert set(rows) == set(expected.metrics) and set(rows) <= set(METRICS)
    assert rows == pytest.approx(expected.metrics)
    assert table.GetName() == f"{output.GetName()} metrics"
    np.testing.assert_allclose(ijk_to_ras(slicer, difference), ijk_to_ras(slicer, output))
    np.testing.assert_allclose(slicer.util.arrayFromVolume(difference), expected.difference_hu, atol=1e-4)
    np.testing.assert_allclose(slicer.util.arrayFromVolume(difference), slicer.util.arrayFromVolume(output)
                               - expected.reference_cube.hu, atol=1e-3)


# --- models ---------------------------------------------------------------------------------------------------


def test_registry_models_are_listed_with_their_state_and_the_official_import_goes_to_the_cache(
        slicer, module, tmp_path, monkeypatch):
    import ct2x.models.x2ct_official

    monkeypatch.setenv("CT2X_CACHE_DIR", str(tmp_path / "cache"))
    imported = []
    monkeypatch.setattr(ct2x.models.x2ct_official, "import_official_checkpoint",
                        lambda checkpoint, variant, out: imported.append((checkpoint, variant, out)) or out)
    logic = module.CT2XReconstructLogic()

    choices = dict(logic.modelChoices())
    path = logic.importOfficialModel("90_net_G.pth", "x2ct-gan-biplanar")

    assert choices["x2ct-gan-biplanar"] == "x2ct-gan-biplanar (x2ct-biplanar, GPL-3.0, to import by hand)"
    assert "ct2x models import x2ct 90_net_G.pth --variant biplanar" in logic.howToGetModel("x2ct-gan-biplanar")
    assert imported == [("90_net_G.pth", "biplanar", tmp_path / "cache" / "models" / "x2ct-gan-biplanar.safetensors")]
    assert path.parent.is_dir()


# --- parameter node and self-test -----------------------------------------------------------------------------


def test_parameter_node_defaults_and_choices(slicer, module):
    parameters = module.CT2XReconstructLogic().getParameterNode()
    defaults = {"paVolume": None, "paFile": "", "lateralVolume": None, "lateralFile": "", "modelName": "",
                "modelFile": "", "invert": "auto", "crop": "auto", "lateralFacing": "auto", "device": "cpu",
                "precision": "fp32", "outputVolume": None, "referenceVolume": None, "makeDifference": False,
                "volumeRendering": False, "simulateVolume": None}

    assert {name: getattr(parameters, name) for name in defaults} == defaults
    assert parameters.parameterNode.GetAttribute("ModuleName") == "CT2XReconstruct"
    for name, good, bad in [("invert", "yes", "maybe"), ("crop", "none", "tight"), ("lateralFacing", "right", "up"),
                            ("precision", "bf16", "fp16")]:
        setattr(parameters, name, good)
        with pytest.raises(ValueError):
            setattr(parameters, name, bad)
    parameters.paFile, parameters.modelName = "pa.png", "x2ct-gan-biplanar"
    assert module.filmSources(parameters) == ("pa.png", None)
    assert module.modelSource(parameters) == "x2ct-gan-biplanar"


def test_the_modules_self_test_passes(slicer, module):
    parent = types.SimpleNamespace(path=str(RECONSTRUCT_MODULE_DIR / "CT2XReconstruct.py"))

    module.CT2XReconstruct(parent)  # as Slicer instantiates a scripted module
    slicer.selfTests["CT2XReconstruct"]()  # the module panel's "Test" button

    assert (parent.title, parent.categories) == ("X-ray to CT", ["Image Synthesis"])


# --- batch script ---------------------------------------------------------------------------------------------


def run_batch(slicer, monkeypatch, *arguments: str) -> int:
    """Run batch_reconstruct.py as `Slicer --python-script` does; returns the application's exit status."""
    return run_python_script(slicer, monkeypatch, BATCH_SCRIPT, *arguments)


def test_batch_pairs_csv_reconstructs_each_pair_and_reports_a_bad_one(slicer, module, models, real_films, tmp_path,
                                                                      monkeypatch, capsys):
    films = tmp_path / "films"
    films.mkdir()
    for key in ("pa", "lateral", "plain pa", "plain lateral"):
        shutil.copy(real_films[key], films / real_films[key].name)
    (films / "broken.png").write_text("not a film")
    with open(films / "pairs.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["name", "pa", "lateral"])
        writer.writerow(["marker", real_films["pa"].name, real_films["lateral"].name])
        writer.writerow(["broken", "broken.png", real_films["lateral"].name])
        writer.writerow(["plain", real_films["plain pa"].name, real_films["plain lateral"].name])
    output = tmp_path / "cts"

    status = run_batch(slicer, monkeypatch, "--pairs", films / "pairs.csv", "--model", models["oracle"],
                       "--output", output)

    notes = capsys.readouterr().err
    assert status == 1
    assert "[2/3] FAILED broken: " in notes and "Traceback" not in notes
    assert "2 of 3 pairs reconstructed" in notes and "lateral: anterior on the image right (auto:" in notes
    assert sorted(p.name for p in output.iterdir()) == ["marker.nrrd", "marker_network_input.png", "plain.nrrd",
                                                        "plain_network_input.png"]
    assert volume_nodes(slicer) == 0  # the batch cleans up
    cts = {name: slicer.util.loadVolume(str(output / f"{name}.nrrd")) for name in ("marker", "plain")}
    direct = module.CT2XReconstructLogic().reconstruct(models["oracle"], str(real_films["pa"]),
                                                                  str(real_films["lateral"]))
    for got, want in zip(on_ras_axes(slicer, cts["marker"]), on_ras_axes(slicer, direct)):
        np.testing.assert_allclose(got, want, atol=1e-4)  # the same CT at the same place
    assert marker_ras(slicer, cts["marker"], cts["plain"])[0] < -20  # the patient's left
    assert png_pixels(output / "marker_network_input.png").shape == (PX, 2 * PX + 2)


def test_batch_folders_are_paired_by_name(slicer, module, models, real_films, tmp_path, monkeypatch, capsys):
    paFolder, lateralFolder = tmp_path / "pa", tmp_path / "lateral"
    paFolder.mkdir()
    lateralFolder.mkdir()
    shutil.copy(real_films["pa"], paFolder / "case1-PA.png")
    shutil.copy(real_films["lateral"], lateralFolder / "case1_L.png")

    status = run_batch(slicer, monkeypatch, "--pa", paFolder, "--lateral", lateralFolder, "--model",
                       models["oracle"], "--output", tmp_path / "cts")

    assert status == 0, capsys.readouterr().err
    assert (tmp_path / "cts" / "case1.nrrd").is_file()
    shutil.copy(real_films["pa"], paFolder / "case2-PA.png")
    assert run_batch(slicer, monkeypatch, "--pa", paFolder, "--lateral", lateralFolder, "--model",
                     models["oracle"], "--output", tmp_path / "cts") == 2
    assert "films without a partner of the same name: case2" in capsys.readouterr().err


def test_batch_reads_a_csv_with_one_row_per_film(slicer, module, models, real_films, tmp_path, monkeypatch, capsys):
    rows = [("P01", "PA", real_films["pa"].name), ("P01", "L", real_films["lateral"].name)]
    for name, extra in (("films.csv", []), ("bad.csv", [("P02", "oblique", "x.png")])):
        with open(real_films["pa"].parent / name, "w", newline="") as file:
            csv.writer(file).writerows([("pair_id", "view", "filename"), *rows, *extra])

    status = run_batch(slicer, monkeypatch, "--pairs", real_films["pa"].parent / "films.csv", "--model",
                       models["oracle"], "--output", tmp_path)
    refused = run_batch(slicer, monkeypatch, "--pairs", real_films["pa"].parent / "bad.csv", "--model",
                        models["oracle"], "--output", tmp_path / "bad")

    notes = capsys.readouterr().err
    assert (status, refused) == (0, 2)
    assert (tmp_path / "P01.nrrd").is_file() and not (tmp_path / "bad").exists()
    assert "view 'oblique' of P02 is neither PA nor L" in notes


@pytest.mark.realdata
@pytest.mark.slow
def test_batch_on_the_real_pairs(slicer, module, models, data_dir, tmp_path, monkeypatch, capsys):
    pairs = data_dir / "xray" / "chest_pa_lateral" / "pairs.csv"
    if not pairs.is_file():
        pytest.skip(f"{pairs} is missing")

    status = run_batch(slicer, monkeypatch, "--pairs", pairs, "--model", models["biplanar"], "--output", tmp_path)

    notes = capsys.readouterr().err
    assert status == 0, notes
    with open(pairs, newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    facing = [row["lateral_anterior_side_visual"] for row in rows if row["view"] == "L"]  # as a person sees them
    assert len(list(tmp_path.glob("*.nrrd"))) == len(facing) >= 6
    for side in ("left", "right"):
        assert notes.count(f"lateral: anterior on the image {side} (auto:") == facing.count(side)
