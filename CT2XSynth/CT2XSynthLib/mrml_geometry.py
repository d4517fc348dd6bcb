"""The MRML side of CT2XSynth: a volume node -> CTVolume, a radiograph -> film node, subject hierarchy, views.

All array and matrix conversion happens in ``ct2x.vtk_bridge`` (tested with pytest on real vtkImageData); this
module is the handful of Slicer calls around it. Imported only after `dependencies.add_core_to_path()`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import slicer
import vtk

from ct2x.errors import CT2XInputError
from ct2x.volume import CTVolume
from ct2x.vtk_bridge import array_from_vtk_matrix, radiograph_to_vtk, volume_from_vtk, vtk_matrix_from_array

if TYPE_CHECKING:  # ct2x.drr imports torch
    from ct2x.drr import Radiograph


def ijk_to_world(volumeNode) -> np.ndarray:
    """(4, 4) voxel (i, j, k) -> world RAS mm of a volume node, including a linear parent transform."""
    ijkToRas = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(ijkToRas)
    affine = array_from_vtk_matrix(ijkToRas)
    transformNode = volumeNode.GetParentTransformNode()
    if transformNode is None:
        return affine
    if not transformNode.IsTransformToWorldLinear():
        raise CT2XInputError(
            f"{volumeNode.GetName()}: is under a non-linear transform; harden it first (Data module, right-click "
            "the volume, 'Harden transform').")
    toWorld = vtk.vtkMatrix4x4()
    transformNode.GetMatrixTransformToWorld(toWorld)
    return array_from_vtk_matrix(toWorld) @ affine


def ct_volume_from_node(volumeNode) -> CTVolume:
    """The CT of a scalar volume node as a CTVolume (HU copied to float32, KJI; affine to world RAS mm)."""
    return volume_from_vtk(volumeNode.GetImageData(), ijk_to_world(volumeNode), source=volumeNode.GetName())


def film_array(filmNode) -> np.ndarray:
    """The pixels of a film node: (H, W) grey or (H, W, C) colour, copied.

    A 2-D picture loaded in Slicer is a single-slice scalar (grey) or vector (RGB, RGBA) volume whose voxel (i, j, 0)
    is the file's row j, column i (Slicer's reader, checked by tests/test_slicer_reconstruct.py), and it is displayed
    that way up in the Red view: the array's rows and columns are the film as the user sees it.
    """
    name = filmNode.GetName()
    if filmNode.GetImageData() is None or filmNode.GetImageData().GetPointData().GetScalars() is None:
        raise CT2XInputError(f"{name}: has no image; load the film first")
    array = slicer.util.arrayFromVolume(filmNode)  # (K, H, W) or (K, H, W, C)
    if array.shape[0] != 1:
        raise CT2XInputError(f"{name}: is a volume of {array.shape[0]} slices; a film is one 2-D picture")
    return np.array(array[0])  # (H, W) or (H, W, C)


def update_film_node(filmNode, radiograph: Radiograph) -> None:
    """Put a radiograph's attenuation into a scalar volume node, on its detector plane, with its display window."""
    imageData, ijkToRas = radiograph_to_vtk(radiograph)  # float32 (W, H, 1); film voxel -> RAS mm
    wasModified = filmNode.StartModify()
    filmNode.SetIJKToRASMatrix(vtk_matrix_from_array(ijkToRas))  # spacing = detector pixel spacing, 1 mm thick
    filmNode.SetAndObserveImageData(imageData)
    view = radiograph.view
    filmNode.SetAttribute("CT2X.primaryAngleDeg", f"{view.primary_deg:g}")
    filmNode.SetAttribute("CT2X.secondaryAngleDeg", f"{view.secondary_deg:g}")
    filmNode.SetAttribute("CT2X.sourceRAS", " ".join(f"{x:.3f}" for x in view.source_ras))
    filmNode.EndModify(wasModified)
    if filmNode.GetDisplayNode() is None:
        filmNode.CreateDefaultDisplayNodes()
    displayNode = filmNode.GetDisplayNode()
    displayNode.SetAndObserveColorNodeID("vtkMRMLColorTableNodeGrey")  # radiograph look: attenuating = bright
    displayNode.AutoWindowLevelOff()
    displayNode.SetWindowLevelMinMax(*radiograph.window)


def place_next_to(node, referenceNode) -> None:
    """Put `node` beside `referenceNode` in the subject hierarchy (same parent item)."""
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    shNode.SetItemParent(shNode.GetItemByDataNode(node), shNode.GetItemParent(shNode.GetItemByDataNode(referenceNode)))


def new_folder_next_to(referenceNode, name: str) -> int:
    """A new subject-hierarchy folder beside `referenceNode`; returns its item ID."""
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    return shNode.CreateFolderItem(shNode.GetItemParent(shNode.GetItemByDataNode(referenceNode)), name)


def move_to_folder(node, folderItem: int) -> None:
    """Put `node` into a subject-hierarchy folder item."""
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    shNode.SetItemParent(shNode.GetItemByDataNode(node), folderItem)


def show_film(filmNode, sliceViewName: str = "Red") -> None:
    """Show the film in one slice view turned to face it (image right = screen right, row 0 on top), and that
    slice in the 3-D view, so the film also appears on its detector plane beside the CT."""
    layoutManager = slicer.app.layoutManager()
    if layoutManager is None:  # no main window (batch mode): nothing to show
        return
    ijkToRas = vtk.vtkMatrix4x4()
    filmNode.GetIJKToRASMatrix(ijkToRas)
    matrix = array_from_vtk_matrix(ijkToRas)
    right = matrix[:3, 0] / np.linalg.norm(matrix[:3, 0])  # (3,) image column direction, RAS
    up = -matrix[:3, 1] / np.linalg.norm(matrix[:3, 1])  # (3,) against the row direction: row 0 on top
    normal = np.cross(right, up)  # slice z; SetSliceToRASByNTP(orientation 0) makes slice y = normal x right = up
    width, height, _ = filmNode.GetImageData().GetDimensions()
    center = (matrix @ [(width - 1) / 2.0, (height - 1) / 2.0, 0.0, 1.0])[:3]  # (3,) RAS mm
    sliceWidget = layoutManager.sliceWidget(sliceViewName)
    sliceWidget.mrmlSliceNode().SetSliceToRASByNTP(*normal, *right, *center, 0)
    sliceWidget.mrmlSliceNode().SetSliceVisible(True)
    sliceWidget.sliceLogic().GetSliceCompositeNode().SetBackgroundVolumeID(filmNode.GetID())
    sliceWidget.sliceLogic().FitSliceToAll()
