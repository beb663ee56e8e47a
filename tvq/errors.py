"""Typed errors raised by the tvq library (docs/DESIGN.md section 9).

The library never prints or exits: it raises one of these. The CLI (tvqcli/app.py)
turns each into one line on stderr and chooses the exit code; library classes carry
no exit codes.
"""


class TvqError(Exception):
    """Base class of every error tvq raises for a problem the user can fix."""


class ConfigError(TvqError):
    """An invalid model configuration or setting."""


class InputError(TvqError):
    """Bad tokens or arguments passed to the model."""


class StateError(TvqError):
    """An attention state that does not belong to this model or batch, or a state file
    that cannot be read or written."""


class CheckpointError(TvqError):
    """A model directory or checkpoint that cannot be read, written or does not fit."""


class TokenizerError(TvqError):
    """A tokenizer file that cannot be used, or one that does not fit the model."""


class CorpusError(TvqError):
    """No usable training text."""


class TrainingError(TvqError):
    """Bad training settings, or a run that cannot continue."""


class Interrupted(TvqError):
    """Ctrl-C during work that saved what it had done first (e.g. a training run)."""


def is_int(value: object, *, numpy: bool = False) -> bool:
    """An integer argument, as every check of one asks: a Python int (or, with numpy, a
    numpy integer too), never a bool (True is an int to Python, but `devices=True` is a
    mistake, not 1)."""
    kinds: tuple[type, ...] = (int,)
    if numpy:
        import numpy as np

        kinds = (int, np.integer)
    return isinstance(value, kinds) and not isinstance(value, bool)
