"""FID with the shipped TF Inception through torchmetrics."""

import pytest
import torch

from aptp.metrics.fid import FIDInception, FrechetDistance, frechet_inception_distance


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
    # One scorer for several sets (real features computed once) gives the same numbers in any order.
    scorer = FrechetDistance(base, inception=inception)
    assert scorer(noise) == pytest.approx(different, rel=1e-4)
    assert scorer(base) == pytest.approx(same, abs=1e-2)


def _numpy_cmmd(x, y, sigma=10.0):
    import numpy as np

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)

    def k(a, b):
        d = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
        return np.exp(-d / (2 * sigma ** 2)).mean()

    return 1000 * (k(x, x) + k(y, y) - 2 * k(x, y))


def test_clip_score_and_cmmd_match_numpy(tmp_path):
    import numpy as np
    from conftest import make_tiny_clip

    from aptp.metrics.clip import CLIPEmbedder, clip_score, cmmd

    folder = make_tiny_clip(tmp_path)
    embedder = CLIPEmbedder(folder)
    images = torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    image_embeddings = embedder.images(images)
    text_embeddings = embedder.texts(["red", "blue", "HI", "star", "sun"])
    assert image_embeddings.shape == (5, 8) and text_embeddings.shape == (5, 8)
    cosine = (image_embeddings.numpy() * text_embeddings.numpy()).sum(-1)
    assert clip_score(image_embeddings, text_embeddings) == pytest.approx(100 * np.maximum(cosine, 0).mean(),
                                                                          abs=1e-4)
    other = embedder.images(torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 0.2)
    assert cmmd(image_embeddings, other) == pytest.approx(_numpy_cmmd(image_embeddings, other), rel=1e-6)
    assert cmmd(image_embeddings, other) > 0
    assert cmmd(image_embeddings, image_embeddings) == pytest.approx(0.0, abs=1e-9)


def test_clip_metrics_need_a_local_folder(tmp_path):
    from aptp.metrics.clip import CLIPEmbedder
    from aptp.utils import APTPError

    with pytest.raises(APTPError, match="need a local CLIP model folder"):
        CLIPEmbedder(None)
    with pytest.raises(APTPError, match="no CLIP model folder"):
        CLIPEmbedder(tmp_path / "missing")
