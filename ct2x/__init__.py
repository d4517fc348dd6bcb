"""CT2X core: CT volumes, C-arm geometry, a fast differentiable DRR projector and X-ray physics.

Slicer-free: imports neither ``slicer`` nor ``qt``; ``vtk`` only in the Slicer bridge module.
"""

__version__ = "0.1.0"
