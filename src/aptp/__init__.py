"""aptp: prompt-based pruning of text-to-image diffusion models."""

__version__ = "0.1.0"
