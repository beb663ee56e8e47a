"""tvq: linear-time Transformer-VQ language models (docs/DESIGN.md).

Names are imported on first use (PEP 562), so `import tvq.config` or a CLI `--help`
does not pay for JAX and Flax.
"""

from __future__ import annotations

import importlib
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


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tvq' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
