"""Encode a captioned dataset once: VAE latent distributions, the denoiser's conditioning (the family's
:meth:`~aptp.families.base.ModelFamily.encode_prompts`) and (optionally) sentence embeddings per distinct
prompt, cached in one safetensors file.

Training steps then only index tensors; no image decoding, VAE or text encoder on the hot path.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..data import collate
from ..utils import APTPError, ordinary_permissions, write_json_atomic

EMPTY_PROMPT_INDEX = 0  # the empty prompt (classifier-free guidance) is always entry 0
CONDITIONING = "conditioning."  # prefix of the cached conditioning tensors


def conditioning_of(cache: dict, prompt_rows: torch.Tensor, device) -> dict[str, torch.Tensor]:
    """The cached conditioning of the prompts ``prompt_rows`` (indices into the prompt list), in float32."""
    return {key[len(CONDITIONING):]: value[prompt_rows].float().to(device)
            for key, value in cache.items() if key.startswith(CONDITIONING)}


def data_source(model: str, model_identity: dict, data: str, dataset, resolution: int, seed: int,
                prompt_encoder: str, split: str) -> dict:
    """What an encoded cache was made from (the base model's and the dataset's identity included); a cache
    is reused only for the same source."""
    return {"model": model, "base_model": model_identity, "data": data, "records": dataset.identity(),
            "resolution": resolution, "seed": seed, "prompt_encoder": prompt_encoder, "split": split,
            "size": len(dataset)}


def save_tensors_atomic(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """A safetensors file written through a temporary sibling (readers never see half of it), with
    ordinary file modes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    save_file(tensors, temporary)
    ordinary_permissions(temporary)
    temporary.replace(path)


def copy_cache(source_file: str | Path, target_file: str | Path) -> bool:
    """Start ``target_file`` from another run's encoded cache (tensors and their JSON), unless it exists.
    :func:`encode_dataset` still checks the source, so a copy that does not match is re-encoded."""
    source, target = Path(source_file), Path(target_file)
    pairs = ((source.with_suffix(".json"), target.with_suffix(".json")), (source, target))
    if target.exists() or not all(src.is_file() for src, _ in pairs):
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    for src, dst in pairs:
        temporary = dst.with_name(dst.name + ".tmp")
        shutil.copyfile(src, temporary)
        temporary.replace(dst)
    return True


@torch.no_grad()
def encode_dataset(dataset, vae, encode_prompts: Callable[[list[str]], dict[str, torch.Tensor]], cache_file: str | Path,
                   encode_sentences: Callable[[list[str]], torch.Tensor] | None = None,
                   batch_size: int = 64, source: dict | None = None) -> dict[str, torch.Tensor]:
    """Tensors: ``latent_mean``/``latent_std`` (N, C, h, w), ``prompt_index`` (N,), ``dataset_index``
    (N,), ``conditioning.NAME`` (P, ...) fp16 for every tensor ``encode_prompts`` gives and, with
    ``encode_sentences``, ``prompt_embeddings`` (P, E);
    lists (kept in a JSON file beside the tensors): ``prompts`` (P) and ``categories`` (N).
    Unreadable images are dropped (``skipped`` holds their count). A cache of the same length and the same
    ``source`` (what the data and encoders are, e.g. data path, size, seed, model) is reused.
    """
    cache_file = Path(cache_file)
    text_file = cache_file.with_suffix(".json")
    source = json.loads(json.dumps(source or {}))
    if cache_file.is_file() and text_file.is_file():
        cache = load_file(cache_file)
        texts = json.loads(text_file.read_text())
        if (int(cache["requested"]) == len(dataset) and texts.pop("source", {}) == source
                and any(key.startswith(CONDITIONING) for key in cache)):
            return {**cache, **texts}
    # Its own generator: iterating a DataLoader otherwise draws from the global RNG, so whether a cache
    # existed would change everything seeded after it.
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate, num_workers=0,
                                         generator=torch.Generator())
    means, stds, prompt_index, dataset_index, prompts, skipped = [], [], [], [], {"": EMPTY_PROMPT_INDEX}, 0
    categories = []
    for batch in tqdm(loader, desc="encoding dataset", unit="batch"):
        skipped += batch["skipped"]
        if batch["pixel_values"] is None:
            continue
        posterior = vae.encode(batch["pixel_values"].to(vae.device, vae.dtype)).latent_dist
        means.append(posterior.mean.float().cpu())
        stds.append(posterior.std.float().cpu())
        prompt_index += [prompts.setdefault(p, len(prompts)) for p in batch["prompt"]]
        categories += batch["category"]
        dataset_index.append(batch["index"])
    if not means:
        raise APTPError("no readable images in the dataset")
    ordered = list(prompts)
    chunks = [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]
    cache = {
        "latent_mean": torch.cat(means).contiguous(),
        "latent_std": torch.cat(stds).contiguous(),
        "prompt_index": torch.tensor(prompt_index),
        "dataset_index": torch.cat(dataset_index),
        "requested": torch.tensor(len(dataset)),
        "skipped": torch.tensor(skipped),
    }
    encoded = [encode_prompts(c) for c in chunks]
    for name in encoded[0]:
        cache[CONDITIONING + name] = torch.cat([e[name].float().cpu() for e in encoded]).half().contiguous()
    if encode_sentences is not None:
        cache["prompt_embeddings"] = torch.cat([encode_sentences(c).float().cpu() for c in chunks]).contiguous()
    texts = {"prompts": ordered, "categories": categories}
    save_tensors_atomic(cache, cache_file)
    write_json_atomic(text_file, {**texts, "source": source})  # last: a cache without it is not reused
    return {**cache, **texts}
