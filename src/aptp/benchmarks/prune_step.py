"""Step time of the pruning phase against a plain fine-tuning step of the dense UNet.

``aptp bench prune-step``: both steps on the same pipeline, batch and cached data; the pruning step
runs the frozen UNet twice (open-gate teacher without gradients, gated student with gradients into
the router), the fine-tuning step trains every UNet weight with AdamW. Rounds alternate the two;
the ratio is the median over rounds.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..training.common import batch_index, batch_positions, noised_batch, sample_seeds
from ..training.prune import PruneConfig, prepare, prune_step
from . import synchronize


def run_prune_step_benchmark(model: str = "world", batch_size: int = 32, repeats: int = 10, warmup: int = 2,
                             seed: int = 0) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        config = PruneConfig(model=model, train_size=batch_size * 4, val_size=8, steps=10**6, warmup_steps=0,
                             batch_size=batch_size, output_dir=folder, seed=seed)
        state = prepare(config)
        dense = copy.deepcopy(state.unet).train().requires_grad_(True)
        state.controller.set(None)
        optimizer = torch.optim.AdamW(dense.parameters(), lr=1e-5)
        cache = state.train
        scaling = state.pipeline.vae.config.scaling_factor

        device = state.accelerator.device  # where Accelerate put the pruning run: CUDA when there is one

        def finetune_step(step: int) -> None:
            index = batch_index(step, batch_size, len(cache), seed, 0, 1)
            batch = noised_batch(cache, index, state.scheduler, scaling,
                                 sample_seeds(seed, batch_positions(step, batch_size, 0, 1)), device)
            prediction = state.family.denoise(dense, batch["noisy"], batch["timesteps"], batch["conditioning"])
            loss = F.mse_loss(prediction, batch["target"])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        timings = {"finetune": [], "prune": []}
        for step in tqdm(range(warmup + repeats), desc="timing steps", unit="round"):
            for name, fn in (("finetune", finetune_step), ("prune", lambda s: prune_step(config, state, s))):
                synchronize(device)
                start = time.perf_counter()
                fn(step)
                synchronize(device)
                if step >= warmup:
                    timings[name].append(time.perf_counter() - start)
        state.controller.remove()
    ratios = [p / f for p, f in zip(timings["prune"], timings["finetune"])]
    return {"finetune_s": statistics.median(timings["finetune"]), "prune_s": statistics.median(timings["prune"]),
            "ratio": statistics.median(ratios), "batch_size": batch_size, "repeats": repeats, "model": model}


def format_result(result: dict, threads: int) -> str:
    verdict = "met" if result["ratio"] <= 1.6 else "MISSED"
    return "\n".join([
        f"aptp bench prune-step --model {result['model']}: batch {result['batch_size']}, "
        f"{threads} torch threads, median of {result['repeats']} rounds",
        f"  fine-tuning step of the dense UNet   {result['finetune_s'] * 1e3:8.1f} ms",
        f"  pruning-phase step                   {result['prune_s'] * 1e3:8.1f} ms",
        f"  ratio                                {result['ratio']:8.2f}   (target <= 1.6: {verdict})",
    ])
