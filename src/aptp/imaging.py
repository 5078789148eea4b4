"""Image helpers shared by commands: tensor/PIL conversion and labelled comparison grids (PIL only)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Float images in [0, 1], (B, 3, H, W) -> PIL images."""
    array = (images.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in array]


def _wrap(text: str, width: int, font, draw: ImageDraw.ImageDraw) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if draw.textlength(candidate, font=font) <= width or not line:
            line = candidate
        else:
            lines.append(line)
            line = word
    return lines + [line] if line else lines


def comparison_grid(labels: Sequence[str], columns: dict[str, Sequence[Image.Image]], scale: int = 2,
                    label_width: int = 300) -> Image.Image:
    """One row per label: the label text, then one image per column (titled at the top)."""
    font = ImageFont.load_default(size=13)
    names = list(columns)
    cell = max(image.width for images in columns.values() for image in images) * scale
    header, pad = 22, 6
    width = label_width + len(names) * (cell + pad) + pad
    height = header + len(labels) * (cell + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(names):
        draw.text((label_width + pad + c * (cell + pad), 4), name, fill="black", font=font)
    for r, label in enumerate(labels):
        top = header + r * (cell + pad)
        for i, line in enumerate(_wrap(label, label_width - 2 * pad, font, draw)[:6]):
            draw.text((pad, top + i * 16), line, fill="black", font=font)
        for c, name in enumerate(names):
            image = columns[name][r].resize((cell, cell), Image.NEAREST)
            canvas.paste(image, (label_width + pad + c * (cell + pad), top))
    return canvas


def save_image_atomic(image: Image.Image, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    image.save(temporary, format="PNG")
    temporary.replace(path)
    return path
