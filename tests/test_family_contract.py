"""The contract every registered model family keeps, checked on each family's tiny models: gated == sliced
for every unit kind, analytic MACs == FlopCounterMode, the sliced model's save/load round trip, and an
APTPPipeline over the family whose images do not depend on which prompts share a call."""

import json

import pytest
import torch
from PIL import Image
from families import DENOISERS, TINY_FAMILIES, random_architecture

from aptp.base_model import load_base_pipeline
from aptp.config import UnitOptions
from aptp.experts import APTPExpertBank
from aptp.experts.run import load_run
from aptp.families import FAMILIES, family_of, family_of_base
from aptp.pipelines import APTPPipeline
from aptp.routing import PromptRouter
from aptp.routing.encoder import PromptEncoder


DEPTH = UnitOptions(depth="all")  # every unit kind, whole blocks included


def example(family, model, text_length: int, batch: int = 2, seed: int = 1) -> dict:
    """The family's example inputs with fixed random values and distinct timesteps."""
    inputs = family.example_inputs(model, family.default_sample_size(model), text_length, batch)
    generator = torch.Generator().manual_seed(seed)

    def fill(value):
        if value is None:
            return None
        if isinstance(value, dict):
            return {k: fill(v) for k, v in value.items()}
        return torch.randn(value.shape, generator=generator) if value.is_floating_point() else value

    inputs = {k: fill(v) for k, v in inputs.items()}
    inputs["timestep"] = torch.tensor([10, 700][:batch] + [400] * max(0, batch - 2))
    return inputs


@pytest.fixture(params=DENOISERS, ids=[f"{f}-{v}" for f, v in DENOISERS])
def denoiser(request):
    family_name, variant = request.param
    model = TINY_FAMILIES[family_name].denoisers[variant]()
    return FAMILIES[family_name], model, TINY_FAMILIES[family_name].text_length


def test_every_family_has_tiny_models():
    assert set(TINY_FAMILIES) == set(FAMILIES), "add the new family's tiny builders to tests/families.py"


def test_the_registry_finds_the_family(denoiser):
    family, model, _ = denoiser
    assert family_of(model) is family and FAMILIES[family.name] is family
    assert family.owns(model) and issubclass(family.sliced_class, family.denoiser_class)


@pytest.mark.parametrize("kinds", [("groups",), ("heads",), ("ff",), ("resnet", "transformer"), "all"])
def test_hard_gates_equal_the_sliced_expert(denoiser, kinds):
    family, model, text_length = denoiser
    layout = family.discover_units(model, DEPTH)
    present = sorted({u.kind for u in layout})
    kinds = present if kinds == "all" else [k for k in kinds if k in present]
    if not kinds:
        pytest.skip(f"this family has no {kinds} units")
    architecture = random_architecture(layout, kinds, seed=3, skip_prob=1.0 if kinds != present else 0.5)
    inputs = example(family, model, text_length)
    controller = family.attach_gates(model, DEPTH)
    try:
        with torch.no_grad(), controller.use(layout.gates_from_architecture(architecture)):
            gated = model(**inputs).sample
    finally:
        controller.remove()
    expert = family.slice(model, architecture, DEPTH)
    family.check_consistency(expert)
    with torch.no_grad():
        sliced, dense = expert(**inputs).sample, model(**inputs).sample
    torch.testing.assert_close(sliced, gated, rtol=0, atol=1e-5)
    assert (dense - sliced).abs().max() > 1e-4, "the pruning did change the function"
    assert sum(p.numel() for p in expert.parameters()) < sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("seed", [0, 1])
def test_macs_model_matches_the_flop_counter(denoiser, seed):
    family, model, text_length = denoiser
    macs = family.build_macs_model(model, text_length=text_length, options=DEPTH)
    assert abs(macs.dense - family.measure_macs(model, text_length=text_length)) / macs.dense < 0.01
    architecture = random_architecture(macs.layout, sorted({u.kind for u in macs.layout}), seed)
    counted = family.measure_macs(family.slice(model, architecture, DEPTH), text_length=text_length)
    assert counted < macs.dense and abs(macs.macs_of(architecture) - counted) / counted < 0.01


def test_sliced_expert_saves_and_loads_as_itself(denoiser, tmp_path):
    family, model, text_length = denoiser
    layout = family.discover_units(model)
    expert = family.slice(model, random_architecture(layout, sorted({u.kind for u in layout}), seed=4))
    expert.save_pretrained(tmp_path / "expert")
    assert not list((tmp_path / "expert").glob("*.bin"))
    loaded = family.sliced_class.from_pretrained(tmp_path / "expert").eval()
    assert json.dumps(family.base_config(loaded.config)) == json.dumps(family.base_config(model.config))
    inputs = example(family, model, text_length)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).sample, expert.eval()(**inputs).sample)


PROMPTS = ["a red circle on a white background", 'the word "SUN" in white on a blue background',
           "three green stars on a black background", "a purple triangle on a white background"]


@pytest.mark.parametrize("family_name", sorted(TINY_FAMILIES))
def test_a_mixture_over_the_family_is_order_independent(family_name, tmp_path):
    base = load_base_pipeline(str(TINY_FAMILIES[family_name].pipeline(tmp_path)))
    family = family_of_base(base)
    assert family.name == family_name
    denoiser = family.denoiser(base)
    conditioning = family.encode_prompts(base, PROMPTS[:2], "cpu")
    latents = torch.randn(2, denoiser.config.in_channels, *family.default_sample_size(denoiser))
    assert family.denoise(denoiser, latents, torch.tensor([3, 500]), conditioning).shape == latents.shape
    macs = family.build_macs_model(denoiser, family.default_sample_size(denoiser), family.text_length(base))
    torch.manual_seed(0)
    router = PromptRouter(units=macs.layout.to_dict(), num_codes=2, prompt_dim=384, arch_dim=8, hidden_dim=16,
                          hyper_hidden_dim=16)
    with torch.no_grad():  # two clearly different experts, the nearest codes of the first two prompts
        router.hypernet[-1].weight.normal_(std=3.0)
        router.codes.copy_(router.embed(PromptEncoder().encode(PROMPTS[:2])))
    mixture = APTPPipeline.around(base, router, APTPExpertBank.from_base(denoiser, router.expert_architectures(), macs))

    def generate(prompts, seeds):
        return mixture(prompts, num_inference_steps=2, output_type="pt",
                       generator=[torch.Generator().manual_seed(s) for s in seeds])

    together = generate(PROMPTS, range(4))
    assert len(set(together.experts)) == 2
    alone = torch.cat([generate([p], [i]).images for i, p in enumerate(PROMPTS)])
    order = [2, 0, 3, 1]
    torch.testing.assert_close(alone, together.images, rtol=0, atol=1e-5)
    torch.testing.assert_close(generate([PROMPTS[i] for i in order], order).images, together.images[order],
                               rtol=0, atol=1e-5)


def test_feature_cache_reuses_only_the_deep_path(denoiser):
    family, model, text_length = denoiser
    a, b = example(family, model, text_length, seed=1), example(family, model, text_length, seed=2)
    deep = family.deep_modules(model)
    assert deep, "a family must name the deep modules caching may reuse"
    runs = []  # calls of the deep modules' insides: none on a cached step
    hooks = [inner.register_forward_hook(lambda *_: runs.append(1))
             for path in deep for name, inner in model.get_submodule(path).named_modules() if name]
    with torch.no_grad():
        plain_a, plain_b = model(**a).sample, model(**b).sample
        with family.feature_cache(model, 2):
            steps = []
            for inputs in (a, a, b, a):  # whole, cached, whole, cached
                before = len(runs)
                steps.append((model(**inputs).sample, len(runs) > before))
        after = model(**a).sample
    for hook in hooks:
        hook.remove()
    assert [ran for _, ran in steps] == [True, False, True, False]
    assert torch.equal(steps[0][0], plain_a) and torch.equal(steps[2][0], plain_b)
    # Reused residuals add back to their input: equal up to rounding.
    torch.testing.assert_close(steps[1][0], plain_a, rtol=0, atol=1e-6 if family.residual_cache else 0,
                               msg="the same input with its own deep features is the uncached output")
    assert not torch.allclose(steps[3][0], plain_a, atol=1e-4), "a cached step uses the deep features of the last whole one"
    assert torch.equal(after, plain_a), "leaving the block restores the model"


@pytest.mark.parametrize("family_name", sorted(TINY_FAMILIES))
def test_the_cli_flow_runs_on_the_family(family_name, tmp_path):
    """prune -> assign -> finetune -> export -> generate on the family's tiny pipeline folder."""
    from aptp.cli import main
    from aptp.world import export_imagefolder

    pipeline = TINY_FAMILIES[family_name].pipeline(tmp_path / "base")
    export_imagefolder(tmp_path / "data", 12, "train", seed=0)
    router, assign, experts = (str(tmp_path / name) for name in ("prune/router", "assign", "experts"))
    assert main(["prune", "--output-dir", str(tmp_path / "prune"), "--config", "world", "--set", f"model={pipeline}",
                 f"data={tmp_path / 'data'}", "train_size=8", "val_size=4", "steps=2", "warmup_steps=1",
                 "batch_size=4", "num_codes=2", "arch_dim=8", "hidden_dim=16", "hyper_hidden_dim=16",
                 "validate_every=0", "difficulty_rows=8"]) == 0
    assert load_run(router).family is FAMILIES[family_name]
    assert main(["assign", "--router", router, "--output-dir", assign]) == 0
    assert main(["finetune", "--router", router, "--assign", assign, "--output-dir", experts, "--all", "--set",
                 "steps=1", "batch_size=4", "validation_prompts=0"]) == 0
    assert main(["export", "--router", router, "--experts", experts, "--output-dir", str(tmp_path / "pipeline"),
                 "--allow-untrained-experts"]) == 0
    mixture = APTPPipeline.from_pretrained(tmp_path / "pipeline")
    assert mixture.family is FAMILIES[family_name]
    assert main(["generate", "--pipeline", str(tmp_path / "pipeline"), "--output-dir", str(tmp_path / "images"),
                 "--steps", "2", PROMPTS[0], PROMPTS[1]]) == 0
    assert len(list((tmp_path / "images").glob("*.png"))) == 2
    assert main(["generate", "--pipeline", str(tmp_path / "pipeline"), "--output-dir", str(tmp_path / "small"),
                 "--steps", "2", "--resolution", "32", PROMPTS[0]]) == 0
    assert Image.open(tmp_path / "small" / "00000.png").size == (32, 32)
    assert main(["evaluate", "--pipeline", str(tmp_path / "pipeline"), "--output-dir", str(tmp_path / "report"),
                 "--set", "per_category=1", "steps=2", "latency_repeats=1"]) == 0
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert set(metrics["models"]) == {"dense", "APTP"}
