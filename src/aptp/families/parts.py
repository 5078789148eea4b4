"""What the families' architectures share: the attention heads and feed-forward chunks of diffusers
transformer blocks, units named ``PATH:KIND``, slicing and width bookkeeping by unit name, the consistency
checks of those modules, and the analytic MACs model.

Gate placement keeps a hard-gated model equal to its sliced expert:

* attention heads gate the input of ``to_out[0]``, i.e. each head's output (q/k/v are untouched, so the
  softmax temperature is unchanged);
* feed-forward chunks gate the input of ``net[2]``, the activation's output.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import torch
from diffusers.models.activations import GEGLU, GELU, ApproximateGELU, LinearActivation, SwiGLU
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention, AttnProcessor
from torch import nn

from ..config import UnitOptions
from ..costs import flop_counter_macs, trace_module_macs
from ..gates import GateSite
from ..slicing import select_channels, slice_linear
from ..units import MacsModel, UnitLayout, UnitSpec
from ..utils import APTPError

GLU_ACTIVATIONS = (GEGLU, SwiGLU)
PLAIN_ACTIVATIONS = (GELU, ApproximateGELU, LinearActivation)


class ArchitectureError(APTPError):
    """A model whose module attributes, weights and config disagree."""


@dataclass(frozen=True)
class Unit:
    spec: UnitSpec
    path: str  # module path of the owning module (ResNet, Attention, FeedForward, block)


_SUFFIX = {"groups": "groups", "heads": "heads", "ff": "ff", "resnet": "block", "transformer": "block"}


def unit_name(path: str, kind: str) -> str:
    return f"{path}:{_SUFFIX[kind]}"


def split_name(name: str) -> tuple[str, str]:
    path, _, suffix = name.rpartition(":")
    if not path:
        raise ValueError(f"not a unit name: {name!r}")
    return path, suffix


def ff_chunk_count(hidden: int, ff_chunks: int) -> int:
    """The largest number of equal chunks <= ``ff_chunks`` that divides ``hidden``."""
    return max(c for c in range(1, min(ff_chunks, hidden) + 1) if hidden % c == 0)


def block_units(block: nn.Module, path: str, parent: str | None, options: UnitOptions) -> Iterator[Unit]:
    """The heads of a transformer block's self- and cross-attention and the chunks of its feed-forward."""
    for attn_name in ("attn1", "attn2"):
        attn = getattr(block, attn_name, None)
        if isinstance(attn, Attention):
            apath = f"{path}.{attn_name}"
            yield Unit(UnitSpec(unit_name(apath, "heads"), "heads", attn.heads, attn.inner_dim // attn.heads, parent),
                       apath)
    ff = getattr(block, "ff", None)
    if isinstance(ff, FeedForward):
        hidden = ff.net[2].in_features
        chunks = ff_chunk_count(hidden, options.ff_chunks)
        fpath = f"{path}.ff"
        yield Unit(UnitSpec(unit_name(fpath, "ff"), "ff", chunks, hidden // chunks, parent), fpath)


def width_gate_site(module: nn.Module, spec: UnitSpec) -> GateSite:
    """Where the gates of a heads or feed-forward unit multiply."""
    if spec.kind == "heads":
        return GateSite(spec.name, module.to_out[0], "input", dim=-1, element_size=spec.element_size)
    if spec.kind == "ff":
        return GateSite(spec.name, module.net[2], "input", dim=-1, element_size=spec.element_size)
    raise ValueError(f"not a heads or feed-forward unit: {spec.name}")


# ---------------------------------------------------------------------------------------------
# Slicing: one function per module kind; each updates the module's attributes with its weights.


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


def slice_width_unit(module: nn.Module, suffix: str, kept: Sequence[int], element_size: int) -> None:
    """Slice a heads or feed-forward unit's module to the kept elements."""
    if suffix == "heads":
        slice_attention_heads(module, kept)
    elif suffix == "ff":
        slice_feed_forward(module, select_channels(kept, element_size))
    else:
        raise ValueError(f"not a heads or feed-forward unit kind: {suffix!r}")


def replace_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, child, new) if not child.isdigit() else parent.__setitem__(int(child), new)


def width_of(module: nn.Module, suffix: str) -> int:
    """Physical width of a heads or feed-forward unit's module: heads, or hidden features."""
    if suffix == "heads":
        return module.heads
    if suffix == "ff":
        return module.net[2].in_features
    raise ValueError(suffix)


@dataclass(frozen=True)
class Surgery:
    """How one family slices a unit (``apply_kept(model, unit_name, kept, element_size)``; ``[]`` skips a
    block), measures a unit module's width in its natural unit, and what a skipped block becomes."""

    apply_kept: Callable[[nn.Module, str, Sequence[int], int], None]
    width: Callable[[nn.Module, str], int]
    skipped_types: tuple[type, ...]


def apply_widths(model: nn.Module, widths: Mapping[str, int], surgery: Surgery) -> None:
    """Give ``model`` the shapes of a pruned expert, keeping the first elements of every unit.

    Used when building an expert from its config (weights are loaded afterwards), so which
    elements are kept does not matter, only how many.
    """
    # Widths inside a block come before the block's own skip, which removes them.
    for name, width in sorted(widths.items(), key=lambda item: item[0].endswith(":block")):
        path, suffix = split_name(name)
        if suffix == "block":
            if width != 0:
                raise ArchitectureError(f"{name}: a block width must be 0 (skipped), got {width}")
            surgery.apply_kept(model, name, [], 1)
        elif width < 1:
            raise ArchitectureError(f"{name}: width must be >= 1, got {width}")
        else:
            surgery.apply_kept(model, name, list(range(width)), 1)


def _inside_skipped(name: str, widths: Mapping[str, int]) -> bool:
    path = split_name(name)[0]
    for other, width in widths.items():
        block = split_name(other)[0]
        if other.endswith(":block") and width == 0 and (path == block or path.startswith(block + ".")):
            return True
    return False


def sliced_copy(model: nn.Module, units: list[Unit], architecture: Mapping[str, Sequence[int]], surgery: Surgery,
                sliced_class: type) -> nn.Module:
    """A physically smaller copy of ``model`` that keeps, per unit, the given element indices, as a
    ``sliced_class`` whose config records the widths (``aptp_widths``). Units not named stay dense."""
    layout = UnitLayout(u.spec for u in units)
    full = layout.effective_architecture(architecture)
    empty = [n for n, kept in full.items() if not kept and not layout[n].is_depth]
    if empty:
        raise APTPError(f"units keep no elements (keep at least one, or skip the enclosing block): {empty[:5]}")
    work = copy.deepcopy(model)
    widths = dict(getattr(model.config, "aptp_widths", None) or {})
    for unit in units:
        spec = unit.spec
        kept = full.get(spec.name)
        if kept is None or len(kept) == spec.count:
            continue  # inside a skipped block, or untouched
        surgery.apply_kept(work, spec.name, kept, spec.element_size)
        _, suffix = split_name(spec.name)
        widths[spec.name] = 0 if suffix == "block" else surgery.width(work.get_submodule(unit.path), suffix)
    widths = {n: w for n, w in widths.items() if n.endswith(":block") or not _inside_skipped(n, widths)}
    config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    config["aptp_widths"] = widths
    with torch.device("meta"):
        expert = sliced_class.from_config(config)
    # Loading strictly into a model built from the config alone proves the config is the architecture.
    expert.load_state_dict(work.state_dict(), strict=True, assign=True)
    # Buffers outside the state dict (e.g. a transformer's fixed position embedding) come from the copy.
    buffers = dict(work.named_buffers())
    for name, buffer in list(expert.named_buffers()):
        if buffer.is_meta:
            owner, _, attribute = name.rpartition(".")
            (expert.get_submodule(owner) if owner else expert)._buffers[attribute] = buffers[name]
    expert.train(model.training)
    return expert


def build_with_widths(model: nn.Module, aptp_widths: Mapping | None, surgery: Surgery,
                      check: Callable[[nn.Module], None]) -> None:
    """What a sliced class's ``__init__`` does after its base class built the dense model: record the widths in
    the config, give the modules those widths, and check the result."""
    widths = {str(k): int(v) for k, v in (aptp_widths or {}).items()}
    model.register_to_config(aptp_widths=widths)
    apply_widths(model, widths, surgery)
    check(model)


def accept_widths_in_config(sliced_class: type, base_class: type) -> None:
    """ConfigMixin reads the accepted config keys from ``__init__``'s signature: the base class's keys
    plus ``aptp_widths``."""
    signature = inspect.signature(base_class.__init__)
    sliced_class.__init__.__signature__ = signature.replace(
        parameters=[*signature.parameters.values(),
                    inspect.Parameter("aptp_widths", inspect.Parameter.KEYWORD_ONLY, default=None)])


def base_config(config: Mapping) -> dict:
    """A denoiser config without diffusers' private keys and the expert widths: what every expert carved
    from one base model shares with it."""
    return {k: v for k, v in dict(config).items() if not k.startswith("_") and k != "aptp_widths"}


# ---------------------------------------------------------------------------------------------
# Consistency


def attention_ff_problems(name: str, module: nn.Module) -> list[str]:
    """Disagreements between an Attention's or FeedForward's attributes and its weights."""
    problems = []
    if isinstance(module, Attention):
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
    return problems


def width_problems(model: nn.Module, surgery: Surgery) -> list[str]:
    """Disagreements between the config's ``aptp_widths`` and the modules."""
    problems = []
    widths = getattr(getattr(model, "config", None), "aptp_widths", None) or {}
    for unit, width in widths.items():
        path, suffix = split_name(unit)
        try:
            module = model.get_submodule(path)
        except AttributeError:
            problems.append(f"{unit}: no module {path}")
            continue
        if suffix == "block":
            if not isinstance(module, surgery.skipped_types):
                problems.append(f"{unit}: config says skipped, model has {type(module).__name__}")
        elif surgery.width(module, suffix) != width:
            problems.append(f"{unit}: config width {width}, module has {surgery.width(module, suffix)}")
    return problems


@torch.no_grad()
def attention_ff_magnitudes(module: nn.Module, spec: UnitSpec) -> torch.Tensor:
    """L1 norm of the input-side weights each element of a heads (``to_q/k/v`` rows) or feed-forward
    (``proj`` rows) unit owns."""
    if spec.kind == "heads":
        rows = sum(p.weight.abs().sum(1) for p in (module.to_q, module.to_k, module.to_v))
    else:
        proj = module.net[0].proj.weight.abs().sum(1)
        hidden = module.net[2].in_features
        rows = proj[:hidden] + proj[hidden:] if isinstance(module.net[0], GLU_ACTIVATIONS) else proj
    return rows.float().cpu().view(spec.count, spec.element_size).sum(1)


# ---------------------------------------------------------------------------------------------
# Costs


def meta_twin(model: nn.Module) -> nn.Module:
    """A weightless copy of ``model`` with the same architecture (built from its config)."""
    with torch.device("meta"):
        return type(model).from_config(model.config)


def default_sample_size(model: nn.Module) -> tuple[int, int]:
    """The latent size the model's config names."""
    size = model.config.sample_size
    return (size, size) if isinstance(size, int) else tuple(size)


def counted_macs(model: nn.Module, example_inputs: Callable, sample_size: tuple[int, int] | None,
                 text_length: int) -> float:
    """MACs of one forward at batch 1 counted by ``FlopCounterMode`` on a weightless twin; attention uses the
    plain processor so its matmuls are visible to the counter."""
    twin = meta_twin(model)
    twin.set_attn_processor(AttnProcessor())
    inputs = example_inputs(twin, sample_size or default_sample_size(model), text_length)
    return flop_counter_macs(lambda: twin(**inputs))


def analytic_macs(twin: nn.Module, units: list[Unit], inputs: dict, sample_size: tuple[int, int], text_length: int,
                  cross_attention_as_self: bool = False,
                  kept_when_skipped: Callable[[Unit], tuple[str, ...]] = lambda unit: ()) -> MacsModel:
    """Analytic MACs of one forward of ``twin`` (weightless) on ``inputs``, split into fixed MACs and
    per-element unit MACs: shapes from the forward, costs from the layer formulas. Attention matmuls use
    each attention's real key length (the text length for cross-attention); ``cross_attention_as_self``
    counts cross-attention at the image length instead (the convention behind the published APTP figures).
    A skipped block keeps the modules ``kept_when_skipped(unit)`` names (e.g. a ResNet's shortcut)."""
    layout = UnitLayout(u.spec for u in units)
    tokens: dict[str, dict[str, int]] = {}

    def token_hook(path, role):
        def hook(module, args, output):
            tokens.setdefault(path, {})[role] = args[0].numel() // module.in_features

        return hook

    attentions = {name: m for name, m in twin.named_modules() if isinstance(m, Attention)}
    hooks = [(m.to_q, token_hook(n, "query")) for n, m in attentions.items()]
    hooks += [(m.to_k, token_hook(n, "key")) for n, m in attentions.items()]
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
        block_attention = subtree(path, attention_core)
        block_total = subtree(path, module_macs, exclude=kept_when_skipped(unit)) + block_attention
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

