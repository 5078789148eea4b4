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
                "evaluation.per_category=2", "evaluation.steps=2", "baselines=[static,magnitude,random]",
                "evaluation.latency_repeats=1"]
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
    assert {c["claim"] for c in metrics["claims"]} >= {"world accuracy >= static + 0.02", "FID <= magnitude",
                                                       "text prompts get >= mean MACs + 0.03"}
    assert "Claims" in (out / "report" / "report.html").read_text()
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
    # Other fine-tuning settings redo the fine-tuning and everything after it, but not the pruning.
    settings = [s.replace("finetune.steps=2", "finetune.steps=3") for s in settings]
    assert main(["demo", "--output-dir", str(out), "--set", *settings]) == 0
    printed = capsys.readouterr().out
    assert printed.count("done earlier, skipped") == 2 and printed.count("settings changed, redoing it") == 6
    assert json.loads((out / "experts" / "expert-0" / "aptp_expert.json").read_text())["config"]["steps"] == 3
    # A half-width magnitude baseline beside the same mixture: its stage is redone, the others are kept.
    magnitude = out / "baselines" / "magnitude" / "model" / "aptp_expert.json"
    matched = json.loads(magnitude.read_text())["macs_fraction"]
    assert main(["baselines", "--output-dir", str(out), "--set", *settings, "baselines=[magnitude]",
                 "baseline_width=0.5"]) == 0
    assert "baseline magnitude: settings changed, redoing it" in capsys.readouterr().out
    half = json.loads(magnitude.read_text())["macs_fraction"]
    assert half < matched and set(json.loads((out / "report" / "metrics.json").read_text())["models"]) == {
        "dense", "APTP", "magnitude"}

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


def _fake_metrics(aptp, static, text_macs):
    def model(accuracy, fid, macs):
        return {"world_accuracy": {"overall": accuracy}, "fid": fid, "macs_fraction": macs}

    models = {"dense": model(0.8, 100.0, 1.0), "APTP": model(aptp, 150.0, 0.6), "static": model(static, 160.0, 0.6),
              "magnitude": model(0.6, 155.0, 0.59)}
    models["APTP"]["macs_fraction_by_category"] = {"text": text_macs, "overall": 0.6}
    from aptp.evaluation.compare import claims

    return {"models": models, "claims": claims(models)}


def test_ablation_summary_gives_mean_and_spread_over_seeds(tmp_path, capsys):
    from aptp.evaluation.ablation import format_table, summarize

    summary = summarize([_fake_metrics(0.70, 0.60, 0.65), _fake_metrics(0.74, 0.62, 0.61)])
    assert summary["APTP"]["accuracy"]["mean"] == pytest.approx(0.72)
    assert summary["APTP"]["accuracy"]["std"] == pytest.approx(0.0282843, rel=1e-4)
    assert summary["text_extra_macs"]["values"] == pytest.approx([0.05, 0.01])
    claims_of_first = {c["claim"]: c["holds"] for c in _fake_metrics(0.70, 0.60, 0.65)["claims"]}
    assert claims_of_first["world accuracy >= static + 0.02"] and claims_of_first["FID <= static"]
    assert not claims_of_first["world accuracy >= 0.9 x dense"]  # 0.70 < 0.72
    assert claims_of_first["text prompts get >= mean MACs + 0.03"]
    # The second run loses the text claim (+0.01) but reaches 0.9 x dense (0.74 >= 0.72).
    assert summary["claims_held"] == [7, 7]
    table = format_table({"aptp": summary})
    assert "0.720 ± 0.028" in table and "7/8 7/8" in table
    from aptp.evaluation.ablation import run_ablation
    from aptp.utils import APTPError

    with pytest.raises(APTPError, match="unknown ablation variant"):
        run_ablation(tmp_path, ["aptp", "bogus"], [0])
    with pytest.raises(APTPError, match="at least one seed"):
        run_ablation(tmp_path, ["aptp"], [])
    assert main(["ablation", "--output-dir", str(tmp_path), "--set", "prune.bogus=1"]) == 2
    assert "unknown PruneConfig option" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
