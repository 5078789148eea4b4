"""Latency of sliced experts against the dense UNet, timed interleaved in one run.

``aptp bench slicing --config sd21``: a UNet of a built-in config with random weights, experts at
about the given fractions of dense MACs (uniform width pruning), each timed for one forward at a
fixed latent size. Rounds alternate dense and experts so drift of the machine hits all alike; the
latency ratio of an expert is the median over rounds of (expert time / dense time in that round).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..config import resolve_device
from ..costs import count_parameters
from ..families import family_named
from ..families.presets import PRESETS
from ..units import uniform_width_architecture
from ..utils import APTPError
from . import synchronize

TOLERANCE = 0.05  # target: latency ratio <= MACs ratio + TOLERANCE


@dataclass
class Row:
    name: str
    params: int
    macs: float
    macs_ratio: float
    seconds: float
    latency_ratio: float


def _time_once(model, inputs, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    model(**inputs)
    synchronize(device)
    return time.perf_counter() - start


def run_slicing_benchmark(config: str = "sd21", latent: int = 64, batch: int = 1, dtype: str = "fp32",
                          device: str = "cpu", targets=(0.8, 0.6, 0.4), repeats: int = 5, warmup: int = 1,
                          seed: int = 0) -> list[Row]:
    if config not in PRESETS:
        raise APTPError(f"unknown config {config!r}; choose from {', '.join(PRESETS)}")
    dev, weights_dtype = resolve_device(device, dtype)
    if any(not 0 < t <= 1 for t in targets):
        raise APTPError(f"targets must lie in (0, 1], got {list(targets)}")
    if repeats < 1 or latent < 8 or batch < 1:
        raise APTPError("repeats and batch must be >= 1 and latent >= 8")
    preset = PRESETS[config]
    family = family_named(preset.family)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    # Build directly in the benchmark dtype (half precision only where the device computes in it).
    torch.set_default_dtype(weights_dtype if dev.type != "cpu" or dtype == "fp32" else torch.float32)
    try:
        with torch.device(dev):
            dense = family.denoiser_class.from_config(preset.config)
    finally:
        torch.set_default_dtype(previous)
    if next(dense.parameters()).dtype != weights_dtype:
        dense = dense.to(weights_dtype)
    dense.eval()
    macs_model = family.build_macs_model(dense, (latent, latent), preset.text_length)
    models = {"dense": dense}
    for target in targets:
        architecture = uniform_width_architecture(macs_model, target)
        models[f"expert@{target:g}"] = family.slice(dense, architecture).eval()
    macs = {name: family.build_macs_model(m, (latent, latent), preset.text_length).dense for name, m in models.items()}

    inputs = family.example_inputs(dense, (latent, latent), preset.text_length, batch=batch)
    seconds: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for _ in range(warmup):
            for model in models.values():
                _time_once(model, inputs, dev)
        for _ in tqdm(range(repeats), desc=f"timing {len(models)} models", unit="round"):
            for name, model in models.items():
                seconds[name].append(_time_once(model, inputs, dev))

    rows = []
    for name, model in models.items():
        ratios = [s / d for s, d in zip(seconds[name], seconds["dense"])]
        rows.append(Row(name, count_parameters(model), macs[name], macs[name] / macs["dense"],
                        statistics.median(seconds[name]), statistics.median(ratios)))
    return rows


def format_rows(rows: list[Row], header: str) -> str:
    lines = [header,
             f"{'model':<13}{'params':>10}{'GMACs':>10}{'MACs ratio':>12}{'latency':>12}{'latency ratio':>15}  target",
             "-" * 80]
    for row in rows:
        verdict = "" if row.name == "dense" else (
            "met" if row.latency_ratio <= row.macs_ratio + TOLERANCE else "MISSED")
        lines.append(f"{row.name:<13}{row.params / 1e6:>9.1f}M{row.macs / 1e9:>10.1f}{row.macs_ratio:>12.3f}"
                     f"{row.seconds * 1e3:>10.1f}ms{row.latency_ratio:>15.3f}  {verdict}")
    lines.append(f"target: latency ratio <= MACs ratio + {TOLERANCE}")
    return "\n".join(lines)
