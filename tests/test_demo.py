"""The demo pipeline end to end on a tiny SD-2-style model (slow: five models are evaluated with FID)."""

import json

import pytest
from conftest import make_sd2_pipeline

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
        assert {"fid", "world_accuracy", "macs_fraction", "images_per_s", "unet_latency_ms"} <= set(model)
    assert metrics["evaluation"]["n_images"] == 8
    for png in ("quality_vs_macs.png", "samples.png", "routing.png"):
        assert (out / "report" / png).is_file()
    # Run again: every finished stage is skipped.
    assert main(["demo", "--output-dir", str(out), "--set", *settings]) == 0
    assert capsys.readouterr().out.count("done earlier, skipped") == 7
