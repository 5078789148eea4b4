"""Stable Diffusion XL: the same ``UNet2DConditionModel`` surgery as SD 1/2, conditioned as SDXL conditions it
(two text encoders' states, the pooled text embedding and the size/crop time ids through ``added_cond_kwargs``)."""

from __future__ import annotations

from typing import Mapping

import torch
from diffusers import StableDiffusionXLPipeline
from torch import nn

from .unet2d_condition import UNet2DConditionFamily, is_text_time


class StableDiffusionXLFamily(UNet2DConditionFamily):
    """An SDXL UNet (``addition_embed_type="text_time"``) in a ``StableDiffusionXLPipeline``."""

    name = "sdxl"
    pipeline_class = StableDiffusionXLPipeline
    description = "Stable Diffusion XL"
    load_options = {"add_watermarker": False}

    def owns(self, model: nn.Module) -> bool:
        return isinstance(model, self.denoiser_class) and is_text_time(model)

    def pipeline_around(self, components, denoiser: nn.Module):
        pipeline = StableDiffusionXLPipeline(
            vae=components.vae, text_encoder=components.text_encoder, text_encoder_2=components.text_encoder_2,
            tokenizer=components.tokenizer, tokenizer_2=components.tokenizer_2, unet=denoiser,
            scheduler=type(components.scheduler).from_config(components.scheduler.config), add_watermarker=False)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def encode_prompts(self, pipeline, prompts: list[str], device, resolution: int | None = None
                       ) -> dict[str, torch.Tensor]:
        states, _, pooled, _ = pipeline.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                                      do_classifier_free_guidance=False)
        size = resolution or pipeline.default_sample_size * pipeline.vae_scale_factor
        # The time ids SDXL's pipeline gives an uncropped square image of this size.
        projection = pipeline.text_encoder_2.config.projection_dim
        time_ids = pipeline._get_add_time_ids((size, size), (0, 0), (size, size), states.dtype, projection)
        return {"encoder_hidden_states": states, "text_embeds": pooled,
                "time_ids": time_ids.to(device).repeat(len(prompts), 1)}

    def denoise(self, model: nn.Module, sample: torch.Tensor, timesteps: torch.Tensor,
                conditioning: Mapping[str, torch.Tensor]) -> torch.Tensor:
        added = {"text_embeds": conditioning["text_embeds"], "time_ids": conditioning["time_ids"]}
        return model(sample, timesteps, conditioning["encoder_hidden_states"], added_cond_kwargs=added).sample
