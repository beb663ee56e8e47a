"""A run's plan before it starts (`tvq train --dry-run`, docs/DESIGN.md section 11): what
the run would cost, measured on the machine it would run on, with nothing written.

The parameter count, the forward pass's FLOPs per token (tvq/train/flops.py, the count
bench/mfu.py uses), tokens per step and steps per epoch of the prepared data come from
the settings; the memory per device from XLA's analysis of the compiled step; the time
per step from a few steps timed after one that compiles (on a fresh state, the run's
own shapes and devices). The total time and the model FLOPs utilisation follow.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import jax
import numpy as np

from tvq.config import ModelConfig
from tvq.corpus.reader import TokenStream
from tvq.distributed.devices import data_mesh
from tvq.runtime.forward import check_algorithm
from tvq.runtime.model import Model
from tvq.train.flops import flops_per_token, peak_flops
from tvq.train.loop import _Training
from tvq.train.settings import TrainSettings
from tvq.train.step import compiled_step

TIMED_STEPS = 3  # steps timed after the one that compiles


def plan_run(config: ModelConfig, settings: TrainSettings, train_tokens, *,
             devices: int | None = None, shard_params: bool = False,
             algorithm: str | None = None, init_from: Model | None = None,
             timed: int = TIMED_STEPS) -> dict[str, Any]:  # fmt: skip
    """The plan of a run of these settings on this data and these devices (module
    docstring): a dict of plain numbers, nothing written."""
    mesh = data_mesh(devices)
    stream = TokenStream(train_tokens, settings.batch_size, settings.update_len, settings.seed)
    optimizer, train_step = compiled_step(config, settings, check_algorithm(algorithm))
    job = _Training(config, settings, mesh, shard_params, stream, train_step, [])
    run = job.in_run_layout(job.fresh(optimizer, init_from))
    memory = job.step_memory(run)
    seconds = []
    for step in range(1 + timed):  # the first compiles
        started = time.perf_counter()
        run, metrics = job.update(run, step)
        jax.block_until_ready(metrics.loss)
        seconds.append(time.perf_counter() - started)
    per_step = statistics.median(seconds[1:]) if timed else seconds[0]
    tokens_per_step = settings.batch_size * settings.update_len
    per_token = flops_per_token(config, settings.block_len)
    device = mesh.devices.flat[0]
    peak = peak_flops(device.device_kind, config.dtype) * mesh.size
    return {
        "parameters": int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(run.params))),
        "flops_per_token": per_token,
        "tokens_per_step": tokens_per_step,
        "steps_per_epoch": stream.windows_per_epoch,
        "epochs": settings.steps / max(stream.windows_per_epoch, 1),
        "devices": mesh.size,
        "device_kind": device.device_kind,
        "memory_per_device": memory,
        "compile_seconds": seconds[0],
        "seconds_per_step": per_step,
        "tokens_per_second": tokens_per_step / per_step,
        "mfu": 3 * per_token * tokens_per_step / per_step / peak if peak else math.nan,
        "total_seconds": per_step * settings.steps,
        "steps": settings.steps,
    }
