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
from pathlib import Path
from typing import Callable, Mapping

import torch
from tqdm.auto import tqdm

from .. import world
from ..base_model import load_base_pipeline
from ..caching import check_interval
from ..config import config_from_dict
from ..families import family_of, family_of_base
from ..metrics.clip import CLIPEmbedder, clip_score, cmmd
from ..metrics.fid import FrechetDistance
from ..pipelines import APTPPipeline
from ..pipelines.build import base_config_differences
from ..pipelines.schedulers import scheduler_class, scheduler_named, use_scheduler
from ..teacher.train import images_to_tensor
from ..utils import APTPError
from .report import write_report


@dataclass
class EvalConfig:
    per_category: int = 64  # world test prompts per category (FID's N = 4 x this)
    steps: int = 25
    guidance_scale: float = 4.0
    seed: int = 0
    batch_size: int = 64
    latency_batch: int = 8
    latency_repeats: int = 5
    clip: str | None = None  # local CLIPModel folder for CLIP score and CMMD
    scheduler: str | None = None  # sampling solver of every model (a diffusers class or alias); None: the base's
    cache_interval: int = 1  # DeepCache: deep features reused between every N-th step (1: none)

    def __post_init__(self):
        for name in ("per_category", "steps", "batch_size", "latency_batch", "latency_repeats"):
            if int(getattr(self, name)) < 1:
                raise APTPError(f"evaluation {name} must be >= 1, got {getattr(self, name)}")
        if not float(self.guidance_scale) >= 0 or self.guidance_scale == float("inf"):
            raise APTPError(f"evaluation guidance_scale must be a finite number >= 0, got {self.guidance_scale}")
        check_interval(self.cache_interval)
        if self.scheduler is not None:
            scheduler_class(self.scheduler)

    @classmethod
    def from_dict(cls, data: dict) -> "EvalConfig":
        return config_from_dict(cls, data)


@dataclass
class Candidate:
    """A model under evaluation: how it generates, and the UNets it calls (with their share of prompts)."""

    name: str
    # (prompts, generators, steps, guidance) -> (images in [0, 1], MACs fraction per prompt, UNet index per prompt)
    generate: Callable[..., tuple[torch.Tensor, list[float], list[int]]]
    unets: list[torch.nn.Module]
    parameters: int
    route: Callable[[list[str]], list[int]] | None = None  # UNet index per prompt; None: the first UNet


def single_unet_candidate(name: str, base, unet, macs_fraction: float, scheduler: str | None = None,
                          cache_interval: int = 1) -> Candidate:
    """The base model's own pipeline over one denoiser (dense, or one sliced architecture)."""
    family = family_of(unet)
    pipeline = use_scheduler(family.pipeline_around(base, unet), scheduler)

    def generate(prompts, generators, steps, guidance):
        arguments = family.pipeline_arguments(pipeline, {"num_inference_steps": steps, "guidance_scale": guidance,
                                                         "generator": generators, "output_type": "pt"})
        with family.feature_cache(unet, cache_interval):
            images = pipeline(prompts, **arguments).images
        return images.float().cpu(), [macs_fraction] * len(prompts), [0] * len(prompts)

    return Candidate(name, generate, [unet], sum(p.numel() for p in unet.parameters()))


def mixture_candidate(name: str, pipeline, cache_interval: int = 1, scheduler: str | None = None) -> Candidate:
    """An ``APTPPipeline``: parameters of all experts; latency weighted by each expert's share of prompts.
    ``scheduler``: a solver used for this candidate's calls only (the pipeline's own is put back after each)."""

    def generate(prompts, generators, steps, guidance):
        own = pipeline.scheduler
        if scheduler is not None:
            pipeline.scheduler = scheduler_named(scheduler, own.config)
        try:
            result = pipeline(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                              output_type="pt", cache_interval=cache_interval)
        finally:
            pipeline.scheduler = own
        return result.images.float().cpu(), result.macs_fraction, result.experts

    return Candidate(name, generate, list(pipeline.experts.experts),
                     sum(p.numel() for p in pipeline.experts.parameters()), route=pipeline.route)


@torch.no_grad()
def teacher_distance(candidates: list[Candidate], base, real: torch.Tensor,
                     prompts: list[str], seed: int, batch_size: int) -> dict[str, list[float]]:
    """Per prompt, the MSE between each candidate's prediction and the dense teacher's on the real image's
    latents noised at one random training timestep (same noise and timestep for every candidate).

    It is what the pruning phase's distillation loss sees, so it tells which prompts are hard *for the
    objective*, which need not be the prompts that are hard by eye."""
    generator = torch.Generator().manual_seed(seed)
    family = family_of_base(base)
    dense = family.denoiser(base)
    device, dtype = dense.device, dense.dtype
    distances: dict[str, list[float]] = {c.name: [] for c in candidates}
    routes = {c.name: c.route(prompts) if c.route else [0] * len(prompts) for c in candidates}
    for start in range(0, len(prompts), batch_size):
        pixels = real[start:start + batch_size].to(device, base.vae.dtype) * 2 - 1
        latents = base.vae.encode(pixels).latent_dist.mean * base.vae.config.scaling_factor
        timesteps = torch.randint(0, base.scheduler.config.num_train_timesteps, (len(latents),), generator=generator)
        noise = torch.randn(latents.shape, generator=generator).to(device, latents.dtype)
        noisy = base.scheduler.add_noise(latents, noise, timesteps.to(device)).to(dtype)
        conditioning = {name: value.to(dtype) for name, value in
                        family.encode_prompts(base, prompts[start:start + batch_size], device,
                                              int(real.shape[-1])).items()}
        timesteps = timesteps.to(device)
        reference = family.denoise(dense, noisy, timesteps, conditioning).float()
        for candidate in candidates:
            index = torch.tensor(routes[candidate.name][start:start + batch_size])
            error = torch.empty(len(latents))
            for k in index.unique().tolist():
                rows = (index == k).nonzero().flatten()
                predicted = family.denoise(candidate.unets[k], noisy[rows], timesteps[rows],
                                           {name: value[rows] for name, value in conditioning.items()}).float()
                error[rows] = (predicted - reference[rows]).pow(2).flatten(1).mean(1).cpu()
            distances[candidate.name] += error.tolist()
    return distances


def _word_accuracy(images: torch.Tensor, samples) -> float:
    """Fraction of text-rendering prompts whose word the evaluator reads back (nan without text prompts)."""
    return world.attribute_accuracy(images, samples).get("text/word", float("nan"))


def _by_category(values: list[float], samples) -> dict[str, float]:
    """Mean of a per-prompt value in every category, and ``overall``."""
    means = {c: statistics.mean(v for v, s in zip(values, samples) if s.category == c)
             for c in world.CATEGORIES if any(s.category == c for s in samples)}
    return {**means, "overall": statistics.mean(values)}


@torch.no_grad()
def _unet_latency(unets: list[torch.nn.Module], inputs: dict) -> list[float]:
    timings = []
    for unet in unets:
        start = time.perf_counter()
        unet(**inputs)
        timings.append(time.perf_counter() - start)
    return timings


def sample(candidate: Candidate, prompts: list[str], batch_size: int, seed: int, steps: int, guidance: float,
           transform=None) -> tuple[torch.Tensor, list[float], list[int], float]:
    """All of a candidate's images of ``prompts`` in batches, prompt i with seed ``seed + i`` (``transform``
    applied to each batch of images): images, MACs fraction and UNet index per prompt, generation seconds."""
    outputs, fractions, used, elapsed = [], [], [], 0.0
    for start in tqdm(range(0, len(prompts), batch_size), desc=f"sampling {candidate.name}", unit="batch"):
        batch = prompts[start:start + batch_size]
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(batch))]
        begin = time.perf_counter()
        generated, batch_fractions, batch_unets = candidate.generate(batch, generators, steps, guidance)
        elapsed += time.perf_counter() - begin
        outputs.append(transform(generated) if transform else generated)
        fractions += batch_fractions
        used += batch_unets
    return torch.cat(outputs), fractions, used, elapsed


def evaluate_candidates(candidates: list[Candidate], config: EvalConfig, family, text_length: int,
                        base=None, latency: bool = True):
    """Metrics of every candidate, plus the generated images and the test samples (for grids).
    With ``base`` (the dense pipeline), also each candidate's distance to the teacher by category;
    with ``latency``, the latency of one UNet call of each."""
    samples = world.generate(config.per_category * len(world.CATEGORIES), "test", seed=config.seed)
    prompts = [s.prompt for s in samples]
    real = (images_to_tensor(s.image for s in samples) + 1) / 2
    fid = FrechetDistance(real)
    embedder = CLIPEmbedder(config.clip) if config.clip else None
    real_clip = embedder.images(real) if embedder else None
    results, images = {}, {}
    for candidate in candidates:
        fake, fractions, used, elapsed = sample(candidate, prompts, config.batch_size, config.seed, config.steps,
                                                config.guidance_scale)
        images[candidate.name] = fake
        metrics = {
            "unet_share": [used.count(i) / len(used) for i in range(len(candidate.unets))],
            "macs_fraction": sum(fractions) / len(fractions),
            "parameters": candidate.parameters,
            "images_per_s": len(prompts) / elapsed,
            "fid": fid(fake),
            "world_accuracy": world.world_accuracy(fake, samples),
            "word_accuracy": _word_accuracy(fake, samples),
        }
        if len(candidate.unets) > 1:
            metrics["routing"] = {
                category: [sum(1 for u, s in zip(used, samples) if u == k and s.category == category)
                           for k in range(len(candidate.unets))] for category in world.CATEGORIES}
            metrics["macs_fraction_by_category"] = _by_category(fractions, samples)
            metrics["unet_index"] = used
        if embedder:
            fake_clip = embedder.images(fake)
            metrics["clip_score"] = clip_score(fake_clip, embedder.texts(prompts))
            metrics["cmmd"] = cmmd(real_clip, fake_clip)
        results[candidate.name] = metrics
    if base is not None:
        distances = teacher_distance(candidates, base, real, prompts, config.seed, config.batch_size)
        for name, values in distances.items():
            results[name]["teacher_mse"] = _by_category(values, samples)
    if latency:
        _add_latency(candidates, results, config, family, text_length)
    return {
        "evaluation": {**asdict(config), "n_images": len(prompts), "resolution": int(real.shape[-1]),
                       "fid_reference": f"{len(prompts)} real world test images of the same prompts, "
                                        f"{int(real.shape[-1])} px, bilinear to 299 px, TF FID Inception (torchmetrics)"},
        "world_accuracy_real_images": world.world_accuracy(real, samples),
        "word_accuracy_real_images": _word_accuracy(real, samples),
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


def load_unet_folder(folder: str | Path, base_unet, family):
    """A sliced (or dense) UNet folder; refused unless it was carved from ``base_unet``."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise APTPError(f"{folder} is not a UNet folder (no config.json)")
    unet = family.sliced_class.from_pretrained(folder).eval()
    different = base_config_differences(unet, base_unet, family)
    if different:
        raise APTPError(f"{folder} was not carved from this base model (config differs in {different})")
    return unet


def evaluate_folders(pipeline_dir: str | Path, unet_folders: Mapping[str, str | Path], config: EvalConfig,
                     out: str | Path, extra: dict | None = None, device: tuple | None = None) -> Path:
    """Evaluate the dense base model, an ``APTPPipeline`` folder (as ``APTP``) and sliced UNet folders
    (e.g. baselines) side by side on the world's test prompts; write the report under ``out`` and return
    the path of ``report.html``. ``device``: (torch device, dtype) of every model (default: CPU, fp32)."""
    device, dtype = device or ("cpu", torch.float32)
    pipeline_dir = Path(pipeline_dir)
    if not (pipeline_dir / "model_index.json").is_file():
        raise APTPError(f"{pipeline_dir} is not an APTPPipeline folder (no model_index.json); see `aptp export`")
    for name in unet_folders:
        if name in ("dense", "APTP"):
            raise APTPError(f"the name {name!r} is taken; give the UNet folder another name")
    mixture = APTPPipeline.from_pretrained(pipeline_dir).to(device, dtype)
    mixture.set_progress_bar_config(disable=True)
    if untrained := mixture.experts.untrained():
        print(f"warning: expert(s) {', '.join(map(str, untrained))} of {pipeline_dir} were never fine-tuned")
    pruned_for = mixture.pruned_for
    base = load_base_pipeline(pruned_for.base_model, device, dtype)
    family = mixture.family
    dense = family.denoiser(base)
    use_scheduler(mixture, config.scheduler)
    solver = {"scheduler": config.scheduler, "cache_interval": config.cache_interval}
    candidates = [single_unet_candidate("dense", base, dense, 1.0, **solver),
                  mixture_candidate("APTP", mixture, config.cache_interval)]
    size, text_length = pruned_for.latent_size, pruned_for.text_length
    dense_macs = family.measure_macs(dense, size, text_length)
    for name, folder in unet_folders.items():
        unet = load_unet_folder(folder, dense, family).to(device, dtype)
        candidates.append(single_unet_candidate(name, base, unet, family.measure_macs(unet, size, text_length)
                                                / dense_macs, **solver))
    if not config.clip:
        print("CLIP score and CMMD: skipped (no local CLIP folder given: `aptp evaluate --clip PATH`, "
              "`aptp demo --set evaluation.clip=PATH`)")
    metrics, images, samples = evaluate_candidates(candidates, config, family, text_length, base)
    fractions = [mixture.experts.macs_fraction(k) for k in range(len(mixture.experts))]
    metrics["device"] = f"{device} {dtype}"
    metrics["verdict"] = verdict(metrics["models"])
    metrics["claims"] = claims(metrics["models"])
    metrics.update(extra or {})
    return write_report(out, metrics, images, samples, mixture="APTP", expert_fractions=fractions,
                        verdict=metrics["verdict"])


# What the method must show on the world, at equal average MACs (within EQUAL_MACS of each baseline).
EQUAL_MACS = 0.03
STATIC_MARGIN = 0.02
HARD_CATEGORY, HARD_MARGIN = "text", 0.03
DENSE_RATIO = 0.90


def claims(models: dict) -> list[dict]:
    """Each claim about the routed mixture (``APTP``) that the models present allow to check: its name,
    whether it holds, and the numbers behind it."""
    if "APTP" not in models:
        return []
    a = models["APTP"]
    accuracy = a["world_accuracy"]["overall"]
    rows = []

    def add(name, holds, detail):
        rows.append({"claim": name, "holds": bool(holds), "detail": detail})

    for baseline in ("static", "magnitude"):
        if baseline not in models:
            continue
        b = models[baseline]
        other = b["world_accuracy"]["overall"]
        gap = abs(a["macs_fraction"] - b["macs_fraction"])
        add(f"equal average MACs as {baseline} (within {EQUAL_MACS})", gap <= EQUAL_MACS,
            f"{a['macs_fraction']:.3f} vs {b['macs_fraction']:.3f}")
        margin = STATIC_MARGIN if baseline == "static" else 0.0
        add(f"world accuracy >= {baseline}" + (f" + {margin}" if margin else ""), accuracy >= other + margin,
            f"{accuracy:.3f} vs {other:.3f}")
        add(f"FID <= {baseline}", a["fid"] <= b["fid"], f"{a['fid']:.1f} vs {b['fid']:.1f}")
    by_category = a.get("macs_fraction_by_category", {})
    if HARD_CATEGORY in by_category:
        add(f"{HARD_CATEGORY} prompts get >= mean MACs + {HARD_MARGIN}",
            by_category[HARD_CATEGORY] >= by_category["overall"] + HARD_MARGIN,
            f"{by_category[HARD_CATEGORY]:.3f} vs mean {by_category['overall']:.3f}")
    if "dense" in models:
        dense = models["dense"]["world_accuracy"]["overall"]
        add(f"world accuracy >= {DENSE_RATIO} x dense", accuracy >= DENSE_RATIO * dense,
            f"{accuracy:.3f} vs {DENSE_RATIO} x {dense:.3f} = {DENSE_RATIO * dense:.3f}")
    return rows


def verdict(models: dict) -> str:
    """One sentence: did the routed mixture beat static pruning (on both FID and world accuracy)?"""
    if "APTP" not in models or "static" not in models:
        return ""
    a, s = models["APTP"], models["static"]
    better = [name for name, x, y in (("FID", -a["fid"], -s["fid"]),
                                      ("world accuracy", a["world_accuracy"]["overall"],
                                       s["world_accuracy"]["overall"])) if x > y]
    return (f"At {a['macs_fraction']:.3f} (mixture) vs {s['macs_fraction']:.3f} (static) of dense MACs, the routed "
            f"mixture {'beat' if len(better) == 2 else 'did not beat'} static pruning on this world "
            f"(FID {a['fid']:.1f} vs {s['fid']:.1f}; world accuracy {a['world_accuracy']['overall']:.3f} vs "
            f"{s['world_accuracy']['overall']:.3f}).")
