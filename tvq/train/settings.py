"""Training settings: tvq's one source of training defaults (`tvq train` shows them).

Everything about a run that is not architecture (docs/DESIGN.md section 11); the
architecture's defaults are ModelConfig's, the corpus's (vocabulary, held-out fraction)
tvq.corpus's.
"""

from __future__ import annotations

import dataclasses
import math

from tvq.errors import TrainingError, is_int

SCHEDULES = ("cosine", "linear", "constant", "wsd")
EXPORTS = ("ema", "last")  # what a run with ema writes as its model


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """The optimiser, schedule, data windows and bookkeeping of a run."""

    steps: int = 1000
    batch_size: int = 8
    update_len: int = 1024  # > block_len + mem_len: the aggregate is learnt (DESIGN §11)
    block_len: int = 128
    lr: float = 2e-3
    warmup: int = 100
    final_lr_ratio: float = 0.1  # the floor of the decay, as a fraction of lr (min_lr: None)
    # the learning rate after the warm-up (tvq/train/schedules.py): cosine or linear decay
    # to the floor, constant, or wsd (warmup-stable-decay: constant, then a linear decay
    # over the last decay_fraction of the steps); min_lr: the floor, None: final_lr_ratio·lr
    schedule: str = "cosine"
    decay_fraction: float = 0.2
    min_lr: float | None = None
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    c_beta: float = 1e-4
    c_gamma: float = 0.99
    # dropout, named as in the reference implementation: of the token embeddings, of each
    # sublayer's residual branch, and of whole sublayers per sequence and window (layer
    # drop); 0 = off (docs/DESIGN.md section 11)
    p_dropemb: float = 0.0
    p_dropres: float = 0.0
    p_droplyr: float = 0.0
    seed: int = 0
    eval_every: int = 250
    save_every: int = 50
    # memory, never the numbers (docs/DESIGN.md section 11): the batch as grad_accum
    # micro-batches of batch_size / grad_accum rows, their gradients summed inside the
    # step; remat: recompute each sublayer in the backward pass instead of keeping it
    grad_accum: int = 1
    remat: bool = False
    # the run's recipe around the updates (docs/DESIGN.md section 11): ema, the decay of
    # an exponential moving average of the parameters (None: off), which evaluations and
    # the model use unless export is "last"; eval_tokens: each evaluation's bound on the
    # held-out tokens (None: every document, whole); keep: the checkpoints kept, "best"
    # (the lowest held-out bits per byte, and the latest), "last", or a count of latest
    ema: float | None = None
    export: str = "ema"
    eval_tokens: int | None = None
    keep: str = "2"

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type == "int" and not is_int(value):
                raise TrainingError(f"{field.name} must be an integer, got {value!r}")
            if field.type == "bool" and not isinstance(value, bool):
                raise TrainingError(f"{field.name} must be true or false, got {value!r}")
            if field.type == "float" and (
                not isinstance(value, int | float) or not math.isfinite(value)
            ):
                raise TrainingError(f"{field.name} must be a finite number, got {value!r}")
        for name in ("steps", "batch_size", "update_len", "block_len", "eval_every", "save_every",
                     "grad_accum"):  # fmt: skip
            if getattr(self, name) < 1:
                raise TrainingError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup", "weight_decay", "c_beta", "seed"):
            if getattr(self, name) < 0:
                raise TrainingError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise TrainingError(f"learning rate must be positive, got {self.lr}")
        if not self.grad_clip > 0:
            raise TrainingError(f"grad_clip must be positive, got {self.grad_clip}")
        if not 0 <= self.final_lr_ratio <= 1:
            raise TrainingError(f"final_lr_ratio must be in [0, 1], got {self.final_lr_ratio}")
        for name in ("p_dropemb", "p_dropres", "p_droplyr"):
            if not 0 <= getattr(self, name) < 1:
                raise TrainingError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0 <= self.c_gamma < 1:
            raise TrainingError(f"c_gamma must be in [0, 1), got {self.c_gamma}")
        check_recipe(self)
        self.check_devices(1)

    def check_devices(self, count: int) -> None:
        """TrainingError unless the batch splits into grad_accum micro-batches with the
        same number of rows on each of `count` devices."""
        if self.batch_size % (self.grad_accum * count):
            devices = f" × {count} devices = {self.grad_accum * count}" if count > 1 else ""
            raise TrainingError(
                f"batch size {self.batch_size} must be a multiple of grad_accum "
                f"{self.grad_accum}{devices}"
            )

    @property
    def dropout(self) -> bool:
        return max(self.p_dropemb, self.p_dropres, self.p_droplyr) > 0

    @property
    def floor_lr(self) -> float:
        """The learning rate the decay reaches."""
        return self.final_lr_ratio * self.lr if self.min_lr is None else self.min_lr

    @property
    def keep_count(self) -> int | None:
        """How many of the latest checkpoints are kept (None: keep="best")."""
        return None if self.keep == "best" else 1 if self.keep == "last" else int(self.keep)


def check_recipe(settings: TrainSettings) -> None:
    """TrainingError unless the schedule, averaging, evaluation and keeping settings are
    in range (the CLI calls it first: its bad values are usage errors)."""
    if settings.schedule not in SCHEDULES:
        raise TrainingError(f"schedule must be one of {', '.join(SCHEDULES)}, "
                            f"got {settings.schedule!r}")  # fmt: skip
    if not _number(settings.decay_fraction) or not 0 < settings.decay_fraction <= 1:
        raise TrainingError(f"decay_fraction must be in (0, 1], got {settings.decay_fraction}")
    if settings.min_lr is not None and (
        not _number(settings.min_lr) or not 0 <= settings.min_lr <= settings.lr
    ):
        raise TrainingError(f"min_lr must be in [0, lr = {settings.lr}], got {settings.min_lr}")
    if settings.ema is not None and (not _number(settings.ema) or not 0 < settings.ema < 1):
        raise TrainingError(f"ema must be in (0, 1), got {settings.ema}")
    if settings.export not in EXPORTS:
        raise TrainingError(f"export must be one of {', '.join(EXPORTS)}, got {settings.export!r}")
    if settings.eval_tokens is not None and (
        not is_int(settings.eval_tokens) or settings.eval_tokens < 1
    ):
        raise TrainingError(f"eval_tokens must be at least 1, got {settings.eval_tokens}")
    keep = settings.keep
    if not isinstance(keep, str) or not (keep in ("best", "last") or keep.isdigit()):
        raise TrainingError(f"keep must be best, last or a number of checkpoints, got {keep!r}")
    if keep.isdigit() and int(keep) < 1:
        raise TrainingError(f"keep must be at least 1 checkpoint, got {keep}")


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
