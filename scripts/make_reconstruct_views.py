"""Draw CT2XReconstruct's round trip in real Slicer views, offscreen: a CT's films simulated in the model's geometry
as the network reads them and the reconstruction volume-rendered in 3-D (top), the reconstruction in the Red, Yellow
and Green slice views (bottom).

    python scripts/make_reconstruct_views.py --model RUN/model.safetensors --ct CT [--out PNG]

The module's logic does the work ("Simulate films", then "Reconstruct"); Slicer's own MRML, slice logics and
displayable managers draw it (slicer-core), as scripts/make_slicer_views.py does for CT2XSynth. Dev-time only: needs
slicer-core and Pillow.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from make_slicer_views import (  # noqa: E402
    VIEW_PX,
    camera_node,
    slice_view,
    snapshot,
    three_d_view,
    volume_rendering,
)
from slicer_stand_ins import slicer_application  # noqa: E402  (on sys.path through make_slicer_views)

SLICE_VIEWS = {"Red": "Axial", "Yellow": "Sagittal", "Green": "Coronal"}
GAP_PX = 4  # grey between the pictures


def slice_logic(slicer, name: str, orientation: str, volumeNode):
    """The logic of slice view `name` (the layout's, or a new one as Slicer's layout makes it), showing `volumeNode`."""
    widget = slicer.app.layoutManager().sliceWidget(name)
    if widget is not None:
        logic = widget.sliceLogic()
    else:
        logic = slicer.vtkMRMLSliceLogic()
        logic.SetMRMLApplicationLogic(slicer.app.applicationLogic())
        logic.SetMRMLScene(slicer.mrmlScene)
        logic.AddSliceNode(name)
    logic.GetSliceNode().SetOrientation(orientation)
    logic.GetSliceCompositeNode().SetBackgroundVolumeID(volumeNode.GetID())
    return logic


def front_view(slicer, volumeNode) -> np.ndarray:
    """The 3-D view looking at the volume from the patient's front, slightly from the left and above."""
    window, managers = three_d_view(slicer)
    bounds = np.zeros(6)
    volumeNode.GetRASBounds(bounds)
    center = (bounds[0::2] + bounds[1::2]) / 2.0
    camera = camera_node(managers)
    camera.SetFocalPoint(*center)
    camera.SetPosition(*(center + np.array([-260.0, 760.0, 220.0])))  # RAS mm: left, anterior, superior
    camera.SetViewUp(0.0, 0.0, 1.0)
    camera.ResetClippingRange()
    return snapshot(window)


def row(pictures, height: int) -> np.ndarray:
    """Pictures (H, W, 3) uint8 resized to `height` rows and set side by side, GAP_PX apart."""
    resized = [np.asarray(Image.fromarray(p).resize((round(p.shape[1] * height / p.shape[0]), height)))
               for p in pictures]
    gap = np.full((height, GAP_PX, 3), 128, dtype=np.uint8)
    return np.concatenate([part for picture in resized for part in (gap, picture)][1:], axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="CT2X model file of a films -> CT network")
    parser.add_argument("--ct", required=True, type=Path, help="the CT whose films are simulated (a file)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "reconstruct_slicer_views.png")
    args = parser.parse_args()
    with slicer_application() as slicer:
        import CT2XReconstruct
        from ct2x.reconstruct import network_input_picture

        logic = CT2XReconstruct.CT2XReconstructLogic()
        ctNode = slicer.util.loadVolume(str(args.ct))
        films = logic.simulateFilms(ctNode, args.model)
        networkInput = network_input_picture(logic.prepareJob(args.model, *films).films)  # (P, 2P + 2) uint8
        output = logic.reconstruct(args.model, *films)
        views = [slice_view(slice_logic(slicer, name, orientation, output))
                 for name, orientation in SLICE_VIEWS.items()]
        volume_rendering(slicer, output)
        views.append(front_view(slicer, output))
        height = VIEW_PX // 2
        networkInput = np.repeat(networkInput[..., None], 3, axis=2)  # grey -> RGB
        top, bottom = row([networkInput, views[-1]], height), row(views[:-1], height)
        width = max(top.shape[1], bottom.shape[1])
        canvas = np.full((2 * height + GAP_PX, width, 3), 128, dtype=np.uint8)
        canvas[:height, :top.shape[1]] = top
        canvas[height + GAP_PX:, :bottom.shape[1]] = bottom
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
