"""Benchmarks: commands that time things side by side in one run and print ratios."""

import torch


def synchronize(device) -> None:
    """Wait for the device's queued work, so wall-clock timings cover it (a no-op off CUDA)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
