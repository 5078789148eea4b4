"""Bad input, command by command: exit code 2, exactly one line of error naming the problem (and the path
involved), and nothing that existed before changed, nothing half-written left behind.

Every case runs on tiny models built once for the module (an SD-2-style pipeline, a two-step pruning run,
its routing and an exported APTPPipeline); each case gets a fresh folder holding an existing output folder
(``existing/keep.txt``) and a regular file (``afile``) to aim outputs at.
"""

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from conftest import make_sd2_pipeline, make_unet

from aptp.cli import main
from aptp.utils import APTPError

# --------------------------------------------------------------------------------------------------
# Fixtures


@dataclass
class Fixture:
    root: Path
    sd2: Path  # a Stable Diffusion pipeline folder (the base model)
    unet: Path  # its UNet folder
    data: Path  # an imagefolder
    router: Path  # `aptp prune` output
    assign: Path  # `aptp assign` output
    pipeline: Path  # `aptp export` output
    other: Path  # a UNet folder of another base model

    def paths(self, tmp: Path) -> dict[str, str]:
        names = ("sd2", "unet", "data", "router", "assign", "pipeline", "other")
        return {"tmp": str(tmp), **{name: str(getattr(self, name)) for name in names}}


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> Fixture:
    from aptp.world import export_imagefolder

    root = tmp_path_factory.mktemp("bad_input")
    sd2 = make_sd2_pipeline(root / "sd2")
    export_imagefolder(root / "data", 12, "train", seed=0)
    assert main(["prune", "--output-dir", str(root / "prune"), "--set", f"model={sd2}", f"data={root / 'data'}",
                 "train_size=8", "val_size=4", "steps=2", "warmup_steps=1", "batch_size=4", "num_codes=2",
                 "arch_dim=8", "hidden_dim=16", "hyper_hidden_dim=16", "validate_every=0", "difficulty_rows=8"]) == 0
    router = root / "prune" / "router"
    assert main(["assign", "--router", str(router), "--out", str(root / "assign")]) == 0
    assert main(["export", "--router", str(router), "--out", str(root / "pipeline"), "--allow-untrained-experts"]) == 0
    make_unet("sd1").save_pretrained(root / "other")
    return Fixture(root, sd2, sd2 / "unet", root / "data", router, root / "assign", root / "pipeline",
                   root / "other")


def snapshot(root: Path) -> dict[str, str | None]:
    """Every file and folder under ``root``: relative path -> content hash (None for a folder)."""
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else None
            for p in sorted(root.rglob("*"))}


# --------------------------------------------------------------------------------------------------
# Ways to break an input (each builds it under the case's folder)


def copy(source: Path, tmp: Path, name: str) -> Path:
    return Path(shutil.copytree(source, tmp / name))


def write(path: Path, content: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())


def damaged_router_config(fx, tmp):
    write(copy(fx.router, tmp, "router") / "config.json", '{"units": [')


def damaged_router_weights(fx, tmp):
    weights = copy(fx.router, tmp, "router") / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated


def damaged_experts_json(fx, tmp):
    write(copy(fx.router, tmp, "router") / "experts.json", "{oops")


def experts_json_of_another_kind(fx, tmp):
    write(copy(fx.router, tmp, "router") / "experts.json", '{"experts": 3}')


def damaged_shard(fx, tmp):
    write(copy(fx.assign, tmp, "assign") / "expert-0.json", '{"rows": [0, 1')


def damaged_cache(fx, tmp):
    shard = copy(fx.assign, tmp, "assign") / "cache" / "records-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated


def cache_of_another_base_model(fx, tmp):
    texts = copy(fx.assign, tmp, "assign") / "cache" / "index.json"
    content = json.loads(texts.read_text())
    content["source"]["model"] = str(tmp / "another-base-model")
    texts.write_text(json.dumps(content))


def experts_of_another_base_model(fx, tmp):
    shutil.copytree(fx.other, tmp / "experts" / "expert-0")


def damaged_expert_config(fx, tmp):
    write(tmp / "experts" / "expert-0" / "config.json", "{oops")


def damaged_model_index(fx, tmp):
    write(copy(fx.pipeline, tmp, "pipeline") / "model_index.json", '{"_class_name": "APTPPipeline",')


def damaged_pipeline_router(fx, tmp):
    write(copy(fx.pipeline, tmp, "pipeline") / "router" / "diffusion_pytorch_model.safetensors", b"\0" * 64)


def pipeline_without_vae(fx, tmp):
    shutil.rmtree(copy(fx.pipeline, tmp, "pipeline") / "vae")


def damaged_unet_config(fx, tmp):
    write(tmp / "model" / "config.json", '{"_class_name": "UNet2DConditionModel", ')


def latin1_prompts(fx, tmp):
    write(tmp / "prompts.txt", "caf\xe9 au lait\n".encode("latin-1"))


def blank_prompts(fx, tmp):
    write(tmp / "prompts.txt", "\n   \n\n")


def damaged_yaml(fx, tmp):
    write(tmp / "prune.yaml", "budget: [0.5\nnum_codes: 2\n")


def latin1_yaml(fx, tmp):
    write(tmp / "prune.yaml", "# r\xe9glages\nbudget: 0.5\n".encode("latin-1"))


def empty_data_folder(fx, tmp):
    (tmp / "data").mkdir()


def read_only_folder(fx, tmp):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    (tmp / "locked").mkdir()
    (tmp / "locked").chmod(0o555)


# --------------------------------------------------------------------------------------------------
# The table


@dataclass
class Case:
    id: str
    argv: list[str]  # {tmp}, {sd2}, {unet}, {data}, {router}, {assign}, {pipeline}, {other} are filled in
    words: tuple[str, ...]  # each appears in the error line (placeholders filled in too)
    prepare: Callable | None = None


TINY_PRUNE = ["model={sd2}", "data={data}", "train_size=8", "val_size=4", "steps=2", "warmup_steps=1",
              "batch_size=4", "num_codes=2", "arch_dim=8", "hidden_dim=16", "hyper_hidden_dim=16", "validate_every=0"]
PRUNE = ["prune", "--output-dir", "{tmp}/prune", "--set"]
FINETUNE = ["finetune", "--router", "{router}", "--assign", "{assign}", "--out", "{tmp}/experts"]
GENERATE = ["generate", "--pipeline", "{pipeline}", "--out", "{tmp}/images", "--steps", "1"]
DEMO = ["demo", "--output-dir", "{tmp}/demo", "--set"]
EVALUATE = ["evaluate", "--pipeline", "{pipeline}", "--out", "{tmp}/report"]

CASES = [
    # aptp inspect
    Case("inspect-missing-folder", ["inspect", "{tmp}/nothing"], ("no such folder", "{tmp}/nothing")),
    Case("inspect-router-folder", ["inspect", "{router}"], ("PromptRouter", "not supported", "{router}")),
    Case("inspect-damaged-config", ["inspect", "{tmp}/model"], ("not valid JSON", "{tmp}/model/config.json"),
         damaged_unet_config),
    Case("inspect-resolution-off-the-vae-grid", ["inspect", "{unet}", "--resolution", "36"],
         ("resolution 36", "multiple of the VAE scale factor 8")),
    Case("inspect-resolution-zero", ["inspect", "tiny", "--resolution", "0"], ("--resolution", "positive integer")),
    Case("inspect-resolution-negative", ["inspect", "tiny", "--resolution", "-64"], ("--resolution", "got -64")),
    # aptp bench
    Case("bench-slicing-unknown-config", ["bench", "slicing", "--config", "sd3"], ("unknown config 'sd3'",)),
    Case("bench-slicing-unknown-device", ["bench", "slicing", "--config", "tiny", "--device", "gpu0"],
         ("unknown device 'gpu0'",)),
    Case("bench-slicing-target-above-one", ["bench", "slicing", "--targets", "0.5", "1.5"],
         ("--targets", "fraction in (0, 1]", "1.5")),
    Case("bench-slicing-negative-threads", ["bench", "slicing", "--threads", "-1"], ("--threads", "got -1")),
    Case("bench-prune-step-unet-folder", ["bench", "prune-step", "--model", "{unet}"],
         ("{unet}", "not a diffusers pipeline folder")),
    Case("bench-throughput-sd-pipeline", ["bench", "throughput", "--pipeline", "{sd2}"],
         ("{sd2}", "not an APTPPipeline folder", "StableDiffusionPipeline")),
    Case("bench-memory-router-folder", ["bench", "memory", "--pipeline", "{router}"],
         ("{router}", "not an APTPPipeline folder")),
    Case("bench-cache-memory-cache-dir-is-a-file", ["bench", "cache-memory", "--cache-dir", "{tmp}/afile"],
         ("{tmp}/afile", "is a file")),
    Case("bench-fullsize-output-is-a-file", ["bench", "fullsize", "--config", "sd21", "--output-dir", "{tmp}/afile"],
         ("{tmp}/afile", "is a file")),
    Case("bench-fullsize-unknown-config", ["bench", "fullsize", "--config", "sd3", "--output-dir", "{tmp}/full"],
         ("--config", "invalid choice")),
    Case("generate-resolution-not-a-multiple", ["generate", "--pipeline", "{pipeline}", "--output-dir", "{tmp}/img",
                                                "--resolution", "30", "a red circle"],
         ("height must be a positive multiple",)),
    Case("bench-cache-memory-zero-records", ["bench", "cache-memory", "--sizes", "0", "4"], ("--sizes", "positive integer")),
    Case("bench-memory-zero-prompts", ["bench", "memory", "--pipeline", "{pipeline}", "--counts", "0", "4"],
         ("--counts", "positive integer")),
    # aptp prune
    Case("prune-budget-not-a-number", PRUNE + ["budget=abc"], ("budget", "must be float", "'abc'")),
    Case("prune-num-codes-not-an-integer", PRUNE + ["num_codes=2.5"], ("num_codes", "must be int", "2.5")),
    Case("prune-budget-zero", PRUNE + ["budget=0"], ("budget must be in (0, 1]", "0.0")),
    Case("prune-budget-above-one", PRUNE + ["budget=1.5"], ("budget must be in (0, 1]", "1.5")),
    Case("prune-budget-negative", PRUNE + ["budget=-1"], ("budget must be in (0, 1]", "-1")),
    Case("prune-sinkhorn-balance-out-of-range", PRUNE + ["sinkhorn_balance=2"],
         ("sinkhorn_balance must be in [0, 1]", "2")),
    Case("prune-steps-zero", PRUNE + ["steps=0"], ("steps", ">= 1")),
    Case("prune-negative-batch", PRUNE + ["batch_size=-4"], ("batch_size", ">= 1")),
    Case("prune-unknown-key", PRUNE + ["budgte=0.5"], ("unknown PruneConfig option", "budgte")),
    Case("prune-value-not-yaml", PRUNE + ["min_width=[0.5"], ("min_width", "not valid YAML")),
    Case("prune-missing-config-file", ["prune", "--config", "{tmp}/nothing.yaml"],
         ("no such config file", "{tmp}/nothing.yaml")),
    Case("prune-damaged-config-file", ["prune", "--config", "{tmp}/prune.yaml"], ("{tmp}/prune.yaml", "not valid YAML"),
         damaged_yaml),
    Case("prune-config-not-utf8", ["prune", "--config", "{tmp}/prune.yaml"], ("{tmp}/prune.yaml", "not UTF-8"),
         latin1_yaml),
    Case("prune-model-is-a-unet-folder", PRUNE + TINY_PRUNE + ["model={unet}"],
         ("{unet}", "not a diffusers pipeline folder")),
    Case("prune-missing-data-folder", PRUNE + TINY_PRUNE + ["data={tmp}/nodata"], ("{tmp}/nodata",)),
    Case("prune-data-folder-without-metadata", PRUNE + TINY_PRUNE + ["data={tmp}/data"],
         ("{tmp}/data", "no metadata.jsonl"), empty_data_folder),
    Case("prune-resolution-off-the-vae-grid", PRUNE + TINY_PRUNE + ["resolution=60"],
         ("resolution 60", "multiple of the VAE scale factor 8")),
    Case("prune-output-under-a-file", ["prune", "--output-dir", "{tmp}/afile/prune", "--set", *TINY_PRUNE],
         ("{tmp}/afile", "is a file")),
    # aptp assign
    Case("assign-missing-router", ["assign", "--router", "{tmp}/nothing", "--out", "{tmp}/assign"],
         ("{tmp}/nothing", "not a trained router folder")),
    Case("assign-pipeline-folder-as-router", ["assign", "--router", "{pipeline}", "--out", "{tmp}/assign"],
         ("{pipeline}", "not a trained router folder")),
    Case("assign-damaged-router-config", ["assign", "--router", "{tmp}/router", "--out", "{tmp}/assign"],
         ("{tmp}/router", "cannot load the router", "config.json"), damaged_router_config),
    Case("assign-damaged-router-weights", ["assign", "--router", "{tmp}/router", "--out", "{tmp}/assign"],
         ("{tmp}/router", "cannot load the router", "safetensors"), damaged_router_weights),
    Case("assign-damaged-experts-json", ["assign", "--router", "{tmp}/router", "--out", "{tmp}/assign"],
         ("{tmp}/router/experts.json", "damaged", "not valid JSON"), damaged_experts_json),
    Case("assign-missing-data", ["assign", "--router", "{router}", "--out", "{tmp}/assign", "--data", "{tmp}/nodata"],
         ("{tmp}/nodata",)),
    Case("assign-size-zero", ["assign", "--router", "{router}", "--out", "{tmp}/assign", "--size", "0"],
         ("--size", "positive integer")),
    Case("assign-output-is-a-file", ["assign", "--router", "{router}", "--out", "{tmp}/afile"],
         ("{tmp}/afile", "is a file")),
    Case("assign-read-only-output", ["assign", "--router", "{router}", "--out", "{tmp}/locked/assign"],
         ("{tmp}/locked", "not writable"), read_only_folder),
    # aptp finetune
    Case("finetune-neither-expert-nor-all", FINETUNE, ("--expert K or --all",)),
    Case("finetune-expert-out-of-range", FINETUNE + ["--expert", "5"], ("expert must be in [0, 2)", "5")),
    Case("finetune-negative-expert", FINETUNE + ["--expert", "-1"], ("--expert", "got -1")),
    Case("finetune-steps-zero", FINETUNE + ["--expert", "0", "--set", "steps=0"], ("steps must be >= 1", "0")),
    Case("finetune-batch-zero", FINETUNE + ["--expert", "0", "--set", "batch_size=0"], ("batch_size must be >= 1",)),
    Case("finetune-negative-lr", FINETUNE + ["--expert", "0", "--set", "lr=-1e-4"], ("lr must be", ">= 0")),
    Case("finetune-unknown-precision", FINETUNE + ["--expert", "0", "--set", "mixed_precision=fp9"],
         ("mixed_precision", "'fp9'")),
    Case("finetune-unknown-key", FINETUNE + ["--all", "--set", "step=3"], ("unknown FinetuneConfig option", "step")),
    Case("finetune-missing-assign", ["finetune", "--router", "{router}", "--assign", "{tmp}/nothing", "--out",
                                     "{tmp}/experts", "--all"], ("no expert-0.json", "{tmp}/nothing")),
    Case("finetune-damaged-shard", ["finetune", "--router", "{router}", "--assign", "{tmp}/assign", "--out",
                                    "{tmp}/experts", "--expert", "0"],
         ("{tmp}/assign/expert-0.json", "damaged", "not valid JSON"), damaged_shard),
    Case("finetune-damaged-cache", ["finetune", "--router", "{router}", "--assign", "{tmp}/assign", "--out",
                                    "{tmp}/experts", "--expert", "0"],
         ("{tmp}/assign/cache/records-00000.safetensors", "damaged", "run `aptp assign` again"), damaged_cache),
    Case("finetune-assign-of-another-base-model", ["finetune", "--router", "{router}", "--assign", "{tmp}/assign",
                                                   "--out", "{tmp}/experts", "--expert", "0"],
         ("{tmp}/assign", "another-base-model", "{sd2}"), cache_of_another_base_model),
    Case("finetune-output-is-a-file", ["finetune", "--router", "{router}", "--assign", "{assign}", "--out",
                                       "{tmp}/afile", "--expert", "0"], ("{tmp}/afile", "is a file")),
    # aptp export
    Case("export-missing-router", ["export", "--router", "{tmp}/nothing", "--out", "{tmp}/existing"],
         ("{tmp}/nothing", "not a trained router folder")),
    Case("export-experts-json-of-another-kind", ["export", "--router", "{tmp}/router", "--out", "{tmp}/existing"],
         ("{tmp}/router/experts.json", "damaged"), experts_json_of_another_kind),
    Case("export-missing-experts-folder", ["export", "--router", "{router}", "--experts", "{tmp}/experts", "--out",
                                           "{tmp}/existing"], ("no experts folder", "{tmp}/experts")),
    Case("export-experts-of-another-base-model", ["export", "--router", "{router}", "--experts", "{tmp}/experts",
                                                  "--out", "{tmp}/existing"],
         ("{tmp}/experts/expert-0", "not carved from this router's base model"), experts_of_another_base_model),
    Case("export-damaged-expert-config", ["export", "--router", "{router}", "--experts", "{tmp}/experts", "--out",
                                          "{tmp}/existing"],
         ("{tmp}/experts/expert-0", "cannot load the expert", "config.json"), damaged_expert_config),
    Case("export-untrained-experts", ["export", "--router", "{router}", "--out", "{tmp}/pipeline"],
         ("not fine-tuned", "--allow-untrained-experts")),
    Case("export-output-is-a-file", ["export", "--router", "{router}", "--out", "{tmp}/afile"],
         ("{tmp}/afile", "is a file")),
    Case("export-output-under-a-file", ["export", "--router", "{router}", "--out", "{tmp}/afile/pipeline"],
         ("{tmp}/afile", "is a file")),
    # aptp generate
    Case("generate-missing-pipeline", ["generate", "--pipeline", "{tmp}/nothing", "--out", "{tmp}/images", "a cat"],
         ("{tmp}/nothing", "not an APTPPipeline folder", "no such folder")),
    Case("generate-sd-pipeline-folder", ["generate", "--pipeline", "{sd2}", "--out", "{tmp}/images", "a cat"],
         ("{sd2}", "not an APTPPipeline folder", "StableDiffusionPipeline")),
    Case("generate-unet-folder", ["generate", "--pipeline", "{unet}", "--out", "{tmp}/images", "a cat"],
         ("{unet}", "no model_index.json")),
    Case("generate-damaged-model-index", ["generate", "--pipeline", "{tmp}/pipeline", "--out", "{tmp}/images", "a"],
         ("{tmp}/pipeline/model_index.json", "damaged"), damaged_model_index),
    Case("generate-damaged-router-weights", ["generate", "--pipeline", "{tmp}/pipeline", "--out", "{tmp}/images",
                                             "a"], ("cannot load the APTPPipeline", "{tmp}/pipeline"),
         damaged_pipeline_router),
    Case("generate-pipeline-without-vae", ["generate", "--pipeline", "{tmp}/pipeline", "--out", "{tmp}/images", "a"],
         ("{tmp}/pipeline", "incomplete APTPPipeline folder", "no vae"), pipeline_without_vae),
    Case("generate-prompts-not-utf8", GENERATE + ["--prompts-file", "{tmp}/prompts.txt"],
         ("{tmp}/prompts.txt", "not UTF-8"), latin1_prompts),
    Case("generate-blank-prompts-file", GENERATE + ["--prompts-file", "{tmp}/prompts.txt"],
         ("no prompts", "{tmp}/prompts.txt"), blank_prompts),
    Case("generate-missing-prompts-file", GENERATE + ["--prompts-file", "{tmp}/prompts.txt"],
         ("cannot read", "{tmp}/prompts.txt", "No such file")),
    Case("generate-blank-prompt", GENERATE + ["a cat", "   "], ("empty prompt", "[1]")),
    Case("generate-steps-zero", GENERATE + ["--steps", "0", "a cat"], ("--steps", "positive integer")),
    Case("generate-guidance-nan", GENERATE + ["--guidance-scale", "nan", "a cat"], ("--guidance-scale", "nan")),
    Case("generate-unknown-device", GENERATE + ["--device", "tpu9", "a cat"], ("unknown device", "tpu9")),
    Case("generate-missing-gpu", GENERATE + ["--device", "cuda:99", "a cat"], ("cuda:99", "asked for")),
    Case("evaluate-bad-dtype", EVALUATE + ["--dtype", "fp64"], ("--dtype", "fp64")),
    Case("generate-negative-guidance", GENERATE + ["--guidance-scale", "-2", "a cat"],
         ("--guidance-scale", "finite number >= 0")),
    Case("generate-output-is-a-file", ["generate", "--pipeline", "{pipeline}", "--out", "{tmp}/afile", "a cat"],
         ("{tmp}/afile", "is a file")),
    # aptp demo / baselines / ablation
    Case("demo-unknown-option", DEMO + ["prune_steps=3"], ("unknown demo option", "prune_steps")),
    Case("demo-unknown-prune-key", DEMO + ["prune.stepz=3"], ("unknown PruneConfig option", "stepz")),
    Case("demo-budget-out-of-range", DEMO + ["prune.budget=1.5"], ("budget must be in (0, 1]",)),
    Case("demo-finetune-steps-zero", DEMO + ["finetune.steps=0"], ("steps must be >= 1",)),
    Case("demo-evaluation-steps-negative", DEMO + ["evaluation.steps=-1"], ("evaluation steps must be >= 1",)),
    Case("demo-guidance-nan", DEMO + ["evaluation.guidance_scale=nan"], ("guidance_scale", "finite number >= 0")),
    Case("demo-missing-model", DEMO + ["model={tmp}/nothing"], ("{tmp}/nothing", "no such model folder")),
    Case("demo-unknown-baseline", DEMO + ["baselines=[static,l2]"], ("unknown baseline", "l2")),
    Case("demo-baselines-not-names", DEMO + ["baselines=3"], ("baselines must be a list", "3")),
    Case("demo-baseline-width-out-of-range", DEMO + ["baseline_width=1.5"], ("baseline_width must be", "1.5")),
    Case("demo-section-not-options", DEMO + ["prune=3"], ("one by one", "prune.steps")),
    Case("demo-output-is-a-file", ["demo", "--output-dir", "{tmp}/afile"], ("{tmp}/afile", "is a file")),
    Case("baselines-without-a-mixture", ["baselines", "--output-dir", "{tmp}/existing"],
         ("no finished mixture", "{tmp}/existing")),
    Case("baselines-unknown-baseline", ["baselines", "--output-dir", "{tmp}/demo", "--set", "baselines=[random,l1]"],
         ("unknown baseline", "l1")),
    Case("ablation-unknown-variant", ["ablation", "--output-dir", "{tmp}/ablation", "--variants", "aptp", "no-router"],
         ("--variants", "invalid choice", "no-router")),
    Case("ablation-seed-not-an-integer", ["ablation", "--output-dir", "{tmp}/ablation", "--seeds", "0", "one"],
         ("--seeds", "'one'")),
    Case("ablation-unknown-prune-key", ["ablation", "--output-dir", "{tmp}/ablation", "--set", "prune.bogus=1"],
         ("unknown PruneConfig option", "bogus")),
    # aptp evaluate
    Case("evaluate-missing-pipeline", ["evaluate", "--pipeline", "{tmp}/nothing", "--out", "{tmp}/report"],
         ("{tmp}/nothing", "not an APTPPipeline folder")),
    Case("evaluate-sd-pipeline-folder", ["evaluate", "--pipeline", "{sd2}", "--out", "{tmp}/report"],
         ("{sd2}", "not an APTPPipeline")),
    Case("evaluate-unet-without-name", EVALUATE + ["--unet", "{other}"],
         ("NAME=FOLDER", "{other}")),
    Case("evaluate-unknown-key", EVALUATE + ["--set", "per_categroy=2"],
         ("unknown EvalConfig option", "per_categroy")),
    Case("evaluate-negative-guidance", EVALUATE + ["--set", "guidance_scale=-1"],
         ("guidance_scale", "finite number >= 0")),
    Case("evaluate-per-category-zero", EVALUATE + ["--set", "per_category=0"],
         ("per_category must be >= 1",)),
    Case("evaluate-unet-of-another-base-model", EVALUATE + ["--unet", "other={other}", "--set", "per_category=1",
                                                            "steps=1"],
         ("{other}", "not carved from this base model")),
    Case("evaluate-output-is-a-file", ["evaluate", "--pipeline", "{pipeline}", "--out", "{tmp}/afile"],
         ("{tmp}/afile", "is a file")),
    # aptp world
    Case("world-export-zero-images", ["world", "export", "{tmp}/world", "--n", "0"], ("number of images", "0")),
    Case("world-export-into-a-file", ["world", "export", "{tmp}/afile", "--n", "2"], ("{tmp}/afile", "is a file")),
    Case("world-export-unknown-split", ["world", "export", "{tmp}/world", "--split", "holdout"],
         ("--split", "invalid choice", "holdout")),
    Case("world-preview-into-a-folder", ["world", "preview", "{tmp}/existing"], ("{tmp}/existing", "is a directory")),
    Case("world-preview-scale-zero", ["world", "preview", "{tmp}/grid.png", "--scale", "0"], ("scale", "> 0")),
    # aptp teacher
    Case("teacher-train-set-without-stage", ["teacher", "train", "--out", "{tmp}/teacher", "--set", "steps=10"],
         ("--set", "--stage vae or --stage unet")),
    Case("teacher-train-steps-zero", ["teacher", "train", "--stage", "vae", "--out", "{tmp}/teacher", "--set",
                                      "steps=0"], ("steps must be >= 1",)),
    Case("teacher-train-unknown-key", ["teacher", "train", "--stage", "unet", "--out", "{tmp}/teacher", "--set",
                                       "stepz=1"], ("unknown UNetTrainConfig option", "stepz")),
    Case("teacher-train-missing-vae", ["teacher", "train", "--stage", "unet", "--out", "{tmp}/teacher", "--vae",
                                       "{tmp}/vae"], ("no trained VAE", "{tmp}/vae")),
    Case("teacher-train-output-is-a-file", ["teacher", "train", "--stage", "vae", "--out", "{tmp}/afile"],
         ("{tmp}/afile", "is a file")),
    Case("teacher-sample-missing-teacher", ["teacher", "sample", "a cat", "--teacher", "{tmp}/nothing", "--out",
                                            "{tmp}/samples"], ("no teacher", "{tmp}/nothing")),
    Case("teacher-sample-blank-prompt", ["teacher", "sample", "  ", "--out", "{tmp}/samples"], ("empty prompt",)),
    Case("teacher-sample-steps-zero", ["teacher", "sample", "a cat", "--steps", "0", "--out", "{tmp}/samples"],
         ("--steps", "positive integer")),
    Case("teacher-evaluate-per-category-negative", ["teacher", "evaluate", "--per-category", "-2", "--out",
                                                    "{tmp}/eval"], ("--per-category", "got -2")),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(case, fx, tmp_path, capsys):
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "keep.txt").write_text("an earlier output")
    (tmp_path / "afile").write_text("a regular file")
    if case.prepare is not None:
        case.prepare(fx, tmp_path)
    paths = fx.paths(tmp_path)
    before, fixture_before = snapshot(tmp_path), snapshot(fx.root)
    capsys.readouterr()

    code = main([arg.format(**paths) for arg in case.argv])

    err = capsys.readouterr().err
    lines = err.splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("aptp: error: "), err
    for word in case.words:
        assert word.format(**paths) in lines[0]
    assert snapshot(tmp_path) == before, "the case folder changed (an output was modified or left behind)"
    assert snapshot(fx.root) == fixture_before, "an input folder changed"


# --------------------------------------------------------------------------------------------------
# The Python API: bad generation settings raise APTPError with one line, before any routing


@pytest.fixture(scope="module")
def pipeline(fx):
    from aptp.pipelines import APTPPipeline

    loaded = APTPPipeline.from_pretrained(fx.pipeline)
    loaded.set_progress_bar_config(disable=True)
    return loaded


API_CASES = [
    ("no-prompt", dict(prompt=[]), "non-empty"),
    ("prompt-none", dict(prompt=None), "non-empty"),
    ("prompt-not-text", dict(prompt=[3]), "non-empty"),
    ("steps-zero", dict(num_inference_steps=0), "num_inference_steps"),
    ("steps-fractional", dict(num_inference_steps=2.5), "num_inference_steps"),
    ("guidance-infinite", dict(guidance_scale=float("inf")), "guidance_scale"),
    ("height-without-width", dict(height=64), "both height and width"),
    ("height-off-the-grid", dict(height=60, width=64), "multiple of"),
    ("negative-size", dict(height=-64, width=-64), "multiple of"),
    ("unknown-output-type", dict(output_type="jpeg"), "output_type"),
    ("batch-size-zero", dict(max_batch_size=0), "max_batch_size"),
    ("negative-prompts-miscounted", dict(prompt=["a", "b"], negative_prompt=["c"]), "one entry per prompt"),
    ("negative-prompt-not-text", dict(negative_prompt=7), "negative_prompt"),
    ("generator-not-a-generator", dict(generator=0), "generator"),
    ("generators-miscounted", dict(prompt=["a", "b"], generator=[torch.Generator()]), "one entry per prompt"),
]


@pytest.mark.parametrize("settings, message", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_bad_pipeline_calls_raise_one_line(pipeline, settings, message, monkeypatch):
    monkeypatch.setattr(type(pipeline), "route", lambda *args: pytest.fail("routed despite bad settings"))
    settings = {"prompt": "a red circle", **settings}
    with pytest.raises(APTPError, match=message) as raised:
        pipeline(**settings)
    assert "\n" not in str(raised.value)


def test_bad_pipeline_folders_raise_one_line_from_python(fx, tmp_path):
    from aptp.pipelines import APTPPipeline

    for folder, message in ((fx.sd2, "not an APTPPipeline"), (fx.router, "no model_index.json"),
                            (tmp_path / "nothing", "no such folder")):
        with pytest.raises(APTPError, match=message) as raised:
            APTPPipeline.from_pretrained(folder)
        assert str(folder) in str(raised.value) and "\n" not in str(raised.value)
