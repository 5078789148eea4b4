"""The ``aptp`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .config import (
    DEFAULT_MAX_BATCH_SIZE,
    DTYPES,
    MIXED_PRECISION_OF,
    HelpFormatter,
    add_device_arguments,
    add_output_argument,
    add_overwrite_argument,
    describe_keys,
    fraction,
    non_negative_float,
    non_negative_int,
    positive_int,
    resolve_device,
    torch_dtype,
)
from .teacher.cli import add_teacher_parser
from .utils import APTPError, check_output_folder, error_summary, not_utf8, read_json
from .world.cli import add_world_parser


class Parser(argparse.ArgumentParser):
    """Usage mistakes (a missing argument, a value of the wrong type) are one line of error and exit
    code 2, like every other bad input; ``--help`` shows the usage, every flag's default and, for commands
    with ``--set``, every config key with its type and default (``keys``: a function, called only for help,
    since the config classes import torch)."""

    def __init__(self, *args, keys=None, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.keys = keys

    def format_help(self) -> str:
        if self.keys is not None:
            self.epilog = self.keys()
        return super().format_help()

    def error(self, message: str):
        self.exit(2, f"aptp: error: {message} (see `{self.prog} --help`)\n")


# ---------------------------------------------------------------------------------------------
# aptp inspect


def cmd_inspect(args) -> int:
    from .costs import count_parameters
    from .families import family_of
    from .families.sources import resolve_source

    folder = Path(args.model)
    if (folder / "model_index.json").is_file() and (folder / "router" / "config.json").is_file():
        return _inspect_pipeline(folder, args.json)
    source = resolve_source(args.model)
    # A fine-tuned expert records the resolution and text length it was pruned at.
    pruned_at = read_json(folder / "aptp_expert.json") if (folder / "aptp_expert.json").is_file() else {}
    if args.resolution is None and "latent_size" in pruned_at:
        resolution, latent = pruned_at["resolution"], pruned_at["latent_size"][0]
    else:
        resolution = args.resolution or source.default_resolution
        if resolution % source.vae_scale_factor:
            raise APTPError(f"resolution {resolution} is not a multiple of the VAE scale factor "
                            f"{source.vae_scale_factor}")
        latent = resolution // source.vae_scale_factor
    text_length = args.text_length or pruned_at.get("text_length") or source.text_length
    unet = source.build_meta_unet()
    family = family_of(unet)
    if not args.text_length and "text_length" not in pruned_at:
        text_length = family.capped_text_length(text_length)
    model = family.build_macs_model(unet, (latent, latent), text_length)
    params = count_parameters(unet)
    attention = model.dense_attention
    published = family.build_macs_model(unet, (latent, latent), text_length, cross_attention_as_self=True).dense
    if args.json:
        print(json.dumps({
            "model": source.description, "family": family.name, "parameters": params,
            "resolution": resolution, "latent": latent, "text_length": text_length,
            "macs": model.dense, "macs_without_attention_matmuls": model.dense - attention,
            "fixed_macs": model.fixed, "macs_cross_attention_as_self": published, "units": model.unit_table(),
        }, indent=2))
        return 0
    print(source.description)
    print(f"  family              {family.name}")
    print(f"  parameters          {params / 1e6:.1f} M")
    print(f"  resolution          {resolution} px -> latent {latent}x{latent}, text length {text_length}")
    print(f"  MACs                {model.dense / 1e9:.1f} G  (FLOPs = 2 x MACs)")
    print(f"    w/o attn matmuls  {(model.dense - attention) / 1e9:.1f} G  (QK^T and AV: {attention / 1e9:.1f} G)")
    print(f"    fixed             {model.fixed / 1e9:.1f} G  ({model.fixed / model.dense:.1%}, not prunable)")
    print(f"    cross-attn counted as self-attn (published APTP convention): {published / 1e9:.1f} G")
    print(f"  prunable units      {len(model.layout)} units, {model.layout.num_elements} gates")
    print()
    print(f"  {'kind':<13}{'units':>6}{'gates':>8}{'MACs share':>12}")
    for row in model.unit_table():
        note = "  (whole blocks, incl. nested units)" if row["kind"] in ("resnet", "transformer") else ""
        print(f"  {row['kind']:<13}{row['units']:>6}{row['elements']:>8}{row['share']:>11.1%}{note}")
    return 0


def _inspect_pipeline(folder: Path, as_json: bool) -> int:
    """An exported APTPPipeline, from its config files: what it was pruned at and its experts."""
    from .experts.run import PrunedFor
    from .pipelines.aptp import check_pipeline_folder

    check_pipeline_folder(folder)
    pruned_for = PrunedFor.from_dict(read_json(folder / "router" / "config.json").get("metadata") or {},
                                     str(folder / "router" / "config.json"))
    bank = read_json(folder / "experts" / "config.json")
    dense = bank.get("dense_macs") or 1.0
    shares = bank.get("expert_shares") or [None] * len(bank.get("expert_macs", []))
    steps = bank.get("expert_finetune_steps") or [None] * len(bank.get("expert_macs", []))
    experts = [{"expert": k, "macs": macs, "macs_fraction": macs / dense, "validation_share": shares[k],
                "finetune_steps": steps[k]} for k, macs in enumerate(bank.get("expert_macs", []))]
    summary = {"pipeline": str(folder), "base_model": pruned_for.base_model, "budget": pruned_for.budget,
               "resolution": pruned_for.resolution, "latent_size": list(pruned_for.latent_size),
               "text_length": pruned_for.text_length, "dense_macs": dense, "experts": experts}
    if as_json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"APTPPipeline {folder}")
    print(f"  base model          {summary['base_model']}")
    print(f"  pruned at           {summary['resolution']} px (latent {summary['latent_size']}), "
          f"text length {summary['text_length']}, budget {summary['budget']}")
    print(f"  dense UNet          {dense / 1e9:.3f} GMACs per call")
    print(f"  {'expert':<8}{'MACs fraction':>15}{'val. share':>12}{'fine-tuning steps':>19}")
    for row in experts:
        share = "-" if row["validation_share"] is None else f"{row['validation_share']:.1%}"
        print(f"  {row['expert']:<8}{row['macs_fraction']:>15.3f}{share:>12}{str(row['finetune_steps']):>19}")
    return 0


# ---------------------------------------------------------------------------------------------
# aptp bench


def _torch_threads(requested: int) -> int:
    """Use ``requested`` torch threads (0: torch's choice); returns the number in use."""
    import torch

    if requested:
        torch.set_num_threads(requested)
    return torch.get_num_threads()


def cmd_bench_slicing(args) -> int:
    from .benchmarks.slicing import format_rows, run_slicing_benchmark

    threads = _torch_threads(args.threads)
    rows = run_slicing_benchmark(args.config, args.latent, args.batch, args.dtype, args.device, args.targets,
                                 args.repeats, args.warmup)
    header = (f"aptp bench slicing --config {args.config}: latent {args.latent}x{args.latent}, batch {args.batch}, "
              f"{args.dtype}, {args.device} ({threads} threads), median of {args.repeats} rounds")
    print(format_rows(rows, header))
    return 0


def cmd_bench_prune_step(args) -> int:
    from .benchmarks.prune_step import format_result, run_prune_step_benchmark
    from .evaluation.demo import quiet_loading

    threads = _torch_threads(args.threads)
    with quiet_loading():
        result = run_prune_step_benchmark(args.model, args.batch, args.repeats, args.warmup)
    print(format_result(result, threads))
    return 0


def cmd_bench_throughput(args) -> int:
    from .benchmarks.throughput import format_result, run_throughput_benchmark
    from .evaluation.demo import quiet_loading

    threads = _torch_threads(args.threads)
    with quiet_loading():
        result = run_throughput_benchmark(args.pipeline, args.batch, args.steps, args.repeats, args.warmup,
                                          device=resolve_device(args.device, args.dtype))
    print(format_result(result, threads))
    return 0


def unet_folders(items: list[str] | None) -> dict[str, str]:
    """``NAME=FOLDER`` arguments as a dict."""
    folders = {}
    for item in items or []:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise APTPError(f"expected NAME=FOLDER for --unet, got {item!r}")
        folders[name] = folder
    return folders


def cmd_bench_frontier(args) -> int:
    from .benchmarks.frontier import format_frontier, run_frontier
    from .evaluation.demo import quiet_loading

    threads = _torch_threads(args.threads)
    folders = unet_folders(args.unet)
    pipeline = args.pipeline
    if args.demo:
        demo = Path(args.demo)
        pipeline = pipeline or str(demo / "pipeline")
        if not folders and (demo / "baselines" / "magnitude" / "model").is_dir():
            folders = {"magnitude": str(demo / "baselines" / "magnitude" / "model")}
    if not pipeline:
        raise APTPError("give --pipeline (an `aptp export` folder) or --demo (a finished demo folder)")
    with quiet_loading():
        result = run_frontier(pipeline, folders, args.out, args.steps, args.per_category, args.batch, args.repeats,
                              args.seed, device=resolve_device(args.device, args.dtype))
    print(format_frontier(result))
    print(f"written: {Path(args.out) / 'frontier.json'}, {Path(args.out) / 'frontier.png'} ({threads} torch threads)")
    return 0


def cmd_bench_memory(args) -> int:
    from .benchmarks.memory import format_rows, run_memory_benchmark
    from .pipelines.aptp import check_pipeline_folder

    check_pipeline_folder(args.pipeline)  # each count loads it in a fresh process: refuse a bad folder once, here
    rows = run_memory_benchmark(args.pipeline, tuple(args.counts), args.steps, args.max_batch_size, args.threads)
    print(format_rows(rows, args.steps, args.max_batch_size))
    return 0


def cmd_bench_fullsize(args) -> int:
    from .benchmarks.fullsize import format_rows, run_fullsize

    check_output_folder(args.out)
    rows = run_fullsize(args.config, args.out, args.resolution, args.threads, tuple(args.stages),
                        tuple(args.set or ()))
    print(format_rows(args.config, args.resolution, rows))
    return 0 if all(row["rc"] == 0 for row in rows) else 1


def cmd_bench_cache_memory(args) -> int:
    from .benchmarks.cache_memory import format_rows, run_cache_memory_benchmark

    if args.cache_dir:
        check_output_folder(args.cache_dir)
    rows = run_cache_memory_benchmark(tuple(args.sizes), args.conditioning, args.steps, args.batch, args.cache_dir,
                                      args.reader)
    print(format_rows(rows))
    return 0


# ---------------------------------------------------------------------------------------------
# aptp prune

BUILTIN_CONFIGS = {"world": "prune_world.yaml", "sd21": "prune_sd21.yaml"}


def resolve_config_path(name: str | None):
    """A built-in config name (``world``, ``sd21``) or a YAML path."""
    from importlib import resources

    if name in BUILTIN_CONFIGS:
        return resources.files("aptp") / "configs" / BUILTIN_CONFIGS[name]
    return name


def cmd_prune(args) -> int:
    from .config import parse_overrides
    from .evaluation.demo import quiet_loading
    from .training.prune import load_prune_config, run_prune

    overrides = parse_overrides(args.set)
    if args.output_dir:
        overrides["output_dir"] = args.output_dir
    path = resolve_config_path(args.config)
    try:
        config = load_prune_config(path, overrides)
    except UnicodeDecodeError as error:
        raise not_utf8(path, error) from None
    check_output_folder(config.output_dir)
    with quiet_loading():
        run_prune(config, args.overwrite)
    return 0


# ---------------------------------------------------------------------------------------------
# aptp assign / finetune / export / generate


def cmd_assign(args) -> int:
    from .evaluation.demo import quiet_loading
    from .training.assign import format_assign_summary, run_assign

    with quiet_loading():
        summary = run_assign(args.router, args.out, args.data, args.size,
                             device=resolve_device(args.device, args.dtype))
    print(format_assign_summary(summary))
    print(f"shards and summary written to {args.out}")
    return 0


def cmd_finetune(args) -> int:
    from .config import parse_overrides
    from .evaluation.demo import quiet_loading
    from .experts.run import load_run
    from .training.finetune import FinetuneConfig, read_shard, run_finetune

    overrides = parse_overrides(args.set)
    device, dtype = resolve_device(args.device, args.dtype)
    if args.dtype or (device.type == "cuda" and "mixed_precision" not in overrides):
        overrides["mixed_precision"] = MIXED_PRECISION_OF[str(dtype)]
    config = FinetuneConfig.from_dict(overrides)
    if args.all == (args.expert is not None):
        raise APTPError("give either --expert K or --all")
    check_output_folder(args.out)
    experts = range(load_run(args.router).router.num_codes) if args.all else [args.expert]
    for expert in experts:
        if args.all and not read_shard(args.assign, expert):
            print(f"expert {expert}: no prompts were routed to it; left as sliced")
            continue
        with quiet_loading():
            folder = run_finetune(args.router, args.assign, expert, args.out, config, args.overwrite, device)
        print(f"expert {expert} written to {folder}")
    return 0


def cmd_export(args) -> int:
    from .evaluation.demo import quiet_loading
    from .pipelines.build import build_pipeline
    from .utils import atomic_folder

    check_output_folder(args.out)
    with quiet_loading():
        pipeline = build_pipeline(args.router, args.experts, args.allow_untrained_experts)
    pipeline.to(dtype=torch_dtype(args.dtype or "fp32"))
    with atomic_folder(args.out) as folder:
        pipeline.save_pretrained(folder)
    print(f"APTPPipeline with {len(pipeline.experts)} experts written to {args.out}")
    return 0


def warn_untrained(pipeline, folder) -> None:
    if untrained := pipeline.experts.untrained():
        print(f"warning: expert(s) {', '.join(map(str, untrained))} of {folder} were never fine-tuned "
              "(exported with --allow-untrained-experts)", file=sys.stderr)


def read_prompts(prompts: list[str], prompts_file: str | None) -> list[str]:
    """Prompts from the command line and/or a file (one per line; blank lines are errors)."""
    collected = list(prompts or [])
    if prompts_file:
        try:
            lines = open(prompts_file, encoding="utf-8").read().splitlines()
        except OSError as error:
            raise APTPError(f"cannot read {prompts_file}: {error.strerror}") from None
        except UnicodeDecodeError as error:
            raise not_utf8(prompts_file, error) from None
        collected += [line for line in lines if line.strip()]
    if not collected:
        where = f"{prompts_file} holds none" if prompts_file else "pass them as arguments or with --prompts-file"
        raise APTPError(f"no prompts given ({where})")
    empty = [i for i, p in enumerate(collected) if not p.strip()]
    if empty:
        raise APTPError(f"empty prompt(s) at position(s) {empty}")
    return collected


def scheduler_name(value: str) -> str:
    from .pipelines.schedulers import scheduler_class

    try:
        scheduler_class(value)
    except APTPError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return value


def add_solver_arguments(parser) -> None:
    parser.add_argument("--scheduler", type=scheduler_name, help="sampling solver: a diffusers scheduler class (e.g. UniPCMultistepScheduler) "
                        "or ddim, dpm++, euler, euler-a, heun, unipc, pndm, ddpm (default: the pipeline's own)")
    parser.add_argument("--cache-interval", type=positive_int,
                        help="DeepCache: run the denoiser whole every N-th step, reuse its deep features in between "
                             "(default 1: every step whole)")


def cmd_generate(args) -> int:
    import torch
    from tqdm.auto import tqdm

    from .evaluation.demo import quiet_loading
    from .imaging import save_image_atomic
    from .pipelines import APTPPipeline
    from .pipelines.schedulers import use_scheduler
    from .utils import write_json_atomic

    prompts = read_prompts(args.prompts, args.prompts_file)
    out = check_output_folder(args.out)
    with quiet_loading():
        pipeline = APTPPipeline.from_pretrained(args.pipeline).to(*resolve_device(args.device, args.dtype))
    pipeline.set_progress_bar_config(disable=True)
    use_scheduler(pipeline, args.scheduler)
    resolution = args.resolution or pipeline.pruned_for.resolution
    pipeline.check_settings(args.steps, args.guidance_scale, resolution, resolution, "pil", args.batch_size)
    warn_untrained(pipeline, args.pipeline)
    limit = pipeline.family.text_length(pipeline)
    records = []
    for start in tqdm(range(0, len(prompts), args.batch_size), desc="generating", unit="batch"):
        batch = prompts[start:start + args.batch_size]
        seeds = [args.seed + start + i for i in range(len(batch))]
        result = pipeline(batch, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                          generator=[torch.Generator().manual_seed(s) for s in seeds],
                          cache_interval=args.cache_interval or 1, height=resolution, width=resolution)
        for i, (prompt, image) in enumerate(zip(batch, result.images)):
            tokens = len(pipeline.tokenizer(prompt).input_ids)
            file_name = f"{start + i:05d}.png"
            save_image_atomic(image, out / file_name)
            records.append({"file_name": file_name, "prompt": prompt, "seed": seeds[i], "expert": result.experts[i],
                            "macs": result.macs[i], "macs_fraction": result.macs_fraction[i],
                            "truncated": tokens > limit})
    truncated = sum(r["truncated"] for r in records)
    write_json_atomic(out / "routing.json", {"pipeline": str(args.pipeline), "steps": args.steps,
                                              "guidance_scale": args.guidance_scale, "resolution": resolution,
                                              "scheduler": type(pipeline.scheduler).__name__,
                                              "cache_interval": args.cache_interval or 1, "images": records})
    if truncated:
        print(f"warning: {truncated} prompt(s) exceed the text encoder's {limit} tokens and were truncated "
              "(see 'truncated' in routing.json)", file=sys.stderr)
    print(f"{len(records)} image(s) and routing.json written to {out}")
    return 0


# ---------------------------------------------------------------------------------------------
# aptp demo / baselines


def cmd_demo(args) -> int:
    from .config import parse_overrides
    from .evaluation.demo import demo_config, run_demo

    config = demo_config(args.output_dir, parse_overrides(args.set))
    check_output_folder(config.output_dir)
    report = run_demo(config, args.overwrite)
    print(f"report: {report}")
    return 0


def cmd_baselines(args) -> int:
    from .config import parse_overrides
    from .evaluation.demo import demo_config, evaluate_demo, quiet_loading, run_baselines

    config = demo_config(args.output_dir, parse_overrides(args.set))
    check_output_folder(config.output_dir)
    with quiet_loading():
        run_baselines(config)
        report = evaluate_demo(config)
    print(f"report: {report}")
    return 0


def cmd_ablation(args) -> int:
    from .config import parse_overrides
    from .evaluation.ablation import run_ablation

    overrides = parse_overrides(args.set)
    check_output_folder(args.output_dir)
    result = run_ablation(args.output_dir, args.variants, args.seeds, overrides)
    print(result["table"])
    print(f"summary written to {Path(args.output_dir) / 'ablation.json'}")
    return 0


def cmd_evaluate(args) -> int:
    from .config import parse_overrides
    from .evaluation.compare import EvalConfig, evaluate_folders
    from .evaluation.demo import quiet_loading

    folders = unet_folders(args.unet)
    if args.protocol == "paper":
        return _evaluate_paper(args, folders)
    if args.data or args.n or args.cmmd_clip:
        raise APTPError("--data, --n and --cmmd-clip belong to --protocol paper")
    settings = parse_overrides(args.set)
    if args.clip:
        settings["clip"] = args.clip
    settings.update({key: getattr(args, key) for key in ("scheduler", "cache_interval")
                     if getattr(args, key) is not None})
    config = EvalConfig.from_dict(settings)
    check_output_folder(args.out)
    with quiet_loading():
        report = evaluate_folders(args.pipeline, folders, config, args.out,
                                  device=resolve_device(args.device, args.dtype))
    print(f"report: {report}")
    return 0


def _evaluate_paper(args, folders: dict) -> int:
    from .config import config_from_dict, parse_overrides
    from .evaluation.demo import quiet_loading
    from .evaluation.paper import PaperProtocol, format_paper_metrics, run_paper_protocol

    if not args.data or not args.clip:
        raise APTPError("--protocol paper needs --data (coco:ROOT, cc3m:TSV:IMAGES or an imagefolder) and --clip "
                        "(a local CLIP ViT-B/32 folder; --cmmd-clip for CMMD's ViT-L/14@336)")
    if args.cache_interval:
        raise APTPError("--protocol paper samples every step whole (no --cache-interval)")
    settings = parse_overrides(args.set)
    settings.update({key: getattr(args, key) for key in ("n", "scheduler") if getattr(args, key)})
    protocol = config_from_dict(PaperProtocol, settings)  # unknown keys are errors
    check_output_folder(args.out)
    with quiet_loading():
        metrics = run_paper_protocol(args.pipeline, folders, args.data, args.out, args.clip, args.cmmd_clip,
                                     protocol, device=resolve_device(args.device, args.dtype))
    print(format_paper_metrics(metrics))
    print(f"metrics: {Path(args.out) / 'metrics.json'}")
    return 0


# ---------------------------------------------------------------------------------------------


def _config_class(module: str, name: str):
    import importlib

    return getattr(importlib.import_module(f"aptp.{module}"), name)


def _demo_keys() -> str:
    from .evaluation.demo import DemoConfig

    demo = DemoConfig()
    sections = describe_keys(("prune", _config_class("training.prune", "PruneConfig")),
                             ("finetune", _config_class("training.finetune", "FinetuneConfig")),
                             ("evaluation", _config_class("evaluation.compare", "EvalConfig")))
    return (f"{sections}\n  model: str = {demo.model}\n  seed: int = {demo.seed}\n"
            f"  baselines: list = {list(demo.baselines)}\n"
            f"  baseline_width: float | None = {demo.baseline_width} (magnitude and random: keep this fraction of "
            "every width instead of the mixture's MACs)\n"
            "the demo's own values, used unless --set overrides them: "
            + json.dumps({section: getattr(demo, section) for section in ("prune", "finetune", "evaluation")}))


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = Parser(prog="aptp", description="Prompt-based pruning of text-to-image diffusion models.")
    parser.add_argument("--version", action="version", version=f"aptp {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an unexpected error")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    inspect_parser = commands.add_parser("inspect", help="prunable units, parameters and MACs of a UNet")
    inspect_parser.add_argument("model", help="built-in config (tiny, sd15, sd21), a local UNet or pipeline folder, "
                                              "or a hub id when reachable")
    inspect_parser.add_argument("--resolution", type=positive_int, help="image size in pixels (none: the model's)")
    inspect_parser.add_argument("--text-length", type=positive_int, help="text tokens (none: the tokenizer's, 77)")
    inspect_parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    inspect_parser.set_defaults(func=cmd_inspect)

    bench = commands.add_parser("bench", help="benchmarks that print ratios side by side")
    benches = bench.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    benches.required = True
    slicing = benches.add_parser("slicing", help="latency of sliced experts vs the dense UNet")
    slicing.add_argument("--config", default="sd21", help="built-in config")
    slicing.add_argument("--latent", type=positive_int, default=64, help="latent size")
    slicing.add_argument("--batch", type=positive_int, default=1, help="batch size")
    slicing.add_argument("--dtype", default="fp32", choices=DTYPES, help="weights and inputs")
    slicing.add_argument("--device", default="cpu", help="torch device")
    slicing.add_argument("--targets", type=fraction, nargs="+", default=[0.8, 0.6, 0.4],
                         help="expert sizes as fractions of dense MACs")
    slicing.add_argument("--repeats", type=positive_int, default=5, help="timed runs per model")
    slicing.add_argument("--warmup", type=non_negative_int, default=1, help="untimed runs first")
    slicing.add_argument("--threads", type=non_negative_int, default=0, help="torch threads (0: torch's choice)")
    slicing.set_defaults(func=cmd_bench_slicing)
    step = benches.add_parser("prune-step", help="pruning-phase step time vs a dense fine-tuning step")
    step.add_argument("--model", default="world", help="'world' or a Stable Diffusion pipeline folder")
    step.add_argument("--batch", type=positive_int, default=32, help="batch size")
    step.add_argument("--repeats", type=positive_int, default=10, help="timed steps")
    step.add_argument("--warmup", type=non_negative_int, default=2, help="untimed steps first")
    step.add_argument("--threads", type=non_negative_int, default=0, help="torch threads (0: torch's choice)")
    step.set_defaults(func=cmd_bench_prune_step)
    throughput = benches.add_parser("throughput", help="APTPPipeline vs its dense base pipeline, images/s")
    throughput.add_argument("--pipeline", required=True, help="folder written by `aptp export`")
    throughput.add_argument("--batch", type=positive_int, default=64, help="prompts per call")
    throughput.add_argument("--steps", type=positive_int, default=25, help="denoising steps")
    throughput.add_argument("--repeats", type=positive_int, default=3, help="timed calls per model")
    throughput.add_argument("--warmup", type=non_negative_int, default=1, help="untimed calls first")
    throughput.add_argument("--threads", type=non_negative_int, default=0, help="torch threads (0: torch's choice)")
    add_device_arguments(throughput)
    throughput.set_defaults(func=cmd_bench_throughput)

    frontier = benches.add_parser(
        "frontier", help="quality vs images/s: the mixture against fewer steps, other solvers, feature caching "
                         "and sliced baselines")
    frontier.add_argument("--pipeline", help="an APTPPipeline folder (`aptp export`)")
    frontier.add_argument("--demo", help="a finished demo folder: its pipeline and magnitude baseline")
    frontier.add_argument("--unet", nargs="*", metavar="NAME=FOLDER",
                          help="sliced UNet folders to compare, e.g. magnitude=runs/demo/baselines/magnitude/model")
    add_output_argument(frontier, default="runs/frontier", help="folder for frontier.json and frontier.png")
    frontier.add_argument("--steps", type=positive_int, default=20, help="the reference step count")
    frontier.add_argument("--per-category", type=positive_int, default=32,
                          help="world test prompts per category for accuracy and FID")
    frontier.add_argument("--batch", type=positive_int, default=32, help="prompts per timed call")
    frontier.add_argument("--repeats", type=positive_int, default=3, help="timed rounds (after one warm-up round)")
    frontier.add_argument("--seed", type=int, default=0, help="seed of the test prompts and their noise")
    frontier.add_argument("--threads", type=non_negative_int, default=0, help="torch threads (0: torch's choice)")
    add_device_arguments(frontier)
    frontier.set_defaults(func=cmd_bench_frontier)

    memory = benches.add_parser("memory", help="APTPPipeline peak memory, few prompts vs many")
    memory.add_argument("--pipeline", required=True, help="folder written by `aptp export`")
    memory.add_argument("--counts", type=positive_int, nargs="+", default=[64, 1000], help="prompt counts")
    memory.add_argument("--steps", type=positive_int, default=2, help="denoising steps")
    memory.add_argument("--max-batch-size", type=positive_int, default=DEFAULT_MAX_BATCH_SIZE,
                        help="APTPPipeline max_batch_size (the default is the pipeline's)")
    memory.add_argument("--threads", type=non_negative_int, default=0, help="torch threads (0: torch's choice)")
    memory.set_defaults(func=cmd_bench_memory)
    cache_memory = benches.add_parser("cache-memory", help="peak memory of pruning's data reads, small vs large "
                                                           "encoded cache")
    cache_memory.add_argument("--sizes", type=positive_int, nargs="+", default=[5000, 50000],
                              help="records per synthetic cache")
    cache_memory.add_argument("--conditioning", choices=["sd21", "world"], default="sd21",
                              help="conditioning shape per prompt: sd21 77x1024 or world 32x384 (fp16)")
    cache_memory.add_argument("--steps", type=positive_int, default=1000, help="batches read")
    cache_memory.add_argument("--batch", type=positive_int, default=32, help="rows per batch")
    cache_memory.add_argument("--cache-dir", help="keep the synthetic caches here (reused by a later run); "
                                                 "default: a temporary folder")
    cache_memory.add_argument("--reader", choices=["rows", "mmap"], default="rows",
                              help="rows: aptp's positioned reads; mmap: safetensors' memory maps, for comparison")
    cache_memory.set_defaults(func=cmd_bench_cache_memory)

    from .benchmarks.fullsize import STAGES as FULLSIZE_STAGES

    fullsize = benches.add_parser("fullsize", help="a published architecture with random weights through prune, "
                                                   "assign, finetune, export and generate: time and peak memory")
    fullsize.add_argument("--config", required=True, choices=["sd15", "sd21", "sdxl", "pixart-sigma"],
                          help="built-in config")
    add_output_argument(fullsize, required=True, help="working folder (the random pipeline is kept and reused)")
    fullsize.add_argument("--resolution", type=positive_int, default=256, help="pixels (reduced to fit a CPU)")
    fullsize.add_argument("--threads", type=non_negative_int, default=0, help="torch threads (0: torch's choice)")
    fullsize.add_argument("--stages", nargs="+", choices=FULLSIZE_STAGES, default=list(FULLSIZE_STAGES),
                          help="stages to run (export allows experts that were not fine-tuned)")
    fullsize.add_argument("--set", nargs="*", metavar="KEY=VALUE",
                          help="override pruning settings, e.g. budget=0.15 (see `aptp prune --help`)")
    fullsize.set_defaults(func=cmd_bench_fullsize)

    prune = commands.add_parser("prune", help="train the prompt router and K expert codes under a MACs budget",
                                keys=lambda: describe_keys(("", _config_class("training.prune", "PruneConfig"))))
    prune.add_argument("--config", default="world", help="YAML config, or a built-in one: world, sd21")
    prune.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="override config keys, e.g. budget=0.5")
    add_output_argument(prune, dest="output_dir", help="output folder (none: the config's output_dir)")
    add_overwrite_argument(prune)
    prune.set_defaults(func=cmd_prune)

    assign = commands.add_parser("assign", help="route every prompt of a dataset; write per-expert shards")
    assign.add_argument("--router", required=True, help="router folder written by `aptp prune`")
    add_output_argument(assign, required=True)
    assign.add_argument("--data", help="data source (none: the router's training data)")
    assign.add_argument("--size", type=positive_int, help="number of captioned images (none: the router's)")
    add_device_arguments(assign)
    assign.set_defaults(func=cmd_assign)

    finetune = commands.add_parser("finetune", help="fine-tune sliced experts on their own prompts",
                                   keys=lambda: describe_keys(("", _config_class("training.finetune",
                                                                                 "FinetuneConfig"))))
    finetune.add_argument("--router", required=True, help="router folder written by `aptp prune`")
    finetune.add_argument("--assign", required=True, help="folder written by `aptp assign`")
    add_output_argument(finetune, required=True, help="experts folder (expert-K inside)")
    finetune.add_argument("--expert", type=non_negative_int, help="expert index (an independent job per expert)")
    finetune.add_argument("--all", action="store_true", help="fine-tune every expert, one after another")
    finetune.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="override options, e.g. steps=200")
    add_overwrite_argument(finetune)
    add_device_arguments(finetune)
    finetune.set_defaults(func=cmd_finetune)

    export = commands.add_parser("export", help="assemble a servable APTPPipeline folder")
    export.add_argument("--router", required=True, help="router folder written by `aptp prune`")
    export.add_argument("--experts", help="folder of fine-tuned experts (expert-K from `aptp finetune`)")
    export.add_argument("--allow-untrained-experts", action="store_true",
                        help="export experts without a fine-tuned folder as they are sliced from the base model")
    add_output_argument(export, required=True, help="pipeline folder")
    add_device_arguments(export, device=False)
    export.set_defaults(func=cmd_export)

    generate = commands.add_parser("generate", help="generate images with an APTPPipeline")
    generate.add_argument("prompts", nargs="*", help="prompts (or --prompts-file)")
    generate.add_argument("--pipeline", required=True, help="folder written by `aptp export`")
    generate.add_argument("--prompts-file", help="a text file with one prompt per line")
    add_output_argument(generate, required=True, help="images folder")
    generate.add_argument("--steps", type=positive_int, default=25, help="denoising steps")
    generate.add_argument("--guidance-scale", type=non_negative_float, default=4.0, help="classifier-free guidance")
    generate.add_argument("--seed", type=int, default=0, help="prompt i uses seed SEED + i")
    generate.add_argument("--batch-size", type=positive_int, default=32, help="prompts per pipeline call")
    generate.add_argument("--resolution", type=positive_int,
                          help="image height and width in pixels (none: the resolution the experts were pruned at)")
    add_solver_arguments(generate)
    add_device_arguments(generate)
    generate.set_defaults(func=cmd_generate)

    demo = commands.add_parser("demo", help="the whole method on the embedded world, with baselines and a report",
                               keys=_demo_keys)
    add_output_argument(demo, dest="output_dir", default="runs/demo")
    demo.add_argument("--set", nargs="*", metavar="KEY=VALUE",
                      help="override options, e.g. prune.steps=100 finetune.steps=20 evaluation.per_category=16")
    add_overwrite_argument(demo)
    demo.set_defaults(func=cmd_demo)

    baselines = commands.add_parser("baselines", help="static / magnitude / random baselines at the mixture's MACs",
                                    keys=_demo_keys)
    add_output_argument(baselines, dest="output_dir", default="runs/demo", help="a demo folder with a finished mixture")
    baselines.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="same options as `aptp demo`")
    baselines.set_defaults(func=cmd_baselines)

    from .evaluation.ablation import VARIANTS

    ablation = commands.add_parser("ablation", help="the demo with each change of the method off, over several seeds",
                                   keys=_demo_keys)
    add_output_argument(ablation, dest="output_dir", default="runs/ablation")
    ablation.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                          help="which changes to switch off")
    ablation.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="one demo run per seed")
    ablation.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="options of every demo run, as for `aptp demo`")
    ablation.set_defaults(func=cmd_ablation)

    evaluate = commands.add_parser(
        "evaluate", help="dense base vs APTPPipeline vs sliced UNets on the world test prompts, with a report",
        keys=lambda: describe_keys(("", _config_class("evaluation.compare", "EvalConfig"))))
    evaluate.add_argument("--pipeline", required=True, help="an APTPPipeline folder (`aptp export`)")
    evaluate.add_argument("--unet", nargs="*", metavar="NAME=FOLDER",
                          help="more UNet folders of the same base model, e.g. static=runs/demo/baselines/static/model")
    evaluate.add_argument("--clip", help="a local CLIPModel folder for CLIP score and CMMD (none: both are skipped)")
    add_output_argument(evaluate, default="runs/evaluate", help="report folder")
    evaluate.add_argument("--protocol", choices=("world", "paper"), default="world",
                          help="world: the embedded world's test prompts; paper: the published protocol on real "
                               "captions (--data, N captions, PNDM 25 steps, 256 px, FID, CLIP score, CMMD)")
    evaluate.add_argument("--data", help="--protocol paper: coco:ROOT[:SPLIT], cc3m:TSV:IMAGES or an imagefolder")
    evaluate.add_argument("--n", type=positive_int, help="--protocol paper: captions (default 30000)")
    evaluate.add_argument("--cmmd-clip", help="--protocol paper: the CLIP folder of CMMD (default: --clip)")
    evaluate.add_argument("--set", nargs="*", metavar="KEY=VALUE",
                          help="override options, e.g. per_category=16 (paper: n, steps, scheduler, "
                               "guidance_scale, batch_size, seed)")
    add_solver_arguments(evaluate)
    add_device_arguments(evaluate)
    evaluate.set_defaults(func=cmd_evaluate)

    # Each folder owns its command group.
    add_world_parser(commands)
    add_teacher_parser(commands)
    return parser


def main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # transformers warns at import about optional image backends (torchvision) this tool never uses.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, --version, or a usage error (its line is printed)
        return stop.code if isinstance(stop.code, int) else 0
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("aptp: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`
        sys.stderr.close()
        return 0
    except Exception as error:
        if args.debug and not isinstance(error, APTPError):
            raise
        message, code = describe_error(error)
        print(f"aptp: error: {' '.join(message.split())}", file=sys.stderr)  # one line, always
        return code


def describe_error(error: Exception) -> tuple[str, int]:
    """One line and an exit code: 2 for what the user can fix (bad input, files, disk), 1 for the rest."""
    if isinstance(error, APTPError):
        return str(error), 2
    if isinstance(error, OSError):  # missing or unreadable files, permissions, a full disk
        where = f": {error.filename}" if error.filename else ""
        return f"{error.strerror or error}{where}", 2
    if isinstance(error, UnicodeDecodeError):
        return f"a text file is not UTF-8 ({error.reason} at byte {error.start})", 2
    if isinstance(error, json.JSONDecodeError):
        return f"a JSON file is damaged ({error.msg}, line {error.lineno})", 2
    return f"unexpected {type(error).__name__}: {error_summary(error)} (run `aptp --debug ...` for the traceback)", 1


if __name__ == "__main__":
    sys.exit(main())
