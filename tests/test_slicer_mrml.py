"""CT2XSynth against Slicer's real MRML (slicer-core): logic, self-test and batch script on real nodes.

CTs are loaded as Slicer loads them (slicer.util.loadVolume -> vtkSlicerVolumesLogic -> vtkITK), films are checked
on the real volume, display and subject-hierarchy nodes, and batch films are read back by the real reader. What
slicer-core lacks (Qt-side pieces) is stood in by tests/slicer_stand_ins.py. Skipped when slicer-core is missing.
"""

from __future__ import annotations

import shutil
import types

import numpy as np
import pytest
import SimpleITK as sitk
import vtk
from vtk.util.numpy_support import vtk_to_numpy

try:
    import slicer_core  # noqa: F401
except ImportError as error:
    pytest.skip(f"slicer-core cannot be imported ({error}); pip install slicer-core (CPython 3.10-3.13)",
                allow_module_level=True)

from slicer_stand_ins import MODULE_DIR, run_python_script  # noqa: E402

from ct2x.errors import CT2XInputError  # noqa: E402
from ct2x.io import save_ct  # noqa: E402
from ct2x.volume import CTVolume  # noqa: E402

pytestmark = pytest.mark.slicer

SDD_MM, SID_MM = 1020.0, 530.0  # the module's defaults
BATCH_SCRIPT = MODULE_DIR / "Scripts" / "batch_synth.py"
MARKER_IJK = (24.5, 10.5, 12.5)  # centre of the conftest phantom's bone block (i 22..27, j 8..13, k 10..15)


@pytest.fixture
def module(slicer):
    """The CT2XSynth module file, imported as Slicer imports it (its folder on the module path)."""
    import CT2XSynth

    return CT2XSynth


def load_ct(slicer, volume: CTVolume, path):
    """Write a CT file and load it as Slicer does (File > Add Data, default options)."""
    save_ct(volume, path)
    return slicer.util.loadVolume(str(path))


def ijk_to_ras(slicer, volumeNode) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def beam_direction(primaryDeg: float, secondaryDeg: float) -> np.ndarray:
    """(3,) source -> detector, RAS: 0 deg runs anterior -> posterior, +90 right -> left, tilt to the head."""
    a, b = np.radians(primaryDeg), np.radians(secondaryDeg)
    return np.cos(b) * np.array([-np.sin(a), -np.cos(a), 0.0]) + np.sin(b) * np.array([0.0, 0.0, 1.0])


def ct_center_ras(volume: CTVolume) -> np.ndarray:
    return (volume.affine @ np.append((np.array(volume.shape_ijk) - 1) / 2.0, 1.0))[:3]


def marker_shadow_ras(slicer, film, volume: CTVolume) -> np.ndarray:
    """(3,) RAS mm where the ray from the film's source through the bone marker meets the film plane."""
    source = np.array([float(x) for x in film.GetAttribute("CT2X.sourceRAS").split()])
    marker = (volume.affine @ np.append(MARKER_IJK, 1.0))[:3]
    matrix = ijk_to_ras(slicer, film)
    normal, origin = matrix[:3, 2], matrix[:3, 3]
    return source + (marker - source) * ((origin - source) @ normal) / ((marker - source) @ normal)


def without_marker(volume: CTVolume) -> CTVolume:
    hu = volume.hu.copy()
    hu[10:16, 8:14, 22:28] = 40.0  # the bone block becomes soft tissue
    return CTVolume(hu=hu, affine=volume.affine, source="no marker")


# --- loading and the namespace ---------------------------------------------------------------------------------


def test_a_ct_loads_as_slicer_loads_it(slicer, ct_phantom, tmp_path):
    ct = load_ct(slicer, ct_phantom, tmp_path / "phantom.nrrd")

    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    np.testing.assert_allclose(ijk_to_ras(slicer, ct), ct_phantom.affine, atol=1e-9)  # LPS file -> RAS node
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(ct), ct_phantom.hu)
    assert ct.GetName() == "phantom"
    assert ct.GetDisplayNode().GetColorNodeID() == "vtkMRMLColorTableNodeGrey"
    assert shNode.GetItemParent(shNode.GetItemByDataNode(ct)) == shNode.GetSceneItemID()
    assert not hasattr(slicer, "getNode") and slicer.util.getNode("phantom") is ct  # real Slicer's names only


def test_a_ct_stored_as_hu_plus_1024_is_converted_with_a_notice(slicer, module, ct_phantom, tmp_path):
    sitk.WriteImage(sitk.Cast(ct_phantom.to_sitk() + 1024.0, sitk.sitkUInt16), str(tmp_path / "shifted.nrrd"))
    shifted = slicer.util.loadVolume(str(tmp_path / "shifted.nrrd"))
    plain = load_ct(slicer, ct_phantom, tmp_path / "plain.nrrd")
    films = [slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name) for name in ("shifted", "plain")]
    logic = module.CT2XSynthLogic()

    logic.process(shifted, films[0], 0.0, detectorSizePx=32, pixelSpacingMm=4.0)
    notices, status = logic.inputNotices, logic.lastStatus
    logic.process(plain, films[1], 0.0, detectorSizePx=32, pixelSpacingMm=4.0)

    assert len(notices) == 1 and "HU + 1024" in notices[0] and "Note: " in status
    assert logic.inputNotices == []
    np.testing.assert_allclose(*(slicer.util.arrayFromVolume(film) for film in films), atol=1e-4)


# --- films on real nodes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("primaryDeg, secondaryDeg", [(0.0, 0.0), (90.0, 0.0), (-30.0, 20.0)])
def test_film_lies_on_the_detector_plane_of_its_view(slicer, module, ct_phantom, tmp_path, primaryDeg, secondaryDeg):
    ct = load_ct(slicer, ct_phantom, tmp_path / "phantom.nrrd")
    film = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "film")

    module.CT2XSynthLogic().process(ct, film, primaryDeg, secondaryDeg, detectorSizePx=40, pixelSpacingMm=3.0)

    matrix = ijk_to_ras(slicer, film)
    beam = beam_direction(primaryDeg, secondaryDeg)
    source = ct_center_ras(ct_phantom) - SID_MM * beam
    center = (matrix @ [19.5, 19.5, 0.0, 1.0])[:3]  # the middle of 40 x 40 pixels
    normal = matrix[:3, 2] / np.linalg.norm(matrix[:3, 2])
    assert film.GetImageData().GetDimensions() == (40, 40, 1)
    assert film.GetImageData().GetScalarTypeAsString() == "float"
    np.testing.assert_allclose(film.GetSpacing(), (3.0, 3.0, 1.0), atol=1e-9)
    assert np.linalg.det(matrix[:3, :3]) > 0  # right-handed: columns x rows along the beam
    np.testing.assert_allclose(center, source + SDD_MM * beam, atol=1e-6)  # film centre = detector centre
    np.testing.assert_allclose(normal, beam, atol=1e-9)  # plane perpendicular to the central ray
    assert (center - source) @ normal == pytest.approx(SDD_MM)
    np.testing.assert_allclose([float(x) for x in film.GetAttribute("CT2X.sourceRAS").split()], source, atol=1e-3)
    assert float(film.GetAttribute("CT2X.primaryAngleDeg")) == primaryDeg
    assert float(film.GetAttribute("CT2X.secondaryAngleDeg")) == secondaryDeg


def test_ap_film_has_the_patients_left_on_the_right_and_the_lateral_faces_right(slicer, module, ct_phantom, tmp_path):
    ct = load_ct(slicer, ct_phantom, tmp_path / "phantom.nrrd")
    film = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "film")
    logic = module.CT2XSynthLogic()
    directions = {}
    for primaryDeg in (0.0, 90.0):
        logic.process(ct, film, primaryDeg, detectorSizePx=32, pixelSpacingMm=4.0)
        matrix = ijk_to_ras(slicer, film)
        directions[primaryDeg] = [matrix[:3, axis] / np.linalg.norm(matrix[:3, axis]) for axis in (0, 1)]

    left, anterior, inferior = [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, -1.0]
    np.testing.assert_allclose(directions[0.0][0], left, atol=1e-9)  # AP: image right = patient's left
    np.testing.assert_allclose(directions[0.0][1], inferior, atol=1e-9)  # head at the top
    np.testing.assert_allclose(directions[90.0][0], anterior, atol=1e-9)  # left lateral: the patient faces right
    np.testing.assert_allclose(directions[90.0][1], inferior, atol=1e-9)


@pytest.mark.parametrize("primaryDeg", [0.0, 60.0])
def test_a_bone_marker_projects_where_the_film_geometry_says(slicer, module, ct_phantom, tmp_path, primaryDeg):
    withMarker = load_ct(slicer, ct_phantom, tmp_path / "marker.nrrd")
    withoutMarker = load_ct(slicer, without_marker(ct_phantom), tmp_path / "plain.nrrd")
    logic = module.CT2XSynthLogic()
    films = []
    for ct in (withMarker, withoutMarker):
        film = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "film")
        logic.process(ct, film, primaryDeg, detectorSizePx=48, pixelSpacingMm=1.0)
        films.append(film)

    difference = slicer.util.arrayFromVolume(films[0])[0] - slicer.util.arrayFromVolume(films[1])[0]  # (H, W)
    rows, columns = np.nonzero(difference > 0.5 * difference.max())
    weights = difference[rows, columns]
    seen = np.array([columns @ weights, rows @ weights]) / weights.sum()  # (i, j) of the shadow's centre
    shadow = marker_shadow_ras(slicer, films[0], ct_phantom)
    expected = (np.linalg.inv(ijk_to_ras(slicer, films[0])) @ np.append(shadow, 1.0))[:3]  # film IJK
    assert expected[2] == pytest.approx(0.0, abs=1e-9)
    np.testing.assert_allclose(seen, expected[:2], atol=0.5)


def test_the_red_view_shows_the_ap_film_with_the_patients_left_on_the_right(slicer, module, ct_phantom, tmp_path):
    ct = load_ct(slicer, ct_phantom, tmp_path / "phantom.nrrd")  # the marker lies in the patient's left half
    film = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "film")

    module.CT2XSynthLogic().process(ct, film, 0.0, detectorSizePx=48, pixelSpacingMm=1.0)

    sliceLogic = slicer.app.layoutManager().sliceWidget("Red").sliceLogic()
    sliceNode = sliceLogic.GetSliceNode()
    xyToRas = slicer.util.arrayFromVTKMatrix(sliceNode.GetXYToRAS())
    width, height, _ = sliceNode.GetDimensions()
    connection = sliceLogic.GetImageDataConnection()
    connection.GetProducer().Update()
    view = vtk_to_numpy(connection.GetProducer().GetOutputDataObject(
        connection.GetIndex()).GetPointData().GetScalars()).reshape(height, width, -1)  # (y up, x right, RGBA)
    shadow = marker_shadow_ras(slicer, film, ct_phantom)
    x, y = np.round(np.linalg.inv(xyToRas) @ np.append(shadow, 1.0))[:2].astype(int)  # the shadow on screen

    assert sliceLogic.GetSliceCompositeNode().GetBackgroundVolumeID() == film.GetID()
    assert sliceNode.GetSliceVisible()  # also on its detector plane in 3-D
    np.testing.assert_allclose(xyToRas[:3, 0] / np.linalg.norm(xyToRas[:3, 0]), [-1, 0, 0], atol=1e-9)  # left
    np.testing.assert_allclose(xyToRas[:3, 1] / np.linalg.norm(xyToRas[:3, 1]), [0, 0, 1], atol=1e-9)  # up
    assert sliceNode.GetFieldOfView()[1] == pytest.approx(48.0)  # fitted to the film
    assert width / 2 < x < width and 0 < y < height
    assert view[y, x, 0] > view[y, width - 1 - x, 0] + 20  # the bone shadow is bright on the right, not the left


def test_film_display_shows_the_renderers_window_in_grey(slicer, module, ct_phantom, tmp_path):
    ct = load_ct(slicer, ct_phantom, tmp_path / "phantom.nrrd")
    film = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "film")

    radiograph = module.CT2XSynthLogic().process(ct, film, 30.0, detectorSizePx=32, pixelSpacingMm=4.0)

    display = film.GetDisplayNode()
    assert film.GetNumberOfDisplayNodes() == 1 and display.IsA("vtkMRMLScalarVolumeDisplayNode")
    assert display.GetColorNodeID() == "vtkMRMLColorTableNodeGrey"
    assert not display.GetAutoWindowLevel()
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == pytest.approx(radiograph.window)


# --- subject hierarchy -----------------------------------------------------------------------------------------


def test_films_and_series_are_placed_in_the_cts_study(slicer, module, ct_phantom, tmp_path):
    ct = load_ct(slicer, ct_phantom, tmp_path / "phantom.nrrd")
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    study = shNode.CreateStudyItem(shNode.CreateSubjectItem(shNode.GetSceneItemID(), "patient"), "study")
    shNode.SetItemParent(shNode.GetItemByDataNode(ct), study)
    logic = module.CT2XSynthLogic()

    film = logic.newFilmNode(ct, "X-ray")
    logic.process(ct, film, 0.0, detectorSizePx=32, pixelSpacingMm=4.0)
    series = logic.processSeries(ct, "-30:30:30", detectorSizePx=32, pixelSpacingMm=4.0)

    assert film.GetName() == "phantom X-ray"
    assert shNode.GetItemParent(shNode.GetItemByDataNode(film)) == study
    folders = {shNode.GetItemParent(shNode.GetItemByDataNode(node)) for node in series}
    assert len(folders) == 1
    folder = folders.pop()
    assert shNode.GetItemName(folder) == "phantom X-ray series -30:30:30"
    assert shNode.GetItemParent(folder) == study
    assert [node.GetName() for node in series] == [f"phantom X-ray {angle}deg" for angle in ("-30", "+0", "+30")]
    assert [node.GetAttribute("CT2X.primaryAngleDeg") for node in series] == ["-30", "0", "30"]


# --- transforms ------------------------------------------------------------------------------------------------


def test_a_linear_parent_transform_moves_the_detector_with_the_ct(slicer, module, ct_phantom, tmp_path):
    ct = load_ct(slicer, ct_phantom, tmp_path / "phantom.nrrd")
    logic = module.CT2XSynthLogic()
    still, moved = (slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name) for name in ("still", "moved"))
    logic.process(ct, still, 30.0, detectorSizePx=32, pixelSpacingMm=4.0)
    shift = np.array([20.0, -10.0, 5.0])
    transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(np.vstack([np.c_[np.eye(3), shift],
                                                                                   [0, 0, 0, 1]])))
    ct.SetAndObserveTransformNodeID(transform.GetID())

    logic.process(ct, moved, 30.0, detectorSizePx=32, pixelSpacingMm=4.0)

    expected = ijk_to_ras(slicer, still)
    expected[:3, 3] += shift
    np.testing.assert_allclose(ijk_to_ras(slicer, moved), expected, atol=1e-6)
    np.testing.assert_allclose(slicer.util.arrayFromVolume(moved), slicer.util.arrayFromVolume(still), atol=1e-5)


def test_a_non_linear_transform_is_refused(slicer, module, ct_phantom, tmp_path):
    ct = load_ct(slicer, ct_phantom, tmp_path / "phantom.nrrd")
    warp = vtk.vtkThinPlateSplineTransform()
    sourcePoints, targetPoints = vtk.vtkPoints(), vtk.vtkPoints()
    for point in [(0, 0, 0), (50, 0, 0), (0, 50, 0), (0, 0, 50)]:
        sourcePoints.InsertNextPoint(point)
        targetPoints.InsertNextPoint(point[0] + 5.0, point[1], point[2])
    warp.SetSourceLandmarks(sourcePoints)
    warp.SetTargetLandmarks(targetPoints)
    transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTransformNode", "warp")
    transform.SetAndObserveTransformToParent(warp)
    ct.SetAndObserveTransformNodeID(transform.GetID())
    film = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "film")

    with pytest.raises(CT2XInputError, match="non-linear transform; harden it first"):
        module.CT2XSynthLogic().process(ct, film, 0.0, detectorSizePx=32, pixelSpacingMm=4.0)
    assert film.GetImageData() is None


# --- the CT2X-GAN engine ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_gan(tmp_path_factory):
    """A tiny random CT2X-GAN model file (32^2 films from 16^3 CTs) on a 64 mm cube, and a style X-ray PNG."""
    import torch

    from ct2x.data.prepare_synth import SynthPreparation
    from ct2x.models import ModelInfo, build_network, save_model
    from ct2x.nets.ct2x_gan import PRESETS
    from ct2x.synthesize import model_conventions

    folder = tmp_path_factory.mktemp("gan")
    torch.manual_seed(0)
    config = PRESETS["tiny32"].to_dict()
    settings = SynthPreparation(voxel_mm=4.0, ct_voxels=16, film_px=32, mip_px=16)
    model = save_model(folder / "tiny_gan.safetensors", build_network("ct2x-gan", config),
                       ModelInfo(kind="ct2x-gan", config=config, license="Apache-2.0", **model_conventions(settings)))
    rows, columns = np.mgrid[0:48, 0:40]
    style = folder / "style.png"  # a bright body on a dark background, bone bright
    sitk.WriteImage(sitk.GetImageFromArray(np.where((np.abs(rows - 24) < 18) & (np.abs(columns - 20) < 14),
                                                    180 + (columns % 7) * 10, 10).astype(np.uint8)), str(style))
    return {"model": str(model), "style": str(style), "settings": settings}


def test_the_ct2x_gan_engine_renders_on_the_models_detector_plane(slicer, module, ct_phantom, tiny_gan, tmp_path):
    from ct2x.synthesize import Synthesizer

    ct = load_ct(slicer, ct_phantom, tmp_path / "phantom.nrrd")
    film = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "film")
    logic = module.CT2XSynthLogic()
    settings = dict(engine="CT2X-GAN", ganModel=tiny_gan["model"], style=tiny_gan["style"])

    logic.process(ct, film, 30.0, **settings)
    first = logic.synthesizer(ct, tiny_gan["model"], tiny_gan["style"])
    logic.process(ct, film, -60.0, 10.0, **settings)

    assert logic.synthesizer(ct, tiny_gan["model"], tiny_gan["style"]) is first  # the CT and the style encoded once
    expected = Synthesizer(tiny_gan["model"], ct_phantom, tiny_gan["style"])
    pixels = slicer.util.arrayFromVolume(film)[0]  # (rows, columns) of the film node
    np.testing.assert_allclose(pixels, expected.render(-60.0, 10.0), atol=1e-6)
    view = expected.view(-60.0, 10.0)
    matrix = ijk_to_ras(slicer, film)
    center = (matrix @ [15.5, 15.5, 0.0, 1.0])[:3]  # the middle of 32 x 32 pixels
    np.testing.assert_allclose([float(x) for x in film.GetAttribute("CT2X.sourceRAS").split()], view.source_ras,
                               atol=1e-3)
    assert (center - view.source_ras) @ (matrix[:3, 2] / np.linalg.norm(matrix[:3, 2])) == pytest.approx(
        tiny_gan["settings"].source_to_detector_mm)  # on the model's detector plane
    assert (film.GetAttribute("CT2X.engine"), film.GetAttribute("CT2X.model")) == ("CT2X-GAN", tiny_gan["model"])
    assert "CT2X-GAN" in logic.lastStatus


def test_the_ct2x_gan_engine_takes_the_style_from_a_loaded_picture(slicer, module, ct_phantom, tiny_gan, tmp_path):
    ct = load_ct(slicer, ct_phantom, tmp_path / "phantom.nrrd")
    picture = sitk.ReadImage(tiny_gan["style"])
    sitk.WriteImage(picture, str(tmp_path / "style.nrrd"))  # slicer-core reads no PNG: the same pixels as NRRD
    styleNode = slicer.util.loadVolume(str(tmp_path / "style.nrrd"), {"singleFile": True})
    fromFile, fromNode = (slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name) for name in "ab")
    logic = module.CT2XSynthLogic()

    logic.process(ct, fromFile, 0.0, engine="CT2X-GAN", ganModel=tiny_gan["model"], style=tiny_gan["style"])
    logic.process(ct, fromNode, 0.0, engine="CT2X-GAN", ganModel=tiny_gan["model"], style=styleNode)

    np.testing.assert_allclose(slicer.util.arrayFromVolume(fromNode), slicer.util.arrayFromVolume(fromFile),
                               atol=1e-6)
    with pytest.raises(CT2XInputError, match="choose a model file"):
        logic.process(ct, fromNode, 0.0, engine="CT2X-GAN", ganModel="", style=styleNode)


# --- parameter node --------------------------------------------------------------------------------------------


def test_parameter_node_defaults_and_ranges(slicer, module, ct_phantom, tmp_path):
    parameters = module.CT2XSynthLogic().getParameterNode()
    node = parameters.parameterNode
    defaults = {"inputVolume": None, "engine": "Physics DRR", "primaryAngleDeg": 0.0, "secondaryAngleDeg": 0.0,
                "liveUpdate": True, "seriesAngles": "-90:90:30", "spectrum": "60kV", "noisePhotons": 0,
                "sourceToDetectorMm": 1020.0, "sourceToIsocenterMm": 530.0, "detectorSizePx": 256,
                "pixelSpacingMm": 0.0, "device": "cpu", "ganModel": "", "styleVolume": None, "styleFile": "",
                "outputVolume": None}
    ranges = {"primaryAngleDeg": (-90.0, 90.0), "secondaryAngleDeg": (-45.0, 45.0), "noisePhotons": (0, 10_000_000),
              "sourceToDetectorMm": (100.0, 3000.0), "sourceToIsocenterMm": (50.0, 2900.0),
              "detectorSizePx": (16, 2048), "pixelSpacingMm": (0.0, 10.0)}

    assert (node.GetSingletonTag(), node.GetAttribute("ModuleName")) == ("CT2XSynth", "CT2XSynth")
    assert {name: getattr(parameters, name) for name in defaults} == defaults
    assert [node.GetParameter(name) for name in ("primaryAngleDeg", "liveUpdate", "detectorSizePx")] == [
        "0.0", "True", "256"]  # stored as Slicer's serializers store them, saved with the scene
    for name, (low, high) in ranges.items():
        setattr(parameters, name, low)
        setattr(parameters, name, high)
        step = 1 if isinstance(low, int) else 0.5
        for outside in (low - step, high + step):
            with pytest.raises(ValueError):
                setattr(parameters, name, outside)
    for name, good, bad in [("engine", "CT2X-GAN", "GAN"), ("spectrum", "120kV", "150kV")]:
        setattr(parameters, name, good)
        with pytest.raises(ValueError):
            setattr(parameters, name, bad)
    ct = load_ct(slicer, ct_phantom, tmp_path / "phantom.nrrd")
    parameters.inputVolume = ct
    assert module.CT2XSynthLogic().getParameterNode().inputVolume is ct  # one parameter node per scene
    with pytest.raises(TypeError):
        parameters.inputVolume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLModelNode")


# --- the module's self-test ------------------------------------------------------------------------------------


def test_the_modules_self_test_passes(slicer, module):
    parent = types.SimpleNamespace(path=str(MODULE_DIR / "CT2XSynth.py"))

    module.CT2XSynth(parent)  # as Slicer instantiates a scripted module
    slicer.selfTests["CT2XSynth"]()  # the module panel's "Test" button

    assert (parent.title, parent.categories) == ("CT to X-ray", ["Image Synthesis"])


# --- batch script ----------------------------------------------------------------------------------------------


def run_batch(slicer, monkeypatch, *arguments: str) -> int:
    """Run batch_synth.py as `Slicer --python-script` does; returns the application's exit status."""
    return run_python_script(slicer, monkeypatch, BATCH_SCRIPT, *arguments)


def test_batch_films_load_in_slicer_one_by_one_at_their_angles(slicer, module, ct_phantom, tmp_path, monkeypatch):
    inputs, output = tmp_path / "cts", tmp_path / "films"
    (inputs / "more").mkdir(parents=True)
    save_ct(ct_phantom, inputs / "chest.nrrd")
    save_ct(without_marker(ct_phantom), inputs / "more" / "plain.nii.gz")

    status = run_batch(slicer, monkeypatch, "--input", str(inputs), "--output", str(output), "--angles=-90:90:90",
                       "--size", "32", "--spacing", "4")

    names = [f"{ct}_{angle}deg" for ct in ("chest", "plain") for angle in ("-090.0", "+000.0", "+090.0")]
    assert status == 0
    assert sorted(p.relative_to(output).as_posix() for p in output.rglob("*.nrrd")) == sorted(
        f"{name.split('_')[0]}/{name}/{name}.nrrd" for name in names)
    assert slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 0  # the batch cleans up

    ct = slicer.util.loadVolume(str(inputs / "chest.nrrd"))
    rendered = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "rendered")
    logic = module.CT2XSynthLogic()
    for angle in (-90.0, 0.0, 90.0):
        name = f"chest_{angle:+06.1f}deg"
        logic.process(ct, rendered, angle, detectorSizePx=32, pixelSpacingMm=4.0)
        film = slicer.util.loadVolume(str(output / "chest" / name / f"{name}.nrrd"))  # Slicer's default options
        assert film.GetImageData().GetDimensions() == (32, 32, 1)  # one film, not a stack of the CT's films
        assert film.GetName() == name.split(".")[0]  # Slicer names a node after the file up to its first dot
        np.testing.assert_allclose(ijk_to_ras(slicer, film), ijk_to_ras(slicer, rendered), atol=1e-6)
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(film), slicer.util.arrayFromVolume(rendered))

    # Why each film has a folder: side by side, Slicer's reader takes two films for slices of one volume.
    sideBySide = tmp_path / "side_by_side"
    sideBySide.mkdir()
    for name in ("chest_+000.0deg", "chest_+090.0deg"):
        shutil.copy(output / "chest" / name / f"{name}.nrrd", sideBySide)
    assert slicer.util.loadVolume(str(sideBySide / "chest_+000.0deg.nrrd")).GetImageData().GetDimensions()[2] == 2


def test_batch_renders_ct2x_gan_films_with_a_model_and_a_style(slicer, module, ct_phantom, tiny_gan, tmp_path,
                                                                monkeypatch):
    from ct2x.synthesize import Synthesizer

    save_ct(ct_phantom, tmp_path / "chest.nrrd")

    status = run_batch(slicer, monkeypatch, "--input", str(tmp_path / "chest.nrrd"), "--output",
                       str(tmp_path / "films"), "--angles=0,60", "--model", tiny_gan["model"], "--style",
                       tiny_gan["style"])

    assert status == 0
    expected = Synthesizer(tiny_gan["model"], ct_phantom, tiny_gan["style"])
    for angle in (0.0, 60.0):
        name = f"chest_{angle:+06.1f}deg"
        film = slicer.util.loadVolume(str(tmp_path / "films" / "chest" / name / f"{name}.nrrd"))
        np.testing.assert_allclose(slicer.util.arrayFromVolume(film)[0], expected.render(angle), atol=1e-6)


def test_batch_reports_a_ct_it_cannot_read(slicer, mrml_log, tmp_path, monkeypatch, capsys):
    inputs = tmp_path / "cts"
    inputs.mkdir()
    (inputs / "broken.nrrd").write_text("not a volume")

    status = run_batch(slicer, monkeypatch, "--input", str(inputs), "--output", str(tmp_path / "films"))

    assert status == 1
    assert f"FAILED {inputs / 'broken.nrrd'}" in capsys.readouterr().err
    assert any("broken.nrrd" in message for message in mrml_log.messages)  # the reader's own report
    mrml_log.messages.clear()
