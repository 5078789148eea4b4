"""The analytic MACs model against FlopCounterMode, its gate algebra, and the reference UNets."""

import pytest
import torch
from conftest import TEXT_LENGTH, make_unet

from aptp.costs import count_parameters
from aptp.families import family_named, family_of
from aptp.families import unet2d_condition as fam
from aptp.families.presets import PRESETS


def relative_error(a: float, b: float) -> float:
    return abs(a - b) / b


def test_macs_are_linear_in_gates_and_nest_depth():
    unet = make_unet("sd1")
    model = fam.build_macs_model(unet, text_length=TEXT_LENGTH)
    layout = model.layout
    ones = layout.dense_gates().double()
    assert model.macs(ones).item() == pytest.approx(model.dense)
    assert model.fraction(ones).item() == pytest.approx(1.0)

    groups = "down_blocks.0.resnets.1:groups"
    block = "down_blocks.0.resnets.1:block"
    start = layout.offsets[groups]
    one_off = ones.clone()
    one_off[start] = 0
    assert model.macs(one_off).item() == pytest.approx(model.dense - model.element_macs[start].item())
    # Skipping a block removes it and everything nested in it, whatever the nested gates say.
    skipped = model.macs_of({block: []})
    assert skipped == pytest.approx(model.dense - model.unit_macs(block) - model.unit_macs(groups))
    assert model.macs_of({block: [], groups: [0]}) == pytest.approx(skipped)

    # Differentiable: d macs / d gate = element MACs times the enclosing depth gate.
    gates = ones.clone().requires_grad_(True)
    model.macs(gates).backward()
    assert gates.grad[start].item() == pytest.approx(model.element_macs[start].item())
    batch = torch.stack([ones, one_off])
    assert model.macs(batch).shape == (2,)


def test_cross_attention_uses_text_length():
    unet = make_unet("sd1")
    short = fam.build_macs_model(unet, text_length=4)
    long = fam.build_macs_model(unet, text_length=8)
    self_attn = "down_blocks.0.attentions.0.transformer_blocks.0.attn1:heads"
    cross_attn = "down_blocks.0.attentions.0.transformer_blocks.0.attn2:heads"
    assert short.unit_macs(self_attn) == long.unit_macs(self_attn)
    assert short.unit_macs(cross_attn) < long.unit_macs(cross_attn)
    # attn1 of an only-cross-attention model attends to the text too.
    cross_only = make_unet("cross_only")
    a = fam.build_macs_model(cross_only, text_length=4).unit_macs(self_attn)
    b = fam.build_macs_model(cross_only, text_length=8).unit_macs(self_attn)
    assert a < b


@pytest.mark.parametrize(
    "name, params_m, gmacs, gmacs_no_attention",
    [("sd15", 859.5, 401.6, 338.6), ("sd21", 865.9, 1074.6, 760.5), ("sdxl", 2567.5, 3380.6, 2988.7),
     ("pixart-sigma", 610.9, 3316.8, 2155.2)],
)
def test_reference_denoisers(name, params_m, gmacs, gmacs_no_attention):
    preset = PRESETS[name]
    family = family_named(preset.family)
    with torch.device("meta"):
        unet = family.denoiser_class.from_config(preset.config)
    assert family_of(unet) is family
    size = preset.resolution // preset.vae_scale_factor
    model = family.build_macs_model(unet, (size, size), preset.text_length)
    assert count_parameters(unet) / 1e6 == pytest.approx(params_m, rel=1e-3)
    counted = family.measure_macs(unet, (size, size), preset.text_length)  # FlopCounterMode, weightless
    assert model.dense == pytest.approx(counted, rel=1e-3)
    assert model.dense / 1e9 == pytest.approx(gmacs, rel=1e-3)
    assert (model.dense - model.dense_attention) / 1e9 == pytest.approx(gmacs_no_attention, rel=1e-3)


def test_uniform_and_magnitude_architectures_hit_their_target():
    from aptp.units import uniform_width_architecture

    unet = make_unet("sd2")
    model = fam.build_macs_model(unet, text_length=TEXT_LENGTH)
    magnitudes = fam.element_magnitudes(unet)
    assert magnitudes.shape == (model.layout.num_elements,)
    for target in (0.8, 0.6):
        first = uniform_width_architecture(model, target, channel_multiple=1)
        by_magnitude = uniform_width_architecture(model, target, channel_multiple=1, scores=magnitudes)
        assert abs(model.macs_of(first) / model.dense - target) < 0.05
        assert model.macs_of(by_magnitude) == pytest.approx(model.macs_of(first))
    unit = "down_blocks.0.resnets.0:groups"
    part = magnitudes[model.layout.slice_of(unit)]
    kept = uniform_width_architecture(model, 0.6, channel_multiple=1, scores=magnitudes)[unit]
    dropped = sorted(set(range(len(part))) - set(kept))
    assert dropped and part[kept].min() >= part[dropped].max()  # the largest-norm groups stay
    # A width instead of a MACs target: that fraction of every width unit, the largest-norm elements.
    half = uniform_width_architecture(model, channel_multiple=1, scores=magnitudes, width=0.5)
    for width_unit in (u for u in model.layout if not u.is_depth):
        assert len(half[width_unit.name]) == max(1, round(0.5 * width_unit.count))
    assert set(half[unit]) <= set(kept)
    with pytest.raises(ValueError, match="either target"):
        uniform_width_architecture(model, 0.6, width=0.5)
    with pytest.raises(ValueError, match="width must be in"):
        uniform_width_architecture(model, width=1.5)
