"""One VQ-attention sublayer (DESIGN.md section 4; Lingle 2024, sections 3.2-3.4).

Keys are vector-quantized against a learned codebook, so every token older
than the window memory can be folded into a per-codeword count and mean value
(the aggregate). Softmax attention over [aggregate codewords | window memory |
present block] is then exact and costs O(L·(M + L + S)) per block of L tokens.
Layout inside: head-major, [B, H, L, ·] for queries and [B, H, W, ·] for the
window, W = M + L.
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from tvq.layers import RMSNorm, kernel_init, ones_init, rms_normalize, sinusoid, zeros_init
from tvq.state import AttentionState

MASK_VALUE = 1e30  # stands for infinity in masked scores


@flax.struct.dataclass
class AttentionTables:
    """Per-sublayer values that depend on the parameters only, computed once per call."""

    codebook: jax.Array  # [H, S, K] float32, never differentiated
    rel: jax.Array  # [M + 1, H, K] float32: c·r_proj(Sinusoid(d)) for d = 0 … M
    u: jax.Array  # [H, K] float32: c·u, content bias
    v: jax.Array  # [H, K] float32: c·v, position bias


def aggregate_bias(counts: jax.Array) -> jax.Array:
    """log(n_s) for n_s > 0 and −∞ (−1e30) for n_s = 0 (DESIGN.md invariant 5)."""
    return jnp.where(counts > 0, jnp.log(jnp.maximum(counts, 1.0)), -MASK_VALUE)


def flush_tiny(shifted: jax.Array) -> jax.Array:
    """exp() of a score this far below the maximum is < 1e-35 of the top weight: make it
    exactly 0, so no subnormal float (slow on x86) ever enters the weighted sums."""
    return jnp.where(shifted < -80.0, -jnp.inf, shifted)


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
    state: AttentionState,
    *,
    agg_cache: bool,
    dtype: str = "float32",
) -> jax.Array:
    """Softmax over the window keys and (with agg_cache) the S codewords.

    q [B, H, L, K] (already scaled by c), window_k [B, H, W, K], window_v [B, H, W, V];
    the state supplies pos_offset and the aggregate. Returns [B, H, L, V] float32.
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
    filled = j[None] >= (mem_len - state.pos_offset)[:, None, None]  # [B, 1, W]
    filled = filled[:, None]  # [B, 1, 1, W]
    causal = dist >= 0
    local = dist <= mem_len

    scores = jnp.einsum("bhlk,bhwk->bhlw", qu, window_k)
    by_distance = jnp.einsum("bhlk,dhk->bhld", qv, tables.rel)  # [B, H, L, M + 1]
    index = jnp.broadcast_to(jnp.clip(dist, 0, mem_len), scores.shape)
    positional = jnp.take_along_axis(by_distance, index, axis=-1)
    scores = scores + jnp.where(filled & causal & local, positional, 0.0)
    keep = filled & causal if agg_cache else filled & causal & local
    scores = jnp.where(keep, scores, -MASK_VALUE)

    agg_scores = None
    if agg_cache:
        agg_scores = jnp.einsum("bhlk,hsk->bhls", qu, tables.codebook)
        agg_scores = agg_scores + aggregate_bias(state.n)[:, :, None, :]
    return softmax_mix(scores, window_v, agg_scores, state.u_bar, dtype)


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


def evict(
    state: AttentionState,
    window_z: jax.Array,
    window_k: jax.Array,
    window_v: jax.Array,
    n_code: int,
) -> AttentionState:
    """Moves the oldest L window entries into the aggregate; keeps the last M as memory."""
    block_len = window_z.shape[2] - state.z.shape[2]
    gone = jax.nn.one_hot(window_z[:, :, :block_len], n_code, dtype=jnp.float32)  # [B, H, L, S]
    n_old = state.n
    n_new = n_old + jnp.sum(gone, axis=2)
    denom = jnp.maximum(n_new, 1.0)
    added = jnp.einsum("bhls,bhlv->bhsv", gone, window_v[:, :, :block_len].astype(jnp.float32))
    u_bar = (n_old / denom)[..., None] * state.u_bar + added / denom[..., None]
    return AttentionState(
        pos_offset=state.pos_offset + block_len,
        z=window_z[:, :, block_len:],
        k_hat=window_k[:, :, block_len:].astype(jnp.float32),
        v=window_v[:, :, block_len:].astype(jnp.float32),
        n=n_new,
        u_bar=u_bar,
    )


class Quantizer(nn.Module):
    """The learnable codebook: C = c_sum / max(c_count, 0.01), updated by EMA in training."""

    n_head: int
    n_code: int
    d_k: int
    param_dtype: str = "float32"

    def setup(self) -> None:
        shape = (self.n_head, self.n_code, self.d_k)
        self.c_sum = self.param("c_sum", kernel_init, shape, self.param_dtype)
        self.c_count = self.param("c_count", ones_init, shape[:2], self.param_dtype)

    def __call__(self) -> jax.Array:
        c_sum = self.c_sum.astype(jnp.float32)
        c_count = self.c_count.astype(jnp.float32)
        return jax.lax.stop_gradient(c_sum / jnp.maximum(c_count, 0.01)[..., None])


class VQAttention(nn.Module):
    """A gated attention unit whose keys are vector-quantized; residual output."""

    d_model: int
    d_k: int
    d_v: int
    n_head: int
    n_code: int
    mem_len: int
    agg_cache: bool
    pe_lam: float
    dtype: str = "float32"
    param_dtype: str = "float32"

    def setup(self) -> None:
        h, k, v = self.n_head, self.d_k, self.d_v
        dense = dict(
            use_bias=False, kernel_init=kernel_init, dtype=self.dtype, param_dtype=self.param_dtype
        )
        self.input_ln = RMSNorm(self.d_model, self.param_dtype)
        self.q_proj = nn.Dense(h * k, **dense)
        self.kvg_proj = nn.Dense(h * k + 2 * h * v, **dense)
        self.r_proj = nn.Dense(h * k, **dense)
        self.res_proj = nn.Dense(self.d_model, **dense)
        self.u = self.param("u", zeros_init, (h * k,), self.param_dtype)
        self.v = self.param("v", zeros_init, (h * k,), self.param_dtype)
        self.quantizer = Quantizer(h, self.n_code, k, self.param_dtype)

    @property
    def scale(self) -> float:
        return self.d_k**-0.25

    def tables(self) -> AttentionTables:
        h, k, c = self.n_head, self.d_k, self.scale
        distances = jnp.arange(self.mem_len + 1)
        rel = self.r_proj(sinusoid(distances, self.d_model, self.pe_lam).astype(self.dtype))
        return AttentionTables(
            codebook=self.quantizer(),
            rel=c * rel.astype(jnp.float32).reshape(self.mem_len + 1, h, k),
            u=c * self.u.astype(jnp.float32).reshape(h, k),
            v=c * self.v.astype(jnp.float32).reshape(h, k),
        )

    def project(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """x [B, L, D] → q, keys [B, H, L, K] (normalised, scaled by c), values
        [B, H, L, V], gate [B, L, H·V] (steps 1-3 of DESIGN.md section 4)."""
        b, block_len, _ = x.shape
        h, k, v = self.n_head, self.d_k, self.d_v
        x_tilde = self.input_ln(x)
        q = self.q_proj(x_tilde).reshape(b, block_len, h, k)
        q = rms_normalize(q.astype(jnp.float32)) * self.scale
        kvg = self.kvg_proj(x_tilde)
        keys, values, gate = jnp.split(kvg, [h * k, h * k + h * v], axis=-1)
        keys = rms_normalize(keys.reshape(b, block_len, h, k).astype(jnp.float32)) * self.scale
        values = nn.silu(values).reshape(b, block_len, h, v)
        gate = nn.silu(gate)
        return (
            q.transpose(0, 2, 1, 3),
            keys.transpose(0, 2, 1, 3),
            values.transpose(0, 2, 1, 3),
            gate,
        )

    def output(self, out: jax.Array, gate: jax.Array) -> jax.Array:
        """Attention output [B, H, L, V] gated and projected → residual [B, L, D]."""
        b, h, block_len, v = out.shape
        out = out.transpose(0, 2, 1, 3).reshape(b, block_len, h * v)
        return self.res_proj((out.astype(self.dtype) * gate).astype(self.dtype))

    def __call__(
        self,
        x: jax.Array,
        state: AttentionState,
        tables: AttentionTables,
        train: bool = False,
        mask: jax.Array | None = None,
    ) -> tuple[AttentionState, jax.Array, dict[str, jax.Array]]:
        """x [B, L, D] → (new state, residual [B, L, D], training statistics)."""
        b, block_len, _ = x.shape
        q, keys, values, gate = self.project(x)
        codes, codewords, errors = quantize(keys, tables.codebook)
        if train:  # straight-through: the forward value is C_z, gradients reach k
            codewords = codewords + keys - jax.lax.stop_gradient(keys)

        window_z = jnp.concatenate([state.z, codes], axis=2)  # [B, H, W]
        window_k = jnp.concatenate([state.k_hat, codewords], axis=2)  # [B, H, W, K]
        window_v = jnp.concatenate([state.v, values.astype(jnp.float32)], axis=2)
        out = attend(
            q, window_k, window_v, tables, state, agg_cache=self.agg_cache, dtype=self.dtype
        )
        res = self.output(out, gate)
        new_state = evict(state, window_z, window_k, window_v, self.n_code)

        stats: dict[str, jax.Array] = {}
        if train:
            weight = jnp.ones([b, block_len]) if mask is None else mask.astype(jnp.float32)
            assigned = jax.nn.one_hot(codes, self.n_code) * weight[:, None, :, None]
            stats = dict(
                commit=jnp.sum(errors, axis=1),  # [B, L]: Σ_heads ‖k − sg(C_z)‖²
                code_sum=jnp.einsum("bhls,bhlk->hsk", assigned, jax.lax.stop_gradient(keys)),
                code_count=jnp.sum(assigned, axis=(0, 2)),
            )
        return new_state, res.astype(x.dtype), stats
