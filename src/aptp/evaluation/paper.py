"""``aptp evaluate --protocol paper``: the published APTP evaluation on real captioned images.

For N captions (MS-COCO 2014: one caption of each of N unique images; CC3M or an imagefolder: the first N
pairs), every model (the dense base model, the mixture, any sliced UNets) generates at the resolution it
was pruned at with PNDM, 25 steps and the pipeline's default guidance (7.5); images are downsampled to 256 px;
FID against the N real images (centre-cropped, 256 px), CLIP score (×100) and CMMD (MMD² of CLIP image
embeddings, σ = 10, ×1000) from local CLIP folders. N, the resize and the protocol go into ``metrics.json``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from ..base_model import load_base_pipeline
from ..data import load_cc3m, load_coco, load_imagefolder
from ..metrics.clip import CLIPEmbedder, clip_score, cmmd
from ..metrics.fid import FrechetDistance
from ..pipelines import APTPPipeline
from ..pipelines.schedulers import use_scheduler
from ..utils import APTPError, check_output_folder, write_json_atomic
from .compare import load_unet_folder, mixture_candidate, sample, single_unet_candidate

SIZE = 256  # what the published numbers compare at
PAPER_GUIDANCE = 7.5  # StableDiffusionPipeline's default


@dataclass(frozen=True)
class PaperProtocol:
    n: int = 30000
    steps: int = 25
    scheduler: str = "pndm"
    guidance_scale: float = PAPER_GUIDANCE
    batch_size: int = 8
    seed: int = 0


def captioned_records(data: str, n: int):
    """The first ``n`` caption-image pairs of ``coco:ROOT[:SPLIT]`` (one caption per image, val2014 by
    default), ``cc3m:TSV:IMAGES`` or an imagefolder."""
    kind, _, rest = data.partition(":")
    if kind == "coco" and rest:
        root, _, split = rest.partition(":")
        report = load_coco(root, split or "val2014", one_caption_per_image=True)
    elif kind == "cc3m" and ":" in rest:
        tsv, _, images = rest.partition(":")
        report = load_cc3m(tsv, images)
    else:
        report = load_imagefolder(data)
    if len(report.records) < 2:
        raise APTPError(f"{data}: need at least two captioned images, found {len(report.records)}")
    return report.records[:n], report.summary()


def to_256(image: PIL.Image.Image) -> torch.Tensor:
    """Centre crop to a square, bicubic (PIL, as clean-fid resizes) to 256 px; (3, 256, 256) in [0, 1]."""
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.convert("RGB").crop((left, top, left + side, top + side))
    if side != SIZE:
        image = image.resize((SIZE, SIZE), PIL.Image.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


def _generated_to_256(images: torch.Tensor) -> torch.Tensor:
    pils = [PIL.Image.fromarray((i.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
            for i in images]
    return torch.stack([to_256(p) for p in pils])


def run_paper_protocol(pipeline_dir: str | Path, unet_folders: dict, data: str, out: str | Path, clip: str,
                       cmmd_clip: str | None = None, protocol: PaperProtocol | None = None,
                       device: tuple | None = None) -> dict:
    """Evaluate dense, mixture and sliced UNets on real captions; write ``metrics.json``; return it."""
    protocol = protocol or PaperProtocol()
    device, dtype = device or ("cpu", torch.float32)
    out = check_output_folder(out)
    records, loaded = captioned_records(data, protocol.n)
    clip_embedder = CLIPEmbedder(clip, device)  # missing CLIP folders fail before any generation
    cmmd_embedder = CLIPEmbedder(cmmd_clip, device) if cmmd_clip and cmmd_clip != clip else clip_embedder
    real, captions, unreadable = [], [], 0
    for record in records:
        try:
            with PIL.Image.open(record.image) as image:
                real.append(to_256(image))
            captions.append(record.caption)
        except (OSError, ValueError):
            unreadable += 1
    if len(real) < 2:
        raise APTPError(f"{data}: fewer than two readable images among the first {len(records)}")
    real = torch.stack(real)
    mixture = APTPPipeline.from_pretrained(pipeline_dir).to(device, dtype)
    mixture.set_progress_bar_config(disable=True)
    use_scheduler(mixture, protocol.scheduler)
    family, pruned_for = mixture.family, mixture.pruned_for
    base = load_base_pipeline(pruned_for.base_model, device, dtype)
    dense = family.denoiser(base)
    dense_macs = family.measure_macs(dense, pruned_for.latent_size, pruned_for.text_length)
    candidates = [single_unet_candidate("dense", base, dense, 1.0, protocol.scheduler),
                  mixture_candidate("APTP", mixture)]
    for name, folder in unet_folders.items():
        unet = load_unet_folder(folder, dense, family).to(device, dtype)
        fraction = family.measure_macs(unet, pruned_for.latent_size, pruned_for.text_length) / dense_macs
        candidates.append(single_unet_candidate(name, base, unet, fraction, protocol.scheduler))
    fid = FrechetDistance(real)
    real_cmmd = cmmd_embedder.images(real)
    texts = clip_embedder.texts(captions)
    models = {}
    for candidate in candidates:
        fake, fractions, _, elapsed = sample(candidate, captions, protocol.batch_size, protocol.seed, protocol.steps,
                                             protocol.guidance_scale, _generated_to_256)
        models[candidate.name] = {"fid": fid(fake), "clip_score": clip_score(clip_embedder.images(fake), texts),
                                  "cmmd": cmmd(real_cmmd, cmmd_embedder.images(fake)),
                                  "macs_fraction": sum(fractions) / len(fractions),
                                  "images_per_s": len(captions) / elapsed}
    metrics = {
        "protocol": {"name": "paper", **asdict(protocol), "n_images": len(captions), "data": data,
                     "data_loaded": loaded, "unreadable_images_skipped": unreadable,
                     "generation_resolution": pruned_for.resolution,
                     "fid": f"{len(captions)} real images, centre-cropped and PIL-bicubic to {SIZE} px, generated "
                            f"images PIL-bicubic to {SIZE} px; TF FID Inception (bilinear to 299 px)",
                     "clip_score": f"{clip} (x100)", "cmmd": f"{cmmd_clip or clip} (sigma 10, x1000)"},
        "device": f"{device} {dtype}",
        "models": models,
    }
    write_json_atomic(out / "metrics.json", metrics)
    return metrics


def format_paper_metrics(metrics: dict) -> str:
    protocol = metrics["protocol"]
    lines = [f"paper protocol: {protocol['n_images']} captions of {protocol['data']}, {protocol['scheduler']} "
             f"{protocol['steps']} steps, guidance {protocol['guidance_scale']}, {SIZE} px",
             f"  {'model':<14}{'MACs':>7}{'FID':>9}{'CLIP score':>12}{'CMMD':>9}"]
    for name, row in metrics["models"].items():
        lines.append(f"  {name:<14}{row['macs_fraction']:>7.3f}{row['fid']:>9.2f}{row['clip_score']:>12.2f}"
                     f"{row['cmmd']:>9.3f}")
    return "\n".join(lines)
