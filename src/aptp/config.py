"""Defaults in one visible place."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import yaml

from .utils import APTPError

DEFAULT_TEXT_LENGTH = 77  # CLIP token length used by Stable Diffusion pipelines
DEFAULT_VAE_SCALE_FACTOR = 8  # SD VAEs map 8x8 pixels to one latent


@dataclass(frozen=True)
class UnitOptions:
    """How a model is cut into prunable units.

    ``ff_chunks``: feed-forward hidden units are gated in this many equal chunks per block (the
    largest divisor of the hidden size not above it). ``depth``: which whole blocks may be skipped:
    ``"last"`` = the last ResNet and the last transformer of every down/up stage, ``"all"`` = every
    ResNet and transformer of the down/up stages, ``"none"``. The mid block is never skipped.
    """

    ff_chunks: int = 32
    depth: str = "last"

    def __post_init__(self):
        if self.depth not in ("last", "all", "none"):
            raise ValueError(f"depth must be 'last', 'all' or 'none', got {self.depth!r}")
        if self.ff_chunks < 1:
            raise ValueError(f"ff_chunks must be >= 1, got {self.ff_chunks}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> "UnitOptions":
        return config_from_dict(cls, data or {})


def config_from_dict(cls, data: dict):
    """A config dataclass from ``data``; unknown keys are errors (a typo never passes silently)."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise APTPError(f"unknown {cls.__name__} option(s): {unknown}; known: {sorted(names)}")
    return cls(**data)


def parse_overrides(items: list[str] | None) -> dict:
    """``key=value`` pairs; values are read as YAML scalars or lists (``lr=3e-4``, ``widths=[32,64]``)."""
    overrides = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise APTPError(f"expected key=value, got {item!r}")
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str):
            try:
                parsed = float(parsed)  # YAML 1.1 reads "3e-4" (no dot) as a string
            except ValueError:
                pass
        overrides[key.strip().replace("-", "_")] = parsed
    return overrides
