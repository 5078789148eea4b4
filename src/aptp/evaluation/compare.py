"""Evaluate several text-to-image models side by side on the world's test prompts.

Every model generates the same prompts with the same seeds, steps and guidance. Quality: FID against
the real world images of those prompts (N and resolution recorded), world accuracy per category,
and CLIP score / CMMD when a local CLIP folder is given. Cost: average MACs fraction, parameters,
latency of one UNet call (timed interleaved across models) and images per second.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from diffusers import StableDiffusionPipeline
from tqdm.auto import tqdm

from .. import world
from ..metrics.clip import CLIPEmbedder, clip_score, cmmd
from ..metrics.fid import FIDInception, frechet_inception_distance
from ..pipelines import pipeline_with_unet
from ..teacher.train import images_to_tensor


@dataclass
class EvalConfig:
    per_category: int = 64
    steps: int = 25
    guidance_scale: float = 4.0
    seed: int = 0
    batch_size: int = 64
    latency_batch: int = 8
    latency_repeats: int = 5
    clip: str | None = None  # local CLIPModel folder for CLIP score and CMMD


@dataclass
class Candidate:
    """A model under evaluation: how it generates, and the UNets it calls (with their share of prompts)."""

    name: str
    # (prompts, generators, steps, guidance) -> (images in [0, 1], MACs fraction per prompt, UNet index per prompt)
    generate: Callable[..., tuple[torch.Tensor, list[float], list[int]]]
    unets: list[torch.nn.Module]
    parameters: int


def single_unet_candidate(name: str, base: StableDiffusionPipeline, unet, macs_fraction: float) -> Candidate:
    """A Stable Diffusion pipeline over one UNet (dense, or one sliced architecture)."""
    pipeline = pipeline_with_unet(base, unet)

    def generate(prompts, generators, steps, guidance):
        images = pipeline(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                          output_type="pt").images
        return images.float().cpu(), [macs_fraction] * len(prompts), [0] * len(prompts)

    return Candidate(name, generate, [unet], sum(p.numel() for p in unet.parameters()))


def mixture_candidate(name: str, pipeline) -> Candidate:
    """An ``APTPPipeline``: parameters of all experts; latency weighted by each expert's share of prompts."""

    def generate(prompts, generators, steps, guidance):
        result = pipeline(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                          output_type="pt")
        return result.images.float().cpu(), result.macs_fraction, result.experts

    return Candidate(name, generate, list(pipeline.experts.experts),
                     sum(p.numel() for p in pipeline.experts.parameters()))


@torch.no_grad()
def _unet_latency(unets: list[torch.nn.Module], inputs: dict) -> list[float]:
    timings = []
    for unet in unets:
        start = time.perf_counter()
        unet(**inputs)
        timings.append(time.perf_counter() - start)
    return timings


def evaluate_candidates(candidates: list[Candidate], config: EvalConfig, family, text_length: int):
    """Metrics of every candidate, plus the generated images and the test samples (for grids)."""
    samples = world.generate(config.per_category * len(world.CATEGORIES), "test", seed=config.seed)
    prompts = [s.prompt for s in samples]
    real = (images_to_tensor(s.image for s in samples) + 1) / 2
    inception = FIDInception()
    embedder = CLIPEmbedder(config.clip) if config.clip else None
    real_clip = embedder.images(real) if embedder else None
    results, images = {}, {}
    for candidate in candidates:
        outputs, fractions, used, elapsed = [], [], [], 0.0
        for start in tqdm(range(0, len(prompts), config.batch_size), desc=f"sampling {candidate.name}",
                          unit="batch"):
            batch = prompts[start:start + config.batch_size]
            generators = [torch.Generator().manual_seed(config.seed + start + i) for i in range(len(batch))]
            begin = time.perf_counter()
            generated, batch_fractions, batch_unets = candidate.generate(batch, generators, config.steps,
                                                                         config.guidance_scale)
            elapsed += time.perf_counter() - begin
            outputs.append(generated)
            fractions += batch_fractions
            used += batch_unets
        fake = torch.cat(outputs)
        images[candidate.name] = fake
        metrics = {
            "unet_share": [used.count(i) / len(used) for i in range(len(candidate.unets))],
            "macs_fraction": sum(fractions) / len(fractions),
            "parameters": candidate.parameters,
            "images_per_s": len(prompts) / elapsed,
            "fid": frechet_inception_distance(real, fake, inception=inception),
            "world_accuracy": world.world_accuracy(fake, samples),
        }
        if len(candidate.unets) > 1:
            metrics["routing"] = {
                category: [sum(1 for u, s in zip(used, samples) if u == k and s.category == category)
                           for k in range(len(candidate.unets))] for category in world.CATEGORIES}
            metrics["macs_fraction_by_category"] = {
                category: statistics.mean(f for f, s in zip(fractions, samples) if s.category == category)
                for category in world.CATEGORIES}
            metrics["unet_index"] = used
        if embedder:
            fake_clip = embedder.images(fake)
            metrics["clip_score"] = clip_score(fake_clip, embedder.texts(prompts))
            metrics["cmmd"] = cmmd(real_clip, fake_clip)
        results[candidate.name] = metrics
    _add_latency(candidates, results, config, family, text_length)
    return {
        "evaluation": {**asdict(config), "n_images": len(prompts), "resolution": int(real.shape[-1]),
                       "fid_reference": f"{len(prompts)} real world test images of the same prompts, "
                                        f"{int(real.shape[-1])} px, bilinear to 299 px, TF FID Inception (torchmetrics)"},
        "world_accuracy_real_images": world.world_accuracy(real, samples),
        "models": results,
    }, images, samples


def _add_latency(candidates: list[Candidate], results: dict, config: EvalConfig, family, text_length: int) -> None:
    """Latency of one UNet call at ``latency_batch`` (a mixture: averaged with its experts' prompt shares),
    every candidate timed in each round (interleaved)."""
    first = candidates[0].unets[0]
    inputs = family.example_inputs(first, family.default_sample_size(first), text_length, config.latency_batch)
    rounds: dict[str, list[list[float]]] = {c.name: [] for c in candidates}
    for candidate in candidates:  # warm-up
        _unet_latency(candidate.unets, inputs)
    for _ in range(config.latency_repeats):
        for candidate in candidates:
            rounds[candidate.name].append(_unet_latency(candidate.unets, inputs))
    for candidate in candidates:
        per_unet = [statistics.median(r[i] for r in rounds[candidate.name]) for i in range(len(candidate.unets))]
        share = results[candidate.name]["unet_share"]
        results[candidate.name]["unet_latency_ms"] = 1e3 * sum(t * w for t, w in zip(per_unet, share))
