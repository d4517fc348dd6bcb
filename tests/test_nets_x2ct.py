"""X2CT-GAN networks on scaled configurations: shapes, modes, per-sample normalisation, gradients, configs."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from ct2x.errors import CT2XInputError
from ct2x.nets import (
    PRESETS,
    PatchDiscriminator3d,
    PatchDiscriminatorConfig,
    X2CTConfig,
    X2CTGenerator,
    X2CTSingleViewGenerator,
    conditional_input,
)
from ct2x.nets.patch_discriminator import build_patch_discriminator
from ct2x.nets.x2ct import build_generator, build_single_view_generator

TINY = PRESETS["tiny64"]  # 64^3, 1/8 of the official width, 1/4 of its depth
TINY_128 = X2CTConfig.scaled(128, width=1 / 16, depth=0.25)
TINY_DISCRIMINATOR = PatchDiscriminatorConfig(base_channels=4)


def films(batch: int, size: int, seed: int) -> torch.Tensor:
    """(batch, 1, size, size) uniform in [0, 1]."""
    return torch.rand(batch, 1, size, size, generator=torch.Generator().manual_seed(seed))


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value - reference).norm() / reference.norm())


@pytest.fixture(scope="module")
def generator() -> X2CTGenerator:
    torch.manual_seed(0)
    return X2CTGenerator(TINY).eval()


@pytest.mark.parametrize("config", [TINY, TINY_128], ids=["64", "128"])
def test_output_shapes(config: X2CTConfig) -> None:
    torch.manual_seed(0)
    size = config.input_size
    pa, lateral = films(1, size, 1), films(1, size, 2)
    with torch.no_grad():
        outputs = X2CTGenerator(config).eval().forward_all(pa, lateral)
        single = X2CTSingleViewGenerator(config).eval()(pa) if size == 64 else None
    for volume in (outputs.fused, outputs.pa, outputs.lateral) + ((single,) if single is not None else ()):
        assert volume.shape == (1, 1, size, size, size)
        assert volume.is_contiguous() and volume.min() >= 0  # ReLU output


def test_forward_is_the_fused_volume_of_forward_all(generator: X2CTGenerator) -> None:
    pa, lateral = films(2, 64, 1), films(2, 64, 2)
    with torch.no_grad():
        assert torch.equal(generator(pa, lateral), generator.forward_all(pa, lateral).fused)


def test_evaluation_is_deterministic(generator: X2CTGenerator) -> None:
    pa, lateral = films(2, 64, 3), films(2, 64, 4)
    with torch.no_grad():
        assert torch.equal(generator(pa, lateral), generator(pa, lateral))


def test_dropout_acts_only_in_training() -> None:
    torch.manual_seed(0)
    pa, lateral = films(1, 64, 5), films(1, 64, 6)
    network = X2CTGenerator(TINY)
    without_dropout = X2CTGenerator(dataclasses.replace(TINY, dropout=0.0))
    without_dropout.load_state_dict(network.state_dict())
    with torch.no_grad():
        first, second = network.train()(pa, lateral), network(pa, lateral)
        assert not torch.allclose(first, second)  # a new dropout mask each call
        evaluation = network.eval()(pa, lateral)
        assert torch.equal(without_dropout.eval()(pa, lateral), evaluation)  # no dropout in evaluation
        assert torch.equal(without_dropout.train()(pa, lateral), evaluation)  # and nothing else differs


def test_instance_norm_uses_each_samples_own_statistics(generator: X2CTGenerator) -> None:
    pa, lateral = films(3, 64, 7), films(3, 64, 8)
    with torch.no_grad():
        alone = generator(pa[:1], lateral[:1])
        with_second = generator(pa[:2], lateral[:2])
        with_third = generator(pa[[0, 2]], lateral[[0, 2]])
    for batched in (with_second, with_third):
        assert relative_error(batched[:1], alone) < 1e-4  # float32 rounding of batched convolutions: 2e-5
    assert relative_error(with_second[1], with_third[1]) > 0.1


def test_backward_gives_finite_gradients_to_every_parameter() -> None:
    torch.manual_seed(0)
    generator, discriminator = X2CTGenerator(TINY).train(), PatchDiscriminator3d(TINY_DISCRIMINATOR).train()
    pa, lateral = films(2, 64, 9), films(2, 64, 10)
    volumes = generator.forward_all(pa, lateral)  # each (2, 1, 64, 64, 64)
    logits = discriminator(conditional_input(pa, lateral, volumes.fused))  # (2, 1, 11, 11, 11)
    loss = ((logits - 1) ** 2).mean() + sum(volume.mean() for volume in volumes)
    loss.backward()
    for network in (generator, discriminator):
        for name, parameter in network.named_parameters():
            assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
            assert parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("size, patches", [(64, 11), (128, 19)])
def test_discriminator_patch_grid(size: int, patches: int) -> None:
    discriminator = PatchDiscriminator3d(TINY_DISCRIMINATOR).eval()
    with torch.no_grad():
        logits = discriminator(torch.rand(1, 3, size, size, size))
    assert logits.shape == (1, 1, patches, patches, patches)


def test_conditional_input_copies_pa_along_h_and_lateral_along_w() -> None:
    pa, lateral = torch.rand(2, 1, 4, 6), torch.rand(2, 1, 4, 5)  # (N, 1, D, W), (N, 1, D, H)
    volume = torch.rand(2, 1, 4, 5, 6)  # (N, 1, D, H, W)
    conditioned = conditional_input(pa, lateral, volume)
    assert conditioned.shape == (2, 3, 4, 5, 6)
    for h in range(5):
        assert torch.equal(conditioned[:, 0, :, h, :], pa[:, 0])
    for w in range(6):
        assert torch.equal(conditioned[:, 1, :, :, w], lateral[:, 0])
    assert torch.equal(conditioned[:, 2:], volume)
    with pytest.raises(ValueError, match="must fit the volume"):
        conditional_input(lateral, pa, volume)


def test_films_of_the_wrong_shape_are_refused(generator: X2CTGenerator) -> None:
    with pytest.raises(ValueError, match=r"pa film must be \(N, 1, 64, 64\)"):
        generator(films(1, 128, 0), films(1, 64, 0))
    with pytest.raises(ValueError, match="equal numbers"):
        generator(films(2, 64, 0), films(1, 64, 0))
    with pytest.raises(ValueError, match=r"lateral film must be"):
        generator(films(1, 64, 0), torch.rand(1, 2, 64, 64))


@pytest.mark.parametrize("config", [X2CTConfig(), *PRESETS.values(), PatchDiscriminatorConfig(), TINY_DISCRIMINATOR])
def test_configs_round_trip_through_json(config: object) -> None:
    data = json.loads(json.dumps(config.to_dict()))
    assert type(config).from_dict(data) == config


def test_official_config_is_the_default_and_scaled_configs_narrow_it() -> None:
    official = X2CTConfig()
    assert PRESETS["official"] == official
    assert official.encoder_channels() == (64, 128, 256, 512, 512, 704)
    scaled = X2CTConfig.scaled(64, width=0.25, depth=0.5)
    assert scaled.input_size == 64 and scaled.growth == 8 and scaled.decoder_channels == (4, 4, 8, 16, 32, 64)
    assert scaled.encoder_blocks == (3, 6, 12, 8, 3) and scaled.view_decoder_blocks == official.view_decoder_blocks


@pytest.mark.parametrize("changes, message", [
    ({"input_size": 100}, "multiple of 32"),
    ({"input_size": 32}, "input_size must be an integer >= 64"),
    ({"growth": 0}, "growth"),
    ({"encoder_blocks": (6, 12, 24, 16)}, "encoder_blocks must be a tuple of 5"),
    ({"fusion_blocks": (1, 1, 1, 1, 1, -1)}, "fusion_blocks"),
    ({"dropout": 1.0}, "dropout"),
    ({"base_channels": True}, "base_channels"),
])
def test_invalid_configs_are_refused(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        X2CTConfig(**changes)


def test_config_dicts_with_unknown_missing_or_bad_fields_are_refused() -> None:
    data = X2CTConfig().to_dict()
    with pytest.raises(CT2XInputError, match=r"unknown fields \['depth'\]"):
        X2CTConfig.from_dict({**data, "depth": 3})
    with pytest.raises(CT2XInputError, match=r"missing fields \['dropout'\]"):
        X2CTConfig.from_dict({key: value for key, value in data.items() if key != "dropout"})
    with pytest.raises(CT2XInputError, match="decoder_channels"):
        X2CTConfig.from_dict({**data, "decoder_channels": [16, 16]})


def test_builders_take_the_json_config() -> None:
    with torch.device("meta"):
        generator = build_generator(**TINY.to_dict())
        single = build_single_view_generator(**TINY.to_dict())
        discriminator = build_patch_discriminator(**TINY_DISCRIMINATOR.to_dict())
    assert generator.config == single.config == TINY and discriminator.config == TINY_DISCRIMINATOR
    with pytest.raises(CT2XInputError, match="missing fields"):
        build_generator(input_size=64)
