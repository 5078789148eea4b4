"""Peak resident memory of the pruning phase's data reads over a small and a large encoded cache.

``aptp bench cache-memory``: writes a synthetic encoded cache per size with :func:`encode_dataset` (random
latents of the world teacher's shape, 4x16x16, and per distinct prompt, every record having its own, a
random conditioning of Stable Diffusion 2.1's shape, 77x1024 fp16, or the world teacher's, 32x384, and a
384-wide sentence embedding), then in a fresh process per size runs the reads of ``aptp prune`` steps:
the batch rows, :func:`noised_batch` (latents, noise, conditioning, targets on the world teacher's noise
schedule) and the routed prompts' embeddings. The target is that the largest cache's peak stays within
+15% of the smallest's: shards are read row by row, so memory does not grow with the cache. ``--reader mmap``
reads the same rows through safetensors' memory maps (``safe_open``) instead, for comparison.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors import safe_open

from ..training.cache import EncodedCache, encode_dataset
from ..training.common import batch_index, batch_positions, noised_batch, sample_seeds
from .memory import TARGET, _peak_rss_bytes

CONDITIONING_SHAPES = {"sd21": (77, 1024), "world": (32, 384)}
LATENT_SHAPE, SENTENCE_DIM = (4, 16, 16), 384
READERS = {"rows": "positioned reads", "mmap": "memory maps"}


class _Records(torch.utils.data.Dataset):
    """Records that only carry their index; the stand-in encoders below make up what they encode to."""

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        return {"index": index, "prompt": f"synthetic caption {index}", "category": None,
                "pixel_values": torch.tensor([float(index)])}


class _LatentEncoder:
    """A VAE stand-in: a random posterior per record, seeded by the batch's first record."""

    device, dtype = "cpu", torch.float32

    def encode(self, pixels: torch.Tensor):
        generator = torch.Generator().manual_seed(int(pixels[0]))
        mean = torch.randn(len(pixels), *LATENT_SHAPE, generator=generator)
        std = torch.rand(len(pixels), *LATENT_SHAPE, generator=generator) + 0.1
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=mean, std=std))


def _random_rows(prompts: list[str], *shape: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(len(prompts[0]) * 7919 + len(prompts))
    return torch.randn(len(prompts), *shape, generator=generator)


def write_synthetic_cache(folder: str | Path, size: int, conditioning: str = "sd21") -> Path:
    """A synthetic encoded cache of ``size`` records in ``folder`` (reused when it is already there)."""
    shape = CONDITIONING_SHAPES[conditioning]
    encode_dataset(_Records(size), _LatentEncoder(), lambda p: {"encoder_hidden_states": _random_rows(p, *shape)},
                   folder, lambda p: _random_rows(p, SENTENCE_DIM),
                   source={"synthetic": size, "conditioning": list(shape)}, command="aptp bench cache-memory")
    return Path(folder)


class _MappedCache(EncodedCache):
    """An :class:`EncodedCache` whose rows are copied out of safetensors' memory maps of the shards."""

    def __init__(self, *args):
        self._mapped = {}
        super().__init__(*args)

    def _read(self, group, shard, name, runs, raw):
        path = self._shards[group][shard][0]
        if path not in self._mapped:
            self._mapped[path] = safe_open(path, "pt")
        mapped = self._mapped[path].get_slice(name)
        for first, local, count in runs:
            raw[first:first + count] = mapped[local:local + count].reshape(count, -1).view(torch.uint8)


def _measure(folder: str, reader: str, steps: int, batch_size: int, seed: int, queue) -> None:
    try:
        from ..teacher.components import TEACHER_DIR, build_scheduler, training_scheduler

        torch.set_num_threads(1)
        scheduler = training_scheduler(build_scheduler())
        scaling = json.loads((TEACHER_DIR / "vae" / "config.json").read_text())["scaling_factor"]
        cache = (EncodedCache if reader == "rows" else _MappedCache)(folder, "aptp bench cache-memory")
        opened = _peak_rss_bytes()
        for step in range(steps):
            index = batch_index(step, batch_size, len(cache), seed, 0, 1)
            seeds = sample_seeds(seed, batch_positions(step, batch_size, 0, 1))
            noised_batch(cache, index, scheduler, scaling, seeds, "cpu")
            cache.rows("prompt_embeddings", cache.prompt_index[index])
        queue.put({"records": len(cache), "prompts": cache.num_prompts, "opened_bytes": opened,
                   "peak_bytes": _peak_rss_bytes(),
                   "disk_bytes": sum(p.stat().st_size for p in Path(folder).iterdir())})
    except Exception as error:  # reported by the parent as one line
        queue.put({"error": f"{type(error).__name__}: {error}"})


def run_cache_memory_benchmark(sizes: tuple[int, ...] = (5000, 50000), conditioning: str = "sd21", steps: int = 1000,
                               batch_size: int = 32, cache_dir: str | None = None, reader: str = "rows",
                               seed: int = 0) -> list[dict]:
    """One row per cache size: peak RSS after opening the cache and after ``steps`` batches of reads, each in
    its own process. The caches are written under ``cache_dir`` (kept, and reused by a later run) or in a
    temporary folder."""
    from ..utils import APTPError

    root = Path(cache_dir) if cache_dir else Path(tempfile.mkdtemp(prefix="aptp-cache-memory-"))
    context = multiprocessing.get_context("spawn")  # a clean interpreter: nothing inherited inflates the peak
    rows = []
    try:
        for size in sizes:
            folder = write_synthetic_cache(root / f"{conditioning}-{size}", size, conditioning)
            queue = context.Queue()
            process = context.Process(target=_measure, args=(str(folder), reader, steps, batch_size, seed, queue))
            process.start()
            process.join()
            row = queue.get() if not queue.empty() else {"error": f"the process exited with code {process.exitcode}"}
            if "error" in row:
                raise APTPError(f"cache memory benchmark at {size} records failed: {row['error']}")
            rows.append({**row, "conditioning": conditioning, "steps": steps, "batch_size": batch_size,
                         "reader": reader})
    finally:
        if not cache_dir:
            shutil.rmtree(root, ignore_errors=True)
    return rows


def format_rows(rows: list[dict]) -> str:
    first, last = rows[0], rows[-1]
    shape = "x".join(map(str, CONDITIONING_SHAPES[first["conditioning"]]))
    lines = [f"aptp bench cache-memory: {first['steps']} batches of {first['batch_size']} rows (noised latents, "
             f"{shape} fp16 conditioning, prompt embeddings) read by {READERS[first['reader']]}, "
             "one fresh process per cache",
             f"  {'records':>8} {'prompts':>8} {'on disk':>9} {'RSS after opening':>18} {'peak RSS':>10} "
             f"{'peak ratio':>11}"]
    for row in rows:
        lines.append(f"  {row['records']:>8} {row['prompts']:>8} {row['disk_bytes'] / 2**30:>5.2f} GiB "
                     f"{row['opened_bytes'] / 2**20:>14.0f} MiB {row['peak_bytes'] / 2**20:>6.0f} MiB "
                     f"{row['peak_bytes'] / first['peak_bytes']:>11.3f}")
    ratio = last["peak_bytes"] / first["peak_bytes"]
    lines.append(f"  target: peak at {last['records']} records <= {TARGET} x peak at {first['records']}: "
                 f"{'met' if ratio <= TARGET else 'MISSED'} ({ratio:.3f})")
    return "\n".join(lines)
