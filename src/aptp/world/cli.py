"""The ``aptp world`` command: ``export`` a split as an imagefolder, or ``preview`` samples as a PNG grid."""

from __future__ import annotations

import argparse
from pathlib import Path

from aptp.utils import APTPError, check_output_folder
from aptp.world import generator

DEFAULT_EXPORT_N = 200


def add_world_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``world export`` and ``world preview`` on an argparse ``subparsers`` object."""
    world = subparsers.add_parser("world", help="the built-in procedural captioned-image dataset")
    commands = world.add_subparsers(dest="world_command", required=True, metavar="{export,preview}")

    export = commands.add_parser("export", help="write a split as PNGs + metadata.jsonl (imagefolder layout)")
    export.add_argument("out", metavar="OUT", type=Path, help="output directory (must not exist or be empty)")
    export.add_argument("--n", type=int, default=DEFAULT_EXPORT_N, help="number of images")
    add_split_and_seed(export)
    export.set_defaults(func=run_export)

    preview = commands.add_parser("preview", help="write a PNG grid with a few samples of each category")
    preview.add_argument("out", metavar="OUT", type=Path, help="output PNG file")
    preview.add_argument(
        "--per-category", type=int, default=generator.PREVIEW_PER_CATEGORY,
        help="samples per category row",
    )  # fmt: skip
    preview.add_argument(
        "--scale", type=int, default=generator.PREVIEW_SCALE, help="upscaling of each image"
    )
    add_split_and_seed(preview)
    preview.set_defaults(func=run_preview)
    return world


def add_split_and_seed(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--split", choices=generator.SPLITS, default="train", help="whose prompts to draw"
    )
    parser.add_argument("--seed", type=int, default=0, help="generator seed")


def run_export(args: argparse.Namespace) -> int:
    check_output_folder(args.out)
    out_dir = generator.export_imagefolder(args.out, args.n, args.split, args.seed)
    print(f"wrote {args.n} {args.split} images (seed {args.seed}) + metadata.jsonl to {out_dir}")
    return 0


def run_preview(args: argparse.Namespace) -> int:
    if args.out.is_dir():
        raise APTPError(f"{args.out} is a directory; give a PNG file path")
    check_output_folder(args.out.parent)
    grid = generator.preview_grid(args.per_category, args.split, args.seed, args.scale)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.out, format="PNG")
    print(
        f"wrote a {len(generator.CATEGORIES)}x{args.per_category} preview grid of {args.split} samples "
        f"(seed {args.seed}) to {args.out}"
    )
    return 0
