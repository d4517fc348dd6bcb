"""The MRML side of CT2XReconstruct: a CTVolume <-> CT volume node, pictures, tables (film nodes -> arrays:
``CT2XSynthLib.mrml_geometry.film_array``, shared with CT2XSynth).

Array and matrix conversion is ``ct2x.vtk_bridge``'s and subject-hierarchy placement ``CT2XSynthLib.mrml_geometry``'s;
this module is the few Slicer calls around them. Imported only after `dependencies.add_core_to_path()`.
"""

from typing import Dict

import numpy as np
import slicer
from CT2XSynthLib.mrml_geometry import ijk_to_world

from ct2x.volume import CTVolume
from ct2x.vtk_bridge import volume_from_vtk, vtk_from_array, vtk_matrix_from_array

FILM_VIEW_ATTRIBUTE = "CT2X.filmView"  # "pa" or "lateral" on a film the module simulated in a model's own geometry
CT_WINDOW_HU = (1400.0, -500.0)  # window, level: Slicer's CT lung preset, lungs and mediastinum both readable
VOLUME_RENDERING_PRESET = "CT-Chest-Contrast-Enhanced"


def ct_volume_from_node(volumeNode, storedValues: str = "auto") -> CTVolume:
    """The CT of a scalar volume node (HU float32, KJI; affine voxel ijk -> world RAS mm, parent transform applied).

    storedValues: "auto" (HU, or HU + 1024 recognised and converted), or "hu" for a reconstruction this module made.
    """
    return volume_from_vtk(volumeNode.GetImageData(), ijk_to_world(volumeNode), source=volumeNode.GetName(),
                           stored_values=storedValues)


def update_ct_node(volumeNode, volume: CTVolume) -> None:
    """Put a CTVolume into a scalar volume node: float32 HU, KJI array -> IJK image, affine voxel ijk -> RAS mm."""
    wasModified = volumeNode.StartModify()
    volumeNode.SetIJKToRASMatrix(vtk_matrix_from_array(volume.affine))
    volumeNode.SetAndObserveImageData(vtk_from_array(volume.hu.astype(np.float32)))  # (K, J, I) -> dims (I, J, K)
    volumeNode.EndModify(wasModified)


def show_ct_window(volumeNode) -> None:
    """Grey colours and the CT window on the node's display node (created if missing)."""
    if volumeNode.GetDisplayNode() is None:
        volumeNode.CreateDefaultDisplayNodes()
    displayNode = volumeNode.GetDisplayNode()
    displayNode.SetAndObserveColorNodeID("vtkMRMLColorTableNodeGrey")
    displayNode.AutoWindowLevelOff()
    displayNode.SetWindowLevel(*CT_WINDOW_HU)


def update_picture_node(pictureNode, picture: np.ndarray, pixelMm: float = 1.0) -> None:
    """Put a picture (H, W) into a single-slice volume laid out as Slicer lays out a loaded 2-D image: voxel (i, j, 0)
    = row j, column i; IJK -> RAS diag(-1, -1, 1) times `pixelMm` (ITK's identity LPS direction in RAS), so the Red
    view shows it the right way up."""
    ijkToRas = np.diag([-pixelMm, -pixelMm, 1.0, 1.0])
    wasModified = pictureNode.StartModify()
    pictureNode.SetIJKToRASMatrix(vtk_matrix_from_array(ijkToRas))
    pictureNode.SetAndObserveImageData(vtk_from_array(np.ascontiguousarray(picture)[None]))  # (1, H, W)
    pictureNode.EndModify(wasModified)
    if pictureNode.GetDisplayNode() is None:
        pictureNode.CreateDefaultDisplayNodes()
    pictureNode.GetDisplayNode().SetAndObserveColorNodeID("vtkMRMLColorTableNodeGrey")


def update_metrics_table(tableNode, metrics: Dict[str, float]) -> None:
    """Two columns, "metric" and "value", one row per metric in the given order."""
    import vtk

    names, values = vtk.vtkStringArray(), vtk.vtkDoubleArray()
    names.SetName("metric")
    values.SetName("value")
    for name, value in metrics.items():
        names.InsertNextValue(name)
        values.InsertNextValue(float(value))
    table = vtk.vtkTable()
    table.AddColumn(names)
    table.AddColumn(values)
    tableNode.SetAndObserveTable(table)


def show_volume(volumeNode) -> None:
    """Show a volume in the slice views, fitted (nothing to show without a main window)."""
    if slicer.app.layoutManager() is None:
        return
    slicer.util.setSliceViewerLayers(background=volumeNode, fit=True)


def show_volume_rendering(volumeNode, preset: str = VOLUME_RENDERING_PRESET) -> None:
    """Volume-render the node in 3-D with a CT preset of Slicer's Volume Rendering module."""
    logic = slicer.modules.volumerendering.logic()
    displayNode = logic.CreateDefaultVolumeRenderingNodes(volumeNode)
    presetNode = logic.GetPresetByName(preset)
    if presetNode is not None:
        displayNode.GetVolumePropertyNode().Copy(presetNode)
    displayNode.SetVisibility(True)
