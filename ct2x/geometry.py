"""C-arm geometry: source, detector and view poses in the patient's world frame.

Frames and units (this module owns the C-arm and image-display conventions):

- World: patient RAS, mm (+x patient's right, +y anterior, +z superior).
- Camera: right-handed, OpenCV-like. Origin at the X-ray source; +x along detector columns (image right),
  +y along detector rows (image down), +z along the principal ray, source -> detector centre.
- Image: array (rows, columns) = (height, width); row 0 is the top. Pixel (r, c) has its centre at index
  coordinates (c, r); continuous coordinates (used by the normalised intrinsics) put that centre at (c + 0.5, r + 0.5).
- Angles in degrees. Primary angle: rotation about the patient's superior-inferior axis. 0 deg is AP (source
  anterior, detector posterior); positive angles move the detector towards the patient's left (the LAO side), so
  +90 deg is a left lateral (beam right -> left, detector at the patient's left) and 180 deg is PA. Secondary angle:
  cranial (+) / caudal (-) tilt; positive moves the detector towards the head.
- Radiological display: images are shown as if the viewer faces the patient. For views with the source in front of
  the patient (|primary| <= 90 deg: AP, obliques, laterals) that is the view from the source, so an AP image has the
  patient's left on the image right and the head at the top; a left lateral shows the patient facing image right.
  For views with the source behind the patient (|primary| > 90 deg, e.g. PA) the image is mirrored left-right so that
  the patient's left stays on the image right. A mirrored view carries a negative focal length in its intrinsics, so
  projecting world points with its pose and intrinsics lands on the displayed pixel.

Defaults are DeepDRR's mobile C-arm, used by the CT2X-GAN paper: source-to-detector 1020 mm and source-to-isocentre
530 mm (the paper prints them as "SOD 1020, SDD 530"; an SDD shorter than the SOD is impossible, so the physical
reading is this one), sensor 298 mm wide (1536 px at 0.194 mm).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import CT2XInputError

MOBILE_CARM_SENSOR_MM = 1536 * 0.194  # DeepDRR MobileCArm sensor edge, mm
SOURCE_TO_DETECTOR_MM = 1020.0  # the paper's mobile C-arm (see above)
SOURCE_TO_ISOCENTER_MM = 530.0
DETECTOR_SIZE_PX = 256  # default detector pixels per side
# Plausibility bounds: no X-ray system exceeds them, so values beyond are typing errors, not geometry.
MAX_SOURCE_TO_DETECTOR_MM = 5000.0  # radiography rooms reach 1800 mm, long-distance set-ups a few metres
PIXEL_SPACING_RANGE_MM = (0.001, 100.0)  # micro-CT detectors to a coarse preview of a whole body
MAX_DETECTOR_PX = 16384  # per side; the largest flat panels have about 4300
MAX_VIEWS = 3600  # angles in one series: 0.1 deg steps round a full circle

#: The CT2X-GAN paper's seven views: primary -90..90 deg in 30 deg steps, secondary 0 deg.
SEVEN_VIEWS_DEG: Tuple[Tuple[float, float], ...] = tuple((float(a), 0.0) for a in range(-90, 91, 30))

#: The posterior-anterior + lateral pair used for biplanar reconstruction (X2CT-GAN, CVAA-GAN): (primary, secondary).
BIPLANAR_VIEWS_DEG: Dict[str, Tuple[float, float]] = {"PA": (180.0, 0.0), "lateral": (90.0, 0.0)}

BEAMS = ("cone", "parallel")


@dataclass(frozen=True)
class Detector:
    """Flat-panel detector: size in pixels and pixel spacing in mm (column spacing, row spacing)."""

    width_px: int = DETECTOR_SIZE_PX
    height_px: int = DETECTOR_SIZE_PX
    pixel_spacing_mm: Tuple[float, float] = (MOBILE_CARM_SENSOR_MM / DETECTOR_SIZE_PX,
                                             MOBILE_CARM_SENSOR_MM / DETECTOR_SIZE_PX)

    def __post_init__(self) -> None:
        for size in (self.width_px, self.height_px):
            if not (isinstance(size, (int, np.integer)) and 1 <= size <= MAX_DETECTOR_PX):
                raise CT2XInputError(f"detector size {self.width_px}x{self.height_px} px: each side must be a whole "
                                     f"number of pixels from 1 to {MAX_DETECTOR_PX}")
        low, high = PIXEL_SPACING_RANGE_MM
        if not all(low <= spacing <= high for spacing in self.pixel_spacing_mm):
            raise CT2XInputError(f"detector pixel spacing {self.pixel_spacing_mm} mm: each must lie between "
                                 f"{low:g} and {high:g} mm")

    @classmethod
    def square(cls, size_px: int, spacing_mm: Optional[float] = None) -> Detector:
        """A square detector; spacing defaults to the mobile C-arm's 298 mm sensor spread over `size_px`."""
        if not (isinstance(size_px, (int, np.integer)) and size_px >= 1):
            raise CT2XInputError(f"detector size {size_px!r} px: must be a whole number of pixels, at least 1")
        spacing = MOBILE_CARM_SENSOR_MM / size_px if spacing_mm is None else float(spacing_mm)
        return cls(int(size_px), int(size_px), (spacing, spacing))

    @property
    def shape(self) -> Tuple[int, int]:
        """Image array shape (rows, columns)."""
        return (self.height_px, self.width_px)

    def pixel_offsets_mm(self) -> Tuple[np.ndarray, np.ndarray]:
        """Pixel centres from the detector centre, mm: down the rows (H,) and along the columns (W,)."""
        du, dv = self.pixel_spacing_mm
        rows = (np.arange(self.height_px) + 0.5 - self.height_px / 2) * dv
        cols = (np.arange(self.width_px) + 0.5 - self.width_px / 2) * du
        return rows, cols


@dataclass(frozen=True)
class View:
    """One X-ray exposure: a camera pose in world RAS mm plus the detector it images on.

    `camera_to_world` is a 4x4 rigid transform (camera frame -> RAS mm, translation = source position). For a
    parallel beam the "source" is the centre of the plane the rays start from, `source_to_detector_mm` before the
    detector.
    """

    camera_to_world: np.ndarray  # (4, 4) float64, camera -> world RAS mm
    source_to_detector_mm: float = SOURCE_TO_DETECTOR_MM
    detector: Detector = field(default_factory=Detector)
    beam: str = "cone"
    mirrored: bool = False  # image columns run along -camera x (radiological display of posterior-source views)
    primary_deg: Optional[float] = None  # the C-arm angles this view was made from, if any
    secondary_deg: Optional[float] = None
    isocenter_ras: Optional[Tuple[float, float, float]] = None

    def __post_init__(self) -> None:
        pose = np.asarray(self.camera_to_world, dtype=np.float64)
        if pose.shape != (4, 4) or not np.all(np.isfinite(pose)):
            raise CT2XInputError(f"camera_to_world must be a finite 4x4 matrix, got shape {pose.shape}")
        rotation = pose[:3, :3]
        if not np.allclose(rotation.T @ rotation, np.eye(3), atol=1e-6) or np.linalg.det(rotation) < 0:
            raise CT2XInputError("camera_to_world must be a rigid transform: its 3x3 part is not a rotation")
        if self.beam not in BEAMS:
            raise CT2XInputError(f"beam {self.beam!r} is unknown; use one of {BEAMS}")
        if self.source_to_detector_mm <= 0:
            raise CT2XInputError(f"source-to-detector distance {self.source_to_detector_mm} mm must be positive")
        object.__setattr__(self, "camera_to_world", pose)

    @classmethod
    def from_pose(
        cls,
        camera_to_world: np.ndarray,
        source_to_detector_mm: float = SOURCE_TO_DETECTOR_MM,
        detector: Optional[Detector] = None,
        beam: str = "cone",
        mirrored: bool = False,
    ) -> View:
        """A view from a 4x4 camera-to-world pose (RAS mm) in the camera convention of this module."""
        return cls(np.array(camera_to_world, dtype=np.float64), float(source_to_detector_mm),
                   detector or Detector(), beam, mirrored)

    # --- frames -------------------------------------------------------------------------------------------
    @property
    def source_ras(self) -> np.ndarray:
        """(3,) source position, RAS mm."""
        return self.camera_to_world[:3, 3].copy()

    @property
    def principal_direction(self) -> np.ndarray:
        """(3,) unit vector along the principal ray, source -> detector, RAS."""
        return self.camera_to_world[:3, 2].copy()

    @property
    def column_direction(self) -> np.ndarray:
        """(3,) unit vector along which the image column index grows (image right), RAS."""
        return self.camera_to_world[:3, 0] * (-1.0 if self.mirrored else 1.0)

    @property
    def row_direction(self) -> np.ndarray:
        """(3,) unit vector along which the image row index grows (image down), RAS."""
        return self.camera_to_world[:3, 1].copy()

    @property
    def detector_center_ras(self) -> np.ndarray:
        """(3,) centre of the detector plane, RAS mm."""
        return self.source_ras + self.source_to_detector_mm * self.principal_direction

    def pixel_centers_ras(self) -> np.ndarray:
        """(H, W, 3) float64 centre of every detector pixel, RAS mm."""
        rows, cols = self.detector.pixel_offsets_mm()  # (H,), (W,) mm
        return (self.detector_center_ras
                + rows[:, None, None] * self.row_direction
                + cols[None, :, None] * self.column_direction)

    def rays(self) -> Tuple[np.ndarray, np.ndarray]:
        """Ray origins (H, W, 3) and unit directions (H, W, 3), RAS mm; each ray ends on its pixel centre."""
        pixels = self.pixel_centers_ras()
        if self.beam == "parallel":
            directions = np.broadcast_to(self.principal_direction, pixels.shape).copy()
            return pixels - self.source_to_detector_mm * directions, directions
        offsets = pixels - self.source_ras
        directions = offsets / np.linalg.norm(offsets, axis=-1, keepdims=True)
        return np.broadcast_to(self.source_ras, pixels.shape).copy(), directions

    def project_points(self, points_ras: np.ndarray) -> np.ndarray:
        """(N, 3) RAS mm -> (N, 2) image index coordinates (column, row); pixel (r, c) is centred at (c, r)."""
        points = np.atleast_2d(np.asarray(points_ras, dtype=np.float64))
        camera = (points - self.source_ras) @ self.camera_to_world[:3, :3]  # (N, 3) in camera axes, mm
        if self.beam == "cone":
            scale = self.source_to_detector_mm / camera[:, 2]
            x_mm, y_mm = camera[:, 0] * scale, camera[:, 1] * scale
        else:
            x_mm, y_mm = camera[:, 0], camera[:, 1]
        if self.mirrored:
            x_mm = -x_mm
        du, dv = self.detector.pixel_spacing_mm
        column = x_mm / du + self.detector.width_px / 2 - 0.5
        row = y_mm / dv + self.detector.height_px / 2 - 0.5
        return np.stack([column, row], axis=-1)

    # --- labels and records -------------------------------------------------------------------------------
    def normalized_intrinsics(self) -> np.ndarray:
        """(3, 3) intrinsics in image-size units (EG3D style): principal point (0.5, 0.5), focal length / size.

        For a mirrored view the focal length along x is negative. For a parallel beam the focal terms are the
        inverse detector size in mm (orthographic scale).
        """
        du, dv = self.detector.pixel_spacing_mm
        width_mm, height_mm = self.detector.width_px * du, self.detector.height_px * dv
        focal = self.source_to_detector_mm if self.beam == "cone" else 1.0
        return np.array([[(-1.0 if self.mirrored else 1.0) * focal / width_mm, 0.0, 0.5],
                         [0.0, focal / height_mm, 0.5],
                         [0.0, 0.0, 1.0]])

    def camera_label(self) -> np.ndarray:
        """The 25-number CT2X-GAN pose label: flattened 4x4 camera-to-world + flattened 3x3 normalised intrinsics.

        The translation is taken relative to the isocentre (RAS mm), so the label does not depend on where the
        CT sits in the scanner frame.
        """
        pose = self.camera_to_world.copy()
        if self.isocenter_ras is not None:
            pose[:3, 3] -= np.asarray(self.isocenter_ras)
        return np.concatenate([pose.ravel(), self.normalized_intrinsics().ravel()]).astype(np.float32)

    def to_dict(self) -> dict:
        """Everything needed to reproduce this view, JSON-serialisable (units in the key names)."""
        return {
            "frame": "world RAS mm; camera x = image right, y = image down, z = source -> detector",
            "beam": self.beam,
            "primary_angle_deg": self.primary_deg,
            "secondary_angle_deg": self.secondary_deg,
            "isocenter_ras_mm": None if self.isocenter_ras is None else [float(x) for x in self.isocenter_ras],
            "source_to_detector_mm": self.source_to_detector_mm,
            "source_to_isocenter_mm": (None if self.isocenter_ras is None else
                                       float(np.linalg.norm(self.source_ras - np.asarray(self.isocenter_ras)))),
            "detector_size_px": [self.detector.width_px, self.detector.height_px],
            "pixel_spacing_mm": [float(s) for s in self.detector.pixel_spacing_mm],
            "mirrored_for_radiological_display": self.mirrored,
            "camera_to_world": self.camera_to_world.tolist(),
            "source_ras_mm": self.source_ras.tolist(),
            "detector_center_ras_mm": self.detector_center_ras.tolist(),
            "image_column_direction_ras": self.column_direction.tolist(),
            "image_row_direction_ras": self.row_direction.tolist(),
            "camera_label_25": [float(x) for x in self.camera_label()],
        }


@dataclass(frozen=True)
class CArm:
    """A C-arm: distances in mm, a detector and the beam shape; `view()` turns angles into a `View`."""

    source_to_detector_mm: float = SOURCE_TO_DETECTOR_MM
    source_to_isocenter_mm: float = SOURCE_TO_ISOCENTER_MM
    detector: Detector = field(default_factory=Detector)
    beam: str = "cone"

    def __post_init__(self) -> None:
        if not 0 < self.source_to_detector_mm <= MAX_SOURCE_TO_DETECTOR_MM:
            raise CT2XInputError(
                f"source-to-detector {self.source_to_detector_mm} mm: must be positive and at most "
                f"{MAX_SOURCE_TO_DETECTOR_MM:g} mm (C-arms use about 1000 mm, chest radiography 1800 mm)")
        if not 0 < self.source_to_isocenter_mm < self.source_to_detector_mm:
            raise CT2XInputError(
                f"source-to-isocentre {self.source_to_isocenter_mm} mm must be positive and shorter than "
                f"source-to-detector {self.source_to_detector_mm} mm (the isocentre lies between source and detector)")
        if self.beam not in BEAMS:
            raise CT2XInputError(f"beam {self.beam!r} is unknown; use one of {BEAMS}")

    @property
    def magnification(self) -> float:
        """Geometric magnification at the isocentre (1 for a parallel beam)."""
        return self.source_to_detector_mm / self.source_to_isocenter_mm if self.beam == "cone" else 1.0

    def with_detector(self, size_px: int, spacing_mm: Optional[float] = None) -> CArm:
        """The same C-arm with a square detector of `size_px` pixels (default spacing: the 298 mm sensor)."""
        return replace(self, detector=Detector.square(size_px, spacing_mm))

    def view(self, primary_deg: float = 0.0, secondary_deg: float = 0.0,
             isocenter_ras: Sequence[float] = (0.0, 0.0, 0.0)) -> View:
        """The view at C-arm angles (degrees) about an isocentre (RAS mm); see the module docstring."""
        if not (np.isfinite(primary_deg) and np.isfinite(secondary_deg)):
            raise CT2XInputError(f"view angles must be finite, got {primary_deg}, {secondary_deg}")
        check_secondary_angle(secondary_deg)
        alpha, beta = math.radians(primary_deg), math.radians(secondary_deg)
        # At 0 deg the beam runs anterior -> posterior; the primary angle turns it about +z so that the detector
        # moves towards the patient's left (-x); the secondary angle tilts the detector towards the head (+z).
        horizontal = np.array([-math.sin(alpha), -math.cos(alpha), 0.0])  # beam direction before the tilt
        up = np.array([0.0, 0.0, 1.0])
        forward = math.cos(beta) * horizontal + math.sin(beta) * up  # camera z, source -> detector
        down = math.sin(beta) * horizontal - math.cos(beta) * up  # camera y, image down
        right = np.cross(down, forward)  # camera x = y cross z (right-handed)
        isocenter = np.asarray(isocenter_ras, dtype=np.float64)
        pose = np.eye(4)
        pose[:3, :3] = np.stack([right, down, forward], axis=1)
        pose[:3, 3] = isocenter - self.source_to_isocenter_mm * forward
        wrapped = (primary_deg + 180.0) % 360.0 - 180.0  # (-180, 180]
        return View(pose, self.source_to_detector_mm, self.detector, self.beam,
                    mirrored=abs(wrapped) > 90.0 + 1e-9, primary_deg=float(primary_deg),
                    secondary_deg=float(secondary_deg), isocenter_ras=tuple(float(x) for x in isocenter))


def check_secondary_angle(secondary_deg: float) -> None:
    """CT2XInputError unless the secondary (cranial/caudal) angle lies strictly between -90 and 90 degrees."""
    if not abs(secondary_deg) < 90:
        raise CT2XInputError(f"secondary angle {secondary_deg} deg: must lie strictly between -90 and 90")


def parse_angles(text: str) -> List[float]:
    """Angles in degrees from "START:STOP:STEP" (STOP included when reached) or "a,b,c" or one number.

    At most MAX_VIEWS finite angles; anything else raises CT2XInputError before a list is built.
    """
    usage = ("write START:STOP:STEP with a positive step and STOP >= START (e.g. -90:90:30), a comma-separated "
             "list (e.g. 0,90) or one number")
    try:
        numbers = [float(x) for x in text.split(":" if ":" in text else ",")]
    except ValueError:
        raise CT2XInputError(f"angles {text!r}: {usage}") from None
    if not all(math.isfinite(x) for x in numbers):
        raise CT2XInputError(f"angles {text!r}: angles must be finite numbers of degrees")
    if ":" not in text:
        count = len(numbers)
    elif len(numbers) != 3 or numbers[2] <= 0 or numbers[1] < numbers[0]:
        raise CT2XInputError(f"angles {text!r}: {usage}")
    else:
        start, stop, step = numbers
        steps = (stop - start) / step  # may overflow to inf
        count = int(math.floor(steps + 1e-9)) + 1 if steps < MAX_VIEWS else MAX_VIEWS + 1
    if count > MAX_VIEWS:
        raise CT2XInputError(f"angles {text!r}: more than {MAX_VIEWS} views; at most {MAX_VIEWS} fit in one "
                             "series (use a larger step)")
    return numbers if ":" not in text else [numbers[0] + i * numbers[2] for i in range(count)]
