"""Sampling rules: temperature, top-k, top-p (nucleus) and min-p, applied to log-probs.

A `Sampler` is a small frozen dataclass, hashable, so it is a static argument of the
compiled decoding loop; it knows nothing about the model.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from tvq.errors import InputError, is_int


@dataclasses.dataclass(frozen=True)
class Sampler:
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "min_p"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value):
                raise InputError(f"{name.replace('_', '-')} must be a finite number, got {value}")
        if not is_int(self.top_k):
            raise InputError(f"top-k must be an integer, got {self.top_k!r}")
        if not self.temperature >= 0:
            raise InputError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InputError(f"top-k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top-p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise InputError(f"min-p must be in [0, 1), got {self.min_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def filter(self, log_probs: jax.Array) -> jax.Array:
        """Log-probs [B, N] → logits [B, N] of the distribution to sample from."""
        logits = log_probs / self.temperature
        if self.top_k:
            k = min(self.top_k, logits.shape[-1])
            kth = jax.lax.top_k(logits, k)[0][..., -1:]
            logits = jnp.where(logits < kth, -jnp.inf, logits)
        if self.min_p > 0:
            probs = jax.nn.softmax(logits, axis=-1)
            floor = self.min_p * jnp.max(probs, axis=-1, keepdims=True)
            logits = jnp.where(probs < floor, -jnp.inf, logits)
        if self.top_p < 1:
            probs = jax.nn.softmax(logits, axis=-1)
            logits = jnp.where(probs < top_p_cutoff(probs, self.top_p), -jnp.inf, logits)
        return logits

    def sample(self, key: jax.Array, log_probs: jax.Array) -> jax.Array:
        """One token id per row, int32 [B]: the first token whose cumulative probability
        reaches u·total, u uniform in (0, 1] (one random number per row, all from key)."""
        return self._pick(1.0 - jax.random.uniform(key, (log_probs.shape[0], 1)), log_probs)

    def pick(self, u: jax.Array, log_probs: jax.Array) -> jax.Array:
        """One token id per row [B] as sample does, with each row's random number u [B]
        in (0, 1] given: row_uniforms(keys) draws one per row's own key, so a row's token
        does not depend on the other rows (drawn ahead for a chunk of decoding steps)."""
        return self._pick(u[:, None], log_probs)

    def _pick(self, u: jax.Array, log_probs: jax.Array) -> jax.Array:
        if self.greedy:
            return jnp.argmax(log_probs, axis=-1).astype(jnp.int32)
        probs = jax.nn.softmax(self.filter(log_probs), axis=-1)
        # The barrier keeps XLA from fusing the softmax into the prefix sum, where it
        # recomputes exp over and over (measured: 0.1-0.3 ms a token at batch 1).
        cumulative = jnp.cumsum(jax.lax.optimization_barrier(probs), axis=-1)
        index = jnp.sum(cumulative < u * cumulative[:, -1:], axis=-1)
        return jnp.minimum(index, probs.shape[-1] - 1).astype(jnp.int32)


def row_uniforms(keys: jax.Array) -> jax.Array:
    """One number in (0, 1] per key [B, 2] → [B]: 1 − uniform(key)."""
    return 1.0 - jax.vmap(lambda k: jax.random.uniform(k, ()))(keys)


def top_p_cutoff(probs: jax.Array, top_p: float) -> jax.Array:
    """The smallest probability kept by nucleus sampling, per row [B, 1]: a token is kept
    when the mass of the tokens likelier than it is below top_p (the top one always).

    The mass above a threshold t, M(t) = Σ_{p > t} p, falls as t rises; the cutoff is the
    smallest float t with M(t) < top_p, which is a token's probability. Bisection over the
    bit patterns of positive floats (ordered like integers) finds it exactly in 31 steps
    of one masked sum each, where sorting the vocabulary would cost far more."""
    low = jnp.zeros([probs.shape[0], 1], jnp.int32)  # M(0) = 1 >= top_p
    high = jax.lax.bitcast_convert_type(jnp.max(probs, axis=-1, keepdims=True), jnp.int32)

    def halve(_, bounds):
        low, high = bounds
        mid = low + (high - low) // 2
        t = jax.lax.bitcast_convert_type(mid, jnp.float32)
        above = jnp.sum(jnp.where(probs > t, probs, 0.0), axis=-1, keepdims=True)
        below_p = above < top_p
        return jnp.where(below_p, low, mid), jnp.where(below_p, mid, high)

    _, high = jax.lax.fori_loop(0, 31, halve, (low, high))
    return jax.lax.bitcast_convert_type(high, jnp.float32)
