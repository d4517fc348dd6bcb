"""CT2XReconstruct's dependencies are CT2XSynth's: the core package ``ct2x`` and torch from the PyTorch extension.

They are provided by ``CT2XSynthLib.dependencies``, shared by both modules rather than copied. Installed, both
modules' scripts lie in one folder on Slicer's sys.path; in a source checkout CT2XSynth is this module's sibling
folder, put on sys.path here when Slicer was not given it.
"""

import importlib.util
import sys
from pathlib import Path

SYNTH_DIR = Path(__file__).resolve().parents[2] / "CT2XSynth"  # source checkout: <repo>/CT2XSynth


def _shared():
    """CT2XSynthLib.dependencies."""
    if importlib.util.find_spec("CT2XSynthLib") is None and (SYNTH_DIR / "CT2XSynthLib").is_dir():
        sys.path.append(str(SYNTH_DIR))
    from CT2XSynthLib import dependencies

    return dependencies


def add_core_to_path() -> None:
    """Make ``import ct2x`` work (installed next to the modules, or at the checkout's root)."""
    _shared().add_core_to_path()


def torch_installed() -> bool:
    """Whether torch can be imported, without importing it."""
    return _shared().torch_installed()


def ensure_torch() -> None:
    """Install torch through the PyTorch extension on first use, after one confirm dialog (none in batch/testing)."""
    _shared().ensure_torch()
