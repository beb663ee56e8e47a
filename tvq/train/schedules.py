"""The learning-rate schedules of a run (docs/DESIGN.md section 11), built from optax's.

Every schedule starts with a linear warm-up from 0 to `lr` over `warmup` updates; then
  cosine:   cosine decay to the floor at the last update (the default),
  linear:   linear decay to the floor,
  constant: lr to the end,
  wsd:      warmup-stable-decay: lr until the last decay_fraction of the steps, then a
            linear decay to the floor (Hu et al. 2024, "MiniCPM", section 4).
The floor is `min_lr`, else final_lr_ratio · lr. The rate of update n (counting from 0)
is schedule(n); the decays reach the floor at n = steps, the end of the run.
"""

from __future__ import annotations

import optax

from tvq.train.settings import TrainSettings


def learning_rate(settings: TrainSettings) -> optax.Schedule:
    """The schedule that settings name: the rate of update n is schedule(n)."""
    lr, floor, steps, warmup = settings.lr, settings.floor_lr, settings.steps, settings.warmup
    after = max(1, steps - warmup)  # updates after the warm-up
    if settings.schedule == "cosine":
        alpha = settings.final_lr_ratio if settings.min_lr is None else floor / lr
        rest = optax.cosine_decay_schedule(lr, after, alpha=alpha)
    elif settings.schedule == "linear":
        rest = optax.linear_schedule(lr, floor, after)
    elif settings.schedule == "constant":
        rest = optax.constant_schedule(lr)
    else:  # wsd: flat, then the decay over the last decay_fraction of the steps
        decay = min(after, max(1, round(settings.decay_fraction * steps)))
        rest = optax.join_schedules(
            [optax.constant_schedule(lr), optax.linear_schedule(lr, floor, decay)],
            [after - decay],
        )
    return optax.join_schedules([optax.linear_schedule(0.0, lr, max(1, warmup)), rest], [warmup])
