"""``aptp finetune``: fine-tune one physically sliced expert on the prompts routed to it.

Loss: ``lambda_ddpm * L_ddpm + lambda_distill * MSE(expert, dense) + lambda_blocks * block MSE`` with
the dense base UNet as teacher. Each expert is an independent job (one per GPU, node or array
task); checkpoints are atomic and resuming is exact.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import DDPMScheduler
from diffusers.optimization import SchedulerType, get_scheduler
from diffusers.training_utils import EMAModel
from torch import nn

from ..base_model import load_base_pipeline, model_identity
from ..config import config_from_dict
from ..experts.run import PrunedRun, expert_folder, load_run
from ..imaging import comparison_grid, save_image_atomic, to_pil
from ..utils import APTPError, atomic_folder, check_output_folder, read_json, write_json_atomic
from .assign import CACHE_DIR, shard_file
from .cache import EncodedCache
from .checkpoint import check_same_settings, refuse_other_settings, remove_outputs, resume_checkpoint, save_checkpoint
from .common import (
    MIXED_PRECISION,
    BlockRecorder,
    batch_index,
    batch_positions,
    noised_batch,
    run_loop,
    sample_seeds,
    task_losses,
)

LR_SCHEDULES = tuple(t.value for t in SchedulerType if t is not SchedulerType.PIECEWISE_CONSTANT)


class ShadowWeights(nn.Module):
    """The EMA's weights as a module, so checkpoints save and restore them like any other (in place)."""

    def __init__(self, tensors: list[torch.Tensor]):
        super().__init__()
        self.weights = nn.ParameterList(nn.Parameter(t, requires_grad=False) for t in tensors)


@dataclass
class FinetuneConfig:
    steps: int = 100
    batch_size: int = 32
    lr: float = 1e-4
    lr_schedule: str = "constant"  # any of diffusers' schedules (optimization.get_scheduler), e.g. cosine, linear
    lr_warmup: int = 0
    ema_decay: float | None = None  # keep an EMA of the weights (diffusers' EMAModel) and save it instead
    log_every: int = 1  # TensorBoard: loss terms and learning rate every N steps
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    lambda_ddpm: float = 1.0
    lambda_distill: float = 1.0
    lambda_blocks: float = 0.5
    min_snr_gamma: float | None = 5.0  # weights the diffusion and distillation losses
    normalize_blocks: bool = True  # block distillation divided by the teacher's feature energy per block
    seed: int = 0
    checkpoint_every: int = 50
    validate_every: int = 0  # samples of the expert's own prompts every N steps (0: only at the end)
    validation_prompts: int = 4
    validation_steps: int = 10
    mixed_precision: str = "no"

    def __post_init__(self):
        if self.lr_schedule not in LR_SCHEDULES:
            raise APTPError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise APTPError(f"ema_decay must be in (0, 1) (or null: no EMA), got {self.ema_decay}")
        for name in ("steps", "batch_size", "checkpoint_every", "validation_steps", "log_every"):
            if getattr(self, name) < 1:
                raise APTPError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "lr_warmup", "weight_decay", "grad_clip", "lambda_ddpm", "lambda_distill", "lambda_blocks",
                     "validate_every", "validation_prompts"):
            if not 0 <= getattr(self, name) < math.inf:
                raise APTPError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        if self.min_snr_gamma is not None and not 0 < self.min_snr_gamma < math.inf:
            raise APTPError(f"min_snr_gamma must be > 0 (or null: no weighting), got {self.min_snr_gamma}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise APTPError(f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, "
                            f"got {self.mixed_precision!r}")

    @classmethod
    def from_dict(cls, data: dict) -> "FinetuneConfig":
        return config_from_dict(cls, data)


def read_shard(assign_dir: str | Path, expert: int) -> list[int]:
    """The cache rows ``aptp assign`` routed to ``expert``."""
    shard = shard_file(assign_dir, expert)
    if not shard.is_file():
        raise APTPError(f"no {shard.name} in {assign_dir}; run `aptp assign` first")
    content = read_json(shard)
    rows = content.get("rows") if isinstance(content, dict) else None
    if not isinstance(rows, list) or not all(isinstance(r, int) and r >= 0 for r in rows):
        raise APTPError(f"{shard} is damaged: no list of rows; run `aptp assign` again")
    return rows


def load_assigned_cache(assign_dir: str | Path, base_model: str) -> EncodedCache:
    """The dataset ``aptp assign`` encoded into ``assign_dir``, checked to come from ``base_model``."""
    cache = EncodedCache(Path(assign_dir) / CACHE_DIR, "aptp assign")
    source = cache.source.get("model") if isinstance(cache.source, dict) else None
    if source is not None and source != base_model:
        raise APTPError(f"{assign_dir} was encoded with the base model {source}, not this router's {base_model}; "
                        "run `aptp assign` with this router")
    if "latent_mean" not in cache or not cache.conditioning:
        raise APTPError(f"{cache.folder} is damaged (not an encoded dataset); run `aptp assign` again")
    return cache


def run_finetune(router_dir: str | Path, assign_dir: str | Path, expert: int, out: str | Path,
                 config: FinetuneConfig | None = None, overwrite: bool = False, device=None) -> Path:
    """Fine-tune expert ``expert`` on its shard; writes ``OUT/expert-K`` (``save_pretrained``) and returns it.
    A run with other settings, base model or shard in the way is refused unless ``overwrite``. ``device``
    "cpu" keeps it on the CPU; otherwise Accelerate picks the GPU of this process when there is one."""
    run = load_run(router_dir)
    if not 0 <= expert < run.router.num_codes:
        raise APTPError(f"expert must be in [0, {run.router.num_codes}), got {expert}")
    rows = read_shard(assign_dir, expert)
    if not rows:
        raise APTPError(f"no prompts were routed to expert {expert}; nothing to fine-tune it on")
    plan = run.experts[expert]
    return finetune_architecture(run, plan.architecture, assign_dir, rows, expert_folder(out, expert), config,
                                 {"expert": expert, "macs_fraction": plan.macs_fraction}, overwrite, device)


def finetune_architecture(run: PrunedRun, architecture: dict, assign_dir: str | Path, rows: list[int], out: Path,
                          config: FinetuneConfig | None = None, info: dict | None = None, overwrite: bool = False,
                          device=None) -> Path:
    """Slice ``architecture`` from the run's base denoiser and fine-tune it on ``rows`` of the encoded dataset
    in ``assign_dir``; writes the model to ``out`` (``save_pretrained``, atomically) and returns it."""
    config = config or FinetuneConfig()
    base_model, options, family = run.base_model, run.pruned_for.unit_options, run.family
    info = {**(info or {}), **run.pruned_for.pruned_at()}
    out = check_output_folder(out)
    cache = load_assigned_cache(assign_dir, base_model)  # bad input fails before the model loads
    prompts, prompt_index = cache.prompts, cache.prompt_index.tolist()
    if max(rows, default=0) >= len(cache):
        raise APTPError(f"the routed rows do not match the encoded dataset in {assign_dir}; run `aptp assign` again")
    checkpoint = out.with_name(out.name + "-checkpoint")
    # At a constant learning rate, more steps extend a run exactly; every other change mixes two runs.
    free = ("steps",) if config.lr_schedule == "constant" else ()
    shard = hashlib.sha256(json.dumps([[r, prompts[prompt_index[r]]] for r in rows]).encode())
    identity = {"base_model": model_identity(base_model), "shard": {"rows": len(rows), "hash": shard.hexdigest()[:16]},
                "architecture": hashlib.sha256(json.dumps(architecture, sort_keys=True).encode()).hexdigest()[:16]}
    if overwrite:
        remove_outputs(checkpoint, out)
    refuse_other_settings(checkpoint, asdict(config), free, identity)
    rows = torch.tensor(rows, dtype=torch.long)
    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=str(device) == "cpu",
                              log_with="tensorboard", project_dir=str(out.parent))
    set_seed(config.seed)
    pipeline = load_base_pipeline(base_model, accelerator.device)
    teacher = family.denoiser(pipeline).eval().requires_grad_(False)
    architecture = {k: list(v) for k, v in architecture.items()}
    student = family.slice(teacher, architecture, options).train().requires_grad_(True)
    scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    student, optimizer = accelerator.prepare(student, optimizer)
    teacher_blocks = BlockRecorder(family.feature_modules(teacher))
    student_blocks = BlockRecorder(family.feature_modules(accelerator.unwrap_model(student)))
    ema = EMAModel(student.parameters(), decay=config.ema_decay) if config.ema_decay else None
    modules = {"expert": accelerator.unwrap_model(student)}
    if ema is not None:
        modules["ema"] = ShadowWeights(ema.shadow_params)
    start = 0
    if resumed := resume_checkpoint(checkpoint, modules, optimizer):
        found, saved = resumed
        check_same_settings(found, saved, asdict(config), free, identity)
        start = saved["step"]
        if ema is not None:
            ema.optimization_step = saved["ema_step"]
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", config.lr)
    lr_scheduler = get_scheduler(config.lr_schedule, optimizer, num_warmup_steps=config.lr_warmup,
                                 num_training_steps=config.steps, last_epoch=start - 1)
    accelerator.init_trackers(f"logs-{out.name}", config={k: v for k, v in asdict(config).items() if v is not None})
    scaling = pipeline.vae.config.scaling_factor
    device = accelerator.device

    def step_fn(step: int) -> float:
        rank, world = accelerator.process_index, accelerator.num_processes
        picked = rows[batch_index(step, config.batch_size, len(rows), config.seed, rank, world)]
        seeds = sample_seeds(config.seed, batch_positions(step, config.batch_size, rank, world))
        batch = noised_batch(cache, picked, scheduler, scaling, seeds, device)
        with torch.no_grad():
            dense = family.denoise(teacher, batch["noisy"], batch["timesteps"], batch["conditioning"])
        predicted = family.denoise(student, batch["noisy"], batch["timesteps"], batch["conditioning"])
        ddpm, distill, blocks = task_losses(scheduler, batch, predicted, dense, student_blocks.take(),
                                            teacher_blocks.take(), config.min_snr_gamma, config.normalize_blocks)
        loss = config.lambda_ddpm * ddpm + config.lambda_distill * distill + config.lambda_blocks * blocks
        accelerator.backward(loss)
        if config.grad_clip:
            accelerator.clip_grad_norm_(student.parameters(), config.grad_clip)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(student.parameters())
        return {"loss/total": loss.item(), "loss/ddpm": ddpm.item(), "loss/distill": distill.item(),
                "loss/blocks": blocks.item(), "lr": lr}

    def save(step: int) -> None:
        if accelerator.is_main_process:
            state = {"step": step, "config": asdict(config), "identity": identity}
            if ema is not None:
                state["ema_step"] = ema.optimization_step
            save_checkpoint(checkpoint, modules, state, optimizer)
        accelerator.wait_for_everyone()

    def validate(step: int) -> None:
        expert_prompts = [prompts[prompt_index[r]] for r in rows[:config.validation_prompts]]
        unet = accelerator.unwrap_model(student).eval()
        images = {}
        for name, model in (("dense", teacher), (out.name, unet)):
            images[name] = to_pil(family.pipeline_around(pipeline, model)(
                expert_prompts, num_inference_steps=config.validation_steps, output_type="pt",
                generator=[torch.Generator().manual_seed(i) for i in range(len(expert_prompts))]).images)
        unet.train()
        save_image_atomic(comparison_grid(expert_prompts, images), out.parent / f"validation-{out.name}" /
                          f"step-{step:06d}.png")

    def after_step(step: int, values: dict) -> None:
        if step % config.log_every == 0:
            accelerator.log(values, step=step)
        if config.validate_every and step % config.validate_every == 0 and accelerator.is_main_process:
            validate(step)

    run_loop(config.steps, start, step_fn, save, config.checkpoint_every, checkpoint, out.name,
             after_step, accelerator.is_local_main_process, shown=("loss/total",))
    accelerator.end_training()
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(student).eval()
        if ema is not None:
            ema.copy_to(final.parameters())
        with atomic_folder(out) as folder:
            final.save_pretrained(folder)
            write_json_atomic(folder / "aptp_expert.json", {**info, "samples": len(rows),
                                                            "config": asdict(config)})
        if config.validation_prompts:
            validate(config.steps)
    accelerator.wait_for_everyone()
    return out
