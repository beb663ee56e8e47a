"""The per-user cache folder, one rule for everything tvq keeps there (docs/DESIGN.md
sections 11, 14): `$TVQ_CACHE_DIR`, else `$XDG_CACHE_HOME/tvq`, else ~/.cache/tvq, holding
side by side `jax/` (JAX's compiled programs), `warm/` (warm-start files), `data/`
(prepared datasets) and `states/` (the state cache of the commands, section 10).
Imports nothing but the standard library: a corpus worker reads it too."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(part: str) -> Path:
    """The folder of one kind of cached file: "jax", "warm", "data" or "states"."""
    root = os.environ.get("TVQ_CACHE_DIR")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tvq"
    return Path(root) / part
