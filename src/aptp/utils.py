"""Small helpers shared by every layer (no diffusers imports here)."""

from __future__ import annotations


class APTPError(Exception):
    """An error caused by the user's input; the CLI prints it as one line instead of a traceback."""


def human_count(value: float, unit: str = "") -> str:
    """Format a large number with a G/M/k suffix, e.g. ``1.0746e12 -> '1074.6 G'``."""
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.1f} {suffix}{unit}"
    return f"{value:.0f} {unit}".rstrip()
