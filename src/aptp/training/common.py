"""Pieces shared by the training loops: batches over a cached dataset, diffusion targets, block
feature recording and data sources."""

from __future__ import annotations

import math
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr
from tqdm.auto import tqdm

from ..base_model import WORLD
from ..data import CaptionedImages, WorldImages, load_cc3m, load_coco, load_imagefolder
from ..utils import APTPError
from .cache import EncodedCache, conditioning_of

MIXED_PRECISION = ("no", "fp16", "bf16")  # what Accelerate runs for any model


def make_datasets(data: str, train_size: int, val_size: int, resolution: int, seed: int = 0):
    """Train and validation datasets of a data source: ``world``, an imagefolder, ``coco:ROOT[:SPLIT]``
    or ``cc3m:TSV:IMAGE_FOLDER``. Validation takes the world's val split, or the records after the train ones."""
    if data == WORLD:
        return WorldImages(train_size, "train", seed), WorldImages(val_size, "val", seed)
    kind, _, rest = data.partition(":")
    if kind == "coco" and rest:
        root, _, split = rest.partition(":")
        report = load_coco(root, split or "train2014")
    elif kind == "cc3m" and rest.count(":") >= 1:
        tsv, _, images = rest.partition(":")
        report = load_cc3m(tsv, images)
    else:
        report = load_imagefolder(data)
    print(f"data: {report.summary()}")
    records = report.records
    if len(records) < 2:
        raise APTPError(f"{data}: need at least two captioned images, found {len(records)}")
    train = records[:train_size]
    val = records[train_size:train_size + val_size] or train[-val_size:]
    return CaptionedImages(train, resolution), CaptionedImages(val, resolution)


def batch_positions(step: int, batch: int, rank: int, world: int) -> torch.Tensor:
    """Positions in the run's sample stream of this process's share of global batch ``step`` (``batch``
    per process): the processes together cover the same positions as one process with ``batch * world``."""
    return torch.arange(step * batch * world, (step + 1) * batch * world)[rank::world]


def sample_seeds(seed: int, positions: torch.Tensor) -> torch.Tensor:
    """One noise seed per sample of the stream, so what a sample draws does not depend on the processes."""
    return seed * 1_000_003 + 7 + positions


def batch_index(step: int, batch: int, size: int, seed: int, rank: int, world: int) -> torch.Tensor:
    """This process's share of global batch ``step``; a new permutation of the data every epoch."""
    positions = batch_positions(step, batch, rank, world)
    epochs = positions.div(size, rounding_mode="floor")
    index = torch.empty_like(positions)
    for epoch in epochs.unique().tolist():
        order = torch.randperm(size, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        index[epochs == epoch] = order[positions[epochs == epoch] % size]
    return index


def warmup_cosine_lr(base: float, step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the base rate."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def diffusion_target(scheduler, latents, noise, timesteps):
    if scheduler.config.prediction_type == "epsilon":
        return noise
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise APTPError(f"prediction type {scheduler.config.prediction_type!r} is not supported")


def snr_weights(scheduler, timesteps, gamma: float | None) -> torch.Tensor | None:
    """Min-SNR-gamma weights (Hang et al. 2023) of the diffusion loss, or None: diffusers' ``compute_snr`` and
    the weights of its training scripts, min(SNR, gamma) / SNR for epsilon-prediction and
    min(SNR, gamma) / (SNR + 1) for v-prediction."""
    if gamma is None:
        return None
    snr = compute_snr(scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if scheduler.config.prediction_type == "v_prediction" else clipped / snr


def noised_batch(cache: EncodedCache, rows: torch.Tensor, scheduler, scaling: float, seeds: torch.Tensor,
                 device) -> dict[str, torch.Tensor]:
    """Rows ``rows`` of an encoded dataset (:func:`~aptp.training.cache.encode_dataset`), noised at random
    training timesteps: ``latents`` (a sample of each posterior), ``noise``, ``conditioning`` (the denoiser's,
    by name), ``timesteps``, ``noisy`` and the model's ``target``. Row i draws from a CPU generator seeded with ``seeds[i]``, so a step is reproducible
    and a sample's draws are the same however the batch is split across processes."""
    mean, std = cache.rows("latent_mean", rows), cache.rows("latent_std", rows)
    shape = mean.shape[1:]
    draws = []
    for seed in seeds.tolist():
        generator = torch.Generator().manual_seed(int(seed))
        draws.append((torch.randn(shape, generator=generator), torch.randn(shape, generator=generator),
                      torch.randint(0, scheduler.config.num_train_timesteps, (), generator=generator)))
    posterior, noise, timesteps = (torch.stack(parts) for parts in zip(*draws))
    latents = ((mean + std * posterior) * scaling).to(device)
    conditioning = conditioning_of(cache, cache.prompt_index[rows], device)
    noise, timesteps = noise.to(device), timesteps.to(device)
    return {"latents": latents, "noise": noise, "conditioning": conditioning, "timesteps": timesteps,
            "noisy": scheduler.add_noise(latents, noise, timesteps),
            "target": diffusion_target(scheduler, latents, noise, timesteps)}


def block_distillation(student_blocks: dict, teacher_blocks: dict, normalize: bool) -> torch.Tensor:
    """Mean over blocks of the feature MSE to the teacher; with ``normalize``, each block's MSE is divided
    by the teacher's mean squared feature (LAPTOP-Diff), so blocks with large activations do not dominate."""
    terms = []
    for name, target in teacher_blocks.items():
        error = F.mse_loss(student_blocks[name].float(), target.float())
        terms.append(error / target.float().pow(2).mean().clamp_min(1e-8) if normalize else error)
    return sum(terms) / max(1, len(terms))


def task_losses(scheduler, batch: dict, student: torch.Tensor, teacher: torch.Tensor, student_blocks: dict,
                teacher_blocks: dict, min_snr_gamma: float | None,
                normalize_blocks: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The diffusion loss and output distillation (both min-SNR weighted when ``min_snr_gamma`` is set)
    and the block distillation of a student prediction against the dense teacher's, on a :func:`noised_batch`."""
    weights = snr_weights(scheduler, batch["timesteps"], min_snr_gamma)

    def weighted_mse(prediction, target):
        per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        return (per_sample * weights).mean() if weights is not None else per_sample.mean()

    return (weighted_mse(student, batch["target"]), weighted_mse(student, teacher),
            block_distillation(student_blocks, teacher_blocks, normalize_blocks))


class BlockRecorder:
    """Forward hooks keeping the outputs of the distilled blocks of the last forward."""

    def __init__(self, modules: dict):
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name):
        def hook(module, args, output):
            self.outputs[name] = output[0] if isinstance(output, tuple) else output

        return hook

    def take(self) -> dict[str, torch.Tensor]:
        outputs, self.outputs = self.outputs, {}
        return outputs


@contextmanager
def deferred_interrupt():
    """Within the block a first Ctrl-C is only remembered (the yielded function tells whether one came),
    so that a step is never cut in half; a second one interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False  # signal handlers can only be set from the main thread
        return
    received = []

    def handler(signum, frame):
        if received:
            raise KeyboardInterrupt
        received.append(signum)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(received)
    finally:
        signal.signal(signal.SIGINT, previous)


def run_loop(steps: int, start: int, step_fn: Callable[[int], dict], save_fn: Callable[[int], None],
             checkpoint_every: int, checkpoint: Path, desc: str,
             after_step: Callable[[int, dict], None] | None = None, show: bool = True,
             shown: tuple[str, ...] | None = None) -> None:
    """The loop every trainer shares: progress bar, a checkpoint every ``checkpoint_every`` steps and at
    the end, and on Ctrl-C a checkpoint followed by a one-line message on how to resume.

    Ctrl-C is honoured between steps, so the checkpoint holds whole steps only; a second Ctrl-C stops
    at once and keeps the last checkpoint. ``step_fn(step)`` returns a dict of values (those named in
    ``shown``, default all, appear beside the bar); ``after_step(step, values)`` runs after each step.
    """
    bar = tqdm(total=steps, initial=start, desc=desc, unit="step", disable=not show)
    step, saved = start, None

    def save(at: int) -> None:
        nonlocal saved
        save_fn(at)
        saved = at

    try:
        with deferred_interrupt() as interrupted:
            while step < steps:
                values = step_fn(step)
                step += 1
                bar.update(1)
                bar.set_postfix({k.rpartition("/")[2]: f"{v:.4g}" for k, v in values.items()
                                 if shown is None or k in shown}, refresh=False)
                if step % checkpoint_every == 0 or step == steps:
                    save(step)
                if after_step is not None:
                    after_step(step, values)
                if interrupted():
                    if saved != step:
                        save(step)
                    raise APTPError(f"interrupted at step {step}; checkpoint saved in {checkpoint}, "
                                    "run the same command to resume")
    except KeyboardInterrupt:
        last = f"the last checkpoint (step {saved}) is" if saved is not None else "earlier checkpoints, if any, are"
        raise APTPError(f"interrupted during step {step + 1}; {last} in {checkpoint}, "
                        "run the same command to resume") from None
    finally:
        bar.close()
