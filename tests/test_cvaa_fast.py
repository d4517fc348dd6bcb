"""CVAA-GAN's fast inference path (ct2x/nets/cvaa.py, bench/RESULTS.md) computes the plain modules' function: each
part is compared with the plain computation it replaces, on random weights and inputs, and the whole generator with
its plain path (the one autograd takes), which must still reach every parameter."""

from __future__ import annotations

import dataclasses
from typing import Iterator, List, Tuple

import pytest
import torch
import torch.nn.functional as F

from ct2x.nets.cvaa import (
    PRESETS,
    CVAAConfig,
    CVAAGenerator,
    CVAAModule,
    FineDistillation,
    ViewAttention,
    lifted_volume,
)
from ct2x.nets.layers import ConvNormReLU, Lifted, LiftToVolume
from ct2x.nets.x2ct import LATERAL_TO_VOLUME, PA_TO_VOLUME

SWITCHES = [(True, True), (True, False), (False, True), (False, False)]  # (view_attention, fine_distillation)
CHANNELS = 3
NARROW = CVAAConfig.scaled(64, width=1 / 16, depth=0.25)  # decoder channels (1, 1, 2, 4, 8, 16): a quick backward


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value - reference).norm() / reference.norm())


@pytest.fixture(autouse=True)
def inference() -> Iterator[None]:
    torch.manual_seed(0)
    with torch.no_grad():
        yield


def skips(size: int, batch: int = 2) -> Tuple[Lifted, Lifted]:
    """A PA and a lateral lifted skip (N, CHANNELS, size, size, size) in their branch layouts, random weights."""
    return tuple(LiftToVolume(5, CHANNELS).eval().lift(torch.randn(batch, 5, size, size)) for _ in range(2))


def views(pa: Lifted, lateral: Lifted) -> Tuple[torch.Tensor, torch.Tensor]:
    """The skips as the plain path feeds them to the CVAA module: volumes permuted to NCDHW."""
    return pa.volume().permute(PA_TO_VOLUME), lateral.volume().permute(LATERAL_TO_VOLUME)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])
def test_lifted_volume_is_the_permuted_skip_volume(layout: torch.memory_format) -> None:
    pa, lateral = skips(5)
    for skip, to_volume, view in zip((pa, lateral), (PA_TO_VOLUME, LATERAL_TO_VOLUME), views(pa, lateral)):
        volume = lifted_volume(skip, to_volume, layout)
        assert volume.is_contiguous(memory_format=layout) and torch.equal(volume, view)


@pytest.mark.parametrize("size", [4, 5, 8])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])
def test_lifted_attention_weights_are_the_softmax_over_the_views(size: int, layout: torch.memory_format) -> None:
    attention = ViewAttention(CHANNELS, 3).eval()  # torch's default initialisation: weights far from zero
    pa, lateral = skips(size)
    deep = torch.randn(2, CHANNELS, size, size, size)  # (N, C, D, H, W)
    plain = attention(*views(pa, lateral), deep)  # (N, 2, D, H, W)
    fast = attention(pa, lateral, deep.contiguous(memory_format=layout))
    assert fast.shape == plain.shape and relative_error(fast, plain) < 1e-5


def test_fine_distillation_gate_is_the_plain_convolution() -> None:
    distillation = FineDistillation(CHANNELS)
    coarse, deep = torch.randn(2, CHANNELS, 6, 7, 8), torch.randn(2, CHANNELS, 6, 7, 8)
    gate = distillation.gate
    plain = torch.sigmoid(F.conv3d(torch.cat([coarse, deep], dim=1), gate.weight, gate.bias, padding=1)) * coarse
    assert relative_error(distillation(coarse, deep), plain) < 1e-5


@pytest.mark.parametrize("view_attention, fine_distillation", SWITCHES)
@pytest.mark.parametrize("size", [4, 8])
def test_compressed_is_compressing_the_cvaa_concatenation(view_attention: bool, fine_distillation: bool,
                                                          size: int) -> None:
    module = CVAAModule(CHANNELS, 3, view_attention, fine_distillation).eval()
    compress = ConvNormReLU(3, module.parts * CHANNELS, CHANNELS, 3, padding=1).eval()
    pa, lateral = skips(size)
    deep = torch.randn(2, CHANNELS, size, size, size)
    plain = compress(module(*views(pa, lateral), deep))
    assert module.fast_path(compress)
    fast = module.compressed(pa, lateral, deep, compress)
    assert fast.shape == plain.shape and fast.is_contiguous()
    assert relative_error(fast, plain) < 1e-5


def test_the_fast_path_is_for_inference_with_3x3x3_convolutions_only() -> None:
    module = CVAAModule(CHANNELS, 3, True, True)
    compress = ConvNormReLU(3, module.parts * CHANNELS, CHANNELS, 3, padding=1)
    assert module.fast_path(compress) and not module.fast_path(None)
    with torch.enable_grad():
        assert not module.fast_path(compress)
    assert not CVAAModule(CHANNELS, 5, True, True).fast_path(compress)  # 5^3 structure convolutions
    assert CVAAModule(CHANNELS, 5, False, True).fast_path(compress)  # ... which it does not use


def spy_on_compressed(monkeypatch: pytest.MonkeyPatch) -> List[int]:
    """Counts the calls of CVAAModule.compressed, to make sure the fast path ran."""
    calls: List[int] = []
    original = CVAAModule.compressed

    def counted(self: CVAAModule, *args, **kwargs) -> torch.Tensor:
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CVAAModule, "compressed", counted)
    return calls


@pytest.mark.parametrize("view_attention, fine_distillation", SWITCHES)
def test_generator_output_is_its_plain_paths(view_attention: bool, fine_distillation: bool,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    config = dataclasses.replace(PRESETS["tiny64"], view_attention=view_attention,
                                 fine_distillation=fine_distillation)
    generator = CVAAGenerator(config).eval()
    films = torch.rand(2, 1, 64, 64), torch.rand(2, 1, 64, 64)
    with torch.enable_grad():  # the plain path, as in training
        plain = generator(*films)
    calls = spy_on_compressed(monkeypatch)
    fast = generator(*films)
    assert len(calls) == 5  # every level but the coarsest
    assert relative_error(fast, plain) < 1e-5


def test_the_fast_path_runs_under_bf16_autocast_and_on_the_meta_device() -> None:
    generator = CVAAGenerator(PRESETS["tiny64"]).eval()
    films = torch.rand(1, 1, 64, 64), torch.rand(1, 1, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        volume = generator(*films)
    assert volume.shape == (1, 1, 64, 64, 64) and bool(volume.float().isfinite().all())
    with torch.device("meta"):  # the reconstruction engine's progress planner, which runs without gradients
        volume = CVAAGenerator(PRESETS["tiny64"]).eval()(torch.zeros(1, 1, 64, 64), torch.zeros(1, 1, 64, 64))
    assert volume.shape == (1, 1, 64, 64, 64)


def test_gradients_reach_every_parameter() -> None:
    generator = CVAAGenerator(NARROW).train()
    with torch.enable_grad():
        volume = generator(torch.rand(2, 1, 64, 64), torch.rand(2, 1, 64, 64))
        (volume - 0.5).square().mean().backward()
    missing = [name for name, parameter in generator.named_parameters()
               if parameter.grad is None or not bool(parameter.grad.isfinite().all())]
    assert not missing
    # the parameters only the fast path splits up: their gradients are not all zero
    for name in ("fusions.0.attention.mix.weight", "fusions.0.attention.structure.1.conv.weight",
                 "fusions.0.distillation.gate.weight", "levels.0.compress.conv.weight"):
        assert bool(dict(generator.named_parameters())[name].grad.abs().sum() > 0), name
