"""``APTPExpertBank``: the K physically sliced experts of one base UNet, as one diffusers model.

Its config is the base UNet config plus every expert's widths, so ``from_pretrained`` rebuilds all
expert shapes before loading their weights from one safetensors file.
"""

from __future__ import annotations

from typing import Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..config import UnitOptions
from ..families import family_named, family_of
from ..units import Architecture


class APTPExpertBank(ModelMixin, ConfigMixin):
    config_name = "config.json"

    @register_to_config
    def __init__(self, base_config: dict | None = None, expert_widths: Sequence[dict] = (),
                 expert_macs: Sequence[float] = (), dense_macs: float = 0.0, family: str = "unet2d_condition",
                 resolution: int = 0, expert_finetune_steps: Sequence[int] = (),
                 expert_shares: Sequence[float] = ()):
        # expert_finetune_steps: per expert, the fine-tuning steps it had (0: sliced as it is); () unknown.
        # expert_shares: per expert, the share of the pruning run's validation prompts routed to it; () unknown.
        super().__init__()
        model_class = family_named(family).sliced_class
        base = family_named(family).base_config(base_config or {})
        self.experts = nn.ModuleList(model_class(**base, aptp_widths=dict(w)) for w in expert_widths)

    def __len__(self) -> int:
        return len(self.experts)

    def __getitem__(self, index: int) -> nn.Module:
        return self.experts[index]

    def untrained(self) -> list[int]:
        """The experts recorded as never fine-tuned (sliced from the base model as they are)."""
        return [k for k, steps in enumerate(self.config.expert_finetune_steps or ()) if not steps]

    def macs_fraction(self, index: int) -> float:
        return self.config.expert_macs[index] / self.config.dense_macs

    @classmethod
    def from_base(cls, unet: nn.Module, architectures: Sequence[Architecture], macs_model,
                  options: UnitOptions | None = None, resolution: int = 0) -> "APTPExpertBank":
        """Slice every architecture out of ``unet`` (weights copied from it)."""
        family = family_of(unet)
        experts = [family.slice(unet, architecture, options) for architecture in architectures]
        macs = [macs_model.macs_of(a) for a in architectures]
        with torch.device("meta"):  # shapes only: the sliced experts below bring their weights
            bank = cls(base_config=dict(unet.config), expert_widths=[dict(e.config.aptp_widths) for e in experts],
                       expert_macs=macs, dense_macs=macs_model.dense, family=family.name, resolution=resolution)
        bank.experts = nn.ModuleList(experts)
        return bank.eval()
