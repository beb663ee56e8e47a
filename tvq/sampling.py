"""Sampling rules: temperature, top-k, top-p (nucleus) and min-p, applied to log-probs.

A `Sampler` is a small frozen dataclass, hashable, so it is a static argument of the
compiled decoding loop; it knows nothing about the model.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from tvq.errors import InputError


@dataclasses.dataclass(frozen=True)
class Sampler:
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off

    def __post_init__(self) -> None:
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
            # Keep the likeliest tokens whose mass before them is below p (the top one
            # always): everything at or above the last kept logit survives.
            ordered = -jnp.sort(-logits, axis=-1)  # descending
            probs = jax.nn.softmax(ordered, axis=-1)
            n_keep = jnp.sum(jnp.cumsum(probs, axis=-1) - probs < self.top_p, axis=-1)
            cutoff = jnp.take_along_axis(ordered, n_keep[:, None] - 1, axis=-1)
            logits = jnp.where(logits < cutoff, -jnp.inf, logits)
        return logits

    def sample(self, key: jax.Array, log_probs: jax.Array) -> jax.Array:
        """One token id per row, int32 [B]."""
        if self.greedy:
            return jnp.argmax(log_probs, axis=-1).astype(jnp.int32)
        return jax.random.categorical(key, self.filter(log_probs), axis=-1).astype(jnp.int32)
