"""tvq: linear-time Transformer-VQ language models (docs/DESIGN.md).

Names are imported on first use (PEP 562), so `import tvq.config` or a CLI `--help`
does not pay for JAX and Flax.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "ModelConfig": "tvq.config",
    "Model": "tvq.model",
    "load": "tvq.model",
    "AttentionState": "tvq.state",
    "ModelState": "tvq.state",
    **{
        name: "tvq.errors"
        for name in (
            "CheckpointError", "ConfigError", "CorpusError", "InputError", "Interrupted",
            "StateError", "TokenizerError", "TrainingError", "TvqError",
        )
    },
}  # fmt: skip
__all__ = [
    "AttentionState", "CheckpointError", "ConfigError", "CorpusError", "InputError",
    "Interrupted", "Model", "ModelConfig", "ModelState", "StateError", "TokenizerError",
    "TrainingError", "TvqError", "load",
]  # fmt: skip

if TYPE_CHECKING:
    from tvq.config import ModelConfig
    from tvq.errors import (
        CheckpointError,
        ConfigError,
        CorpusError,
        InputError,
        Interrupted,
        StateError,
        TokenizerError,
        TrainingError,
        TvqError,
    )
    from tvq.model import Model, load
    from tvq.state import AttentionState, ModelState


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A module-level __getattr__ (PEP 562) that imports each exported name on first use
    and keeps it in the package's namespace."""

    def getattr_(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)
        return value

    return getattr_


__getattr__ = lazy_exports(__name__, _EXPORTS)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
