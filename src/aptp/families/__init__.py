"""Model families: the only code that knows concrete diffusers architectures.

A family is a module with the same functions (``discover_units``, ``attach_gates``, ``slice_unet``,
``check_consistency``, ``build_macs_model``, ``measure_macs``, ``example_inputs``); adding one is one
file plus one line in ``FAMILIES``.
"""

from __future__ import annotations

from types import ModuleType

from torch import nn

from ..utils import APTPError
from . import unet2d_condition

FAMILIES: dict[str, tuple[type, ModuleType]] = {
    unet2d_condition.NAME: (unet2d_condition.UNet2DConditionModel, unet2d_condition),
}


def family_of(model: nn.Module) -> ModuleType:
    """The family module that knows ``model``'s architecture."""
    for model_class, family in FAMILIES.values():
        if isinstance(model, model_class):
            return family
    raise APTPError(f"no aptp family knows {type(model).__name__}; supported: "
                    + ", ".join(cls.__name__ for cls, _ in FAMILIES.values()))


def family_named(name: str) -> ModuleType:
    try:
        return FAMILIES[name][1]
    except KeyError:
        raise APTPError(f"unknown model family {name!r}; known: {sorted(FAMILIES)}") from None
