"""Consistency of layer attributes with their weights, for any model."""

from __future__ import annotations

from torch import nn


def check_layer_attributes(model: nn.Module) -> list[str]:
    """Every Linear / Conv2d / GroupNorm / LayerNorm whose size attributes disagree with its weights."""
    problems = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            expected = (module.out_features, module.in_features)
            if tuple(module.weight.shape) != expected:
                problems.append(f"{name}: weight {tuple(module.weight.shape)} but (out, in) features {expected}")
            if module.bias is not None and module.bias.shape[0] != module.out_features:
                problems.append(f"{name}: bias has {module.bias.shape[0]} entries, out_features {module.out_features}")
        elif isinstance(module, nn.Conv2d):
            expected = (module.out_channels, module.in_channels // module.groups)
            if tuple(module.weight.shape[:2]) != expected:
                problems.append(f"{name}: weight {tuple(module.weight.shape)} but (out, in/groups) {expected}")
            if module.bias is not None and module.bias.shape[0] != module.out_channels:
                problems.append(f"{name}: bias has {module.bias.shape[0]} entries, out_channels {module.out_channels}")
        elif isinstance(module, nn.GroupNorm):
            if module.num_channels % module.num_groups:
                problems.append(f"{name}: {module.num_channels} channels do not split into {module.num_groups} groups")
            if module.affine and module.weight.shape[0] != module.num_channels:
                problems.append(f"{name}: weight has {module.weight.shape[0]} entries, num_channels {module.num_channels}")
        elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
            if tuple(module.weight.shape) != tuple(module.normalized_shape):
                problems.append(f"{name}: weight {tuple(module.weight.shape)} but normalized_shape {module.normalized_shape}")
    return problems
