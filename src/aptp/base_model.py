"""The base text-to-image pipeline that is pruned: the shipped world teacher or a local diffusers folder of
any registered family."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .families import family_of_pipeline
from .teacher.components import TEACHER_DIR, load_teacher
from .utils import APTPError, folder_identity

WORLD = "world"  # the shipped world teacher (also the name of the world data source)


def model_identity(source: str) -> dict:
    """What the base model is (its configs and weights, see :func:`folder_identity`), for run fingerprints."""
    folder = TEACHER_DIR if source == WORLD else Path(source)
    if not folder.is_dir():
        raise APTPError(f"{source}: no such model folder and not '{WORLD}'")
    return folder_identity(folder)


def load_base_pipeline(source: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """``"world"`` (the shipped world teacher) or a local pipeline folder of a registered family."""
    if source == WORLD:
        return load_teacher(TEACHER_DIR, device, dtype)
    folder = Path(source)
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise APTPError(f"{source}: not a diffusers pipeline folder (no model_index.json) and not '{WORLD}'")
    try:
        index = json.loads(index_file.read_text())
    except json.JSONDecodeError as error:
        raise APTPError(f"{index_file} is not valid JSON ({error.msg})") from None
    if not isinstance(index, dict):
        raise APTPError(f"{index_file} is not a diffusers model index")
    if index.get("text_encoder", [None, None])[1] == "BertModel" and not (folder / "text_encoder").is_dir():
        return load_teacher(folder, device, dtype)  # a world-teacher-style folder: MiniLM from its package
    return family_of_pipeline(str(index.get("_class_name"))).load_pipeline(folder, device, dtype)

