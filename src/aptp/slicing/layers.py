"""In-place slicing of torch layers. Each function replaces the parameters with the kept rows or
columns and updates the layer's size attributes in the same step, so a layer is never left with
attributes that disagree with its weights."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def _index(indices: Sequence[int] | torch.Tensor, size: int, what: str) -> torch.Tensor:
    # Indices live on the CPU even under a ``torch.device("meta")`` context.
    index = torch.as_tensor(indices, dtype=torch.long, device="cpu").flatten()
    if index.numel() == 0:
        raise ValueError(f"cannot keep zero {what}")
    if int(index.min()) < 0 or int(index.max()) >= size:
        raise ValueError(f"{what} indices must lie in [0, {size}), got {index.tolist()}")
    if torch.unique(index).numel() != index.numel():
        raise ValueError(f"{what} indices repeat: {index.tolist()}")
    return index


def _take(param: nn.Parameter | None, dim: int, index: torch.Tensor) -> nn.Parameter | None:
    if param is None:
        return None
    # Meta tensors (models built without weights) slice like real ones.
    return nn.Parameter(param.data.index_select(dim, index.to(param.device)), requires_grad=param.requires_grad)


def select_channels(element_indices: Sequence[int], element_size: int) -> list[int]:
    """Channel indices covered by whole elements (groups, heads, chunks) of ``element_size`` channels."""
    return [e * element_size + c for e in sorted(element_indices) for c in range(element_size)]


def slice_linear(layer: nn.Linear, out_index=None, in_index=None) -> nn.Linear:
    """Keep rows ``out_index`` (output features) and/or columns ``in_index`` (input features)."""
    if not isinstance(layer, nn.Linear):
        raise TypeError(f"slice_linear expects nn.Linear, got {type(layer).__name__}")
    if out_index is not None:
        index = _index(out_index, layer.out_features, "output features")
        layer.weight = _take(layer.weight, 0, index)
        layer.bias = _take(layer.bias, 0, index)
        layer.out_features = index.numel()
    if in_index is not None:
        index = _index(in_index, layer.in_features, "input features")
        layer.weight = _take(layer.weight, 1, index)
        layer.in_features = index.numel()
    return layer


def slice_conv2d(layer: nn.Conv2d, out_index=None, in_index=None) -> nn.Conv2d:
    """Keep output channels ``out_index`` and/or input channels ``in_index`` of an ungrouped conv."""
    if not isinstance(layer, nn.Conv2d):
        raise TypeError(f"slice_conv2d expects nn.Conv2d, got {type(layer).__name__}")
    if layer.groups != 1:
        raise ValueError("slice_conv2d supports groups=1 convolutions only")
    if out_index is not None:
        index = _index(out_index, layer.out_channels, "output channels")
        layer.weight = _take(layer.weight, 0, index)
        layer.bias = _take(layer.bias, 0, index)
        layer.out_channels = index.numel()
    if in_index is not None:
        index = _index(in_index, layer.in_channels, "input channels")
        layer.weight = _take(layer.weight, 1, index)
        layer.in_channels = index.numel()
    return layer


def slice_group_norm(layer: nn.GroupNorm, group_index) -> nn.GroupNorm:
    """Keep whole groups of a GroupNorm (statistics are per group, so kept groups are unchanged)."""
    if not isinstance(layer, nn.GroupNorm):
        raise TypeError(f"slice_group_norm expects nn.GroupNorm, got {type(layer).__name__}")
    groups = _index(group_index, layer.num_groups, "groups")
    size = layer.num_channels // layer.num_groups
    channels = torch.as_tensor(select_channels(groups.tolist(), size), dtype=torch.long, device="cpu")
    if layer.affine:
        layer.weight = _take(layer.weight, 0, channels)
        layer.bias = _take(layer.bias, 0, channels)
    layer.num_groups = groups.numel()
    layer.num_channels = channels.numel()
    return layer
