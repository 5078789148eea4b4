"""Tiny builders of every registered model family, for the shared contract tests (test_family_contract.py).

Adding a family to ``aptp.families.FAMILIES`` means adding its entry here: the contract suite fails for a
registered family without one."""

import random
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

from conftest import (
    TEXT_LENGTH,
    TINY_UNETS,
    make_pixart_pipeline,
    make_pixart_transformer,
    make_sd2_pipeline,
    make_sdxl_pipeline,
    make_sdxl_unet,
    make_unet,
)
from torch import nn

from aptp.units import UnitLayout


@dataclass(frozen=True)
class TinyFamily:
    denoisers: dict[str, Callable[[], nn.Module]]  # variant -> a tiny random denoiser (every weight matters)
    pipeline: Callable[[Path], Path]  # writes a tiny text-to-image pipeline folder under the path, returns it
    text_length: int  # text tokens of the denoisers' example inputs


TINY_FAMILIES: dict[str, TinyFamily] = {
    "unet2d_condition": TinyFamily({name: partial(make_unet, name) for name in TINY_UNETS}, make_sd2_pipeline,
                                   TEXT_LENGTH),
    "sdxl": TinyFamily({"sdxl": make_sdxl_unet}, make_sdxl_pipeline, TEXT_LENGTH),
    "pixart": TinyFamily({"pixart": make_pixart_transformer}, make_pixart_pipeline, TEXT_LENGTH),
}

DENOISERS = [(family, variant) for family, tiny in TINY_FAMILIES.items() for variant in tiny.denoisers]


def random_architecture(layout: UnitLayout, kinds, seed: int, skip_prob: float = 0.5):
    """Prune a random non-empty subset of every unit of the given kinds; skip depth units at random."""
    rng = random.Random(seed)
    architecture = {}
    for unit in layout:
        if unit.kind not in kinds:
            continue
        if unit.is_depth:
            architecture[unit.name] = [] if rng.random() < skip_prob else [0]
        else:
            keep = rng.randint(1, max(1, unit.count - 1))
            architecture[unit.name] = sorted(rng.sample(range(unit.count), keep))
    return architecture
