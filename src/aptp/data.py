"""Captioned-image datasets: an image folder with ``metadata.jsonl``, MS-COCO captions, or a
Conceptual Captions TSV.

Every source becomes a list of :class:`CaptionRecord`; :class:`CaptionedImages` loads, resizes and
centre-crops the images. A missing or corrupt image is skipped and counted (``collate`` drops it
and reports how many were dropped), never a crash.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .utils import APTPError

CAPTION_KEYS = ("text", "caption", "prompt")


@dataclass(frozen=True)
class CaptionRecord:
    image: Path
    caption: str
    category: str | None = None
    attributes: dict = field(default_factory=dict, hash=False, compare=False)


@dataclass
class LoadReport:
    """What a source held and what was left out, with reasons."""

    records: list[CaptionRecord]
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def summary(self) -> str:
        parts = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))
        return f"{len(self.records)} captioned images" + (f" (skipped: {parts})" if parts else "")


def _caption(entry: dict) -> str | None:
    for key in CAPTION_KEYS:
        value = entry.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def load_imagefolder(folder: str | os.PathLike) -> LoadReport:
    """Hugging Face imagefolder layout: images plus ``metadata.jsonl`` with ``file_name`` and a caption
    (``text``, ``caption`` or ``prompt``); other keys are kept as attributes."""
    folder = Path(folder)
    metadata = folder / "metadata.jsonl"
    if not metadata.is_file():
        raise APTPError(f"{folder}: no metadata.jsonl (expected a Hugging Face imagefolder)")
    report = LoadReport([])
    with metadata.open(encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                report.skip("malformed metadata lines")
                continue
            caption = _caption(entry) if isinstance(entry, dict) else None
            if caption is None or not isinstance(entry.get("file_name"), str):
                report.skip("entries without file_name or caption")
                continue
            path = folder / entry["file_name"]
            if not path.is_file():
                report.skip("missing images")
                continue
            attributes = {k: v for k, v in entry.items() if k not in ("file_name", *CAPTION_KEYS)}
            report.records.append(CaptionRecord(path, caption, attributes.pop("category", None), attributes))
    return report


def load_coco(root: str | os.PathLike, split: str = "val2014", one_caption_per_image: bool = False) -> LoadReport:
    """MS-COCO 2014: ``annotations/captions_<split>.json`` and images in ``<split>/``."""
    root = Path(root)
    annotations = root / "annotations" / f"captions_{split}.json"
    if not annotations.is_file():
        raise APTPError(f"{root}: no {annotations.relative_to(root)} (expected an MS-COCO 2014 folder)")
    try:
        data = json.loads(annotations.read_text(encoding="utf-8"))
        files = {image["id"]: image["file_name"] for image in data["images"]}
        captions = data["annotations"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise APTPError(f"{annotations} is not a COCO captions file ({error})") from None
    report, seen = LoadReport([]), set()
    for entry in captions:
        image_id, caption = entry.get("image_id"), (entry.get("caption") or "").strip()
        if image_id not in files or not caption:
            report.skip("annotations without image or caption")
            continue
        if one_caption_per_image and image_id in seen:
            continue
        path = root / split / files[image_id]
        if not path.is_file():
            report.skip("missing images")
            continue
        seen.add(image_id)
        report.records.append(CaptionRecord(path, caption))
    return report


def load_cc3m(tsv: str | os.PathLike, image_folder: str | os.PathLike) -> LoadReport:
    """Conceptual Captions: a TSV of ``caption<TAB>image file`` rows (file relative to ``image_folder``)."""
    tsv, image_folder = Path(tsv), Path(image_folder)
    if not tsv.is_file():
        raise APTPError(f"no such TSV file: {tsv}")
    report = LoadReport([])
    with tsv.open(encoding="utf-8", newline="") as handle:
        for row in csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE):
            if len(row) < 2 or not row[0].strip():
                report.skip("malformed rows")
                continue
            path = image_folder / row[1].strip()
            if not path.is_file():
                report.skip("missing images")
                continue
            report.records.append(CaptionRecord(path, row[0].strip()))
    return report


def load_image(path: Path, resolution: int) -> torch.Tensor | None:
    """RGB image resized (shorter side) and centre-cropped to ``resolution``, in [-1, 1]; None if unreadable."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError):
        return None
    scale = resolution / min(image.size)
    if scale != 1:
        size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
        image = image.resize(size, Image.BICUBIC)
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 127.5 - 1.0


class CaptionedImages(torch.utils.data.Dataset):
    """Images at ``resolution`` with their captions; an unreadable image yields ``None`` pixels."""

    def __init__(self, records: list[CaptionRecord], resolution: int):
        if not records:
            raise APTPError("the dataset holds no captioned images")
        self.records = records
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.records)

    def identity(self) -> dict:
        """The record count and a hash of every image file name and caption, in order."""
        digest = hashlib.sha256()
        for record in self.records:
            digest.update(f"{record.image.name}\0{record.caption}\n".encode())
        return {"records": len(self.records), "captions": digest.hexdigest()[:16]}

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        return {"index": index, "prompt": record.caption, "category": record.category,
                "pixel_values": load_image(record.image, self.resolution)}


def collate(items: list[dict]) -> dict:
    """Batch the readable items; ``skipped`` counts the corrupt images dropped from this batch."""
    kept = [item for item in items if item["pixel_values"] is not None]
    return {
        "index": torch.tensor([item["index"] for item in kept], dtype=torch.long),
        "prompt": [item["prompt"] for item in kept],
        "category": [item["category"] for item in kept],
        "pixel_values": torch.stack([item["pixel_values"] for item in kept]) if kept else None,
        "skipped": len(items) - len(kept),
    }


class WorldImages(torch.utils.data.Dataset):
    """The first ``size`` samples of a world split, in the same item format as :class:`CaptionedImages`."""

    def __init__(self, size: int, split: str = "train", seed: int = 0):
        if size < 1:
            raise APTPError(f"world dataset size must be >= 1, got {size}")
        self.size, self.split, self.seed = size, split, seed

    def __len__(self) -> int:
        return self.size

    def identity(self) -> dict:
        """The world's captions are fixed by the split and seed."""
        return {"records": self.size, "captions": f"world {self.split} split, seed {self.seed}"}

    def __getitem__(self, index: int) -> dict:
        from .world.generator import sample

        item = sample(index, self.split, self.seed)
        pixels = torch.from_numpy(np.asarray(item.image.convert("RGB")).copy()).permute(2, 0, 1).float()
        return {"index": index, "prompt": item.prompt, "category": item.category, "pixel_values": pixels / 127.5 - 1}
