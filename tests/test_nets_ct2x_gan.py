"""CT2X-GAN networks at tiny sizes: shapes, camera labels, MIPs, the PAM, ablations, configs, model files."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ct2x.errors import CT2XInputError
from ct2x.geometry import CArm, Detector
from ct2x.models import ModelInfo, load, save_model
from ct2x.nets.ct2x_gan import (
    PRESETS,
    CT2XGANConfig,
    CT2XGANGenerator,
    build_generator,
    scaled_label,
    style_strides,
)
from ct2x.nets.ct2x_gan_discriminator import PoseDiscriminator, PoseDiscriminatorConfig, build_discriminator
from ct2x.nets.ct2x_gan_layers import ModulatedConv2d
from ct2x.preprocess import x2ct_normalize
from ct2x.projector import reference_projection
from ct2x.synth_inputs import camera_labels, pose_mips

TINY = PRESETS["tiny32"]  # 32 px films from 16^3 CTs, 1/16 of the default widths
TINY_D = PoseDiscriminatorConfig.scaled(32, width=1 / 16)


def count(network: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in network.parameters())


def inputs(config: CT2XGANConfig, batch: int = 2, seed: int = 0) -> dict:
    """Random CTs in [0, 1], C-arm labels at the paper's angles, MIPs in [0, 1] and style films in [-1, 1]."""
    generator = torch.Generator().manual_seed(seed)
    views = [CArm().view(angle) for angle in (-90.0, -30.0, 0.0, 60.0)[:batch]]
    size, films = config.ct_size, config.image_size
    return {
        "ct": torch.rand(batch, 1, size, size, size, generator=generator),
        "label": camera_labels(views),
        "mip": torch.rand(batch, 1, config.mip_size, config.mip_size, generator=generator),
        "style_image": torch.rand(batch, 1, films, films, generator=generator) * 2 - 1,
    }


@pytest.fixture(scope="module")
def generator() -> CT2XGANGenerator:
    torch.manual_seed(0)
    return CT2XGANGenerator(TINY).eval()


@pytest.mark.parametrize("config", [TINY, CT2XGANConfig.scaled(64, 32, width=1 / 32)], ids=["32", "64"])
def test_every_network_gives_its_shapes(config: CT2XGANConfig) -> None:
    torch.manual_seed(0)
    network = CT2XGANGenerator(config).eval()
    data = inputs(config, batch=2)
    films = config.image_size
    with torch.no_grad():
        ct_code = network.encode_ct(data["ct"])
        content = network.content_code(ct_code, data["label"], data["mip"])
        xray_style = network.style_code(data["style_image"], "xray")
        drr_style = network.style_code(data["style_image"], "drr")
        content_map = network.style_encoder.content_code(data["style_image"])
        film = network.synthesize(content, xray_style)
        scores = PoseDiscriminator(PoseDiscriminatorConfig.scaled(films, width=1 / 32))(film, data["label"])
    assert ct_code.shape == (2, config.ct_code_channels * (config.ct_size // 8) ** 3)
    assert content.shape == (2, config.content_layers, config.w_dim)
    assert xray_style.shape == drr_style.shape == (2, config.w_dim)
    assert xray_style.abs().max() < 1 and not torch.equal(xray_style, drr_style)  # tanh; two branches
    assert content_map.shape == (2, config.content_channels[-1], films // 8, films // 8)
    assert film.shape == (2, 1, films, films) and scores.shape == (2,)
    assert torch.equal(network(**data), film)


def test_the_paper_configuration() -> None:
    config = PRESETS["paper"]
    assert config == CT2XGANConfig()
    assert (config.layers, config.content_layers, config.style_layers) == (14, 8, 6)  # layers 1-8 and 9-14
    assert PRESETS["paper128"].layers == 12 and PRESETS["paper128"].content_layers == 6
    assert config.ct_code_length == 4 * 16**3 and config.mip_tokens == 64
    assert style_strides(256) == (1, 2, 2, 2, 2, 2, 2)  # 256 -> 4 x 4 before the pooling
    with torch.device("meta"):  # shapes only
        assert count(CT2XGANGenerator(config)) == 43_408_535
        assert count(PoseDiscriminator(PoseDiscriminatorConfig())) == 24_396_736


def test_the_camera_label_is_the_views_and_its_translation_is_scaled() -> None:
    carm = CArm()
    views = [carm.view(0.0, isocenter_ras=(10.0, -20.0, 30.0)), carm.view(90.0)]
    labels = camera_labels(views)
    assert labels.shape == (2, 25) and labels.dtype == torch.float32
    np.testing.assert_array_equal(labels[0].numpy(), views[0].camera_label())
    pose = labels[0, :16].view(4, 4)
    torch.testing.assert_close(pose[:3, 3], torch.tensor([0.0, 530.0, 0.0]))  # AP: source 530 mm anterior
    torch.testing.assert_close(labels[1, :16].view(4, 4)[:3, 3], torch.tensor([530.0, 0.0, 0.0]), atol=1e-4, rtol=0)
    assert labels[0, 16] == pytest.approx(1020.0 / (1536 * 0.194))  # focal length / sensor width
    scaled = scaled_label(labels, 530.0)
    torch.testing.assert_close(scaled[0, [3, 7, 11]], torch.tensor([0.0, 1.0, 0.0]))
    assert torch.equal(scaled[:, :3], labels[:, :3]) and torch.equal(scaled[:, 16:], labels[:, 16:])


def test_pose_mips_come_from_the_core_projector(ct_phantom) -> None:
    carm = CArm(detector=Detector.square(24, 2.0))
    views = [carm.view(angle, isocenter_ras=ct_phantom.center_ras) for angle in (0.0, 90.0)]
    mips = pose_mips(ct_phantom, views)
    assert mips.shape == (2, 1, 24, 24) and mips.dtype == torch.float32
    assert mips.min() >= 0 and mips.max() == pytest.approx(float(x2ct_normalize(np.float32(700.0))), abs=0.01)
    values = x2ct_normalize(torch.from_numpy(ct_phantom.hu))[None]  # (1, K, J, I)
    for mip, view in zip(mips, views):
        reference = reference_projection(values, ct_phantom.affine, view, mode="max").float()
        assert float((mip - reference).norm() / reference.norm()) < 0.05
    assert not torch.allclose(mips[0], mips[1])


def test_pam_attention_weights_sum_to_one_and_use_the_mip(generator: CT2XGANGenerator) -> None:
    data = inputs(TINY)
    pam = generator.pose_attention
    with torch.no_grad():
        ct_code = generator.encode_ct(data["ct"])
        query = pam.queries(ct_code, data["label"])
        attended, weights = pam.attend(query, data["mip"])
        content = pam(ct_code, data["label"], data["mip"])
        other_mip = pam(ct_code, data["label"], data["mip"].flip(-1))
    assert weights.shape == (2, TINY.content_layers, TINY.mip_tokens) and (weights >= 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, TINY.content_layers))
    torch.testing.assert_close(content, query + attended)  # residual: Q + softmax(QK^T / tau) V
    assert not torch.allclose(content, other_mip)


def test_the_pose_enters_through_the_label_and_the_mip(generator: CT2XGANGenerator) -> None:
    data = inputs(TINY)
    with torch.no_grad():
        film = generator(**data)
        swapped = generator(data["ct"], data["label"].flip(0), data["mip"], data["style_image"])
    assert not torch.allclose(film, swapped)


def test_without_pam_there_is_no_mip_and_the_content_code_is_the_query() -> None:
    torch.manual_seed(0)
    network = CT2XGANGenerator(dataclasses.replace(TINY, pose_attention=False)).eval()
    data = inputs(TINY)
    assert not hasattr(network.pose_attention, "key") and not hasattr(network.pose_attention, "position")
    with torch.no_grad():
        ct_code = network.encode_ct(data["ct"])
        content = network.content_code(ct_code, data["label"])
        assert torch.equal(content, network.pose_attention.queries(ct_code, data["label"]))
        assert network(data["ct"], data["label"], style_image=data["style_image"]).shape == (2, 1, 32, 32)
    with pytest.raises(ValueError, match="no pose attention"):
        network.content_code(ct_code, data["label"], data["mip"])


def test_the_ct_encoder_runs_channels_last_and_computes_what_the_plain_layout_computes() -> None:
    torch.manual_seed(0)
    encoder = CT2XGANGenerator(TINY).ct_encoder.eval()
    ct = torch.rand(2, 1, 16, 16, 16)
    plain = copy.deepcopy(encoder).to(memory_format=torch.contiguous_format)
    assert all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in encoder.parameters() if p.dim() == 5)
    assert not plain.layers.down1.conv1.weight.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(encoder(ct), plain.layers(ct).flatten(1), rtol=1e-5, atol=1e-6)
    encoder.load_state_dict(plain.state_dict())  # values copied in, layout kept
    assert encoder.layers.down1.conv1.weight.is_contiguous(memory_format=torch.channels_last_3d)


def test_without_the_style_encoder_one_learned_style_serves_every_film() -> None:
    torch.manual_seed(0)
    network = CT2XGANGenerator(dataclasses.replace(TINY, style_encoder=False)).eval()
    data = inputs(TINY)
    assert network.style_encoder is None and network.fixed_style.shape == (TINY.w_dim,)
    assert count(network) < count(CT2XGANGenerator(TINY))
    with torch.no_grad():
        film = network(data["ct"], data["label"], data["mip"])
    assert film.shape == (2, 1, 32, 32)
    with pytest.raises(ValueError, match="no style encoder"):
        network.style_code(data["style_image"])
    with pytest.raises(ValueError, match="exactly when"):
        network.synthesize(torch.zeros(2, TINY.content_layers, TINY.w_dim), torch.zeros(2, TINY.w_dim))


def test_content_feeds_the_first_layers_and_style_the_last(generator: CT2XGANGenerator) -> None:
    seen = []
    hook = generator.synthesis.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    content, style = torch.randn(2, TINY.content_layers, TINY.w_dim), torch.rand(2, TINY.w_dim)
    with torch.no_grad():
        generator.synthesize(content, style)
    hook.remove()
    (ws,) = seen
    assert ws.shape == (2, TINY.layers, TINY.w_dim)
    assert torch.equal(ws[:, :TINY.content_layers], content)
    assert all(torch.equal(ws[:, layer], style) for layer in range(TINY.content_layers, TINY.layers))


def test_the_modulated_convolution_is_a_per_sample_convolution() -> None:
    torch.manual_seed(0)
    conv = ModulatedConv2d(3, 4, 3, w_dim=5)
    x, w = torch.randn(2, 3, 6, 6), torch.randn(2, 5)
    batched = conv(x, w)
    for sample in range(2):
        weight = conv.weight * conv.scale * conv.affine(w[sample:sample + 1])[0][None, :, None, None]
        weight = weight / weight.square().sum(dim=(1, 2, 3), keepdim=True).add(1e-8).sqrt()  # demodulated
        torch.testing.assert_close(batched[sample:sample + 1], F.conv2d(x[sample:sample + 1], weight, padding=1))
        assert torch.allclose(weight.square().sum(dim=(1, 2, 3)), torch.ones(4), atol=1e-5)


def test_the_discriminator_is_conditioned_on_the_pose() -> None:
    torch.manual_seed(0)
    discriminator = PoseDiscriminator(TINY_D).eval()
    data = inputs(TINY)
    films = data["style_image"][:1].expand(2, -1, -1, -1)  # one film at two poses
    with torch.no_grad():
        scores = discriminator(films, data["label"])
    assert scores.shape == (2,) and scores[0] != scores[1]
    with pytest.raises(ValueError, match="camera labels must be"):
        discriminator(films, data["label"][:, :16])


def test_wrong_inputs_are_refused(generator: CT2XGANGenerator) -> None:
    data = inputs(TINY)
    with pytest.raises(ValueError, match=r"CT must be \(N, 1, 16, 16, 16\)"):
        generator.encode_ct(torch.rand(1, 1, 32, 32, 32))
    with pytest.raises(ValueError, match="needs the MIP"):
        generator(data["ct"], data["label"], None, data["style_image"])
    with pytest.raises(ValueError, match=r"MIP must be \(N, 1, 16, 16\)"):
        generator(data["ct"], data["label"], data["mip"][..., :8], data["style_image"])
    with pytest.raises(ValueError, match="style domain"):
        generator.style_code(data["style_image"], "ct")
    with pytest.raises(ValueError, match="1 camera labels for 2"):
        generator(data["ct"], data["label"][:1], data["mip"], data["style_image"])


@pytest.mark.parametrize("config", [CT2XGANConfig(), *PRESETS.values(), PoseDiscriminatorConfig(), TINY_D])
def test_configs_round_trip_through_json(config: object) -> None:
    assert type(config).from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize("changes, message", [
    ({"image_size": 48}, "power of 2"),
    ({"image_size": 16}, "image_size must be an integer >= 32"),
    ({"ct_size": 20}, "multiple of 8"),
    ({"mip_patch": 5}, "multiple of mip_patch"),
    ({"style_channels": (8,) * 6}, "style_channels must be a tuple of 7"),
    ({"style_layers": 14}, "must leave content layers"),
    ({"label_translation_mm": 0.0}, "positive number"),
    ({"pose_attention": 1}, "true or false"),
])
def test_invalid_configs_are_refused(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CT2XGANConfig(**changes)


def test_builders_take_the_json_config() -> None:
    with torch.device("meta"):
        assert build_generator(**TINY.to_dict()).config == TINY
        assert build_discriminator(**TINY_D.to_dict()).config == TINY_D
    with pytest.raises(CT2XInputError, match="missing fields"):
        build_generator(image_size=32)


@pytest.mark.parametrize("kind, config", [
    ("ct2x-gan", TINY),
    ("ct2x-gan", dataclasses.replace(TINY, style_encoder=False, pose_attention=False)),
    ("ct2x-gan-discriminator", TINY_D),
], ids=["generator", "ablated generator", "discriminator"])
def test_model_files_round_trip(tmp_path, kind: str, config) -> None:
    torch.manual_seed(0)
    network = CT2XGANGenerator(config) if kind == "ct2x-gan" else PoseDiscriminator(config)
    data = inputs(TINY)
    if kind == "ct2x-gan":
        network(data["ct"], data["label"], data["mip"] if config.pose_attention else None,
                data["style_image"] if config.style_encoder else None)  # training mode: BatchNorm statistics move
    info = ModelInfo(kind=kind, config=config.to_dict(), license="Apache-2.0", description="tiny CT2X-GAN")
    loaded, loaded_info = load(save_model(tmp_path / "model.safetensors", network, info))
    assert type(loaded) is type(network) and not loaded.training and loaded_info.kind == kind
    for name, tensor in network.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    with torch.no_grad():
        if kind == "ct2x-gan":
            args = (data["ct"], data["label"], data["mip"] if config.pose_attention else None,
                    data["style_image"] if config.style_encoder else None)
        else:
            args = (data["style_image"], data["label"])
        assert torch.equal(loaded(*args), network.eval()(*args))
