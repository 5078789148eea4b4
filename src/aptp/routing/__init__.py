"""The prompt router: architecture predictor, codes, hypernetwork, Sinkhorn assignment and losses.

Works on unit layouts and MACs models, never on diffusers modules.
"""

from .clustering import spherical_kmeans
from .losses import assignment_loss, code_size_loss, code_targets, contrastive_loss, resource_loss, spread_loss
from .router import PromptRouter
from .sinkhorn import sinkhorn

__all__ = ["PromptRouter", "assignment_loss", "code_size_loss", "code_targets", "contrastive_loss", "resource_loss",
           "sinkhorn", "spherical_kmeans", "spread_loss"]
