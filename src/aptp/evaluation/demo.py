"""``aptp demo`` and ``aptp baselines``: the whole method on the embedded world, and its baselines.

Stages (each is skipped when its output already exists, so an interrupted demo resumes):
prune (K experts) -> assign -> fine-tune experts -> export the APTPPipeline -> baselines at the same
average MACs and the same fine-tuning steps (static = APTP with K = 1 and L1 magnitude by default; random
on request) -> evaluate everything side by side with the dense teacher -> report.
"""

from __future__ import annotations

import json
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from ..base_model import WORLD, model_identity
from ..experts.run import expert_folder, load_run
from ..pipelines.build import build_pipeline
from ..training.assign import SUMMARY_FILE, run_assign
from ..training.cache import copy_cache
from ..training.checkpoint import OtherRunError, remove_outputs
from ..training.finetune import FinetuneConfig, finetune_architecture, run_finetune
from ..training.prune import load_prune_config, run_prune
from ..units import uniform_width_architecture
from ..utils import APTPError, atomic_folder, write_json_atomic
from .compare import EvalConfig, evaluate_folders

BASELINES = ("static", "magnitude", "random")
# The baselines the claims compare with; random (a floor, far below both) costs two more minutes on 2 cores.
DEFAULT_BASELINES = ("static", "magnitude")
STAGES_FILE = "stages.json"


@dataclass
class DemoConfig:
    output_dir: str = "runs/demo"
    model: str = WORLD
    # Sized to finish within 15 minutes on 2 CPU cores: 100 pruning steps are about the fewest after which the
    # mixture's average MACs still meet the budget (80 overshoot it by 0.03); 15 DDIM steps for the evaluation.
    prune: dict = field(default_factory=lambda: {"steps": 100, "warmup_steps": 10, "train_size": 2000,
                                                 "val_size": 200, "batch_size": 32, "validate_every": 0})
    finetune: dict = field(default_factory=lambda: {"steps": 40, "batch_size": 32, "lr": 3e-4,
                                                    "validation_prompts": 0})
    evaluation: dict = field(default_factory=lambda: {"per_category": 32, "steps": 15, "batch_size": 64})
    baselines: tuple[str, ...] = DEFAULT_BASELINES
    # Magnitude and random keep this fraction of every width instead of matching the mixture's average MACs
    # (e.g. 0.5: a half-width model; the equal-MACs claims then no longer apply).
    baseline_width: float | None = None
    seed: int = 0


class Stages:
    """Prints one line per stage with its run time, and skips the stages whose output exists and was made
    with the same settings. A stage whose settings changed is redone from scratch (its output is replaced);
    each stage's settings include those of the stages it builds on, so everything downstream is redone too.
    The settings of the finished stages are kept in ``STAGES_FILE`` beside their outputs."""

    def __init__(self, total: int, record: Path | None = None):
        self.total, self.index, self.record = total, 0, record
        self.recorded = json.loads(record.read_text()) if record is not None and record.is_file() else {}

    def run(self, name: str, done: bool, action, settings: dict | None = None, outputs: tuple[Path, ...] = ()) -> None:
        self.index += 1
        settings = json.loads(json.dumps(settings)) if settings is not None else None
        entry = self.recorded.get(name, {})
        same = settings is None or entry.get("settings") == settings
        if done and same:
            print(f"[{self.index}/{self.total}] {name}: done earlier, skipped", flush=True)
            return
        if not same and any(path.exists() for path in outputs):
            # Made (or begun) with other settings: what it left cannot be resumed, only replaced.
            print(f"[{self.index}/{self.total}] {name}: settings changed, redoing it", flush=True)
            for path in outputs:
                shutil.rmtree(path, ignore_errors=True)
        print(f"[{self.index}/{self.total}] {name}", flush=True)
        self._record(name, settings)
        start = time.perf_counter()
        action()
        print(f"[{self.index}/{self.total}] {name}: {_minutes(time.perf_counter() - start)}", flush=True)

    def _record(self, name: str, settings: dict | None) -> None:
        if settings is not None and self.record is not None:
            self.recorded[name] = {"settings": settings}
            write_json_atomic(self.record, self.recorded)


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:04.1f} s"


@contextmanager
def quiet_loading():
    """Hide the per-file loading bars of diffusers and transformers, so the stage lines and the
    training/sampling bars are the one progress display."""
    libraries = [lib for lib in (diffusers_logging, transformers_logging) if lib.is_progress_bar_enabled()]
    for lib in libraries:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib in libraries:
            lib.enable_progress_bar()


def _finetune_config(config: DemoConfig, steps: int | None = None) -> FinetuneConfig:
    overrides = dict(config.finetune)
    if steps is not None:
        overrides["steps"] = steps
    return FinetuneConfig.from_dict({"seed": config.seed, **overrides})


def _baseline_architecture(kind: str, router_dir: Path, target: float, seed: int, width: float | None = None) -> dict:
    run = load_run(router_dir)
    denoiser = run.family.denoiser(run.base_pipeline())
    macs_model = run.macs_model(denoiser)
    if kind == "magnitude":
        scores = run.family.element_magnitudes(denoiser, run.pruned_for.unit_options)
    else:
        scores = torch.rand(macs_model.layout.num_elements, generator=torch.Generator().manual_seed(seed))
    if width is None:
        architecture = uniform_width_architecture(macs_model, target, scores=scores)
    else:
        architecture = uniform_width_architecture(macs_model, scores=scores, width=width)
    return {"architecture": architecture, "macs_fraction": macs_model.macs_of(architecture) / macs_model.dense}


def run_baselines(config: DemoConfig, stages: Stages | None = None) -> dict[str, Path]:
    """Train the baselines next to a finished mixture in ``output_dir``; returns their model folders."""
    out = Path(config.output_dir)
    router_dir, assign_dir = out / "prune" / "router", out / "assign"
    if not (assign_dir / SUMMARY_FILE).is_file():
        raise APTPError(f"no finished mixture in {out} (missing {assign_dir / SUMMARY_FILE}); run `aptp demo` first")
    stages = stages or Stages(len(config.baselines), out / STAGES_FILE)
    summary = json.loads((assign_dir / SUMMARY_FILE).read_text())
    all_rows = list(range(summary["samples"]))
    steps = int(config.finetune.get("steps", FinetuneConfig.steps))  # the same steps as every expert
    target = summary["mean_macs_fraction"]
    folders = {}
    for kind in config.baselines:
        folder = out / "baselines" / kind
        folders[kind] = folder / "model"
        if kind == "static":
            def train(folder=folder):
                for split in ("train", "val"):  # the same data, already encoded by the mixture's pruning run
                    copy_cache(out / "prune" / "cache" / split, folder / "prune" / "cache" / split)
                prune = load_prune_config(None, {**_prune_overrides(config), "num_codes": 1,
                                                 "output_dir": str(folder / "prune")})
                try:  # a pruning run of other settings or inputs is redone; one of these is kept or resumed
                    run_prune(prune)
                except OtherRunError:
                    run_prune(prune, overwrite=True)
                expert = load_run(folder / "prune" / "router").experts[0]
                _finetune_single(config, router_dir, expert.architecture, expert.macs_fraction, all_rows,
                                 folder / "model", steps)
        elif kind in ("magnitude", "random"):
            def train(folder=folder, kind=kind):
                chosen = _baseline_architecture(kind, router_dir, target, config.seed, config.baseline_width)
                _finetune_single(config, router_dir, chosen["architecture"], chosen["macs_fraction"], all_rows,
                                 folder / "model", steps)
        else:
            raise APTPError(f"unknown baseline {kind!r}; choose from {', '.join(BASELINES)}")
        # Static keeps its own pruning run when only the fine-tuning settings changed (see ``train``).
        outputs = (folder / "model", folder / "model-checkpoint") if kind == "static" else (folder,)
        settings = _stage_settings(config, "finetune")
        if kind != "static" and config.baseline_width is not None:
            settings["baseline_width"] = config.baseline_width
        stages.run(f"baseline {kind}", (folder / "model" / "config.json").is_file(), train, settings, outputs)
    return folders


def _finetune_single(config: DemoConfig, router_dir: Path, architecture: dict, macs_fraction: float,
                     rows: list[int], out: Path, steps: int) -> None:
    finetune_architecture(load_run(router_dir), architecture, Path(config.output_dir) / "assign", rows, out,
                          _finetune_config(config, steps), {"macs_fraction": macs_fraction})


def _stage_settings(config: DemoConfig, upto: str) -> dict:
    """The settings a stage's output depends on: those of its own step and of every step before it."""
    steps = ("prune", "finetune", "evaluation")
    settings = {"model": config.model, "model_identity": model_identity(config.model), "seed": config.seed}
    for step in steps[:steps.index(upto) + 1]:
        settings[step] = getattr(config, step)
    if upto == "evaluation":
        settings["baselines"] = list(config.baselines)
        if config.baseline_width is not None:
            settings["baseline_width"] = config.baseline_width
    return settings


def _prune_overrides(config: DemoConfig) -> dict:
    return {"model": config.model, "data": WORLD, "seed": config.seed, **config.prune}


def evaluate_demo(config: DemoConfig) -> Path:
    """Evaluate dense, mixture and baselines side by side; write the report; return report.html."""
    out = Path(config.output_dir)
    folders = {kind: out / "baselines" / kind / "model" for kind in config.baselines}
    return evaluate_folders(out / "pipeline", folders, EvalConfig.from_dict({"seed": config.seed, **config.evaluation}),
                            out / "report", {"demo": asdict(config)})


DEMO_OUTPUTS = ("prune", "assign", "experts", "pipeline", "baselines", "report", STAGES_FILE, "demo.json")


def run_demo(config: DemoConfig, overwrite: bool = False) -> Path:
    """Run (or resume) every stage of the demo; returns the path of report.html. Stages whose settings
    changed are redone; ``overwrite`` redoes them all."""
    start = time.perf_counter()
    if overwrite:
        remove_outputs(*(Path(config.output_dir) / name for name in DEMO_OUTPUTS))
    with quiet_loading():
        report = _run_stages(config)
    print(f"demo finished in {_minutes(time.perf_counter() - start)}; everything is under {config.output_dir}")
    return report


def _run_stages(config: DemoConfig) -> Path:
    out = Path(config.output_dir)
    stages = Stages(4 + len(config.baselines) + 1, out / STAGES_FILE)  # mixture stages, baselines, evaluation
    router_dir, assign_dir = out / "prune" / "router", out / "assign"
    pruning, tuning = _stage_settings(config, "prune"), _stage_settings(config, "finetune")
    stages.run("prune: router and experts under the budget", (router_dir / "experts.json").is_file(),
               lambda: run_prune(load_prune_config(None, {**_prune_overrides(config),
                                                          "output_dir": str(out / "prune")})),
               pruning, (out / "prune",))
    stages.run("assign: route the training prompts", (assign_dir / SUMMARY_FILE).is_file(),
               lambda: run_assign(router_dir, assign_dir), pruning, (assign_dir,))
    summary = json.loads((assign_dir / SUMMARY_FILE).read_text())

    def finetune_all():
        for expert in summary["experts"]:
            if expert["samples"] and not (expert_folder(out / "experts", expert["expert"]) / "config.json").is_file():
                run_finetune(router_dir, assign_dir, expert["expert"], out / "experts", _finetune_config(config))

    done = all((expert_folder(out / "experts", e["expert"]) / "config.json").is_file()
               for e in summary["experts"] if e["samples"])
    stages.run("fine-tune experts", done, finetune_all, tuning, (out / "experts",))

    def export():
        with atomic_folder(out / "pipeline") as folder:
            # An expert that no training prompt was routed to cannot be fine-tuned: it ships as sliced.
            build_pipeline(router_dir, out / "experts", allow_untrained=True).save_pretrained(folder)

    stages.run("export the APTPPipeline", (out / "pipeline" / "model_index.json").is_file(), export, tuning,
               (out / "pipeline",))
    run_baselines(config, stages)
    evaluated = (out / "report" / "metrics.json").is_file() and (out / "report" / "report.html").is_file()
    stages.run("evaluate and report", evaluated, lambda: evaluate_demo(config), _stage_settings(config, "evaluation"),
               (out / "report",))
    report = (out / "report" / "report.html").resolve()
    write_json_atomic(out / "demo.json", {"report": str(report), "config": asdict(config)})
    return report


def demo_config(output_dir: str | None = None, overrides: dict | None = None) -> DemoConfig:
    """The demo config with ``section.key=value`` overrides (``prune.steps=100``, ``seed=1``)."""
    config = DemoConfig()
    if output_dir:
        config = replace(config, output_dir=output_dir)
    for key, value in (overrides or {}).items():
        section, _, name = key.partition(".")
        if name and section in ("prune", "finetune", "evaluation"):
            getattr(config, section)[name] = value
        elif key == "baselines":
            names = [value] if isinstance(value, str) else value
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise APTPError(f"baselines must be a list of names, e.g. [static, magnitude], got {value!r}")
            config = replace(config, baselines=tuple(names))
        elif key in ("prune", "finetune", "evaluation"):
            raise APTPError(f"set the {key} options one by one, e.g. {key}.steps=100")
        elif not name and key in DemoConfig.__dataclass_fields__:
            config = replace(config, **{key: value})
        else:
            raise APTPError(f"unknown demo option {key!r}")
    # Unknown or bad options fail now, not after the stages before them have run.
    unknown = sorted(set(config.baselines) - set(BASELINES))
    if unknown:
        raise APTPError(f"unknown baseline(s) {unknown}; choose from {', '.join(BASELINES)}")
    width = config.baseline_width
    if width is not None and (isinstance(width, bool) or not isinstance(width, (int, float)) or not 0 < width <= 1):
        raise APTPError(f"baseline_width must be a number in (0, 1] (or null: the mixture's MACs), got {width!r}")
    load_prune_config(None, _prune_overrides(config))
    model_identity(config.model)  # a missing model folder fails before any stage is recorded
    _finetune_config(config)
    EvalConfig.from_dict(config.evaluation)
    return config
