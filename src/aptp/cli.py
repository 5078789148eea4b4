"""The ``aptp`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .teacher.cli import add_teacher_parser
from .utils import APTPError
from .world.cli import add_world_parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text}")
    return value


# ---------------------------------------------------------------------------------------------
# aptp inspect


def cmd_inspect(args) -> int:
    from .costs import count_parameters
    from .families import family_of
    from .families.sources import resolve_source

    source = resolve_source(args.model)
    resolution = args.resolution or source.default_resolution
    if resolution % source.vae_scale_factor:
        raise APTPError(f"resolution {resolution} is not a multiple of the VAE scale factor {source.vae_scale_factor}")
    latent = resolution // source.vae_scale_factor
    text_length = args.text_length or source.text_length
    unet = source.build_meta_unet()
    family = family_of(unet)
    model = family.build_macs_model(unet, (latent, latent), text_length)
    params = count_parameters(unet)
    attention = model.dense_attention
    published = family.build_macs_model(unet, (latent, latent), text_length, cross_attention_as_self=True).dense
    if args.json:
        print(json.dumps({
            "model": source.description, "family": family.NAME, "parameters": params,
            "resolution": resolution, "latent": latent, "text_length": text_length,
            "macs": model.dense, "macs_without_attention_matmuls": model.dense - attention,
            "fixed_macs": model.fixed, "macs_cross_attention_as_self": published, "units": model.unit_table(),
        }, indent=2))
        return 0
    print(source.description)
    print(f"  family              {family.NAME}")
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


# ---------------------------------------------------------------------------------------------
# aptp bench


def cmd_bench_slicing(args) -> int:
    import torch

    from .benchmarks.slicing import format_rows, run_slicing_benchmark

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run_slicing_benchmark(args.config, args.latent, args.batch, args.dtype, args.device, args.targets,
                                 args.repeats, args.warmup)
    header = (f"aptp bench slicing --config {args.config}: latent {args.latent}x{args.latent}, batch {args.batch}, "
              f"{args.dtype}, {args.device} ({torch.get_num_threads()} threads), median of {args.repeats} rounds")
    print(format_rows(rows, header))
    return 0


def cmd_bench_prune_step(args) -> int:
    import torch

    from .benchmarks.prune_step import format_result, run_prune_step_benchmark

    if args.threads:
        torch.set_num_threads(args.threads)
    result = run_prune_step_benchmark(args.model, args.batch, args.repeats, args.warmup)
    print(format_result(result, torch.get_num_threads()))
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
    from .training.prune import load_prune_config, run_prune

    overrides = parse_overrides(args.set)
    if args.output_dir:
        overrides["output_dir"] = args.output_dir
    config = load_prune_config(resolve_config_path(args.config), overrides)
    run_prune(config)
    return 0


# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="aptp", description="Prompt-based pruning of text-to-image diffusion models.")
    parser.add_argument("--version", action="version", version=f"aptp {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    inspect_parser = commands.add_parser("inspect", help="prunable units, parameters and MACs of a UNet")
    inspect_parser.add_argument("model", help="built-in config (tiny, sd15, sd21), a local UNet or pipeline folder, "
                                              "or a hub id when reachable")
    inspect_parser.add_argument("--resolution", type=_positive_int, help="image size in pixels (default: the model's)")
    inspect_parser.add_argument("--text-length", type=_positive_int, help="text tokens (default: the tokenizer's, 77)")
    inspect_parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    inspect_parser.set_defaults(func=cmd_inspect)

    bench = commands.add_parser("bench", help="benchmarks that print ratios side by side")
    benches = bench.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    benches.required = True
    slicing = benches.add_parser("slicing", help="latency of sliced experts vs the dense UNet")
    slicing.add_argument("--config", default="sd21", help="built-in config (default sd21)")
    slicing.add_argument("--latent", type=_positive_int, default=64, help="latent size (default 64)")
    slicing.add_argument("--batch", type=_positive_int, default=1)
    slicing.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    slicing.add_argument("--device", default="cpu")
    slicing.add_argument("--targets", type=_fraction, nargs="+", default=[0.8, 0.6, 0.4],
                         help="expert sizes as fractions of dense MACs")
    slicing.add_argument("--repeats", type=_positive_int, default=5)
    slicing.add_argument("--warmup", type=int, default=1)
    slicing.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    slicing.set_defaults(func=cmd_bench_slicing)
    step = benches.add_parser("prune-step", help="pruning-phase step time vs a dense fine-tuning step")
    step.add_argument("--model", default="world", help="'world' or a Stable Diffusion pipeline folder")
    step.add_argument("--batch", type=_positive_int, default=32)
    step.add_argument("--repeats", type=_positive_int, default=10)
    step.add_argument("--warmup", type=int, default=2)
    step.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    step.set_defaults(func=cmd_bench_prune_step)

    prune = commands.add_parser("prune", help="train the prompt router and K expert codes under a MACs budget")
    prune.add_argument("--config", default="world",
                       help="YAML config, or a built-in one: world (default), sd21")
    prune.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="override config keys, e.g. budget=0.5")
    prune.add_argument("--output-dir", help="output folder (overrides the config's output_dir)")
    prune.set_defaults(func=cmd_prune)

    # Each folder owns its command group.
    add_world_parser(commands)
    add_teacher_parser(commands)
    return parser


def main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # transformers warns at import about optional image backends (torchvision) this tool never uses.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except APTPError as error:
        print(f"aptp: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("aptp: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
