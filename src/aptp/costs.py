"""Measuring multiply-accumulates of a forward pass (torch only).

:func:`trace_module_macs` runs a forward with hooks and attributes the MACs of every Linear and
Conv2d call to its module from the recorded shapes. :func:`flop_counter_macs` is the independent
check: PyTorch's own ``FlopCounterMode`` (FLOPs = 2 x MACs). Both work on the meta device, so
full-size models are measured without allocating weights or computing anything.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def linear_macs(module: nn.Linear, inputs: torch.Tensor) -> float:
    tokens = inputs.numel() // module.in_features
    return float(tokens) * module.in_features * module.out_features


def conv2d_macs(module: nn.Conv2d, output: torch.Tensor) -> float:
    kernel = math.prod(module.kernel_size) * (module.in_channels // module.groups)
    return float(output.numel()) * kernel


def trace_module_macs(model: nn.Module, run: Callable[[], object], extra_hooks=()) -> dict[str, float]:
    """MACs per module name (Linear and Conv2d) for one call of ``run``.

    ``extra_hooks`` are ``(module, hook)`` pairs registered as forward hooks for the duration, for
    callers that record more (e.g. attention token counts).
    """
    macs: dict[str, float] = defaultdict(float)
    handles = []

    def record(name):
        def hook(module, args, output):
            if isinstance(module, nn.Linear):
                macs[name] += linear_macs(module, args[0])
            else:
                macs[name] += conv2d_macs(module, output)

        return hook

    try:
        for name, module in model.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                handles.append(module.register_forward_hook(record(name)))
        for module, hook in extra_hooks:
            handles.append(module.register_forward_hook(hook))
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return dict(macs)


def flop_counter_macs(run: Callable[[], object]) -> float:
    """Total MACs of ``run()`` as counted by ``torch.utils.flop_counter.FlopCounterMode``."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        run()
    return counter.get_total_flops() / 2.0


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
