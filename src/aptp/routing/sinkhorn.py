"""Balanced assignment of prompts to codes with Sinkhorn-Knopp (as in SwAV).

Over the global batch (all processes), every code receives the same share of prompts, so codes
cannot collapse onto one. Sums are all-reduced when ``torch.distributed`` is initialised.

With ``balance`` below 1 the equal shares are a soft constraint (unbalanced optimal transport, the
column marginal penalised by a KL term): a batch that happens to hold more prompts of one kind than
1/K keeps most of them on the code that scores them best, instead of pushing the surplus elsewhere.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _all_reduce(tensor: torch.Tensor, op=None) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3, balance: float = 1.0) -> torch.Tensor:
    """Soft assignment ``Q`` (B, K) from similarity scores (B, K): rows sum to 1, and over the
    global batch every code's column sums to B_global / K. ``balance`` in [0, 1] is how strictly:
    each iteration moves a code's mass that fraction of the way (in log space) to its equal share;
    1 enforces equal shares, 0 leaves every prompt with its own softmax over the codes."""
    if scores.ndim != 2:
        raise ValueError(f"scores must be (B, K), got {tuple(scores.shape)}")
    if not 0 <= balance <= 1:
        raise ValueError(f"balance must be in [0, 1], got {balance}")
    scores = scores.detach().float()
    batch = _all_reduce(torch.tensor(float(scores.shape[0]), device=scores.device))
    codes = scores.shape[1]
    peak = _all_reduce(scores.max().clone(), dist.ReduceOp.MAX if dist.is_available() else None)
    q = torch.exp((scores - peak) / epsilon).t()  # (K, B)
    q /= _all_reduce(q.sum())
    for _ in range(iterations):
        mass = _all_reduce(q.sum(dim=1, keepdim=True)).clamp_min(1e-30)
        if balance == 1:
            q /= mass
            q /= codes
        else:
            q *= (1 / (codes * mass)) ** balance
        q /= q.sum(dim=0, keepdim=True).clamp_min(1e-30)
        q /= batch
    return (q * batch).t()
