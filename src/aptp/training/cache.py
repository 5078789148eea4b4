"""Encode a captioned dataset once: VAE latent distributions, the denoiser's conditioning (the family's
:meth:`~aptp.families.base.ModelFamily.encode_prompts`) and (optionally) sentence embeddings per distinct
prompt, cached on disk in shards that training reads row by row.

Training steps then only read rows; no image decoding, VAE or text encoder on the hot path, and no process
holds the whole cache in memory. A cache is a folder::

    records-00000.safetensors  latent_mean, latent_std (n, C, h, w) f32, prompt_index, dataset_index (n,) i64
                               of the dataset items [k R, (k + 1) R) (n <= R: unreadable images are dropped)
    prompts-00000.safetensors  conditioning.NAME (m, ...) f16 and prompt_embeddings (m, E) f32 of the
                               prompts [k Q, (k + 1) Q)
    texts.json                 prompts (P) and categories (N)
    index.json                 written last: the source, counts, shards (rows, bytes) and tensors (dtype, row shape)

Every shard is written atomically and records what it was encoded for, so an interrupted encoding resumes
after its last complete shard.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from functools import cached_property
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..data import collate
from ..utils import APTPError, ordinary_permissions, read_json, write_json_atomic

EMPTY_PROMPT_INDEX = 0  # the empty prompt (classifier-free guidance) is always entry 0
CONDITIONING = "conditioning."  # prefix of the cached conditioning tensors
INDEX_FILE, TEXTS_FILE = "index.json", "texts.json"
FORMAT, VERSION = "aptp encoded dataset", 1
RECORDS_PER_SHARD = PROMPTS_PER_SHARD = 1024  # multiples of the encoding batch: the same batches as one pass
GROUPS = ("records", "prompts")
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}


def save_tensors_atomic(tensors: dict[str, torch.Tensor], path: str | Path,
                        metadata: dict[str, str] | None = None) -> None:
    """A safetensors file (with string ``metadata`` in its header) written through a temporary sibling
    (readers never see half of it), with ordinary file modes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    save_file(tensors, temporary, metadata=metadata)
    ordinary_permissions(temporary)
    temporary.replace(path)


def _shard_name(group: str, k: int) -> str:
    return f"{group}-{k:05d}.safetensors"


def _header(path: Path) -> tuple[dict, int]:
    """The safetensors header of ``path`` and the offset of its data; ValueError when it is not a whole one."""
    with open(path, "rb") as file:
        length = int.from_bytes(file.read(8), "little")
        raw = file.read(length) if length < 100_000_000 else b""
        if length == 0 or len(raw) != length:
            raise ValueError("cut short" if length else "no header")
        try:
            header = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError("not a safetensors file") from None
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if os.fstat(file.fileno()).st_size != 8 + length + end:
            raise ValueError("cut short")
    return header, 8 + length


def _shard_info(path: Path, key: str) -> dict | None:
    """What a complete shard of the encoding ``key`` says about itself, or None (missing, damaged, other)."""
    try:
        info = json.loads(_header(path)[0]["__metadata__"]["aptp"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return info if info.get("key") == key else None


class EncodedCache:
    """An encoded dataset (see the module docstring) opened for reading.

    Loaded when opened: the index and ``prompt_index`` (N,). Loaded on first use: ``prompts`` and
    ``categories``. Read from disk on each request, only the rows asked for: every other tensor
    (``latent_mean``, ``latent_std``, ``dataset_index``, ``conditioning.NAME``, ``prompt_embeddings``),
    with :meth:`rows`, or whole with :meth:`tensor`. Reads go through the page cache (plain positioned reads,
    no mapping), so a process's resident memory does not grow with the rows it has touched.
    A missing or damaged file is an :class:`APTPError` naming it and ``command``, which re-makes it.
    """

    def __init__(self, folder: str | Path, command: str = "the command that encoded it"):
        self.folder, self.command = Path(folder), command
        index_file = self.folder / INDEX_FILE
        old = self.folder.with_suffix(".safetensors")
        if not index_file.is_file() and old.is_file():
            raise APTPError(f"{old} is an encoded dataset in the single-file format of earlier versions; "
                            f"run `{command}` again to convert it")
        if not index_file.is_file():
            raise APTPError(f"no encoded dataset in {self.folder} (no {INDEX_FILE}); run `{command}`")
        index = read_json(index_file, "index of an encoded dataset")
        try:
            if index.get("format") != FORMAT or index.get("version") != VERSION:
                raise ValueError("not an index of this version")
            self.source, self.key = index["source"], index["key"]
            self.requested, self.skipped = int(index["requested"]), int(index["skipped"])
            self._tensors = {name: (t["group"], _DTYPES[t["dtype"]], t["dtype"], tuple(t["shape"]))
                             for name, t in index["tensors"].items()}
            self._shards = {g: [(self.folder / s["file"], int(s["rows"]), int(s["bytes"])) for s in index["shards"][g]]
                            for g in GROUPS}
            self._texts_bytes = int(index["texts_bytes"])
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise APTPError(f"{index_file} is damaged ({error}); run `{self.command}` again") from None
        self._offsets = {g: torch.tensor([0] + [rows for _, rows, _ in shards]).cumsum(0) for g, shards in
                         self._shards.items()}
        for path, _, size in [s for g in GROUPS for s in self._shards[g]] + [(self.folder / TEXTS_FILE, 0,
                                                                                  self._texts_bytes)]:
            if not path.is_file():
                raise self._damaged(path, "missing")
            if path.stat().st_size != size:
                raise self._damaged(path, f"{path.stat().st_size} bytes, {size} expected")
        self._headers: dict[Path, tuple[dict, int]] = {}
        self.conditioning = [n[len(CONDITIONING):] for n in self._tensors if n.startswith(CONDITIONING)]
        self.prompt_index = self.tensor("prompt_index")

    def _damaged(self, path: Path, why: str) -> APTPError:
        return APTPError(f"{path} is damaged ({why}); run `{self.command}` again to encode it")

    def __len__(self) -> int:
        """The number of records (encoded images)."""
        return int(self._offsets["records"][-1])

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    @property
    def num_prompts(self) -> int:
        return int(self._offsets["prompts"][-1])

    @cached_property
    def _texts(self) -> dict:
        path = self.folder / TEXTS_FILE
        texts = read_json(path, "prompt list of an encoded dataset")
        if not isinstance(texts, dict) or len(texts.get("prompts", ())) != self.num_prompts or \
                len(texts.get("categories", ())) != len(self):
            raise self._damaged(path, "not the prompts and categories of this dataset")
        return texts

    @property
    def prompts(self) -> list[str]:
        """The distinct prompts, in the order of ``prompt_index``."""
        return self._texts["prompts"]

    @property
    def categories(self) -> list:
        """The category of each record (None where the data have none)."""
        return self._texts["categories"]

    def rows(self, name: str, rows: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Rows ``rows`` (indices along the first dimension) of the tensor ``name``, read from its shards."""
        group, dtype, _, shape = self._tensors[name]
        rows = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
        out = torch.empty((len(rows), *shape), dtype=dtype)
        count = int(self._offsets[group][-1])
        if len(rows) == 0:
            return out
        if int(rows.min()) < 0 or int(rows.max()) >= count:
            raise IndexError(f"rows of {name} must be in [0, {count})")
        raw = out.view(len(rows), -1).view(torch.uint8)  # one row of bytes per requested row
        shards = torch.searchsorted(self._offsets[group], rows, right=True) - 1
        for shard in shards.unique().tolist():
            picked = (shards == shard).nonzero().flatten().tolist()
            local = (rows[picked] - self._offsets[group][shard]).tolist()
            self._read(group, shard, name, [(i, r, 1) for i, r in zip(picked, local)], raw)
        return out

    def tensor(self, name: str) -> torch.Tensor:
        """The whole tensor ``name`` (loaded into memory: only for small ones)."""
        group, dtype, _, shape = self._tensors[name]
        offsets = self._offsets[group]
        out = torch.empty((int(offsets[-1]), *shape), dtype=dtype)
        raw = out.view(len(out), -1).view(torch.uint8)
        for shard, (_, rows, _) in enumerate(self._shards[group]):
            if rows:
                self._read(group, shard, name, [(int(offsets[shard]), 0, rows)], raw)
        return out

    def _read(self, group: str, shard: int, name: str, runs: list[tuple[int, int, int]], raw: torch.Tensor) -> None:
        """Read, for each run (first output row, first shard row, row count), rows of ``name`` into ``raw``."""
        path, rows, _ = self._shards[group][shard]
        row_bytes = raw.shape[1]
        try:
            if path not in self._headers:
                self._headers[path] = _header(path)
            header, start = self._headers[path]
            entry = header[name]
            _, _, code, shape = self._tensors[name]
            if entry["dtype"] != code or tuple(entry["shape"]) != (rows, *shape):
                raise ValueError(f"{name} is not a {code} tensor of shape {[rows, *shape]}")
            with open(path, "rb", buffering=0) as file:
                for first, local, count in runs:
                    file.seek(start + entry["data_offsets"][0] + local * row_bytes)
                    target = raw[first:first + count].numpy()
                    if file.readinto(memoryview(target).cast("B")) != target.nbytes:
                        raise ValueError("cut short")
        except FileNotFoundError:
            raise self._damaged(path, "missing") from None
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise self._damaged(path, str(error) or type(error).__name__) from None


def conditioning_of(cache: EncodedCache, prompt_rows: torch.Tensor, device) -> dict[str, torch.Tensor]:
    """The cached conditioning of the prompts ``prompt_rows`` (indices into the prompt list), in float32."""
    return {name: cache.rows(CONDITIONING + name, prompt_rows).float().to(device) for name in cache.conditioning}


def data_source(model: str, model_identity: dict, data: str, dataset, resolution: int, seed: int,
                prompt_encoder: str, split: str) -> dict:
    """What an encoded cache was made from (the base model's and the dataset's identity included); a cache
    is reused only for the same source."""
    return {"model": model, "base_model": model_identity, "data": data, "records": dataset.identity(),
            "resolution": resolution, "seed": seed, "prompt_encoder": prompt_encoder, "split": split,
            "size": len(dataset)}


def _link_or_copy(source: str, target: str) -> None:
    # Shards are never changed in place (only replaced), so a hard link is as good as a copy.
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def copy_cache(source_folder: str | Path, target_folder: str | Path) -> bool:
    """Start ``target_folder`` from another run's encoded cache, unless it exists. :func:`encode_dataset`
    still checks the source, so a copy that does not match is re-encoded."""
    source, target = Path(source_folder), Path(target_folder)
    if target.exists() or not (source / INDEX_FILE).is_file():
        return False
    temporary = target.with_name(target.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    shutil.copytree(source, temporary, copy_function=_link_or_copy,
                    ignore=shutil.ignore_patterns("*.tmp"))
    temporary.rename(target)
    return True


def _encoding_key(source: dict, requested: int, batch_size: int, records_per_shard: int, prompts_per_shard: int,
                  sentences: bool) -> str:
    """What every shard of one encoding shares; a shard of another key is encoded again."""
    what = {"version": VERSION, "source": source, "requested": requested, "batch_size": batch_size,
            "records_per_shard": records_per_shard, "prompts_per_shard": prompts_per_shard, "sentences": sentences}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:32]


def _prompts_digest(prompts: list[str]) -> str:
    return hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:32]


def _finish(folder: Path, key: str, source: dict, requested: int, prompts: list[str], categories: list,
            shard_sizes: tuple[int, int], command: str) -> EncodedCache:
    """Write the texts and then the index over the shards of the encoding ``key`` in ``folder``, and open it."""
    shards, tensors, skipped = {}, {}, 0
    counts = dict(zip(GROUPS, (-(-total // size) for total, size in zip((requested, len(prompts)), shard_sizes))))
    for group in GROUPS:
        shards[group] = []
        for k in range(counts[group]):
            path = folder / _shard_name(group, k)
            info = _shard_info(path, key)
            if info is None:
                raise APTPError(f"{path} changed while the dataset was encoded; run `{command}` again")
            skipped += info.get("skipped", 0)
            shards[group].append({"file": path.name, "rows": info["rows"], "bytes": path.stat().st_size})
            for name, entry in _header(path)[0].items():
                if name != "__metadata__":
                    tensors.setdefault(name, {"group": group, "dtype": entry["dtype"], "shape": entry["shape"][1:]})
        for stale in folder.glob(f"{group}-*.safetensors"):  # left by a longer encoding of another source
            if stale.name not in {s["file"] for s in shards[group]}:
                stale.unlink()
    texts = write_json_atomic(folder / TEXTS_FILE, {"prompts": prompts, "categories": categories})
    write_json_atomic(folder / INDEX_FILE, {
        "format": FORMAT, "version": VERSION, "key": key, "source": source, "requested": requested,
        "skipped": skipped, "texts_bytes": texts.stat().st_size, "tensors": tensors, "shards": shards})
    return EncodedCache(folder, command)


def _migrate(folder: Path, key: str, source: dict, requested: int, records_per_shard: int,
             prompts_per_shard: int, command: str) -> EncodedCache | None:
    """The single-file cache of earlier versions beside ``folder`` (``folder.safetensors`` + ``.json``),
    if it holds this source, rewritten as shards (and then removed)."""
    old, old_texts = folder.with_suffix(".safetensors"), folder.with_suffix(".json")
    if not (old.is_file() and old_texts.is_file()):
        return None
    try:
        texts = json.loads(old_texts.read_text())
        if texts.pop("source", {}) != source:
            return None
        cache = load_file(old)
        if int(cache["requested"]) != requested or not any(k.startswith(CONDITIONING) for k in cache):
            return None
    except Exception:  # unreadable: encoded again instead
        return None
    prompts, categories = texts["prompts"], texts["categories"]
    shard_of = cache["dataset_index"] // records_per_shard
    known = 1  # prompts numbered so far (the empty prompt is always there)
    for k, start in enumerate(range(0, requested, records_per_shard)):
        picked = torch.nonzero(shard_of == k).flatten()
        index = cache["prompt_index"][picked]
        seen = max(known, int(index.max()) + 1 if len(index) else 0)
        info = {"key": key, "rows": len(picked), "skipped": min(records_per_shard, requested - start) - len(picked),
                "new_prompts": prompts[known:seen], "categories": [categories[i] for i in picked.tolist()]}
        known = seen
        save_tensors_atomic({name: cache[name][picked].contiguous() for name in
                             ("latent_mean", "latent_std", "prompt_index", "dataset_index")},
                            folder / _shard_name("records", k), {"aptp": json.dumps(info)})
    per_prompt = [name for name in cache if name.startswith(CONDITIONING) or name == "prompt_embeddings"]
    for k, start in enumerate(range(0, len(prompts), prompts_per_shard)):
        chunk = prompts[start:start + prompts_per_shard]
        info = {"key": key, "rows": len(chunk), "prompts": _prompts_digest(chunk)}
        save_tensors_atomic({name: cache[name][start:start + len(chunk)].contiguous() for name in per_prompt},
                            folder / _shard_name("prompts", k), {"aptp": json.dumps(info)})
    migrated = _finish(folder, key, source, requested, prompts, categories, (records_per_shard, prompts_per_shard),
                       command)
    old.unlink()
    old_texts.unlink()
    return migrated


@torch.no_grad()
def encode_dataset(dataset, vae, encode_prompts: Callable[[list[str]], dict[str, torch.Tensor]], folder: str | Path,
                   encode_sentences: Callable[[list[str]], torch.Tensor] | None = None,
                   batch_size: int = 64, source: dict | None = None, command: str = "the command that encoded it",
                   records_per_shard: int = RECORDS_PER_SHARD,
                   prompts_per_shard: int = PROMPTS_PER_SHARD) -> EncodedCache:
    """Encode ``dataset`` into the cache folder ``folder`` and open it (:class:`EncodedCache`).

    Tensors: ``latent_mean``/``latent_std`` (N, C, h, w), ``prompt_index`` (N,), ``dataset_index`` (N,),
    ``conditioning.NAME`` (P, ...) fp16 for every tensor ``encode_prompts`` gives and, with
    ``encode_sentences``, ``prompt_embeddings`` (P, E); lists ``prompts`` (P) and ``categories`` (N).
    Unreadable images are dropped (``skipped`` holds their count). A cache of the same length and the same
    ``source`` (what the data and encoders are, e.g. data path, size, seed, model) is reused, as are the
    complete shards of an interrupted encoding of it; a single-file cache of earlier versions with this
    source is converted. ``command`` (what re-makes the cache) is named by the errors of damaged files.
    """
    folder = Path(folder)
    source = json.loads(json.dumps(source or {}))
    requested = len(dataset)
    key = _encoding_key(source, requested, batch_size, records_per_shard, prompts_per_shard,
                        encode_sentences is not None)
    try:
        cache = EncodedCache(folder, command)
        if (cache.requested == requested and cache.source == source and cache.conditioning
                and (encode_sentences is None or "prompt_embeddings" in cache)):
            return cache
    except APTPError:  # none, damaged or of another version: encoded (again)
        pass
    if (migrated := _migrate(folder, key, source, requested, records_per_shard, prompts_per_shard, command)):
        return migrated
    folder.mkdir(parents=True, exist_ok=True)
    (folder / INDEX_FILE).unlink(missing_ok=True)
    prompts, categories = {"": EMPTY_PROMPT_INDEX}, []
    progress = tqdm(total=requested, desc="encoding dataset", unit="image")
    encoding = False  # once one shard is encoded, every later one is: prompt numbers depend on earlier shards
    for k, start in enumerate(range(0, requested, records_per_shard)):
        path, items = folder / _shard_name("records", k), range(start, min(requested, start + records_per_shard))
        info = None if encoding else _shard_info(path, key)
        if info is None:
            encoding = True
            info = _encode_records(torch.utils.data.Subset(dataset, items), vae, prompts, batch_size, key, path)
        else:
            for prompt in info["new_prompts"]:
                prompts.setdefault(prompt, len(prompts))
        categories += info["categories"]
        progress.update(len(items))
    progress.close()
    if len(categories) == 0:
        raise APTPError("no readable images in the dataset")
    ordered = list(prompts)
    for k, start in enumerate(range(0, len(ordered), prompts_per_shard)):
        path, chunk = folder / _shard_name("prompts", k), ordered[start:start + prompts_per_shard]
        info = _shard_info(path, key)
        if info is None or info.get("prompts") != _prompts_digest(chunk):
            _encode_prompts(chunk, encode_prompts, encode_sentences, batch_size, key, path)
    return _finish(folder, key, source, requested, ordered, categories, (records_per_shard, prompts_per_shard),
                   command)


def _encode_records(items, vae, prompts: dict[str, int], batch_size: int, key: str, path: Path) -> dict:
    """Encode the dataset items ``items`` into the records shard ``path`` (new prompts are numbered in
    ``prompts``); returns what the shard says about itself."""
    # Its own generator: iterating a DataLoader otherwise draws from the global RNG, so whether a cache
    # existed would change everything seeded after it.
    loader = torch.utils.data.DataLoader(items, batch_size=batch_size, collate_fn=collate, num_workers=0,
                                         generator=torch.Generator())
    means, stds, prompt_index, dataset_index, categories, skipped = [], [], [], [], [], 0
    known = len(prompts)
    for batch in loader:
        skipped += batch["skipped"]
        if batch["pixel_values"] is None:
            continue
        posterior = vae.encode(batch["pixel_values"].to(vae.device, vae.dtype)).latent_dist
        means.append(posterior.mean.float().cpu())
        stds.append(posterior.std.float().cpu())
        prompt_index += [prompts.setdefault(p, len(prompts)) for p in batch["prompt"]]
        categories += batch["category"]
        dataset_index.append(batch["index"])
    tensors = {}
    if means:  # a shard of unreadable images only holds no tensors
        tensors = {"latent_mean": torch.cat(means).contiguous(), "latent_std": torch.cat(stds).contiguous(),
                   "prompt_index": torch.tensor(prompt_index), "dataset_index": torch.cat(dataset_index)}
    info = {"key": key, "rows": len(prompt_index), "skipped": skipped, "new_prompts": list(prompts)[known:],
            "categories": categories}
    save_tensors_atomic(tensors, path, {"aptp": json.dumps(info)})
    return info


def _encode_prompts(chunk: list[str], encode_prompts, encode_sentences, batch_size: int, key: str,
                    path: Path) -> None:
    """Encode the prompts ``chunk`` into the prompts shard ``path``."""
    batches = [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    encoded = [encode_prompts(b) for b in batches]
    tensors = {CONDITIONING + name: torch.cat([e[name].float().cpu() for e in encoded]).half().contiguous()
               for name in encoded[0]}
    if encode_sentences is not None:
        tensors["prompt_embeddings"] = torch.cat([encode_sentences(b).float().cpu() for b in batches]).contiguous()
    info = {"key": key, "rows": len(chunk), "prompts": _prompts_digest(chunk)}
    save_tensors_atomic(tensors, path, {"aptp": json.dumps(info)})
