"""``aptp assign``: route every prompt of a dataset with a trained router and write per-expert shards.

The dataset is encoded once (latents, text states, sentence embeddings) into the output folder;
``expert-K.json`` lists the rows of that cache routed to expert K, which is what ``aptp finetune``
trains on. Routing is per prompt (argmax), so a prompt's expert never depends on its batch.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

from ..base_model import model_identity
from ..experts.run import load_run
from ..routing.encoder import PromptEncoder
from ..utils import check_output_folder, write_json_atomic
from .cache import copy_cache, data_source, encode_dataset
from .common import make_datasets

CACHE_DIR = "cache"
SUMMARY_FILE = "summary.json"


def shard_file(folder: str | Path, expert: int) -> Path:
    return Path(folder) / f"expert-{expert}.json"


def run_assign(router_dir: str | Path, out: str | Path, data: str | None = None, size: int | None = None,
               seed: int | None = None, device: tuple | None = None) -> dict:
    """Route a dataset (default: the router's own training data) and write shards + ``summary.json``.
    ``device``: (torch device, dtype) of the encoding (default: the CPU in fp32)."""
    run = load_run(router_dir)
    router, pruned_for, family = run.router, run.pruned_for, run.family
    out = check_output_folder(out)
    trained = run.config
    data = data or trained["data"]
    size = size or trained["train_size"]
    seed = trained["seed"] if seed is None else seed
    dataset, _ = make_datasets(data, size, 1, pruned_for.resolution, seed)  # bad data fails before loading
    pipeline = run.base_pipeline(*(device or ("cpu", torch.float32)))
    encoder = PromptEncoder(router.config.prompt_encoder, pipeline.device)
    if (data, size, seed) == (trained["data"], trained["train_size"], trained["seed"]):
        # Routing the router's own training data: start from the cache the pruning run already encoded.
        copy_cache(Path(router_dir).parent / "cache" / "train", out / CACHE_DIR)
    cache = encode_dataset(dataset, pipeline.vae, lambda p: family.encode_prompts(pipeline, p, pipeline.device, pruned_for.resolution),
                           out / CACHE_DIR, encoder.encode,
                           source=data_source(run.base_model, model_identity(run.base_model), data, dataset,
                                              pruned_for.resolution, seed, router.config.prompt_encoder, "train"),
                           command="aptp assign")
    with torch.no_grad():
        prompt_routes = router.route(cache.tensor("prompt_embeddings"))
    routes = prompt_routes[cache.prompt_index].tolist()
    fractions = [e.macs_fraction for e in run.experts]
    categories, prompts, prompt_index = cache.categories, cache.prompts, cache.prompt_index.tolist()
    summary = {"router": str(router_dir), "data": data, "size": size, "seed": seed, "samples": len(routes),
               "skipped_images": cache.skipped, "budget": pruned_for.budget, "experts": []}
    for k in range(router.num_codes):
        rows = [i for i, r in enumerate(routes) if r == k]
        write_json_atomic(shard_file(out, k), {"expert": k, "rows": rows,
                                               "prompts": sorted({prompts[prompt_index[i]] for i in rows})})
        summary["experts"].append({"expert": k, "samples": len(rows), "share": len(rows) / len(routes),
                                   "macs_fraction": fractions[k],
                                   "categories": dict(Counter(str(categories[i]) for i in rows))})
    summary["mean_macs_fraction"] = sum(fractions[r] for r in routes) / len(routes)
    by_category: dict[str, list[float]] = {}
    for i, r in enumerate(routes):
        by_category.setdefault(str(categories[i]), []).append(fractions[r])
    summary["mean_macs_fraction_by_category"] = {c: sum(v) / len(v) for c, v in sorted(by_category.items())}
    write_json_atomic(out / SUMMARY_FILE, summary)
    return summary


def format_assign_summary(summary: dict) -> str:
    categories = sorted({c for e in summary["experts"] for c in e["categories"]})
    show_categories = categories != ["None"]
    header = f"  {'expert':<8}{'samples':>9}{'share':>8}{'MACs':>7}"
    if show_categories:
        header += "".join(f"{c:>9}" for c in categories)
    lines = [f"{summary['samples']} prompts of {summary['data']} routed "
             f"(budget {summary['budget']:.2f}, mean MACs fraction {summary['mean_macs_fraction']:.3f}):", header]
    for e in summary["experts"]:
        line = f"  {e['expert']:<8}{e['samples']:>9}{e['share']:>8.1%}{e['macs_fraction']:>7.2f}"
        if show_categories:
            line += "".join(f"{e['categories'].get(c, 0):>9}" for c in categories)
        lines.append(line)
    if show_categories:
        lines.append("  mean MACs fraction by category: " + ", ".join(
            f"{c} {v:.3f}" for c, v in summary["mean_macs_fraction_by_category"].items()))
    return "\n".join(lines)
