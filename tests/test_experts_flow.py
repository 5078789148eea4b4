"""prune -> assign -> finetune -> export -> generate through the CLI on a tiny SD-2-style pipeline."""

import json
import shutil

import torch
from conftest import make_sd2_pipeline

from aptp.cli import main
from aptp.pipelines import APTPPipeline
from aptp.world import export_imagefolder


def test_full_flow_from_the_cli(tmp_path, capsys):
    pipeline = make_sd2_pipeline(tmp_path / "sd2")
    export_imagefolder(tmp_path / "data", 24, "train", seed=0)
    prune = ["prune", "--output-dir", str(tmp_path / "prune"), "--config", "world", "--set",
             f"model={pipeline}", f"data={tmp_path / 'data'}", "train_size=16", "val_size=8", "steps=3",
             "warmup_steps=1", "batch_size=4", "num_codes=2", "arch_dim=8", "hidden_dim=16", "hyper_hidden_dim=16",
             "validate_every=0"]
    assert main(prune) == 0
    router = str(tmp_path / "prune" / "router")
    assert main(["assign", "--router", router, "--out", str(tmp_path / "assign")]) == 0
    # Routing the router's own training data reuses the pruning run's encoded cache.
    encoded = sorted((tmp_path / "prune" / "cache" / "train").iterdir())
    assert [p.read_bytes() for p in encoded] == [(tmp_path / "assign" / "cache" / p.name).read_bytes() for p in encoded]
    summary = json.loads((tmp_path / "assign" / "summary.json").read_text())
    assert summary["samples"] == 16 and sum(e["samples"] for e in summary["experts"]) == 16
    assert summary["experts"][0]["categories"]  # world categories come through the imagefolder metadata
    assert main(["finetune", "--router", router, "--assign", str(tmp_path / "assign"), "--out",
                 str(tmp_path / "experts"), "--all", "--set", "steps=2", "batch_size=4", "validation_prompts=1",
                 "validation_steps=2"]) == 0
    finetuned = [k for k in range(2) if (tmp_path / "experts" / f"expert-{k}" / "config.json").is_file()]
    assert finetuned, "at least one expert received prompts and was fine-tuned"
    # A re-run with other settings is refused (one line, nothing changed); --overwrite redoes the expert.
    expert = tmp_path / "experts" / f"expert-{finetuned[0]}"
    before = {p: p.read_bytes() for p in sorted((tmp_path / "experts").rglob("*")) if p.is_file()}
    again = ["finetune", "--router", router, "--assign", str(tmp_path / "assign"), "--out", str(tmp_path / "experts"),
             "--expert", str(finetuned[0]), "--set", "steps=2", "batch_size=4", "lr=1e-3"]
    capsys.readouterr()
    assert main(again) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "differs in lr" in error and "--overwrite" in error
    assert {p: p.read_bytes() for p in sorted((tmp_path / "experts").rglob("*")) if p.is_file()} == before
    assert main(again + ["--overwrite"]) == 0
    assert json.loads((expert / "aptp_expert.json").read_text())["config"]["lr"] == 1e-3
    # A mistyped or empty experts folder is an error, never experts shipped without fine-tuning.
    assert main(["export", "--router", router, "--experts", str(tmp_path / "expertz"), "--out",
                 str(tmp_path / "pipeline")]) == 2
    assert "no experts folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["export", "--router", router, "--experts", str(tmp_path / "empty"), "--out",
                 str(tmp_path / "pipeline")]) == 2
    assert "holds no fine-tuned expert" in capsys.readouterr().err
    assert not (tmp_path / "pipeline").exists()
    # An expert without its fine-tuned folder is refused, unless asked for explicitly.
    shutil.copytree(tmp_path / "experts", tmp_path / "partial")
    shutil.rmtree(tmp_path / "partial" / f"expert-{finetuned[0]}")
    if len(finetuned) == 2:
        assert main(["export", "--router", router, "--experts", str(tmp_path / "partial"), "--out",
                     str(tmp_path / "pipeline")]) == 2
        assert f"expert(s) {finetuned[0]} not fine-tuned" in capsys.readouterr().err
        assert not (tmp_path / "pipeline").exists()
    untrained = [k for k in range(2) if k not in finetuned] + [finetuned[0]]
    assert main(["export", "--router", router, "--experts", str(tmp_path / "partial"), "--out",
                 str(tmp_path / "allowed"), "--allow-untrained-experts"]) in (0, 2)  # 2: none left
    if (tmp_path / "allowed").exists():
        assert APTPPipeline.from_pretrained(tmp_path / "allowed").experts.untrained() == sorted(untrained)
    capsys.readouterr()
    allow = [] if len(finetuned) == 2 else ["--allow-untrained-experts"]
    assert main(["export", "--router", router, "--experts", str(tmp_path / "experts"), "--out",
                 str(tmp_path / "pipeline"), *allow]) == 0
    # `aptp inspect` reports what the pipeline and an expert were pruned at, from their folders alone.
    metadata = APTPPipeline.from_pretrained(tmp_path / "pipeline").router.config.metadata
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "pipeline"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["resolution"] == metadata["resolution"] and summary["text_length"] == metadata["text_length"]
    assert len(summary["experts"]) == 2 and all(0 < e["macs_fraction"] <= 1 for e in summary["experts"])
    assert main(["inspect", str(tmp_path / "experts" / f"expert-{finetuned[0]}"), "--json"]) == 0
    expert = json.loads(capsys.readouterr().out)
    assert (expert["resolution"], expert["latent"], expert["text_length"]) == (
        metadata["resolution"], metadata["latent_size"][0], metadata["text_length"])
    steps = APTPPipeline.from_pretrained(tmp_path / "pipeline").experts.config.expert_finetune_steps
    assert [steps[k] for k in finetuned] == [2] * len(finetuned) and sorted(steps).count(0) == 2 - len(finetuned)
    loaded = APTPPipeline.from_pretrained(tmp_path / "pipeline")
    k = finetuned[0]
    reference = APTPPipeline.from_pretrained(tmp_path / "pipeline").experts[k]
    for a, b in zip(loaded.experts[k].parameters(), reference.parameters()):
        assert torch.equal(a, b)
    # The tiny tokenizer spells prompts letter by letter into at most 16 tokens.
    (tmp_path / "prompts.txt").write_text("red disk\n\n" + "a blue star " * 40 + "\n")
    assert main(["generate", "--pipeline", str(tmp_path / "pipeline"), "--prompts-file", str(tmp_path / "prompts.txt"),
                 "HI", "--steps", "2", "--out", str(tmp_path / "images")]) == 0
    captured = capsys.readouterr()
    assert "truncated" in captured.err
    record = json.loads((tmp_path / "images" / "routing.json").read_text())
    assert len(record["images"]) == 3 and all((tmp_path / "images" / r["file_name"]).is_file() for r in record["images"])
    assert [r["prompt"] for r in record["images"]][0] == "HI"
    assert [r["truncated"] for r in record["images"]] == [False, False, True]
    # --dtype: the same routing in bfloat16 (the router runs in the pipeline's dtype too).
    assert main(["generate", "--pipeline", str(tmp_path / "pipeline"), "--prompts-file", str(tmp_path / "prompts.txt"),
                 "HI", "--steps", "2", "--output-dir", str(tmp_path / "bf16"), "--device", "cpu",
                 "--dtype", "bf16"]) == 0
    half = json.loads((tmp_path / "bf16" / "routing.json").read_text())
    assert [r["expert"] for r in half["images"]] == [r["expert"] for r in record["images"]]
    assert main(["generate", "--pipeline", str(tmp_path / "pipeline"), "--out", str(tmp_path / "none")]) == 2
    assert "no prompts" in capsys.readouterr().err
    # Peak memory, each prompt count in a fresh process.
    assert main(["bench", "memory", "--pipeline", str(tmp_path / "pipeline"), "--counts", "2", "6",
                 "--max-batch-size", "2", "--threads", "1"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.strip()[:1].isdigit()]
    assert [row[0] for row in rows] == ["2", "6"] and float(rows[0][-1]) == 1.0
    assert main(["bench", "memory", "--pipeline", str(tmp_path / "nothing")]) == 2
    assert "not an APTPPipeline folder" in capsys.readouterr().err


def _one_expert_router(tmp_path):
    """A one-expert router of a tiny SD-2-style pipeline, with its training data assigned in tmp_path/assign."""
    pipeline = make_sd2_pipeline(tmp_path / "sd2")
    export_imagefolder(tmp_path / "data", 16, "train", seed=0)
    assert main(["prune", "--output-dir", str(tmp_path / "prune"), "--set", f"model={pipeline}",
                 f"data={tmp_path / 'data'}", "train_size=12", "val_size=4", "steps=2", "warmup_steps=1",
                 "batch_size=4", "num_codes=1", "arch_dim=8", "hidden_dim=16", "hyper_hidden_dim=16",
                 "validate_every=0"]) == 0
    router = tmp_path / "prune" / "router"
    assert main(["assign", "--router", str(router), "--out", str(tmp_path / "assign")]) == 0
    return router


def test_finetune_resumes_exactly(tmp_path):
    from safetensors.torch import load_file

    from aptp.training.finetune import FinetuneConfig, run_finetune

    router = _one_expert_router(tmp_path)
    settings = dict(batch_size=4, checkpoint_every=1, validation_prompts=0)
    straight = run_finetune(router, tmp_path / "assign", 0, tmp_path / "a", FinetuneConfig(steps=4, **settings))
    # A run stopped after two steps leaves a checkpoint; the same command with the full length resumes it.
    run_finetune(router, tmp_path / "assign", 0, tmp_path / "b", FinetuneConfig(steps=2, **settings))
    resumed = run_finetune(router, tmp_path / "assign", 0, tmp_path / "b", FinetuneConfig(steps=4, **settings))
    a = load_file(straight / "diffusion_pytorch_model.safetensors")
    b = load_file(resumed / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_finetune_with_ema_and_a_schedule_resumes_exactly_and_logs(tmp_path, monkeypatch):
    import os
    import signal

    import pytest
    from safetensors.torch import load_file

    from aptp.training import finetune as finetune_module
    from aptp.training.finetune import FinetuneConfig, run_finetune
    from aptp.utils import APTPError

    router = _one_expert_router(tmp_path)
    config = FinetuneConfig(steps=4, batch_size=4, checkpoint_every=1, validation_prompts=0, lr=1e-3,
                            lr_schedule="cosine", lr_warmup=1, ema_decay=0.5)
    straight = run_finetune(router, tmp_path / "assign", 0, tmp_path / "a", config)
    original, calls = finetune_module.noised_batch, {"n": 0}

    def interrupt_in_the_third_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return original(*args, **kwargs)

    monkeypatch.setattr(finetune_module, "noised_batch", interrupt_in_the_third_step)
    with pytest.raises(APTPError, match="interrupted at step 3"):
        run_finetune(router, tmp_path / "assign", 0, tmp_path / "b", config)
    monkeypatch.setattr(finetune_module, "noised_batch", original)
    resumed = run_finetune(router, tmp_path / "assign", 0, tmp_path / "b", config)
    a = load_file(straight / "diffusion_pytorch_model.safetensors")
    b = load_file(resumed / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert list((tmp_path / "a" / "logs-expert-0").rglob("events.out.tfevents*")), "TensorBoard logs of the loss terms"
