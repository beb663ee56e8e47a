"""tvq: linear-time Transformer-VQ language models."""

from tvq.config import ModelConfig
from tvq.errors import (
    CheckpointError,
    ConfigError,
    InputError,
    StateError,
    TokenizerError,
    TvqError,
)
from tvq.model import Model, load
from tvq.state import AttentionState, ModelState

__all__ = [
    "AttentionState",
    "CheckpointError",
    "ConfigError",
    "InputError",
    "Model",
    "ModelConfig",
    "ModelState",
    "StateError",
    "TokenizerError",
    "TvqError",
    "load",
]
__version__ = "0.1.0"
