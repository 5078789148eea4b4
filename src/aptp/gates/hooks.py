"""Gate hooks.

A :class:`GateSite` says where one unit's gates multiply a tensor: the input or output of a module,
along a channel dimension, each gate covering ``element_size`` consecutive channels (or, for a
depth unit, the whole tensor of a sample). The :class:`GateController` owns the hooks and the
current gate tensor; everything it adds to the model is removed by :meth:`GateController.remove`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

from ..units import UnitLayout


@dataclass(frozen=True)
class GateSite:
    unit: str
    module: nn.Module
    where: str  # "input" (forward pre-hook) or "output" (forward hook)
    dim: int = 1  # channel dimension of the gated tensor; ignored for depth gates
    element_size: int = 0  # channels per gate; 0 = one gate per sample (depth)

    def __post_init__(self):
        if self.where not in ("input", "output"):
            raise ValueError(f"GateSite.where must be 'input' or 'output', got {self.where!r}")


def _expand_batch(gates: torch.Tensor, batch: int) -> torch.Tensor:
    """Match the gate batch to the activation batch.

    Classifier-free guidance concatenates copies of the batch (``[uncond, cond]``), so an activation
    batch that is a multiple of the gate batch repeats the gates in the same tiled order.
    """
    if gates.shape[0] == batch:
        return gates
    if gates.shape[0] == 1 or batch % gates.shape[0] == 0:
        return gates.repeat(batch // gates.shape[0], 1)
    raise ValueError(f"gates for {gates.shape[0]} samples cannot gate a batch of {batch}")


def _apply(site: GateSite, tensor: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    unit_gates = _expand_batch(gates, tensor.shape[0]).to(dtype=tensor.dtype)
    view = [tensor.shape[0]] + [1] * (tensor.ndim - 1)
    if site.element_size:
        dim = site.dim % tensor.ndim
        channels = unit_gates.repeat_interleave(site.element_size, dim=1)
        if channels.shape[1] != tensor.shape[dim]:
            raise ValueError(
                f"gate site of {site.unit!r}: {channels.shape[1]} gated channels but the tensor has "
                f"{tensor.shape[dim]} along dim {dim}"
            )
        view[dim] = channels.shape[1]
        return tensor * channels.view(view)
    return tensor * unit_gates.view(view)


class GateController:
    """Hooks gates into a model. Gates are ``(B, U)`` (per sample) or ``(U,)`` (shared) in layout order.

    With no gates set, the hooks pass tensors through untouched.
    """

    def __init__(self, layout: UnitLayout, sites: Sequence[GateSite]):
        self.layout = layout
        self.sites = list(sites)
        self._gates: torch.Tensor | None = None
        self._handles = []
        for site in self.sites:
            part = layout.slice_of(site.unit)
            if site.where == "input":
                handle = site.module.register_forward_pre_hook(self._make_pre_hook(site, part))
            else:
                handle = site.module.register_forward_hook(self._make_post_hook(site, part))
            self._handles.append(handle)

    def _make_pre_hook(self, site: GateSite, part: slice):
        def hook(module, args):
            if self._gates is None:
                return None
            return (_apply(site, args[0], self._gates[:, part]),) + tuple(args[1:])

        return hook

    def _make_post_hook(self, site: GateSite, part: slice):
        def hook(module, args, output):
            if self._gates is None:
                return None
            return _apply(site, output, self._gates[:, part])

        return hook

    def set(self, gates: torch.Tensor | None) -> None:
        if gates is not None:
            if gates.ndim == 1:
                gates = gates.unsqueeze(0)
            if gates.ndim != 2 or gates.shape[1] != self.layout.num_elements:
                raise ValueError(f"gates must be (B, {self.layout.num_elements}), got {tuple(gates.shape)}")
        self._gates = gates

    @contextmanager
    def use(self, gates: torch.Tensor | None) -> Iterator[None]:
        previous = self._gates
        self.set(gates)
        try:
            yield
        finally:
            self._gates = previous

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._gates = None
