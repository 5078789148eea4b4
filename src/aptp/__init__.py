"""aptp: prompt-based pruning of text-to-image diffusion models.

The model classes are exported here (loaded on first use) so that diffusers can find them by
library name when it loads a saved ``APTPPipeline``: ``["aptp", "PromptRouter"]``.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "APTPPipeline": "aptp.pipelines",
    "APTPPipelineOutput": "aptp.pipelines",
    "APTPExpertBank": "aptp.experts",
    "PromptRouter": "aptp.routing",
    "APTPUNet2DConditionModel": "aptp.families.unet2d_condition",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'aptp' has no attribute {name!r}")
