"""Small helpers shared by every layer (no diffusers imports here)."""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class APTPError(Exception):
    """An error caused by the user's input; the CLI prints it as one line instead of a traceback."""


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


@contextmanager
def atomic_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary sibling of ``folder`` to write into. When the block ends it replaces ``folder``
    (whose previous content stays whole until then), with ordinary file modes; when the block fails it
    is removed, and ``folder`` is left as it was."""
    folder = Path(folder)
    temporary, previous = (folder.with_name(folder.name + suffix) for suffix in (".tmp", ".old"))
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    try:
        yield temporary
        ordinary_permissions(temporary)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    shutil.rmtree(previous, ignore_errors=True)
    if folder.exists():
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
