"""Small helpers shared by every layer (no diffusers imports here)."""

from __future__ import annotations

import json
import os
from pathlib import Path


class APTPError(Exception):
    """An error caused by the user's input; the CLI prints it as one line instead of a traceback."""


def write_json_atomic(path: str | os.PathLike, data) -> Path:
    """Write JSON to ``path`` through a temporary file, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=2))
    temporary.replace(path)
    return path
