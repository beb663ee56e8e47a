"""The attention state carried between blocks (docs/DESIGN.md section 4, "State").

One `AttentionState` per VQ-attention sublayer: the window memory of the last
M tokens and the per-codeword aggregate of everything older. Its size depends
on the configuration and batch size, never on how many tokens were read.

`ModelState` (a tuple of them, one per sublayer) is the public form: state files, the
training loop and every call take and return it. The network's scan over sublayers
(tvq/nn/transformer.py) carries them stacked instead, one AttentionState whose leaves
have a leading axis of 2·n_layer sublayers (`stack_state`, `unstack_state`); a compiled
call converts once at its start and end.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import numpy as np

from tvq.config import ModelConfig
from tvq.errors import StateError
from tvq.nn.layout import stack_trees, unstack_tree


@flax.struct.dataclass
class AttentionState:
    """State of one sublayer for a batch of sequences."""

    pos_offset: jax.Array  # [B] int32: tokens consumed so far
    z: jax.Array  # [B, H, M] int32: codes in the window memory; S marks an empty slot
    k_hat: jax.Array  # [B, H, M, K] float32: quantized keys in the window memory
    v: jax.Array  # [B, H, M, V] float32: values in the window memory
    n: jax.Array  # [B, H, S] float32: evicted tokens per code
    u_bar: jax.Array  # [B, H, S, V] float32: mean value of the evicted tokens per code


@flax.struct.dataclass
class ModelState:
    """State of the whole model: one AttentionState per sublayer, in layer order."""

    sublayers: tuple[AttentionState, ...]

    @property
    def batch_size(self) -> int:
        return int(self.sublayers[0].pos_offset.shape[0])

    @property
    def positions(self) -> np.ndarray:
        """Tokens consumed so far, per sequence."""
        return np.asarray(self.sublayers[0].pos_offset)

    @property
    def nbytes(self) -> int:
        return int(sum(x.nbytes for x in jax.tree_util.tree_leaves(self)))


def stack_state(state: ModelState) -> AttentionState:
    """ModelState → one AttentionState with leaves [2·n_layer, B, ...] (the scan's form)."""
    return stack_trees(state.sublayers)


def unstack_state(stacked: AttentionState) -> ModelState:
    """The inverse of stack_state."""
    return ModelState(sublayers=unstack_tree(stacked))


def initial_attention_state(config: ModelConfig, batch_size: int) -> AttentionState:
    """Built on the host and transferred: no XLA program per array (start-up time)."""
    b, h, m, s = batch_size, config.n_head, config.mem_len, config.n_code
    return jax.device_put(
        AttentionState(
            pos_offset=np.zeros([b], np.int32),
            z=np.full([b, h, m], s, np.int32),
            k_hat=np.zeros([b, h, m, config.d_k], np.float32),
            v=np.zeros([b, h, m, config.d_v], np.float32),
            n=np.zeros([b, h, s], np.float32),
            u_bar=np.zeros([b, h, s, config.d_v], np.float32),
        )
    )


def initial_state(config: ModelConfig, batch_size: int) -> ModelState:
    """The state before any token: empty window memory, empty aggregate."""
    return ModelState(
        sublayers=tuple(
            initial_attention_state(config, batch_size) for _ in range(2 * config.n_layer)
        )
    )


@functools.lru_cache(maxsize=64)
def state_shapes(config: ModelConfig, batch_size: int) -> ModelState:
    """The state's shapes and dtypes, traced once per (config, batch size)."""
    return jax.eval_shape(lambda: initial_state(config, batch_size))


def state_nbytes(config: ModelConfig) -> int:
    """Bytes of one sequence's state: fixed by the architecture, whatever the length."""
    leaves = jax.tree_util.tree_leaves(state_shapes(config, 1))
    return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in leaves))


def check_state(config: ModelConfig, state: Any, batch_size: int) -> ModelState:
    """Raises StateError unless `state` fits this config and batch size."""
    if not isinstance(state, ModelState):
        raise StateError(f"state must be a tvq ModelState, got {type(state).__name__}")
    expected = state_shapes(config, batch_size)
    if len(state.sublayers) != len(expected.sublayers):
        raise StateError(
            f"state has {len(state.sublayers)} sublayers, this model has "
            f"{len(expected.sublayers)}: it belongs to another model"
        )
    if state.batch_size != batch_size:
        raise StateError(
            f"state is for batch size {state.batch_size}, the tokens have batch size {batch_size}"
        )
    got_leaves = jax.tree_util.tree_leaves(state)
    want_leaves = jax.tree_util.tree_leaves(expected)
    for got, want in zip(got_leaves, want_leaves, strict=True):
        if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
            raise StateError(
                f"state array of shape {tuple(got.shape)} {got.dtype} does not fit this model "
                f"(expected {tuple(want.shape)} {want.dtype}): it belongs to another model"
            )
    return state
