"""CT2X-GAN losses on inputs with known answers, the two objectives, the consistency switch and a training step."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from ct2x.geometry import CArm
from ct2x.nets.ct2x_gan import PRESETS, CT2XGANGenerator
from ct2x.nets.ct2x_gan_discriminator import PoseDiscriminator, PoseDiscriminatorConfig
from ct2x.nets.ct2x_gan_losses import (
    CT2XGANBatch,
    CT2XGANLoss,
    CT2XGANLossConfig,
    content_consistency,
    discriminator_adversarial,
    generator_adversarial,
    r1_penalty,
    reconstruction_loss,
    style_consistency,
    zero_loss,
)
from ct2x.synth_inputs import camera_labels

TINY = PRESETS["tiny32"]
TINY_D = PoseDiscriminatorConfig.scaled(32, width=1 / 16)


class TestLPIPS(torch.nn.Module):
    """A stand-in for LPIPS built here: squared differences of fixed random 3x3 features, one distance per film."""

    __test__ = False  # not a test class

    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.requires_grad_(False)
        self.features.weight.copy_(torch.randn(4, 1, 3, 3, generator=torch.Generator().manual_seed(1)))

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (self.features(prediction) - self.features(target)).square().mean(dim=(1, 2, 3))  # (N,)


def batch(size: int = 2, seed: int = 0) -> CT2XGANBatch:
    generator = torch.Generator().manual_seed(seed)
    films = TINY.image_size
    return CT2XGANBatch(
        ct=torch.rand(size, 1, TINY.ct_size, TINY.ct_size, TINY.ct_size, generator=generator),
        label=camera_labels([CArm().view(angle) for angle in (-60.0, 30.0)[:size]]),
        mip=torch.rand(size, 1, TINY.mip_size, TINY.mip_size, generator=generator),
        drr=torch.rand(size, 1, films, films, generator=generator) * 2 - 1,
        xray=torch.rand(size, 1, films, films, generator=generator) * 2 - 1,
    )


def networks(**changes) -> tuple:
    torch.manual_seed(0)
    return CT2XGANGenerator(dataclasses.replace(TINY, **changes)), PoseDiscriminator(TINY_D)


def test_adversarial_terms_on_known_scores() -> None:
    fake, real = torch.tensor([0.0, 2.0]), torch.tensor([1.0, -1.0])
    assert generator_adversarial(fake, non_saturating=False) == pytest.approx(-1.0)  # E[-D(fake)]
    expected = (math.log(2) + math.log1p(math.exp(-2))) / 2  # E[softplus(-D(fake))]
    assert generator_adversarial(fake) == pytest.approx(expected)
    assert discriminator_adversarial(real, fake, non_saturating=False) == pytest.approx(1.0 - 0.0)
    expected = (math.log(2) + math.log1p(math.exp(2))) / 2 + (math.log1p(math.exp(-1)) + math.log1p(math.exp(1))) / 2
    assert discriminator_adversarial(real, fake) == pytest.approx(expected)


def test_r1_is_the_squared_gradient_norm_of_a_known_discriminator() -> None:
    slope = torch.arange(16.0).view(1, 1, 4, 4) / 10
    images = torch.randn(3, 1, 4, 4, requires_grad=True)
    linear = (images * slope).sum(dim=(1, 2, 3))  # D(x) = <a, x>: gradient a for every film
    assert float(r1_penalty(linear, images)) == pytest.approx(float(slope.square().sum()), rel=1e-6)
    quadratic = images.square().sum(dim=(1, 2, 3))  # D(x) = |x|^2: gradient 2x
    penalty = r1_penalty(quadratic, images)
    assert float(penalty.detach()) == pytest.approx(float(4 * images.detach().square().sum() / 3), rel=1e-6)
    (gradient,) = torch.autograd.grad(penalty, images)  # differentiable: d/dx of 4 |x|^2 / N = 8 x / N
    torch.testing.assert_close(gradient, 8 * images.detach() / 3)


def test_reconstruction_is_weighted_mae_plus_weighted_lpips() -> None:
    prediction, target = torch.zeros(2, 1, 4, 4), torch.full((2, 1, 4, 4), 0.5)
    lpips = TestLPIPS()
    distances = lpips(prediction, target)
    expected = 10 * 0.5 + 2 * float(distances.mean())
    assert reconstruction_loss(prediction, target, lpips, 10.0, 2.0) == pytest.approx(expected)
    assert reconstruction_loss(target, target, lpips, 10.0, 2.0) == 0


def test_consistency_and_zero_terms_on_known_codes() -> None:
    ones, zeros = torch.ones(2, 3), torch.zeros(2, 3)
    assert content_consistency(torch.ones(2, 4, 2, 2), torch.full((2, 4, 2, 2), 3.0)) == 4.0  # mean squared
    assert style_consistency(ones, zeros, 2 * ones, zeros) == 1.0 + 4.0
    assert zero_loss(torch.tensor([[0.5, -0.5]]), torch.tensor([[0.0, -1.0]])) == 0.5 + 0.5  # mean |.|
    assert zero_loss(zeros, zeros) == 0


def test_generator_objective_is_the_weighted_sum_of_its_terms() -> None:
    generator, discriminator = networks()
    config = CT2XGANLossConfig(adversarial=0.5, content_consistency=2.0, style_consistency=3.0, zero=4.0)
    with torch.no_grad():
        terms = CT2XGANLoss(generator, discriminator, TestLPIPS(), config).generator_terms(batch())
    assert set(terms) == {"adversarial", "reconstruction", "content_consistency", "style_consistency", "zero", "total"}
    expected = 0.5 * terms["adversarial"] + terms["reconstruction"] + 2 * terms["content_consistency"] \
        + 3 * terms["style_consistency"] + 4 * terms["zero"]
    torch.testing.assert_close(terms["total"], expected)
    assert all(bool(term > 0) for name, term in terms.items() if name != "total")


def test_zero_loss_is_zero_when_the_style_branches_output_zero() -> None:
    generator, discriminator = networks()
    for branch in (generator.style_encoder.xray, generator.style_encoder.drr):
        torch.nn.init.zeros_(branch.out.weight)
        torch.nn.init.zeros_(branch.out.bias)
    with torch.no_grad():
        terms = CT2XGANLoss(generator, discriminator, TestLPIPS()).generator_terms(batch())
    assert terms["zero"] == 0 and terms["style_consistency"] == 0  # every style code is tanh(0) = 0


def test_the_consistency_switch_drops_l_cc_and_l_sc_only() -> None:
    generator, discriminator = networks()
    data = batch()
    with torch.no_grad():
        full = CT2XGANLoss(generator, discriminator, TestLPIPS()).generator_terms(data)
        ablated = CT2XGANLoss(generator, discriminator, TestLPIPS(),
                              CT2XGANLossConfig(consistency=False)).generator_terms(data)
    assert set(full) - set(ablated) == {"content_consistency", "style_consistency"}
    for name in ablated:
        if name != "total":
            torch.testing.assert_close(ablated[name], full[name])
    torch.testing.assert_close(full["total"] - ablated["total"],
                               full["content_consistency"] + full["style_consistency"])


def test_without_the_style_encoder_only_adversarial_and_reconstruction_remain() -> None:
    generator, discriminator = networks(style_encoder=False, pose_attention=False)
    data = batch()._replace(mip=None)
    with torch.no_grad():
        terms = CT2XGANLoss(generator, discriminator, TestLPIPS()).generator_terms(data)
    assert set(terms) == {"adversarial", "reconstruction", "total"}
    torch.testing.assert_close(terms["total"], terms["adversarial"] + terms["reconstruction"])


def test_discriminator_objective_scores_drrs_as_real_with_r1_and_trains_only_d() -> None:
    generator, discriminator = networks()
    config = CT2XGANLossConfig(adversarial=2.0, r1=0.25)
    terms = CT2XGANLoss(generator, discriminator, TestLPIPS(), config).discriminator_terms(batch())
    assert set(terms) == {"adversarial", "r1", "total"} and terms["r1"] > 0
    torch.testing.assert_close(terms["total"], 2.0 * (terms["adversarial"] + 0.25 * terms["r1"]))
    terms["total"].backward()
    assert all(parameter.grad is not None for parameter in discriminator.parameters())
    assert all(parameter.grad is None for parameter in generator.parameters())


class RecordingDiscriminator(torch.nn.Module):
    """Passes every call to a discriminator and keeps its (films, labels)."""

    def __init__(self, discriminator: PoseDiscriminator) -> None:
        super().__init__()
        self.discriminator, self.calls = discriminator, []

    def forward(self, image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        self.calls.append((image.detach().clone(), label.detach().clone()))
        return self.discriminator(image, label)


@pytest.mark.parametrize("real_samples", ["drr", "xray"])
def test_the_discriminators_real_samples_are_drrs_at_their_poses_or_real_films_without_pose(real_samples) -> None:
    generator, discriminator = networks()
    recording, films = RecordingDiscriminator(discriminator), batch()
    loss = CT2XGANLoss(generator, recording, TestLPIPS(), CT2XGANLossConfig(real_samples=real_samples))
    loss.discriminator_terms(films)
    (real, real_labels), (fake, fake_labels) = recording.calls
    expected_real, expected_labels = ((films.drr, films.label) if real_samples == "drr"
                                      else (films.xray, torch.zeros_like(films.label)))
    assert torch.equal(real, expected_real) and not torch.equal(fake, expected_real)
    assert torch.equal(real_labels, expected_labels) and torch.equal(fake_labels, expected_labels)
    with torch.no_grad():
        loss.generator_terms(films)
    assert torch.equal(recording.calls[2][1], expected_labels)  # the generator's adversarial term


def test_lazy_r1_weighs_the_penalty_by_its_interval_and_skips_it_between() -> None:
    generator, discriminator = networks()
    every, lazy = CT2XGANLossConfig(r1=0.25), CT2XGANLossConfig(r1=0.25, r1_interval=4)
    films = batch()
    plain = CT2XGANLoss(generator, discriminator, TestLPIPS(), every).discriminator_terms(films)
    penalised = CT2XGANLoss(generator, discriminator, TestLPIPS(), lazy).discriminator_terms(films)
    torch.testing.assert_close(penalised["total"], plain["adversarial"] + 4 * 0.25 * plain["r1"])
    skipped = CT2XGANLoss(generator, discriminator, TestLPIPS(), lazy).discriminator_terms(films, with_r1=False)
    assert set(skipped) == {"adversarial", "total"}
    torch.testing.assert_close(skipped["total"], plain["adversarial"])


def test_one_adam_step_lowers_the_reconstruction_loss_on_a_fixed_batch() -> None:
    generator, discriminator = networks()
    loss, data = CT2XGANLoss(generator, discriminator, TestLPIPS()), batch()
    optimiser = torch.optim.Adam(generator.parameters(), lr=0.0025, betas=(0.0, 0.99))  # the paper's lr
    before = loss.generator_terms(data)
    optimiser.zero_grad()
    before["reconstruction"].backward()
    assert all(parameter.grad is not None for parameter in generator.ct_encoder.parameters())
    optimiser.step()
    after = loss.generator_terms(data)
    assert after["reconstruction"] < 0.9 * before["reconstruction"]


def test_one_adam_step_lowers_the_generator_objective_on_a_fixed_batch() -> None:
    generator, discriminator = networks()
    loss, data = CT2XGANLoss(generator, discriminator, TestLPIPS()), batch()
    optimiser = torch.optim.Adam(generator.parameters(), lr=1e-3, betas=(0.0, 0.99))
    before = loss.generator_terms(data)["total"]
    optimiser.zero_grad()
    before.backward()
    optimiser.step()
    assert loss.generator_terms(data)["total"] < before


def test_loss_config_round_trips_and_refuses_bad_weights() -> None:
    config = CT2XGANLossConfig(mae=5.0, consistency=False)
    assert CT2XGANLossConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="finite weight >= 0"):
        CT2XGANLossConfig(r1=-1.0)
    with pytest.raises(ValueError, match="r1_interval"):
        CT2XGANLossConfig(r1_interval=0)
    with pytest.raises(ValueError, match="true or false"):
        CT2XGANLossConfig(non_saturating=1)
    with pytest.raises(ValueError, match="real_samples must be one of drr, xray"):
        CT2XGANLossConfig(real_samples="ct")
