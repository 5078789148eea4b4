"""The world: a procedural, captioned 64x64 image dataset in four categories.

Every sample is drawn from closed vocabularies (shapes, colours, backgrounds, words), so its
caption is fully described by a flat dict of attributes that :mod:`aptp.world.evaluator` can read
back from an image. Categories, in increasing difficulty:

- ``single``: one object, e.g. "a red circle on a white background".
- ``two``: two objects in a spatial relation, e.g. "a red circle left of a blue square on a gray background".
- ``count``: one to four identical objects, e.g. "three green stars on a black background".
- ``text``: a short word, e.g. 'the word "SUN" in white on a blue background'.

Each distinct scene goes to exactly one split (``train``/``val``/``test``, about 80/10/10) by a
stable hash, so the splits never share prompts. Sample ``i`` of ``(split, seed)`` is rendered
from its own seeded RNG: the same arguments always give the same images and prompts.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import random
import shutil
import uuid
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Sequence

from PIL import Image, ImageDraw, ImageFont

from aptp.utils import APTPError

IMAGE_SIZE = 64
# Shapes are drawn at SUPERSAMPLE x the size and downsampled with LANCZOS for anti-aliased edges.
SUPERSAMPLE = 4

CATEGORIES = ("single", "two", "count", "text")
SPLITS = ("train", "val", "test")
# Cumulative percentage bounds of the hash buckets: train < 80 <= val < 90 <= test.
SPLIT_BOUNDS = {"train": (0, 80), "val": (80, 90), "test": (90, 100)}

SHAPES = ("circle", "square", "triangle", "star", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars", "cross": "crosses"}
PALETTE = {
    "red": (215, 40, 40),
    "orange": (245, 140, 25),
    "yellow": (240, 215, 40),
    "green": (40, 160, 70),
    "blue": (40, 90, 215),
    "purple": (150, 60, 190),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "white", "black")
BACKGROUNDS = ("white", "black", "gray", "blue")
# Smallest RGB distance between an object (or word) colour and its background; drops pairs such
# as purple on blue that are hard to see, as well as identical pairs.
MIN_CONTRAST = 100.0

RELATIONS = ("left of", "right of", "above", "below")
# "A right of B" shows the same scene as "B left of A": both are keyed by the left/above form.
MIRRORED_RELATIONS = {"right of": "left of", "below": "above"}
COUNTS = (1, 2, 3, 4)
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
WORDS = (
    "HI", "GO", "UP", "NO", "OK", "AI", "ME", "WE",
    "SUN", "CAT", "DOG", "RED", "BOX", "CAR", "BUS", "SKY", "SEA", "TOP", "MAP", "PEN", "CUP", "HAT",
    "KEY", "OWL", "FOX", "BEE", "ICE", "ART", "JOY", "ZOO", "YES", "WIN", "MIX", "JAM", "VAN", "EGG",
)  # fmt: skip

# The attribute keys of each category, in the order they appear in the prompt.
ATTRIBUTE_KEYS = {
    "single": ("shape", "color", "background"),
    "two": ("shape1", "color1", "relation", "shape2", "color2", "background"),
    "count": ("count", "shape", "color", "background"),
    "text": ("word", "color", "background"),
}

# Object sizes (bounding-box side in output pixels) per category, and the gap kept between objects.
SINGLE_SIZE = (22.0, 38.0)
TWO_SIZE = (15.0, 22.0)
COUNT_SIZE = {1: (14.0, 20.0), 2: (14.0, 20.0), 3: (12.0, 18.0), 4: (11.0, 16.0)}
BORDER = 2.0
OBJECT_GAP = 3.0
# Cap height of the text in output pixels (about 16 px for three letters, larger for two) and the widest a word may be.
TEXT_FONT_SIZE = {2: 30.0, 3: 24.0}
TEXT_SIZE_JITTER = (0.9, 1.05)
TEXT_MAX_WIDTH = 58.0
# Outline width as a fraction of the font size.
TEXT_STROKE = 0.035
PLACEMENT_TRIES = 200
PNG_COMPRESS_LEVEL = 6
PREVIEW_PER_CATEGORY = 8
PREVIEW_SCALE = 2
PREVIEW_PADDING = 2
PREVIEW_PADDING_COLOR = (60, 60, 60)


@dataclass(frozen=True)
class WorldSample:
    """One captioned image of the world."""

    prompt: str
    category: str
    attributes: dict
    image: Image.Image


def contrast(color: str, background: str) -> float:
    return math.dist(PALETTE[color], PALETTE[background])


def visible_pairs() -> list[tuple[str, str]]:
    """All (colour, background) pairs with enough contrast to be clearly visible."""
    return [(c, b) for b in BACKGROUNDS for c in COLORS if contrast(c, b) >= MIN_CONTRAST]


def category_of(attributes: dict) -> str:
    """The category whose attribute keys are exactly those of ``attributes``."""
    for category, keys in ATTRIBUTE_KEYS.items():
        if set(attributes) == set(keys):
            return category
    raise APTPError(f"attributes {sorted(attributes)} match no world category")


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def make_prompt(attributes: dict) -> str:
    """The caption of a scene, e.g. ``{"shape": "circle", ...} -> "a red circle on a white background"``."""
    a = attributes
    on_background = f"on a {a['background']} background"
    category = category_of(a)
    if category == "single":
        return f"{article(a['color'])} {a['color']} {a['shape']} {on_background}"
    if category == "two":
        first = f"{article(a['color1'])} {a['color1']} {a['shape1']}"
        second = f"{article(a['color2'])} {a['color2']} {a['shape2']}"
        return f"{first} {a['relation']} {second} {on_background}"
    if category == "count":
        noun = a["shape"] if a["count"] == 1 else PLURALS[a["shape"]]
        return f"{NUMBER_WORDS[a['count']]} {a['color']} {noun} {on_background}"
    return f'the word "{a["word"]}" in {a["color"]} {on_background}'


def canonical_attributes(attributes: dict) -> dict:
    """The same scene with a mirrored relation rewritten in its left-of/above form (objects swapped)."""
    relation = attributes.get("relation")
    if relation not in MIRRORED_RELATIONS:
        return dict(attributes)
    a = attributes
    return {
        "shape1": a["shape2"], "color1": a["color2"], "relation": MIRRORED_RELATIONS[relation],
        "shape2": a["shape1"], "color2": a["color1"], "background": a["background"],
    }  # fmt: skip


def split_of(attributes: dict) -> str:
    """The split a scene belongs to, from a stable hash of its canonical prompt.

    Hashing the canonical prompt keeps "A left of B" and "B right of A" in the same split.
    """
    key = make_prompt(canonical_attributes(attributes)).encode()
    bucket = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") % 100
    return next(split for split, (low, high) in SPLIT_BOUNDS.items() if low <= bucket < high)


def all_scenes(category: str) -> list[dict]:
    """Every distinct scene (attribute dict) of a category, in a fixed order."""
    pairs = visible_pairs()
    if category == "single":
        return [{"shape": s, "color": c, "background": b} for s, (c, b) in itertools.product(SHAPES, pairs)]
    if category == "count":
        return [
            {"count": n, "shape": s, "color": c, "background": b}
            for n, s, (c, b) in itertools.product(COUNTS, SHAPES, pairs)
        ]
    if category == "text":
        return [{"word": w, "color": c, "background": b} for w, (c, b) in itertools.product(WORDS, pairs)]
    if category == "two":
        colors_on = {b: [c for c, bb in pairs if bb == b] for b in BACKGROUNDS}
        scenes = []
        for b, relation in itertools.product(BACKGROUNDS, RELATIONS):
            objects = list(itertools.product(SHAPES, colors_on[b]))
            for (s1, c1), (s2, c2) in itertools.permutations(objects, 2):
                scenes.append(
                    {"shape1": s1, "color1": c1, "relation": relation, "shape2": s2, "color2": c2, "background": b}
                )
        return scenes
    raise APTPError(f"unknown world category {category!r}; choose from {', '.join(CATEGORIES)}")


@lru_cache(maxsize=None)
def split_scenes(category: str, split: str) -> tuple[dict, ...]:
    """The scenes of one category that belong to ``split``."""
    return tuple(scene for scene in all_scenes(category) if split_of(scene) == split)


# ---------------------------------------------------------------------------------------------
# Rendering. Coordinates are in output pixels (0..IMAGE_SIZE); drawing scales them by SUPERSAMPLE.


def shape_polygon(shape: str, cx: float, cy: float, size: float) -> list[tuple[float, float]]:
    """Outline of a shape whose bounding box is a ``size`` x ``size`` square centred at (cx, cy)."""
    r = size / 2
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "cross":
        t = r * 0.36
        return [
            (cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t), (cx + r, cy + t), (cx + t, cy + t),
            (cx + t, cy + r), (cx - t, cy + r), (cx - t, cy + t), (cx - r, cy + t), (cx - r, cy - t), (cx - t, cy - t),
        ]  # fmt: skip
    if shape == "star":
        # A five-pointed star fills less of its box than the other shapes; a fat inner radius keeps it solid.
        inner = r * 0.48
        # Shift down so the star's ink box (top point to the lower points) is centred.
        cy += r * (1 - math.cos(math.pi / 5)) / 2
        return [
            (cx + radius * math.sin(k * math.pi / 5), cy - radius * math.cos(k * math.pi / 5))
            for k, radius in zip(range(10), itertools.cycle((r, inner)))
        ]
    raise APTPError(f"unknown shape {shape!r}")


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, color: str, cx: float, cy: float, size: float) -> None:
    fill = PALETTE[color]
    k = SUPERSAMPLE
    if shape == "circle":
        r = size / 2
        draw.ellipse([(cx - r) * k, (cy - r) * k, (cx + r) * k, (cy + r) * k], fill=fill)
    else:
        draw.polygon([(x * k, y * k) for x, y in shape_polygon(shape, cx, cy, size)], fill=fill)


def place_apart(rng: random.Random, count: int, size_range: tuple[float, float]) -> list[tuple[float, float, float]]:
    """``count`` non-overlapping (cx, cy, size) boxes inside the image, all of one size."""
    size = rng.uniform(*size_range)
    while True:
        low, high = BORDER + size / 2, IMAGE_SIZE - BORDER - size / 2
        for _ in range(PLACEMENT_TRIES):
            centres = [(rng.uniform(low, high), rng.uniform(low, high)) for _ in range(count)]
            if all(math.dist(p, q) >= size + OBJECT_GAP for p, q in itertools.combinations(centres, 2)):
                return [(x, y, size) for x, y in centres]
        # Rarely the boxes do not fit at this size; a slightly smaller size always ends the loop.
        size *= 0.9


def place_pair(rng: random.Random, relation: str) -> list[tuple[float, float, float]]:
    """Boxes of the first and second object so that "first <relation> second" holds unambiguously.

    The pair is laid out left-to-right, then swapped for "right of" and transposed for above/below.
    The offset across the relation axis stays under half the offset along it.
    """
    while True:
        s1, s2 = rng.uniform(*TWO_SIZE), rng.uniform(*TWO_SIZE)
        min_gap = (s1 + s2) / 2 + OBJECT_GAP
        x1 = rng.uniform(BORDER + s1 / 2, IMAGE_SIZE - BORDER - s2 / 2 - min_gap)
        x2 = rng.uniform(x1 + min_gap, IMAGE_SIZE - BORDER - s2 / 2)
        y1 = rng.uniform(BORDER + s1 / 2, IMAGE_SIZE - BORDER - s1 / 2)
        y2 = rng.uniform(BORDER + s2 / 2, IMAGE_SIZE - BORDER - s2 / 2)
        if abs(y2 - y1) <= (x2 - x1) / 2:
            break
    first, second = (x1, y1, s1), (x2, y2, s2)
    if relation in MIRRORED_RELATIONS:
        first, second = (IMAGE_SIZE - x1, y1, s1), (IMAGE_SIZE - x2, y2, s2)
    if relation in ("above", "below"):
        first, second = (first[1], first[0], s1), (second[1], second[0], s2)
    return [first, second]


@lru_cache(maxsize=64)
def font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def draw_word(draw: ImageDraw.ImageDraw, rng: random.Random, word: str, color: str) -> None:
    k = SUPERSAMPLE
    size = TEXT_FONT_SIZE[min(len(word), 3)] * rng.uniform(*TEXT_SIZE_JITTER)
    # The default font is thin at this size; an outline in the same colour thickens the strokes.
    stroke = round(size * k * TEXT_STROKE)
    left, top, right, bottom = font(round(size * k)).getbbox(word, stroke_width=stroke)
    if right - left > TEXT_MAX_WIDTH * k:
        size *= TEXT_MAX_WIDTH * k / (right - left)
        stroke = round(size * k * TEXT_STROKE)
        left, top, right, bottom = font(round(size * k)).getbbox(word, stroke_width=stroke)
    width, height = (right - left) / k, (bottom - top) / k
    x = rng.uniform(BORDER, IMAGE_SIZE - BORDER - width)
    y = rng.uniform(BORDER, IMAGE_SIZE - BORDER - height)
    # getbbox measures the ink from the text origin; subtract its offset to put the ink at (x, y).
    draw.text(
        (x * k - left, y * k - top), word, fill=PALETTE[color], font=font(round(size * k)),
        stroke_width=stroke, stroke_fill=PALETTE[color],
    )  # fmt: skip


def render(attributes: dict, rng: random.Random) -> Image.Image:
    """Draw one 64x64 RGB image of a scene, with positions and sizes drawn from ``rng``."""
    a = attributes
    category = category_of(a)
    canvas = Image.new("RGB", (IMAGE_SIZE * SUPERSAMPLE,) * 2, PALETTE[a["background"]])
    draw = ImageDraw.Draw(canvas)
    if category == "single":
        for cx, cy, size in place_apart(rng, 1, SINGLE_SIZE):
            draw_shape(draw, a["shape"], a["color"], cx, cy, size)
    elif category == "count":
        for cx, cy, size in place_apart(rng, a["count"], COUNT_SIZE[a["count"]]):
            draw_shape(draw, a["shape"], a["color"], cx, cy, size)
    elif category == "two":
        first, second = place_pair(rng, a["relation"])
        draw_shape(draw, a["shape1"], a["color1"], *first)
        draw_shape(draw, a["shape2"], a["color2"], *second)
    else:
        draw_word(draw, rng, a["word"], a["color"])
    return canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)


# ---------------------------------------------------------------------------------------------
# Sampling and export.


def check_split_and_categories(split: str, categories: Sequence[str] | None) -> tuple[str, ...]:
    if split not in SPLITS:
        raise APTPError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    categories = tuple(CATEGORIES if categories is None else categories)
    unknown = [c for c in categories if c not in CATEGORIES]
    if not categories or unknown:
        raise APTPError(f"unknown world categories {unknown or '(none given)'}; choose from {', '.join(CATEGORIES)}")
    return categories


def sample(index: int, split: str = "train", seed: int = 0, categories: Sequence[str] | None = None) -> WorldSample:
    """Sample ``index`` of a split: categories cycle in order, and each sample has its own seeded RNG."""
    categories = check_split_and_categories(split, categories)
    category = categories[index % len(categories)]
    # Seeding random.Random with a str hashes it with SHA-512: stable across processes and platforms.
    rng = random.Random(f"aptp-world/{split}/{seed}/{index}")
    attributes = dict(rng.choice(split_scenes(category, split)))
    return WorldSample(make_prompt(attributes), category, attributes, render(attributes, rng))


def iter_samples(split: str = "train", seed: int = 0, categories: Sequence[str] | None = None) -> Iterator[WorldSample]:
    """Endless stream of samples ``0, 1, 2, ...`` of a split (a balanced category mix)."""
    categories = check_split_and_categories(split, categories)
    for index in itertools.count():
        yield sample(index, split, seed, categories)


def generate(
    n: int, split: str = "train", seed: int = 0, categories: Sequence[str] | None = None
) -> list[WorldSample]:
    """The first ``n`` samples of a split; the same arguments always give identical images and prompts."""
    if n < 0:
        raise APTPError(f"number of samples must be >= 0, got {n}")
    return list(itertools.islice(iter_samples(split, seed, categories), n))


def metadata_record(file_name: str, world_sample: WorldSample) -> dict:
    """One ``metadata.jsonl`` line: file name, caption, category, and every attribute column.

    Every line carries every attribute key (null where it does not apply) so tabular loaders such as
    the Hugging Face imagefolder builder infer a single schema for the whole file.
    """
    columns = dict.fromkeys(sorted({k for keys in ATTRIBUTE_KEYS.values() for k in keys}))
    columns.update(world_sample.attributes)
    return {"file_name": file_name, "text": world_sample.prompt, "category": world_sample.category, **columns}


def export_imagefolder(out_dir: str | os.PathLike, n: int, split: str = "train", seed: int = 0) -> Path:
    """Write ``n`` samples as PNGs plus ``metadata.jsonl`` (Hugging Face imagefolder layout) to ``out_dir``.

    The export is built in a temporary sibling directory and moved into place with ``os.replace``,
    so an interrupted export never leaves a partial ``out_dir``. ``out_dir`` must not exist or be an
    empty directory. The same arguments give byte-identical files.
    """
    out_dir = Path(out_dir)
    if n <= 0:
        raise APTPError(f"number of images must be > 0, got {n}")
    check_split_and_categories(split, None)
    if out_dir.exists() and not out_dir.is_dir():
        raise APTPError(f"{out_dir} exists and is a file; give a directory path")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise APTPError(f"{out_dir} is not empty; give a new or empty directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.{uuid.uuid4().hex[:12]}.partial"
    staging.mkdir()
    try:
        records = []
        width = max(5, len(str(n - 1)))
        for index, world_sample in enumerate(itertools.islice(iter_samples(split, seed), n)):
            file_name = f"{index:0{width}d}.png"
            world_sample.image.save(staging / file_name, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
            records.append(json.dumps(metadata_record(file_name, world_sample)))
        (staging / "metadata.jsonl").write_text("\n".join(records) + "\n", encoding="utf-8")
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def preview_grid(
    per_category: int = PREVIEW_PER_CATEGORY, split: str = "train", seed: int = 0, scale: int = PREVIEW_SCALE
) -> Image.Image:
    """A grid image with one row per category and ``per_category`` samples in each row, upscaled by ``scale``."""
    if per_category <= 0 or scale <= 0:
        raise APTPError(f"per-category count and scale must be > 0, got {per_category} and {scale}")
    cell = IMAGE_SIZE * scale
    pad = PREVIEW_PADDING
    grid = Image.new(
        "RGB", (per_category * (cell + pad) + pad, len(CATEGORIES) * (cell + pad) + pad), PREVIEW_PADDING_COLOR
    )
    for row, category in enumerate(CATEGORIES):
        for col, world_sample in enumerate(generate(per_category, split, seed, [category])):
            tile = world_sample.image.resize((cell, cell), Image.Resampling.NEAREST)
            grid.paste(tile, (pad + col * (cell + pad), pad + row * (cell + pad)))
    return grid
