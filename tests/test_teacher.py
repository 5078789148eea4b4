"""The world teacher stack: build, save as fp16, load offline as a StableDiffusionPipeline, sample."""

import json

import pytest
import torch

from aptp.teacher import components
from aptp.utils import APTPError

TINY_VAE = dict(components.VAE_CONFIG, block_out_channels=[8, 8, 8], norm_num_groups=4)
TINY_UNET = dict(components.UNET_CONFIG, block_out_channels=[32, 32, 32])


@pytest.fixture(scope="module")
def text_encoder():
    return components.load_text_encoder()


def test_text_encoder_is_minilm_with_32_tokens(text_encoder):
    encoder, tokenizer = text_encoder
    assert encoder.config.hidden_size == components.UNET_CONFIG["cross_attention_dim"] == 384
    ids = tokenizer(["a red circle on a white background"], padding="max_length", truncation=True,
                    max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    assert ids.shape == (1, components.TEXT_MAX_LENGTH)


def test_saved_text_encoder_reloads_without_a_load_report(tmp_path, text_encoder, capfd, caplog):
    from transformers import BertModel

    text_encoder[0].save_pretrained(tmp_path / "text_encoder")
    capfd.readouterr()
    BertModel.from_pretrained(tmp_path / "text_encoder")
    captured = capfd.readouterr()
    reported = captured.out + captured.err + caplog.text
    assert "MISSING" not in reported and "UNEXPECTED" not in reported, reported


def test_teacher_round_trip_and_two_step_sample(tmp_path, text_encoder):
    torch.manual_seed(0)
    pipeline = components.assemble_pipeline(components.build_vae(TINY_VAE), components.build_unet(TINY_UNET),
                                            text_encoder=text_encoder[0], tokenizer=text_encoder[1])
    components.save_teacher(pipeline, tmp_path / "teacher")
    index = json.loads((tmp_path / "teacher" / "model_index.json").read_text())
    assert index["text_encoder"] == ["transformers", "BertModel"]
    saved = [p for p in (tmp_path / "teacher").rglob("*") if p.is_file()]
    assert not any(p.suffix in (".bin", ".pt", ".pkl", ".ckpt") for p in saved)

    loaded = components.load_teacher(tmp_path / "teacher")
    assert loaded.unet.dtype == torch.float32
    generator = torch.Generator().manual_seed(0)
    image = loaded("a red circle on a white background", num_inference_steps=2, guidance_scale=4.0,
                   generator=generator, output_type="pt").images
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()
    again = loaded("a red circle on a white background", num_inference_steps=2, guidance_scale=4.0,
                   generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert torch.equal(image, again)


def test_missing_teacher_folder_is_a_clear_error(tmp_path):
    with pytest.raises(APTPError, match="no teacher"):
        components.load_teacher(tmp_path)


def test_shipped_teacher_is_small_fp16_and_samples_offline():
    from safetensors import safe_open

    files = [p for p in components.TEACHER_DIR.rglob("*") if p.is_file()]
    assert (components.TEACHER_DIR / "model_index.json").is_file()
    assert sum(p.stat().st_size for p in files) < 30 * 2**20
    for weights in components.TEACHER_DIR.rglob("*.safetensors"):
        with safe_open(weights, "pt") as handle:
            assert {handle.get_slice(k).get_dtype() for k in handle.keys()} == {"F16"}
    teacher = components.load_teacher()
    image = teacher('the word "SUN" in white on a blue background', num_inference_steps=2,
                    generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()


def test_teacher_training_refuses_a_run_of_other_settings_or_vae(tmp_path):
    from aptp.teacher.train import UNetTrainConfig, VAETrainConfig, train_unet, train_vae
    from aptp.training.checkpoint import OtherRunError

    vae = VAETrainConfig(steps=1, batch_size=2, checkpoint_every=1)
    train_vae(tmp_path / "a", vae)
    with pytest.raises(OtherRunError, match="differs in lr"):
        train_vae(tmp_path / "a", VAETrainConfig(steps=1, batch_size=2, checkpoint_every=1, lr=1e-4))
    train_vae(tmp_path / "b", VAETrainConfig(steps=1, batch_size=2, checkpoint_every=1, seed=1))
    unet = UNetTrainConfig(steps=1, batch_size=2, dataset_size=4, checkpoint_every=1,
                           block_out_channels=(32, 32, 32))
    train_unet(tmp_path / "a", tmp_path / "a" / "vae", unet)
    # The same settings on another VAE would mix two runs.
    with pytest.raises(OtherRunError, match="vae.weights"):
        train_unet(tmp_path / "a", tmp_path / "b" / "vae", unet)
    train_unet(tmp_path / "a", tmp_path / "b" / "vae", unet, overwrite=True)
    assert (tmp_path / "a" / "teacher" / "unet" / "config.json").is_file()
