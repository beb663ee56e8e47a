"""tvq: linear-time Transformer-VQ language models (docs/DESIGN.md).

The public face: load a model, generate and score with it (`tvq.load`, `tvq.generate`,
`tvq.score_stream`, ...). Names are imported on first use (PEP 562), so `import
tvq.config` or a CLI `--help` does not pay for JAX and Flax. The subpackages follow the
layers (docs/DESIGN.md section 15): `nn` (the network), `text`, `distributed` (devices and
processes), `files`, `runtime` (the model and the primitives every job calls), then the
jobs: `decoding`, `scoring`, `train`, `serving`.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "ModelConfig": "tvq.config",
    "Model": "tvq.runtime.model",
    "load": "tvq.runtime.model",
    "AttentionState": "tvq.nn.state",
    "ModelState": "tvq.nn.state",
    # generation (docs/DESIGN.md section 7)
    "generate": "tvq.decoding",
    "generate_batch": "tvq.decoding",
    "Request": "tvq.decoding",
    "Generation": "tvq.decoding",
    "Sampler": "tvq.text.sampling",
    # scoring (section 8) and the context both carry, saved and loaded (section 10)
    "Context": "tvq.runtime.context",
    "score_ids": "tvq.runtime.context",
    "score_stream": "tvq.scoring.stream",
    "FileScore": "tvq.scoring.stats",
    "save_state": "tvq.runtime.statefile",
    "load_state": "tvq.runtime.statefile",
    # tokenizers
    "ByteTokenizer": "tvq.text.tokenizer",
    "SentencePieceTokenizer": "tvq.text.tokenizer",
    **{
        name: "tvq.errors"
        for name in (
            "CheckpointError", "ConfigError", "CorpusError", "InputError", "Interrupted",
            "StateError", "TokenizerError", "TrainingError", "TvqError",
        )
    },
}  # fmt: skip
__all__ = [
    "AttentionState", "ByteTokenizer", "CheckpointError", "ConfigError", "Context",
    "CorpusError", "FileScore", "Generation", "InputError", "Interrupted", "Model",
    "ModelConfig", "ModelState", "Request", "Sampler", "SentencePieceTokenizer",
    "StateError", "TokenizerError", "TrainingError", "TvqError", "generate",
    "generate_batch", "load", "load_state", "save_state", "score_ids", "score_stream",
]  # fmt: skip

if TYPE_CHECKING:
    from tvq.config import ModelConfig
    from tvq.decoding import Generation, Request, generate, generate_batch
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
    from tvq.nn.state import AttentionState, ModelState
    from tvq.runtime.context import Context, score_ids
    from tvq.runtime.model import Model, load
    from tvq.runtime.statefile import load_state, save_state
    from tvq.scoring.stats import FileScore
    from tvq.scoring.stream import score_stream
    from tvq.text.sampling import Sampler
    from tvq.text.tokenizer import ByteTokenizer, SentencePieceTokenizer


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
