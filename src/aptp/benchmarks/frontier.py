"""``aptp bench frontier``: quality against speed for the mixture and every cheaper alternative a user has.

Settings: the dense model at fewer steps and with a better solver, dense + feature caching, the mixture alone,
with caching, fewer steps or a better solver, and sliced baselines (e.g. L1 magnitude). Quality: world accuracy
and FID of the same test prompts with the same seeds (the side-by-side evaluation). Speed: images per second of
one batch per setting, every setting timed in each round (interleaved), median over rounds. The routing
overhead (prompt encoding and routing) is timed in the same rounds, as a fraction of one mixture generation.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from .. import world
from ..base_model import load_base_pipeline
from ..evaluation.compare import (
    Candidate,
    EvalConfig,
    evaluate_candidates,
    load_unet_folder,
    mixture_candidate,
    single_unet_candidate,
)
from ..pipelines import APTPPipeline
from ..utils import APTPError, check_output_folder, write_json_atomic

SPEED_GOAL, ACCURACY_GOAL = 3.0, 0.95  # some aptp setting: >= 3x dense images/s at >= 0.95 of its accuracy


@dataclass(frozen=True)
class Setting:
    name: str
    model: str  # "dense", "APTP" or the name of a sliced UNet folder
    steps: int
    scheduler: str | None = None  # None: the pipeline's own
    cache_interval: int = 1


def default_settings(steps: int, baselines: list[str]) -> list[Setting]:
    """The reference (dense, ``steps`` steps, own solver) and what a user could do instead."""
    half, quarter = max(1, steps // 2), max(1, steps // 4)
    settings = [Setting("dense", "dense", steps),
                Setting(f"dense {half} steps", "dense", half), Setting(f"dense {quarter} steps", "dense", quarter),
                Setting(f"dense dpm++ {half} steps", "dense", half, "dpm++"),
                Setting(f"dense dpm++ {quarter} steps", "dense", quarter, "dpm++"),
                Setting("dense cache 2", "dense", steps, cache_interval=2),
                Setting("dense cache 3", "dense", steps, cache_interval=3),
                Setting("APTP", "APTP", steps), Setting("APTP cache 2", "APTP", steps, cache_interval=2),
                Setting("APTP cache 3", "APTP", steps, cache_interval=3),
                Setting(f"APTP {half} steps", "APTP", half),
                Setting(f"APTP dpm++ {half} steps", "APTP", half, "dpm++"),
                Setting(f"APTP dpm++ {quarter} steps", "APTP", quarter, "dpm++"),
                Setting(f"APTP dpm++ {half} steps cache 2", "APTP", half, "dpm++", 2)]
    return settings + [Setting(name, name, steps) for name in baselines]


def _with_steps(candidate: Candidate, steps: int) -> Candidate:
    """The candidate at its own step count, whatever the evaluation's."""
    inner = candidate.generate
    return replace(candidate, generate=lambda prompts, generators, _, guidance: inner(prompts, generators, steps,
                                                                                      guidance))


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names of the (speed, quality) points no other point beats in one and matches in the other."""
    return [name for name, (speed, quality) in points.items()
            if not any(s >= speed and q >= quality and (s, q) != (speed, quality)
                       for other, (s, q) in points.items() if other != name)]


def run_frontier(pipeline_dir: str | Path, unet_folders: dict[str, str | Path], out: str | Path, steps: int = 20,
                 per_category: int = 32, batch_size: int = 32, repeats: int = 3, seed: int = 0,
                 device: tuple | None = None, settings: list[Setting] | None = None) -> dict:
    """Measure every setting (default: :func:`default_settings`; the first is the reference); write
    ``frontier.json`` and ``frontier.png`` to ``out``; return the result."""
    device, dtype = device or ("cpu", torch.float32)
    for name in unet_folders:
        if name in ("dense", "APTP"):
            raise APTPError(f"the name {name!r} is taken; give the UNet folder another name")
    out = check_output_folder(out)
    mixture = APTPPipeline.from_pretrained(pipeline_dir).to(device, dtype)
    mixture.set_progress_bar_config(disable=True)
    pruned_for, family = mixture.pruned_for, mixture.family
    base = load_base_pipeline(pruned_for.base_model, device, dtype)
    dense = family.denoiser(base)
    unets = {"dense": dense, **{name: load_unet_folder(folder, dense, family).to(device, dtype)
                                for name, folder in unet_folders.items()}}
    dense_macs = family.measure_macs(dense, pruned_for.latent_size, pruned_for.text_length)
    settings = settings or default_settings(steps, list(unet_folders))
    if settings[0].model != "dense" or len({s.name for s in settings}) != len(settings):
        raise APTPError("the first setting must be the dense reference and setting names must differ")
    if not any(s.model == "APTP" for s in settings):
        raise APTPError("the settings must include the mixture (model 'APTP')")
    candidates = []
    for setting in settings:
        if setting.model == "APTP":
            candidate = mixture_candidate(setting.name, mixture, setting.cache_interval, setting.scheduler)
        else:
            unet = unets[setting.model]
            fraction = family.measure_macs(unet, pruned_for.latent_size, pruned_for.text_length) / dense_macs
            candidate = single_unet_candidate(setting.name, base, unet, fraction, setting.scheduler,
                                              setting.cache_interval)
        candidates.append(_with_steps(candidate, setting.steps))
    config = EvalConfig(per_category=per_category, steps=steps, seed=seed, batch_size=batch_size)
    metrics, _, _ = evaluate_candidates(candidates, config, family, pruned_for.text_length, latency=False)

    # Speed: one batch of mixed test prompts per setting and round, settings interleaved; round 0 warms up.
    prompts = [s.prompt for s in world.generate(batch_size, "test", seed=seed + 1)]
    timings: dict[str, list[float]] = {c.name: [] for c in candidates}
    routing: list[float] = []
    for round_index in tqdm(range(1 + repeats), desc="timing settings", unit="round"):
        for candidate in candidates:
            generators = [torch.Generator().manual_seed(seed + i) for i in range(batch_size)]
            mixture.prompt_encoder.clear_cache()  # every timed call encodes its prompts, as a first call does
            start = time.perf_counter()
            candidate.generate(prompts, generators, steps, config.guidance_scale)
            if round_index:
                timings[candidate.name].append(time.perf_counter() - start)
        mixture.prompt_encoder.clear_cache()
        start = time.perf_counter()
        mixture.route(prompts)
        if round_index:
            routing.append(time.perf_counter() - start)
    rows = {}
    for setting in settings:
        model = metrics["models"][setting.name]
        rows[setting.name] = {**asdict(setting), "images_per_s": batch_size / statistics.median(timings[setting.name]),
                              "world_accuracy": model["world_accuracy"]["overall"], "fid": model["fid"],
                              "macs_fraction": model["macs_fraction"]}
    reference = rows[settings[0].name]
    for row in rows.values():
        row["speedup"] = row["images_per_s"] / reference["images_per_s"]
        row["relative_accuracy"] = row["world_accuracy"] / reference["world_accuracy"]
    front = pareto_front({n: (r["images_per_s"], r["world_accuracy"]) for n, r in rows.items()})
    for name, row in rows.items():
        row["on_front"] = name in front
    aptp_rows = [r for r in rows.values() if r["model"] == "APTP"]
    met = [r["name"] for r in aptp_rows if r["speedup"] >= SPEED_GOAL and r["relative_accuracy"] >= ACCURACY_GOAL]
    dense_alternatives = [r for r in rows.values() if r["model"] == "dense"]
    plain = [r for r in aptp_rows if r["cache_interval"] == 1 and r["scheduler"] is None] or aptp_rows
    mixture_row = plain[0]
    dominating = [r["name"] for r in dense_alternatives
                  if r["images_per_s"] >= mixture_row["images_per_s"] and r["world_accuracy"] >= mixture_row[
                      "world_accuracy"] and r is not mixture_row]
    generation = statistics.median(timings[mixture_row["name"]])
    result = {
        "pipeline": str(pipeline_dir), "steps": steps, "batch_size": batch_size, "repeats": repeats,
        "device": f"{device} {dtype}", "threads": torch.get_num_threads(), "n_images": metrics["evaluation"]["n_images"],
        "settings": rows, "pareto_front": front,
        "routing_overhead": {"seconds": statistics.median(routing), "fraction_of_generation":
                             statistics.median(routing) / generation, "generation_seconds": generation},
        "goal": {"speedup": SPEED_GOAL, "relative_accuracy": ACCURACY_GOAL, "met_by": met},
        "mixture_dominated_by_dense": dominating,
    }
    write_json_atomic(out / "frontier.json", result)
    plot_frontier(rows, out / "frontier.png")
    return result


def plot_frontier(rows: dict, path: Path) -> None:
    figure = Figure(figsize=(8, 5.5))
    axis = figure.subplots()
    colours = {"dense": "tab:gray", "APTP": "tab:red"}
    for name, row in rows.items():
        colour = colours.get(row["model"], "tab:blue")
        axis.scatter(row["images_per_s"], row["world_accuracy"], color=colour, s=60 if row["on_front"] else 25,
                     edgecolors="black" if row["on_front"] else "none", zorder=3)
        axis.annotate(name, (row["images_per_s"], row["world_accuracy"]), fontsize=7, xytext=(4, 3),
                      textcoords="offset points")
    front = sorted((r["images_per_s"], r["world_accuracy"]) for r in rows.values() if r["on_front"])
    axis.plot(*zip(*front), color="black", linewidth=0.8, linestyle="--", label="Pareto front", zorder=2)
    axis.set_xlabel("images / s")
    axis.set_ylabel("world accuracy")
    axis.set_title("quality vs speed (grey: dense, red: APTP mixture, blue: sliced baselines)")
    axis.legend(loc="lower left")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def format_frontier(result: dict) -> str:
    lines = [f"aptp bench frontier: {result['n_images']} world test prompts per setting for quality, batch "
             f"{result['batch_size']} timed interleaved (median of {result['repeats']} rounds), {result['device']}, "
             f"{result['threads']} torch threads",
             f"  {'setting':<30}{'steps':>6}{'MACs':>7}{'images/s':>10}{'speed-up':>10}{'accuracy':>10}"
             f"{'rel. acc.':>11}{'FID':>8}  front"]
    for name, row in result["settings"].items():
        lines.append(f"  {name:<30}{row['steps']:>6}{row['macs_fraction']:>7.3f}{row['images_per_s']:>10.2f}"
                     f"{row['speedup']:>9.2f}x{row['world_accuracy']:>10.3f}{row['relative_accuracy']:>11.3f}"
                     f"{row['fid']:>8.1f}  {'*' if row['on_front'] else ''}")
    overhead = result["routing_overhead"]
    goal = result["goal"]
    lines += [f"routing overhead: {overhead['seconds'] * 1e3:.1f} ms per batch = "
              f"{overhead['fraction_of_generation']:.2%} of one {result['steps']}-step mixture generation",
              f"goal (>= {goal['speedup']}x dense images/s at >= {goal['relative_accuracy']} of its accuracy): "
              + (f"met by {', '.join(goal['met_by'])}" if goal["met_by"] else "not met"),
              "mixture dominated by a dense setting: "
              + (", ".join(result["mixture_dominated_by_dense"]) or "no")]
    return "\n".join(lines)
