"""X2CT-GAN's losses on inputs whose values are known by hand."""

import pytest
import torch

from ct2x.nets.losses import lsgan_discriminator, lsgan_generator, projection_l1, voxel_mse


def test_lsgan_terms():
    real, fake = torch.full((2, 1, 3, 3, 3), 0.5), torch.full((2, 1, 3, 3, 3), 0.25)
    assert float(lsgan_generator(fake)) == pytest.approx(0.75 ** 2)
    assert float(lsgan_discriminator(real, fake)) == pytest.approx(0.5 ** 2 + 0.25 ** 2)
    assert float(lsgan_discriminator(torch.ones(4), torch.zeros(4))) == 0.0


def test_voxel_and_projection_terms():
    target = torch.zeros(1, 1, 4, 4, 4)
    prediction = target.clone()
    prediction[0, 0, 0, 0, 0] = 2.0  # one voxel off by 2
    assert float(voxel_mse(prediction, target)) == pytest.approx(4.0 / 64)
    # Along each axis the mean-|v| projection has one pixel of 2/4 = 0.5 among 16: L1 = 0.5 / 16 for every axis.
    assert float(projection_l1(prediction, target)) == pytest.approx(0.5 / 16)
    assert float(projection_l1(-prediction, target)) == pytest.approx(0.5 / 16)  # |v|: the sign does not count
