"""APTPPipeline's call against StableDiffusionPipeline's, argument by argument, on a tiny model whose experts are
the full model: the same images (prompts split over two experts, or given one expert)."""

import numpy as np
import pytest
import torch
from conftest import make_sd2_pipeline

from aptp.base_model import load_base_pipeline
from aptp.experts import APTPExpertBank
from aptp.families import family_of_base
from aptp.pipelines import APTPPipeline
from aptp.routing import PromptRouter
from aptp.utils import APTPError

PROMPTS = ["a red circle on a white background", 'the word "SUN" in white on a blue background']


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    base = load_base_pipeline(str(make_sd2_pipeline(tmp_path_factory.mktemp("sd2"))))
    base.set_progress_bar_config(disable=True)
    family = family_of_base(base)
    macs = family.build_macs_model(base.unet, (8, 8), 16)
    router = PromptRouter(units=macs.layout.to_dict(), num_codes=2, prompt_dim=384, arch_dim=8, hidden_dim=16,
                          hyper_hidden_dim=16)
    mixture = APTPPipeline.around(base, router, APTPExpertBank.from_base(base.unet, [{}, {}], macs))
    mixture.set_progress_bar_config(disable=True)
    return base, mixture


def generators(count: int):
    return [torch.Generator().manual_seed(i) for i in range(count)]


def compare(pair, images: int = 2, **arguments):
    base, mixture = pair
    common = dict(num_inference_steps=2, guidance_scale=4.0, generator=generators(images), **arguments)
    theirs = base(**{"prompt": PROMPTS, **common}) if "prompt_embeds" not in arguments else base(**common)
    ours = mixture(**({"prompt": PROMPTS} if "prompt_embeds" not in arguments else {"expert": [1, 0]}),
                   **{**common, "generator": generators(images)})
    return theirs, ours


@pytest.mark.parametrize("output_type", ["pt", "np", "pil", "latent"])
def test_output_types(pair, output_type):
    theirs, ours = compare(pair, output_type=output_type)
    if output_type == "pil":
        theirs_images, ours_images = [np.asarray(i) for i in theirs.images], [np.asarray(i) for i in ours.images]
        assert len(ours_images) == 2 and all(np.array_equal(a, b) for a, b in zip(theirs_images, ours_images))
    else:
        np.testing.assert_allclose(np.asarray(ours.images), np.asarray(theirs.images), rtol=0, atol=1e-5)
        if output_type == "latent":
            assert ours.images.shape == (2, 4, 8, 8)


@pytest.mark.parametrize("arguments", [
    {"num_images_per_prompt": 2}, {"eta": 0.7}, {"guidance_rescale": 0.7},
    {"negative_prompt": ["blurry", "dark"]}, {"cross_attention_kwargs": {}},
], ids=["num_images_per_prompt", "eta", "guidance_rescale", "negative_prompt", "cross_attention_kwargs"])
def test_generation_arguments(pair, arguments):
    images = 2 * arguments.get("num_images_per_prompt", 1)
    theirs, ours = compare(pair, images, output_type="pt", **arguments)
    assert ours.images.shape[0] == images and len(ours.experts) == images == len(ours.macs_fraction)
    torch.testing.assert_close(ours.images, theirs.images, rtol=0, atol=1e-5)


def test_latents_and_prompt_embeds(pair):
    base, _ = pair
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    theirs, ours = compare(pair, output_type="pt", latents=latents)
    torch.testing.assert_close(ours.images, theirs.images, rtol=0, atol=1e-5)
    embeds, negative = base.encode_prompt(PROMPTS, "cpu", 1, True, ["", ""])
    theirs, ours = compare(pair, output_type="pt", prompt_embeds=embeds, negative_prompt_embeds=negative)
    torch.testing.assert_close(ours.images, theirs.images, rtol=0, atol=1e-5)
    assert ours.experts == [1, 0]
    with pytest.raises(APTPError, match="give expert"):
        pair[1](prompt_embeds=embeds, num_inference_steps=2)


def test_callback_and_tuple_output(pair):
    seen = {"theirs": [], "ours": []}

    def callback(key):
        def record(pipeline, step, timestep, tensors):
            seen[key].append((step, int(timestep), float(tensors["latents"].abs().sum())))
            return tensors

        return record

    base, mixture = pair
    base(PROMPTS, num_inference_steps=3, guidance_scale=4.0, generator=generators(2), output_type="pt",
         callback_on_step_end=callback("theirs"), callback_on_step_end_tensor_inputs=["latents"])
    out = mixture(PROMPTS, num_inference_steps=3, generator=generators(2), output_type="pt", expert=0,
                  callback_on_step_end=callback("ours"), callback_on_step_end_tensor_inputs=["latents"],
                  return_dict=False)
    assert [s[:2] for s in seen["ours"]] == [s[:2] for s in seen["theirs"]] and len(seen["ours"]) == 3
    np.testing.assert_allclose([s[2] for s in seen["ours"]], [s[2] for s in seen["theirs"]], rtol=1e-5)
    images, experts, macs, fractions = out
    assert images.shape == (2, 3, 64, 64) and experts == [0, 0] and fractions == [1.0, 1.0]


@pytest.mark.parametrize("schedule", [{"timesteps": [999, 600, 200]}, {"sigmas": [14.0, 3.0, 0.5]}])
def test_custom_timesteps_and_sigmas(pair, schedule):
    from aptp.pipelines.schedulers import use_scheduler

    base, mixture = pair
    originals = base.scheduler, mixture.scheduler
    try:
        use_scheduler(base, "euler")
        use_scheduler(mixture, "euler")
        theirs, ours = compare(pair, output_type="pt", **schedule)
        torch.testing.assert_close(ours.images, theirs.images, rtol=0, atol=1e-5)
    finally:
        base.scheduler, mixture.scheduler = originals


def test_model_cpu_offload_one_expert_at_a_time(pair):
    """The offload hooks of diffusers, one per expert: the same images, and each expert is moved back before
    the next one denoises (on this CPU-only machine the moves are to and from the CPU; the order is what counts)."""
    _, mixture = pair
    arguments = dict(prompt=PROMPTS * 2, expert=[0, 1, 0, 1], num_inference_steps=2, max_batch_size=1)
    plain = mixture(**arguments, generator=generators(4)).images
    mixture.enable_model_cpu_offload(device="cpu")
    try:
        events, handles = [], []
        for k, expert in enumerate(mixture.experts.experts):
            handles.append(expert.register_forward_pre_hook(lambda module, args, k=k: events.append(("run", k))))
            hook = mixture._aptp_expert_hooks[k]
            hook.offload = lambda hook=hook, k=k, offload=hook.offload: (events.append(("offload", k)), offload())
        offloaded = mixture(**arguments, generator=generators(4)).images
        for handle in handles:
            handle.remove()
        assert all(hasattr(expert, "_hf_hook") for expert in mixture.experts.experts)  # hooks set again after the call
    finally:
        mixture.remove_all_hooks()
    assert not any(hasattr(expert, "_hf_hook") for expert in mixture.experts.experts)
    assert torch.equal(plain, offloaded) if isinstance(plain, torch.Tensor) else \
        all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(plain, offloaded))
    order = [k for kind, k in events if kind == "run"]
    assert sorted(set(order)) == [0, 1]
    for k in (0, 1):  # every run of expert k comes before its offload, and no other expert runs in between
        first, offload = events.index(("run", k)), events.index(("offload", k))
        assert all(event == ("run", k) for event in events[first:offload])
        assert ("run", k) not in events[offload:]
