"""A small CNN that reads a world image's attributes back, and the world-accuracy score built on it.

:class:`WorldEvaluator` is a convolutional trunk with one classification head per attribute slot
(shape, color, background, count, word, shape1, color1, relation, shape2, color2). An image is
scored only on the slots of its prompt's category: :func:`world_accuracy` is the fraction of the
prompt's attributes that the evaluator recovers from the image.

For ``two`` scenes the slots are read in canonical form: "B right of A" is scored as "A left of B",
since both prompts describe the same picture.

Images are a list of PIL images or a float tensor ``(N, 3, H, W)`` with values in ``[0, 1]``
(map ``[-1, 1]`` outputs with ``(x + 1) / 2`` first); other sizes are resized to 64x64.

The trained weights ship in ``weights/`` (fp16 safetensors). Retrain them with
``python -m aptp.world.evaluator train``, which also measures and records held-out test accuracy.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save
from torch import nn
from tqdm import tqdm

from aptp.utils import APTPError
from aptp.world import generator
from aptp.world.generator import ATTRIBUTE_KEYS, IMAGE_SIZE, WorldSample, canonical_attributes, category_of

WEIGHTS_DIR = Path(__file__).parent / "weights"
WEIGHTS_FILE = "evaluator.safetensors"
CONFIG_FILE = "evaluator_config.json"
METRICS_FILE = "evaluator_metrics.json"

# Class labels of each head, in logit order.
HEADS: dict[str, tuple] = {
    "shape": generator.SHAPES,
    "color": generator.COLORS,
    "background": generator.BACKGROUNDS,
    "count": generator.COUNTS,
    "word": generator.WORDS,
    "shape1": generator.SHAPES,
    "color1": generator.COLORS,
    "relation": tuple(r for r in generator.RELATIONS if r not in generator.MIRRORED_RELATIONS),
    "shape2": generator.SHAPES,
    "color2": generator.COLORS,
}
# Conv widths per resolution stage (64, 32, 16, 8 px), with 2x max-pooling between stages.
STAGES = ((16,), (32,), (64, 64), (128,))
HIDDEN = 192
POOLED_SIZE = 4

TRAIN_STEPS = 2000
TRAIN_BATCH = 64
TRAIN_LR = 2e-3
TRAIN_WEIGHT_DECAY = 1e-4
LABEL_SMOOTHING = 0.05
TRAIN_SEED = 0
EVAL_BATCH = 128
TEST_PER_CATEGORY = 500
TEST_SEED = 1
IGNORE = -100

# Augmentation ranges: enough to cover the colour casts, softness and grain of generated images
# while keeping neighbouring palette colours (red/orange, orange/yellow) apart.
CHANNEL_GAIN = 0.07
BRIGHTNESS_SHIFT = 0.05
CONTRAST_RANGE = (0.85, 1.15)
BLUR_PROBABILITY = 0.5
BLUR_SIGMA = (0.3, 1.1)
BLUR_KERNEL = 5
NOISE_STD_MAX = 0.05


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class WorldEvaluator(nn.Module):
    """Shared conv trunk + one linear head per attribute slot; input ``(N, 3, 64, 64)`` in ``[0, 1]``."""

    def __init__(
        self, heads: dict[str, Sequence] = HEADS, stages: Sequence[Sequence[int]] = STAGES, hidden: int = HIDDEN
    ):
        super().__init__()
        self.labels = {name: tuple(labels) for name, labels in heads.items()}
        self.stages, self.hidden = tuple(tuple(widths) for widths in stages), hidden
        layers, previous = [], 3
        for index, widths in enumerate(self.stages):
            if index:
                # Max-pooling (rather than strided convs) lets small shapes and thin strokes survive downsampling;
                # with strided convs the shape and word heads barely learned in the same number of steps.
                layers.append(nn.MaxPool2d(2))
            for width in widths:
                layers.append(conv_block(previous, width))
                previous = width
        # Pooling to a small grid instead of 1x1 keeps where things are, which relation and
        # shape1/shape2 (the left/top object vs the other) depend on.
        layers += [nn.AdaptiveAvgPool2d(POOLED_SIZE), nn.Flatten(), nn.Linear(previous * POOLED_SIZE**2, hidden)]
        self.trunk = nn.Sequential(*layers, nn.ReLU(inplace=True))
        self.heads = nn.ModuleDict({name: nn.Linear(hidden, len(labels)) for name, labels in self.labels.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.trunk(images * 2 - 1)
        return {name: head(features) for name, head in self.heads.items()}

    def config(self) -> dict:
        return {"image_size": IMAGE_SIZE, "stages": [list(widths) for widths in self.stages], "hidden": self.hidden,
                "heads": {name: list(labels) for name, labels in self.labels.items()}}  # fmt: skip

    @torch.no_grad()
    def predict(self, images, batch_size: int = EVAL_BATCH) -> list[dict]:
        """Every slot's predicted label for each image (irrelevant slots included)."""
        batch = to_tensor(images)
        was_training = self.training
        self.eval()
        predictions = []
        for chunk in batch.split(batch_size):
            indices = {name: logits.argmax(1).tolist() for name, logits in self(chunk).items()}
            predictions += [
                {name: self.labels[name][idx[i]] for name, idx in indices.items()} for i in range(len(chunk))
            ]
        self.train(was_training)
        return predictions


def to_tensor(images) -> torch.Tensor:
    """A float ``(N, 3, 64, 64)`` batch in ``[0, 1]`` from PIL images or a ``[0, 1]`` tensor of any size."""
    if isinstance(images, torch.Tensor):
        batch = images.detach().float().cpu()
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise APTPError(f"expected an image tensor of shape (N, 3, H, W), got {tuple(batch.shape)}")
        if batch.numel() and (batch.min() < -1e-3 or batch.max() > 1 + 1e-3):
            raise APTPError("image tensor values must be in [0, 1]; map [-1, 1] images with (x + 1) / 2")
        batch = batch.clamp(0, 1)
    else:
        arrays = [np.asarray(pil_to_rgb64(image)) for image in images]
        if not arrays:
            return torch.zeros(0, 3, IMAGE_SIZE, IMAGE_SIZE)
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
    if batch.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        batch = F.interpolate(batch, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True).clamp(0, 1)
    return batch.contiguous(memory_format=torch.channels_last)


def pil_to_rgb64(image: Image.Image) -> Image.Image:
    image = image.convert("RGB")
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
    return image


def target_attributes(target: WorldSample | dict) -> dict:
    """The canonical attributes a target asks for (a sample or a plain attribute dict)."""
    attributes = target.attributes if isinstance(target, WorldSample) else dict(target)
    category_of(attributes)  # rejects attribute sets that belong to no category
    return canonical_attributes(attributes)


# ---------------------------------------------------------------------------------------------
# Scoring.


def attribute_matches(images, targets: Sequence[WorldSample | dict], evaluator: WorldEvaluator | None = None):
    """For each image: its category and ``{attribute: recovered?}`` over its prompt's attributes."""
    if len(images) != len(targets):
        raise APTPError(f"got {len(images)} images but {len(targets)} prompts/attribute sets")
    evaluator = evaluator if evaluator is not None else default_evaluator()
    wanted = [target_attributes(t) for t in targets]
    predicted = evaluator.predict(images)
    return [
        (category_of(want), {key: got[key] == value for key, value in want.items()})
        for want, got in zip(wanted, predicted)
    ]


def attribute_accuracy(images, targets, evaluator: WorldEvaluator | None = None) -> dict[str, float]:
    """Per ``"category/attribute"``: the fraction of images where the evaluator recovers that attribute."""
    hits = defaultdict(list)
    for category, matches in attribute_matches(images, targets, evaluator):
        for key, hit in matches.items():
            hits[f"{category}/{key}"].append(hit)
    order = [f"{c}/{k}" for c, keys in ATTRIBUTE_KEYS.items() for k in keys]
    return {name: float(np.mean(hits[name])) for name in order if name in hits}


def world_accuracy(images, targets, evaluator: WorldEvaluator | None = None) -> dict[str, float]:
    """Per category: mean fraction of each prompt's attributes recovered from its image; plus ``overall``.

    ``images``: list of PIL images or a float tensor ``(N, 3, H, W)`` in ``[0, 1]``. ``targets``: the
    matching :class:`WorldSample` objects or attribute dicts. ``overall`` averages the categories
    present, so a skewed category mix does not tilt it.
    """
    per_image = defaultdict(list)
    for category, matches in attribute_matches(images, targets, evaluator):
        per_image[category].append(np.mean(list(matches.values())))
    scores = {c: float(np.mean(per_image[c])) for c in generator.CATEGORIES if c in per_image}
    scores["overall"] = float(np.mean(list(scores.values()))) if scores else float("nan")
    return scores


# ---------------------------------------------------------------------------------------------
# Loading and saving.


def load_evaluator(weights_dir: str | Path = WEIGHTS_DIR) -> WorldEvaluator:
    """The evaluator stored in ``weights_dir`` (default: the weights shipped with the package), in eval mode."""
    weights_dir = Path(weights_dir)
    config_path, weights_path = weights_dir / CONFIG_FILE, weights_dir / WEIGHTS_FILE
    if not config_path.is_file() or not weights_path.is_file():
        raise APTPError(f"no evaluator in {weights_dir}: expected {CONFIG_FILE} and {WEIGHTS_FILE}")
    config = json.loads(config_path.read_text())
    expected = {name: list(labels) for name, labels in HEADS.items()}
    if config["heads"] != expected or config["image_size"] != IMAGE_SIZE:
        raise APTPError(f"evaluator in {weights_dir} was trained on a different world vocabulary; retrain it")
    model = WorldEvaluator(config["heads"], config["stages"], config["hidden"])
    model.load_state_dict(load_file(weights_path))
    model.to(memory_format=torch.channels_last)
    return model.eval().requires_grad_(False)


@lru_cache(maxsize=1)
def default_evaluator() -> WorldEvaluator:
    return load_evaluator()


def save_evaluator(model: WorldEvaluator, weights_dir: str | Path = WEIGHTS_DIR) -> Path:
    """Store the weights as fp16 safetensors plus a JSON config; returns the weights path."""
    weights_dir = Path(weights_dir)
    weights_dir.mkdir(parents=True, exist_ok=True)
    state = {
        name: (tensor.half() if tensor.is_floating_point() else tensor).contiguous()
        for name, tensor in model.state_dict().items()
    }
    # Writing the bytes ourselves (not save_file) gives the file normal permissions rather than owner-only.
    (weights_dir / WEIGHTS_FILE).write_bytes(save(state))
    (weights_dir / CONFIG_FILE).write_text(json.dumps(model.config(), indent=2) + "\n")
    return weights_dir / WEIGHTS_FILE


# ---------------------------------------------------------------------------------------------
# Training.


def label_tensor(samples: Sequence[WorldSample]) -> torch.Tensor:
    """``(N, heads)`` class indices, IGNORE where a slot does not apply to the sample's category."""
    labels = torch.full((len(samples), len(HEADS)), IGNORE, dtype=torch.long)
    for row, world_sample in enumerate(samples):
        attributes = canonical_attributes(world_sample.attributes)
        for col, (name, classes) in enumerate(HEADS.items()):
            if name in attributes:
                labels[row, col] = classes.index(attributes[name])
    return labels


def augment(batch: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """Random colour cast, contrast, brightness, Gaussian blur and noise, per image."""
    n = len(batch)

    def uniform(low, high, *shape):
        return torch.rand(n, *shape, 1, 1, generator=rng) * (high - low) + low

    mean = batch.mean(dim=(1, 2, 3), keepdim=True)
    batch = (batch - mean) * uniform(*CONTRAST_RANGE, 1) + mean
    batch = batch * uniform(1 - CHANNEL_GAIN, 1 + CHANNEL_GAIN, 3) + uniform(-BRIGHTNESS_SHIFT, BRIGHTNESS_SHIFT, 1)

    sigma = uniform(*BLUR_SIGMA, 1).view(n)
    sigma = torch.where(torch.rand(n, generator=rng) < BLUR_PROBABILITY, sigma, torch.full_like(sigma, 1e-3))
    offsets = torch.arange(BLUR_KERNEL, dtype=torch.float32) - BLUR_KERNEL // 2
    kernel_1d = torch.exp(-(offsets**2) / (2 * sigma[:, None] ** 2))
    kernel_1d = kernel_1d / kernel_1d.sum(1, keepdim=True)
    # One depthwise conv over the whole batch: each (image, channel) plane gets its image's kernel.
    kernels = (kernel_1d[:, :, None] * kernel_1d[:, None, :]).repeat_interleave(3, 0)[:, None]
    planes = F.pad(batch.reshape(1, n * 3, IMAGE_SIZE, IMAGE_SIZE), [BLUR_KERNEL // 2] * 4, mode="replicate")
    batch = F.conv2d(planes, kernels, groups=n * 3).view(n, 3, IMAGE_SIZE, IMAGE_SIZE)

    noise = torch.randn(batch.shape, generator=rng) * uniform(0, NOISE_STD_MAX, 1)
    return (batch + noise).clamp(0, 1).contiguous(memory_format=torch.channels_last)


def train_evaluator(
    steps: int = TRAIN_STEPS,
    batch_size: int = TRAIN_BATCH,
    lr: float = TRAIN_LR,
    seed: int = TRAIN_SEED,
    progress: bool = True,
) -> WorldEvaluator:
    """Train a fresh evaluator on a stream of new augmented train-split samples; returns it in eval mode."""
    if steps <= 0 or batch_size <= 0:
        raise APTPError(f"steps and batch size must be > 0, got {steps} and {batch_size}")
    torch.manual_seed(seed)
    rng = torch.Generator().manual_seed(seed)
    model = WorldEvaluator().to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=TRAIN_WEIGHT_DECAY)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    stream = generator.iter_samples("train", seed)
    model.train()
    bar = tqdm(range(steps), desc="train evaluator", disable=not progress)
    for _ in bar:
        samples = [next(stream) for _ in range(batch_size)]
        images = augment(to_tensor([s.image for s in samples]), rng)
        labels = label_tensor(samples)
        logits = model(images)
        losses, correct, total = [], 0, 0
        for col, name in enumerate(HEADS):
            target = labels[:, col]
            mask = target != IGNORE
            if mask.any():
                losses.append(F.cross_entropy(logits[name][mask], target[mask], label_smoothing=LABEL_SMOOTHING))
                correct += int((logits[name][mask].argmax(1) == target[mask]).sum())
                total += int(mask.sum())
        loss = torch.stack(losses).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", slot_acc=f"{correct / total:.3f}")
    return model.eval()


def measure(evaluator: WorldEvaluator, per_category: int = TEST_PER_CATEGORY, seed: int = TEST_SEED) -> dict:
    """Held-out test-split accuracy per attribute and per category, on clean images, on the same images
    degraded by the training augmentation, and on random noise (what an unreadable image scores)."""
    samples = generator.generate(per_category * len(generator.CATEGORIES), "test", seed)
    images = to_tensor([s.image for s in samples])
    degraded = augment(images, torch.Generator().manual_seed(seed))
    noise = torch.rand(images.shape, generator=torch.Generator().manual_seed(seed))
    return {
        "test_images": len(samples),
        "test_seed": seed,
        "attribute_accuracy": attribute_accuracy(images, samples, evaluator),
        "world_accuracy": world_accuracy(images, samples, evaluator),
        "degraded_world_accuracy": world_accuracy(degraded, samples, evaluator),
        "noise_world_accuracy": world_accuracy(noise, samples, evaluator),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aptp.world.evaluator", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train on one CPU thread, save fp16 weights, measure test accuracy")
    train.add_argument("--steps", type=int, default=TRAIN_STEPS)
    train.add_argument("--batch-size", type=int, default=TRAIN_BATCH)
    train.add_argument("--lr", type=float, default=TRAIN_LR)
    train.add_argument("--seed", type=int, default=TRAIN_SEED)
    train.add_argument("--out", type=Path, default=WEIGHTS_DIR, help="weights directory (default: the package's)")
    commands.add_parser("measure", help="measure the shipped weights on held-out test images")
    args = parser.parse_args(argv)
    # One thread: the reported training time is single-core, and parallel jobs keep their cores.
    torch.set_num_threads(1)
    if args.command == "measure":
        print(json.dumps(measure(load_evaluator()), indent=2))
        return 0
    start = time.perf_counter()
    model = train_evaluator(args.steps, args.batch_size, args.lr, args.seed)
    seconds = time.perf_counter() - start
    weights_path = save_evaluator(model, args.out)
    # Measure the stored fp16 weights, i.e. exactly what ships.
    metrics = measure(load_evaluator(args.out))
    metrics.update(
        training_seconds=round(seconds, 1), torch_threads=torch.get_num_threads(), steps=args.steps,
        batch_size=args.batch_size, train_seed=args.seed, lr=args.lr,
        parameters=sum(p.numel() for p in model.parameters()), weights_bytes=weights_path.stat().st_size,
    )  # fmt: skip
    (args.out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
