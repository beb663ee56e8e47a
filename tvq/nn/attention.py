"""VQ attention as functions of arrays (docs/DESIGN.md section 4; Lingle 2024, sections
3.2-3.4): quantizing keys, the softmax over window and aggregate, and the state update.

Keys are vector-quantized against a learned codebook, so every token older than the
window memory can be folded into a per-codeword count and mean value (the aggregate).
Softmax attention over [aggregate codewords | window memory | present block] is then
exact and costs O(L·(M + L + S)) per block of L tokens. Layout: head-major, [B, H, L, ·]
for queries and [B, H, W, ·] for the window, W = M + L. The flax module that owns the
parameters is tvq/nn/sublayer.py; the one-token ring form is tvq/nn/ring.py.

Over 300 lines because it is the whole arithmetic of a sublayer in both forms, serial
and parallel (section 12), which share every helper: split, each half would import the
other's privates.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from tvq.nn.state import AttentionState

MASK_VALUE = 1e30  # stands for infinity in masked scores


@flax.struct.dataclass
class AttentionTables:
    """Per-sublayer values that depend on the parameters only, computed once per call."""

    codebook: jax.Array  # [H, S, K] float32, never differentiated
    rel: jax.Array  # [M + 1, H, K] float32: c·r_proj(Sinusoid(d)) for d = 0 … M
    u: jax.Array  # [H, K] float32: c·u, content bias
    v: jax.Array  # [H, K] float32: c·v, position bias


def aggregate_bias(counts: jax.Array) -> jax.Array:
    """log(n_s) for n_s > 0 and −∞ (−1e30) for n_s = 0 (docs/DESIGN.md invariant 5)."""
    return jnp.where(counts > 0, jnp.log(jnp.maximum(counts, 1.0)), -MASK_VALUE)


def flush_tiny(shifted: jax.Array) -> jax.Array:
    """exp() of a score this far below the maximum is < 1e-35 of the top weight: make it
    exactly 0, so no subnormal float (slow on x86) ever enters the weighted sums."""
    return jnp.where(shifted < -80.0, -jnp.inf, shifted)


def mixed_dot(spec: str, a: jax.Array, b: jax.Array, dtype: str) -> jax.Array:
    """einsum with the products in the compute dtype and the sums in float32: the one
    form of every attention score product, so blocks and the decoding ring round alike."""
    return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def quantize(keys: jax.Array, codebook: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Nearest codeword per key, ties to the lowest index.

    keys [B, H, L, K], codebook [H, S, K] → codes [B, H, L] int32,
    codewords [B, H, L, K], squared errors [B, H, L].
    """
    dist = (
        jnp.sum(jnp.square(keys), axis=-1, keepdims=True)
        - 2.0 * jnp.einsum("bhlk,hsk->bhls", keys, codebook)
        + jnp.sum(jnp.square(codebook), axis=-1)[None, :, None, :]
    )  # [B, H, L, S]
    codes = jnp.argmin(dist, axis=-1).astype(jnp.int32)
    heads = jnp.arange(codebook.shape[0])[None, :, None]
    codewords = codebook[heads, codes]  # [B, H, L, K]
    errors = jnp.maximum(jnp.min(dist, axis=-1), 0.0)
    return codes, codewords, errors


def attend(
    q: jax.Array,
    window_k: jax.Array,
    window_v: jax.Array,
    tables: AttentionTables,
    pos_offset: jax.Array,
    counts: jax.Array,
    u_bar: jax.Array,
    *,
    agg_cache: bool,
    dtype: str = "float32",
) -> jax.Array:
    """Softmax over the window keys and (with agg_cache) the S codewords.

    q [B, H, L, K] (already scaled by c), window_k [B, H, W, K], window_v [B, H, W, V];
    pos_offset [B] (tokens before the block) and the aggregate, counts [B, H, S] and
    means u_bar [B, H, S, V]. Returns [B, H, L, V] float32.
    """
    _, _, block_len, _ = q.shape
    width = window_k.shape[2]
    mem_len = width - block_len
    qu = q + tables.u[None, :, None, :]
    qv = q + tables.v[None, :, None, :]

    # Distance d = M + i − j from query i to window slot j.
    i = jnp.arange(block_len)[:, None]
    j = jnp.arange(width)[None, :]
    dist = mem_len + i - j  # [L, W]
    filled = j[None] >= (mem_len - pos_offset)[:, None, None]  # [B, 1, W]
    filled = filled[:, None]  # [B, 1, 1, W]
    causal = dist >= 0
    local = dist <= mem_len

    scores = mixed_dot("bhlk,bhwk->bhlw", qu, window_k, dtype)
    by_distance = mixed_dot("bhlk,dhk->bhld", qv, tables.rel, dtype)  # [B, H, L, M + 1]
    index = jnp.broadcast_to(jnp.clip(dist, 0, mem_len), scores.shape)
    positional = jnp.take_along_axis(by_distance, index, axis=-1)
    scores = scores + jnp.where(filled & causal & local, positional, 0.0)
    keep = filled & causal if agg_cache else filled & causal & local
    scores = jnp.where(keep, scores, -MASK_VALUE)

    agg_scores = None
    if agg_cache:
        agg_scores = mixed_dot("bhlk,hsk->bhls", qu, tables.codebook, dtype)
        agg_scores = agg_scores + aggregate_bias(counts)[:, :, None, :]
    return softmax_mix(scores, window_v, agg_scores, u_bar, dtype)


def softmax_mix(
    scores: jax.Array,
    values: jax.Array,
    agg_scores: jax.Array | None,
    u_bar: jax.Array,
    dtype: str = "float32",
) -> jax.Array:
    """One softmax over the window scores [..., L, W] (masked already) and, when given,
    the codeword scores [..., L, S] (log-count bias added); returns the weighted sum of
    the window values [..., W, V] and the aggregate means u_bar [..., S, V], [..., L, V]
    float32. The maximum is subtracted first; weights are normalised before they touch
    values, so Σ a·v is never formed unnormalised."""
    max_score = jnp.max(scores, axis=-1)
    if agg_scores is not None:
        max_score = jnp.maximum(max_score, jnp.max(agg_scores, axis=-1))
    max_score = jax.lax.stop_gradient(max_score)[..., None]

    weights = jnp.exp(flush_tiny(scores - max_score))
    total = jnp.sum(weights, axis=-1, keepdims=True)
    if agg_scores is not None:
        agg_weights = jnp.exp(flush_tiny(agg_scores - max_score))
        total = total + jnp.sum(agg_weights, axis=-1, keepdims=True)
    out = jnp.einsum(
        "...lw,...wv->...lv",
        (weights / total).astype(dtype),
        values.astype(dtype),
        preferred_element_type=jnp.float32,
    )
    if agg_scores is not None:
        out = out + jnp.einsum(
            "...ls,...sv->...lv",
            (agg_weights / total).astype(dtype),
            u_bar.astype(dtype),
            preferred_element_type=jnp.float32,
        )
    return out


def merge_into_aggregate(
    n: jax.Array, u_bar: jax.Array, count: jax.Array, total: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Adds `count` tokens whose values sum to `total` to an aggregate of n tokens with mean
    u_bar: n ← n + count, Ū ← (n_old/n_new)·Ū + total/n_new (a running mean, stable in low
    precision; divided by max(n, 1)). Shapes: n, count [...]; u_bar, total [..., V]. The
    one place the aggregate is updated (blocks: evict; decoding: tvq.nn.ring)."""
    n_new = n + count
    denom = jnp.maximum(n_new, 1.0)
    return n_new, (n / denom)[..., None] * u_bar + total / denom[..., None]


def code_sums(
    codes: jax.Array, values: jax.Array, n_code: int, method: str | None = None
) -> tuple[jax.Array, jax.Array]:
    """How many entries of each row went to each code, and the sum of their values:
    codes [..., L] int, values [..., L, V] → counts [..., S], sums [..., S, V] float32.
    Code S (an unfilled slot) adds nothing. method "scatter" (a scatter-add, O(L·V)
    additions: the CPU default) or "one_hot" (a one-hot product, O(L·S·V) but on the
    matrix units and in a fixed order: the accelerator default); they give the same
    sums (bench/RESULTS.md section 9)."""
    values = values.astype(jnp.float32)
    if method is None:
        method = "scatter" if jax.default_backend() == "cpu" else "one_hot"
    if method == "one_hot":
        one_hot = jax.nn.one_hot(codes, n_code, dtype=jnp.float32)
        return jnp.sum(one_hot, axis=-2), jnp.einsum("...ls,...lv->...sv", one_hot, values)

    def one_row(row_codes: jax.Array, row_values: jax.Array) -> tuple[jax.Array, jax.Array]:
        size = n_code + 1  # segment S collects the unfilled slots and is dropped
        counts = jax.ops.segment_sum(jnp.ones(row_codes.shape, jnp.float32), row_codes, size)
        return counts[:n_code], jax.ops.segment_sum(row_values, row_codes, size)[:n_code]

    # vmap per leading axis, not one flattened scatter: the leading axes stay batch axes
    # of the scatter, so a batch split over devices is summed where it lies.
    for _ in codes.shape[:-1]:
        one_row = jax.vmap(one_row)
    return one_row(codes, values)


def evict(
    state: AttentionState,
    window_z: jax.Array,
    window_k: jax.Array,
    window_v: jax.Array,
    n_code: int,
) -> AttentionState:
    """Moves the oldest L window entries into the aggregate; keeps the last M as memory.
    Slots never filled hold code S, so they add nothing."""
    block_len = window_z.shape[2] - state.z.shape[2]
    count, added = code_sums(window_z[:, :, :block_len], window_v[:, :, :block_len], n_code)
    n, u_bar = merge_into_aggregate(state.n, state.u_bar, count, added)
    return AttentionState(
        pos_offset=state.pos_offset + block_len,
        z=window_z[:, :, block_len:],
        k_hat=window_k[:, :, block_len:].astype(jnp.float32),
        v=window_v[:, :, block_len:].astype(jnp.float32),
        n=n,
        u_bar=u_bar,
    )


# -- the parallel form over blocks (docs/DESIGN.md section 12) ----------------------------


def block_sums(z: jax.Array, v: jax.Array, n_code: int, block_len: int):
    """Per-block aggregate contributions of entries z [B, H, n·L], v [B, H, n·L, V],
    block-major: counts [n, B, H, S] and value sums [n, B, H, S, V] (code_sums)."""
    b, h, t = z.shape
    n = t // block_len
    z = jnp.moveaxis(z.reshape(b, h, n, block_len), 2, 0)
    return code_sums(z, jnp.moveaxis(v.reshape(b, h, n, block_len, -1), 2, 0), n_code)


def aggregates_before_blocks(
    n: jax.Array, u_bar: jax.Array, counts: jax.Array, sums: jax.Array
) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
    """The aggregate (n, u_bar) [B, H, S(, V)] merged with block after block of counts
    [n, B, H, S] and sums [n, B, H, S, V], as the serial form evicts them: returns the
    aggregate each block sees (everything before it, [n, B, H, S(, V)]) and the one
    after the last block. A scan of merge_into_aggregate: one pass over the sums, the
    serial form's rounding, and no [n, ...] prefix sum (XLA:CPU computes jnp.cumsum as
    a reduce-window, quadratic in n)."""

    def step(aggregate, block):
        return merge_into_aggregate(*aggregate, *block), aggregate

    after, before = jax.lax.scan(step, (n, u_bar), (counts, sums))
    return before, after


def _block_rows(x: jax.Array) -> jax.Array:
    """[n, B, ...] → [n·B, ...]: each block of each sequence a row of its own."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _neighbour_memory(state: AttentionState, z, k, v, axis: str, n_devices: int):
    """Sequence parallelism: the M window entries before this device's run of blocks,
    i.e. the last M of the left neighbour's (the carried memory on device 0)."""
    mem_len = state.z.shape[2]
    shift = [(i, i + 1) for i in range(n_devices - 1)]
    first = jax.lax.axis_index(axis) == 0
    taken = []
    for mine, carried in ((z, state.z), (k, state.k_hat), (v, state.v)):
        passed = jax.lax.ppermute(mine[:, :, mine.shape[2] - mem_len :], axis, shift)
        taken.append(jnp.where(first, carried, passed.astype(carried.dtype)))
    return taken


def _before_this_device(state: AttentionState, counts, sums, axis: str, n_devices: int):
    """Sequence parallelism: the carried aggregate merged with every earlier device's
    evictions (an exclusive scan of per-device totals)."""
    totals = jax.lax.all_gather((jnp.sum(counts, axis=0), jnp.sum(sums, axis=0)), axis)
    earlier = jnp.arange(n_devices) < jax.lax.axis_index(axis)
    before = jax.tree_util.tree_map(
        lambda t: jnp.einsum("p,p...->...", earlier.astype(t.dtype), t), totals
    )
    return merge_into_aggregate(state.n, state.u_bar, *before)


def _from_last_device(x: jax.Array, axis: str, n_devices: int) -> jax.Array:
    """The last device's x on every device (exact: the others add zeros)."""
    last = jax.lax.axis_index(axis) == n_devices - 1
    return jax.lax.psum(jnp.where(last, x, jnp.zeros_like(x)), axis)


def attend_chunk(
    q: jax.Array,
    codes: jax.Array,
    codewords: jax.Array,
    values: jax.Array,
    tables: AttentionTables,
    state: AttentionState,
    block_len: int,
    *,
    n_code: int,
    agg_cache: bool,
    dtype: str = "float32",
    seq_axis: str | None = None,
    n_devices: int = 1,
) -> tuple[jax.Array, AttentionState]:
    """n blocks of L tokens at once, equal to n serial block steps (docs/DESIGN.md
    section 12). q, codewords [B, H, n·L, K], codes [B, H, n·L], values [B, H, n·L, V]
    → (output [B, H, n·L, V] float32, state after the n blocks).

    Entries E = memory ++ chunk; block b attends to E[b·L : b·L + W] and to the carried
    aggregate merged with the per-block sums of E[: b·L], block after block
    (aggregates_before_blocks). With seq_axis (inside shard_map over n_devices devices,
    each holding a contiguous run of at least M tokens), the memory comes from the left
    neighbour and the carried aggregate from an exclusive scan of the devices' totals.
    """
    b, h, t = codes.shape
    n = t // block_len
    mem_len = state.z.shape[2]
    values = values.astype(jnp.float32)
    pos_offset = state.pos_offset
    mem_z, mem_k, mem_v = state.z, state.k_hat, state.v
    if seq_axis is not None:
        pos_offset = pos_offset + jax.lax.axis_index(seq_axis) * t
        mem_z, mem_k, mem_v = _neighbour_memory(
            state, codes, codewords, values, seq_axis, n_devices
        )
    ez = jnp.concatenate([mem_z, codes], axis=2)  # [B, H, M + n·L]
    ek = jnp.concatenate([mem_k, codewords.astype(jnp.float32)], axis=2)
    ev = jnp.concatenate([mem_v, values], axis=2)

    counts, sums = block_sums(ez[:, :, :t], ev[:, :, :t], n_code, block_len)
    carried = (state.n, state.u_bar)
    if seq_axis is not None:
        carried = _before_this_device(state, counts, sums, seq_axis, n_devices)
    (block_n, block_u), final = aggregates_before_blocks(*carried, counts, sums)

    # The blocks become rows of a batch of n·B, block-major like the aggregates. Every
    # window holds W entries of E: copied in the compute dtype (half the bytes in
    # bfloat16), as attend() would cast them anyway.
    width = mem_len + block_len
    index = jnp.arange(n)[:, None] * block_len + jnp.arange(width)[None, :]  # [n, W]
    out = attend(
        _block_rows(jnp.moveaxis(q.reshape(b, h, n, block_len, -1), 2, 0)),
        _block_rows(jnp.moveaxis(ek.astype(dtype)[:, :, index], 2, 0)),
        _block_rows(jnp.moveaxis(ev.astype(dtype)[:, :, index], 2, 0)),
        tables,
        (pos_offset[None, :] + jnp.arange(n)[:, None] * block_len).reshape(n * b),
        _block_rows(block_n),
        _block_rows(block_u),
        agg_cache=agg_cache,
        dtype=dtype,
    )  # [n·B, H, L, V]
    out = jnp.moveaxis(out.reshape(n, b, h, block_len, -1), 0, 2).reshape(b, h, t, -1)

    last = (ez[:, :, t:], ek[:, :, t:], ev[:, :, t:], *final)
    if seq_axis is not None:  # the last device's memory and aggregate are the state after
        last = tuple(_from_last_device(x, seq_axis, n_devices) for x in last)
    new_state = AttentionState(
        pos_offset=state.pos_offset + t * n_devices,
        z=last[0],
        k_hat=last[1],
        v=last[2],
        n=last[3],
        u_bar=last[4],
    )
    return out, new_state
