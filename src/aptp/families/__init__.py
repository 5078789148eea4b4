"""Model families: the only code that knows concrete diffusers architectures.

A family is a :class:`~aptp.families.base.ModelFamily` (its docstring is the contract); adding one is one
file in this package plus one entry in ``FAMILIES``.
"""

from __future__ import annotations

from torch import nn

from ..utils import APTPError
from .base import ModelFamily
from .pixart import PixArtFamily
from .sdxl import StableDiffusionXLFamily
from .unet2d_condition import UNet2DConditionFamily

FAMILIES: dict[str, ModelFamily] = {family.name: family for family in (UNet2DConditionFamily(),
                                                                        StableDiffusionXLFamily(), PixArtFamily())}


def family_of(model: nn.Module) -> ModelFamily:
    """The family that knows ``model``'s architecture."""
    for family in FAMILIES.values():
        if family.owns(model):
            return family
    raise APTPError(f"no aptp family knows {type(model).__name__}; supported: "
                    + ", ".join(family.denoiser_class.__name__ for family in FAMILIES.values()))


def family_named(name: str) -> ModelFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        raise APTPError(f"unknown model family {name!r}; known: {sorted(FAMILIES)}") from None


def family_of_base(pipeline) -> ModelFamily:
    """The family of a text-to-image pipeline (found by its denoiser)."""
    for family in FAMILIES.values():
        if family.owns(getattr(pipeline, family.denoiser_attribute, None)):
            return family
    raise APTPError(f"no aptp family knows the denoiser of a {type(pipeline).__name__}")


def family_of_pipeline(class_name: str) -> ModelFamily:
    """The family whose text-to-image pipeline class is named ``class_name`` (a ``model_index.json``'s
    ``_class_name``)."""
    for family in FAMILIES.values():
        if family.pipeline_class.__name__ == class_name:
            return family
    raise APTPError(f"no aptp family serves a {class_name}; supported: "
                    + ", ".join(family.pipeline_class.__name__ for family in FAMILIES.values()))


__all__ = ["FAMILIES", "ModelFamily", "family_named", "family_of", "family_of_base", "family_of_pipeline"]
