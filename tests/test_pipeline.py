"""APTPPipeline: routing, one batch per expert, order independence, and save/load round trip."""

import pytest
import torch
from conftest import make_sd2_pipeline

from aptp.base_model import load_base_pipeline
from aptp.config import UnitOptions
from aptp.experts import APTPExpertBank
from aptp.experts.run import PrunedFor
from aptp.families import unet2d_condition as fam
from aptp.pipelines import APTPPipeline
from aptp.routing import PromptRouter
from aptp.routing.encoder import PromptEncoder
from aptp.utils import APTPError

PROMPTS = ["a red circle on a white background", 'the word "SUN" in white on a blue background',
           "three green stars on a black background", "a blue square left of a yellow cross on a gray background",
           "a purple triangle on a white background", 'the word "HI" in red on a black background']


@pytest.fixture(scope="module")
def aptp_pipeline(tmp_path_factory):
    folder = make_sd2_pipeline(tmp_path_factory.mktemp("sd2"))
    base = load_base_pipeline(str(folder))
    macs = fam.build_macs_model(base.unet, (8, 8), 16)
    torch.manual_seed(0)
    pruned_for = PrunedFor(str(folder), fam.NAME, 64, (8, 8), 16, 0.6, UnitOptions(), macs.dense)
    router = PromptRouter(units=macs.layout.to_dict(), num_codes=3, prompt_dim=384, arch_dim=8, hidden_dim=16,
                          hyper_hidden_dim=16, metadata=pruned_for.to_dict())
    with torch.no_grad():  # three clearly different experts, each the nearest code of one of the prompts
        router.hypernet[-1].weight.normal_(std=3.0)
        router.codes.copy_(router.embed(PromptEncoder().encode([PROMPTS[0], PROMPTS[1], PROMPTS[2]])))
    bank = APTPExpertBank.from_base(base.unet, router.expert_architectures(), macs, resolution=64)
    return APTPPipeline.around(base, router, bank)


def _generate(pipeline, prompts, seeds):
    return pipeline(prompts, num_inference_steps=2, generator=[torch.Generator().manual_seed(s) for s in seeds],
                    output_type="pt")


def test_experts_differ_and_macs_are_reported(aptp_pipeline):
    fractions = [aptp_pipeline.experts.macs_fraction(k) for k in range(3)]
    assert len(set(fractions)) == 3 and all(0 < f < 1 for f in fractions)
    out = _generate(aptp_pipeline, PROMPTS, range(6))
    assert out.images.shape == (6, 3, 64, 64)
    assert out.experts == aptp_pipeline.route(PROMPTS)
    assert len(set(out.experts)) >= 2, "the prompts should exercise more than one expert"
    assert out.macs_fraction == [fractions[k] for k in out.experts]


def test_save_load_generates_identical_images(aptp_pipeline, tmp_path):
    aptp_pipeline.save_pretrained(tmp_path / "aptp")
    saved = {p.suffix for p in (tmp_path / "aptp").rglob("*") if p.is_file()}
    assert ".bin" not in saved and ".pkl" not in saved
    loaded = APTPPipeline.from_pretrained(tmp_path / "aptp")
    assert loaded.pruned_for.budget == 0.6 and loaded.pruned_for.base_model == aptp_pipeline.pruned_for.base_model
    assert torch.equal(_generate(loaded, PROMPTS, range(6)).images, _generate(aptp_pipeline, PROMPTS, range(6)).images)


def test_stock_diffusers_loads_the_pipeline_and_a_pipeline_with_an_expert(aptp_pipeline, tmp_path):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    aptp_pipeline.save_pretrained(tmp_path / "aptp")
    card = (tmp_path / "aptp" / "README.md").read_text()
    assert "MACs budget: 0.6" in card and "| 2 | " in card and "trust_remote_code=True" in card
    # diffusers runs the folder's module file (it imports APTPPipeline from aptp) only when trusted.
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        DiffusionPipeline.from_pretrained(tmp_path / "aptp")
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "aptp", trust_remote_code=True)
    assert type(loaded) is APTPPipeline
    assert torch.equal(_generate(loaded, PROMPTS, range(6)).images, _generate(aptp_pipeline, PROMPTS, range(6)).images)
    # aptp never runs a module file other than the one it writes.
    (tmp_path / "aptp" / "aptp_pipeline.py").write_text("import os\n")
    with pytest.raises(APTPError, match="refusing to run it"):
        APTPPipeline.from_pretrained(tmp_path / "aptp")

    # A Stable Diffusion pipeline whose UNet is an expert saves and reloads with stock diffusers.
    single = aptp_pipeline.expert_pipeline(1)
    single.save_pretrained(tmp_path / "sd-expert")
    reloaded = StableDiffusionPipeline.from_pretrained(tmp_path / "sd-expert")
    assert type(reloaded.unet) is fam.APTPUNet2DConditionModel
    assert reloaded.unet.config.aptp_widths == aptp_pipeline.experts[1].config.aptp_widths
    for a, b in zip(reloaded.unet.parameters(), aptp_pipeline.experts[1].parameters()):
        assert torch.equal(a, b)


def test_bad_calls_are_clear_errors(aptp_pipeline):
    with pytest.raises(APTPError, match="non-empty"):
        aptp_pipeline(["a red circle", "  "])
    with pytest.raises(APTPError, match="one entry per prompt"):
        aptp_pipeline(["a", "b"], generator=[torch.Generator()])


@pytest.mark.parametrize("settings, message", [
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"num_inference_steps": -1}, "num_inference_steps"),
    ({"num_inference_steps": 2.5}, "num_inference_steps"),
    ({"guidance_scale": float("nan")}, "guidance_scale"),
    ({"guidance_scale": -1.0}, "guidance_scale"),
    ({"height": 64}, "both height and width"),
    ({"height": 72, "width": 64}, "multiple of"),
    ({"height": 0, "width": 0}, "multiple of"),
    ({"output_type": "latentz"}, "output_type"),
    ({"max_batch_size": 0}, "max_batch_size"),
])
def test_bad_generation_settings_are_refused_before_any_work(aptp_pipeline, settings, message, monkeypatch):
    monkeypatch.setattr(type(aptp_pipeline), "route", lambda *args: pytest.fail("routed despite bad settings"))
    with pytest.raises(APTPError, match=message):
        aptp_pipeline(["a red circle"], **settings)


def test_a_very_long_prompt_is_one_line_of_warning(aptp_pipeline, capfd, caplog):
    capfd.readouterr()
    out = aptp_pipeline(["a red circle " * 800], num_inference_steps=1, output_type="pt")
    assert out.images.shape[0] == 1
    logged = [r.getMessage() for r in caplog.records]
    assert any("longer than the 16 tokens" in m for m in logged) and sum(len(m) for m in logged) < 1000
    assert len(capfd.readouterr().err) < 1000


def test_small_batches_give_the_same_images(aptp_pipeline):
    generators = [torch.Generator().manual_seed(i) for i in range(6)]
    chunked = aptp_pipeline(PROMPTS, generator=generators, num_inference_steps=2, output_type="pt", max_batch_size=1)
    torch.testing.assert_close(chunked.images, _generate(aptp_pipeline, PROMPTS, range(6)).images, rtol=0, atol=1e-5)


def test_world_teacher_experts_batch_independently(tmp_path):
    """The same on the shipped world teacher: three experts of different sizes, mixed prompts."""
    from aptp.families.unet2d_condition import build_macs_model
    from aptp.teacher.components import load_teacher
    from aptp.units import uniform_width_architecture

    base = load_teacher()
    macs = build_macs_model(base.unet, (16, 16), 32)
    router = PromptRouter(units=macs.layout.to_dict(), num_codes=3, prompt_dim=384, arch_dim=8, hidden_dim=16,
                          hyper_hidden_dim=16)
    with torch.no_grad():
        router.codes.copy_(router.embed(PromptEncoder().encode(PROMPTS[:3])))
    architectures = [uniform_width_architecture(macs, t) for t in (0.8, 0.6, 0.4)]
    bank = APTPExpertBank.from_base(base.unet, architectures, macs, resolution=64)
    pipeline = APTPPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                            scheduler=base.scheduler, router=router, experts=bank)
    together = _generate(pipeline, PROMPTS, range(6))
    assert len(set(together.experts)) == 3
    alone = torch.cat([_generate(pipeline, [p], [i]).images for i, p in enumerate(PROMPTS)])
    order = [5, 2, 0, 4, 1, 3]
    shuffled = _generate(pipeline, [PROMPTS[i] for i in order], order).images
    torch.testing.assert_close(alone, together.images, rtol=0, atol=1e-5)
    torch.testing.assert_close(shuffled, together.images[order], rtol=0, atol=1e-5)


def test_feature_caching_and_solvers(aptp_pipeline):
    from diffusers import UniPCMultistepScheduler

    from aptp.pipelines.schedulers import scheduler_class, use_scheduler

    def generate(pipeline, **kwargs):
        return pipeline(PROMPTS[:2], num_inference_steps=4, output_type="pt",
                        generator=[torch.Generator().manual_seed(i) for i in range(2)], **kwargs).images

    plain = generate(aptp_pipeline)
    assert torch.equal(generate(aptp_pipeline, cache_interval=1), plain), "no caching changes nothing"
    cached = generate(aptp_pipeline, cache_interval=2)
    assert cached.shape == plain.shape and not torch.equal(cached, plain)
    assert torch.equal(generate(aptp_pipeline), plain), "the experts are restored after a cached call"
    with pytest.raises(APTPError, match="cache_interval"):
        generate(aptp_pipeline, cache_interval=0)

    assert scheduler_class("unipc") is UniPCMultistepScheduler is scheduler_class("UniPCMultistepScheduler")
    with pytest.raises(APTPError, match="unknown scheduler"):
        scheduler_class("fastest")
    original = aptp_pipeline.scheduler
    try:
        use_scheduler(aptp_pipeline, "dpm++")
        assert type(aptp_pipeline.scheduler).__name__ == "DPMSolverMultistepScheduler"
        assert aptp_pipeline.scheduler.config.prediction_type == original.config.prediction_type
        assert type(aptp_pipeline.expert_pipeline(0).scheduler) is type(aptp_pipeline.scheduler)
        solved = generate(aptp_pipeline)
        assert solved.shape == plain.shape and not torch.equal(solved, plain)
    finally:
        aptp_pipeline.scheduler = original


def test_frontier_measures_every_setting(aptp_pipeline, tmp_path):
    from aptp.benchmarks.frontier import Setting, default_settings, format_frontier, pareto_front, run_frontier

    assert pareto_front({"a": (1.0, 0.9), "b": (2.0, 0.8), "c": (0.5, 0.85), "d": (2.0, 0.8)}) == ["a", "b", "d"]
    aptp_pipeline.save_pretrained(tmp_path / "aptp")
    aptp_pipeline.experts[2].save_pretrained(tmp_path / "small")
    assert {"dense", "APTP", "APTP cache 2", "dense dpm++ 2 steps", "small"} <= {
        s.name for s in default_settings(4, ["small"])}
    # Three settings: each costs one FID (a 2048-wide matrix square root, seconds on a CPU).
    settings = [Setting("dense", "dense", 2), Setting("APTP unipc cache 2", "APTP", 2, "unipc", 2),
                Setting("small", "small", 2)]
    result = run_frontier(tmp_path / "aptp", {"small": tmp_path / "small"}, tmp_path / "frontier", steps=2,
                          per_category=1, batch_size=2, repeats=1, settings=settings)
    rows = result["settings"]
    assert list(rows) == [s.name for s in settings]
    assert rows["dense"]["speedup"] == 1.0 and rows["dense"]["relative_accuracy"] == 1.0
    assert all(r["images_per_s"] > 0 and 0 <= r["world_accuracy"] <= 1 for r in rows.values())
    assert rows["small"]["macs_fraction"] < 1 and result["pareto_front"]
    assert 0 < result["routing_overhead"]["fraction_of_generation"] < 1
    assert (tmp_path / "frontier" / "frontier.png").stat().st_size > 0
    assert "routing overhead" in format_frontier(result)
