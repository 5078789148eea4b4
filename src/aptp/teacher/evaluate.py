"""Quality of a world text-to-image pipeline: world accuracy per category, FID, and a sample grid.

Generated images are compared with the real world images of the same test prompts: the
evaluator's accuracy on the real images is reported beside the pipeline's, as its ceiling.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import world
from ..imaging import comparison_grid, save_image_atomic, to_pil
from ..metrics.fid import frechet_inception_distance
from ..utils import APTPError, write_json_atomic
from .train import images_to_tensor


@dataclass
class SamplingConfig:
    steps: int = 25
    guidance_scale: float = 4.0
    batch_size: int = 64
    seed: int = 0


@torch.no_grad()
def generate_images(pipeline, prompts: list[str], config: SamplingConfig | None = None,
                    desc: str = "sampling") -> torch.Tensor:
    """Images in [0, 1], (N, 3, H, W); prompt ``i`` always uses seed ``config.seed + i``."""
    config = config or SamplingConfig()
    if not prompts:
        raise APTPError("no prompts to sample")
    outputs = []
    for start in tqdm(range(0, len(prompts), config.batch_size), desc=desc, unit="batch"):
        batch = prompts[start:start + config.batch_size]
        generators = [torch.Generator().manual_seed(config.seed + start + i) for i in range(len(batch))]
        result = pipeline(prompt=batch, num_inference_steps=config.steps, guidance_scale=config.guidance_scale,
                          generator=generators, output_type="pt")
        outputs.append(result.images.float().cpu())
    return torch.cat(outputs)


def evaluate_pipeline(pipeline, out: str | Path, per_category: int = 128, sampling: SamplingConfig | None = None,
                      grid_per_category: int = 4, name: str = "teacher") -> dict:
    """World accuracy per category and FID of ``pipeline`` on the test prompts; writes metrics + grid."""
    sampling = sampling or SamplingConfig()
    if per_category < 1:
        raise APTPError(f"per_category must be >= 1, got {per_category}")
    out = Path(out)
    samples = world.generate(per_category * len(world.CATEGORIES), "test", seed=sampling.seed)
    prompts = [s.prompt for s in samples]
    real = (images_to_tensor(s.image for s in samples) + 1) / 2
    fake = generate_images(pipeline, prompts, sampling, desc=f"sampling {name}")
    metrics = {
        "model": name,
        "n_images": len(samples),
        "resolution": int(fake.shape[-1]),
        "sampling": asdict(sampling),
        "world_accuracy": world.world_accuracy(fake, samples),
        "world_accuracy_real_images": world.world_accuracy(real, samples),
        "word_accuracy": world.attribute_accuracy(fake, samples).get("text/word", float("nan")),
        "word_accuracy_real_images": world.attribute_accuracy(real, samples).get("text/word", float("nan")),
        "fid": frechet_inception_distance(real, fake),
        "fid_reference": f"{len(samples)} real world test images of the same prompts, 64 px, "
                         "bilinear upsampling to 299 px, TF FID Inception",
    }
    write_json_atomic(out / "metrics.json", metrics)
    rows = []
    for category in world.CATEGORIES:
        rows += [i for i, s in enumerate(samples) if s.category == category][:grid_per_category]
    grid = comparison_grid([prompts[i] for i in rows], {
        "ground truth": [samples[i].image for i in rows],
        name: to_pil(fake[rows]),
    })
    save_image_atomic(grid, out / "grid.png")
    return metrics
