"""The VQ-attention sublayer as a flax module: its parameters (named as the reference
layout, docs/DESIGN.md section 4) and its two forms, a block of L tokens against the
window state (`__call__`) and one token against the decoding ring (`step`). Both compute
the same numbers (docs/DESIGN.md invariant 3); the arithmetic lives in tvq/nn/attention.py
and the ring's layout in tvq/nn/ring.py.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from tvq.nn import ring as ring_layout
from tvq.nn.attention import AttentionTables, attend, attend_chunk, code_sums, evict, quantize
from tvq.nn.layers import RMSNorm, kernel_init, ones_init, rms_normalize, sinusoid, zeros_init
from tvq.nn.ring import RingState
from tvq.nn.state import AttentionState

# The architecture fields one sublayer reads (a subset of ModelConfig's).
ATTENTION_FIELDS = (
    "d_model", "d_k", "d_v", "n_head", "n_code", "mem_len", "agg_cache", "pe_lam", "dtype",
    "param_dtype",
)  # fmt: skip


def attention_fields(source: Any) -> dict[str, Any]:
    """The sublayer's fields read off a ModelConfig (or another sublayer-shaped object)."""
    return {name: getattr(source, name) for name in ATTENTION_FIELDS}


@flax.struct.dataclass
class SublayerStats:
    """What training needs from one sublayer and block (docs/DESIGN.md section 11)."""

    commit: jax.Array  # [] Σ over tokens and heads of ‖k − sg(C_z)‖²
    code_sum: jax.Array  # [H, S, K] Σ of the keys assigned to each code
    code_count: jax.Array  # [H, S] how many keys each code got

    def __add__(self, other: SublayerStats) -> SublayerStats:
        return jax.tree_util.tree_map(jnp.add, self, other)

    @classmethod
    def zeros(cls, n_head: int, n_code: int, d_k: int) -> SublayerStats:
        return cls(
            commit=jnp.zeros([]),
            code_sum=jnp.zeros([n_head, n_code, d_k]),
            code_count=jnp.zeros([n_head, n_code]),
        )


class AttentionModule(nn.Module):
    """The fields of one VQ-attention sublayer; VQAttention and the layer holding two of
    them (tvq/nn/transformer.py) share them."""

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


class VQAttention(AttentionModule):
    """A gated attention unit whose keys are vector-quantized; residual output."""

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
        """Values that depend on the parameters only: computed once per call, outside the
        loop over blocks or tokens."""
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
        [B, H, L, V], gate [B, L, H·V] (steps 1-3 of docs/DESIGN.md section 4)."""
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
        block_len: int | None = None,
        seq_axis: str | None = None,
        n_devices: int = 1,
    ) -> tuple[AttentionState, jax.Array, SublayerStats | None]:
        """x [B, T, D] → (new state, residual [B, T, D], training statistics or None when
        not training). block_len None: x is one block (the serial form's step); an
        integer dividing T: x is T / block_len blocks computed at once (the parallel
        form, docs/DESIGN.md section 12), with seq_axis across n_devices devices."""
        q, keys, values, gate = self.project(x)
        codes, codewords, errors = quantize(keys, tables.codebook)
        if train:  # straight-through: the forward value is C_z, gradients reach k
            codewords = codewords + keys - jax.lax.stop_gradient(keys)

        if block_len is None:
            window_z = jnp.concatenate([state.z, codes], axis=2)  # [B, H, W]
            window_k = jnp.concatenate([state.k_hat, codewords], axis=2)  # [B, H, W, K]
            window_v = jnp.concatenate([state.v, values.astype(jnp.float32)], axis=2)
            out = attend(
                q, window_k, window_v, tables, state.pos_offset, state.n, state.u_bar,
                agg_cache=self.agg_cache, dtype=self.dtype,
            )  # fmt: skip
            new_state = evict(state, window_z, window_k, window_v, self.n_code)
        else:
            out, new_state = attend_chunk(
                q, codes, codewords, values, tables, state, block_len, n_code=self.n_code,
                agg_cache=self.agg_cache, dtype=self.dtype, seq_axis=seq_axis,
                n_devices=n_devices,
            )  # fmt: skip
        res = self.output(out, gate)

        stats = None
        if train:
            by_head = jnp.moveaxis(jax.lax.stop_gradient(keys), 1, 0)  # [H, B, L, K]
            count, total = code_sums(jnp.moveaxis(codes, 1, 0), by_head, self.n_code)
            stats = SublayerStats(
                commit=jnp.sum(errors),
                code_sum=jnp.sum(total, axis=1),
                code_count=jnp.sum(count, axis=1),
            )
        return new_state, res.astype(x.dtype), stats

    def step(
        self, x: jax.Array, ring: RingState, tables: AttentionTables
    ) -> tuple[RingState, jax.Array]:
        """One token x [B, 1, D] against the decoding ring → (new ring, residual [B, 1, D]);
        equal to a block of length 1 through __call__ (docs/DESIGN.md section 7)."""
        q, keys, values, gate = self.project(x)
        codes, _, _ = quantize(keys, tables.codebook)
        ring = ring_layout.push(ring, codes[:, :, 0], values[:, :, 0])
        out = ring_layout.attend_ring(
            q[:, :, 0], ring, tables, agg_cache=self.agg_cache, dtype=self.dtype
        )  # [B, H, V]
        return ring_layout.advance(ring), self.output(out[:, :, None], gate).astype(x.dtype)
