"""CLIP score (Hessel et al. 2021) and CMMD (Jayasumana et al. 2024) from a local CLIP folder.

No CLIP weights can be downloaded by this project; point ``clip_path`` at a local
``CLIPModel`` folder (e.g. openai/clip-vit-base-patch32 for CLIP score, clip-vit-large-patch14-336
for CMMD as published).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..utils import APTPError

CMMD_SIGMA = 10.0
CMMD_SCALE = 1000.0
CLIP_SCORE_SCALE = 100.0


class CLIPEmbedder:
    """Unit-length CLIP image and text embeddings from a local ``CLIPModel`` folder."""

    def __init__(self, clip_path: str | Path | None, device: str | torch.device = "cpu", batch_size: int = 32):
        if not clip_path:
            raise APTPError("CLIP score and CMMD need a local CLIP model folder (--clip PATH); none was given")
        if not Path(clip_path).is_dir():
            raise APTPError(f"no CLIP model folder at {clip_path}")
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        try:
            self.model = CLIPModel.from_pretrained(clip_path).to(device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(clip_path)
            self.processor = CLIPImageProcessor.from_pretrained(clip_path)
        except Exception as error:
            raise APTPError(f"cannot load a CLIP model from {clip_path}: {error}") from None
        self.device = device
        self.batch_size = batch_size

    @torch.no_grad()
    def images(self, images: torch.Tensor) -> torch.Tensor:
        """Float images in [0, 1], (N, 3, H, W) -> (N, D)."""
        outputs = []
        for start in range(0, len(images), self.batch_size):
            batch = images[start:start + self.batch_size].float().clamp(0, 1)
            pixels = self.processor(images=list(batch), return_tensors="pt", do_rescale=False).pixel_values
            outputs.append(self.model.get_image_features(pixel_values=pixels.to(self.device)))
        return F.normalize(torch.cat([_features(o) for o in outputs]).float().cpu(), dim=-1)

    @torch.no_grad()
    def texts(self, prompts: list[str]) -> torch.Tensor:
        outputs = []
        for start in range(0, len(prompts), self.batch_size):
            tokens = self.tokenizer(prompts[start:start + self.batch_size], padding=True, truncation=True,
                                    return_tensors="pt").to(self.device)
            outputs.append(self.model.get_text_features(**tokens))
        return F.normalize(torch.cat([_features(o) for o in outputs]).float().cpu(), dim=-1)


def _features(output) -> torch.Tensor:
    # transformers 5 may return a model output object instead of a tensor
    return output if torch.is_tensor(output) else output.pooler_output


def clip_score(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> float:
    """Mean of 100 * max(cos(image, text), 0) over matching pairs."""
    cosine = (F.normalize(image_embeddings, dim=-1) * F.normalize(text_embeddings, dim=-1)).sum(-1)
    return float(CLIP_SCORE_SCALE * cosine.clamp(min=0).mean())


def cmmd(real: torch.Tensor, generated: torch.Tensor, sigma: float = CMMD_SIGMA) -> float:
    """MMD^2 with a Gaussian RBF kernel between two sets of CLIP embeddings, x 1000 (as published)."""
    gamma = 1.0 / (2 * sigma ** 2)
    x, y = real.double(), generated.double()

    def kernel_mean(a, b):
        distances = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.t()
        return torch.exp(-gamma * distances).mean()

    return float(CMMD_SCALE * (kernel_mean(x, x) + kernel_mean(y, y) - 2 * kernel_mean(x, y)))
