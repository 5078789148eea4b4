"""Test setup: offline, one torch thread, tiny models built in code; slow tests need --run-slow."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


# Tiny UNet configs covering the variants the family must handle.
TINY_UNETS = {
    # SD 1.x style: conv projections, default time embedding norm.
    "sd1": dict(
        block_out_channels=(16, 32), layers_per_block=2, norm_num_groups=8, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24, sample_size=8,
    ),
    # SD 2.x style: linear projections, per-stage heads, upcast attention, two transformer layers, scale-shift norm.
    "sd2": dict(
        block_out_channels=(16, 32, 32), layers_per_block=2, norm_num_groups=8, attention_head_dim=(2, 4, 4),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=20, sample_size=8, use_linear_projection=True, upcast_attention=True,
        transformer_layers_per_block=2, resnet_time_scale_shift="scale_shift",
    ),
    # Cross-attention in attn1 as well (only_cross_attention).
    "cross_only": dict(
        block_out_channels=(16, 16), layers_per_block=1, norm_num_groups=4, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12, sample_size=8, only_cross_attention=True,
    ),
}
TEXT_LENGTH = 5


def make_unet(name: str, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNETS[name]).eval()
    # Random init leaves conv_out / proj_out near zero in places; perturb every weight so each unit matters.
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return unet


@pytest.fixture(params=sorted(TINY_UNETS))
def tiny_unet(request):
    return make_unet(request.param)


def unet_inputs(unet, batch: int = 2, seed: int = 1):
    from aptp.families import unet2d_condition

    generator = torch.Generator().manual_seed(seed)
    inputs = unet2d_condition.example_inputs(unet, unet2d_condition.default_sample_size(unet), TEXT_LENGTH, batch)
    inputs["sample"] = torch.randn(inputs["sample"].shape, generator=generator)
    inputs["encoder_hidden_states"] = torch.randn(inputs["encoder_hidden_states"].shape, generator=generator)
    inputs["timestep"] = torch.tensor([10, 700][:batch] + [400] * max(0, batch - 2))
    return inputs


def tiny_clip_tokenizer(folder, max_length: int = 16):
    """The character-level CLIP tokenizer, its vocabulary also written to ``folder``."""
    from aptp.families.presets import character_clip_tokenizer

    tokenizer = character_clip_tokenizer(max_length)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    return tokenizer


def tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=[8, 8, 8, 8], down_block_types=["DownEncoderBlock2D"] * 4,
                         up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=4, latent_channels=4,
                         sample_size=64)


def make_sd2_pipeline(folder, seed: int = 0):
    """A tiny random Stable Diffusion 2-style pipeline (CLIP text encoder and tokenizer, linear
    projections, v-prediction) saved to ``folder``; nothing is downloaded."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer(folder)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37,
                                                num_hidden_layers=2, num_attention_heads=4,
                                                max_position_embeddings=16, projection_dim=32))
    unet = UNet2DConditionModel(**TINY_UNETS["sd2"] | {"cross_attention_dim": 32, "sample_size": 8})
    scheduler = DDIMScheduler(prediction_type="v_prediction", beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipeline = StableDiffusionPipeline(vae=tiny_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.save_pretrained(folder / "pipeline")
    return folder / "pipeline"


# A tiny SDXL-style UNet: two text encoders' states (32 + 32 wide), pooled embedding and time ids.
TINY_SDXL_UNET = dict(
    block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, attention_head_dim=(2, 4),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=64, sample_size=8, use_linear_projection=True, transformer_layers_per_block=(1, 2),
    addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
)


def make_sdxl_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_SDXL_UNET).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return unet


def make_sdxl_pipeline(folder, seed: int = 0):
    """A tiny random Stable Diffusion XL pipeline (two CLIP text encoders, the second with a projection)
    saved to ``folder``; nothing is downloaded."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer(folder)
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=16, projection_dim=32)
    pipeline = StableDiffusionXLPipeline(
        vae=tiny_vae(), text_encoder=CLIPTextModel(config), text_encoder_2=CLIPTextModelWithProjection(config),
        tokenizer=tokenizer, tokenizer_2=tokenizer, unet=make_sdxl_unet(seed),
        scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                         steps_offset=1), add_watermarker=False)
    pipeline.save_pretrained(folder / "pipeline")
    return folder / "pipeline"


# A tiny PixArt-Σ-style diffusion transformer: 3 blocks of 2 heads (16 wide), learned variance (8 output
# channels), captions from a 16-wide T5.
TINY_PIXART = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=3,
                   cross_attention_dim=16, caption_channels=16, sample_size=8, patch_size=2)


def make_pixart_transformer(seed: int = 0):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(**TINY_PIXART).eval()
    with torch.no_grad():  # no zero-initialised layer: every weight matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def make_pixart_pipeline(folder, seed: int = 0):
    """A tiny random PixArt-Σ pipeline (T5 text encoder and tokenizer) saved to ``folder``; nothing is
    downloaded."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline
    from transformers import T5Config, T5EncoderModel

    from aptp.families.presets import character_t5_tokenizer

    torch.manual_seed(seed)
    tokenizer = character_t5_tokenizer(16)
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                           num_heads=2, relative_attention_num_buckets=8, pad_token_id=0,
                                           eos_token_id=1, decoder_start_token_id=0))
    pipeline = PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=tiny_vae(),
                                   transformer=make_pixart_transformer(seed),
                                   scheduler=DPMSolverMultistepScheduler())
    pipeline.save_pretrained(folder / "pipeline")
    return folder / "pipeline"


def make_tiny_clip(tmp_path):
    """A tiny random ``CLIPModel`` folder (model, tokenizer, image processor) at ``tmp_path / 'clip'``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from aptp.families.presets import character_clip_tokenizer

    sd2 = tmp_path / "sd2"
    if not (sd2 / "pipeline").is_dir():
        make_sd2_pipeline(sd2)
    tokenizer = character_clip_tokenizer(16)
    torch.manual_seed(0)
    config = CLIPConfig(text_config={"vocab_size": len(tokenizer), "hidden_size": 16, "intermediate_size": 32,
                                     "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 16},
                        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
                        projection_dim=8)
    folder = tmp_path / "clip"
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder
