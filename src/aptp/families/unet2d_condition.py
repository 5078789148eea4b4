"""The ``UNet2DConditionModel`` family: Stable Diffusion 1.x / 2.x UNets and tiny configs alike.

This is the only file that knows how this architecture is built. It finds the prunable units,
says where their gates go, slices them physically, and attributes MACs to them.

Gate placement makes a hard-gated model equal to its sliced expert:
* ResNet groups gate the input of ``conv2`` (after ``norm2``, the time shift and the activation),
  so a closed group contributes nothing, not even the norm's bias.
* Attention heads gate the input of ``to_out[0]``, i.e. each head's output (q/k/v are untouched,
  so the softmax temperature is unchanged).
* Feed-forward chunks gate the input of ``net[2]``, the GEGLU output.
* A skipped ResNet keeps its shortcut path (identity, or the 1x1 ``conv_shortcut`` where the
  channels change, e.g. on the concatenated skip tensor of up blocks); its gate multiplies the
  output of ``conv2``. A skipped transformer is the identity; its gate multiplies ``proj_out``.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
# ModelMixin is looked up by name in this module when a diffusers pipeline folder names
# APTPUNet2DConditionModel as a component (e.g. a StableDiffusionPipeline saved with an expert as its UNet).
from diffusers import ModelMixin, StableDiffusionPipeline, UNet2DConditionModel  # noqa: F401
from diffusers.models.activations import GEGLU, GELU, ApproximateGELU, LinearActivation, SwiGLU
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention, AttnProcessor
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import nn

from ..config import DEFAULT_TEXT_LENGTH, UnitOptions
from ..costs import flop_counter_macs, trace_module_macs
from ..gates import GateController, GateSite
from ..slicing import check_layer_attributes, select_channels, slice_conv2d, slice_group_norm, slice_linear
from ..units import Architecture, MacsModel, UnitLayout, UnitSpec
from ..utils import APTPError
from .base import ModelFamily

NAME = "unet2d_condition"
GLU_ACTIVATIONS = (GEGLU, SwiGLU)
PLAIN_ACTIVATIONS = (GELU, ApproximateGELU, LinearActivation)


class ArchitectureError(APTPError):
    """A model whose module attributes, weights and config disagree."""


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


@dataclass(frozen=True)
class _Unit:
    spec: UnitSpec
    path: str  # module path of the owning module (ResNet, Attention, FeedForward, block)


def _suffix(kind: str) -> str:
    return {"groups": "groups", "heads": "heads", "ff": "ff", "resnet": "block", "transformer": "block"}[kind]


def unit_name(path: str, kind: str) -> str:
    return f"{path}:{_suffix(kind)}"


def _split_name(name: str) -> tuple[str, str]:
    path, _, suffix = name.rpartition(":")
    if not path:
        raise ValueError(f"not a unit name: {name!r}")
    return path, suffix


def ff_chunk_count(hidden: int, ff_chunks: int) -> int:
    """The largest number of equal chunks <= ``ff_chunks`` that divides ``hidden``."""
    return max(c for c in range(1, min(ff_chunks, hidden) + 1) if hidden % c == 0)


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


def _transformer_units(t2d: Transformer2DModel, path: str, parent: str | None, options: UnitOptions):
    for t, tblock in enumerate(t2d.transformer_blocks):
        tpath = f"{path}.transformer_blocks.{t}"
        for attn_name in ("attn1", "attn2"):
            attn = getattr(tblock, attn_name, None)
            if isinstance(attn, Attention):
                apath = f"{tpath}.{attn_name}"
                spec = UnitSpec(unit_name(apath, "heads"), "heads", attn.heads, attn.inner_dim // attn.heads, parent)
                yield _Unit(spec, apath)
        ff = getattr(tblock, "ff", None)
        if isinstance(ff, FeedForward):
            hidden = ff.net[2].in_features
            chunks = ff_chunk_count(hidden, options.ff_chunks)
            fpath = f"{tpath}.ff"
            yield _Unit(UnitSpec(unit_name(fpath, "ff"), "ff", chunks, hidden // chunks, parent), fpath)


def _discover(unet: nn.Module, options: UnitOptions) -> list[_Unit]:
    units: list[_Unit] = []
    for prefix, block, may_skip in _stages(unet):
        resnets = list(getattr(block, "resnets", []) or [])
        for j, resnet in enumerate(resnets):
            if not isinstance(resnet, ResnetBlock2D):
                continue  # already skipped, or a kind this family does not prune
            path = f"{prefix}.resnets.{j}"
            parent = None
            if _is_depth(options, may_skip, j, len(resnets)) and resnet.upsample is None and resnet.downsample is None:
                parent = unit_name(path, "resnet")
                units.append(_Unit(UnitSpec(parent, "resnet", 1), path))
            groups = resnet.norm2.num_groups
            spec = UnitSpec(unit_name(path, "groups"), "groups", groups, resnet.conv1.out_channels // groups, parent)
            units.append(_Unit(spec, path))
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
                units.append(_Unit(UnitSpec(parent, "transformer", 1), path))
            units.extend(_transformer_units(t2d, path, parent, options))
    return units


def discover_units(unet: nn.Module, options: UnitOptions | None = None) -> UnitLayout:
    """All prunable units of a UNet, in a stable order with stable names."""
    return UnitLayout(u.spec for u in _discover(unet, options or UnitOptions()))


# ---------------------------------------------------------------------------------------------
# Gates


def _gate_site(unet: nn.Module, unit: _Unit) -> GateSite:
    module = unet.get_submodule(unit.path)
    spec = unit.spec
    if spec.kind == "groups":
        return GateSite(spec.name, module.conv2, "input", dim=1, element_size=spec.element_size)
    if spec.kind == "resnet":
        return GateSite(spec.name, module.conv2, "output")
    if spec.kind == "heads":
        return GateSite(spec.name, module.to_out[0], "input", dim=-1, element_size=spec.element_size)
    if spec.kind == "ff":
        return GateSite(spec.name, module.net[2], "input", dim=-1, element_size=spec.element_size)
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


def slice_attention_heads(attn: Attention, head_index: Sequence[int]) -> None:
    if getattr(attn, "fused_projections", False) or attn.added_kv_proj_dim is not None:
        raise APTPError("slicing heads of fused or added-KV attention is not supported")
    if attn.inner_kv_dim != attn.inner_dim:
        raise APTPError("slicing heads of grouped-KV attention is not supported")
    head_dim = attn.inner_dim // attn.heads
    kept = select_channels(head_index, head_dim)
    for projection in (attn.to_q, attn.to_k, attn.to_v):
        slice_linear(projection, out_index=kept)
    slice_linear(attn.to_out[0], in_index=kept)
    attn.heads = attn.sliceable_head_dim = len(head_index)
    attn.inner_dim = attn.inner_kv_dim = len(kept)


def slice_feed_forward(ff: FeedForward, hidden_index: Sequence[int]) -> None:
    activation = ff.net[0]
    hidden = ff.net[2].in_features
    kept = sorted(hidden_index)
    if isinstance(activation, GLU_ACTIVATIONS):
        rows = kept + [hidden + h for h in kept]  # both halves: value and gate
    elif isinstance(activation, PLAIN_ACTIVATIONS):
        rows = kept
    else:
        raise APTPError(f"feed-forward activation {type(activation).__name__} is not supported")
    slice_linear(activation.proj, out_index=rows)
    slice_linear(ff.net[2], in_index=kept)


def _replace(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, child, new) if not child.isdigit() else parent.__setitem__(int(child), new)


def skip_block(unet: nn.Module, path: str) -> None:
    block = unet.get_submodule(path)
    if isinstance(block, ResnetBlock2D):
        _replace(unet, path, APTPSkippedResnet(block.conv_shortcut, block.output_scale_factor))
    elif isinstance(block, Transformer2DModel):
        _replace(unet, path, APTPSkippedTransformer())
    else:
        raise APTPError(f"{path}: cannot skip a {type(block).__name__}")


def _width(module: nn.Module, suffix: str) -> int:
    """Physical width of a unit's module in its natural unit: groups, heads or hidden features."""
    if suffix == "groups":
        return module.norm2.num_groups
    if suffix == "heads":
        return module.heads
    if suffix == "ff":
        return module.net[2].in_features
    raise ValueError(suffix)


def _apply_kept(unet: nn.Module, name: str, kept: Sequence[int], element_size: int = 1) -> None:
    """Slice one unit to the kept elements (``[]`` skips a block)."""
    path, suffix = _split_name(name)
    module = unet.get_submodule(path)
    if suffix == "block":
        if kept:
            return
        skip_block(unet, path)
    elif suffix == "groups":
        slice_resnet_groups(module, kept)
    elif suffix == "heads":
        slice_attention_heads(module, kept)
    elif suffix == "ff":
        slice_feed_forward(module, select_channels(kept, element_size))
    else:
        raise ValueError(f"unknown unit kind in {name!r}")


def apply_widths(unet: nn.Module, widths: Mapping[str, int]) -> None:
    """Give ``unet`` the shapes of a pruned expert, keeping the first elements of every unit.

    Used when building an expert from its config (weights are loaded afterwards), so which
    elements are kept does not matter, only how many.
    """
    # Widths inside a block come before the block's own skip, which removes them.
    for name, width in sorted(widths.items(), key=lambda item: item[0].endswith(":block")):
        path, suffix = _split_name(name)
        if suffix == "block":
            if width != 0:
                raise ArchitectureError(f"{name}: a block width must be 0 (skipped), got {width}")
            _apply_kept(unet, name, [])
        elif width < 1:
            raise ArchitectureError(f"{name}: width must be >= 1, got {width}")
        else:
            _apply_kept(unet, name, list(range(width)))


def _inside_skipped(name: str, widths: Mapping[str, int]) -> bool:
    path = _split_name(name)[0]
    for other, width in widths.items():
        block = _split_name(other)[0]
        if other.endswith(":block") and width == 0 and (path == block or path.startswith(block + ".")):
            return True
    return False


def _check_kept(layout: UnitLayout, architecture: Architecture) -> None:
    empty = [n for n, kept in architecture.items() if not kept and not layout[n].is_depth]
    if empty:
        raise APTPError(f"units keep no elements (keep at least one, or skip the enclosing block): {empty[:5]}")


class APTPUNet2DConditionModel(UNet2DConditionModel):
    """A ``UNet2DConditionModel`` whose config also records its pruned widths.

    ``aptp_widths`` maps unit names to the kept width in the module's natural unit (GroupNorm
    groups, attention heads, feed-forward hidden features; 0 = skipped block). The config is the
    architecture: ``from_pretrained`` rebuilds the expert's shapes before loading its weights.
    """

    def __init__(self, *, aptp_widths: dict | None = None, **kwargs):
        super().__init__(**kwargs)
        widths = {str(k): int(v) for k, v in (aptp_widths or {}).items()}
        self.register_to_config(aptp_widths=widths)
        apply_widths(self, widths)
        check_consistency(self)


# ConfigMixin reads the accepted config keys from the __init__ signature: the base keys plus ours.
_BASE_SIGNATURE = inspect.signature(UNet2DConditionModel.__init__)
APTPUNet2DConditionModel.__init__.__signature__ = _BASE_SIGNATURE.replace(
    parameters=[*_BASE_SIGNATURE.parameters.values(),
                inspect.Parameter("aptp_widths", inspect.Parameter.KEYWORD_ONLY, default=None)]
)


def slice_unet(
    unet: UNet2DConditionModel, architecture: Mapping[str, Sequence[int]], options: UnitOptions | None = None
) -> APTPUNet2DConditionModel:
    """A physically smaller copy of ``unet`` that keeps, per unit, the given element indices.

    Units not named stay dense. The result is an :class:`APTPUNet2DConditionModel` whose config
    records the widths; it equals ``unet`` hard-gated with the same architecture.
    """
    options = options or UnitOptions()
    units = _discover(unet, options)
    layout = UnitLayout(u.spec for u in units)
    full = layout.effective_architecture(architecture)
    _check_kept(layout, full)
    work = copy.deepcopy(unet)
    widths = dict(getattr(unet.config, "aptp_widths", None) or {})
    for unit in units:
        spec = unit.spec
        kept = full.get(spec.name)
        if kept is None or len(kept) == spec.count:
            continue  # inside a skipped block, or untouched
        _apply_kept(work, spec.name, kept, spec.element_size)
        _, suffix = _split_name(spec.name)
        widths[spec.name] = 0 if suffix == "block" else _width(work.get_submodule(unit.path), suffix)
    widths = {n: w for n, w in widths.items() if n.endswith(":block") or not _inside_skipped(n, widths)}
    config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    config["aptp_widths"] = widths
    with torch.device("meta"):
        expert = APTPUNet2DConditionModel.from_config(config)
    # Loading strictly into a model built from the config alone proves the config is the architecture.
    expert.load_state_dict(work.state_dict(), strict=True, assign=True)
    expert.train(unet.training)
    return expert


def base_config(config: Mapping) -> dict:
    """A UNet config without diffusers' private keys and the expert widths: what every expert carved
    from one base UNet shares with it."""
    return {k: v for k, v in dict(config).items() if not k.startswith("_") and k != "aptp_widths"}


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
        elif isinstance(module, Attention):
            if module.inner_dim % module.heads or module.sliceable_head_dim != module.heads:
                problems.append(f"{name}: inner_dim {module.inner_dim} / heads {module.heads} "
                                f"(sliceable_head_dim {module.sliceable_head_dim})")
            if not getattr(module, "fused_projections", False):
                sizes = (module.to_q.out_features, module.to_k.out_features, module.to_v.out_features,
                         module.to_out[0].in_features)
                if sizes != (module.inner_dim, module.inner_kv_dim, module.inner_kv_dim, module.inner_dim):
                    problems.append(f"{name}: q/k/v/out sizes {sizes} but inner_dim {module.inner_dim}")
        elif isinstance(module, FeedForward):
            factor = 2 if isinstance(module.net[0], GLU_ACTIVATIONS) else 1
            if module.net[0].proj.out_features != factor * module.net[2].in_features:
                problems.append(f"{name}: projection gives {module.net[0].proj.out_features}, "
                                f"output layer takes {module.net[2].in_features}")
    widths = getattr(getattr(unet, "config", None), "aptp_widths", None) or {}
    for unit, width in widths.items():
        path, suffix = _split_name(unit)
        try:
            module = unet.get_submodule(path)
        except AttributeError:
            problems.append(f"{unit}: no module {path}")
            continue
        if suffix == "block":
            if not isinstance(module, (APTPSkippedResnet, APTPSkippedTransformer)):
                problems.append(f"{unit}: config says skipped, model has {type(module).__name__}")
        elif _width(module, suffix) != width:
            problems.append(f"{unit}: config width {width}, module has {_width(module, suffix)}")
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
        elif spec.kind == "heads":
            rows = sum(p.weight.abs().sum(1) for p in (module.to_q, module.to_k, module.to_v))
        else:
            proj = module.net[0].proj.weight.abs().sum(1)
            hidden = module.net[2].in_features
            rows = proj[:hidden] + proj[hidden:] if isinstance(module.net[0], GLU_ACTIVATIONS) else proj
        values.append(rows.float().cpu().view(spec.count, spec.element_size).sum(1))
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


def meta_twin(unet: nn.Module) -> nn.Module:
    """A weightless copy of ``unet`` with the same architecture (built from its config)."""
    with torch.device("meta"):
        return type(unet).from_config(unet.config)


def default_sample_size(unet: nn.Module) -> tuple[int, int]:
    size = unet.config.sample_size
    return (size, size) if isinstance(size, int) else tuple(size)


def measure_macs(unet: nn.Module, sample_size: tuple[int, int] | None = None,
                 text_length: int = DEFAULT_TEXT_LENGTH) -> float:
    """MACs of one forward at batch 1 counted by ``FlopCounterMode`` on a weightless twin.

    Attention uses the plain processor so its matmuls are visible to the counter.
    """
    twin = meta_twin(unet)
    twin.set_attn_processor(AttnProcessor())
    inputs = example_inputs(twin, sample_size or default_sample_size(unet), text_length)
    return flop_counter_macs(lambda: twin(**inputs))


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
    options = options or UnitOptions()
    twin = meta_twin(unet)
    units = _discover(twin, options)
    layout = UnitLayout(u.spec for u in units)

    tokens: dict[str, dict[str, int]] = {}

    def token_hook(path, role):
        def hook(module, args, output):
            tokens.setdefault(path, {})[role] = args[0].numel() // module.in_features

        return hook

    attentions = {name: m for name, m in twin.named_modules() if isinstance(m, Attention)}
    hooks = [(m.to_q, token_hook(n, "query")) for n, m in attentions.items()]
    hooks += [(m.to_k, token_hook(n, "key")) for n, m in attentions.items()]
    inputs = example_inputs(twin, sample_size, text_length)
    module_macs = trace_module_macs(twin, lambda: twin(**inputs), hooks)
    # QK^T and AV: each query token meets each key token once per channel of the inner dimension.
    def key_tokens(name: str, attn: Attention) -> int:
        return tokens[name]["query"] if cross_attention_as_self and attn.is_cross_attention else tokens[name]["key"]

    attention_core = {n: 2.0 * tokens[n]["query"] * key_tokens(n, m) * m.inner_dim
                      for n, m in attentions.items() if n in tokens}

    def subtree(path: str, table: dict[str, float], exclude: tuple[str, ...] = ()) -> float:
        return sum(v for k, v in table.items()
                   if (k == path or k.startswith(path + ".")) and not any(k.startswith(e) for e in exclude))

    element_macs = torch.zeros(layout.num_elements, dtype=torch.float64)
    element_attention = torch.zeros(layout.num_elements, dtype=torch.float64)
    parent_index = torch.full((layout.num_elements,), -1, dtype=torch.long)
    nested_total: dict[str, float] = {}
    nested_attention: dict[str, float] = {}
    for unit in units:
        spec, path = unit.spec, unit.path
        part = layout.slice_of(spec.name)
        attention = 0.0
        if spec.kind == "groups":
            total = sum(module_macs.get(f"{path}.{m}", 0.0) for m in ("conv1", "conv2", "time_emb_proj"))
        elif spec.kind == "heads":
            attention = attention_core.get(path, 0.0)
            total = attention + sum(module_macs.get(f"{path}.{m}", 0.0) for m in ("to_q", "to_k", "to_v", "to_out.0"))
        elif spec.kind == "ff":
            total = module_macs.get(f"{path}.net.0.proj", 0.0) + module_macs.get(f"{path}.net.2", 0.0)
        else:
            continue  # depth units are filled in below, once their nested units are known
        element_macs[part] = total / spec.count
        element_attention[part] = attention / spec.count
        if spec.parent is not None:
            parent_index[part] = layout.offsets[spec.parent]
            nested_total[spec.parent] = nested_total.get(spec.parent, 0.0) + total
            nested_attention[spec.parent] = nested_attention.get(spec.parent, 0.0) + attention
    for unit in units:
        spec, path = unit.spec, unit.path
        if not spec.is_depth:
            continue
        keep = (f"{path}.conv_shortcut",) if spec.kind == "resnet" else ()
        block_attention = subtree(path, attention_core)
        block_total = subtree(path, module_macs, exclude=keep) + block_attention
        element_macs[layout.offsets[spec.name]] = block_total - nested_total.get(spec.name, 0.0)
        element_attention[layout.offsets[spec.name]] = block_attention - nested_attention.get(spec.name, 0.0)

    total = sum(module_macs.values()) + sum(attention_core.values())
    total_attention = sum(attention_core.values())
    return MacsModel(
        layout=layout,
        fixed=total - float(element_macs.sum()),
        element_macs=element_macs,
        element_attention_macs=element_attention,
        parent_index=parent_index,
        fixed_attention=total_attention - float(element_attention.sum()),
        sample_size=sample_size,
        text_length=text_length,
    )


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

    def load_pipeline(self, folder, device="cpu", dtype: torch.dtype = torch.float32):
        try:
            pipeline = self.pipeline_class.from_pretrained(folder, dtype=dtype, **self.load_options)
        except Exception as error:
            raise APTPError(f"cannot load a {self.description} pipeline from {folder}: {error}") from None
        pipeline.set_progress_bar_config(disable=True)
        return pipeline.to(device)

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
