"""X2CT-GAN's data convention, owned here: the CT cube, its array layout, and the two films that go with it.

The networks bake the geometry in: Connection-B copies the PA film along the CT's anterior-posterior axis and the
lateral film along its left-right axis, so film and CT axes must line up as follows (models.md §1.1, §1.7).

- CT: a cube of `CUBE_MM` (320 mm) about the CT's centre, `CT_VOXELS`^3 voxels (128^3, 2.5 mm), array (D, H, W):
  D superior -> inferior, H anterior -> posterior, W patient's right -> left. As a CTVolume its KJI array is exactly
  that (i = W, j = H, k = D; see `cube_affine`). Network input/output: HU normalised by `x2ct_normalize`.
- PA film ("xray1"): rows D (head at the top), columns W (patient's right on the image left: radiological display);
  the C-arm at 180 deg. Lateral film ("xray2"): rows D, columns H (anterior on the image left, the patient facing
  image left); the C-arm at -90 deg (source at the patient's left).
- Films as the official pipeline renders them: plastimatch's cone-beam DRR at source-to-isocentre 541 mm,
  source-to-detector 949 mm, 320^2 pixels over a 500 mm detector, of mu = 0.02/mm * max(0, 1 + HU/1000) (water
  0.02/mm), each divided by its own maximum, stored as 8-bit, resized to `FILM_PX`^2 and read back as [0, 1]; bone
  bright.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ct2x.drr import DRRRenderer, Physics
from ct2x.geometry import CArm, Detector
from ct2x.preprocess import resample_onto
from ct2x.projector import SliceWarpProjector
from ct2x.volume import CTVolume

CUBE_MM = 320.0  # edge of the CT cube, mm
CT_VOXELS = 128  # voxels per cube edge (2.5 mm)
FILM_PX = 128  # film pixels per side
PA_DEG = 180.0  # C-arm primary angle of the PA film ("xray1")
LATERAL_DEG = -90.0  # ... of the lateral film ("xray2"): anterior on the image left
OFFICIAL_CARM = CArm(949.0, 541.0, Detector.square(320, 500.0 / 320))  # plastimatch -g "541 949" -r 320 -z 500
WATER_MU_PER_MM = 0.02  # plastimatch's default attenuation of water
FILM_LEVELS = 255  # films are stored 8-bit


def cube_affine(center_ras: np.ndarray, voxels: int = CT_VOXELS, cube_mm: float = CUBE_MM) -> np.ndarray:
    """(4, 4) voxel ijk -> RAS mm of the cube: i runs right -> left (W), j anterior -> posterior (H), k down (D)."""
    spacing = cube_mm / voxels
    affine = np.diag([-spacing, -spacing, -spacing, 1.0])  # each index axis points along -x, -y, -z of RAS
    affine[:3, 3] = np.asarray(center_ras, dtype=np.float64) + spacing * (voxels - 1) / 2.0  # voxel (0, 0, 0)
    return affine


def ct_cube(volume: CTVolume, voxels: int = CT_VOXELS, cube_mm: float = CUBE_MM,
            center_ras: Optional[np.ndarray] = None) -> CTVolume:
    """The CT resampled (linear) onto the cube about its centre (or `center_ras`); outside the scan -1024 HU."""
    center = volume.center_ras if center_ras is None else np.asarray(center_ras, dtype=np.float64)
    return resample_onto(volume, cube_affine(center, voxels, cube_mm), (voxels,) * 3)


def linear_attenuation(hu: torch.Tensor) -> torch.Tensor:
    """plastimatch's HU -> mu in 1/mm: 0.02 * max(0, 1 + HU/1000)."""
    return WATER_MU_PER_MM * (1.0 + hu / 1000.0).clamp_min(0.0)


def official_films(cube: CTVolume, film_px: int = FILM_PX, carm: CArm = OFFICIAL_CARM,
                   angles_deg: Tuple[float, float] = (PA_DEG, LATERAL_DEG)) -> Tuple[np.ndarray, np.ndarray]:
    """(PA, lateral) films of the cube as the official pipeline makes them: (film_px, film_px) float32 in [0, 1].

    `angles_deg` (PA, lateral primary angles) may be jittered for augmentation; the isocentre is the cube's centre.
    """
    mu = linear_attenuation(torch.from_numpy(cube.hu))[None, None]  # (1, 1, K, J, I) 1/mm
    projector = SliceWarpProjector(mu, cube.affine)
    views = [carm.view(angle, 0.0, cube.center_ras) for angle in angles_deg]
    line_integrals = projector.project(views)[0, :, 0]  # (2, H, W) unitless
    return tuple(normalise_film(image, film_px) for image in line_integrals)


def ct_films(volume: CTVolume, cube_mm: float = CUBE_MM, film_px: int = FILM_PX) -> Tuple[np.ndarray, np.ndarray]:
    """(PA, lateral) films of a CT as `ct2x prepare recon` stores them: the CT on the cube about its centre at 1 mm
    voxels, then `official_films`; (film_px, film_px) float32 in [0, 1] each."""
    fine_cube = ct_cube(volume, voxels=int(round(cube_mm)), cube_mm=cube_mm)  # 1 mm voxels
    return official_films(fine_cube, film_px)


def physics_films(cube: CTVolume, physics: Physics, film_px: int = FILM_PX, carm: CArm = OFFICIAL_CARM,
                  angles_deg: Tuple[float, float] = (PA_DEG, LATERAL_DEG)) -> Tuple[np.ndarray, np.ndarray]:
    """(PA, lateral) films with polychromatic physics and noise (`ct2x.drr`), normalised like the official ones."""
    renderer = DRRRenderer(cube, carm, physics, sweep=False)
    return tuple(normalise_film(torch.from_numpy(renderer.render(angle).attenuation), film_px)
                 for angle in angles_deg)


def normalise_film(image: torch.Tensor, film_px: int = FILM_PX) -> np.ndarray:
    """A rendered (H, W) attenuation image -> the official film: / its maximum, 8-bit, resized, [0, 1] float32."""
    peak = image.max().clamp_min(1e-12)
    levels = torch.floor(image / peak * FILM_LEVELS)  # as `(x / max * 255).astype(uint8)`
    resized = F.interpolate(levels[None, None].float(), size=(film_px, film_px), mode="bilinear",
                            align_corners=True)[0, 0]  # (film_px, film_px), like scipy's zoom(order=1)
    return (resized / FILM_LEVELS).clamp(0.0, 1.0).numpy().astype(np.float32)
