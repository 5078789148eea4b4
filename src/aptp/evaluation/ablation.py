"""``aptp ablation``: the demo with each change of the method switched off, over several seeds, side by side.

Every (variant, seed) is one resumable demo run in ``OUTPUT/VARIANT/seed-S``; the summary gives, per
variant, the mean and spread over seeds of world accuracy and FID for the mixture and its baselines,
how much more compute the hard category gets, and how many of the claims hold.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from ..utils import APTPError, write_json_atomic

# Each variant switches off one change (``aptp`` has them all); the overrides are `aptp demo` options.
VARIANTS: dict[str, dict] = {
    "aptp": {},
    "no-floors": {"prune.min_width": {}},
    "no-difficulty": {"prune.difficulty_exponent": 0.0},
    "plain-objective": {"prune.min_snr_gamma": None, "prune.normalize_blocks": False,
                        "finetune.min_snr_gamma": None, "finetune.normalize_blocks": False},
    "published": {"prune.min_width": {}, "prune.difficulty_exponent": 0.0, "prune.min_snr_gamma": None,
                  "prune.normalize_blocks": False, "finetune.min_snr_gamma": None,
                  "finetune.normalize_blocks": False},
}
MODELS = ("APTP", "static", "magnitude", "dense")


def _spread(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def summarize(metrics_by_seed: list[dict]) -> dict:
    """Mean and spread over seeds of the numbers the claims rest on."""
    summary: dict = {}
    for model in MODELS:
        runs = [m["models"][model] for m in metrics_by_seed if model in m["models"]]
        if runs:
            summary[model] = {"accuracy": _spread([r["world_accuracy"]["overall"] for r in runs]),
                              "fid": _spread([r["fid"] for r in runs]),
                              "macs_fraction": _spread([r["macs_fraction"] for r in runs])}
    hard = [m["models"]["APTP"]["macs_fraction_by_category"] for m in metrics_by_seed
            if "macs_fraction_by_category" in m["models"].get("APTP", {})]
    if hard:
        summary["text_extra_macs"] = _spread([h["text"] - h["overall"] for h in hard])
    summary["claims_held"] = [sum(c["holds"] for c in m.get("claims", [])) for m in metrics_by_seed]
    summary["claims"] = len(metrics_by_seed[0].get("claims", [])) if metrics_by_seed else 0
    return summary


def format_table(summaries: dict[str, dict]) -> str:
    def cell(entry, digits):
        return f"{entry['mean']:.{digits}f} ± {entry['std']:.{digits}f}" if entry else "-"

    header = ["variant", "APTP acc.", "static acc.", "magnitude acc.", "APTP FID", "static FID", "magnitude FID",
              "text MACs - mean", "claims held"]
    rows = []
    for name, s in summaries.items():
        rows.append([name] + [cell(s.get(m, {}).get("accuracy"), 3) for m in ("APTP", "static", "magnitude")]
                    + [cell(s.get(m, {}).get("fid"), 1) for m in ("APTP", "static", "magnitude")]
                    + [cell(s.get("text_extra_macs"), 3), " ".join(f"{n}/{s['claims']}" for n in s["claims_held"])])
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(r, widths)) for r in [header] + rows)


def run_ablation(output_dir: str | Path, variants: list[str], seeds: list[int], overrides: dict | None = None) -> dict:
    """Run (or resume) every variant at every seed; write and return ``ablation.json``'s content."""
    from .demo import demo_config, run_demo  # torch and diffusers: not needed to list the variants

    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants:
        raise APTPError(f"unknown ablation variant(s) {unknown or '(none given)'}; choose from {', '.join(VARIANTS)}")
    if not seeds:
        raise APTPError("give at least one seed")
    out = Path(output_dir)
    configs = {(v, s): demo_config(str(out / v / f"seed-{s}"), {**(overrides or {}), **VARIANTS[v], "seed": s})
               for v in variants for s in seeds}  # every option is checked before the first run
    summaries = {}
    for variant in variants:
        metrics = []
        for seed in seeds:
            print(f"== ablation: {variant}, seed {seed}", flush=True)
            run_demo(configs[variant, seed])
            metrics.append(json.loads((out / variant / f"seed-{seed}" / "report" / "metrics.json").read_text()))
        summaries[variant] = summarize(metrics)
    result = {"variants": {v: VARIANTS[v] for v in variants}, "seeds": seeds, "overrides": overrides or {},
              "summary": summaries, "table": format_table(summaries)}
    write_json_atomic(out / "ablation.json", result)
    return result
