"""``PromptRouter``: prompt embedding -> architecture embedding -> code -> per-unit gates.

* The predictor (an MLP) maps a frozen sentence embedding ``z`` to an architecture embedding ``e``.
* ``K`` learnable codes live in the same space; prompt ``i`` and code ``k`` have score
  ``cos(e_i, a_k)``. Training assigns prompts with Sinkhorn; inference takes the argmax.
* The hypernetwork maps each code to one gate logit per unit element; gate probability is
  ``sigmoid((logit + offset) / T)``, and training samples relaxed-Bernoulli gates with hard 0/1
  values in the forward pass (straight-through).
* The gates a prompt's UNet pass uses are ``w_i @ code_gates`` with ``w_i`` the one-hot of its
  assigned code plus the straight-through gradient of ``softmax(scores_i / tau)``: the task losses
  reach the predictor, not only the codes.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..units import WIDTH_KINDS, Architecture, UnitLayout, round_kept
from .clustering import spherical_kmeans

MAX_CODES = 1024  # more experts than any model could hold in memory
MAX_WIDTH = 65536


class PromptRouter(ModelMixin, ConfigMixin):
    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        units: Sequence[dict] = (),
        num_codes: int = 8,
        prompt_dim: int = 384,
        arch_dim: int = 128,
        hidden_dim: int = 256,
        hyper_hidden_dim: int = 256,
        gate_offset: float = 3.0,
        score_temperature: float = 0.1,
        prompt_encoder: str = "all-MiniLM-L6-v2",
        metadata: dict | None = None,
        min_width: dict[str, float] | None = None,
    ):
        super().__init__()
        # A config read from a folder is untrusted: absurd sizes would try to allocate terabytes.
        for name, value, largest in (("num_codes", num_codes, MAX_CODES), ("prompt_dim", prompt_dim, MAX_WIDTH),
                                     ("arch_dim", arch_dim, MAX_WIDTH), ("hidden_dim", hidden_dim, MAX_WIDTH),
                                     ("hyper_hidden_dim", hyper_hidden_dim, MAX_WIDTH)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= largest:
                raise ValueError(f"{name} must be an integer in [1, {largest}], got {value!r}")
        self.layout = UnitLayout.from_dict(units)
        if self.layout.num_elements == 0:
            raise ValueError("a router needs at least one prunable unit")
        self.floors = width_floors(self.layout, min_width)
        self.predictor = nn.Sequential(nn.Linear(prompt_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, arch_dim))
        codes = torch.randn(num_codes, arch_dim)
        self.codes = nn.Parameter(F.normalize(codes, dim=1))
        self.hypernet = nn.Sequential(nn.Linear(arch_dim, hyper_hidden_dim), nn.GELU(),
                                      nn.Linear(hyper_hidden_dim, self.layout.num_elements))
        # Start with every gate open: logits = offset, sigmoid(offset) close to 1.
        nn.init.zeros_(self.hypernet[-1].weight)
        nn.init.zeros_(self.hypernet[-1].bias)

    @property
    def num_codes(self) -> int:
        return self.codes.shape[0]

    def forward(self, prompt_embeddings: torch.Tensor, temperature: float = 1.0,
                generator: torch.Generator | None = None, noise_scale: float = 1.0) -> dict[str, torch.Tensor]:
        """One training pass (call it through the Accelerate/DDP wrapper so gradients are synchronised):
        architecture embeddings ``arch`` (B, d), ``scores`` (B, K) and sampled ``code_gates`` (K, U)."""
        arch = self.embed(prompt_embeddings)
        return {"arch": arch, "scores": self.scores(arch),
                "code_gates": self.sample_gates(temperature, generator, noise_scale)}

    # -- routing --------------------------------------------------------------------------------

    def embed(self, prompt_embeddings: torch.Tensor) -> torch.Tensor:
        """Architecture embeddings ``e`` (B, d), unit length."""
        return F.normalize(self.predictor(prompt_embeddings.to(self.codes.dtype)), dim=1)

    def scores(self, arch_embeddings: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of every prompt to every code, (B, K)."""
        return arch_embeddings @ F.normalize(self.codes, dim=1).t()

    @torch.no_grad()
    def cluster_codes(self, prompt_embeddings: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Move the codes to the spherical k-means centroids of the prompts' architecture embeddings, so
        each code starts on a cluster the prompts form (random codes can split one cluster over two
        codes and merge two others)."""
        arch = self.embed(prompt_embeddings.to(self.codes.device))
        self.codes.copy_(spherical_kmeans(arch.float().cpu(), self.num_codes, generator).to(self.codes))

    @torch.no_grad()
    def route(self, prompt_embeddings: torch.Tensor) -> torch.Tensor:
        """Expert index per prompt (argmax score): deterministic, independent of the batch."""
        return self.scores(self.embed(prompt_embeddings)).argmax(dim=1)

    def mix(self, scores: torch.Tensor, assignment: torch.Tensor, code_gates: torch.Tensor) -> torch.Tensor:
        """Per-prompt gates (B, U): the assigned code's gates in value, with gradients into the scores."""
        probabilities = F.softmax(scores / self.config.score_temperature, dim=1)
        one_hot = F.one_hot(assignment, self.num_codes).to(probabilities.dtype)
        weights = one_hot + (probabilities - probabilities.detach())  # exactly one-hot in value
        return weights @ code_gates

    # -- gates ----------------------------------------------------------------------------------

    def gate_logits(self) -> torch.Tensor:
        """Gate logits of every code, (K, U)."""
        return self.hypernet(F.normalize(self.codes, dim=1)) + self.config.gate_offset

    def gate_probabilities(self, temperature: float = 1.0) -> torch.Tensor:
        return torch.sigmoid(self.gate_logits() / temperature)

    def sample_gates(self, temperature: float = 1.0, generator: torch.Generator | None = None,
                     noise_scale: float = 1.0) -> torch.Tensor:
        """Relaxed-Bernoulli gates (K, U): hard 0/1 in value, soft in gradient.

        ``noise_scale`` scales the logistic noise: 1 samples Bernoulli(p) gates, 0 gives exactly the
        deterministic architecture that :meth:`expert_architectures` materialises (before rounding).
        The highest-logit elements that a unit's width floor keeps are always open; their gradient still
        flows, so the task losses keep ranking every element.
        """
        logits = self.gate_logits()
        # Drawn on the CPU so a CPU generator gives the same noise on any device.
        uniform = torch.rand(logits.shape, generator=generator, dtype=torch.float32).to(logits.device, logits.dtype)
        uniform = uniform.clamp(1e-6, 1 - 1e-6)
        noise = (torch.log(uniform) - torch.log1p(-uniform)) * noise_scale
        soft = torch.sigmoid((logits + noise) / temperature)
        kept = self.floor_mask(logits)
        hard = ((soft > 0.5) | kept).to(soft.dtype)
        return hard + (soft - soft.detach())  # exactly 0/1 in value

    def floor_mask(self, logits: torch.Tensor) -> torch.Tensor:
        """(K, U) bool: the elements each unit's width floor keeps open (its highest logits)."""
        mask = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
        for name, minimum in self.floors.items():
            part = self.layout.slice_of(name)
            top = logits[:, part].detach().topk(minimum, dim=1).indices + part.start
            mask.scatter_(1, top, True)
        return mask

    # -- experts --------------------------------------------------------------------------------

    @torch.no_grad()
    def expert_architectures(self, channel_multiple: int = 8) -> list[Architecture]:
        """The deterministic architecture of every code: threshold its gate probabilities at 0.5."""
        probabilities = self.gate_probabilities().float().cpu()
        return [materialize(probabilities[k], self.layout, channel_multiple, self.floors)
                for k in range(self.num_codes)]


def width_floors(layout: UnitLayout, min_width: dict[str, float] | None) -> dict[str, int]:
    """Fewest elements each width unit keeps: ``min_width[kind]`` of its elements, rounded up to a
    hardware-friendly size; kinds not named have no floor."""
    min_width = dict(min_width or {})
    for kind, fraction in min_width.items():
        if kind not in WIDTH_KINDS:
            raise ValueError(f"min_width: unknown width kind {kind!r}; choose from {', '.join(WIDTH_KINDS)}")
        if not 0 <= float(fraction) <= 1:
            raise ValueError(f"min_width[{kind!r}] must be in [0, 1], got {fraction}")
    floors = {}
    for unit in layout:
        fraction = float(min_width.get(unit.kind, 0.0))
        if fraction > 0 and not unit.is_depth:
            floors[unit.name] = round_kept(unit, math.ceil(fraction * unit.count - 1e-9))
    return floors


def materialize(probabilities: torch.Tensor, layout: UnitLayout, channel_multiple: int = 8,
                floors: dict[str, int] | None = None) -> Architecture:
    """Architecture from one code's gate probabilities (U,): a depth unit stays if p > 0.5; a width
    unit keeps as many elements as have p > 0.5 (rounded to hardware-friendly sizes, at least one and at
    least its floor), choosing the most probable ones."""
    architecture: Architecture = {}
    floors = floors or {}
    for unit in layout:
        p = probabilities[layout.slice_of(unit.name)]
        if unit.is_depth:
            architecture[unit.name] = [0] if p[0] > 0.5 else []
            continue
        kept = max(round_kept(unit, int((p > 0.5).sum()), channel_multiple, up=False), floors.get(unit.name, 0))
        architecture[unit.name] = sorted(torch.topk(p, kept).indices.tolist())
    return architecture
