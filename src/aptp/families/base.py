"""``ModelFamily``: everything aptp needs to know about one kind of diffusers text-to-image model.

To add a family, subclass :class:`ModelFamily` in one file of this package, fill in every abstract member
and register an instance in ``FAMILIES`` (``families/__init__.py``); then add its tiny builder to the
tests' family registry so the shared contract tests run on it. Nothing outside ``families/`` may name
a concrete diffusers model or pipeline class.

Members, by who uses them:

* surgery (gates, slicing, costs): :meth:`discover_units`, :meth:`attach_gates`, :meth:`slice`,
  :meth:`check_consistency`, :meth:`base_config`, :meth:`element_magnitudes`, :meth:`feature_modules`,
  :meth:`build_macs_model`, :meth:`measure_macs`, :meth:`example_inputs`, :meth:`default_sample_size`;
* feature caching across denoising steps: :meth:`deep_modules` (and :attr:`residual_cache`);
* training loops: :meth:`load_pipeline`, :meth:`encode_prompts` (the conditioning of every prompt, as
  named tensors with the prompt as first dimension, cached once) and :meth:`denoise` (one denoiser call
  with that conditioning);
* pipelines: :meth:`pipeline_around` (the family's own text-to-image pipeline over a given denoiser),
  :meth:`pipeline_arguments` (what that pipeline's call takes of ``APTPPipeline``'s), :meth:`latent_multiple`
  and :meth:`denoiser`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Mapping, Sequence

import torch
from torch import nn

from ..caching import feature_cache
from ..config import DEFAULT_TEXT_LENGTH, UnitOptions
from ..gates import GateController
from ..units import MacsModel, UnitLayout
from ..utils import APTPError


class ModelFamily(ABC):
    #: Saved in router metadata and expert-bank configs: never rename a registered family.
    name: str
    #: The diffusers denoiser class this family knows (subclasses included).
    denoiser_class: type[nn.Module]
    #: The class of a sliced expert: the denoiser class whose config also records the pruned widths.
    sliced_class: type[nn.Module]
    #: The diffusers text-to-image pipeline class of this family.
    pipeline_class: type
    #: The pipeline attribute that holds the denoiser.
    denoiser_attribute: str = "unet"
    #: Names the family in messages.
    description: str
    #: What ``from_pretrained`` is told besides the folder.
    load_options: dict = {}
    #: Feature caching reuses the deep modules' residuals (output - input) rather than their outputs: for
    #: a chain of residual blocks (a diffusion transformer), whose shallow path has no skip connection.
    residual_cache: bool = False
    #: The most text tokens the family's pipeline reads, whatever its tokenizer allows (None: no cap).
    max_text_length: int | None = None

    def owns(self, model: nn.Module) -> bool:
        return isinstance(model, self.denoiser_class)

    def denoiser(self, pipeline) -> nn.Module:
        return getattr(pipeline, self.denoiser_attribute)

    # -- surgery ----------------------------------------------------------------------------------

    @abstractmethod
    def discover_units(self, model: nn.Module, options: UnitOptions | None = None) -> UnitLayout:
        """The prunable units of ``model`` in a fixed order."""

    @abstractmethod
    def attach_gates(self, model: nn.Module, options: UnitOptions | None = None) -> GateController:
        """Gates on every unit (hooks; the model's weights are untouched)."""

    @abstractmethod
    def slice(self, model: nn.Module, architecture: Mapping[str, Sequence[int]],
              options: UnitOptions | None = None) -> nn.Module:
        """A physically smaller copy of ``model`` (a :attr:`sliced_class`) keeping the given elements; equal to
        ``model`` hard-gated with ``architecture``."""

    @abstractmethod
    def check_consistency(self, model: nn.Module) -> None:
        """Raise unless every module attribute matches its weights and the config."""

    @abstractmethod
    def base_config(self, config: Mapping) -> dict:
        """The config every expert carved from one base model shares with it (no widths, no private keys)."""

    @abstractmethod
    def element_magnitudes(self, model: nn.Module, options: UnitOptions | None = None) -> torch.Tensor:
        """L1 weight magnitude of every gate element (layout order); depth units get +inf."""

    @abstractmethod
    def feature_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        """The blocks whose outputs block-level distillation compares."""

    @abstractmethod
    def deep_modules(self, model: nn.Module) -> list[str]:
        """Paths of the modules whose outputs feature caching reuses between whole steps: everything but
        the shallow path from the input to the output (see :mod:`aptp.caching`)."""

    def feature_cache(self, model: nn.Module, interval: int):
        """A context in which ``model`` reuses its deep features between whole steps (every ``interval``-th
        call runs whole; 1: no caching)."""
        return feature_cache(model, self.deep_modules(model), interval, self.residual_cache)

    # -- costs ------------------------------------------------------------------------------------

    @abstractmethod
    def build_macs_model(self, model: nn.Module, sample_size: tuple[int, int] | None = None,
                         text_length: int = DEFAULT_TEXT_LENGTH, options: UnitOptions | None = None,
                         **kwargs) -> MacsModel:
        """Analytic MACs at batch 1: fixed MACs plus per-element unit MACs."""

    @abstractmethod
    def measure_macs(self, model: nn.Module, sample_size: tuple[int, int] | None = None,
                     text_length: int = DEFAULT_TEXT_LENGTH) -> float:
        """MACs of one forward at batch 1 as ``FlopCounterMode`` counts them."""

    @abstractmethod
    def example_inputs(self, model: nn.Module, sample_size: tuple[int, int], text_length: int = DEFAULT_TEXT_LENGTH,
                       batch: int = 1, device=None, dtype=None) -> dict:
        """Keyword arguments for one forward of ``model`` (random latents and conditioning)."""

    @abstractmethod
    def default_sample_size(self, model: nn.Module) -> tuple[int, int]:
        """The latent size the model's config names."""

    # -- training loops and pipelines -------------------------------------------------------------

    @abstractmethod
    def latent_multiple(self, model: nn.Module) -> int:
        """Latent sizes the model takes are multiples of this."""

    def load_pipeline(self, folder, device="cpu", dtype: torch.dtype = torch.float32):
        """The family's text-to-image pipeline from a local diffusers folder, progress bars off."""
        try:
            pipeline = self.pipeline_class.from_pretrained(folder, dtype=dtype, **self.load_options)
        except Exception as error:
            raise APTPError(f"cannot load a {self.description} pipeline from {folder}: {error}") from None
        pipeline.set_progress_bar_config(disable=True)
        return pipeline.to(device)

    def pipeline_arguments(self, pipeline, arguments: dict) -> dict:
        """The keyword arguments of one call of this family's pipeline (:meth:`pipeline_around`) for an
        ``APTPPipeline`` call's ``arguments`` (those of ``StableDiffusionPipeline``); raises
        :class:`~aptp.utils.APTPError` for a non-default argument the family's pipeline does not take."""
        return arguments

    @abstractmethod
    def pipeline_around(self, components, denoiser: nn.Module):
        """The family's text-to-image pipeline over ``denoiser``, sharing the other components of
        ``components`` (any pipeline of this family) and a fresh copy of its scheduler."""

    @abstractmethod
    def encode_prompts(self, pipeline, prompts: list[str], device, resolution: int | None = None
                       ) -> dict[str, torch.Tensor]:
        """The denoiser's conditioning for each prompt (no guidance) for images of ``resolution`` pixels (None:
        the pipeline's default), as named tensors whose first dimension is the prompt."""

    @abstractmethod
    def denoise(self, model: nn.Module, sample: torch.Tensor, timesteps: torch.Tensor,
                conditioning: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """One denoiser call: the model's prediction for ``sample`` at ``timesteps``."""

    def text_length(self, pipeline) -> int:
        """Tokens of text the pipeline's text encoder reads."""
        return self.capped_text_length(pipeline.tokenizer.model_max_length)

    def capped_text_length(self, tokenizer_length: int) -> int:
        """The text length a tokenizer allowing ``tokenizer_length`` tokens gives in this family's pipeline."""
        return min(tokenizer_length, self.max_text_length or tokenizer_length)
