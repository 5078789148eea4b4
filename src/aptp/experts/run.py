"""A finished pruning run as one typed object: the router, what it was pruned for, and every expert's
architecture and MACs. Export, the pipeline, evaluation, baselines and fine-tuning read runs through
:func:`load_run`; nothing else parses ``experts.json`` or the router's metadata."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..base_model import load_base_pipeline
from ..config import UnitOptions
from ..families import ModelFamily, family_named
from ..routing import PromptRouter
from ..units import Architecture, MacsModel
from ..utils import APTPError, error_summary, read_json

EXPERTS_FILE = "experts.json"


@dataclass(frozen=True)
class PrunedFor:
    """What a router was pruned for (its config's ``metadata``)."""

    base_model: str
    family: str
    resolution: int
    latent_size: tuple[int, int]
    text_length: int
    budget: float
    unit_options: UnitOptions
    dense_macs: float

    def to_dict(self) -> dict:
        return {"base_model": self.base_model, "family": self.family, "resolution": self.resolution,
                "latent_size": list(self.latent_size), "text_length": self.text_length, "budget": self.budget,
                "unit_options": self.unit_options.to_dict(), "dense_macs": self.dense_macs}

    @classmethod
    def from_dict(cls, data: dict, where: str = "the router config") -> "PrunedFor":
        try:
            return cls(base_model=str(data["base_model"]), family=str(data.get("family", "unet2d_condition")),
                       resolution=int(data["resolution"]), latent_size=tuple(int(v) for v in data["latent_size"]),
                       text_length=int(data["text_length"]), budget=float(data["budget"]),
                       unit_options=UnitOptions.from_dict(data["unit_options"]),
                       dense_macs=float(data.get("dense_macs", 0.0)))
        except (KeyError, TypeError, ValueError, APTPError) as error:
            raise APTPError(f"{where} does not say what the router was pruned for ({error_summary(error)}); "
                            "run `aptp prune` again") from None

    def pruned_at(self) -> dict:
        """Recorded beside each fine-tuned expert (for `aptp inspect`)."""
        return {"resolution": self.resolution, "latent_size": list(self.latent_size), "text_length": self.text_length}


@dataclass(frozen=True)
class ExpertPlan:
    """One expert of a run: the elements it keeps per unit and its MACs."""

    index: int
    architecture: Architecture
    macs_fraction: float
    val_share: float


@dataclass
class PrunedRun:
    folder: Path
    router: PromptRouter
    pruned_for: PrunedFor
    experts: list[ExpertPlan]
    config: dict  # the pruning config the run was made with

    @property
    def family(self) -> ModelFamily:
        return family_named(self.pruned_for.family)

    @property
    def base_model(self) -> str:
        return self.pruned_for.base_model

    def base_pipeline(self, device="cpu", dtype: torch.dtype = torch.float32):
        return load_base_pipeline(self.base_model, device, dtype)

    def macs_model(self, base_denoiser: nn.Module) -> MacsModel:
        """The analytic MACs model of the base denoiser at the size the run was pruned at."""
        return self.family.build_macs_model(base_denoiser, self.pruned_for.latent_size, self.pruned_for.text_length,
                                            self.pruned_for.unit_options)


def expert_folder(out: str | Path, expert: int) -> Path:
    """Where ``aptp finetune`` writes expert ``expert`` under ``out``."""
    return Path(out) / f"expert-{expert}"


def load_run(folder: str | Path) -> PrunedRun:
    """A trained router folder (``aptp prune``'s ``router/``) as a :class:`PrunedRun`; a missing or damaged
    folder is an :class:`APTPError` naming it."""
    folder = Path(folder)
    experts_file = folder / EXPERTS_FILE
    if not experts_file.is_file():
        raise APTPError(f"{folder} is not a trained router folder (no {EXPERTS_FILE}); run `aptp prune` first")
    content = read_json(experts_file)
    listed = content.get("experts") if isinstance(content, dict) else None
    if not isinstance(listed, list) or not all(isinstance(e, dict) and isinstance(e.get("architecture"), dict)
                                               and "macs_fraction" in e for e in listed):
        raise APTPError(f"{experts_file} is damaged: it does not list the experts `aptp prune` writes")
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        if not (folder / name).is_file():
            raise APTPError(f"{folder} is not a trained router folder (no {name}); run `aptp prune` again")
    try:
        router = PromptRouter.from_pretrained(folder).eval()
    except Exception as error:  # a damaged config or weights file
        raise APTPError(f"{folder}: cannot load the router ({error_summary(error)})") from None
    if len(listed) != router.num_codes:
        raise APTPError(f"{experts_file} lists {len(listed)} experts but the router has {router.num_codes} codes")
    experts = [ExpertPlan(k, {name: list(kept) for name, kept in e["architecture"].items()},
                          float(e["macs_fraction"]), float(e.get("val_share", 0.0))) for k, e in enumerate(listed)]
    return PrunedRun(folder, router, PrunedFor.from_dict(router.config.metadata or {}, str(folder / "config.json")),
                     experts, dict(content.get("config") or {}))
