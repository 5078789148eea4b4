"""Built-in denoiser configs (random weights) for inspection, benchmarks and tests.

The Stable Diffusion and PixArt-Σ configs are those of the published models; ``tiny`` is the UNet of the
embedded world teacher (64 px images, 16x16x4 latents, MiniLM text states of width 384).
"""

from __future__ import annotations

from dataclasses import dataclass, field

_SD_COMMON = {
    "act_fn": "silu",
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-5,
    "norm_num_groups": 32,
    "out_channels": 4,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}


@dataclass(frozen=True)
class Preset:
    config: dict
    vae_scale_factor: int
    text_length: int
    resolution: int
    description: str
    family: str = "unet2d_condition"
    extra: dict = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    "sd15": Preset(
        config={**_SD_COMMON, "attention_head_dim": 8, "cross_attention_dim": 768, "sample_size": 64},
        vae_scale_factor=8, text_length=77, resolution=512, description="Stable Diffusion 1.5 UNet",
    ),
    "sd21": Preset(
        config={**_SD_COMMON, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
                "sample_size": 96, "use_linear_projection": True, "upcast_attention": True},
        vae_scale_factor=8, text_length=77, resolution=768, description="Stable Diffusion 2.1 (768-v) UNet",
    ),
    "sdxl": Preset(
        config={**_SD_COMMON, "block_out_channels": [320, 640, 1280], "attention_head_dim": [5, 10, 20],
                "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                "transformer_layers_per_block": [1, 2, 10], "cross_attention_dim": 2048, "sample_size": 128,
                "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
                "addition_embed_type_num_heads": 64, "projection_class_embeddings_input_dim": 2816},
        vae_scale_factor=8, text_length=77, resolution=1024, description="Stable Diffusion XL 1.0 base UNet",
        family="sdxl",
    ),
    "pixart-sigma": Preset(
        config={"_class_name": "PixArtTransformer2DModel", "num_attention_heads": 16, "attention_head_dim": 72,
                "in_channels": 4, "out_channels": 8, "num_layers": 28, "cross_attention_dim": 1152,
                "caption_channels": 4096, "sample_size": 128, "patch_size": 2, "activation_fn": "gelu-approximate",
                "attention_bias": True, "norm_type": "ada_norm_single", "norm_elementwise_affine": False,
                "norm_eps": 1e-6, "num_embeds_ada_norm": 1000, "interpolation_scale": 2,
                "use_additional_conditions": False},
        vae_scale_factor=8, text_length=300, resolution=1024, description="PixArt-Σ XL-2 1024 transformer",
        family="pixart",
    ),
    "tiny": Preset(
        config={
            "block_out_channels": [64, 128, 128],
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "layers_per_block": 1,
            "attention_head_dim": 4,
            "cross_attention_dim": 384,
            "norm_num_groups": 32,
            "sample_size": 16,
            "in_channels": 4,
            "out_channels": 4,
        },
        vae_scale_factor=4, text_length=32, resolution=64, description="tiny world-sized UNet",
    ),
}


# ---------------------------------------------------------------------------------------------
# Whole pipelines with random weights around a built-in denoiser config, to run the full-size path
# (prune -> finetune -> export -> generate) before any real weights are at hand.

_SD_VAE = dict(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
               up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, latent_channels=4, norm_num_groups=32)
_CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
               max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
_OPEN_CLIP_H = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                    num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=512)
_OPEN_CLIP_BIG_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                        num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
# T5 v1.1 XXL's width with 2 of its 24 layers: the text encoder is not pruned, and the whole one (4.8 B
# parameters) does not fit beside the rest in a small machine's memory.
_T5_XXL_2_LAYERS = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=2, num_heads=64,
                        feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
_SCALED_LINEAR = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
#: What each preset's random pipeline reduces, for reports.
RANDOM_PIPELINE_NOTES = {"pixart-sigma": "T5-XXL text encoder with 2 of its 24 layers"}


def character_clip_tokenizer(max_length: int = 77):
    """A real CLIP tokenizer over a byte-level alphabet without merges (character by character): a
    tokenizer that needs no downloaded vocabulary."""
    from transformers import CLIPTokenizer

    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    codes, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            codes.append(256 + extra)
            extra += 1
    chars = [chr(c) for c in codes]
    vocab = {token: i for i, token in enumerate(chars + [c + "</w>" for c in chars])}
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def character_t5_tokenizer(max_length: int = 300):
    """A real T5 (unigram) tokenizer over single printable characters: one that needs no download."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(chr(c), -2.0) for c in range(33, 127)]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def random_pipeline(name: str, seed: int = 0):
    """The built-in config ``name`` inside its family's text-to-image pipeline, every weight random: the
    published denoiser, VAE and text encoders (reduced as :data:`RANDOM_PIPELINE_NOTES` says), character-level
    tokenizers and the published scheduler settings."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        PixArtSigmaPipeline,
        PixArtTransformer2DModel,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    if name not in ("sd15", "sd21", "sdxl", "pixart-sigma"):
        raise ValueError(f"no random pipeline for {name!r}")
    torch.manual_seed(seed)
    config = {k: v for k, v in PRESETS[name].config.items() if not k.startswith("_")}
    if name in ("sd15", "sd21"):
        sd21 = name == "sd21"
        scheduler = DDIMScheduler(**_SCALED_LINEAR, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                  prediction_type="v_prediction" if sd21 else "epsilon")
        return StableDiffusionPipeline(
            vae=AutoencoderKL(**_SD_VAE, scaling_factor=0.18215), tokenizer=character_clip_tokenizer(),
            text_encoder=CLIPTextModel(CLIPTextConfig(**(_OPEN_CLIP_H if sd21 else _CLIP_L))),
            unet=UNet2DConditionModel(**config), scheduler=scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
    if name == "sdxl":
        tokenizer = character_clip_tokenizer()
        return StableDiffusionXLPipeline(
            vae=AutoencoderKL(**_SD_VAE, scaling_factor=0.13025), tokenizer=tokenizer, tokenizer_2=tokenizer,
            text_encoder=CLIPTextModel(CLIPTextConfig(**_CLIP_L)),
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**_OPEN_CLIP_BIG_G)),
            unet=UNet2DConditionModel(**config), add_watermarker=False,
            scheduler=EulerDiscreteScheduler(**_SCALED_LINEAR, steps_offset=1))
    return PixArtSigmaPipeline(
        vae=AutoencoderKL(**_SD_VAE, scaling_factor=0.13025), tokenizer=character_t5_tokenizer(),
        text_encoder=T5EncoderModel(T5Config(**_T5_XXL_2_LAYERS)), transformer=PixArtTransformer2DModel(**config),
        scheduler=DPMSolverMultistepScheduler())
