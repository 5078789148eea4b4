"""Small helpers shared by every layer (no diffusers imports here)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class APTPError(Exception):
    """An error caused by the user's input; the CLI prints it as one line instead of a traceback."""


def error_summary(error: BaseException) -> str:
    """The first line of an exception's message (libraries often add paragraphs), or its type."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(error).__name__


def ordinary_permissions(path: str | os.PathLike) -> None:
    """Give the files at ``path`` (a file, or every file under a folder) the modes any new file gets
    (0666 minus the umask): safetensors writes its files owner-only (0600)."""
    path = Path(path)
    mask = os.umask(0)
    os.umask(mask)
    mode = 0o666 & ~mask
    for file in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
        if file.stat().st_mode & 0o777 != mode:
            os.chmod(file, mode)


def check_output_folder(folder: str | os.PathLike) -> Path:
    """Refuse, before any work, an output folder that cannot be written: an existing file, or a path
    whose nearest existing parent is a file or is not writable. Creates nothing."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise APTPError(f"{folder} is a file; expected an output folder")
    parent = folder
    while not parent.exists():
        if parent.parent == parent:
            break
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise APTPError(f"cannot create the output folder {folder}: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise APTPError(f"cannot write to the output folder {folder}: {parent} is not writable")
    return folder


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")
_EDGE = 1 << 20  # bytes hashed at each end of a weight file


def folder_identity(folder: str | os.PathLike) -> dict:
    """What a model folder holds, without reading all of its weights: a hash of every JSON file, and a hash
    of each weight file's name, size and first and last MiB (a retrained model differs in all three)."""
    folder = Path(folder)
    configs, weights = hashlib.sha256(), hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = file.relative_to(folder).as_posix()
        if file.suffix == ".json":
            configs.update(name.encode() + b"\0" + file.read_bytes())
        elif file.suffix in WEIGHT_SUFFIXES:
            size = file.stat().st_size
            with open(file, "rb") as handle:
                head = handle.read(_EDGE)
                handle.seek(max(0, size - _EDGE))
                tail = handle.read(_EDGE)
            weights.update(f"{name}\0{size}\0".encode() + head + tail)
    return {"configs": configs.hexdigest()[:16], "weights": weights.hexdigest()[:16]}


def flat_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two nested dicts."""
    keys = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and a and b:
            keys += flat_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


def not_utf8(path, error: UnicodeDecodeError) -> APTPError:
    """The one-line error for a text file that is not UTF-8."""
    return APTPError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start})")


def read_json(path: str | os.PathLike, what: str = "JSON file"):
    """The content of a JSON file; a missing, unreadable or damaged file is one line naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise APTPError(f"no {what} at {path}") from None
    except OSError as error:
        raise APTPError(f"cannot read {path}: {error.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        reason = f"{error.msg}, line {error.lineno}" if isinstance(error, json.JSONDecodeError) else "not UTF-8"
        raise APTPError(f"{path} is damaged: not valid JSON ({reason})") from None


@contextmanager
def atomic_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary sibling of ``folder`` to write into. When the block ends it replaces ``folder``
    (whose previous content stays whole until then), with ordinary file modes; when the block fails it
    is removed, and ``folder`` is left as it was."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise APTPError(f"{folder} is a file; expected an output folder")
    temporary, previous = (folder.with_name(folder.name + suffix) for suffix in (".tmp", ".old"))
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    try:
        yield temporary
        ordinary_permissions(temporary)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    if folder.exists():
        # Only now is an older ``.old`` stale; without ``folder`` (a swap interrupted earlier) it may be the
        # one whole copy (a checkpoint to resume from), kept until the new folder is in place.
        shutil.rmtree(previous, ignore_errors=True)
        folder.rename(previous)
    temporary.rename(folder)
    shutil.rmtree(previous, ignore_errors=True)


def write_json_atomic(path: str | os.PathLike, data) -> Path:
    """Write JSON to ``path`` through a temporary file, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=2))
    temporary.replace(path)
    return path
