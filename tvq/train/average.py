"""Weight averaging (docs/DESIGN.md section 11): an exponential moving average of the
parameters, kept in float32 beside them (the same layout, devices and sharding) and
updated after every step:

    average ← decay · average + (1 − decay) · params,   average₀ = the initial params.

It is part of the run's state (checkpointed, restored), what evaluations score, and what
the run writes as its model unless asked for the last parameters.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp


def initial_average(params: Any) -> Any:
    """The average before the first step: a float32 copy of the parameters (new arrays
    with the parameters' shardings)."""
    return jax.tree_util.tree_map(lambda x: jnp.array(x, jnp.float32, copy=True), params)


@functools.partial(jax.jit, donate_argnums=(0,), static_argnums=(2,))
def update_average(average: Any, params: Any, decay: float) -> Any:
    """One step of the average (donated: updated in place; float32 arithmetic)."""
    return jax.tree_util.tree_map(
        lambda a, p: decay * a + (1 - decay) * p.astype(jnp.float32), average, params
    )
