"""The demo pipeline end to end on a tiny SD-2-style model (slow: five models are evaluated with FID)."""

import json

import pytest
from conftest import TINY_UNETS, make_sd2_pipeline, make_tiny_clip

from aptp.cli import main


@pytest.mark.slow
def test_demo_runs_resumes_and_writes_a_report(tmp_path, capsys):
    pipeline = make_sd2_pipeline(tmp_path / "sd2")
    settings = [f"model={pipeline}", "prune.steps=3", "prune.warmup_steps=1", "prune.train_size=16",
                "prune.val_size=8", "prune.batch_size=4", "prune.num_codes=2", "prune.arch_dim=8",
                "prune.hidden_dim=16", "prune.hyper_hidden_dim=16", "finetune.steps=2", "finetune.batch_size=4",
                "evaluation.per_category=2", "evaluation.steps=2", "evaluation.latency_repeats=1"]
    out = tmp_path / "demo"
    assert main(["demo", "--output-dir", str(out), "--set", *settings]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "Loading" not in captured.err  # one progress display: no per-file loading bars
    assert "demo finished in" in printed
    assert f"report: {out / 'report' / 'report.html'}" in printed
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert set(metrics["models"]) == {"dense", "APTP", "static", "magnitude", "random"}
    for name, model in metrics["models"].items():
        assert {"fid", "world_accuracy", "macs_fraction", "images_per_s", "unet_latency_ms", "teacher_mse"} <= set(model)
        assert set(model["teacher_mse"]) == {"single", "two", "count", "text", "overall"}
        assert (model["teacher_mse"]["overall"] == 0) == (name == "dense")  # the teacher is its own reference
    assert metrics["evaluation"]["n_images"] == 8
    for png in ("quality_vs_macs.png", "samples.png", "routing.png"):
        assert (out / "report" / png).is_file()
    # Run again: every finished stage is skipped, the evaluation too (its settings are unchanged)...
    assert main(["demo", "--output-dir", str(out), "--set", *settings]) == 0
    printed = capsys.readouterr().out
    assert printed.count("done earlier, skipped") == 8 and f"report: {out / 'report' / 'report.html'}" in printed
    # ...but other evaluation settings evaluate again.
    assert main(["demo", "--output-dir", str(out), "--set", *settings[:-1], "evaluation.latency_repeats=2"]) == 0
    assert capsys.readouterr().out.count("done earlier, skipped") == 7
    assert json.loads((out / "report" / "metrics.json").read_text())["evaluation"]["latency_repeats"] == 2

    # The same models through `aptp evaluate`, with CLIP score and CMMD from a tiny local CLIP.
    clip = make_tiny_clip(tmp_path)
    evaluation = ["per_category=2", "steps=2", "latency_repeats=1"]
    report = tmp_path / "evaluate"
    assert main(["evaluate", "--pipeline", str(out / "pipeline"), "--unet",
                 f"static={out / 'baselines' / 'static' / 'model'}", "--clip", str(clip), "--out", str(report),
                 "--set", *evaluation]) == 0
    metrics = json.loads((report / "metrics.json").read_text())
    assert set(metrics["models"]) == {"dense", "APTP", "static"}
    static = json.loads((out / "baselines" / "static" / "model" / "aptp_expert.json").read_text())
    assert metrics["models"]["static"]["macs_fraction"] == pytest.approx(static["macs_fraction"], rel=1e-6)
    for model in metrics["models"].values():
        assert model["cmmd"] >= 0 and -100 <= model["clip_score"] <= 100
    page = (report / "report.html").read_text()
    assert "CLIP score" in page and "Routing by category" in page
    assert metrics["verdict"].startswith("At ")
    # A UNet of another base model is refused before anything is sampled.
    from diffusers import UNet2DConditionModel

    UNet2DConditionModel(**TINY_UNETS["sd1"]).save_pretrained(tmp_path / "other")
    capsys.readouterr()
    assert main(["evaluate", "--pipeline", str(out / "pipeline"), "--unet", f"other={tmp_path / 'other'}",
                 "--out", str(tmp_path / "refused")]) == 2
    assert "not carved from this base model" in capsys.readouterr().err


def test_evaluate_rejects_bad_input(tmp_path, capsys):
    assert main(["evaluate", "--pipeline", str(tmp_path / "missing"), "--out", str(tmp_path / "r")]) == 2
    assert "not an APTPPipeline folder" in capsys.readouterr().err
    assert main(["evaluate", "--pipeline", str(tmp_path), "--unet", "static"]) == 2
    assert "NAME=FOLDER" in capsys.readouterr().err
    assert main(["evaluate", "--pipeline", str(tmp_path), "--set", "per_categroy=3"]) == 2
    assert "unknown EvalConfig option" in capsys.readouterr().err
    assert main(["evaluate", "--pipeline", str(tmp_path), "--set", "steps=0"]) == 2
    assert "steps must be >= 1" in capsys.readouterr().err
    assert main(["demo", "--output-dir", str(tmp_path / "d"), "--set", "evaluation.bogus=1"]) == 2
    assert "unknown EvalConfig option" in capsys.readouterr().err
    assert main(["demo", "--output-dir", str(tmp_path / "d"), "--set", "baselines=[static,l2]"]) == 2
    assert "unknown baseline" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()  # rejected before any stage ran
