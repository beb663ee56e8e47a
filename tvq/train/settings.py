"""Training settings: tvq's one source of training defaults (`tvq train` shows them).

Everything about a run that is not architecture (docs/DESIGN.md section 11); the
architecture's defaults are ModelConfig's, the corpus's (vocabulary, held-out fraction)
tvq.corpus's.
"""

from __future__ import annotations

import dataclasses
import math

from tvq.errors import TrainingError, is_int


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """The optimiser, schedule, data windows and bookkeeping of a run."""

    steps: int = 1000
    batch_size: int = 8
    update_len: int = 1024  # > block_len + mem_len: the aggregate is learnt (DESIGN §11)
    block_len: int = 128
    lr: float = 2e-3
    warmup: int = 100
    final_lr_ratio: float = 0.1
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
