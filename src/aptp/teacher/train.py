"""Training the world teacher from scratch: first the VAE, then the UNet on its latents.

Both loops draw sample ``step * batch + i`` of the world's train split and seed all noise from
``(seed, step)``, so a run resumed from its last checkpoint continues exactly as if never stopped.
Checkpoints are atomic (safetensors + JSON); Ctrl-C writes one before exiting.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel

from .. import world
from ..data import WorldImages
from ..families import family_of_base
from ..training.cache import EMPTY_PROMPT_INDEX, conditioning_of, encode_dataset
from ..training.checkpoint import (
    check_same_settings,
    refuse_other_settings,
    remove_outputs,
    resume_checkpoint,
    save_checkpoint,
)
from ..training.common import batch_index, run_loop, warmup_cosine_lr
from ..utils import APTPError, atomic_folder, folder_identity
from .components import (
    TEACHER_DIR,
    UNET_CONFIG,
    assemble_pipeline,
    build_scheduler,
    build_unet,
    build_vae,
    load_text_encoder,
    save_teacher,
    training_scheduler,
)


@dataclass
class VAETrainConfig:
    steps: int = 1200
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 50
    l1_weight: float = 0.5
    kl_weight: float = 1e-6
    grad_clip: float = 1.0
    checkpoint_every: int = 100
    seed: int = 0


@dataclass
class UNetTrainConfig:
    steps: int = 2000
    batch_size: int = 64
    lr: float = 8e-4
    warmup: int = 100
    caption_dropout: float = 0.1  # empty captions teach the unconditional model for guidance
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    checkpoint_every: int = 100
    seed: int = 0
    dataset_size: int = 20000  # world train samples, encoded once (latents + text states) and cached
    block_out_channels: tuple[int, ...] | None = None  # None: the tiny preset's widths
    # Relative sampling weight of each world category (unnamed ones weigh 1): text rendering needs more
    # steps than the other categories to become legible.
    category_weights: dict[str, float] | None = None
    init: str | None = None  # continue from this teacher folder's UNet ("shipped": the packaged teacher)

    def __post_init__(self):
        unknown = sorted(set(self.category_weights or {}) - set(world.CATEGORIES))
        if unknown:
            raise APTPError(f"category_weights names unknown categories {unknown}; "
                            f"choose from {', '.join(world.CATEGORIES)}")
        if any(not float(w) >= 0 for w in (self.category_weights or {}).values()):
            raise APTPError("category_weights must be >= 0")


def world_batch(step: int, batch_size: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """Images in [-1, 1] (B, 3, 64, 64) and prompts of batch ``step`` of the train split."""
    samples = [world.generator.sample(step * batch_size + i, "train", seed) for i in range(batch_size)]
    return images_to_tensor(s.image for s in samples), [s.prompt for s in samples]


def images_to_tensor(images) -> torch.Tensor:
    """PIL images -> float tensor (B, 3, H, W) in [-1, 1], the VAE's input range."""
    pixels = np.stack([np.asarray(image.convert("RGB")) for image in images])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def train_vae(out: str | Path, config: VAETrainConfig | None = None, overwrite: bool = False) -> AutoencoderKL:
    """Train the teacher's VAE into ``out/vae`` (checkpoints in ``out/vae-checkpoint``). A run with other
    settings in the way is refused unless ``overwrite``."""
    config = config or VAETrainConfig()
    out = Path(out)
    checkpoint = out / "vae-checkpoint"
    if overwrite:
        remove_outputs(checkpoint, out / "vae")
    refuse_other_settings(checkpoint, asdict(config))
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    vae = build_vae().train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.lr, weight_decay=0.0)
    start = 0
    if resumed := resume_checkpoint(checkpoint, {"vae": vae}, optimizer):
        check_same_settings(*resumed, asdict(config))
        start = resumed[1]["step"]

    def step_fn(step: int) -> float:
        images, _ = world_batch(step, config.batch_size, config.seed)
        generator = _step_generator(config.seed, step)
        posterior = vae.encode(images).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = vae.decode(latents).sample
        loss = (F.mse_loss(reconstruction, images) + config.l1_weight * F.l1_loss(reconstruction, images)
                + config.kl_weight * posterior.kl().mean())
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine_lr(config.lr, step, config.warmup, config.steps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), config.grad_clip)
        optimizer.step()
        return {"loss": loss.item()}

    def save_fn(step: int) -> None:
        save_checkpoint(checkpoint, {"vae": vae}, {"step": step, "config": asdict(config)}, optimizer)

    run_loop(config.steps, start, step_fn, save_fn, config.checkpoint_every, checkpoint, "vae")
    vae.eval()
    vae.register_to_config(scaling_factor=latent_scaling_factor(vae, config.seed))
    with atomic_folder(out / "vae") as folder:
        vae.save_pretrained(folder)
    return vae


@torch.no_grad()
def latent_scaling_factor(vae: AutoencoderKL, seed: int, samples: int = 512) -> float:
    """1 / std of the latents over world images, so scaled latents have unit variance (as in SD)."""
    images, _ = world_batch(10_000_000, samples, seed + 1)
    latents = vae.encode(images).latent_dist.sample(_step_generator(seed, -1))
    return float(1.0 / latents.std())


def _initial_unet(config: UNetTrainConfig):
    if config.init is None:
        unet_config = dict(UNET_CONFIG)
        if config.block_out_channels:
            unet_config["block_out_channels"] = list(config.block_out_channels)
        return build_unet(unet_config)
    folder = TEACHER_DIR if config.init == "shipped" else Path(config.init)
    if not (folder / "unet" / "config.json").is_file():
        raise APTPError(f"init: no teacher UNet at {folder / 'unet'}")
    return UNet2DConditionModel.from_pretrained(folder / "unet", dtype=torch.float32)


def _row_weights(categories: list[str], weights: dict[str, float] | None) -> torch.Tensor | None:
    """Sampling weight of every cached row so each category gets its weight's share of a batch."""
    if not weights:
        return None
    counts = {c: categories.count(c) for c in set(categories)}
    row = torch.tensor([float(weights.get(c, 1.0)) / counts[c] for c in categories], dtype=torch.float64)
    if not row.sum() > 0:
        raise APTPError("category_weights leave no category to train on")
    return row


def train_unet(out: str | Path, vae_path: str | Path, config: UNetTrainConfig | None = None,
               overwrite: bool = False):
    """Train the teacher UNet on the frozen VAE's latents; the EMA weights become ``out/teacher``. A run with
    other settings, VAE or initial UNet in the way is refused unless ``overwrite``."""
    config = config or UNetTrainConfig()
    out = Path(out)
    checkpoint = out / "unet-checkpoint"
    init = None if config.init is None else TEACHER_DIR if config.init == "shipped" else Path(config.init)
    identity = {"vae": folder_identity(vae_path),
                "init": folder_identity(init / "unet") if init is not None else None}
    if overwrite:
        remove_outputs(checkpoint, out / "teacher", out / "world-cache", out / "world-cache.safetensors",
                       out / "world-cache.json")
    refuse_other_settings(checkpoint, asdict(config), identity=identity)
    out.mkdir(parents=True, exist_ok=True)
    vae = AutoencoderKL.from_pretrained(vae_path).eval().requires_grad_(False)
    text_encoder, tokenizer = load_text_encoder()
    torch.manual_seed(config.seed)
    unet = _initial_unet(config).train()
    ema = copy.deepcopy(unet).requires_grad_(False).eval()
    pipeline = assemble_pipeline(vae, ema, build_scheduler(), text_encoder, tokenizer)
    family = family_of_base(pipeline)
    noise_scheduler = training_scheduler(pipeline.scheduler)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=1e-2)
    modules = {"unet": unet, "ema": ema}
    start = 0
    if resumed := resume_checkpoint(checkpoint, modules, optimizer):
        check_same_settings(*resumed, asdict(config), identity=identity)
        start = resumed[1]["step"]
    scaling = vae.config.scaling_factor
    cache = encode_dataset(WorldImages(config.dataset_size, "train", config.seed), vae,
                           lambda prompts: family.encode_prompts(pipeline, prompts, "cpu"),
                           out / "world-cache", command="aptp teacher train",
                           source={"data": "world", "split": "train", "size": config.dataset_size, "seed": config.seed,
                                   "vae": identity["vae"]})
    size = len(cache)
    row_weights = _row_weights(cache.categories, config.category_weights)

    def step_fn(step: int) -> float:
        generator = _step_generator(config.seed, step)
        if row_weights is None:
            index = batch_index(step, config.batch_size, size, config.seed, 0, 1)
        else:
            index = torch.multinomial(row_weights, config.batch_size, replacement=True, generator=generator)
        mean, std = cache.rows("latent_mean", index), cache.rows("latent_std", index)
        latents = (mean + std * torch.randn(mean.shape, generator=generator)) * scaling
        dropped = torch.rand(len(index), generator=generator) < config.caption_dropout
        prompt_index = torch.where(dropped, EMPTY_PROMPT_INDEX, cache.prompt_index[index])
        conditioning = conditioning_of(cache, prompt_index, "cpu")
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(index),), generator=generator)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        target = noise if noise_scheduler.config.prediction_type == "epsilon" else \
            noise_scheduler.get_velocity(latents, noise, timesteps)
        loss = F.mse_loss(family.denoise(unet, noisy, timesteps, conditioning), target)
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine_lr(config.lr, step, config.warmup, config.steps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), config.grad_clip)
        optimizer.step()
        decay = min(config.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(unet.parameters()), 1.0 - decay)
        return {"loss": loss.item()}

    def save_fn(step: int) -> None:
        save_checkpoint(checkpoint, modules, {"step": step, "config": asdict(config), "identity": identity}, optimizer)

    run_loop(config.steps, start, step_fn, save_fn, config.checkpoint_every, checkpoint, "unet")
    save_teacher(pipeline, out / "teacher")
    return pipeline
