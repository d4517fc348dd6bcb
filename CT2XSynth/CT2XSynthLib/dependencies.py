"""Python dependencies of CT2XSynth and CT2XReconstruct, provided on first use, never at Slicer start-up.

- ``ct2x``, the core package, ships with the extension: the top-level CMakeLists.txt installs it next to the module
  scripts (a folder on Slicer's sys.path). From a source checkout it sits at the repository root, which
  `add_core_to_path` appends to sys.path. It is never pip-installed from the network.
- ``torch`` comes through the PyTorch extension (PyTorchUtils, light-the-torch picks the build that matches the
  NVIDIA driver), after one confirm dialog.
- numpy and SimpleITK ship with Slicer; tqdm is used only by the ``ct2x`` command line.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

TORCH_REQUIREMENT = ">=1.13"  # what ct2x needs (pyproject.toml)
MODULE_DIR = Path(__file__).resolve().parents[1]  # <repo>/CT2XSynth, or the installed scripted-module folder


def add_core_to_path() -> None:
    """Make ``import ct2x`` work: installed, ct2x is next to the module; in a source checkout, one folder up."""
    if importlib.util.find_spec("ct2x") is not None:
        return
    for folder in (MODULE_DIR, MODULE_DIR.parent):
        if (folder / "ct2x" / "__init__.py").is_file():
            sys.path.append(str(folder))
            return
    raise ImportError(
        f"CT2X: the core package 'ct2x' was found neither next to the module ({MODULE_DIR}) nor at the repository "
        f"root ({MODULE_DIR.parent}). Reinstall the CT2X extension, or add the repository's CT2XSynth folder to "
        "Slicer's module paths from a complete checkout.")


def torch_installed() -> bool:
    """Whether torch can be imported, without importing it."""
    return importlib.util.find_spec("torch") is not None


def ensure_torch() -> None:
    """Install torch through the PyTorch extension if it is missing, after one confirm dialog.

    No dialog in testing or no-main-window (batch) mode. Raises RuntimeError when the PyTorch extension is
    missing, the user declines, or the installation fails.
    """
    if torch_installed():
        return
    import slicer

    try:
        import PyTorchUtils
    except ImportError:
        raise RuntimeError(
            "CT2X needs the PyTorch extension to install PyTorch. Install 'PyTorch' from the Extensions Manager, "
            "restart Slicer and try again.") from None
    interactive = not (slicer.app.testingEnabled() or slicer.app.commandOptions().noMainWindow)
    if interactive and not slicer.util.confirmOkCancelDisplay(
            "CT2X renders X-rays and reconstructs CTs with PyTorch, which is not installed yet.\n\n"
            "Install it now through the PyTorch extension? This downloads about 1-3 GB and may take several "
            "minutes.", detailedText=f"Packages: torch{TORCH_REQUIREMENT} (CPU or CUDA build chosen by "
                                     "light-the-torch for this computer's GPU driver)."):
        raise RuntimeError("CT2X needs PyTorch; its installation was cancelled.")
    torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                          torchVersionRequirement=TORCH_REQUIREMENT)
    if torch is None:
        raise RuntimeError("PyTorch could not be installed. Open the 'PyTorch Utils' module to install it manually.")
