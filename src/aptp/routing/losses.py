"""Losses of the pruning phase that act on the router (task losses live with the trainer)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def resource_loss(macs_fraction: torch.Tensor, budget: float) -> torch.Tensor:
    """``|log(mean_i macs_i / dense / budget)|``: the batch *average* must meet the budget."""
    if not 0 < budget <= 1:
        raise ValueError(f"budget must be in (0, 1], got {budget}")
    return torch.log(macs_fraction.mean() / budget).abs()


def code_targets(difficulty: torch.Tensor, share: torch.Tensor, budget: float, exponent: float,
                 max_fraction: float = 0.95) -> torch.Tensor:
    """Per-code MACs targets that give codes of harder prompts more of the budget while the
    share-weighted average stays at ``budget``: ``t_k ∝ (difficulty_k / mean difficulty) ** exponent``.

    ``difficulty`` (K,) is the mean difficulty of the prompts each code receives, ``share`` (K,) the
    fraction of prompts it receives. Targets are capped at ``max_fraction`` so no code becomes dense;
    the rest of the budget is spread over the others (a few clip-and-rescale rounds).
    """
    share = share.double() / share.double().sum().clamp_min(1e-12)
    difficulty = difficulty.double().clamp_min(1e-12)
    relative = (difficulty / (share * difficulty).sum()) ** exponent
    targets = budget * relative / (share * relative).sum()
    for _ in range(10):
        capped = targets.clamp(max=max_fraction)
        free = capped < max_fraction
        excess = budget - (share * capped).sum()
        if excess.abs() < 1e-9 or not free.any():
            targets = capped
            break
        targets = torch.where(free, capped * (1 + excess / (share * capped * free).sum().clamp_min(1e-12)), capped)
    return targets.clamp(max=max_fraction).float()


def code_size_loss(code_fractions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``mean_k |log(macs_k / target_k)|``: each code's own MACs fraction meets its target."""
    return torch.log(code_fractions / targets.to(code_fractions)).abs().mean()


def spread_loss(code_fractions: torch.Tensor, cap: float = 0.95) -> torch.Tensor:
    """The published code's spread terms, ``-std_k(macs_k) + (1 - max_k macs_k)``, with the largest
    code's pull stopping at ``cap`` so no code is pushed to the dense model."""
    if code_fractions.numel() < 2:
        return code_fractions.sum() * 0.0
    return -code_fractions.std() + (1 - code_fractions.max().clamp(max=cap))


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
