"""tvq: linear-time Transformer-VQ language models (docs/DESIGN.md).

The public face: load a model, generate and score with it (`tvq.load`,
`tvq.stream_generate`, `tvq.generate`, `tvq.score_stream`, ...). Names are imported on
first use (PEP 562), so `import tvq.config` or a CLI `--help` does not pay for JAX and
Flax; each is written once, in `_MODULES`. The subpackages follow the layers
(docs/DESIGN.md section 15): `nn` (the network), `text`, `distributed` (devices and
processes), `files`, `runtime` (the model and the primitives every job calls), then the
jobs: `decoding`, `scoring`, `compression`, `train`, `serving`.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any

__version__ = "0.1.0"

# Each public name, once: the module it lives in → the names it exports.
_MODULES = {
    "tvq.config": ("ModelConfig",),
    "tvq.runtime.model": ("Model", "load"),
    "tvq.nn.state": ("AttentionState", "ModelState"),
    # generation (docs/DESIGN.md section 7)
    "tvq.decoding": (
        "stream_generate", "generate", "GenerationStream", "Generation", "BatchGeneration",
    ),
    "tvq.batching": ("stream_batch", "generate_batch", "BatchItem"),
    "tvq.text.rows": ("Piece", "Sample"),
    "tvq.text.settings": ("Sampler", "SettingError"),
    # scoring (section 8) and the context both carry, saved and loaded (section 10)
    "tvq.runtime.context": ("Context", "score_ids", "require_tokenizer"),
    "tvq.scoring.job": ("score_files", "ScoreOptions", "ScoreProgress"),
    "tvq.scoring.stream": ("score_stream",),
    "tvq.scoring.stats": ("FileScore",),
    "tvq.runtime.statefile": ("save_state", "load_state"),
    # lossless compression with the model (section 16)
    "tvq.compression.files": ("compress", "decompress"),
    # tokenizers
    "tvq.text.tokenizer": ("ByteTokenizer", "SentencePieceTokenizer"),
    "tvq.errors": (
        "CheckpointError", "ConfigError", "CorpusError", "InputError", "Interrupted",
        "StateError", "TokenizerError", "TrainingError", "TvqError",
    ),
}  # fmt: skip
_EXPORTS = {name: module for module, names in _MODULES.items() for name in names}
__all__ = sorted(_EXPORTS)


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
