"""Forward projection (DRR line integrals and maximum-intensity projections) and backprojection."""

from .backprojection import backproject_view
from .reference import reference_projection
from .slicewarp import MODES, SliceWarpProjector, backproject, project, single_threaded_ops

__all__ = ["MODES", "SliceWarpProjector", "backproject", "backproject_view", "project", "reference_projection",
           "single_threaded_ops"]
