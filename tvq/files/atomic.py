"""Writing a file atomically: into a temporary file beside it, then renamed over it, so
a reader never sees half a file and a failed write leaves none behind."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomically(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Calls write(f) on a temporary file in path's folder and renames it to path;
    OSError (or anything write raises) after removing the temporary file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
