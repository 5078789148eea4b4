"""Sampling solvers by name: any diffusers scheduler class, or a short alias of the common ones."""

from __future__ import annotations

import diffusers
from diffusers import SchedulerMixin

from ..utils import APTPError

ALIASES = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "dpm-solver++": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler",
}
# What an alias means beyond its class: PNDM as Stable Diffusion pipelines ship it (PLMS steps only, any count).
ALIAS_SETTINGS = {"pndm": {"skip_prk_steps": True}}


def scheduler_class(name: str) -> type:
    """The diffusers scheduler class named ``name`` (a class name such as ``UniPCMultistepScheduler``, or an
    alias: ``ddim``, ``dpm++``, ``euler``, ``unipc``, ...)."""
    class_name = ALIASES.get(str(name).lower(), name)
    found = getattr(diffusers, str(class_name), None) if str(class_name).endswith("Scheduler") else None
    if not isinstance(found, type) or not issubclass(found, SchedulerMixin):
        raise APTPError(f"unknown scheduler {name!r}; give a diffusers scheduler class name or one of "
                        f"{', '.join(ALIASES)}")
    return found


def use_scheduler(pipeline, name: str | None):
    """Switch ``pipeline`` to the solver ``name`` (configured from its current scheduler, so the noise schedule
    and prediction type stay); ``None`` keeps it. Returns the pipeline."""
    if name is not None:
        pipeline.scheduler = scheduler_named(name, pipeline.scheduler.config)
    return pipeline


def scheduler_named(name: str, config):
    """The solver ``name`` configured from ``config`` (another scheduler's)."""
    return scheduler_class(name).from_config(config, **ALIAS_SETTINGS.get(str(name).lower(), {}))
