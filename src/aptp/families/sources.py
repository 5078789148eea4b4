"""Where a model comes from: a built-in config, a local diffusers folder, or a hub id.

Only configs are read here; models are built on the meta device (shapes, no weights), which is
all that inspection and cost models need.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass

import torch

from diffusers import ConfigMixin

from ..config import DEFAULT_TEXT_LENGTH, DEFAULT_VAE_SCALE_FACTOR
from ..utils import APTPError
from .presets import PRESETS

MAX_SENSIBLE_TEXT_LENGTH = 1024  # tokenizers without a limit report a huge model_max_length


@dataclass
class ModelSource:
    description: str
    unet_config: dict
    vae_scale_factor: int
    text_length: int

    @property
    def default_resolution(self) -> int:
        size = self.unet_config.get("sample_size", 64)
        size = size if isinstance(size, int) else size[0]
        return size * self.vae_scale_factor

    def build_meta_unet(self):
        """The denoiser with this config on the meta device."""
        from . import FAMILIES

        classes = {cls.__name__: cls for family in FAMILIES.values()
                   for cls in (family.denoiser_class, family.sliced_class)}
        name = self.unet_config.get("_class_name", "UNet2DConditionModel")
        cls = classes.get(name)
        if cls is None:
            raise APTPError(f"{self.description}: model class {name!r} is not supported "
                            f"(supported: {', '.join(classes)})")
        try:
            with torch.device("meta"):
                return cls.from_config(self.unet_config)
        except APTPError:
            raise
        except Exception as error:  # a config diffusers cannot build
            raise APTPError(f"{self.description}: cannot build a {name} from its config ({error})") from None


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as error:
        raise APTPError(f"{path} is not valid JSON ({error.msg}, line {error.lineno})") from None
    except OSError as error:
        raise APTPError(f"cannot read {path}: {error.strerror}") from None
    if not isinstance(data, dict):
        raise APTPError(f"{path} does not hold a JSON object")
    return data


def _pipeline_text_length(folder: str) -> int:
    config = os.path.join(folder, "tokenizer", "tokenizer_config.json")
    if os.path.isfile(config):
        length = _read_json(config).get("model_max_length")
        if isinstance(length, int) and 0 < length <= MAX_SENSIBLE_TEXT_LENGTH:
            return length
    return DEFAULT_TEXT_LENGTH


def _pipeline_vae_scale_factor(folder: str) -> int:
    config = os.path.join(folder, "vae", "config.json")
    if os.path.isfile(config):
        channels = _read_json(config).get("block_out_channels")
        if isinstance(channels, list) and channels:
            return 2 ** (len(channels) - 1)
    return DEFAULT_VAE_SCALE_FACTOR


DENOISER_FOLDERS = ("unet", "transformer")


def _from_folder(folder: str) -> ModelSource:
    if os.path.isfile(os.path.join(folder, "model_index.json")):
        configs = [os.path.join(folder, name, "config.json") for name in DENOISER_FOLDERS]
        found = [config for config in configs if os.path.isfile(config)]
        if not found:
            raise APTPError(f"{folder} is a pipeline folder without unet/config.json or transformer/config.json")
        return ModelSource(f"pipeline {folder}", _read_json(found[0]), _pipeline_vae_scale_factor(folder),
                           _pipeline_text_length(folder))
    config = os.path.join(folder, "config.json")
    if os.path.isfile(config):
        return ModelSource(f"model {folder}", _read_json(config), DEFAULT_VAE_SCALE_FACTOR, DEFAULT_TEXT_LENGTH)
    raise APTPError(f"{folder} is not a diffusers model or pipeline folder (no config.json or model_index.json)")


def _from_hub(repo_id: str) -> ModelSource:
    from huggingface_hub.utils import logging as hub_logging

    verbosity = hub_logging.get_verbosity()
    hub_logging.set_verbosity_error()  # one clear line below instead of the client's retry log
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = _hub_denoiser_config(repo_id)
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise APTPError(f"{repo_id}: not a local folder or built-in config ({', '.join(PRESETS)}), "
                        f"and the hub could not provide it ({reason[:160]})") from None
    finally:
        hub_logging.set_verbosity(verbosity)
    return ModelSource(f"hub model {repo_id}", dict(config), DEFAULT_VAE_SCALE_FACTOR, DEFAULT_TEXT_LENGTH)


def _hub_denoiser_config(repo_id: str) -> dict:
    for name in DENOISER_FOLDERS:
        try:
            return ConfigMixin.load_config(repo_id, subfolder=name)
        except EnvironmentError:
            if name == DENOISER_FOLDERS[-1]:
                raise


def resolve_source(source: str) -> ModelSource:
    """A built-in config name, a local UNet or pipeline folder, or (when reachable) a hub id."""
    if source in PRESETS:
        preset = PRESETS[source]
        return ModelSource(f"{preset.description} (built-in '{source}', random weights)", dict(preset.config),
                           preset.vae_scale_factor, preset.text_length)
    if os.path.isdir(source):
        return _from_folder(source)
    if os.path.exists(source):
        raise APTPError(f"{source} is a file; expected a diffusers UNet or pipeline folder")
    looks_like_repo = source.count("/") == 1 and not source.startswith((".", "/", "~"))
    if looks_like_repo:
        return _from_hub(source)
    raise APTPError(f"{source}: no such folder, and not a built-in config ({', '.join(PRESETS)})")
