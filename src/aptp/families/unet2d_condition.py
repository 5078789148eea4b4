"""The ``UNet2DConditionModel`` family: Stable Diffusion 1.x / 2.x UNets and tiny configs alike.

This is the only file that knows how this architecture is built. It finds the prunable units,
says where their gates go, slices them physically, and attributes MACs to them.

Gate placement makes a hard-gated model equal to its sliced expert:
* ResNet groups gate the input of ``conv2`` (after ``norm2``, the time shift and the activation),
  so a closed group contributes nothing, not even the norm's bias.
* Attention heads and feed-forward chunks: as :mod:`aptp.families.parts` places them.
* A skipped ResNet keeps its shortcut path (identity, or the 1x1 ``conv_shortcut`` where the
  channels change, e.g. on the concatenated skip tensor of up blocks); its gate multiplies the
  output of ``conv2``. A skipped transformer is the identity; its gate multiplies ``proj_out``.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
# ModelMixin is looked up by name in this module when a diffusers pipeline folder names
# APTPUNet2DConditionModel as a component (e.g. a StableDiffusionPipeline saved with an expert as its UNet).
from diffusers import ModelMixin, StableDiffusionPipeline, UNet2DConditionModel  # noqa: F401
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import nn

from ..config import DEFAULT_TEXT_LENGTH, UnitOptions
from ..gates import GateController, GateSite
from ..slicing import check_layer_attributes, select_channels, slice_conv2d, slice_group_norm, slice_linear
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
from .parts import apply_widths as _apply_widths

NAME = "unet2d_condition"


# ---------------------------------------------------------------------------------------------
# Replacement modules for skipped blocks


class APTPSkippedResnet(nn.Module):
    """What is left of a skipped ResNet block: its shortcut path."""

    def __init__(self, conv_shortcut: nn.Module | None, output_scale_factor: float = 1.0):
        super().__init__()
        self.conv_shortcut = conv_shortcut
        self.output_scale_factor = output_scale_factor

    def forward(self, input_tensor, temb=None, *args, **kwargs):
        if self.conv_shortcut is not None:
            input_tensor = self.conv_shortcut(input_tensor)
        return input_tensor / self.output_scale_factor


class APTPSkippedTransformer(nn.Module):
    """A skipped Transformer2D block: the identity (the block is residual as a whole)."""

    def forward(self, hidden_states, *args, return_dict: bool = True, **kwargs):
        return Transformer2DModelOutput(sample=hidden_states) if return_dict else (hidden_states,)


# ---------------------------------------------------------------------------------------------
# Unit discovery


def _stages(unet: nn.Module):
    for i, block in enumerate(unet.down_blocks):
        yield f"down_blocks.{i}", block, True
    if unet.mid_block is not None:
        yield "mid_block", unet.mid_block, False
    for i, block in enumerate(unet.up_blocks):
        yield f"up_blocks.{i}", block, True


def _is_depth(options: UnitOptions, may_skip: bool, index: int, count: int) -> bool:
    if not may_skip or options.depth == "none":
        return False
    return options.depth == "all" or index == count - 1


def _discover(unet: nn.Module, options: UnitOptions) -> list[Unit]:
    units: list[Unit] = []
    for prefix, block, may_skip in _stages(unet):
        resnets = list(getattr(block, "resnets", []) or [])
        for j, resnet in enumerate(resnets):
            if not isinstance(resnet, ResnetBlock2D):
                continue  # already skipped, or a kind this family does not prune
            path = f"{prefix}.resnets.{j}"
            parent = None
            if _is_depth(options, may_skip, j, len(resnets)) and resnet.upsample is None and resnet.downsample is None:
                parent = unit_name(path, "resnet")
                units.append(Unit(UnitSpec(parent, "resnet", 1), path))
            groups = resnet.norm2.num_groups
            spec = UnitSpec(unit_name(path, "groups"), "groups", groups, resnet.conv1.out_channels // groups, parent)
            units.append(Unit(spec, path))
        attentions = list(getattr(block, "attentions", []) or [])
        for j, t2d in enumerate(attentions):
            if not isinstance(t2d, Transformer2DModel):
                if isinstance(t2d, APTPSkippedTransformer):
                    continue
                raise APTPError(f"{prefix}.attentions.{j}: {type(t2d).__name__} is not supported")
            path = f"{prefix}.attentions.{j}"
            parent = None
            if _is_depth(options, may_skip, j, len(attentions)):
                parent = unit_name(path, "transformer")
                units.append(Unit(UnitSpec(parent, "transformer", 1), path))
            for t, tblock in enumerate(t2d.transformer_blocks):
                units.extend(block_units(tblock, f"{path}.transformer_blocks.{t}", parent, options))
    return units


def discover_units(unet: nn.Module, options: UnitOptions | None = None) -> UnitLayout:
    """All prunable units of a UNet, in a stable order with stable names."""
    return UnitLayout(u.spec for u in _discover(unet, options or UnitOptions()))


# ---------------------------------------------------------------------------------------------
# Gates


def _gate_site(unet: nn.Module, unit: Unit) -> GateSite:
    module = unet.get_submodule(unit.path)
    spec = unit.spec
    if spec.kind == "groups":
        return GateSite(spec.name, module.conv2, "input", dim=1, element_size=spec.element_size)
    if spec.kind == "resnet":
        return GateSite(spec.name, module.conv2, "output")
    if spec.kind in ("heads", "ff"):
        return width_gate_site(module, spec)
    if spec.kind == "transformer":
        return GateSite(spec.name, module.proj_out, "output")
    raise ValueError(f"unknown unit kind {spec.kind!r}")


def attach_gates(unet: nn.Module, options: UnitOptions | None = None) -> GateController:
    """Hook per-sample gates into ``unet``; ``controller.remove()`` takes them out again."""
    units = _discover(unet, options or UnitOptions())
    layout = UnitLayout(u.spec for u in units)
    return GateController(layout, [_gate_site(unet, u) for u in units])


# ---------------------------------------------------------------------------------------------
# Slicing: one function per module kind; each updates the module's attributes with its weights.


def slice_resnet_groups(resnet: ResnetBlock2D, group_index: Sequence[int]) -> None:
    channels = resnet.conv1.out_channels
    group_size = channels // resnet.norm2.num_groups
    kept = select_channels(group_index, group_size)
    slice_conv2d(resnet.conv1, out_index=kept)
    if resnet.time_emb_proj is not None:
        rows = kept if resnet.time_embedding_norm == "default" else kept + [channels + c for c in kept]
        slice_linear(resnet.time_emb_proj, out_index=rows)
    slice_group_norm(resnet.norm2, group_index)
    slice_conv2d(resnet.conv2, in_index=kept)


def skip_block(unet: nn.Module, path: str) -> None:
    block = unet.get_submodule(path)
    if isinstance(block, ResnetBlock2D):
        replace_module(unet, path, APTPSkippedResnet(block.conv_shortcut, block.output_scale_factor))
    elif isinstance(block, Transformer2DModel):
        replace_module(unet, path, APTPSkippedTransformer())
    else:
        raise APTPError(f"{path}: cannot skip a {type(block).__name__}")


def _width(module: nn.Module, suffix: str) -> int:
    """Physical width of a unit's module in its natural unit: groups, heads or hidden features."""
    return module.norm2.num_groups if suffix == "groups" else width_of(module, suffix)


def _apply_kept(unet: nn.Module, name: str, kept: Sequence[int], element_size: int = 1) -> None:
    """Slice one unit to the kept elements (``[]`` skips a block)."""
    path, suffix = split_name(name)
    module = unet.get_submodule(path)
    if suffix == "block":
        if kept:
            return
        skip_block(unet, path)
    elif suffix == "groups":
        slice_resnet_groups(module, kept)
    else:
        slice_width_unit(module, suffix, kept, element_size)


SURGERY = Surgery(_apply_kept, _width, (APTPSkippedResnet, APTPSkippedTransformer))


def apply_widths(unet: nn.Module, widths: Mapping[str, int]) -> None:
    """Give ``unet`` the shapes of a pruned expert (the first elements of every unit kept)."""
    _apply_widths(unet, widths, SURGERY)


class APTPUNet2DConditionModel(UNet2DConditionModel):
    """A ``UNet2DConditionModel`` whose config also records its pruned widths.

    ``aptp_widths`` maps unit names to the kept width in the module's natural unit (GroupNorm
    groups, attention heads, feed-forward hidden features; 0 = skipped block). The config is the
    architecture: ``from_pretrained`` rebuilds the expert's shapes before loading its weights.
    """

    def __init__(self, *, aptp_widths: dict | None = None, **kwargs):
        super().__init__(**kwargs)
        build_with_widths(self, aptp_widths, SURGERY, check_consistency)


accept_widths_in_config(APTPUNet2DConditionModel, UNet2DConditionModel)


def slice_unet(
    unet: UNet2DConditionModel, architecture: Mapping[str, Sequence[int]], options: UnitOptions | None = None
) -> APTPUNet2DConditionModel:
    """A physically smaller copy of ``unet`` that keeps, per unit, the given element indices.

    Units not named stay dense. The result is an :class:`APTPUNet2DConditionModel` whose config
    records the widths; it equals ``unet`` hard-gated with the same architecture.
    """
    return sliced_copy(unet, _discover(unet, options or UnitOptions()), architecture, SURGERY,
                       APTPUNet2DConditionModel)


def check_consistency(unet: nn.Module) -> None:
    """Raise :class:`ArchitectureError` unless every module attribute matches its weights and the config."""
    problems = check_layer_attributes(unet)
    for name, module in unet.named_modules():
        if isinstance(module, ResnetBlock2D):
            channels = module.conv1.out_channels
            if module.norm2.num_channels != channels or module.conv2.in_channels != channels:
                problems.append(f"{name}: conv1 out {channels}, norm2 {module.norm2.num_channels}, "
                                f"conv2 in {module.conv2.in_channels}")
            if module.time_emb_proj is not None:
                factor = 1 if module.time_embedding_norm == "default" else 2
                if module.time_emb_proj.out_features != factor * channels:
                    problems.append(f"{name}: time_emb_proj gives {module.time_emb_proj.out_features}, "
                                    f"expected {factor * channels}")
        else:
            problems += attention_ff_problems(name, module)
    problems += width_problems(unet, SURGERY)
    if problems:
        raise ArchitectureError("inconsistent architecture:\n  " + "\n  ".join(problems))


@torch.no_grad()
def element_magnitudes(unet: nn.Module, options: UnitOptions | None = None) -> torch.Tensor:
    """L1 norm of the weights each gate element owns (one value per gate, layout order): the
    input-side weights of a ResNet group (``conv1`` filters), an attention head (``to_q/k/v`` rows)
    or a feed-forward chunk (``proj`` rows); depth units get +inf (magnitude pruning keeps blocks)."""
    units = _discover(unet, options or UnitOptions())
    values = []
    for unit in units:
        spec, module = unit.spec, unet.get_submodule(unit.path)
        if spec.is_depth:
            values.append(torch.full((1,), float("inf")))
            continue
        if spec.kind == "groups":
            rows = module.conv1.weight.abs().flatten(1).sum(1)
            values.append(rows.float().cpu().view(spec.count, spec.element_size).sum(1))
        else:
            values.append(attention_ff_magnitudes(module, spec))
    return torch.cat(values)


def deep_modules(unet: nn.Module) -> list[str]:
    """Everything but the highest-resolution path (conv_in, the first down block, the last up block,
    conv_out): what DeepCache reuses at its shallowest skip branch."""
    down, up = len(unet.down_blocks), len(unet.up_blocks)
    return ([f"down_blocks.{i}" for i in range(1, down)] + (["mid_block"] if unet.mid_block is not None else [])
            + [f"up_blocks.{i}" for i in range(up - 1)])


def feature_modules(unet: nn.Module) -> dict[str, nn.Module]:
    """The blocks whose outputs block-level distillation compares (down, mid and up blocks)."""
    modules = {f"down_blocks.{i}": block for i, block in enumerate(unet.down_blocks)}
    if unet.mid_block is not None:
        modules["mid_block"] = unet.mid_block
    modules.update({f"up_blocks.{i}": block for i, block in enumerate(unet.up_blocks)})
    return modules


# ---------------------------------------------------------------------------------------------
# Costs


def example_inputs(unet: nn.Module, sample_size: tuple[int, int], text_length: int = DEFAULT_TEXT_LENGTH,
                   batch: int = 1, device=None, dtype=None) -> dict:
    """Keyword arguments for one forward of ``unet`` (random latents and text states)."""
    config = unet.config
    parameter = next(unet.parameters())
    device = parameter.device if device is None else device
    dtype = parameter.dtype if dtype is None else dtype
    if not isinstance(config.cross_attention_dim, int):
        raise APTPError("UNets with per-block cross_attention_dim are not supported yet")
    if config.encoder_hid_dim_type is not None or config.class_embed_type is not None:
        raise APTPError("UNets with encoder_hid_proj or class embeddings are not supported yet")
    kwargs = {
        "sample": torch.randn(batch, config.in_channels, *sample_size, device=device, dtype=dtype),
        "timestep": torch.full((batch,), 500, device=device, dtype=torch.long),
        "encoder_hidden_states": torch.randn(batch, text_length, config.cross_attention_dim, device=device,
                                             dtype=dtype),
    }
    if config.addition_embed_type == "text_time":  # SDXL
        time_ids = 6
        text_dim = config.projection_class_embeddings_input_dim - time_ids * config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, text_dim, device=device, dtype=dtype),
            "time_ids": torch.randn(batch, time_ids, device=device, dtype=dtype),
        }
    elif config.addition_embed_type is not None:
        raise APTPError(f"addition_embed_type {config.addition_embed_type!r} is not supported yet")
    return kwargs


def measure_macs(unet: nn.Module, sample_size: tuple[int, int] | None = None,
                 text_length: int = DEFAULT_TEXT_LENGTH) -> float:
    """MACs of one forward at batch 1 as ``FlopCounterMode`` counts them."""
    return counted_macs(unet, example_inputs, sample_size, text_length)


def build_macs_model(unet: nn.Module, sample_size: tuple[int, int] | None = None,
                     text_length: int = DEFAULT_TEXT_LENGTH, options: UnitOptions | None = None,
                     cross_attention_as_self: bool = False) -> MacsModel:
    """Analytic MACs of ``unet`` at batch 1, split into fixed MACs and per-element unit MACs.

    Shapes come from one forward of a weightless twin; costs from the layer formulas. Attention
    matmuls use each attention's real key length (the text length for cross-attention).
    ``cross_attention_as_self`` instead counts cross-attention matmuls at the image length, the
    convention behind the published APTP MACs figures; it exists only to reproduce them.
    """
    sample_size = tuple(sample_size or default_sample_size(unet))
    twin = meta_twin(unet)
    units = _discover(twin, options or UnitOptions())
    inputs = example_inputs(twin, sample_size, text_length)
    return analytic_macs(twin, units, inputs, sample_size, text_length, cross_attention_as_self,
                         lambda unit: (f"{unit.path}.conv_shortcut",) if unit.spec.kind == "resnet" else ())


# ---------------------------------------------------------------------------------------------
# The family


def is_text_time(unet: nn.Module) -> bool:
    """An SDXL-style UNet: pooled text embeddings and time ids through ``added_cond_kwargs``."""
    return getattr(getattr(unet, "config", None), "addition_embed_type", None) == "text_time"


class UNet2DConditionFamily(ModelFamily):
    """Stable Diffusion 1.x / 2.x: a ``UNet2DConditionModel`` conditioned on the text encoder's states."""

    def owns(self, model: nn.Module) -> bool:
        return isinstance(model, self.denoiser_class) and not is_text_time(model)

    name = NAME
    denoiser_class = UNet2DConditionModel
    sliced_class = APTPUNet2DConditionModel
    pipeline_class = StableDiffusionPipeline
    denoiser_attribute = "unet"

    discover_units = staticmethod(discover_units)
    attach_gates = staticmethod(attach_gates)
    slice = staticmethod(slice_unet)
    check_consistency = staticmethod(check_consistency)
    base_config = staticmethod(base_config)
    element_magnitudes = staticmethod(element_magnitudes)
    feature_modules = staticmethod(feature_modules)
    deep_modules = staticmethod(deep_modules)
    build_macs_model = staticmethod(build_macs_model)
    measure_macs = staticmethod(measure_macs)
    example_inputs = staticmethod(example_inputs)
    default_sample_size = staticmethod(default_sample_size)

    description = "Stable Diffusion"
    # What from_pretrained is told besides the folder (no safety checker: aptp serves the base model as it is).
    load_options = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    def latent_multiple(self, model: nn.Module) -> int:
        return 2 ** (len(model.config.block_out_channels) - 1)  # every down-sampling stage halves the latent

    def pipeline_around(self, components, denoiser: nn.Module):
        pipeline = StableDiffusionPipeline(
            vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer, unet=denoiser,
            scheduler=type(components.scheduler).from_config(components.scheduler.config), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def encode_prompts(self, pipeline, prompts: list[str], device, resolution: int | None = None
                       ) -> dict[str, torch.Tensor]:
        return {"encoder_hidden_states": pipeline.encode_prompt(prompts, device, 1, False)[0]}

    def denoise(self, model: nn.Module, sample: torch.Tensor, timesteps: torch.Tensor,
                conditioning: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return model(sample, timesteps, conditioning["encoder_hidden_states"]).sample
