"""Losses of the pruning phase that act on the router (task losses live with the trainer)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def resource_loss(macs_fraction: torch.Tensor, budget: float) -> torch.Tensor:
    """``|log(mean_i macs_i / dense / budget)|``: the batch *average* must meet the budget."""
    if not 0 < budget <= 1:
        raise ValueError(f"budget must be in (0, 1], got {budget}")
    return torch.log(macs_fraction.mean() / budget).abs()


def assignment_loss(scores: torch.Tensor, assignment: torch.Tensor, temperature: float) -> torch.Tensor:
    """Swapped-assignment cross-entropy ``CE(softmax(scores / T), Q)``: the router's own argmax
    learns to agree with the balanced assignment used in training."""
    return -(assignment * F.log_softmax(scores / temperature, dim=1)).sum(dim=1).mean()


def _off_diagonal_log_softmax(similarity: torch.Tensor, temperature: float) -> torch.Tensor:
    eye = torch.eye(similarity.shape[0], dtype=torch.bool, device=similarity.device)
    return F.log_softmax((similarity / temperature).masked_fill(eye, float("-inf")), dim=1).masked_fill(eye, 0.0)


def contrastive_loss(arch_embeddings: torch.Tensor, prompt_embeddings: torch.Tensor,
                     temperature: float = 0.05, target_temperature: float = 0.05) -> torch.Tensor:
    """Keep the prompt geometry: each row of the softmaxed cosine-similarity matrix of architecture
    embeddings should match that of the prompt embeddings (soft targets, self-pairs excluded)."""
    if arch_embeddings.shape[0] < 2:
        return arch_embeddings.sum() * 0.0
    e = F.normalize(arch_embeddings, dim=1)
    z = F.normalize(prompt_embeddings.detach().to(e.dtype), dim=1)
    target = _off_diagonal_log_softmax(z @ z.t(), target_temperature).exp()
    predicted = _off_diagonal_log_softmax(e @ e.t(), temperature)
    eye = torch.eye(e.shape[0], dtype=torch.bool, device=e.device)
    target_log = torch.where(eye, torch.zeros_like(target), target.clamp_min(1e-30).log())
    return (target * (target_log - predicted)).sum(dim=1).mean()
