"""Fixtures shared by all CT2X tests: a seeded generator, a small CT phantom and the real-data folder."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from ct2x.volume import CTVolume

PHANTOM_SHAPE_IJK = (40, 36, 32)
PHANTOM_SPACING_MM = (0.8, 0.9, 1.5)
PHANTOM_ORIGIN_RAS = (12.5, -30.0, 40.0)  # RAS mm of voxel (0, 0, 0)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20240607)


@pytest.fixture
def ct_phantom() -> CTVolume:
    """40x36x32 (I, J, K) CT: air -1000 HU, soft-tissue ellipsoid 40 HU, off-centre bone block 700 HU.

    Stored like most CTs: i runs to the patient's left, j posterior, k superior (LPS axes, RAS affine
    diag(-0.8, -0.9, 1.5)), with a non-zero origin.
    """
    i, j, k = PHANTOM_SHAPE_IJK
    kk, jj, ii = np.meshgrid(np.arange(k), np.arange(j), np.arange(i), indexing="ij")  # each (K, J, I) voxel index
    hu = np.full((k, j, i), -1000.0, dtype=np.float32)  # (K, J, I) HU, air
    ellipsoid = ((ii - 19.5) / 16) ** 2 + ((jj - 17.5) / 13) ** 2 + ((kk - 15.5) / 12) ** 2 <= 1.0
    hu[ellipsoid] = 40.0
    hu[10:16, 8:14, 22:28] = 700.0  # bone: k 10..15, j 8..13, i 22..27
    affine = np.diag([-PHANTOM_SPACING_MM[0], -PHANTOM_SPACING_MM[1], PHANTOM_SPACING_MM[2], 1.0])
    affine[:3, 3] = PHANTOM_ORIGIN_RAS
    return CTVolume(hu=hu, affine=affine, source="ct_phantom")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real-scan folder from CT2X_DATA_DIR; skips the test when it is unset or missing."""
    value = os.environ.get("CT2X_DATA_DIR")
    if not value or not Path(value).is_dir():
        pytest.skip("real data not available: set CT2X_DATA_DIR to the shared data folder")
    return Path(value)


# --- the Slicer modules on real MRML (tests marked "slicer", which skip without slicer-core) -------------------------
@pytest.fixture(scope="module")
def slicer_app():
    """slicer-core's ``slicer`` with a scene, logics and stand-ins; other tests' ``slicer`` modules set aside."""
    from slicer_stand_ins import slicer_application

    with slicer_application() as slicer:
        yield slicer


@pytest.fixture
def mrml_log():
    """VTK errors and warnings of the test; a test that expects some empties the list."""
    from slicer_stand_ins import MRMLLog

    log = MRMLLog()
    yield log
    log.close()
    assert log.messages == [], "MRML reported problems"


@pytest.fixture
def slicer(slicer_app, mrml_log):
    """The application with an empty scene (as a module self-test's setUp leaves it)."""
    slicer_app.mrmlScene.Clear()
    return slicer_app
