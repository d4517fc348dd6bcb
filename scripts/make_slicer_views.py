"""Draw CT2XSynth's output in real Slicer views, offscreen: the film in the Red slice view and, in 3-D, the CT's
volume rendering with the film on its detector plane.

    python scripts/make_slicer_views.py [--out docs/images/slicer_views.png] [--angle 60]

Slicer's own MRML, logics and displayable managers render (slicer-core, ``pip install slicer-core``); the module's
logic makes the film. The Qt-side pieces slicer-core lacks come from tests/slicer_stand_ins.py, and the views are
plain VTK render windows standing in for Slicer's Qt view widgets (drawn offscreen through EGL or OSMesa, so no
display is needed). The CT is the built-in chest phantom. Dev-time only: needs slicer-core and Pillow.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import vtk
from PIL import Image
from vtk.util.numpy_support import vtk_to_numpy

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from slicer_stand_ins import slicer_application  # noqa: E402

from ct2x.io import save_ct  # noqa: E402
from ct2x.phantoms import chest  # noqa: E402

VIEW_PX = 512  # each view is VIEW_PX x VIEW_PX
THREE_D_MANAGERS = ("vtkMRMLCameraDisplayableManager", "vtkMRMLViewDisplayableManager",
                    "vtkMRMLModelDisplayableManager", "vtkMRMLVolumeRenderingDisplayableManager")
# CT transfer functions: soft tissue faint and red, bone opaque and ivory (HU -> opacity, HU -> RGB)
OPACITY_HU = ((-1000.0, 0.0), (-200.0, 0.0), (40.0, 0.04), (250.0, 0.06), (400.0, 0.6), (1500.0, 0.9))
COLOR_HU = ((-1000.0, (0.0, 0.0, 0.0)), (40.0, (0.75, 0.35, 0.3)), (400.0, (0.95, 0.9, 0.8)),
            (1500.0, (1.0, 1.0, 1.0)))


def offscreen_window(renderer: vtk.vtkRenderer) -> vtk.vtkRenderWindow:
    """A render window drawn offscreen, with the interactor displayable managers expect of a view."""
    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetSize(VIEW_PX, VIEW_PX)
    window.AddRenderer(renderer)
    interactor = vtk.vtkGenericRenderWindowInteractor()
    interactor.SetRenderWindow(window)
    interactor.Initialize()
    return window


def snapshot(window: vtk.vtkRenderWindow) -> np.ndarray:
    """(H, W, 3) uint8 picture of a render window, row 0 at the top."""
    window.Render()
    grabber = vtk.vtkWindowToImageFilter()
    grabber.SetInput(window)
    grabber.SetInputBufferTypeToRGB()
    grabber.ReadFrontBufferOff()
    grabber.Update()
    image = grabber.GetOutput()
    width, height, _ = image.GetDimensions()
    return vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, 3)[::-1]


def slice_view(sliceLogic) -> np.ndarray:
    """A slice view: its slice logic's image (what qMRMLSliceView shows) drawn by an image actor."""
    sliceLogic.ResizeSliceNode(VIEW_PX, VIEW_PX)
    sliceLogic.FitSliceToAll()
    mapper = vtk.vtkImageMapper()
    mapper.SetInputConnection(sliceLogic.GetImageDataConnection())
    mapper.SetColorWindow(255)
    mapper.SetColorLevel(127.5)
    actor = vtk.vtkActor2D()
    actor.SetMapper(mapper)
    renderer = vtk.vtkRenderer()
    renderer.AddViewProp(actor)
    return snapshot(offscreen_window(renderer))


def volume_rendering(slicer, ctNode) -> None:
    """Show the CT volume-rendered (CPU ray casting), with transfer functions for bone and faint soft tissue."""
    scene = slicer.mrmlScene
    renderingLogic = slicer.vtkSlicerVolumeRenderingLogic()  # the Volume Rendering module: registers its nodes
    renderingLogic.SetMRMLApplicationLogic(slicer.app.applicationLogic())
    renderingLogic.SetMRMLScene(scene)
    displayNode = scene.AddNewNodeByClass("vtkMRMLCPURayCastVolumeRenderingDisplayNode")
    ctNode.AddAndObserveDisplayNodeID(displayNode.GetID())
    renderingLogic.UpdateDisplayNodeFromVolumeNode(displayNode, ctNode)  # adds its volume property node
    opacity, color = vtk.vtkPiecewiseFunction(), vtk.vtkColorTransferFunction()
    for hu, value in OPACITY_HU:
        opacity.AddPoint(hu, value)
    for hu, rgb in COLOR_HU:
        color.AddRGBPoint(hu, *rgb)
    volumeProperty = displayNode.GetVolumePropertyNode().GetVolumeProperty()
    volumeProperty.SetScalarOpacity(opacity)
    volumeProperty.SetColor(color)
    volumeProperty.SetInterpolationTypeToLinear()
    volumeProperty.ShadeOn()
    displayNode.SetVisibility(True)


def beam_outline(slicer, film) -> None:
    """Yellow lines from the X-ray source to the film's corners: the beam that made it."""
    source = [float(x) for x in film.GetAttribute("CT2X.sourceRAS").split()]
    ijkToRas = vtk.vtkMatrix4x4()
    film.GetIJKToRASMatrix(ijkToRas)
    width, height, _ = film.GetImageData().GetDimensions()
    points, lines = vtk.vtkPoints(), vtk.vtkCellArray()
    points.InsertNextPoint(source)
    for i, j in ((0, 0), (width - 1, 0), (width - 1, height - 1), (0, height - 1)):
        lines.InsertNextCell(2, [0, points.InsertNextPoint(ijkToRas.MultiplyPoint([i, j, 0.0, 1.0])[:3])])
    polyData = vtk.vtkPolyData()
    polyData.SetPoints(points)
    polyData.SetLines(lines)
    model = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLModelNode", "beam")
    model.SetAndObservePolyData(polyData)
    model.CreateDefaultDisplayNodes()
    model.GetDisplayNode().SetColor(1.0, 0.85, 0.2)
    model.GetDisplayNode().SetLineWidth(2.0)


def three_d_view(slicer) -> tuple:
    """A 3-D view drawn offscreen by Slicer's displayable managers: (its render window, the managers' group)."""
    scene, applicationLogic = slicer.mrmlScene, slicer.app.applicationLogic()
    renderer = vtk.vtkRenderer()
    window = offscreen_window(renderer)
    factory = slicer.vtkMRMLThreeDViewDisplayableManagerFactory.GetInstance()
    factory.SetMRMLApplicationLogic(applicationLogic)
    for manager in THREE_D_MANAGERS:
        if not factory.IsDisplayableManagerRegistered(manager):
            factory.RegisterDisplayableManager(manager)
    managers = slicer.vtkMRMLDisplayableManagerGroup()
    managers.Initialize(factory, renderer)
    applicationLogic.SetViewLogics(vtk.vtkCollection())
    viewLogic = slicer.vtkMRMLViewLogic()
    viewLogic.SetMRMLApplicationLogic(applicationLogic)
    viewLogic.SetMRMLScene(scene)
    applicationLogic.GetViewLogics().AddItem(viewLogic)
    viewNode = viewLogic.AddViewNode("1")
    viewNode.SetBoxVisible(False)
    viewNode.SetAxisLabelsVisible(False)
    managers.SetMRMLDisplayableNode(viewNode)
    return window, managers


def camera_node(managers):
    """The camera node of a `three_d_view`."""
    return managers.GetDisplayableManagerByClassName("vtkMRMLCameraDisplayableManager").GetCameraNode()


def beam_view(slicer, film) -> np.ndarray:
    """The 3-D view looking at the film's beam from the side."""
    window, managers = three_d_view(slicer)
    camera = camera_node(managers)
    source = np.array([float(x) for x in film.GetAttribute("CT2X.sourceRAS").split()])
    bounds = np.zeros(6)
    film.GetRASBounds(bounds)
    filmCenter = (bounds[0::2] + bounds[1::2]) / 2.0
    beam = (filmCenter - source) / np.linalg.norm(filmCenter - source)
    up = np.array([0.0, 0.0, 1.0])
    side = np.cross(beam, up)
    focal = source + 0.55 * (filmCenter - source)
    camera.SetFocalPoint(*focal)
    camera.SetPosition(*(focal + 2400.0 * (0.9 * side - 0.15 * beam + 0.4 * up)))
    camera.SetViewUp(*up)
    camera.ResetClippingRange()
    return snapshot(window)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "slicer_views.png")
    parser.add_argument("--angle", type=float, default=60.0, help="horizontal C-arm angle, deg (default 60)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder, slicer_application() as slicer:
        import CT2XSynth

        ctPath = Path(folder) / "chest.nrrd"
        save_ct(chest(size=96, spacing_mm=3.3), ctPath)
        ctNode = slicer.util.loadVolume(str(ctPath))
        film = CT2XSynth.CT2XSynthLogic.newFilmNode(ctNode, "X-ray")
        CT2XSynth.CT2XSynthLogic().process(ctNode, film, args.angle)  # shows it in Red and on its plane in 3-D
        volume_rendering(slicer, ctNode)
        beam_outline(slicer, film)
        red = slicer.app.layoutManager().sliceWidget("Red").sliceLogic()
        picture = np.concatenate([slice_view(red), beam_view(slicer, film)], axis=1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(picture).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
