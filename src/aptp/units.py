"""Prunable units, their flat gate layout, architectures and the MACs model.

Everything here works on unit names and sizes only; model families produce these objects and
the router consumes them.

* A **unit** is a group of interchangeable elements of one module: GroupNorm groups of a ResNet,
  heads of an attention, chunks of a feed-forward hidden layer (width units), or a whole block that
  can be skipped (a depth unit, one element).
* A **gate vector** holds one value per element of every unit, in layout order: shape ``(B, U)``.
* An **architecture** maps each unit name to the sorted element indices it keeps
  (``[]`` for a skipped block).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import gcd
from typing import Iterable, Mapping, Sequence

import torch

WIDTH_KINDS = ("groups", "heads", "ff")
DEPTH_KINDS = ("resnet", "transformer")

Architecture = dict[str, list[int]]


@dataclass(frozen=True)
class UnitSpec:
    """One prunable unit.

    ``element_size`` is the number of channels (or hidden features) one element covers; depth units
    have one element of size 0. ``parent`` names the depth unit that contains this unit, if any:
    skipping the parent removes this unit as well.
    """

    name: str
    kind: str
    count: int
    element_size: int = 0
    parent: str | None = None

    @property
    def is_depth(self) -> bool:
        return self.kind in DEPTH_KINDS


class UnitLayout:
    """The ordered units of a model and where each sits in a flat gate vector."""

    def __init__(self, units: Iterable[UnitSpec]):
        self.units: list[UnitSpec] = list(units)
        self.offsets: dict[str, int] = {}
        self.by_name: dict[str, UnitSpec] = {}
        offset = 0
        for unit in self.units:
            if unit.name in self.by_name:
                raise ValueError(f"duplicate unit name {unit.name!r}")
            if unit.count < 1:
                raise ValueError(f"unit {unit.name!r} has no elements")
            self.by_name[unit.name] = unit
            self.offsets[unit.name] = offset
            offset += unit.count
        self.num_elements = offset
        for unit in self.units:
            if unit.parent is not None:
                parent = self.by_name.get(unit.parent)
                if parent is None or not parent.is_depth:
                    raise ValueError(f"unit {unit.name!r} names {unit.parent!r} as parent, which is not a depth unit")

    def __len__(self) -> int:
        return len(self.units)

    def __iter__(self):
        return iter(self.units)

    def __getitem__(self, name: str) -> UnitSpec:
        return self.by_name[name]

    def slice_of(self, name: str) -> slice:
        start = self.offsets[name]
        return slice(start, start + self.by_name[name].count)

    def to_dict(self) -> list[dict]:
        return [
            {"name": u.name, "kind": u.kind, "count": u.count, "element_size": u.element_size, "parent": u.parent}
            for u in self.units
        ]

    @classmethod
    def from_dict(cls, items: Sequence[Mapping]) -> "UnitLayout":
        return cls(UnitSpec(**dict(item)) for item in items)

    def dense_gates(self, batch: int | None = None) -> torch.Tensor:
        shape = (self.num_elements,) if batch is None else (batch, self.num_elements)
        return torch.ones(shape)

    # -- architectures ---------------------------------------------------------------------------

    def architecture_from_gates(self, gates: torch.Tensor) -> Architecture:
        """Kept element indices of every unit for one hard 0/1 gate vector of shape ``(U,)``."""
        if gates.ndim != 1 or gates.shape[0] != self.num_elements:
            raise ValueError(f"expected a gate vector of shape ({self.num_elements},), got {tuple(gates.shape)}")
        flat = gates.detach().cpu()
        return {u.name: torch.nonzero(flat[self.slice_of(u.name)] > 0.5).flatten().tolist() for u in self.units}

    def gates_from_architecture(self, architecture: Mapping[str, Sequence[int]]) -> torch.Tensor:
        """Hard gate vector ``(U,)`` of an architecture; units it does not name stay dense."""
        self.validate(architecture)
        gates = torch.ones(self.num_elements)
        for name, kept in architecture.items():
            part = torch.zeros(self.by_name[name].count)
            part[list(kept)] = 1.0
            gates[self.slice_of(name)] = part
        return gates

    def validate(self, architecture: Mapping[str, Sequence[int]]) -> None:
        """Reject unknown units, out-of-range or repeated indices."""
        for name, kept in architecture.items():
            unit = self.by_name.get(name)
            if unit is None:
                raise ValueError(f"architecture names unknown unit {name!r}")
            kept = list(kept)
            if len(set(kept)) != len(kept) or any(not 0 <= k < unit.count for k in kept):
                raise ValueError(f"unit {name!r}: kept indices {kept} must be distinct and in [0, {unit.count})")

    def effective_architecture(self, architecture: Mapping[str, Sequence[int]]) -> Architecture:
        """Complete an architecture: dense where unspecified; units inside a skipped block drop out."""
        self.validate(architecture)
        full = {u.name: sorted(architecture.get(u.name, range(u.count))) for u in self.units}
        for unit in self.units:
            if unit.parent is not None and not full[unit.parent]:
                del full[unit.name]
        return full


@dataclass
class MacsModel:
    """Analytic multiply-accumulate counts of one model at one resolution and text length.

    ``element_macs[e]`` is what removing element ``e`` saves (for a depth unit: its block minus the
    units nested in it); ``parent_index[e]`` is the gate index of the enclosing depth unit or -1.
    ``macs(g) = fixed + sum_e g_e * element_macs_e * g_parent(e)``: linear in every gate, and exact
    for hard gates because a skipped block removes everything inside it.
    """

    layout: UnitLayout
    fixed: float
    element_macs: torch.Tensor
    element_attention_macs: torch.Tensor
    parent_index: torch.Tensor
    fixed_attention: float = 0.0
    sample_size: tuple[int, int] = (0, 0)
    text_length: int = 0
    notes: dict = field(default_factory=dict)

    @property
    def dense(self) -> float:
        return self.fixed + float(self.element_macs.double().sum())

    @property
    def dense_attention(self) -> float:
        """MACs of the attention matmuls (QK^T and AV) in the dense model."""
        return self.fixed_attention + float(self.element_attention_macs.double().sum())

    def unit_macs(self, name: str) -> float:
        """MACs of a whole unit at full width (all its elements)."""
        return float(self.element_macs[self.layout.slice_of(name)].double().sum())

    def _effective(self, gates: torch.Tensor) -> torch.Tensor:
        has_parent = self.parent_index >= 0
        parent = gates[..., self.parent_index.clamp(min=0)]
        return gates * torch.where(has_parent, parent, torch.ones_like(parent))

    def macs(self, gates: torch.Tensor) -> torch.Tensor:
        """MACs for gates of shape ``(U,)`` or ``(B, U)``; differentiable in the gates."""
        weights = self.element_macs.to(device=gates.device, dtype=gates.dtype)
        return self.fixed + (self._effective(gates) * weights).sum(-1)

    def attention_macs(self, gates: torch.Tensor) -> torch.Tensor:
        weights = self.element_attention_macs.to(device=gates.device, dtype=gates.dtype)
        return self.fixed_attention + (self._effective(gates) * weights).sum(-1)

    def fraction(self, gates: torch.Tensor) -> torch.Tensor:
        """MACs as a fraction of the dense model."""
        return self.macs(gates) / self.dense

    def macs_of(self, architecture: Mapping[str, Sequence[int]]) -> float:
        return float(self.macs(self.layout.gates_from_architecture(architecture).double()))

    def removal_saving(self, name: str) -> float:
        """MACs saved by removing a whole unit; for a depth unit, including everything nested in it."""
        saving = self.unit_macs(name)
        if self.layout[name].is_depth:
            saving += sum(self.unit_macs(u.name) for u in self.layout if u.parent == name)
        return saving

    def unit_table(self) -> list[dict]:
        """Per kind: number of units, elements, and the dense MACs share removing all of them saves."""
        rows: dict[str, dict] = {}
        for unit in self.layout:
            row = rows.setdefault(unit.kind, {"kind": unit.kind, "units": 0, "elements": 0, "macs": 0.0})
            row["units"] += 1
            row["elements"] += unit.count
            row["macs"] += self.removal_saving(unit.name)
        for row in rows.values():
            row["share"] = row["macs"] / self.dense
        return list(rows.values())


def round_kept(unit: UnitSpec, kept: int, channel_multiple: int = 8, up: bool = True) -> int:
    """A kept element count of ``unit`` whose channels are a multiple of ``channel_multiple``
    where the unit allows it (whole heads of 64 channels always are; GroupNorm groups of 10 channels
    go in fours), and at least one element."""
    if unit.is_depth or not unit.element_size:
        return kept
    multiple = channel_multiple // gcd(channel_multiple, unit.element_size)
    if multiple > unit.count:
        return max(1, kept)
    rounded = (-(-kept // multiple) if up else round(kept / multiple)) * multiple
    return min(unit.count, max(multiple, rounded))


def uniform_width_architecture(model: MacsModel, target: float | None = None, channel_multiple: int = 8,
                               scores: torch.Tensor | None = None, width: float | None = None) -> Architecture:
    """An architecture at about ``target`` x dense MACs that keeps the same fraction of every width unit
    (given ``width`` instead of ``target``: that fraction of every width unit, no depth unit skipped).

    Each unit keeps its highest-``scores`` elements (one score per gate, e.g. weight magnitudes or
    random numbers; default: the first elements), rounded up so kept channels are multiples of
    ``channel_multiple`` where the unit allows it; depth units are skipped (largest first) only
    when narrowing alone cannot reach the target. Benchmarks and the magnitude / random baselines use it.
    """
    if (target is None) == (width is None):
        raise ValueError("give either target (a MACs fraction) or width (a fraction of every width unit)")
    for name, value in (("target", target), ("width", width)):
        if value is not None and not 0 < value <= 1:
            raise ValueError(f"{name} must be in (0, 1], got {value}")
    if scores is None:
        scores = -torch.arange(model.layout.num_elements, dtype=torch.float64)
    order = {u.name: torch.argsort(scores[model.layout.slice_of(u.name)], descending=True, stable=True)
             for u in model.layout if not u.is_depth}

    def at(ratio: float) -> Architecture:
        arch: Architecture = {}
        for unit in model.layout:
            if unit.is_depth:
                continue
            kept = round_kept(unit, round(ratio * unit.count), channel_multiple)
            arch[unit.name] = sorted(order[unit.name][:kept].tolist())
        return arch

    if width is not None:
        return at(width)
    low, high = 0.0, 1.0
    for _ in range(40):
        middle = (low + high) / 2
        if model.macs_of(at(middle)) / model.dense > target:
            high = middle
        else:
            low = middle
    arch = at(high) if abs(model.macs_of(at(high)) / model.dense - target) < abs(
        model.macs_of(at(low)) / model.dense - target) else at(low)
    depth = sorted((u for u in model.layout if u.is_depth), key=lambda u: -model.removal_saving(u.name))
    for unit in depth:
        if model.macs_of(arch) / model.dense <= target:
            break
        arch[unit.name] = []
    return arch
