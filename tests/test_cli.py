"""The command line: inspect output, one-line errors, and the expert folder round trip."""

import json

import pytest
from conftest import make_unet

from aptp.cli import main
from aptp.families import unet2d_condition as fam


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_builtin_prints_units_params_and_macs(capsys):
    code, out, err = run(capsys, "inspect", "tiny")
    assert code == 0 and not err
    for text in ("parameters", "MACs", "w/o attn matmuls", "groups", "heads", "ff", "transformer", "64 px"):
        assert text in out


def test_inspect_sd21_reference_figures(capsys):
    code, out, _ = run(capsys, "inspect", "sd21", "--resolution", "768", "--json")
    data = json.loads(out)
    assert code == 0
    assert data["parameters"] / 1e6 == pytest.approx(865.9, rel=1e-3)
    assert data["macs"] / 1e9 == pytest.approx(1074.6, rel=1e-3)
    assert data["macs_without_attention_matmuls"] / 1e9 == pytest.approx(760.5, rel=1e-3)
    assert data["latent"] == 96 and data["text_length"] == 77


def test_inspect_local_expert_and_pipeline_folders(tmp_path, capsys):
    unet = make_unet("sd1")
    expert = fam.slice_unet(unet, {"mid_block.resnets.0:groups": [0, 1, 2]})
    expert.save_pretrained(tmp_path / "expert")
    code, out, _ = run(capsys, "inspect", str(tmp_path / "expert"), "--resolution", "64", "--json")
    assert code == 0
    dense_code, dense_out, _ = run(capsys, "inspect", str(tmp_path / "expert"), "--json")
    assert json.loads(out)["macs"] > 0 and dense_code == 0
    # A pipeline folder: the UNet lives in unet/, the VAE config gives the latent scale.
    pipe = tmp_path / "pipe"
    unet.save_config(pipe / "unet")
    (pipe / "vae").mkdir()
    (pipe / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [8, 8, 8]}))
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    code, out, _ = run(capsys, "inspect", str(pipe), "--resolution", "32", "--json")
    assert code == 0 and json.loads(out)["latent"] == 8


@pytest.mark.parametrize("content, message", [
    (None, "no such folder"),
    ("{oops", "not valid JSON"),
    ('{"_class_name": "UNet2DConditionModel", "block_out_channels": "x"}', "cannot build a UNet2DConditionModel"),
    ('{"_class_name": "VQModel"}', "not supported"),
    ("", "not a diffusers model or pipeline folder"),
])
def test_inspect_bad_folders_give_one_line_errors(tmp_path, capsys, content, message):
    folder = tmp_path / "model"
    if content is not None:
        folder.mkdir()
        if content:
            (folder / "config.json").write_text(content)
    code, out, err = run(capsys, "inspect", str(folder))
    assert code == 2 and not out
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_inspect_rejects_resolution_off_the_latent_grid(capsys):
    code, _, err = run(capsys, "inspect", "sd15", "--resolution", "500")
    assert code == 2 and "multiple of the VAE scale factor" in err


@pytest.mark.parametrize("command, keys", [
    (["prune"], ["budget: float = 0.6", "difficulty_weighting: str = plain"]),
    (["finetune"], ["lr: float = 0.0001"]),
    (["demo"], ["prune.budget: float = 0.6", "evaluation.per_category: int = 64", "the demo's own values"]),
    (["evaluate"], ["guidance_scale: float = 4.0"]),
    (["teacher", "train"], ["--set keys of --stage vae", "category_weights"]),
])
def test_help_lists_every_config_key_and_the_output_flag(command, keys, capsys):
    assert main([*command, "--help"]) == 0
    printed = capsys.readouterr().out
    assert "--output-dir" in printed and "--out" in printed
    for key in keys:
        assert key in printed, key
