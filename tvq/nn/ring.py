"""The decoding ring: one sublayer's window memory laid out for one token at a time
(docs/DESIGN.md section 7), the way a KV-cache class owns its layout.

A block of one token through `VQAttention.__call__` assembles a window of M + 1 slots
and evicts the oldest, which moves the whole memory for every token. The decode loop
keeps the window as a ring of M + 1 slots instead (position p in slot p mod (M + 1))
and writes each token in place. `VQAttention.step` (tvq/nn/sublayer.py) computes exactly
what a block of length 1 computes, in this order, per sublayer and token at position p:

1. `push`: the entry that left the window last step (position p − M − 1) joins the
   aggregate, and the present token's code and value are written to slot p mod (M + 1);
2. `attend_ring`: attention over the ring (distances 0 … M) and the aggregate;
3. `advance`: the entry in slot (p + 1) mod (M + 1), next to leave, is read out for 1.

Each buffer is written before it is read within a step, so XLA updates the carried
ring in place; reading first and writing an unrelated value after makes it copy every
carried buffer twice per token. Window keys are codewords (k̂ = C_z), so a window key's
score is the query's score against its codeword: one [S, K] product serves the window
and the aggregate, and the ring needs no keys.

Every row of a ring is at the same position: decoding replicates one context.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from tvq.config import ModelConfig
from tvq.nn.attention import (
    MASK_VALUE,
    AttentionTables,
    aggregate_bias,
    merge_into_aggregate,
    mixed_dot,
    softmax_mix,
)
from tvq.nn.layout import scanned, stack_trees, unstack_tree
from tvq.nn.state import AttentionState, ModelState


@flax.struct.dataclass
class RingState:
    """One sublayer's state during decoding; rows and heads share one axis, G = B·H."""

    pos_offset: jax.Array  # [B] int32: tokens consumed, row by row (rows of different
    # texts may stand at different positions: tvq.serving.engine batches them)
    z: jax.Array  # [G, M + 1] int32: code of position q in slot q mod (M + 1); S = empty
    v: jax.Array  # [G, M + 1, V] float32
    n: jax.Array  # [G, S] float32: the aggregate, as in AttentionState
    u_bar: jax.Array  # [G, S, V] float32
    leaving_z: jax.Array  # [G] int32: code of position pos − M − 1, not yet aggregated
    leaving_v: jax.Array  # [G, V] float32: its value


def _per_head(x: jax.Array, batch: int) -> jax.Array:
    """[G, ...] → [B, H, ...]."""
    return x.reshape(batch, x.shape[0] // batch, *x.shape[1:])


def _flat(x: jax.Array) -> jax.Array:
    """[B, H, ...] → [G, ...]."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def to_ring(state: AttentionState) -> RingState:
    """Window order → ring order; the slot of the next token starts empty."""
    b, h, mem_len = state.z.shape
    n_code = state.n.shape[2]
    size = mem_len + 1
    dist = (state.pos_offset[:, None] - jnp.arange(size)[None, :]) % size  # [B, M + 1]
    index = (mem_len - dist)[:, None, :]  # window slot of distance d is M − d; d = 0: empty
    z = jnp.concatenate([state.z, jnp.full([b, h, 1], n_code, state.z.dtype)], axis=2)
    v = jnp.concatenate([state.v, jnp.zeros_like(state.v[:, :, :1])], axis=2)
    return RingState(
        pos_offset=state.pos_offset,
        z=_flat(jnp.take_along_axis(z, index, axis=2)),
        v=_flat(jnp.take_along_axis(v, index[..., None], axis=2)),
        n=_flat(state.n),
        u_bar=_flat(state.u_bar),
        leaving_z=jnp.full([b * h], n_code, state.z.dtype),
        leaving_v=jnp.zeros([b * h, state.v.shape[3]], state.v.dtype),
    )


def from_ring(ring: RingState, codebook: jax.Array) -> AttentionState:
    """Ring order → window order (AttentionState), aggregating the leaving entry."""
    b = ring.pos_offset.shape[0]
    h = ring.z.shape[0] // b
    mem_len = ring.z.shape[1] - 1
    n, u_bar = aggregate_leaving(ring)
    first = ring.pos_offset[:, None] - mem_len  # window slot j holds position first + j
    index = ((first + jnp.arange(mem_len)[None, :]) % (mem_len + 1))[:, None, :]
    z = jnp.take_along_axis(_per_head(ring.z, b), index, axis=2)
    v = jnp.take_along_axis(_per_head(ring.v, b), index[..., None], axis=2)
    codewords = jnp.concatenate([codebook, jnp.zeros_like(codebook[:, :1])], axis=1)
    return AttentionState(
        pos_offset=ring.pos_offset,
        z=z,
        k_hat=codewords[jnp.arange(h)[None, :, None], z],  # k̂ = C_z; empty slots 0
        v=v,
        n=_per_head(n, b),
        u_bar=_per_head(u_bar, b),
    )


def aggregate_leaving(ring: RingState) -> tuple[jax.Array, jax.Array]:
    """The aggregate (n, Ū) with the leaving entry added to its code's row (nothing for
    an empty slot); only that row is read and written, so the update is in place."""
    n_code = ring.n.shape[1]
    rows = jnp.arange(ring.n.shape[0])
    joins = (ring.leaving_z < n_code).astype(jnp.float32)  # [G]
    at = jnp.minimum(ring.leaving_z, n_code - 1)
    n_new, u_new = merge_into_aggregate(
        ring.n[rows, at], ring.u_bar[rows, at], joins, joins[:, None] * ring.leaving_v
    )
    return ring.n.at[rows, at].set(n_new), ring.u_bar.at[rows, at].set(u_new)


def _row_positions(ring: RingState) -> jax.Array:
    """Each row-and-head's position [G]: its row's pos_offset."""
    heads = ring.z.shape[0] // ring.pos_offset.shape[0]
    return jnp.repeat(ring.pos_offset, heads, total_repeat_length=ring.z.shape[0])


def push(ring: RingState, codes: jax.Array, values: jax.Array) -> RingState:
    """Step 1: aggregate the leaving entry; write the present token's codes [B, H] and
    values [B, H, V] to slot pos mod (M + 1) of each row. Each buffer is written before
    it is read."""
    n, u_bar = aggregate_leaving(ring)
    rows = jnp.arange(ring.z.shape[0])
    slot = _row_positions(ring) % ring.z.shape[1]
    z = ring.z.at[rows, slot].set(_flat(codes), unique_indices=True)
    v = ring.v.at[rows, slot].set(_flat(values.astype(jnp.float32)), unique_indices=True)
    return ring.replace(z=z, v=v, n=n, u_bar=u_bar)


def advance(ring: RingState) -> RingState:
    """Step 3: read out the entry next to leave; one more token consumed."""
    rows = jnp.arange(ring.z.shape[0])
    leaving = (_row_positions(ring) + 1) % ring.z.shape[1]
    return ring.replace(
        pos_offset=ring.pos_offset + 1,
        leaving_z=ring.z[rows, leaving],
        leaving_v=ring.v[rows, leaving],
    )


def attend_ring(
    q: jax.Array, ring: RingState, tables: AttentionTables, *, agg_cache: bool,
    dtype: str = "float32",
) -> jax.Array:  # fmt: skip
    """Step 2: one query per row and head, q [B, H, K], over the ring (the present token
    already pushed) and the aggregate → [B, H, V] float32. Window keys are codewords
    (k̂ = C_z), so one [S, K] product scores the window and the aggregate alike."""
    batch = q.shape[0]
    size = ring.z.shape[1]
    n_code = tables.codebook.shape[1]
    pos = _row_positions(ring)[:, None]  # [G, 1]
    qu = q + tables.u[None]
    qv = q + tables.v[None]
    code_scores = _flat(mixed_dot("bhk,hsk->bhs", qu, tables.codebook, dtype))  # [G, S]
    by_distance = _flat(mixed_dot("bhk,dhk->bhd", qv, tables.rel, dtype))  # [G, M + 1]
    dist = (pos - jnp.arange(size)[None, :]) % size  # [G, M + 1]
    filled = dist <= pos
    positional = jnp.take_along_axis(by_distance, dist, axis=1)
    scores = jnp.take_along_axis(code_scores, jnp.minimum(ring.z, n_code - 1), axis=-1)
    scores = jnp.where(filled, scores + positional, -MASK_VALUE)  # [G, M + 1]

    agg_scores = (code_scores + aggregate_bias(ring.n))[:, None] if agg_cache else None
    out = softmax_mix(scores[:, None], ring.v, agg_scores, ring.u_bar, dtype)[:, 0]
    return _per_head(out, batch)


def empty_rings(config: ModelConfig, batch_size: int) -> tuple[RingState, ...] | RingState:
    """model_to_ring(initial_state(...)), built on the host: no XLA program at start-up.
    The arrays are made once per shape and shared (nothing donates rings: the decoding
    loop and the server's running batch only read them); a request joining the server's
    batch would otherwise build and transfer them every time."""
    return _empty_rings(config, batch_size, scanned(2 * config.n_layer))


@functools.lru_cache(maxsize=16)
def _empty_rings(config: ModelConfig, batch_size: int, stacked: bool
                 ) -> tuple[RingState, ...] | RingState:  # fmt: skip
    g, size, s = batch_size * config.n_head, config.mem_len + 1, config.n_code
    n_sub = 2 * config.n_layer
    at = (n_sub,) if stacked else ()  # the stacked form's sublayer axis, after the rows

    def rows(shape, dtype, fill=0):
        return np.full([shape[0], *at, *shape[1:]], fill, dtype)

    def ring() -> RingState:
        return RingState(
            pos_offset=rows([batch_size], np.int32),
            z=rows([g, size], np.int32, s),
            v=rows([g, size, config.d_v], np.float32),
            n=rows([g, s], np.float32),
            u_bar=rows([g, s, config.d_v], np.float32),
            leaving_z=rows([g], np.int32, s),
            leaving_v=rows([g, config.d_v], np.float32),
        )

    # committed to the device, as compiled entry points take them (on_device passes them
    # through: each joining row in the server copied them otherwise)
    rings = ring() if stacked else tuple(ring() for _ in range(n_sub))
    return jax.device_put(rings, jax.local_devices()[0])


def repeat_rows(
    rings: tuple[RingState, ...] | RingState, n: int
) -> tuple[RingState, ...] | RingState:
    """Each row repeated n times (row-major): n samples continue one context. Rings in
    either form (tvq.nn.layout.scanned): every array's first axis is its rows."""

    def repeat(ring: RingState) -> RingState:
        b = ring.pos_offset.shape[0]

        def rows(x: jax.Array) -> jax.Array:
            return _flat(jnp.repeat(_per_head(x, b), n, axis=0))

        return RingState(
            pos_offset=jnp.repeat(ring.pos_offset, n, axis=0),
            z=rows(ring.z),
            v=rows(ring.v),
            n=rows(ring.n),
            u_bar=rows(ring.u_bar),
            leaving_z=rows(ring.leaving_z),
            leaving_v=rows(ring.leaving_v),
        )

    if isinstance(rings, RingState):
        return repeat(rings)
    return tuple(repeat(ring) for ring in rings)


def model_to_ring(state: ModelState) -> tuple[RingState, ...] | RingState:
    """Window order → the decoding rings: one per sublayer, or stacked where the network
    scans its sublayers (tvq.nn.layout.scanned), from one conversion under vmap (a
    program of one sublayer's size)."""
    if not scanned(len(state.sublayers)):
        return tuple(to_ring(s) for s in state.sublayers)
    return sublayer_axis_second(jax.vmap(to_ring)(stack_trees(state.sublayers)))


def model_from_ring(
    rings: tuple[RingState, ...] | RingState,
    tables: AttentionTables | tuple[AttentionTables, ...],
) -> ModelState:
    """The rings (either form) as a ModelState; tables as tvq.nn.transformer.network gives
    them (stacked [2·n_layer, ...] or one per sublayer)."""
    if isinstance(tables, AttentionTables):
        codebooks = tables.codebook  # [2·n_layer, H, S, K]
    else:
        codebooks = jnp.stack([t.codebook for t in tables])
    if isinstance(rings, RingState):
        states = jax.vmap(from_ring)(sublayer_axis_first(rings), codebooks)
        return ModelState(sublayers=unstack_tree(states))
    return ModelState(sublayers=tuple(from_ring(r, codebooks[i]) for i, r in enumerate(rings)))


def sublayer_axis_first(rings: RingState) -> RingState:
    """Stacked rings, rows first ([G, 2·n_layer, ...], what the decoding loop carries and
    splits by rows) → sublayers first ([2·n_layer, G, ...], what a scan runs over)."""
    return jax.tree_util.tree_map(lambda x: jnp.moveaxis(x, 1, 0), rings)


def sublayer_axis_second(rings: RingState) -> RingState:
    """The inverse of sublayer_axis_first."""
    return jax.tree_util.tree_map(lambda x: jnp.moveaxis(x, 0, 1), rings)
