"""The report: ``metrics.json``, PNG plots and image grids, and a ``report.html`` that opens offline."""

from __future__ import annotations

import html
from pathlib import Path

import torch
from matplotlib.figure import Figure

from .. import world
from ..imaging import comparison_grid, save_image_atomic, to_pil
from ..utils import write_json_atomic

GRID_PER_CATEGORY = 2
EXPERT_GRID_PROMPTS = 6


def _plot_quality_vs_macs(models: dict, path: Path) -> None:
    figure = Figure(figsize=(10, 4))
    axes = figure.subplots(1, 2)
    for name, m in models.items():
        for axis, value in ((axes[0], m["world_accuracy"]["overall"]), (axes[1], m["fid"])):
            axis.scatter(m["macs_fraction"], value, s=60)
            axis.annotate(name, (m["macs_fraction"], value), textcoords="offset points", xytext=(5, 5))
    axes[0].set(xlabel="average MACs fraction of dense", ylabel="world accuracy (overall)",
                title="quality vs compute (higher is better)")
    axes[1].set(xlabel="average MACs fraction of dense", ylabel="FID", title="FID vs compute (lower is better)")
    for axis in axes:
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def _plot_routing(routing: dict, fractions: list[float], path: Path) -> None:
    categories = list(routing)
    counts = torch.tensor([routing[c] for c in categories], dtype=torch.float)
    shares = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    figure = Figure(figsize=(1.4 * counts.shape[1] + 3, 0.7 * len(categories) + 1.5))
    axis = figure.subplots()
    image = axis.imshow(shares.numpy(), cmap="viridis", vmin=0, vmax=1)
    axis.set_xticks(range(counts.shape[1]), [f"expert {k}\n{f:.2f} MACs" for k, f in enumerate(fractions)])
    axis.set_yticks(range(len(categories)), categories)
    for i in range(len(categories)):
        for k in range(counts.shape[1]):
            axis.text(k, i, f"{int(counts[i, k])}", ha="center", va="center",
                      color="white" if shares[i, k] < 0.6 else "black")
    axis.set_title("test prompts per category routed to each expert")
    figure.colorbar(image, ax=axis, label="share of the category")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def _table(rows: list[list[str]], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_report(out: str | Path, metrics: dict, images: dict[str, torch.Tensor], samples: list,
                 mixture: str | None = None, expert_fractions: list[float] | None = None,
                 verdict: str = "") -> Path:
    """Write everything under ``out`` and return the path of ``report.html``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    models = metrics["models"]
    _plot_quality_vs_macs(models, out / "quality_vs_macs.png")
    picked = [i for c in world.CATEGORIES for i in [j for j, s in enumerate(samples) if s.category == c]
              [:GRID_PER_CATEGORY]]
    columns = {"ground truth": [samples[i].image for i in picked]}
    columns.update({name: to_pil(images[name][picked]) for name in models})
    save_image_atomic(comparison_grid([samples[i].prompt for i in picked], columns), out / "samples.png")
    figures = [("Quality against compute", "quality_vs_macs.png"), ("The same test prompts, every method", "samples.png")]
    if mixture and "routing" in models.get(mixture, {}):
        _plot_routing(models[mixture]["routing"], expert_fractions or [], out / "routing.png")
        figures.insert(1, ("Routing of the test prompts", "routing.png"))
        used = models[mixture]["unet_index"]
        for k in range(len(expert_fractions or [])):
            members = [i for i, u in enumerate(used) if u == k][:EXPERT_GRID_PROMPTS]
            if members:
                grid = comparison_grid([samples[i].prompt for i in members],
                                       {"ground truth": [samples[i].image for i in members],
                                        f"expert {k}": to_pil(images[mixture][members])})
                save_image_atomic(grid, out / f"expert-{k}.png")
                figures.append((f"Expert {k} ({expert_fractions[k]:.2f} of dense MACs): prompts routed to it",
                                f"expert-{k}.png"))
    evaluation = metrics["evaluation"]
    categories = list(world.CATEGORIES)
    with_clip = all("clip_score" in m for m in models.values())
    rows = [[name, f"{m['macs_fraction']:.3f}", f"{m['fid']:.1f}"]
            + [f"{m['world_accuracy'].get(c, float('nan')):.3f}" for c in categories]
            + [f"{m['world_accuracy']['overall']:.3f}", f"{m.get('word_accuracy', float('nan')):.3f}"]
            + ([f"{m['clip_score']:.2f}", f"{m['cmmd']:.3f}"] if with_clip else [])
            + [f"{m['parameters'] / 1e6:.2f} M", f"{m['unet_latency_ms']:.1f}", f"{m['images_per_s']:.2f}"]
            for name, m in models.items()]
    real = metrics["world_accuracy_real_images"]
    rows.append(["real images (evaluator ceiling)", "", ""] + [f"{real.get(c, float('nan')):.3f}" for c in categories]
                + [f"{real['overall']:.3f}", f"{metrics.get('word_accuracy_real_images', float('nan')):.3f}"]
                + ["", ""] * with_clip + ["", "", ""])
    header = ["model", "MACs fraction", f"FID (N={evaluation['n_images']})"] + [f"acc. {c}" for c in categories] + \
             ["acc. overall", "words read back"] + ["CLIP score", "CMMD"] * with_clip + \
             ["parameters", f"UNet call (ms, batch {evaluation['latency_batch']})", "images/s"]
    clip_note = "" if with_clip else "<p>CLIP score and CMMD: not measured (no local CLIP folder was given).</p>"
    routing_table = ""
    if mixture and "routing" in models.get(mixture, {}):
        m = models[mixture]
        routing_rows = [[c] + [str(n) for n in m["routing"][c]] + [f"{m['macs_fraction_by_category'][c]:.3f}"]
                        for c in categories]
        totals = [sum(m["routing"][c][k] for c in categories) for k in range(len(m["unet_share"]))]
        routing_rows.append(["all prompts"] + [str(n) for n in totals] + [f"{m['macs_fraction']:.3f}"])
        routing_table = "<h2>Routing by category</h2>" + _table(
            routing_rows, ["category"] + [f"expert {k} ({f:.2f} MACs)" for k, f in enumerate(expert_fractions or [])]
            + ["mean MACs fraction"])
    claims_table = ""
    if metrics.get("claims"):
        claims_table = "<h2>Claims</h2>" + _table(
            [[c["claim"], "holds" if c["holds"] else "does not hold", c["detail"]] for c in metrics["claims"]],
            ["claim", "", "numbers"])
    distance_table = ""
    if all("teacher_mse" in m for m in models.values()):
        distance_table = (
            "<h2>Distance to the dense teacher by category</h2><p>MSE between each model's prediction and the "
            "dense teacher's on the real test images' latents, noised at one random training timestep: the "
            "quantity the output-distillation loss of pruning and fine-tuning minimises.</p>" + _table(
                [[name] + [f"{m['teacher_mse'].get(c, float('nan')):.4f}" for c in categories + ["overall"]]
                 for name, m in models.items()], ["model"] + categories + ["overall"]))
    body = "".join(f"<h2>{html.escape(t)}</h2><img src='{f}' alt='{html.escape(t)}'>" for t, f in figures)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>aptp report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1400px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child{{text-align:left}}
img{{max-width:100%;border:1px solid #eee}}</style></head><body>
<h1>aptp: routed experts vs baselines</h1>
<p>{html.escape(verdict)}</p>
{claims_table}
<p>{html.escape(evaluation['fid_reference'])}; {evaluation['steps']} sampling steps, guidance
{evaluation['guidance_scale']}, seed {evaluation['seed']}.</p>
{_table(rows, header)}
{clip_note}
{routing_table}
{distance_table}
{body}
</body></html>"""
    (out / "report.html").write_text(page)
    write_json_atomic(out / "metrics.json", metrics)  # last: its presence means the report is complete
    return (out / "report.html").resolve()
