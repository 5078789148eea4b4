"""Images per second of an ``APTPPipeline`` against its dense base pipeline on one mixed batch.

``aptp bench throughput --pipeline P``: the same world test prompts, batch, steps and seeds through
both pipelines, alternating rounds; the speed-up is compared with 1 / (average MACs fraction).
"""

from __future__ import annotations

import statistics
import time

import torch
from tqdm.auto import tqdm

from .. import world
from ..base_model import load_base_pipeline
from ..pipelines import APTPPipeline
from . import synchronize

TARGET = 0.85  # speed-up >= TARGET / average MACs fraction


def run_throughput_benchmark(pipeline_dir: str, batch_size: int = 64, steps: int = 25, repeats: int = 3,
                             warmup: int = 1, guidance_scale: float = 4.0, device: tuple | None = None) -> dict:
    device, dtype = device or ("cpu", torch.float32)
    aptp = APTPPipeline.from_pretrained(pipeline_dir).to(device, dtype)
    aptp.set_progress_bar_config(disable=True)
    dense = load_base_pipeline(aptp.pruned_for.base_model, device, dtype)
    prompts = [s.prompt for s in world.generate(batch_size, "test", seed=0)]
    aptp.route(prompts)  # load the prompt encoder outside the timed rounds

    def run(pipeline) -> object:
        generators = [torch.Generator().manual_seed(i) for i in range(batch_size)]
        arguments = {"num_inference_steps": steps, "guidance_scale": guidance_scale, "generator": generators,
                     "output_type": "pt"}
        if pipeline is dense:  # the family's own pipeline: what it takes of these (APTPPipeline does this itself)
            arguments = aptp.family.pipeline_arguments(dense, arguments)
        return pipeline(prompts, **arguments)

    timings = {"dense": [], "aptp": []}
    fractions = None
    for round_index in tqdm(range(warmup + repeats), desc="timing pipelines", unit="round"):
        for name, pipeline in (("dense", dense), ("aptp", aptp)):
            start = time.perf_counter()
            result = run(pipeline)
            synchronize(device)
            elapsed = time.perf_counter() - start
            if name == "aptp":
                fractions = result.macs_fraction
            if round_index >= warmup:
                timings[name].append(elapsed)
    dense_ips = batch_size / statistics.median(timings["dense"])
    aptp_ips = batch_size / statistics.median(timings["aptp"])
    mean_fraction = sum(fractions) / len(fractions)
    return {"batch_size": batch_size, "steps": steps, "repeats": repeats, "device": f"{device} {dtype}",
            "dense_images_per_s": dense_ips,
            "aptp_images_per_s": aptp_ips, "speedup": aptp_ips / dense_ips, "mean_macs_fraction": mean_fraction,
            "experts_used": len(set(result.experts)), "target_speedup": TARGET / mean_fraction}


def format_result(result: dict, threads: int) -> str:
    verdict = "met" if result["speedup"] >= result["target_speedup"] else "MISSED"
    return "\n".join([
        f"aptp bench throughput: {result['batch_size']} mixed world prompts, {result['steps']} steps, "
        f"{result['device']}, {threads} torch threads, median of {result['repeats']} rounds",
        f"  dense teacher pipeline   {result['dense_images_per_s']:8.2f} images/s",
        f"  APTPPipeline             {result['aptp_images_per_s']:8.2f} images/s  "
        f"({result['experts_used']} experts used)",
        f"  speed-up                 {result['speedup']:8.2f}x",
        f"  average MACs fraction    {result['mean_macs_fraction']:8.3f}  -> target speed-up >= "
        f"{TARGET} / {result['mean_macs_fraction']:.3f} = {result['target_speedup']:.2f}x: {verdict}",
    ])
