"""Spherical k-means, to place the router's codes on the clusters its prompts already form."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def spherical_kmeans(points: torch.Tensor, k: int, generator: torch.Generator | None = None,
                     iterations: int = 50) -> torch.Tensor:
    """``k`` unit-length centroids (k, d) of ``points`` (N, d) under cosine similarity: k-means++
    seeding, then Lloyd iterations until no point changes cluster. A cluster that empties takes the
    point farthest from its own centroid. Deterministic for a given ``generator``."""
    if points.ndim != 2 or len(points) < k or k < 1:
        raise ValueError(f"need a (N, d) tensor with N >= k >= 1, got {tuple(points.shape)} and k = {k}")
    x = F.normalize(points.double(), dim=1)
    centroids = x[torch.randint(len(x), (1,), generator=generator)]
    while len(centroids) < k:  # k-means++: the next seed with probability growing with its distance
        distance = (1 - (x @ centroids.t()).max(dim=1).values).clamp_min(0)
        weights = distance ** 2 if distance.sum() > 0 else torch.ones_like(distance)
        centroids = torch.cat([centroids, x[torch.multinomial(weights, 1, generator=generator)]])
    labels = None
    for _ in range(iterations):
        similarity = x @ centroids.t()
        new_labels = similarity.argmax(dim=1)
        if labels is not None and torch.equal(new_labels, labels):
            break
        labels = new_labels
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k)
        for empty in (counts == 0).nonzero().flatten().tolist():
            farthest = similarity.gather(1, labels[:, None]).squeeze(1).argmin()
            sums[empty], labels[farthest] = x[farthest], empty
        centroids = F.normalize(sums, dim=1)
    return centroids.to(points.dtype)
