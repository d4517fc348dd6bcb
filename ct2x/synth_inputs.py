"""Inputs of the CT2X-GAN networks made from core objects: the CT's values, camera labels and pose MIPs.

Kept out of `ct2x.nets`, whose networks take tensors only and never call the projector: data preparation, the
trainer (which may render at random poses on the fly) and the synthesis engine all make these inputs the same way,
here, from a `CTVolume` and `ct2x.geometry` views.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ct2x.geometry import View
from ct2x.preprocess import x2ct_normalize
from ct2x.projector import project
from ct2x.volume import CTVolume


def camera_labels(views: Sequence[View]) -> torch.Tensor:
    """(P, 25) float32 camera labels of `views`, one row per view: `View.camera_label()`, a flattened 4x4
    camera-to-world pose (world RAS mm, translation from the isocentre) then the flattened 3x3 normalised
    intrinsics (EG3D's layout)."""
    return torch.stack([torch.from_numpy(view.camera_label()) for view in views])


def pose_mips(ct: CTVolume, views: Sequence[View], device: str = "cpu") -> torch.Tensor:
    """(P, 1, H, W) float32 maximum-intensity projections of the CT in [0, 1] (`x2ct_normalize`: (HU + 1024) / 2500,
    clipped) along the rays of each view, in the views' radiological display (ct2x.geometry); H x W is the views'
    detector. The paper's "CT rotated to pose p, then projected" is the projection along the rays of the view at p;
    ours: the same cone-beam C-arm view as the DRR, so that MIP and DRR align pixel for pixel."""
    values = x2ct_normalize(torch.from_numpy(ct.hu)).to(device)[None, None]  # (1, 1, K, J, I) in [0, 1]
    return project(values, ct.affine, views, mode="max")[0].float()  # (P, 1, H, W); air and outside are 0
