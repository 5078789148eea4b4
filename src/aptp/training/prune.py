"""The pruning phase: train the prompt router, K codes and the hypernetwork under a MACs budget.

The base UNet is frozen and gated by hooks. Each step:
  1. route: architecture embeddings -> scores -> Sinkhorn assignment over the global batch;
  2. gates: every code samples relaxed-Bernoulli gates; each prompt takes its code's gates, with the
     straight-through gradient of its routing probabilities (so task losses reach the predictor);
  3. losses: diffusion loss of the gated UNet, distillation of output and block features from the
     same UNet with open gates (min-SNR weighted; block terms normalised by the teacher's feature
     energy), resource loss on the exact MACs model, contrastive and swapped-assignment losses on
     the router.
Allocations are bounded (every width unit keeps at least ``min_width`` of its elements, the
highest-ranked ones), and experts are sized by difficulty: before training, each prompt's distance
to the teacher under a fixed uniform pruning at the budget is measured once; each code's MACs target
then grows with the mean difficulty of the prompts it receives, while the average over the prompts,
routed as at inference, meets the budget.
Runs unchanged under ``accelerate launch``; checkpoints are atomic and resuming is exact.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import DDPMScheduler
from safetensors.torch import load_file
from tqdm.auto import tqdm

from ..base_model import load_base_pipeline, model_identity
from ..config import UnitOptions, config_from_dict
from ..experts.run import PrunedFor
from ..families import ModelFamily, family_of_base
from ..routing import (
    PromptRouter,
    assignment_loss,
    code_size_loss,
    code_targets,
    contrastive_loss,
    resource_loss,
    sinkhorn,
    spread_loss,
)
from ..routing.encoder import DEFAULT_PROMPT_ENCODER, PromptEncoder
from ..routing.router import width_floors
from ..units import UnitLayout, uniform_width_architecture
from ..utils import APTPError, atomic_folder, write_json_atomic
from .cache import EMPTY_PROMPT_INDEX, EncodedCache, conditioning_of, data_source, encode_dataset, save_tensors_atomic
from .checkpoint import (
    check_same_settings,
    refuse_other_settings,
    remove_outputs,
    resume_checkpoint,
    save_checkpoint,
)
from .common import (
    MIXED_PRECISION,
    WORLD,
    BlockRecorder,
    batch_index,
    batch_positions,
    make_datasets,
    noised_batch,
    run_loop,
    sample_seeds,
    snr_weights,
    task_losses,
)


CODE_INITS = ("random", "kmeans")
DIFFICULTY_WEIGHTINGS = ("plain", "min_snr")
DIFFICULTY_TARGETS = ("prediction", "guided", "text")


@dataclass
class PruneConfig:
    # What is pruned, on what data.
    model: str = WORLD  # "world" or a Stable Diffusion pipeline folder
    data: str = WORLD  # "world", an imagefolder, "coco:ROOT[:SPLIT]" or "cc3m:TSV:IMAGE_FOLDER"
    train_size: int = 4000  # captioned images used (world samples, or the first N records)
    val_size: int = 400  # prompts for validation (world val split, or the records after train_size)
    resolution: int | None = None  # pixels; default: the UNet's sample size x the VAE scale
    text_length: int | None = None  # default: the tokenizer's max length
    output_dir: str = "runs/prune"
    prompt_encoder: str = DEFAULT_PROMPT_ENCODER
    # Method.
    num_codes: int = 4
    budget: float = 0.6
    depth: str = "none"  # "last"/"all" also skip whole blocks; with width floors, skipping cut conditioning paths
    ff_chunks: int = 32
    arch_dim: int = 64
    hidden_dim: int = 256
    hyper_hidden_dim: int = 256
    gate_offset: float = 3.0
    # Initial gate logits of every code get this times the L1 magnitude of each element, z-scored within
    # its unit: the ranking starts from magnitude pruning's and the task losses refine it. 0: off.
    magnitude_prior: float = 1.0
    gate_temperature_start: float = 1.0
    gate_temperature_end: float = 0.2
    gate_noise_start: float = 1.0  # logistic-noise scale of sampled gates, annealed linearly after warm-up,
    gate_noise_end: float = 0.0  # so the last steps train the deterministic experts that are materialised
    score_temperature: float = 0.1
    contrastive_temperature: float = 0.05
    sinkhorn_epsilon: float = 0.05
    sinkhorn_iterations: int = 3
    # How strictly every code gets the same share of a batch (1: exactly; below 1: a soft constraint, so
    # a batch holding more prompts of one kind than 1/num_codes does not push the surplus onto other codes).
    sinkhorn_balance: float = 1.0
    # "kmeans": when warm-up ends, the codes move to the k-means centroids of the training prompts'
    # architecture embeddings (up to kmeans_prompts records); "random": they stay where they were drawn.
    code_init: str = "random"
    kmeans_prompts: int = 16384
    lambda_ddpm: float = 1.0
    lambda_distill: float = 0.2
    lambda_blocks: float = 0.2
    lambda_resource: float = 2.0
    lambda_contrastive: float = 100.0
    lambda_assign: float = 1.0
    min_snr_gamma: float | None = 5.0  # weights the diffusion and distillation losses (published: 5)
    normalize_blocks: bool = True  # block distillation divided by the teacher's feature energy per block
    # Bounded allocations: every width unit keeps at least this fraction of its elements (per kind),
    # chosen by the learned ranking; the widths of codes with larger targets grow above the floor.
    # The floors must leave room below the budget: on the world teacher, floors of 0.5 alone cost 0.59
    # of dense MACs, 0.4 cost 0.56, so at a 0.6 budget 0.4 is what lets easy experts shrink for hard ones.
    min_width: dict | None = field(default_factory=lambda: {"heads": 0.4, "ff": 0.4, "groups": 0.4})
    # Experts sized by difficulty: a code's MACs target grows with the mean difficulty of its prompts
    # (their distance to the teacher under a fixed uniform pruning at the budget) to this power; 0: off.
    difficulty_exponent: float = 1.0
    # How the distance is weighted over timesteps: "plain" (the noise-prediction MSE) or "min_snr" (weighted
    # as the losses are).
    difficulty_weighting: str = "plain"
    # What is compared: "prediction" (the text-conditioned prediction), "guided" (the classifier-free guided
    # prediction at difficulty_guidance, what sampling follows) or "text" (conditioned minus unconditioned:
    # only what the prompt adds).
    difficulty_target: str = "prediction"
    difficulty_guidance: float = 4.0
    # Fraction of latent positions whose error is averaged, the worst ones first (1.0: all, the plain MSE).
    # Small fractions look at where a prompt's content is (a word's glyphs) rather than at the background,
    # which is alike for every prompt: on the world, text is +32% over the easiest category at 0.1, +15% at 1.
    difficulty_worst_positions: float = 0.1
    # Fine-tune the uniform pruning this many steps (batch_size, difficulty_recovery_lr, the diffusion and output
    # distillation losses) before measuring it, so difficulty is what fine-tuning does not win back; 0: off.
    difficulty_recovery_steps: int = 0
    difficulty_recovery_lr: float = 3e-4
    lambda_code_size: float = 1.0
    difficulty_rows: int = 256  # training rows whose difficulty is measured (once, before training)
    # Timesteps per row: 1 draws one at random; N > 1 averages over N strata of the schedule (one timestep
    # drawn in each), so the difficulty of a row does not hinge on one draw.
    difficulty_timesteps: int = 8
    max_code_fraction: float = 0.95  # no code's target exceeds this fraction of dense MACs
    lambda_spread: float = 0.0  # the published -std + (1 - max) of the per-code MACs, capped at max_code_fraction
    # Optimisation.
    steps: int = 300
    warmup_steps: int = 30  # gates stay open while the router learns the prompt geometry
    batch_size: int = 32  # per process
    lr: float = 2e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 50
    log_every: int = 10
    validate_every: int = 100  # sample one validation prompt per code with its expert's gates (0: never)
    validation_steps: int = 10  # denoising steps of those samples
    validation_guidance_scale: float = 4.0
    mixed_precision: str = "no"

    def __post_init__(self):
        if not 0 < self.budget <= 1:
            raise APTPError(f"budget must be in (0, 1], got {self.budget}")
        at_least_one = ("num_codes", "steps", "batch_size", "train_size", "val_size", "arch_dim", "hidden_dim",
                        "hyper_hidden_dim", "sinkhorn_iterations", "checkpoint_every", "log_every",
                        "validation_steps", "ff_chunks", "kmeans_prompts")
        too_small = [name for name in at_least_one if getattr(self, name) < 1]
        too_small += [name for name in ("resolution", "text_length") if getattr(self, name) is not None
                      and getattr(self, name) < 1]
        if too_small:
            raise APTPError(f"{', '.join(too_small)} must be >= 1")
        positive = ("lr", "gate_temperature_start", "gate_temperature_end", "score_temperature",
                    "contrastive_temperature", "sinkhorn_epsilon")
        not_positive = [name for name in positive if not getattr(self, name) > 0]
        if not_positive:
            raise APTPError(f"{', '.join(not_positive)} must be > 0")
        if self.weight_decay < 0 or self.validate_every < 0:
            raise APTPError("weight_decay and validate_every must be >= 0")
        if self.mixed_precision not in MIXED_PRECISION:
            raise APTPError(f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, "
                            f"got {self.mixed_precision!r}")
        if self.warmup_steps >= self.steps:
            raise APTPError(f"warmup_steps ({self.warmup_steps}) must be below steps ({self.steps})")
        UnitOptions(ff_chunks=self.ff_chunks, depth=self.depth)
        if self.difficulty_weighting not in DIFFICULTY_WEIGHTINGS:
            raise APTPError(f"difficulty_weighting must be one of {', '.join(DIFFICULTY_WEIGHTINGS)}, "
                            f"got {self.difficulty_weighting!r}")
        if self.difficulty_timesteps < 1:
            raise APTPError(f"difficulty_timesteps must be >= 1, got {self.difficulty_timesteps}")
        if self.difficulty_target not in DIFFICULTY_TARGETS:
            raise APTPError(f"difficulty_target must be one of {', '.join(DIFFICULTY_TARGETS)}, "
                            f"got {self.difficulty_target!r}")
        if self.difficulty_recovery_steps < 0 or not self.difficulty_recovery_lr > 0:
            raise APTPError("difficulty_recovery_steps must be >= 0 and difficulty_recovery_lr > 0")
        if self.code_init not in CODE_INITS:
            raise APTPError(f"code_init must be one of {', '.join(CODE_INITS)}, got {self.code_init!r}")
        if not 0 <= self.sinkhorn_balance <= 1:
            raise APTPError(f"sinkhorn_balance must be in [0, 1], got {self.sinkhorn_balance}")
        if not 0 < self.difficulty_worst_positions <= 1:
            raise APTPError(f"difficulty_worst_positions must be in (0, 1], got {self.difficulty_worst_positions}")
        if self.difficulty_exponent < 0 or not 0 < self.max_code_fraction <= 1 or self.difficulty_rows < 1:
            raise APTPError("difficulty_exponent must be >= 0, max_code_fraction in (0, 1] and difficulty_rows >= 1")
        try:
            width_floors(UnitLayout([]), self.min_width)
        except ValueError as error:
            raise APTPError(str(error)) from None

    @classmethod
    def from_dict(cls, data: dict) -> "PruneConfig":
        return config_from_dict(cls, data)


def load_prune_config(path: str | Path | None, overrides: dict | None = None) -> PruneConfig:
    """YAML file (optional) plus ``key=value`` overrides; unknown keys are errors."""
    data = {}
    if path:
        path = Path(path)
        if not path.is_file():
            raise APTPError(f"no such config file: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise APTPError(f"{path} is not valid YAML: {error}") from None
        if not isinstance(data, dict):
            raise APTPError(f"{path} must hold a mapping of options")
    return PruneConfig.from_dict({**data, **(overrides or {})})


def _progress(config: PruneConfig, step: int) -> float:
    """0 at the end of warm-up, 1 at the last step."""
    return min(1.0, max(0.0, (step - config.warmup_steps) / max(1, config.steps - 1 - config.warmup_steps)))


def _gate_temperature(config: PruneConfig, step: int) -> float:
    ratio = config.gate_temperature_end / config.gate_temperature_start
    return config.gate_temperature_start * ratio ** _progress(config, step)


def _gate_noise(config: PruneConfig, step: int) -> float:
    return config.gate_noise_start + (config.gate_noise_end - config.gate_noise_start) * _progress(config, step)


@dataclass
class PruneState:
    """Everything the pruning loop needs besides the config (built once by :func:`prepare`)."""

    accelerator: Accelerator
    pipeline: object
    family: ModelFamily
    unet: torch.nn.Module  # the base denoiser, gated
    controller: object
    macs_model: object
    router: PromptRouter
    optimizer: torch.optim.Optimizer
    scheduler: DDPMScheduler
    recorder: BlockRecorder
    train: EncodedCache
    val: EncodedCache
    latent_size: tuple[int, int]
    resolution: int
    text_length: int
    difficulty: torch.Tensor | None  # (N,) per training row, or None when experts are not sized by it
    identity: dict  # the base model and data the run depends on (see ``prepare``)


def prepare(config: PruneConfig) -> PruneState:
    accelerator = Accelerator(mixed_precision=config.mixed_precision, log_with="tensorboard",
                              project_dir=config.output_dir)
    set_seed(config.seed)
    pipeline = load_base_pipeline(config.model, accelerator.device)
    family = family_of_base(pipeline)
    for component in pipeline.components.values():  # the base model is frozen: only the router learns
        if isinstance(component, torch.nn.Module):
            component.requires_grad_(False)
    unet = family.denoiser(pipeline).eval().requires_grad_(False)
    options = UnitOptions(ff_chunks=config.ff_chunks, depth=config.depth)
    scale = pipeline.vae_scale_factor
    sample = unet.config.sample_size
    resolution = config.resolution or (sample if isinstance(sample, int) else sample[0]) * scale
    if resolution % scale:
        raise APTPError(f"resolution {resolution} is not a multiple of the VAE scale factor {scale}")
    latent_size = (resolution // scale, resolution // scale)
    text_length = config.text_length or family.text_length(pipeline)
    macs_model = family.build_macs_model(unet, latent_size, text_length, options)
    controller = family.attach_gates(unet, options)

    encoder = PromptEncoder(config.prompt_encoder, accelerator.device)
    out = Path(config.output_dir)
    train_set, val_set = make_datasets(config.data, config.train_size, config.val_size, resolution, config.seed)
    # What the result depends on besides the config: checked against the checkpoint before any cache or log
    # of this run is touched, saved in every checkpoint, and the key of every cache.
    identity = {"base_model": model_identity(config.model), "train": train_set.identity(),
                "val": val_set.identity()}
    refuse_other_settings(out / "checkpoint", asdict(config), identity=identity)

    def conditioning(prompts):
        return family.encode_prompts(pipeline, prompts, accelerator.device, resolution)

    def source(split: str, dataset) -> dict:
        return data_source(config.model, identity["base_model"], config.data, dataset, resolution, config.seed,
                           config.prompt_encoder, split)

    with accelerator.main_process_first():
        train = encode_dataset(train_set, pipeline.vae, conditioning, out / "cache" / "train", encoder.encode,
                               source=source("train", train_set), command="aptp prune")
        # The validation records of a dataset follow its training records: their source names both sizes.
        val = encode_dataset(val_set, pipeline.vae, conditioning, out / "cache" / "val", encoder.encode,
                             source=source(f"val after {config.train_size}", val_set), command="aptp prune")
    router = PromptRouter(
        units=macs_model.layout.to_dict(), num_codes=config.num_codes, prompt_dim=encoder.dim,
        arch_dim=config.arch_dim, hidden_dim=config.hidden_dim, hyper_hidden_dim=config.hyper_hidden_dim,
        gate_offset=config.gate_offset, score_temperature=config.score_temperature,
        prompt_encoder=config.prompt_encoder,
        metadata=PrunedFor(config.model, family.name, resolution, latent_size, text_length, config.budget, options,
                           macs_model.dense).to_dict(),
        min_width=config.min_width,
    )
    magnitudes = family.element_magnitudes(unet, options)
    if config.magnitude_prior:
        with torch.no_grad():
            router.hypernet[-1].bias += config.magnitude_prior * within_unit_zscores(macs_model.layout, magnitudes)
    optimizer = torch.optim.AdamW(router.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    router, optimizer = accelerator.prepare(router, optimizer)
    scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    difficulty = None
    if config.difficulty_exponent > 0 and config.num_codes > 1:
        reference = uniform_width_architecture(macs_model, config.budget, scores=magnitudes)
        with accelerator.main_process_first():
            difficulty = prompt_difficulty(family, unet, controller, reference, train, scheduler,
                                           pipeline.vae.config.scaling_factor, config,
                                           out / "cache" / "difficulty.safetensors", accelerator.device, identity)
    return PruneState(accelerator, pipeline, family, unet, controller, macs_model, router, optimizer, scheduler,
                      BlockRecorder(family.feature_modules(unet)), train, val, latent_size, resolution, text_length,
                      difficulty, identity)


def within_unit_zscores(layout: UnitLayout, values: torch.Tensor) -> torch.Tensor:
    """Each width unit's values standardised within the unit (zero mean, unit spread); depth units get 0."""
    scores = torch.zeros(layout.num_elements)
    for unit in layout:
        if unit.is_depth or unit.count < 2:
            continue
        part = values[layout.slice_of(unit.name)].double()
        scores[layout.slice_of(unit.name)] = ((part - part.mean()) / part.std().clamp_min(1e-12)).float()
    return scores


def _difficulty_target(family, model, noisy, timesteps, conditioning, empty, config):
    """The prediction ``prompt_difficulty`` compares (see ``PruneConfig.difficulty_target``); ``empty`` is the
    empty prompt's conditioning, for the targets that need the unconditioned prediction."""
    conditioned = family.denoise(model, noisy, timesteps, conditioning).float()
    if config.difficulty_target == "prediction":
        return conditioned
    unconditioned = family.denoise(model, noisy, timesteps, empty).float()
    if config.difficulty_target == "text":
        return conditioned - unconditioned
    return unconditioned + config.difficulty_guidance * (conditioned - unconditioned)


@torch.no_grad()
def _sliced(family, unet, architecture, config: PruneConfig, device) -> torch.nn.Module:
    return family.slice(unet, {k: list(v) for k, v in architecture.items()},
                        UnitOptions(ff_chunks=config.ff_chunks, depth=config.depth)).to(device).eval()


def _recovered(family, unet, architecture, cache: EncodedCache, scheduler, scaling: float, config: PruneConfig,
               device) -> torch.nn.Module:
    """``architecture`` sliced from the dense ``unet`` (gates off) and fine-tuned ``difficulty_recovery_steps``
    steps on the training rows toward the data and the dense prediction."""
    student = _sliced(family, unet, architecture, config, device)
    student.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.difficulty_recovery_lr)
    for step in tqdm(range(config.difficulty_recovery_steps), desc="difficulty: fine-tune the reference",
                     unit="step", leave=False):
        index = batch_index(step, config.batch_size, len(cache), config.seed + 1, 0, 1)
        seeds = sample_seeds(config.seed * 7919 + 29, batch_positions(step, config.batch_size, 0, 1))
        batch = noised_batch(cache, index, scheduler, scaling, seeds, device)
        with torch.no_grad():
            dense = family.denoise(unet, batch["noisy"], batch["timesteps"], batch["conditioning"])
        predicted = family.denoise(student, batch["noisy"], batch["timesteps"], batch["conditioning"])
        ddpm, distill, _ = task_losses(scheduler, batch, predicted, dense, {}, {}, config.min_snr_gamma)
        loss = config.lambda_ddpm * ddpm + config.lambda_distill * distill
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return student.eval().requires_grad_(False)


def _positional_error(prediction: torch.Tensor, reference: torch.Tensor, worst: float) -> torch.Tensor:
    """Per sample, the squared error averaged over channels and then over the ``worst`` fraction of positions
    with the largest error (all positions: the plain MSE)."""
    if worst >= 1:
        return (prediction - reference).pow(2).flatten(1).mean(1)
    error = (prediction - reference).pow(2).mean(1).flatten(1)
    count = max(1, math.ceil(worst * error.shape[1]))
    return error.topk(count, dim=1).values.mean(1)


def prompt_difficulty(family, unet, controller, reference, cache: EncodedCache, scheduler,
                      scaling: float, config: PruneConfig, cache_file: Path, device, identity: dict) -> torch.Tensor:
    """For the first ``difficulty_rows`` training rows, how far a fixed pruned model (the ``reference``
    architecture, fine-tuned first if ``difficulty_recovery_steps``) is from the dense teacher: the squared
    error of ``difficulty_target`` over the worst ``difficulty_worst_positions`` of the latent positions, at one
    random timestep or averaged over ``difficulty_timesteps`` strata of the schedule (min-SNR weighted if
    ``difficulty_weighting`` says so). Computed once and cached."""
    rows = min(config.difficulty_rows, len(cache))
    gamma = config.min_snr_gamma if config.difficulty_weighting == "min_snr" else None
    key = {"rows": rows, "budget": config.budget, "seed": config.seed, "min_snr_gamma": gamma,
           "depth": config.depth, "ff_chunks": config.ff_chunks, "identity": identity}
    if config.difficulty_timesteps > 1:
        key["timesteps"] = config.difficulty_timesteps
    if config.difficulty_target != "prediction":
        key["target"] = config.difficulty_target
        key["guidance"] = config.difficulty_guidance if config.difficulty_target == "guided" else None
    if config.difficulty_worst_positions < 1:
        key["worst_positions"] = config.difficulty_worst_positions
    if config.difficulty_recovery_steps:
        # Everything _recovered reads, so a cache of another recovery is never reused.
        key["recovery"] = [config.difficulty_recovery_steps, config.difficulty_recovery_lr, config.lambda_ddpm,
                           config.lambda_distill, config.min_snr_gamma, config.grad_clip, config.batch_size]
    key = json.loads(json.dumps(key))
    key_file = cache_file.with_suffix(".json")  # written last: a cache without it is incomplete
    if cache_file.is_file() and key_file.is_file() and json.loads(key_file.read_text()) == key:
        return load_file(cache_file)["difficulty"]
    with controller.use(None):  # sliced (the same function as the gated UNet, at its MACs), gates open
        if config.difficulty_recovery_steps:
            reference_model = _recovered(family, unet, reference, cache, scheduler, scaling, config, device)
        else:
            reference_model = _sliced(family, unet, reference, config, device)
        with torch.no_grad():
            difficulty = _measured_difficulty(family, unet, reference_model, cache, rows, scheduler, scaling,
                                              config, device)
    save_tensors_atomic({"difficulty": difficulty}, cache_file)
    write_json_atomic(key_file, key)
    return difficulty


def _measured_difficulty(family, unet, reference_model, cache: EncodedCache, rows: int, scheduler,
                         scaling: float, config: PruneConfig, device) -> torch.Tensor:
    gamma = config.min_snr_gamma if config.difficulty_weighting == "min_snr" else None
    difficulty = torch.zeros(rows)
    for start in tqdm(range(0, rows, config.batch_size), desc="prompt difficulty", unit="batch", leave=False):
        index = torch.arange(start, min(rows, start + config.batch_size))
        batch = noised_batch(cache, index, scheduler, scaling, sample_seeds(config.seed * 7919 + 17, index), device)
        empty = None if config.difficulty_target == "prediction" else \
            conditioning_of(cache, torch.full((len(index),), EMPTY_PROMPT_INDEX), device)
        strata = config.difficulty_timesteps
        for stratum in range(strata):
            timesteps = batch["timesteps"]
            if strata > 1:  # the row's draw moved into stratum k of the schedule
                total = scheduler.config.num_train_timesteps
                timesteps = (stratum * total + timesteps) // strata
            noisy = scheduler.add_noise(batch["latents"], batch["noise"], timesteps) if strata > 1 else batch["noisy"]
            teacher = _difficulty_target(family, unet, noisy, timesteps, batch["conditioning"], empty, config)
            pruned = _difficulty_target(family, reference_model, noisy, timesteps, batch["conditioning"], empty,
                                        config)
            error = _positional_error(pruned, teacher, config.difficulty_worst_positions)
            weights = snr_weights(scheduler, timesteps, gamma)
            difficulty[index] += (error * weights if weights is not None else error).cpu() / strata
    return difficulty


@torch.no_grad()
def code_difficulty(router: PromptRouter, train: EncodedCache, difficulty: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean difficulty of the measured training rows each code receives by argmax routing, and its share of them."""
    embeddings = train.rows("prompt_embeddings", train.prompt_index[:len(difficulty)])
    routes = router.route(embeddings.to(router.codes.device)).cpu()
    counts = torch.bincount(routes, minlength=router.num_codes).double()
    sums = torch.zeros(router.num_codes, dtype=torch.float64).index_add_(0, routes, difficulty.double())
    mean = torch.where(counts > 0, sums / counts.clamp_min(1), difficulty.double().mean())
    return mean, counts / counts.sum()


def _global_pairs(accelerator, arch: torch.Tensor, prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The architecture and prompt embeddings of the global batch, so the contrastive term compares every
    pair as one process would. The gather keeps the gradient: its backward sums what every process's
    (identical) loss sends to this process's rows, and the gradient average of DDP divides by the processes."""
    if accelerator.num_processes == 1:
        return arch, prompts
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(arch.contiguous())), accelerator.gather(prompts.contiguous())


def _cluster_codes(router: PromptRouter, train: EncodedCache, config: PruneConfig) -> None:
    generator = torch.Generator().manual_seed(config.seed * 7919 + 29)
    records = torch.randperm(len(train), generator=generator)[:config.kmeans_prompts].sort().values
    router.cluster_codes(train.rows("prompt_embeddings", train.prompt_index[records]), generator)


def prune_step(config: PruneConfig, state: PruneState, step: int) -> dict[str, float]:
    """One optimisation step of the router; returns the loss terms."""
    accelerator, router, unet = state.accelerator, state.accelerator.unwrap_model(state.router), state.unet
    device = accelerator.device
    size = len(state.train)
    rank, world = accelerator.process_index, accelerator.num_processes
    index = batch_index(step, config.batch_size, size, config.seed, rank, world)
    seeds = sample_seeds(config.seed, batch_positions(step, config.batch_size, rank, world))
    batch = noised_batch(state.train, index, state.scheduler, state.pipeline.vae.config.scaling_factor, seeds, device)
    noisy, timesteps, conditioning = batch["noisy"], batch["timesteps"], batch["conditioning"]
    prompt_embeddings = state.train.rows("prompt_embeddings", state.train.prompt_index[index]).to(device)

    warming_up = step < config.warmup_steps
    if step == config.warmup_steps and config.code_init == "kmeans":
        # Until now the gates were open and the hypernetwork's output did not depend on the codes, so
        # moving them changes no architecture; every process computes the same centroids.
        _cluster_codes(router, state.train, config)
    # Through the wrapper: under DDP this is what synchronises the router's gradients. The gate seed is
    # the same on every process, so a code has one architecture per step across the global batch.
    routed = state.router(prompt_embeddings, _gate_temperature(config, step),
                          torch.Generator().manual_seed(config.seed * 7919 + step), _gate_noise(config, step))
    arch, scores, code_gates = routed["arch"], routed["scores"], routed["code_gates"]
    balanced = sinkhorn(scores, config.sinkhorn_epsilon, config.sinkhorn_iterations, config.sinkhorn_balance)
    assignment = balanced.argmax(dim=1)
    zero = scores.sum() * 0.0
    if warming_up:
        # Gates stay open: the UNet would compute the teacher's output, so it is not run at all.
        gates = torch.ones(len(index), state.macs_model.layout.num_elements, device=device)
        ddpm = distill = blocks = zero + code_gates.sum() * 0.0  # every parameter takes part (DDP)
    else:
        gates = router.mix(scores, assignment, code_gates)
        with torch.no_grad(), state.controller.use(None):
            teacher = state.family.denoise(unet, noisy, timesteps, conditioning)
            teacher_blocks = state.recorder.take()
        with state.controller.use(gates):
            student = state.family.denoise(unet, noisy, timesteps, conditioning)
            student_blocks = state.recorder.take()
        ddpm, distill, blocks = task_losses(state.scheduler, batch, student, teacher, student_blocks, teacher_blocks,
                                            config.min_snr_gamma, config.normalize_blocks)
    fraction = state.macs_model.fraction(gates.double()).float()
    code_fractions = state.macs_model.fraction(code_gates.double()).float()
    size = spread = zero
    targets = None
    if state.difficulty is not None and not warming_up:
        # The average over the prompts as inference routes them meets the budget; each code meets a
        # target that grows with how hard its prompts are.
        difficulty, share = code_difficulty(router, state.train, state.difficulty)
        targets = code_targets(difficulty, share, config.budget, config.difficulty_exponent,
                               config.max_code_fraction).to(device)
        resource = resource_loss((share.to(device).float() * code_fractions).sum(0, keepdim=True), config.budget)
        size = code_size_loss(code_fractions, targets)
    else:
        resource = resource_loss(fraction, config.budget)
    if config.lambda_spread and not warming_up:
        spread = spread_loss(code_fractions, config.max_code_fraction)
    contrastive = contrastive_loss(*_global_pairs(accelerator, arch, prompt_embeddings),
                                   config.contrastive_temperature)
    assign = assignment_loss(scores, balanced, config.score_temperature)
    total = (config.lambda_ddpm * ddpm + config.lambda_distill * distill + config.lambda_blocks * blocks
             + config.lambda_resource * resource + config.lambda_code_size * size + config.lambda_spread * spread
             + config.lambda_contrastive * contrastive + config.lambda_assign * assign)
    accelerator.backward(total)
    if config.grad_clip:
        accelerator.clip_grad_norm_(state.router.parameters(), config.grad_clip)
    state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    logs = {"loss/total": total.item(), "loss/ddpm": ddpm.item(), "loss/distill": distill.item(),
            "loss/blocks": blocks.item(), "loss/resource": resource.item(), "loss/contrastive": contrastive.item(),
            "loss/assign": assign.item(), "loss/code_size": size.item(), "loss/spread": spread.item(),
            "macs/batch_fraction": fraction.mean().item(), "macs/budget": config.budget}
    counts = torch.bincount(assignment, minlength=router.num_codes)
    for k in range(router.num_codes):
        logs[f"assign/code_{k}"] = counts[k].item() / len(index)
        if not warming_up:
            logs[f"macs/code_{k}"] = code_fractions[k].item()
        if targets is not None:
            logs[f"macs/target_{k}"] = targets[k].item()
    return logs


@torch.no_grad()
def summarize_experts(state: PruneState) -> dict:
    """Deterministic expert architectures, their MACs, and how the validation prompts route."""
    router = state.accelerator.unwrap_model(state.router)
    architectures = router.expert_architectures()
    fractions = [state.macs_model.macs_of(a) / state.macs_model.dense for a in architectures]
    prompt_embeddings = state.val.rows("prompt_embeddings", state.val.prompt_index).to(state.accelerator.device)
    routes = router.route(prompt_embeddings).cpu()
    counts = torch.bincount(routes, minlength=router.num_codes)
    share = (counts.float() / len(routes)).tolist()
    mean_fraction = float(torch.tensor(fractions, dtype=torch.float64)[routes].mean())
    summary = {"architectures": architectures, "macs_fraction": fractions, "val_share": share,
               "val_mean_macs_fraction": mean_fraction, "val_prompts": len(routes)}
    categories = state.train.categories[:len(state.difficulty) if state.difficulty is not None else 0]
    if categories and all(categories):
        summary["difficulty_by_category"] = {
            c: float(state.difficulty[[i for i, x in enumerate(categories) if x == c]].mean())
            for c in sorted(set(categories))}
    return summary


@torch.no_grad()
def validation_grid(state: PruneState, config: PruneConfig, path: Path) -> None:
    """One validation prompt per code, sampled through the gated UNet with that code's expert."""
    from ..imaging import comparison_grid, save_image_atomic, to_pil

    router = state.accelerator.unwrap_model(state.router)
    val_prompts = state.val.prompt_index
    routes = router.route(state.val.rows("prompt_embeddings", val_prompts).to(state.accelerator.device)).cpu()
    prompts = state.val.prompts
    labels, images = [], []
    for k, architecture in enumerate(router.expert_architectures()):
        members = torch.nonzero(routes == k).flatten()
        prompt = prompts[int(val_prompts[members[0]])] if len(members) else prompts[int(val_prompts[0])]
        gates = state.macs_model.layout.gates_from_architecture(architecture).to(state.accelerator.device)
        with state.controller.use(gates):
            image = state.pipeline(prompt, num_inference_steps=config.validation_steps,
                                   guidance_scale=config.validation_guidance_scale,
                                   generator=torch.Generator().manual_seed(config.seed), output_type="pt").images
        labels.append(f"expert {k} ({state.macs_model.macs_of(architecture) / state.macs_model.dense:.2f} MACs, "
                      f"{len(members)} val prompts): {prompt}")
        images.append(to_pil(image)[0])
    save_image_atomic(comparison_grid(labels, {"sample": images}), path)


def save_router(state: PruneState, config: PruneConfig, folder: Path) -> dict:
    """``folder``: the router (``save_pretrained``) and ``experts.json`` (architectures and MACs)."""
    summary = summarize_experts(state)
    router = state.accelerator.unwrap_model(state.router)
    experts = [{"code": k, "macs": summary["macs_fraction"][k] * state.macs_model.dense,
                "macs_fraction": summary["macs_fraction"][k], "val_share": summary["val_share"][k],
                "architecture": summary["architectures"][k]} for k in range(router.num_codes)]
    with atomic_folder(folder) as temporary:
        router.save_pretrained(temporary)
        write_json_atomic(temporary / "experts.json", {
            "budget": config.budget, "resolution": state.resolution, "dense_macs": state.macs_model.dense,
            "val_mean_macs_fraction": summary["val_mean_macs_fraction"], "val_prompts": summary["val_prompts"],
            "difficulty_by_category": summary.get("difficulty_by_category"),
            "config": asdict(config), "experts": experts,
        })
    return summary


def format_summary(summary: dict, state: PruneState, config: PruneConfig) -> str:
    lines = [f"experts at {state.resolution} px (dense {state.macs_model.dense / 1e9:.3f} GMACs), "
             f"budget {config.budget:.2f}:",
             f"  {'expert':<8}{'val prompts':>12}{'MACs fraction':>15}"]
    for k, (share, fraction) in enumerate(zip(summary["val_share"], summary["macs_fraction"])):
        lines.append(f"  {k:<8}{share:>11.1%}{fraction:>15.3f}")
    lines.append(f"  mean MACs fraction over {summary['val_prompts']} validation prompts: "
                 f"{summary['val_mean_macs_fraction']:.3f}")
    if "difficulty_by_category" in summary:
        recovery = (f", fine-tuned {config.difficulty_recovery_steps} steps" if config.difficulty_recovery_steps
                    else "")
        positions = (f", worst {config.difficulty_worst_positions:g} of the positions"
                     if config.difficulty_worst_positions < 1 else "")
        lines.append(f"prompt difficulty (distance to the teacher of a uniform L1 pruning at the budget{recovery}"
                     f"{positions}) by category: " + ", ".join(f"{c} {v:.4f}" for c, v in summary["difficulty_by_category"].items()))
    return "\n".join(lines)


# What ``run_prune`` writes into its output folder (``prune/`` holds the TensorBoard logs).
PRUNE_OUTPUTS = ("checkpoint", "router", "cache", "prune", "validation")


def run_prune(config: PruneConfig, overwrite: bool = False) -> dict:
    """Train the router; writes ``OUTPUT/router`` and returns the expert summary. A folder holding a run with
    other settings, base model or data is refused unless ``overwrite`` (which deletes that run first)."""
    out = Path(config.output_dir)
    checkpoint = out / "checkpoint"
    if overwrite:
        remove_outputs(*(out / name for name in PRUNE_OUTPUTS))
    state = prepare(config)
    accelerator = state.accelerator
    # TensorBoard's hyperparameters are scalars: nested options are logged as JSON text.
    accelerator.init_trackers("prune", config={k: json.dumps(v) if isinstance(v, (dict, list)) else v
                                               for k, v in asdict(config).items() if v is not None})
    if accelerator.num_processes > 1:
        accelerator.print(f"{accelerator.num_processes} processes, global batch "
                          f"{config.batch_size * accelerator.num_processes} ({config.batch_size} per process)")
    start = 0
    if resumed := resume_checkpoint(checkpoint, {"router": accelerator.unwrap_model(state.router)}, state.optimizer):
        found, saved = resumed
        check_same_settings(found, saved, asdict(config), identity=state.identity)
        start = saved["step"]
        accelerator.print(f"resuming from step {start}")

    def save(step: int) -> None:
        if accelerator.is_main_process:
            save_checkpoint(checkpoint, {"router": accelerator.unwrap_model(state.router)},
                            {"step": step, "config": asdict(config), "identity": state.identity}, state.optimizer)
        accelerator.wait_for_everyone()

    def after_step(step: int, logs: dict) -> None:
        if step % config.log_every == 0:
            accelerator.log(logs, step=step)
        if config.validate_every and step % config.validate_every == 0 and accelerator.is_main_process:
            validation_grid(state, config, out / "validation" / f"step-{step:06d}.png")

    try:
        run_loop(config.steps, start, lambda step: prune_step(config, state, step), save, config.checkpoint_every,
                 checkpoint, "prune", after_step, accelerator.is_local_main_process,
                 shown=("loss/total", "macs/batch_fraction"))
    finally:
        state.controller.remove()
    summary = save_router(state, config, out / "router") if accelerator.is_main_process else {}
    accelerator.end_training()
    if summary:
        accelerator.print(format_summary(summary, state, config))
        accelerator.print(f"router written to {out / 'router'}")
    return summary
