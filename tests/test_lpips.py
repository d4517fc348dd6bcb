"""The LPIPS wrapper for grey films: input conversion, caching, offline messages; the real `lpips` code when present.

No test downloads anything: the networks are built here (an LPIPS stand-in, or the real package on a test-built
AlexNet trunk), and the weight files are looked for in temporary folders.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

import ct2x.metrics.lpips as lpips_module
from ct2x.errors import CT2XInputError
from ct2x.metrics.lpips import ALEXNET_URL, LINEAR_WEIGHTS, GreyLPIPS, alexnet_lpips
from ct2x.nets.ct2x_gan_losses import reconstruction_loss


class StandInLPIPS(nn.Module):
    """LPIPS's interface, built here: unit-normalised features of a fixed 3x3 convolution, squared differences, a
    1x1 linear layer with dropout, averaged over space: (N, 3, H, W) twice -> (N, 1, 1, 1). Records its inputs."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.features = nn.Conv2d(3, 8, 3, padding=1)
        self.linear = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(8, 1, 1, bias=False))
        with torch.no_grad():
            self.features.weight.copy_(torch.randn(8, 3, 3, 3, generator=generator))
            self.linear[1].weight.copy_(torch.rand(1, 8, 1, 1, generator=generator))
        self.inputs = []

    def forward(self, in0: torch.Tensor, in1: torch.Tensor) -> torch.Tensor:
        self.inputs.append((in0.detach(), in1.detach()))
        features = [nn.functional.normalize(self.features(x), dim=1) for x in (in0, in1)]
        return self.linear((features[0] - features[1]).square()).mean(dim=(2, 3), keepdim=True)  # (N, 1, 1, 1)


@pytest.fixture(autouse=True)
def fresh_cache():
    lpips_module._alexnet_network.cache_clear()
    yield
    lpips_module._alexnet_network.cache_clear()


def films(n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed))  # (N, 1, S, S) in [0, 1]


def test_grey_films_become_three_equal_channels_in_minus_one_to_one() -> None:
    network = StandInLPIPS()
    metric = GreyLPIPS(network, value_range=(0.0, 1.0))
    prediction, target = films(), films(seed=1)
    distances = metric(prediction, target)
    assert distances.shape == (2,) and bool((distances > 0).all())
    in0, in1 = network.inputs[-1]
    assert in0.shape == (2, 3, 32, 32) and torch.equal(in0[:, 0], in0[:, 2]) and torch.equal(in1[:, 1], in1[:, 0])
    torch.testing.assert_close(in0[:, :1], 2 * prediction - 1)  # [0, 1] -> [-1, 1]
    GreyLPIPS(network)(2 * prediction - 1, 2 * target - 1)  # the default range is already [-1, 1]
    torch.testing.assert_close(network.inputs[-1][0], in0)
    assert float(metric(target, target).abs().max()) == 0


def test_metric_is_fixed_but_passes_gradients_to_the_films() -> None:
    metric = GreyLPIPS(StandInLPIPS())
    metric.train()  # as a training loop might call on everything it holds
    assert not metric.network.training and not any(p.requires_grad for p in metric.parameters())
    prediction = (2 * films() - 1).requires_grad_(True)
    target = 2 * films(seed=1) - 1
    first, again = metric(prediction, target), metric(prediction, target)
    torch.testing.assert_close(first, again)  # no dropout: the same distance each time
    loss = reconstruction_loss(prediction, target, metric, 10.0, 1.0)  # CT2X-GAN's eq. 8 takes it as it is
    loss.backward()
    assert prediction.grad is not None and float(prediction.grad.abs().sum()) > 0


def test_wrong_films_and_ranges_are_refused() -> None:
    metric = GreyLPIPS(StandInLPIPS())
    with pytest.raises(CT2XInputError, match=r"\(N, 1, H, W\)"):
        metric(torch.zeros(2, 3, 32, 32), torch.zeros(2, 3, 32, 32))
    with pytest.raises(CT2XInputError, match="one shape"):
        metric(films(2), films(3))
    with pytest.raises(CT2XInputError, match="low below high"):
        GreyLPIPS(StandInLPIPS(), value_range=(1.0, 0.0))


def fake_lpips_package(tmp_path, built: list) -> types.ModuleType:
    """A module standing in for the `lpips` package in `tmp_path`: records how LPIPS is built."""
    package = types.ModuleType("lpips")
    package.__file__ = str(tmp_path / "lpips" / "__init__.py")

    def build(**kwargs) -> nn.Module:
        built.append(kwargs)
        return StandInLPIPS()

    package.LPIPS = build
    return package


def test_missing_weights_are_named_with_where_to_put_them(tmp_path, monkeypatch) -> None:
    built: list = []
    monkeypatch.setitem(sys.modules, "lpips", fake_lpips_package(tmp_path, built))
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    with pytest.raises(CT2XInputError) as missing:
        alexnet_lpips()
    message = str(missing.value)
    alexnet = hub / "checkpoints" / "alexnet-owt-7be5be79.pth"
    assert str(alexnet) in message and ALEXNET_URL in message and "TORCH_HOME" in message
    assert str(tmp_path / "lpips" / LINEAR_WEIGHTS) in message and "reinstall" in message
    assert built == []  # nothing was built, so nothing tried to download

    alexnet.parent.mkdir(parents=True)
    alexnet.write_bytes(b"weights")
    with pytest.raises(CT2XInputError) as missing:
        alexnet_lpips()
    assert str(alexnet) not in str(missing.value) and "alex.pth" in str(missing.value)

    (tmp_path / "lpips" / LINEAR_WEIGHTS).parent.mkdir(parents=True)
    (tmp_path / "lpips" / LINEAR_WEIGHTS).write_bytes(b"weights")
    metric, again = alexnet_lpips(value_range=(0.0, 1.0)), alexnet_lpips()
    assert built == [{"net": "alex", "version": "0.1", "verbose": False}]  # the package's own AlexNet LPIPS, once
    assert metric.network is again.network and (metric.low, again.low) == (0.0, -1.0)
    assert metric(films(), films(seed=1)).shape == (2,)


def test_missing_package_says_what_to_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "lpips", None)  # import lpips raises ImportError
    with pytest.raises(CT2XInputError, match=r'ct2x\[lpips\]'):
        alexnet_lpips()


def alexnet_trunk() -> nn.Module:
    """torchvision's AlexNet layout (its `features`, 13 layers), random weights: what lpips slices into 5 stages."""
    model = nn.Module()
    model.features = nn.Sequential(
        nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(384, 256, 3, padding=1),
        nn.ReLU(inplace=True), nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2))
    return model


@pytest.mark.skipif(importlib.util.find_spec("lpips") is None, reason="the lpips package is not installed")
def test_real_lpips_package_on_a_test_built_alexnet(tmp_path, monkeypatch) -> None:
    """The package's own LPIPS code and its shipped linear layers, on an AlexNet trunk built here (torchvision
    replaced, so no ImageNet weights are needed and a torchvision built for another torch does not matter)."""
    torchvision = types.ModuleType("torchvision")
    torchvision.models = types.SimpleNamespace(alexnet=lambda pretrained=False, **kwargs: alexnet_trunk())
    monkeypatch.setitem(sys.modules, "torchvision", torchvision)
    for name in [name for name in sys.modules if name == "lpips" or name.startswith("lpips.")]:
        monkeypatch.delitem(sys.modules, name)  # imported again, against the stand-in torchvision
    alexnet = tmp_path / "checkpoints" / "alexnet-owt-7be5be79.pth"
    alexnet.parent.mkdir()
    alexnet.write_bytes(b"unused by the stand-in")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    metric = alexnet_lpips(value_range=(0.0, 1.0))
    import lpips

    shipped = torch.load(Path(lpips.__file__).parent / LINEAR_WEIGHTS, map_location="cpu")
    torch.testing.assert_close(metric.network.lin0.model[1].weight, shipped["lin0.model.1.weight"])
    prediction, target = films(size=64), films(size=64, seed=1)
    distances = metric(prediction, target)
    assert distances.shape == (2,) and bool((distances > 0).all())
    assert float(metric(target, target).abs().max()) < 1e-6
