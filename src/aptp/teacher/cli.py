"""``aptp teacher``: train, sample and evaluate the embedded world teacher."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import (
    add_output_argument,
    add_overwrite_argument,
    config_from_dict,
    describe_keys,
    non_negative_float,
    parse_overrides,
    positive_int,
)
from ..utils import APTPError, check_output_folder


def _training_config(cls, overrides: dict):
    """A stage's training options; counts that would train nothing (or crash) are refused."""
    config = config_from_dict(cls, overrides)
    for name in ("steps", "batch_size", "checkpoint_every"):
        if getattr(config, name) < 1:
            raise APTPError(f"{name} must be >= 1, got {getattr(config, name)}")
    return config


def run_train(args) -> int:
    from .train import UNetTrainConfig, VAETrainConfig, train_unet, train_vae

    out = check_output_folder(args.out)
    overrides = parse_overrides(args.set)
    if overrides and args.stage == "all":
        raise APTPError("--set applies to one stage (their options differ): give --stage vae or --stage unet")
    # Every option is checked before the first stage starts.
    vae_config = _training_config(VAETrainConfig, overrides if args.stage == "vae" else {})
    unet_config = _training_config(UNetTrainConfig, overrides if args.stage == "unet" else {})
    vae = Path(args.vae) if args.vae else out / "vae"
    if args.stage == "unet" and not (vae / "config.json").is_file():
        raise APTPError(f"no trained VAE at {vae}; run `aptp teacher train --stage vae --out {out}` first")
    if args.stage in ("vae", "all"):
        train_vae(out, vae_config, args.overwrite)
    if args.stage in ("unet", "all"):
        train_unet(out, vae, unet_config, args.overwrite)
        print(f"teacher written to {out / 'teacher'}")
    return 0


def _sampling(args):
    from .evaluate import SamplingConfig

    return SamplingConfig(steps=args.steps, guidance_scale=args.guidance_scale, seed=args.seed)


def run_sample(args) -> int:
    from ..imaging import save_image_atomic, to_pil
    from .components import load_teacher
    from .evaluate import generate_images

    prompts = [p.strip() for p in args.prompts]
    if any(not p for p in prompts):
        raise APTPError("empty prompt")
    check_output_folder(args.out)
    images = to_pil(generate_images(load_teacher(args.teacher), prompts, _sampling(args)))
    out = Path(args.out)
    for i, image in enumerate(images):
        save_image_atomic(image, out / f"{i:04d}.png")
    print(f"{len(images)} image(s) written to {out}")
    return 0


def run_evaluate(args) -> int:
    from .components import load_teacher
    from .evaluate import evaluate_pipeline

    check_output_folder(args.out)
    metrics = evaluate_pipeline(load_teacher(args.teacher), args.out, args.per_category, _sampling(args),
                                name=args.name)
    accuracy = metrics["world_accuracy"]
    real = metrics["world_accuracy_real_images"]
    print(f"{metrics['model']}: FID {metrics['fid']:.1f} (N={metrics['n_images']}, {metrics['resolution']} px)")
    for category in accuracy:
        print(f"  world accuracy {category:<8} {accuracy[category]:.3f}   (real images {real[category]:.3f})")
    print(f"  words read back         {metrics['word_accuracy']:.3f}   (real images "
          f"{metrics['word_accuracy_real_images']:.3f})")
    print(f"metrics and grid written to {args.out}")
    return 0


def _add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", help="teacher pipeline folder (none: the shipped teacher)")
    parser.add_argument("--steps", type=positive_int, default=25, help="DDIM steps")
    parser.add_argument("--guidance-scale", type=non_negative_float, default=4.0, help="classifier-free guidance")
    parser.add_argument("--seed", type=int, default=0, help="prompt i uses seed SEED + i")
    add_output_argument(parser, required=True)


def _train_keys() -> str:
    from .train import UNetTrainConfig, VAETrainConfig

    return (describe_keys(("", VAETrainConfig)).replace("--set keys", "--set keys of --stage vae")
            + "\n" + describe_keys(("", UNetTrainConfig)).replace("--set keys", "--set keys of --stage unet"))


def add_teacher_parser(subparsers) -> argparse.ArgumentParser:
    teacher = subparsers.add_parser("teacher", help="the embedded world teacher (tiny Stable Diffusion)")
    commands = teacher.add_subparsers(dest="teacher_command", metavar="COMMAND")
    commands.required = True

    train = commands.add_parser("train", help="train the VAE, then the UNet, from scratch (resumable)",
                                keys=_train_keys)
    train.add_argument("--stage", choices=["vae", "unet", "all"], default="all", help="what to train")
    add_output_argument(train, required=True, help="run folder (checkpoints, caches, vae/, teacher/)")
    train.add_argument("--vae", help="trained VAE folder for --stage unet (none: OUT/vae)")
    train.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="override training options, e.g. steps=500")
    add_overwrite_argument(train)
    train.set_defaults(func=run_train)

    sample = commands.add_parser("sample", help="generate images for prompts")
    sample.add_argument("prompts", nargs="+", help="prompts")
    _add_sampling_arguments(sample)
    sample.set_defaults(func=run_sample)

    evaluate = commands.add_parser("evaluate", help="world accuracy, FID and a grid on the test prompts")
    _add_sampling_arguments(evaluate)
    evaluate.add_argument("--per-category", type=positive_int, default=128,
                          help="test prompts per category")
    evaluate.add_argument("--name", default="teacher", help="label in metrics and grid")
    evaluate.set_defaults(func=run_evaluate)
    return teacher
