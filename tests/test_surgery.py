"""Unit discovery, gates, slicing and the equivalence of hard-gated and sliced models."""

import pytest
import torch
from conftest import make_unet, unet_inputs
from families import random_architecture

from aptp.config import UnitOptions
from aptp.families import unet2d_condition as fam


def test_units_have_stable_names_and_sizes():
    unet = make_unet("sd1")
    layout = fam.discover_units(unet)
    names = [u.name for u in layout]
    assert names == [u.name for u in fam.discover_units(make_unet("sd1", seed=5))]
    groups = layout["down_blocks.0.resnets.0:groups"]
    assert (groups.kind, groups.count, groups.element_size) == ("groups", 8, 2)
    heads = layout["down_blocks.0.attentions.0.transformer_blocks.0.attn2:heads"]
    assert (heads.count, heads.element_size) == (2, 8)
    ff = layout["down_blocks.0.attentions.0.transformer_blocks.0.ff:ff"]
    assert ff.count * ff.element_size == 64 and ff.count == 32
    # Depth units: the last ResNet and transformer of each down/up stage, none in the mid block.
    depth = {u.name for u in layout if u.is_depth}
    assert "down_blocks.0.resnets.1:block" in depth and "down_blocks.0.attentions.1:block" in depth
    assert "up_blocks.1.resnets.2:block" in depth and "up_blocks.1.attentions.2:block" in depth
    assert not any(n.startswith("mid_block") for n in depth)
    assert "down_blocks.0.resnets.0:block" not in depth
    assert layout["down_blocks.0.resnets.1:groups"].parent == "down_blocks.0.resnets.1:block"
    assert len({u.name for u in fam.discover_units(unet, UnitOptions(depth="none")) if u.is_depth}) == 0
    all_depth = {u.name for u in fam.discover_units(unet, UnitOptions(depth="all")) if u.is_depth}
    assert "down_blocks.0.resnets.0:block" in all_depth


def test_open_gates_change_nothing_and_hooks_remove(tiny_unet):
    inputs = unet_inputs(tiny_unet)
    with torch.no_grad():
        reference = tiny_unet(**inputs).sample
    controller = fam.attach_gates(tiny_unet)
    with torch.no_grad(), controller.use(controller.layout.dense_gates(2)):
        gated = tiny_unet(**inputs).sample
    controller.remove()
    with torch.no_grad():
        after = tiny_unet(**inputs).sample
    assert torch.equal(gated, reference) and torch.equal(after, reference)


def test_per_sample_gates_and_guidance_doubling():
    unet = make_unet("sd1")
    layout = fam.discover_units(unet)
    arch_a = random_architecture(layout, ("groups", "heads", "ff", "resnet", "transformer"), seed=7)
    arch_b = random_architecture(layout, ("groups", "heads", "ff", "resnet", "transformer"), seed=8)
    gates = torch.stack([layout.gates_from_architecture(arch_a), layout.gates_from_architecture(arch_b)])
    inputs = unet_inputs(unet, batch=2)
    controller = fam.attach_gates(unet)
    with torch.no_grad():
        with controller.use(gates):
            both = unet(**inputs).sample
            # Classifier-free guidance: the latents are concatenated twice, the gates stay (B, U).
            doubled = {**inputs, "sample": torch.cat([inputs["sample"]] * 2),
                       "timestep": torch.cat([inputs["timestep"]] * 2),
                       "encoder_hidden_states": torch.cat([inputs["encoder_hidden_states"]] * 2)}
            guided = unet(**doubled).sample
        singles = []
        for i in range(2):
            with controller.use(gates[i]):
                one = {k: v[i:i + 1] for k, v in inputs.items()}
                singles.append(unet(**one).sample)
    torch.testing.assert_close(both, torch.cat(singles), rtol=0, atol=1e-5)
    torch.testing.assert_close(guided, torch.cat([both, both]), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="cannot gate a batch"):
        with controller.use(torch.ones(3, layout.num_elements)):
            unet(**inputs)


def test_gates_are_differentiable():
    unet = make_unet("sd1")
    controller = fam.attach_gates(unet)
    gates = controller.layout.dense_gates(2).requires_grad_(True)
    with controller.use(gates):
        unet(**unet_inputs(unet)).sample.square().mean().backward()
    assert gates.grad is not None and gates.grad.abs().sum() > 0
    assert (gates.grad != 0).float().mean() > 0.9  # nearly every unit element influences the output


def test_consistency_check_catches_mismatches():
    unet = make_unet("sd2")
    layout = fam.discover_units(unet)
    expert = fam.slice_unet(unet, random_architecture(layout, ("groups", "heads", "ff", "resnet"), seed=2))
    fam.check_consistency(expert)
    attn = expert.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1")
    attn.heads += 1
    with pytest.raises(fam.ArchitectureError, match="heads"):
        fam.check_consistency(expert)
    attn.heads -= 1
    expert.get_submodule("down_blocks.1.resnets.0").norm2.num_groups = 3
    with pytest.raises(fam.ArchitectureError, match="groups"):
        fam.check_consistency(expert)


def test_config_is_the_architecture(tmp_path):
    unet = make_unet("sd2")
    layout = fam.discover_units(unet)
    architecture = random_architecture(layout, ("groups", "heads", "ff", "resnet", "transformer"), seed=4)
    expert = fam.slice_unet(unet, architecture)
    widths = expert.config.aptp_widths
    assert widths and any(v == 0 for v in widths.values())
    expert.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert files == {"config.json", "diffusion_pytorch_model.safetensors"}
    reloaded = fam.APTPUNet2DConditionModel.from_pretrained(tmp_path).eval()
    assert reloaded.config.aptp_widths == widths
    inputs = unet_inputs(unet)
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).sample, expert(**inputs).sample)
    # An expert can be pruned again; widths accumulate in its config.
    again = fam.slice_unet(reloaded, {"mid_block.resnets.0:groups": [0, 1]})
    assert again.config.aptp_widths["mid_block.resnets.0:groups"] == 2
    assert set(widths) <= set(again.config.aptp_widths)


def test_skipping_a_pruned_block_later_drops_its_widths(tmp_path):
    unet = make_unet("sd1")
    first = fam.slice_unet(unet, {"down_blocks.0.resnets.1:groups": [0, 2, 5]})
    second = fam.slice_unet(first, {"down_blocks.0.resnets.1:block": []})
    assert second.config.aptp_widths == {"down_blocks.0.resnets.1:block": 0}
    second.save_pretrained(tmp_path)
    reloaded = fam.APTPUNet2DConditionModel.from_pretrained(tmp_path)
    inputs = unet_inputs(unet)
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).sample, second(**inputs).sample)


def test_slicing_rejects_empty_width_units():
    unet = make_unet("sd1")
    with pytest.raises(fam.APTPError, match="keep no elements"):
        fam.slice_unet(unet, {"mid_block.resnets.0:groups": []})
    with pytest.raises(ValueError, match="unknown unit"):
        fam.slice_unet(unet, {"nope:groups": [0]})
