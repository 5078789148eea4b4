"""The world: a procedural captioned-image dataset and an evaluator that reads its attributes back.

:mod:`aptp.world.generator` renders the images and captions (PIL only); :mod:`aptp.world.evaluator`
scores images against their prompts with a small CNN (torch).
"""

from aptp.world.generator import (
    ATTRIBUTE_KEYS,
    CATEGORIES,
    SPLITS,
    WorldSample,
    category_of,
    export_imagefolder,
    generate,
    iter_samples,
    make_prompt,
    preview_grid,
    split_of,
)

EVALUATOR_NAMES = ("WorldEvaluator", "attribute_accuracy", "load_evaluator", "train_evaluator", "world_accuracy")

__all__ = [
    "ATTRIBUTE_KEYS", "CATEGORIES", "SPLITS", "WorldSample", "category_of", "export_imagefolder", "generate",
    "iter_samples", "make_prompt", "preview_grid", "split_of", *EVALUATOR_NAMES,
]  # fmt: skip


def __getattr__(name: str):
    # The evaluator imports torch; loading it on first use keeps `aptp world export` quick to start.
    if name in EVALUATOR_NAMES:
        from aptp.world import evaluator

        return getattr(evaluator, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
