"""PixArt-Σ: a diffusion transformer (``PixArtTransformer2DModel``) conditioned on T5 states through
cross-attention, in a ``PixArtSigmaPipeline``.

Units: the self- and cross-attention heads and the feed-forward chunks of every transformer block (placed
as in :mod:`aptp.families.parts`); with ``depth`` "last" or "all", every block but the first and the last
is also a depth unit. A block is residual in each of its three branches (self-attention, cross-attention,
feed-forward), so its depth gate multiplies the output of each branch's last projection: closed, the
block is the identity, which is what a skipped block becomes.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
# ModelMixin is looked up by name in this module when a diffusers pipeline folder names
# APTPPixArtTransformer2DModel as a component (a PixArtSigmaPipeline saved with an expert as its transformer).
from diffusers import ModelMixin, PixArtSigmaPipeline, PixArtTransformer2DModel  # noqa: F401
from diffusers.models.attention import BasicTransformerBlock
from torch import nn

from ..config import DEFAULT_TEXT_LENGTH, UnitOptions
from ..gates import GateController, GateSite
from ..slicing import check_layer_attributes
from ..units import MacsModel, UnitLayout, UnitSpec
from ..utils import APTPError
from .base import ModelFamily
from .parts import (
    ArchitectureError,
    Surgery,
    Unit,
    accept_widths_in_config,
    build_with_widths,
    counted_macs,
    default_sample_size,
    analytic_macs,
    attention_ff_magnitudes,
    attention_ff_problems,
    base_config,
    block_units,
    meta_twin,
    replace_module,
    slice_width_unit,
    sliced_copy,
    split_name,
    unit_name,
    width_gate_site,
    width_of,
    width_problems,
)

NAME = "pixart"
# StableDiffusionPipeline call arguments PixArtSigmaPipeline does not take, with the values that mean "unused".
UNUSED_ARGUMENTS = {"guidance_rescale": 0.0, "cross_attention_kwargs": None, "callback_on_step_end": None,
                    "clip_skip": None}


class APTPSkippedBlock(nn.Module):
    """A skipped transformer block: the identity."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def _discover(model: nn.Module, options: UnitOptions) -> list[Unit]:
    units: list[Unit] = []
    blocks = list(model.transformer_blocks)
    for i, block in enumerate(blocks):
        if not isinstance(block, BasicTransformerBlock):
            if isinstance(block, APTPSkippedBlock):
                continue
            raise APTPError(f"transformer_blocks.{i}: {type(block).__name__} is not supported")
        path = f"transformer_blocks.{i}"
        parent = None
        if options.depth != "none" and 0 < i < len(blocks) - 1:
            parent = unit_name(path, "transformer")
            units.append(Unit(UnitSpec(parent, "transformer", 1), path))
        units.extend(block_units(block, path, parent, options))
    return units


def discover_units(model: nn.Module, options: UnitOptions | None = None) -> UnitLayout:
    """All prunable units of a PixArt transformer, in a stable order with stable names."""
    return UnitLayout(u.spec for u in _discover(model, options or UnitOptions()))


def _gate_sites(model: nn.Module, unit: Unit) -> list[GateSite]:
    module = model.get_submodule(unit.path)
    if unit.spec.kind != "transformer":
        return [width_gate_site(module, unit.spec)]
    branches = [module.attn1.to_out[0], module.ff.net[2]]
    if module.attn2 is not None:
        branches.insert(1, module.attn2.to_out[0])
    return [GateSite(unit.spec.name, branch, "output") for branch in branches]


def attach_gates(model: nn.Module, options: UnitOptions | None = None) -> GateController:
    """Hook per-sample gates into ``model``; ``controller.remove()`` takes them out again."""
    units = _discover(model, options or UnitOptions())
    return GateController(UnitLayout(u.spec for u in units), [s for u in units for s in _gate_sites(model, u)])


def _apply_kept(model: nn.Module, name: str, kept: Sequence[int], element_size: int = 1) -> None:
    path, suffix = split_name(name)
    if suffix == "block":
        if not kept:
            replace_module(model, path, APTPSkippedBlock())
        return
    slice_width_unit(model.get_submodule(path), suffix, kept, element_size)


SURGERY = Surgery(_apply_kept, width_of, (APTPSkippedBlock,))


class APTPPixArtTransformer2DModel(PixArtTransformer2DModel):
    """A ``PixArtTransformer2DModel`` whose config also records its pruned widths (``aptp_widths``: unit
    name -> kept heads or feed-forward features, 0 = skipped block); the config is the architecture."""

    def __init__(self, *, aptp_widths: dict | None = None, **kwargs):
        super().__init__(**kwargs)
        build_with_widths(self, aptp_widths, SURGERY, check_consistency)


accept_widths_in_config(APTPPixArtTransformer2DModel, PixArtTransformer2DModel)


def slice_transformer(model: PixArtTransformer2DModel, architecture: Mapping[str, Sequence[int]],
                      options: UnitOptions | None = None) -> APTPPixArtTransformer2DModel:
    """A physically smaller copy of ``model`` keeping, per unit, the given elements; equal to ``model``
    hard-gated with the same architecture."""
    return sliced_copy(model, _discover(model, options or UnitOptions()), architecture, SURGERY,
                       APTPPixArtTransformer2DModel)


def check_consistency(model: nn.Module) -> None:
    """Raise :class:`ArchitectureError` unless every module attribute matches its weights and the config."""
    problems = check_layer_attributes(model)
    for name, module in model.named_modules():
        problems += attention_ff_problems(name, module)
    problems += width_problems(model, SURGERY)
    if problems:
        raise ArchitectureError("inconsistent architecture:\n  " + "\n  ".join(problems))


@torch.no_grad()
def element_magnitudes(model: nn.Module, options: UnitOptions | None = None) -> torch.Tensor:
    """L1 weight magnitude of every gate element (layout order); depth units get +inf."""
    values = []
    for unit in _discover(model, options or UnitOptions()):
        if unit.spec.is_depth:
            values.append(torch.full((1,), float("inf")))
        else:
            values.append(attention_ff_magnitudes(model.get_submodule(unit.path), unit.spec))
    return torch.cat(values)


def example_inputs(model: nn.Module, sample_size: tuple[int, int], text_length: int = DEFAULT_TEXT_LENGTH,
                   batch: int = 1, device=None, dtype=None) -> dict:
    """Keyword arguments for one forward (random latents and T5 states, every token attended)."""
    config = model.config
    parameter = next(model.parameters())
    device = parameter.device if device is None else device
    dtype = parameter.dtype if dtype is None else dtype
    if model.use_additional_conditions:
        raise APTPError("PixArt transformers with resolution/aspect-ratio conditions (PixArt-α at 1024 px) "
                        "are not supported yet")
    width = config.caption_channels or config.cross_attention_dim
    return {
        "hidden_states": torch.randn(batch, config.in_channels, *sample_size, device=device, dtype=dtype),
        "encoder_hidden_states": torch.randn(batch, text_length, width, device=device, dtype=dtype),
        "timestep": torch.full((batch,), 500, device=device, dtype=torch.long),
        "encoder_attention_mask": torch.ones(batch, text_length, device=device, dtype=torch.long),
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
    }


def measure_macs(model: nn.Module, sample_size: tuple[int, int] | None = None,
                 text_length: int = DEFAULT_TEXT_LENGTH) -> float:
    """MACs of one forward at batch 1 as ``FlopCounterMode`` counts them."""
    return counted_macs(model, example_inputs, sample_size, text_length)


def build_macs_model(model: nn.Module, sample_size: tuple[int, int] | None = None,
                     text_length: int = DEFAULT_TEXT_LENGTH, options: UnitOptions | None = None,
                     cross_attention_as_self: bool = False) -> MacsModel:
    """Analytic MACs at batch 1: fixed MACs plus per-element unit MACs (see :func:`~aptp.families.parts.analytic_macs`)."""
    sample_size = tuple(sample_size or default_sample_size(model))
    twin = meta_twin(model)
    inputs = example_inputs(twin, sample_size, text_length)
    return analytic_macs(twin, _discover(twin, options or UnitOptions()), inputs, sample_size, text_length,
                         cross_attention_as_self)


def feature_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The transformer blocks, whose outputs block-level distillation compares."""
    return {f"transformer_blocks.{i}": block for i, block in enumerate(model.transformer_blocks)}


def deep_modules(model: nn.Module) -> list[str]:
    """Every transformer block but the first and the last (their residuals are reused)."""
    return [f"transformer_blocks.{i}" for i in range(1, len(model.transformer_blocks) - 1)]


class PixArtFamily(ModelFamily):
    """PixArt-Σ: a ``PixArtTransformer2DModel`` in a ``PixArtSigmaPipeline`` (T5 text encoder)."""

    name = NAME
    denoiser_class = PixArtTransformer2DModel
    sliced_class = APTPPixArtTransformer2DModel
    pipeline_class = PixArtSigmaPipeline
    denoiser_attribute = "transformer"
    description = "PixArt-Σ"
    residual_cache = True
    max_text_length = 300  # the T5 tokens PixArtSigmaPipeline reads by default

    discover_units = staticmethod(discover_units)
    attach_gates = staticmethod(attach_gates)
    slice = staticmethod(slice_transformer)
    check_consistency = staticmethod(check_consistency)
    base_config = staticmethod(base_config)
    element_magnitudes = staticmethod(element_magnitudes)
    feature_modules = staticmethod(feature_modules)
    deep_modules = staticmethod(deep_modules)
    build_macs_model = staticmethod(build_macs_model)
    measure_macs = staticmethod(measure_macs)
    example_inputs = staticmethod(example_inputs)
    default_sample_size = staticmethod(default_sample_size)

    def latent_multiple(self, model: nn.Module) -> int:
        return model.config.patch_size

    def pipeline_around(self, components, denoiser: nn.Module):
        pipeline = PixArtSigmaPipeline(
            tokenizer=components.tokenizer, text_encoder=components.text_encoder, vae=components.vae,
            transformer=denoiser, scheduler=type(components.scheduler).from_config(components.scheduler.config))
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def pipeline_arguments(self, pipeline, arguments: dict) -> dict:
        arguments = dict(arguments)
        used = [name for name, unused in UNUSED_ARGUMENTS.items() if arguments.pop(name, unused) != unused]
        arguments.pop("callback_on_step_end_tensor_inputs", None)
        if used:
            raise APTPError(f"{self.description} pipelines do not take {', '.join(used)}")
        if "prompt_embeds" in arguments:
            raise APTPError(f"{self.description} prompt embeddings need their attention masks, which APTPPipeline "
                            "does not take: give the prompt text")
        # The tiny and reduced-resolution models aptp also serves have no resolution bins.
        return {**arguments, "clean_caption": False, "use_resolution_binning": False,
                "max_sequence_length": self.text_length(pipeline)}

    def encode_prompts(self, pipeline, prompts: list[str], device, resolution: int | None = None
                       ) -> dict[str, torch.Tensor]:
        states, mask, _, _ = pipeline.encode_prompt(prompts, do_classifier_free_guidance=False, device=device,
                                                    clean_caption=False,
                                                    max_sequence_length=self.text_length(pipeline))
        return {"encoder_hidden_states": states, "encoder_attention_mask": mask}

    def denoise(self, model: nn.Module, sample: torch.Tensor, timesteps: torch.Tensor,
                conditioning: Mapping[str, torch.Tensor]) -> torch.Tensor:
        output = model(sample, encoder_hidden_states=conditioning["encoder_hidden_states"], timestep=timesteps,
                       encoder_attention_mask=conditioning["encoder_attention_mask"],
                       added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        # A learned-variance model predicts noise and variance: the pipeline keeps the noise half.
        return output[:, :sample.shape[1]] if output.shape[1] == 2 * sample.shape[1] else output
