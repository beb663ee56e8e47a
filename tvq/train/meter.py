"""What each step's log record says (docs/DESIGN.md section 11): the loss, the learning
rate, tokens seen and per second, model FLOP utilisation (tvq/train/flops.py), the
gradient's norm and, where the backend reports it, the device memory in use."""

from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np

from tvq.config import ModelConfig
from tvq.files import warm
from tvq.train.flops import mfu
from tvq.train.schedules import learning_rate
from tvq.train.settings import TrainSettings


class StepMeter:
    """The records of the steps a process runs, timed from its first."""

    def __init__(self, config: ModelConfig, settings: TrainSettings, devices: list) -> None:
        self.config, self.settings, self.devices = config, settings, devices
        self.tokens_per_step = settings.batch_size * settings.update_len
        # one dispatch per step, not a dozen eager ops (a closure over the settings: not stored)
        self.lr_at = warm.Entry(learning_rate(settings), store=False)
        self.started, self.done = time.perf_counter(), 0

    def record(self, step: int, loss: float, grad_norm: float, tokens: int) -> dict[str, Any]:
        """The record of update number step − 1 (the step-th of the run)."""
        self.done += 1
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        speed = self.done * self.tokens_per_step / elapsed
        record = dict(
            step=step, loss=loss, lr=float(self.lr_at(step - 1)), tokens=tokens,
            tokens_per_second=round(speed, 1),
            mfu=round(mfu(self.config, self.settings.block_len, speed, len(self.devices)), 6),
            grad_norm=grad_norm,
        )  # fmt: skip
        memory = memory_in_use(self.devices)
        if memory is not None:
            record["memory_bytes"] = memory
        return record


def memory_in_use(devices: list) -> int | None:
    """The most bytes in use on one of this process's `devices`, or None where the
    backend does not say (the CPU)."""
    used = []
    for device in devices:
        if device.process_index != jax.process_index():
            continue
        try:
            stats = device.memory_stats()
        except (NotImplementedError, jax.errors.JaxRuntimeError):
            stats = None
        if stats and "bytes_in_use" in stats:
            used.append(int(stats["bytes_in_use"]))
    return int(np.max(used)) if used else None
