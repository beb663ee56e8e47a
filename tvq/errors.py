"""Typed errors raised by the tvq library.

The library never prints or exits: it raises one of these, and the CLI turns
it into one line on stderr and a non-zero exit code.
"""


class TvqError(Exception):
    """Base class of every error tvq raises for a problem the user can fix."""

    exit_code = 1


class ConfigError(TvqError):
    """An invalid model configuration or setting."""


class InputError(TvqError):
    """Bad tokens or arguments passed to the model."""


class StateError(TvqError):
    """An attention state that does not belong to this model or batch."""


class CheckpointError(TvqError):
    """A model directory or checkpoint that cannot be read or does not fit."""


class TokenizerError(TvqError):
    """A tokenizer file that cannot be used, or one that does not fit the model."""
