"""Per-sample gates injected into an existing model with forward hooks (nothing is forked)."""

from .hooks import GateController, GateSite

__all__ = ["GateController", "GateSite"]
