"""Built-in UNet configs (random weights) for inspection, benchmarks and tests.

The Stable Diffusion configs are those of the published UNets; ``tiny`` is the UNet of the embedded
world teacher (64 px images, 16x16x4 latents, MiniLM text states of width 384).
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
