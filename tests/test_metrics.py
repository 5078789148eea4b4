"""FID with the shipped TF Inception through torchmetrics."""

import pytest
import torch

from aptp.metrics.fid import FIDInception, frechet_inception_distance


@pytest.fixture(scope="module")
def inception():
    return FIDInception()


def test_inception_gives_2048_features(inception):
    features = inception(torch.rand(2, 3, 64, 64))
    assert features.shape == (2, 2048) and torch.isfinite(features).all()


@pytest.mark.slow  # the 2048-dimensional matrix square root takes ~10 s on one CPU thread
def test_fid_is_small_for_the_same_images_and_large_for_noise(inception):
    generator = torch.Generator().manual_seed(0)
    # Smooth colour fields: a stand-in for real images that is cheap to make.
    base = torch.nn.functional.interpolate(torch.rand(6, 3, 4, 4, generator=generator), size=64, mode="bilinear")
    noise = torch.rand(6, 3, 64, 64, generator=generator)
    same = frechet_inception_distance(base, base, inception=inception)
    different = frechet_inception_distance(base, noise, inception=inception)
    assert abs(same) < 1e-2
    assert different > 50
