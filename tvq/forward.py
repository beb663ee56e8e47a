"""Folding the network over blocks (docs/DESIGN.md section 8).

A sequence of any length is cut into blocks of `block_len` tokens (and one shorter
tail); a `jax.lax.scan` carries the fixed-size attention state from block to block, so
time is linear in length and memory is flat. Results do not depend on the block length
(docs/DESIGN.md invariant 3): it is a speed setting only. Scoring (`forward`) and
training (tvq/train/step.py) both fold `Transformer.block` with `scan_blocks`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from tvq.config import ModelConfig
from tvq.state import ModelState
from tvq.transformer import Transformer


def to_blocks(x: jax.Array, block_len: int) -> jax.Array:
    """[B, n·L, ...] → [n, B, L, ...]."""
    b, t = x.shape[:2]
    x = x.reshape(b, t // block_len, block_len, *x.shape[2:])
    return jnp.swapaxes(x, 0, 1)


def from_blocks(x: jax.Array) -> jax.Array:
    """[n, B, L, ...] → [B, n·L, ...]."""
    x = jnp.swapaxes(x, 0, 1)
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def scan_blocks(step: Callable, carry: Any, seqs: Any, block_len: int) -> tuple[Any, Any]:
    """Folds `step(carry, block) -> (carry, out)` over blocks of a [B, T, ...] pytree.

    Full blocks run under one lax.scan; a tail shorter than block_len runs as one
    more, shorter block. Outputs are joined back to [B, T, ...].
    """
    length = jax.tree_util.tree_leaves(seqs)[0].shape[1]
    n_full, tail = divmod(length, block_len)
    outs = []
    if n_full:
        head = jax.tree_util.tree_map(
            lambda a: to_blocks(a[:, : n_full * block_len], block_len), seqs
        )
        carry, ys = jax.lax.scan(step, carry, head)
        outs.append(jax.tree_util.tree_map(from_blocks, ys))
    if tail:
        rest = jax.tree_util.tree_map(lambda a: a[:, n_full * block_len :], seqs)
        carry, y = step(carry, rest)
        outs.append(y)
    if len(outs) == 1:
        return carry, outs[0]
    return carry, jax.tree_util.tree_map(lambda *a: jnp.concatenate(a, axis=1), *outs)


def forward(
    config: ModelConfig,
    params: Any,
    tokens: jax.Array,
    state: ModelState,
    block_len: int,
    targets: jax.Array | None = None,
    input_offsets: jax.Array | None = None,
) -> tuple[jax.Array, ModelState]:
    """Runs tokens [B, T] from `state`.

    Returns (log-probs [B, T, N], new state), or with targets [B, T] the log-probs of
    the targets [B, T]; then only one block of logits ever exists. input_offsets
    [B, T, D], added to the embeddings, lets tests take Jacobians.
    """
    net = Transformer(config)
    variables = {"params": params}
    tables = net.apply(variables, method=Transformer.tables)

    def step(carry: ModelState, block):
        block_tokens, block_targets, block_offsets = block
        carry, log_probs, _ = net.apply(
            variables, block_tokens, carry, tables, False, block_offsets, method=Transformer.block
        )
        if block_targets is None:
            return carry, log_probs
        return carry, jnp.take_along_axis(log_probs, block_targets[..., None], axis=-1)[..., 0]

    new_state, out = scan_blocks(step, state, (tokens, targets, input_offsets), block_len)
    return out, new_state


forward_jit = jax.jit(forward, static_argnames=("config", "block_len"))


def on_device(tree: Any) -> Any:
    """Commits arrays to the default device. jit keys its compiled code on whether
    arguments are committed: a jit's outputs are, host arrays and fresh constants are not,
    so feeding a call's output state back in would compile the same function twice.
    Compiled entry points take their arguments through here."""
    return jax.device_put(tree, jax.local_devices()[0])
