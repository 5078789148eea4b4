"""The full-size path on random weights: a published architecture through prune, assign, finetune, export and
generate at a reduced resolution, each stage timed in its own process with its peak resident memory.

``aptp bench fullsize --config sd21 --output-dir D``: the built-in config inside its family's pipeline with
random weights (:func:`aptp.families.presets.random_pipeline`), a handful of world images as the data, the
smallest settings that run every stage (2 pruning steps of batch 1, 2 fine-tuning steps per expert, one image
of 2 denoising steps). It proves the real-size path (shapes, memory, the CLI) before GPU hours go into it;
nothing it trains means anything.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
import time
from pathlib import Path

from .memory import _peak_rss_bytes

PROMPT = "a red circle on a white background"
STAGES = ("prune", "assign", "finetune", "export", "generate")
OUTPUTS = {"prune": "prune", "assign": "assign", "finetune": "experts", "export": "pipeline", "generate": "images"}


def _build(name: str, folder: str, queue) -> None:
    try:
        from ..families.presets import random_pipeline

        random_pipeline(name).save_pretrained(folder)
        queue.put({"rc": 0, "peak_bytes": _peak_rss_bytes()})
    except Exception as error:
        queue.put({"rc": 1, "error": f"{type(error).__name__}: {error}", "peak_bytes": _peak_rss_bytes()})


def _command(argv: list[str], threads: int, queue) -> None:
    import torch

    from ..cli import main

    if threads:
        torch.set_num_threads(threads)
    try:
        rc = main(argv)
    except SystemExit as exit_:  # argparse
        rc = exit_.code if isinstance(exit_.code, int) else 2
    queue.put({"rc": rc, "peak_bytes": _peak_rss_bytes()})


def _in_process(target, args) -> dict:
    context = multiprocessing.get_context("spawn")  # a clean interpreter per stage: its peak is its own
    queue = context.Queue()
    start = time.perf_counter()
    process = context.Process(target=target, args=(*args, queue))
    process.start()
    process.join()
    row = queue.get() if not queue.empty() else {"rc": process.exitcode, "error": "killed (out of memory?)"}
    row["seconds"] = time.perf_counter() - start
    return row


def stage_commands(out: Path, resolution: int, prune_settings: tuple[str, ...] = ()) -> list[tuple[str, list[str]]]:
    router, assign, experts = out / "prune" / "router", out / "assign", out / "experts"
    prune = ["prune", "--output-dir", str(out / "prune"), "--set", f"model={out / 'base'}", f"data={out / 'data'}",
             f"resolution={resolution}", "train_size=4", "val_size=2", "steps=2", "warmup_steps=1", "batch_size=1",
             "num_codes=2", "difficulty_rows=2", "validate_every=0", "checkpoint_every=2",
             # Two steps cannot close gates that start open: starting them closed leaves experts at the width
             # floors, so the later stages slice, fine-tune and serve really pruned models.
             "gate_offset=-6", *prune_settings]
    commands = [
        ("prune", prune),
        ("assign", ["assign", "--router", str(router), "--output-dir", str(assign)]),
        ("finetune", ["finetune", "--router", str(router), "--assign", str(assign), "--output-dir", str(experts),
                      "--all", "--set", "steps=2", "batch_size=1", "validation_prompts=0", "checkpoint_every=2"]),
        # With a handful of images an expert may receive none, and has nothing to be fine-tuned on.
        ("export", ["export", "--router", str(router), "--experts", str(experts), "--output-dir",
                    str(out / "pipeline"), "--allow-untrained-experts"]),
        ("generate", ["generate", "--pipeline", str(out / "pipeline"), "--output-dir", str(out / "images"),
                      "--steps", "2", "--resolution", str(resolution), PROMPT]),
    ]
    assert tuple(stage for stage, _ in commands) == STAGES
    return commands


def run_fullsize(name: str, out: str | Path, resolution: int = 256, threads: int = 0,
                 stages: tuple[str, ...] | None = None, prune_settings: tuple[str, ...] = ()) -> list[dict]:
    """One row per stage (``build`` first): seconds, peak RSS, exit code; also written to ``OUT/fullsize.json``.
    ``prune_settings`` (``KEY=VALUE``) override the pruning settings, e.g. a smaller budget and width floors so
    that fine-tuning fits in memory. A stage that fails stops the run."""
    from ..world import export_imagefolder

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    if not (out / "base" / "model_index.json").is_file():
        rows.append({"stage": "build", **_in_process(_build, (name, str(out / "base")))})
    if not (out / "data" / "metadata.jsonl").is_file():
        export_imagefolder(out / "data", 6, "train", seed=0)
    for stage, argv in stage_commands(out, resolution, prune_settings):
        if stages and stage not in stages or rows and rows[-1]["rc"] != 0:
            continue
        shutil.rmtree(out / OUTPUTS[stage], ignore_errors=True)  # a finished earlier run would make it instant
        rows.append({"stage": stage, **_in_process(_command, (argv, threads))})
    (out / "fullsize.json").write_text(json.dumps({"config": name, "resolution": resolution, "threads": threads,
                                                    "prune_settings": list(prune_settings), "stages": rows},
                                                   indent=2))
    return rows


def format_rows(name: str, resolution: int, rows: list[dict]) -> str:
    from ..families.presets import RANDOM_PIPELINE_NOTES

    note = RANDOM_PIPELINE_NOTES.get(name)
    lines = [f"aptp bench fullsize: {name} with random weights at {resolution} px"
             + (f" ({note})" if note else "") + ", one fresh process per stage",
             f"  {'stage':<10} {'seconds':>8} {'peak RSS':>10}  result"]
    for row in rows:
        result = "ok" if row["rc"] == 0 else f"failed ({row.get('error') or 'exit code ' + str(row['rc'])})"
        lines.append(f"  {row['stage']:<10} {row['seconds']:>8.1f} {row['peak_bytes'] / 2**30:>6.2f} GiB  {result}"
                     if "peak_bytes" in row else f"  {row['stage']:<10} {row['seconds']:>8.1f} {'-':>10}  {result}")
    return "\n".join(lines)
