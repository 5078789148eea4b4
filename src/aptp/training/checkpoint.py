"""Atomic checkpoints made of safetensors and JSON only (no pickle).

A checkpoint is a folder: ``<name>.safetensors`` per state dict and ``state.json``. It is written to a
temporary sibling folder and swapped in with renames, so an interruption leaves either the old or
the new checkpoint, never a torn one. Optimizer state is stored tensor by tensor.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..utils import APTPError, atomic_folder, flat_differences

STATE_FILE = "state.json"


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        index, _, name = key.partition(".")
        state.setdefault(int(index), {})[name] = value
    for key, value in meta["scalars"].items():
        index, _, name = key.partition(".")
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(folder: str | os.PathLike, modules: dict[str, torch.nn.Module], state: dict,
                    optimizer: torch.optim.Optimizer | None = None) -> Path:
    """Write ``modules`` (name -> module), the optimizer and a JSON ``state`` atomically to ``folder``."""
    folder = Path(folder)
    with atomic_folder(folder) as temporary:  # an interrupted swap leaves ``folder.old`` to resume from
        for name, module in modules.items():
            tensors = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
            save_file(tensors, temporary / f"{name}.safetensors")
        payload = {"state": state}
        if optimizer is not None:
            tensors, meta = _optimizer_tensors(optimizer)
            save_file(tensors, temporary / "optimizer.safetensors")
            payload["optimizer"] = meta
        (temporary / STATE_FILE).write_text(json.dumps(payload, indent=1))
    return folder


def load_checkpoint(folder: str | os.PathLike, modules: dict[str, torch.nn.Module],
                    optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Restore modules and optimizer from ``folder``; returns the saved JSON state."""
    folder = Path(folder)
    payload = json.loads((folder / STATE_FILE).read_text())
    for name, module in modules.items():
        module.load_state_dict(load_file(folder / f"{name}.safetensors"))
    if optimizer is not None and "optimizer" in payload:
        _load_optimizer(optimizer, load_file(folder / "optimizer.safetensors"), payload["optimizer"])
    return payload["state"]


def resume_checkpoint(folder: str | os.PathLike, modules: dict[str, torch.nn.Module],
                      optimizer: torch.optim.Optimizer | None = None) -> tuple[Path, dict] | None:
    """Restore the newest loadable checkpoint at ``folder`` (or the ``.old`` an interrupted swap left);
    returns its path and saved JSON state, or None when there is none. A damaged checkpoint is reported
    and the previous one used; when none can be read the run stops with the path to delete."""
    folder = Path(folder)
    candidates = [c for c in (folder, folder.with_name(folder.name + ".old")) if c.exists()]
    for candidate in candidates:
        try:
            return candidate, load_checkpoint(candidate, modules, optimizer)
        except Exception as error:  # truncated files, bad JSON, tensors of another shape
            print(f"warning: the checkpoint {candidate} cannot be read ({type(error).__name__}); "
                  "trying the previous one", flush=True)
    if candidates:
        raise APTPError(f"no readable checkpoint in {', '.join(map(str, candidates))}; delete "
                        f"{'them' if len(candidates) > 1 else 'it'} to start that run over")
    return None


class OtherRunError(APTPError):
    """An output folder holds a run made with other settings or inputs."""


OVERWRITE_HINT = "use another output folder, or start over with --overwrite (overwrite=True in Python)"


def check_same_settings(found: Path, state: dict, config: dict, free: tuple[str, ...] = (),
                        identity: dict | None = None) -> None:
    """Refuse to resume a checkpoint written with other settings (``free`` keys may differ) or, when
    ``identity`` is given, from another base model or dataset: the run would mix two runs."""
    def plain(value):
        return json.loads(json.dumps(value))

    different = [k for k in flat_differences(plain(state.get("config", {})), plain(config))
                 if k.split(".")[0] not in free]
    if identity is not None:
        different += flat_differences(plain(state.get("identity", {})), plain(identity))
    if different:
        raise OtherRunError(f"{found} holds a run with other settings or inputs (differs in {', '.join(different)}); "
                        + OVERWRITE_HINT)


def refuse_other_settings(folder: str | os.PathLike, config: dict, free: tuple[str, ...] = (),
                          identity: dict | None = None) -> None:
    """Before a run writes anything: stop if the checkpoint at ``folder`` was made with other settings."""
    folder = Path(folder)
    for candidate in (folder, folder.with_name(folder.name + ".old")):
        try:
            state = json.loads((candidate / STATE_FILE).read_text())["state"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # none, or damaged: resume_checkpoint reports it
        check_same_settings(candidate, state, config, free, identity)
        return


def remove_outputs(*paths: str | os.PathLike) -> None:
    """``--overwrite``: delete a run's outputs (with the ``.old``/``.tmp`` siblings of an interrupted swap)."""
    for path in map(Path, paths):
        for candidate in (path, path.with_name(path.name + ".old"), path.with_name(path.name + ".tmp")):
            if candidate.is_dir() and not candidate.is_symlink():
                shutil.rmtree(candidate)
            elif candidate.exists() or candidate.is_symlink():
                candidate.unlink()
