"""``APTPPipeline``: route each prompt to its expert, denoise every expert's prompts as one batch.

Components: the base pipeline's VAE, text encoder, tokenizer and scheduler, the ``PromptRouter``
and the ``APTPExpertBank``. The prompt encoder (a sentence-transformer) is named in the router's
config and loaded on first use.
"""

from __future__ import annotations

import logging
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.utils import logging as diffusers_logging

from ..caching import check_interval
from ..config import DEFAULT_MAX_BATCH_SIZE
from ..experts import APTPExpertBank
from ..experts.run import PrunedFor
from ..families import ModelFamily, family_named
from ..imaging import to_pil
from ..routing import PromptRouter
from ..routing.encoder import PromptEncoder
from ..utils import APTPError, error_summary, read_json, write_json_atomic

logger = diffusers_logging.get_logger(__name__)


class _NoEmptyFloat32Warning(logging.Filter):
    """diffusers' ``ModelMixin.to`` warns that a dtype cast may break modules kept in float32 even when a model
    keeps none (``[]``), on every cast of every component: only that empty case is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "that should be kept in float32: []" not in record.getMessage()


logging.getLogger("diffusers.models.modeling_utils").addFilter(_NoEmptyFloat32Warning())


@contextmanager
def quiet_truncation(family: ModelFamily):
    """diffusers pipelines log the whole cut-off part of a long prompt (hundreds of KB for a long caption);
    :meth:`APTPPipeline.warn_truncated` says it in one line instead."""
    pipeline_logger = logging.getLogger(family.pipeline_class.__module__)
    level = pipeline_logger.level
    pipeline_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        pipeline_logger.setLevel(level)


@dataclass
class APTPPipelineOutput(BaseOutput):
    """Images in the caller's order (the images of one prompt together), with the expert and MACs of each."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    experts: list[int]
    macs: list[float]
    macs_fraction: list[float]


COMPONENTS = ("vae", "text_encoder", "tokenizer", "scheduler", "router", "experts")
# diffusers finds a pipeline class outside its own package through a module file in the folder, named in
# ``_class_name``; this one only imports the installed aptp package.
CODE_FILE = "aptp_pipeline.py"
CODE = ('"""Lets `diffusers.DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` load this folder:\n'
        'the pipeline class is the one of the installed aptp package."""\n\n'
        "from aptp.pipelines.aptp import APTPPipeline  # noqa: F401\n")


def check_pipeline_folder(folder: str | os.PathLike) -> Path:
    """Refuse, before anything loads, a folder that is not a whole ``APTPPipeline`` (`aptp export`)."""
    folder = Path(folder)
    if not folder.is_dir():
        what = "a file" if folder.exists() else "no such folder"
        raise APTPError(f"{folder} is not an APTPPipeline folder ({what}); see `aptp export`")
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise APTPError(f"{folder} is not an APTPPipeline folder (no model_index.json); see `aptp export`")
    index = read_json(index_file)
    kind = index.get("_class_name") if isinstance(index, dict) else None
    if kind not in (APTPPipeline.__name__, [Path(CODE_FILE).stem, APTPPipeline.__name__]):
        raise APTPError(f"{folder} is not an APTPPipeline folder (it holds a {kind or 'damaged model index'}); "
                        "see `aptp export`")
    if isinstance(kind, list):
        try:
            code = (folder / CODE_FILE).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            code = None
        if code != CODE:  # diffusers would execute this file: only the one aptp writes is run
            raise APTPError(f"{folder / CODE_FILE} is missing or not the file `aptp export` writes; refusing to run "
                            "it (export the pipeline again)")
    missing = [name for name in COMPONENTS if name not in index or not (folder / name).is_dir()]
    if missing:
        raise APTPError(f"{folder} is an incomplete APTPPipeline folder (no {', '.join(missing)} folder)")
    return folder


def _is_hub_id(source: str) -> bool:
    return source.count("/") == 1 and not source.startswith((".", "/", "~")) and not os.path.exists(source)


class APTPPipeline(DiffusionPipeline):
    # The base pipeline's components besides its denoiser: every family has the first four; SDXL also the _2s.
    _optional_components = ["text_encoder_2", "tokenizer_2"]
    # The experts are not in the chain: each is offloaded on its own (enable_model_cpu_offload).
    model_cpu_offload_seq = "text_encoder->text_encoder_2->vae"

    def __init__(self, vae, text_encoder, tokenizer, scheduler, router: PromptRouter, experts: APTPExpertBank,
                 text_encoder_2=None, tokenizer_2=None):
        super().__init__()
        if len(experts) != router.num_codes:
            raise APTPError(f"the router has {router.num_codes} codes but the bank holds {len(experts)} experts")
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                              router=router, experts=experts, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
        self._prompt_encoder = None

    @classmethod
    def around(cls, base, router: PromptRouter, experts: APTPExpertBank) -> "APTPPipeline":
        """The mixture over ``base`` (the base model's pipeline): its components except the denoiser, which the
        experts replace."""
        return cls(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, scheduler=base.scheduler,
                   router=router, experts=experts, text_encoder_2=getattr(base, "text_encoder_2", None),
                   tokenizer_2=getattr(base, "tokenizer_2", None))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "APTPPipeline":
        """Load a folder written by :meth:`save_pretrained` (or a hub id). A missing, damaged or other kind
        of folder raises :class:`APTPError` with one line naming it."""
        source = str(pretrained_model_name_or_path)
        if not _is_hub_id(source):
            # A checked folder's code file is the fixed import of this class, so diffusers may run it.
            kwargs.setdefault("trust_remote_code", (check_pipeline_folder(source) / CODE_FILE).is_file())
        try:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        except APTPError:
            raise
        except Exception as error:  # a damaged config or weights file, or a hub id that cannot be reached
            raise APTPError(f"cannot load the APTPPipeline {source} ({type(error).__name__}: "
                            f"{error_summary(error)})") from None

    def to(self, *args, **kwargs) -> "APTPPipeline":
        """diffusers' ``to``; the router stays in float32, so routing does not depend on the serving dtype."""
        super().to(*args, **kwargs)
        self.router.float()
        return self

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str | None = None) -> None:
        """diffusers' model CPU offload, with every expert a model of its own: an expert moves to the
        accelerator when it first denoises in a call and back to the CPU when the call moves on to the next
        expert, so at most one expert is on the accelerator at a time. The router stays on the CPU."""
        super().enable_model_cpu_offload(gpu_id, device)
        from accelerate import cpu_offload_with_hook

        last_encoder = self.text_encoder_2 if self.text_encoder_2 is not None else self.text_encoder
        previous = next((hook for hook in self._all_hooks if hook.model is last_encoder), None)
        # Installed below the bank's own hook, so diffusers' remove_all_hooks (recursive) removes them too.
        self._aptp_expert_hooks = [cpu_offload_with_hook(expert, self._offload_device, prev_module_hook=previous)[1]
                                   for expert in self.experts.experts]
        self._all_hooks.extend(self._aptp_expert_hooks)

    def _offload_expert(self, index: int) -> None:
        hooks = getattr(self, "_aptp_expert_hooks", None)
        if hooks and getattr(self, "_all_hooks", None):
            hooks[index].offload()

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """diffusers' ``save_pretrained``, plus the module file that lets ``DiffusionPipeline.from_pretrained``
        find this class (``_class_name`` names it)."""
        super().save_pretrained(save_directory, **kwargs)
        folder = Path(save_directory)
        (folder / CODE_FILE).write_text(CODE, encoding="utf-8")
        (folder / "README.md").write_text(self.model_card(), encoding="utf-8")
        index = read_json(folder / "model_index.json")
        index["_class_name"] = [Path(CODE_FILE).stem, type(self).__name__]
        write_json_atomic(folder / "model_index.json", index)

    def model_card(self) -> str:
        """A model card (Markdown): base model, budget, resolution, each expert's MACs and share, loading."""
        pruned_for, bank = self.pruned_for, self.experts.config
        shares = bank.expert_shares or [None] * len(self.experts)
        steps = bank.expert_finetune_steps or [None] * len(self.experts)
        rows = "\n".join(
            f"| {k} | {self.experts.macs_fraction(k):.3f} | {bank.expert_macs[k] / 1e9:.3f} | "
            f"{'-' if shares[k] is None else f'{shares[k]:.1%}'} | {'-' if steps[k] is None else steps[k]} |"
            for k in range(len(self.experts)))
        return f"""---
library_name: diffusers
tags: [aptp, pruning, text-to-image]
---

# APTP pipeline: {len(self.experts)} pruned experts of `{pruned_for.base_model}`

A prompt router sends each prompt to one of {len(self.experts)} experts pruned from the base model's UNet
(prompt-based pruning, APTP); prompts routed to the same expert are denoised together.

- base model: `{pruned_for.base_model}`
- MACs budget: {pruned_for.budget} of the dense UNet ({bank.dense_macs / 1e9:.3f} GMACs per UNet call at
  {pruned_for.resolution} px, {pruned_for.text_length} text tokens)
- resolution: {pruned_for.resolution} px; prompt encoder of the router: `{self.router.config.prompt_encoder}`

| expert | MACs fraction | GMACs per UNet call | share of validation prompts | fine-tuning steps |
|---|---|---|---|---|
{rows}

## Loading

```python
from aptp.pipelines import APTPPipeline
pipe = APTPPipeline.from_pretrained("PATH")
# or, with diffusers alone (the folder's aptp_pipeline.py imports the class from the aptp package):
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained("PATH", trust_remote_code=True)
out = pipe(["a red circle on a white background"], num_inference_steps=25)
out.images, out.experts, out.macs_fraction
```
"""

    @property
    def prompt_encoder(self) -> PromptEncoder:
        if self._prompt_encoder is None:
            self._prompt_encoder = PromptEncoder(self.router.config.prompt_encoder, self.device)
        return self._prompt_encoder

    def route(self, prompts: list[str]) -> list[int]:
        """Expert of every prompt: deterministic, independent of the other prompts in the call."""
        embeddings = self.prompt_encoder.encode(prompts).to(self.router.device, self.router.dtype)
        return self.router.route(embeddings).tolist()

    @property
    def pruned_for(self) -> PrunedFor:
        """What the router was pruned for: base model, resolution, text length, budget."""
        return PrunedFor.from_dict(self.router.config.metadata or {})

    @property
    def family(self) -> ModelFamily:
        return family_named(self.experts.config.family)

    def expert_pipeline(self, index: int):
        """The base model's own text-to-image pipeline over expert ``index``, sharing this pipeline's components."""
        pipeline = self.family.pipeline_around(self, self.experts[index])
        pipeline.set_progress_bar_config(**{"disable": False, **getattr(self, "_progress_bar_config", {})})
        return pipeline

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None,
                 num_inference_steps: int = 25, guidance_scale: float = 4.0,
                 generator: torch.Generator | list[torch.Generator] | None = None, height: int | None = None,
                 width: int | None = None, output_type: str = "pil",
                 max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, cache_interval: int = 1, num_images_per_prompt: int = 1,
                 eta: float = 0.0, latents: torch.Tensor | None = None, prompt_embeds: torch.Tensor | None = None,
                 negative_prompt_embeds: torch.Tensor | None = None, expert: int | list[int] | None = None,
                 return_dict: bool = True, cross_attention_kwargs: dict | None = None, guidance_rescale: float = 0.0,
                 callback_on_step_end=None, callback_on_step_end_tensor_inputs: list[str] = ("latents",),
                 timesteps: list[int] | None = None, sigmas: list[float] | None = None, clip_skip: int | None = None):
        """Generate ``num_images_per_prompt`` images per prompt; the arguments are those of the base model's
        pipeline (e.g. ``StableDiffusionPipeline``), and every expert's batch is one call of it.

        Routing needs the prompt text: with ``prompt_embeds`` instead, give ``expert`` (one index, or one per
        prompt); ``expert`` with text prompts overrides the router. Pass one generator per image for results
        that do not depend on which other prompts share the call; ``latents`` has one row per image. Each
        expert denoises its prompts in batches of at most ``max_batch_size``, so memory does not grow with
        the number of prompts; ``callback_on_step_end`` is called at every step of every such batch.
        ``cache_interval`` N > 1 reuses each expert's deep features between every N-th step (DeepCache,
        :mod:`aptp.caching`); 1 computes every step whole. ``output_type``: ``pil``, ``np``, ``pt`` or
        ``latent``. Returns an :class:`APTPPipelineOutput` (images, and the expert and MACs of each image),
        or with ``return_dict=False`` the tuple of its fields."""
        if prompt_embeds is None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else []
            if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
                raise APTPError("prompt must be a non-empty string or a non-empty list of non-empty strings")
            count = len(prompts)
        else:
            if prompt is not None:
                raise APTPError("give prompt or prompt_embeds, not both")
            if not isinstance(prompt_embeds, torch.Tensor) or prompt_embeds.dim() != 3:
                raise APTPError("prompt_embeds must be a (prompts, tokens, width) tensor")
            prompts, count = None, len(prompt_embeds)
            if expert is None:
                raise APTPError("routing needs the prompt text: with prompt_embeds, give expert (an index, or one "
                                "per prompt)")
        self.check_settings(num_inference_steps, guidance_scale, height, width, output_type, max_batch_size)
        check_interval(cache_interval)
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) \
                or num_images_per_prompt < 1:
            raise APTPError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}")
        images = count * num_images_per_prompt
        negatives = negative_prompt if isinstance(negative_prompt, list) else [negative_prompt] * count
        generators = generator if isinstance(generator, list) else [generator] * images
        if len(negatives) != count or len(generators) != images:
            raise APTPError("negative_prompt lists must have one entry per prompt, generator lists one per image")
        if any(n is not None and not isinstance(n, str) for n in negatives):
            raise APTPError("negative_prompt must be a string, a list of strings (one per prompt) or None")
        if generator is not None and not all(isinstance(g, torch.Generator) for g in generators):
            raise APTPError("generator must be a torch.Generator, a list of them (one per image) or None")
        for name, tensor, rows in (("latents", latents, images), ("negative_prompt_embeds", negative_prompt_embeds,
                                                                   count)):
            if tensor is not None and (not isinstance(tensor, torch.Tensor) or len(tensor) != rows):
                raise APTPError(f"{name} must be a tensor with {rows} rows (one per "
                                f"{'image' if name == 'latents' else 'prompt'})")
        if prompts is not None:
            self.warn_truncated(prompts)
        routes = self._routes(prompts, count, expert)
        n = num_images_per_prompt
        stacked = None  # one tensor of every image, filled chunk by chunk: no second copy of all images
        with quiet_truncation(self.family):
            for k in sorted(set(routes)):
                routed = [i for i, r in enumerate(routes) if r == k]
                for start in range(0, len(routed), max_batch_size):
                    members = routed[start:start + max_batch_size]
                    rows = [i * n + j for i in members for j in range(n)]
                    arguments = dict(
                        num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, height=height,
                        width=width, num_images_per_prompt=n, eta=eta, guidance_rescale=guidance_rescale,
                        cross_attention_kwargs=cross_attention_kwargs, callback_on_step_end=callback_on_step_end,
                        timesteps=timesteps, sigmas=sigmas, clip_skip=clip_skip,
                        callback_on_step_end_tensor_inputs=list(callback_on_step_end_tensor_inputs),
                        output_type="latent" if output_type == "latent" else "pt",
                        latents=None if latents is None else latents[rows],
                        generator=None if generator is None else
                        ([generators[r] for r in rows] if isinstance(generator, list) else generator))
                    if prompts is not None:
                        arguments["prompt"] = [prompts[i] for i in members]
                    else:
                        arguments["prompt_embeds"] = prompt_embeds[members]
                    if negative_prompt_embeds is not None:
                        arguments["negative_prompt_embeds"] = negative_prompt_embeds[members]
                    elif negative_prompt is not None:
                        arguments["negative_prompt"] = [negatives[i] or "" for i in members]
                    arguments = self.family.pipeline_arguments(self, arguments)
                    with self.family.feature_cache(self.experts[k], cache_interval):
                        generated = self.expert_pipeline(k)(**arguments).images
                    generated = generated.float().cpu() if output_type != "latent" else generated
                    if stacked is None:
                        stacked = generated.new_empty(images, *generated.shape[1:])
                    stacked[rows] = generated
                self._offload_expert(k)
        self.maybe_free_model_hooks()
        output = {"pil": lambda: to_pil(stacked), "np": lambda: stacked.permute(0, 2, 3, 1).numpy(),
                  "pt": lambda: stacked, "latent": lambda: stacked}[output_type]
        per_image = [r for r in routes for _ in range(n)]
        macs = [self.experts.config.expert_macs[r] for r in per_image]
        result = APTPPipelineOutput(images=output(), experts=per_image, macs=macs,
                                    macs_fraction=[m / self.experts.config.dense_macs for m in macs])
        return result if return_dict else (result.images, result.experts, result.macs, result.macs_fraction)

    def _routes(self, prompts: list[str] | None, count: int, expert) -> list[int]:
        """The expert of every prompt: ``expert`` when given (one index or one per prompt), else the router's."""
        if expert is None:
            return self.route(prompts)
        chosen = [expert] * count if not isinstance(expert, (list, tuple)) else list(expert)
        if len(chosen) != count or any(isinstance(e, bool) or not isinstance(e, int) or not 0 <= e < len(self.experts)
                                       for e in chosen):
            raise APTPError(f"expert must be an index in [0, {len(self.experts)}) or a list of them, one per prompt")
        return chosen

    def warn_truncated(self, prompts: list[str]) -> None:
        """One line when prompts are longer than the text encoder reads (they are cut, as in diffusers)."""
        limit = self.family.text_length(self)
        lengths = [len(ids) for ids in self.tokenizer(prompts, truncation=False, verbose=False)["input_ids"]]
        longer = [i for i, n in enumerate(lengths) if n > limit]
        if longer:
            logger.warning(f"{len(longer)} prompt(s) (e.g. number {longer[0]}, {lengths[longer[0]]} tokens) are "
                           f"longer than the {limit} tokens the text encoder reads; only their start is used")

    def check_settings(self, steps, guidance_scale, height, width, output_type, max_batch_size) -> None:
        """Refuse generation settings that would fail deep in the scheduler or silently give wrong images."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise APTPError(f"num_inference_steps must be a positive integer, got {steps!r}")
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise APTPError(f"max_batch_size must be a positive integer, got {max_batch_size!r}")
        if not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale) or guidance_scale < 0:
            raise APTPError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise APTPError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        if (height is None) != (width is None):
            raise APTPError("give both height and width, or neither")
        if height is not None:
            vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
            multiple = vae_scale * self.family.latent_multiple(self.experts[0])
            for name, value in (("height", height), ("width", width)):
                if isinstance(value, bool) or not isinstance(value, int) or value < multiple or value % multiple:
                    raise APTPError(f"{name} must be a positive multiple of {multiple} pixels for this model, "
                                    f"got {value!r}")
