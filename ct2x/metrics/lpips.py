"""LPIPS between grey films: the `lpips` package's AlexNet metric (Zhang et al., CVPR 2018), built by its own code.

CT2X-GAN's reconstruction loss (eq. 8, `ct2x.nets.ct2x_gan_losses.reconstruction_loss`, which takes the metric as a
callable) and its evaluation use it. It lives with the metrics, not the networks: it is a fixed, pretrained
measurement, shared by training and evaluation, and `ct2x.nets` stays free of `lpips` and torchvision.

- Films: (N, 1, H, W) grey in `value_range`, by default [-1, 1] (the films of CT2X-GAN's networks); (0, 1) for films
  as `ct2x prepare synth` stores them. The package takes (N, 3, H, W) RGB in [-1, 1]: the range is mapped linearly
  onto [-1, 1] and the grey channel repeated three times (a grey picture in RGB). Values outside the range are not
  clipped, so the distance keeps its gradient there. AlexNet needs films of at least 32 x 32 pixels.
- Weights: `lpips.LPIPS(net="alex", version="0.1")` builds torchvision's AlexNet with its ImageNet weights, which
  torch.hub reads from `<torch hub dir>/checkpoints/alexnet-owt-7be5be79.pth` (`torch.hub.get_dir()`, normally
  `~/.cache/torch/hub`, or `$TORCH_HOME/hub`) or else downloads, and loads the package's own linear layers from the
  file it ships (`lpips/weights/v0.1/alex.pth`). Nothing can be downloaded on CT2X's machines, so both files are
  looked for first, and CT2XInputError names each one missing and where to put it.
- The network is built once per device and shared; it never trains (no gradients for its weights, always in
  evaluation mode), while gradients flow to the films.
- Dependency: `pip install "ct2x[lpips]"`. `lpips` imports torchvision, whose build must match the installed torch;
  it is imported here only, when the metric is first built, never on the path Slicer runs.
"""

from __future__ import annotations

import functools
from pathlib import Path
from types import ModuleType
from typing import List, Tuple

import torch
from torch import Tensor, nn

from ct2x.device import torch_device
from ct2x.errors import CT2XInputError

ALEXNET_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"  # torchvision's IMAGENET1K_V1 weights
LINEAR_WEIGHTS = Path("weights", "v0.1", "alex.pth")  # inside the lpips package


class GreyLPIPS(nn.Module):
    """LPIPS distances between grey films, through `network`: an LPIPS module (the `lpips` package's or one with its
    interface) that takes two (N, 3, H, W) RGB batches in [-1, 1] and returns (N, 1, 1, 1) distances."""

    def __init__(self, network: nn.Module, value_range: Tuple[float, float] = (-1.0, 1.0)):
        super().__init__()
        low, high = (float(v) for v in value_range)
        if not low < high:
            raise CT2XInputError(f"value_range {value_range}: give (low, high) with low below high, e.g. (0, 1)")
        self.network = network.eval().requires_grad_(False)
        self.low, self.high = low, high

    def forward(self, prediction: Tensor, target: Tensor) -> Tensor:
        """(N,) distances between films `prediction` and `target`, each (N, 1, H, W) in `value_range`."""
        if prediction.ndim != 4 or prediction.shape[1] != 1 or prediction.shape != target.shape:
            raise CT2XInputError(f"LPIPS: needs two (N, 1, H, W) grey film batches of one shape, got "
                                 f"{tuple(prediction.shape)} and {tuple(target.shape)}")
        distances = self.network(self._rgb(prediction), self._rgb(target))  # (N, 1, 1, 1)
        return distances.reshape(len(prediction))

    def _rgb(self, films: Tensor) -> Tensor:
        unit = (films - self.low) * (2.0 / (self.high - self.low)) - 1.0  # (N, 1, H, W) in [-1, 1]
        return unit.expand(-1, 3, -1, -1)  # (N, 3, H, W): grey as RGB

    def train(self, mode: bool = True) -> GreyLPIPS:
        super().train(mode)
        self.network.eval()  # a fixed metric: the dropout before LPIPS's linear layers stays off
        return self


def alexnet_lpips(value_range: Tuple[float, float] = (-1.0, 1.0), device: str = "cpu") -> GreyLPIPS:
    """The AlexNet LPIPS (version 0.1, the package's default) for grey films in `value_range`, on `device`.

    CT2XInputError when the `lpips` package (or torchvision) is not installed, or when the pretrained weights are not
    on this computer (naming each file and where to put it).
    """
    return GreyLPIPS(_alexnet_network(str(torch_device(device))), value_range)


@functools.lru_cache(maxsize=None)
def _alexnet_network(device: str) -> nn.Module:
    lpips = _import_lpips()
    missing = missing_weights(lpips)
    if missing:
        raise CT2XInputError("LPIPS needs pretrained weights that are not on this computer (nothing is downloaded "
                             "here): " + "; ".join(missing))
    network = lpips.LPIPS(net="alex", version="0.1", verbose=False)
    return network.to(device).eval().requires_grad_(False)


def missing_weights(lpips: ModuleType) -> List[str]:
    """For each weight file the AlexNet LPIPS loads and this computer lacks: its path and where to get it."""
    missing = []
    alexnet = Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_URL.rsplit("/", 1)[1]
    if not alexnet.is_file():
        missing.append(f"torchvision's AlexNet {alexnet} (download {ALEXNET_URL} on a computer with internet and "
                       "copy it there; $TORCH_HOME moves the folder)")
    linear = Path(lpips.__file__).parent / LINEAR_WEIGHTS
    if not linear.is_file():
        missing.append(f"lpips' linear layers {linear} (shipped with the package: reinstall it, pip install "
                       "--force-reinstall lpips)")
    return missing


def _import_lpips() -> ModuleType:
    try:
        import lpips
    except (ImportError, RuntimeError) as error:  # RuntimeError: a torchvision built for another torch
        raise CT2XInputError(f"LPIPS needs the `lpips` package and a torchvision built for torch {torch.__version__} "
                             f"({type(error).__name__}: {error}); pip install \"ct2x[lpips]\" with the torchvision "
                             "release made for this torch") from None
    return lpips
