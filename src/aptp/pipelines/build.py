"""Assemble a servable ``APTPPipeline`` from a trained router and (fine-tuned) experts."""

from __future__ import annotations

import json
from pathlib import Path

from ..experts import APTPExpertBank
from ..experts.run import expert_folder, load_run
from ..utils import APTPError, error_summary
from .aptp import APTPPipeline


def base_config_differences(unet, base_unet, family) -> list[str]:
    """The base-architecture config keys in which ``unet`` differs from ``base_unet`` (none: it was
    carved from that base model)."""
    own, theirs = family.base_config(unet.config), family.base_config(base_unet.config)
    return sorted(k for k in own if k in theirs and json.dumps(own[k]) != json.dumps(theirs[k]))


def build_pipeline(router_dir: str | Path, experts_dir: str | Path | None = None,
                   allow_untrained: bool = False) -> APTPPipeline:
    """Router + experts + the base pipeline's VAE, text encoder, tokenizer and scheduler.

    Experts fine-tuned into ``experts_dir/expert-K`` are used. An expert without one is an error unless
    ``allow_untrained``: then it is sliced from the base UNet as it is (named in a printed note). The
    bank records each expert's fine-tuning steps (0: untrained). A missing ``experts_dir``, or one that
    holds no expert of this router, is an error.
    """
    if experts_dir is not None and not Path(experts_dir).is_dir():
        raise APTPError(f"no experts folder at {experts_dir}")
    run = load_run(router_dir)
    family, base = run.family, run.base_pipeline()
    base_denoiser = family.denoiser(base)
    bank = APTPExpertBank.from_base(base_denoiser, [e.architecture for e in run.experts], run.macs_model(base_denoiser),
                                    run.pruned_for.unit_options, run.pruned_for.resolution)
    missing, steps = [], [0] * len(bank)
    for k in range(len(bank)):
        folder = expert_folder(experts_dir, k) if experts_dir else None
        if folder is not None and (folder / "config.json").is_file():
            try:
                bank.experts[k] = family.sliced_class.from_pretrained(folder).eval()
            except Exception as error:  # a damaged config or weights file
                raise APTPError(f"{folder}: cannot load the expert ({error_summary(error)})") from None
            different = base_config_differences(bank.experts[k], base_denoiser, family)
            if different:
                raise APTPError(f"{folder} was not carved from this router's base model (config differs in "
                                f"{different})")
            if bank.experts[k].config.aptp_widths != bank.config.expert_widths[k]:
                raise APTPError(f"{folder} does not hold expert {k} of this router (its widths differ)")
            info = folder / "aptp_expert.json"
            steps[k] = int(json.loads(info.read_text()).get("config", {}).get("steps", 1)) if info.is_file() else 1
        else:
            missing.append(k)
    if experts_dir is not None and len(missing) == len(bank):
        raise APTPError(f"{experts_dir} holds no fine-tuned expert (expected expert-K folders from `aptp finetune`)")
    if missing and not allow_untrained:
        where = f"no expert-K folder in {experts_dir}" if experts_dir else "no --experts folder given"
        raise APTPError(f"expert(s) {', '.join(map(str, missing))} not fine-tuned ({where}); fine-tune them, "
                        "or export anyway with --allow-untrained-experts")
    if missing:
        print(f"note: expert(s) {', '.join(map(str, missing))} not fine-tuned; sliced from the base model as they are")
    bank.register_to_config(expert_finetune_steps=steps,
                            expert_shares=[e.val_share for e in run.experts])
    return APTPPipeline.around(base, run.router, bank)
