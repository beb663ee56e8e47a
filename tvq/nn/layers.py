"""Small building blocks of Transformer-VQ (docs/DESIGN.md section 3)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

EPS = 1e-6

# Initialisers of the reference layout (docs/DESIGN.md section 4).
kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "normal")
zeros_init = nn.initializers.zeros
ones_init = nn.initializers.ones


def rms_normalize(x: jax.Array) -> jax.Array:
    """x · rsqrt(mean(x², last axis) + eps), in float32, cast back to x's dtype."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + EPS)
    return y.astype(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm with gain g (init 1) and bias b (init 0), parameters named as the reference."""

    width: int
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        g = self.param("g", ones_init, (self.width,), self.param_dtype)
        b = self.param("b", zeros_init, (self.width,), self.param_dtype)
        y = rms_normalize(x.astype(jnp.float32)) * g.astype(jnp.float32) + b.astype(jnp.float32)
        return y.astype(x.dtype)


def sinusoid(positions: jax.Array, width: int, lam: float) -> jax.Array:
    """concat(sin(p·ω), cos(p·ω)) with ω_i = lam^(−2i/width); [..., width] float32."""
    inv_freq = 1.0 / (lam ** (jnp.arange(0, width, 2, dtype=jnp.float32) / width))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
