"""Defaults in one visible place."""

from __future__ import annotations

import argparse
import math
import types
import typing
from dataclasses import MISSING, asdict, dataclass, fields

import yaml

from .utils import APTPError, error_summary

DEFAULT_TEXT_LENGTH = 77  # CLIP token length used by Stable Diffusion pipelines
DEFAULT_VAE_SCALE_FACTOR = 8  # SD VAEs map 8x8 pixels to one latent
# Prompts one expert of an APTPPipeline denoises at once (twice as many UNet rows with guidance): enough to
# keep a GPU busy, few enough that a call of a few prompts per expert already reaches the peak memory of a
# call of thousands.
DEFAULT_MAX_BATCH_SIZE = 16


@dataclass(frozen=True)
class UnitOptions:
    """How a model is cut into prunable units.

    ``ff_chunks``: feed-forward hidden units are gated in this many equal chunks per block (the
    largest divisor of the hidden size not above it). ``depth``: which whole blocks may be skipped:
    ``"last"`` = the last ResNet and the last transformer of every down/up stage, ``"all"`` = every
    ResNet and transformer of the down/up stages, ``"none"``. The mid block is never skipped.
    """

    ff_chunks: int = 32
    depth: str = "last"

    def __post_init__(self):
        if self.depth not in ("last", "all", "none"):
            raise ValueError(f"depth must be 'last', 'all' or 'none', got {self.depth!r}")
        if self.ff_chunks < 1:
            raise ValueError(f"ff_chunks must be >= 1, got {self.ff_chunks}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> "UnitOptions":
        return config_from_dict(cls, data or {})



def config_from_dict(cls, data: dict):
    """A config dataclass from ``data``; unknown keys and values of the wrong type are errors (a typo
    never passes silently). Integers are accepted where a float is expected."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise APTPError(f"unknown {cls.__name__} option(s): {unknown}; known: {sorted(names)}")
    hints = typing.get_type_hints(cls)
    data = {name: _checked(cls.__name__, name, value, hints[name]) for name, value in data.items()}
    return cls(**data)


def _checked(owner: str, name: str, value, hint):
    """``value`` if it has the type ``hint`` allows (ints widen to floats, lists to tuples)."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    for option in options:
        origin = typing.get_origin(option) or option
        if option is type(None) and value is None:
            return value
        if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if origin in (bool, str, dict) and isinstance(value, origin):
            return value
        if origin in (tuple, list) and isinstance(value, (tuple, list)):
            return origin(value)
    names = " or ".join("None" if o is type(None) else getattr(typing.get_origin(o) or o, "__name__", str(o))
                        for o in options)
    raise APTPError(f"{owner} option {name!r} must be {names}, got {value!r}")


def parse_overrides(items: list[str] | None) -> dict:
    """``key=value`` pairs; values are read as YAML scalars or lists (``lr=3e-4``, ``widths=[32,64]``)."""
    overrides = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise APTPError(f"expected key=value, got {item!r}")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as error:
            problem = getattr(error, "problem", None) or type(error).__name__
            raise APTPError(f"{item!r}: the value of {key.strip()} is not valid YAML ({problem})") from None
        if isinstance(parsed, str):
            try:
                parsed = float(parsed)  # YAML 1.1 reads "3e-4" (no dot) as a string
            except ValueError:
                pass
        overrides[key.strip().replace("-", "_")] = parsed
    return overrides


# Argument types of the command line: a bad value is one line of error, before any work starts.


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every flag's default after its help (flags without one say what happens instead); the key lists of
    the epilog keep their lines."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, argparse.SUPPRESS):
            return action.help or ""
        return super()._get_help_string(action)


def describe_keys(*sections: tuple[str, type]) -> str:
    """The ``--set`` keys of config dataclasses, one per line with type and default; a section named
    ``prune`` lists ``prune.KEY`` (an empty name lists bare keys)."""
    lines = ["--set keys (KEY=VALUE, values in YAML syntax):"]
    for section, cls in sections:
        prefix = f"{section}." if section else ""
        for item in fields(cls):
            if item.default is not MISSING:
                default = item.default
            elif item.default_factory is not MISSING:
                default = item.default_factory()
            else:
                default = "(required)"
            lines.append(f"  {prefix}{item.name}: {item.type} = {default}")
    return "\n".join(lines)


def add_output_argument(parser: argparse.ArgumentParser, dest: str = "out", **kwargs) -> None:
    """``--output-dir`` on every command (``--out`` is the same flag)."""
    kwargs.setdefault("help", "output folder")
    parser.add_argument("--output-dir", "--out", dest=dest, **kwargs)


DTYPES = ("fp32", "fp16", "bf16")
MIXED_PRECISION_OF = {"torch.float32": "no", "torch.float16": "fp16", "torch.bfloat16": "bf16"}  # for Accelerate


def add_device_arguments(parser: argparse.ArgumentParser, device: bool = True) -> None:
    """``--device`` and ``--dtype``: CUDA in fp16 when there is a GPU, else the CPU in fp32 (without
    ``device``: only the dtype of saved weights, fp32 unless given)."""
    if device:
        parser.add_argument("--device", help="torch device, e.g. cuda, cuda:1, cpu (none: cuda if available, else cpu)")
        parser.add_argument("--dtype", choices=DTYPES, help="weights and activations (none: fp16 on CUDA, else fp32)")
    else:
        parser.add_argument("--dtype", choices=DTYPES, help="of the saved weights (none: fp32)")


def resolve_device(device: str | None = None, dtype: str | None = None):
    """The torch device and dtype that ``--device`` / ``--dtype`` ask for (see :func:`add_device_arguments`)."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise APTPError(f"unknown device {device!r}; e.g. cuda, cuda:1, cpu, mps") from None
    try:
        torch.empty(0, device=resolved)  # the one check that holds for every backend
    except Exception as error:  # no CUDA build, no such GPU
        raise APTPError(f"device {device} asked for, but it is not available here ({error_summary(error)})") from None
    return resolved, torch_dtype(dtype or ("fp16" if resolved.type == "cuda" else "fp32"))


def torch_dtype(name: str):
    """The torch dtype of a ``--dtype`` name (fp32, fp16, bf16)."""
    import torch

    if name not in DTYPES:
        raise APTPError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def add_overwrite_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help="delete a run of other settings or inputs found in the output folder and start over "
                             "(without it, such a run is refused)")


def positive_int(text: str) -> int:
    value = _number(int, text, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = _number(int, text, "an integer >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def fraction(text: str) -> float:
    value = _number(float, text, "a fraction in (0, 1]")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = _number(float, text, "a finite number >= 0")
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def _number(kind, text: str, expected: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
