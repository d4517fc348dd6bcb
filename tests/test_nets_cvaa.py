"""CVAA-GAN on scaled configurations: shapes, view alignment, the CVAA module, ablations, training, model files."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from ct2x import models
from ct2x.cli.main import main
from ct2x.errors import CT2XInputError
from ct2x.models import ModelInfo, build_network, save_model
from ct2x.nets.cvaa import (
    PRESETS,
    CVAAConfig,
    CVAADiscriminator,
    CVAADiscriminatorConfig,
    CVAAGenerator,
    CVAAModule,
    ViewAttention,
)
from ct2x.nets.x2ct import LATERAL_TO_VOLUME, PA_TO_VOLUME, conditional_input
from ct2x.train.config import TrainConfig, network_configs
from ct2x.train.recon_gan import ReconGAN

TINY = PRESETS["tiny64"]  # 64^3, 1/8 of X2CT-GAN's width, 1/4 of its depth
TINY_DISCRIMINATOR = CVAADiscriminatorConfig(base_channels=4, film_channels=2)
SWITCHES = [(True, True), (True, False), (False, True), (False, False)]  # (view_attention, fine_distillation)


def films(batch: int, size: int, seed: int) -> torch.Tensor:
    """(batch, 1, size, size) uniform in [0, 1]."""
    return torch.rand(batch, 1, size, size, generator=torch.Generator().manual_seed(seed))


def features(seed: int, shape=(2, 3, 6, 7, 8)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def switched(view_attention: bool, fine_distillation: bool, config: CVAAConfig = TINY) -> CVAAConfig:
    return dataclasses.replace(config, view_attention=view_attention, fine_distillation=fine_distillation)


@pytest.fixture(scope="module")
def generator() -> CVAAGenerator:
    torch.manual_seed(0)
    return CVAAGenerator(TINY).eval()


@pytest.mark.parametrize("view_attention, fine_distillation", SWITCHES)
def test_output_shapes(view_attention: bool, fine_distillation: bool) -> None:
    torch.manual_seed(0)
    network = CVAAGenerator(switched(view_attention, fine_distillation)).eval()
    with torch.no_grad():
        volume = network(films(2, 64, 1), films(2, 64, 2))
    assert volume.shape == (2, 1, 64, 64, 64) and volume.min() >= 0  # ReLU output


def test_output_shape_at_128() -> None:
    with torch.no_grad():
        volume = CVAAGenerator(CVAAConfig.scaled(128, width=1 / 16, depth=0.25)).eval()(films(1, 128, 1),
                                                                                        films(1, 128, 2))
    assert volume.shape == (1, 1, 128, 128, 128)


def test_views_are_aligned_to_the_volume_frame(generator: CVAAGenerator) -> None:
    """Each view's lifted skip, permuted as the generator does, repeats the film's map along the film's projection
    axis: H (dim 3) for the PA film, W (dim 4) for the lateral one (inner planes; the edge planes see the padding)."""
    with torch.no_grad():
        _, pa_skips = generator.pa.encode(films(1, 64, 3))
        _, lateral_skips = generator.lateral.encode(films(1, 64, 4))
    for pa_skip, lateral_skip in zip(pa_skips, lateral_skips):
        pa_view = pa_skip.volume().permute(PA_TO_VOLUME)  # (1, C, D, H, W)
        lateral_view = lateral_skip.volume().permute(LATERAL_TO_VOLUME)
        size = pa_view.shape[-1]
        inner = slice(1, size - 1)
        assert torch.equal(pa_view[:, :, :, inner], pa_view[:, :, :, 1:2].expand(-1, -1, -1, size - 2, -1))
        assert torch.equal(lateral_view[..., inner], lateral_view[..., 1:2].expand(-1, -1, -1, -1, size - 2))


def test_attention_weights_sum_to_one_over_the_views_at_every_voxel(generator: CVAAGenerator) -> None:
    weights = []
    hooks = [fusion.attention.register_forward_hook(lambda _module, _inputs, output: weights.append(output))
             for fusion in generator.fusions]
    with torch.no_grad():
        generator(films(2, 64, 5), films(2, 64, 6))
    for hook in hooks:
        hook.remove()
    assert [w.shape[-1] for w in weights] == [4, 8, 16, 32, 64]  # every CVAA level, coarsest first
    for w in weights:
        assert w.shape[1] == 2 and (w > 0).all()
        torch.testing.assert_close(w.sum(dim=1), torch.ones_like(w[:, 0]))


def test_the_coarse_feature_is_the_attention_weighted_sum() -> None:
    torch.manual_seed(0)
    module = CVAAModule(3, 3, view_attention=True, fine_distillation=True)
    pa, lateral, deep = features(1), features(2), features(3)
    weights = module.attention(pa, lateral, deep)  # (2, 2, 6, 7, 8)
    torch.testing.assert_close(module.coarse(pa, lateral, deep), weights[:, :1] * pa + weights[:, 1:] * lateral)


def test_without_view_attention_the_fusion_is_addition() -> None:
    torch.manual_seed(0)
    pa, lateral, deep = features(1), features(2), features(3)
    plain = CVAAModule(3, 3, view_attention=False, fine_distillation=False)
    assert list(plain.parameters()) == []
    assert torch.equal(plain.coarse(pa, lateral, deep), pa + lateral)
    assert torch.equal(plain(pa, lateral, deep), torch.cat([pa + lateral, deep], dim=1))
    distilled = CVAAModule(3, 3, view_attention=False, fine_distillation=True)
    fused = distilled(pa, lateral, deep)  # cat [fine, PA + lateral, deep]
    assert torch.equal(fused[:, 3:], torch.cat([pa + lateral, deep], dim=1))
    ratio = fused[:, :3] / (pa + lateral)  # fine = sigmoid weight * coarse: one weight per voxel, in (0, 1)
    torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio))
    assert (ratio > 0).all() and (ratio < 1).all()


def test_view_attention_weighs_views_by_their_structure() -> None:
    """Not an average: the weights vary over the voxels and differ between the views."""
    torch.manual_seed(0)
    weights = ViewAttention(3, 3)(features(1), features(2), features(3))
    assert weights[:, 0].std() > 1e-3 and not torch.allclose(weights[:, 0], weights[:, 1])


def test_ablation_switches_change_the_parameter_set_as_expected() -> None:
    with torch.device("meta"):
        networks = {switches: CVAAGenerator(switched(*switches)) for switches in SWITCHES}
    names = {switches: {name for name, _ in network.named_parameters()} for switches, network in networks.items()}
    full = names[True, True]
    attention = {name for name in full if ".attention." in name}
    distillation = {name for name in full if ".distillation." in name}
    assert len(attention) == 5 * 6 and len(distillation) == 5 * 2  # per level: 2 structure convs + mix; the gate
    assert names[True, False] == full - distillation
    assert names[False, True] == full - attention
    assert names[False, False] == full - attention - distillation

    def count(network: CVAAGenerator) -> int:
        return sum(p.numel() for p in network.parameters())

    channels = TINY.decoder_channels[:5]
    # each part left out of the concatenation takes C_j input channels from the level's 3x3x3 compression
    compression = sum(27 * c * c for c in channels)
    gate = sum(2 * c * 27 + 1 for c in channels)
    mix = sum(2 * c * 2 * 7**3 + 2 for c in channels)
    structure = sum(2 * (2 * c * c * 27 + c) for c in channels)
    assert count(networks[True, True]) - count(networks[True, False]) == gate + compression
    assert count(networks[True, True]) - count(networks[False, True]) == mix + structure + compression
    encoders = {n for n in full if n.startswith(("pa.", "lateral."))}
    assert all(encoders <= n for n in names.values())  # the switches leave the encoders alone


def test_parameter_counts() -> None:
    with torch.device("meta"):
        counts = [sum(p.numel() for p in network.parameters())
                  for network in (CVAAGenerator(), CVAADiscriminator(), CVAAGenerator(TINY))]
    assert counts == [59_729_152, 11_079_969, 247_140]  # docs/cvaa_gan.md


def test_a_training_step_lowers_the_loss_on_a_fixed_batch() -> None:
    torch.manual_seed(0)
    d, h, w = torch.meshgrid(*(torch.linspace(-1, 1, 64),) * 3, indexing="ij")
    ct = ((d**2 / 0.8 + h**2 / 0.5 + w**2 / 0.7) < 0.5).float()[None, None] * 0.6  # (1, 1, 64, 64, 64) ellipsoid
    batch = {"ct": ct, "pa": ct.mean(dim=3) / ct.mean(dim=3).max(), "lateral": ct.mean(dim=4) / ct.mean(dim=4).max()}
    config = TrainConfig(model="cvaa", data="unused", learning_rate=1e-3)
    objective = ReconGAN(build_network("cvaa-biplanar", TINY.to_dict()),
                         build_network("cvaa-discriminator-3d", TINY_DISCRIMINATOR.to_dict()), ("pa", "lateral"),
                         config)

    def voxel_loss() -> float:
        with torch.no_grad():
            return float(((objective.generator.eval()(batch["pa"], batch["lateral"]) - ct) ** 2).mean())

    before = voxel_loss()
    losses = objective.step(batch, torch.device("cpu"))
    assert set(losses) == {"g_gan", "g_voxel", "g_projection", "g_total", "d_total"}
    assert voxel_loss() < before


def test_model_file_round_trip(generator: CVAAGenerator, tmp_path) -> None:
    info = ModelInfo(kind="cvaa-biplanar", config=TINY.to_dict(), license="Apache-2.0",
                     inputs={"films": ["pa", "lateral"], "film_px": 64})
    path = save_model(tmp_path / "cvaa.safetensors", generator, info)
    loaded, loaded_info = models.load(path)
    assert isinstance(loaded, CVAAGenerator) and loaded.config == TINY and loaded_info.kind == "cvaa-biplanar"
    pa, lateral = films(1, 64, 7), films(1, 64, 8)
    with torch.no_grad():
        # Same weights, bitwise; the outputs agree to float32 rounding (on a CPU without AVX-512 oneDNN's kernels
        # differ by 6e-7 between two modules holding equal weights at other addresses).
        torch.testing.assert_close(loaded(pa, lateral), generator(pa, lateral), rtol=1e-5, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), generator.state_dict().values()))


def test_the_network_runs_on_the_meta_device() -> None:
    """The reconstruction engine plans its progress reports by running the architecture on the meta device."""
    with torch.device("meta"):
        network = build_network("cvaa-biplanar", TINY.to_dict())
        volume = network(torch.zeros(1, 1, 64, 64), torch.zeros(1, 1, 64, 64))
    assert volume.shape == (1, 1, 64, 64, 64)


def test_discriminator_lifts_the_films_and_judges_patches() -> None:
    torch.manual_seed(0)
    discriminator = build_network("cvaa-discriminator-3d", TINY_DISCRIMINATOR.to_dict()).eval()
    assert discriminator.patches.config.in_channels == 2 * 2 + 1  # lifted PA, lifted lateral, volume
    pa, lateral, volume = films(2, 64, 1), films(2, 64, 2), torch.rand(2, 1, 64, 64, 64)
    with torch.no_grad():
        logits = discriminator(conditional_input(pa, lateral, volume))
    assert logits.shape == (2, 1, 11, 11, 11)
    with pytest.raises(ValueError, match=r"\(N, 3, D, H, W\)"):
        discriminator(volume)


def test_films_of_the_wrong_shape_are_refused(generator: CVAAGenerator) -> None:
    with pytest.raises(ValueError, match=r"pa film must be \(N, 1, 64, 64\)"):
        generator(films(1, 128, 0), films(1, 64, 0))
    with pytest.raises(ValueError, match="equal numbers"):
        generator(films(2, 64, 0), films(1, 64, 0))


@pytest.mark.parametrize("config", [*PRESETS.values(), switched(False, False), CVAADiscriminatorConfig(),
                                    TINY_DISCRIMINATOR])
def test_configs_round_trip_through_json(config: object) -> None:
    data = json.loads(json.dumps(config.to_dict()))
    assert type(config).from_dict(data) == config


@pytest.mark.parametrize("changes, message", [
    ({"input_size": 100}, "multiple of 32"),
    ({"decoder_blocks": (0, 0, 0, 0, 1)}, "decoder_blocks must be a tuple of 6"),
    ({"view_kernel": 4}, "view_kernel must be odd"),
    ({"view_attention": 1}, "view_attention must be true or false"),
    ({"dropout": 1.0}, "dropout"),
])
def test_invalid_configs_are_refused(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CVAAConfig(**changes)
    with pytest.raises(CT2XInputError, match="missing fields"):
        build_network("cvaa-biplanar", {"input_size": 64})


def test_the_training_recipe_builds_cvaa_configurations() -> None:
    generator, discriminator = network_configs("cvaa", 64, width=0.125, depth=0.25)
    assert generator == TINY.to_dict() and discriminator == CVAADiscriminatorConfig(base_channels=8).to_dict()
    assert network_configs("cvaa", 128) == (CVAAConfig().to_dict(), CVAADiscriminatorConfig().to_dict())
    assert TrainConfig(model="cvaa").recipe["generator"] == "cvaa-biplanar"


@pytest.mark.slow
def test_train_command_line_trains_cvaa(tmp_path) -> None:
    from ct2x import phantoms
    from ct2x.data.prepare_recon import ReconPreparation, prepare_recon
    from ct2x.io import save_ct

    save_ct(phantoms.chest(size=32, spacing_mm=10.0), tmp_path / "a.mha")
    prepared = tmp_path / "prepared"
    prepare_recon([tmp_path / "a.mha"], prepared, ReconPreparation(ct_voxels=64, film_px=64, test_fraction=0),
                  progress=False)
    run = tmp_path / "run"
    assert main(["train", "recon", "--model", "cvaa", "--data", str(prepared), "--out", str(run), "--preset",
                 "scaled", "--width", "0.125", "--depth", "0.25", "--steps", "1", "--no-augment", "--quiet"]) == 0
    network, info = models.load(run / "model.safetensors")
    assert info.kind == "cvaa-biplanar" and info.config == TINY.to_dict() and info.inputs["films"] == ["pa", "lateral"]
    with torch.no_grad():
        assert network(films(1, 64, 0), films(1, 64, 1)).shape == (1, 1, 64, 64, 64)
