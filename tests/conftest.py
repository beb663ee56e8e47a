"""Shared helpers: tiny configs and a runner for one sublayer over blocks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import tvq
from tvq.attention import VQAttention
from tvq.model import scan_blocks
from tvq.state import initial_attention_state

DIVISORS_12 = (1, 2, 3, 4, 6, 12)

# Unit tests compile hundreds of tiny programs; XLA's optimisations cost more time than
# they save there and do not change results beyond float rounding.
jax.config.update("jax_disable_most_optimizations", True)


def tiny_config(**overrides) -> tvq.ModelConfig:
    fields = dict(d_model=16, d_k=8, d_v=8, n_head=2, n_code=4, n_layer=1, n_vocab=13, mem_len=3)
    fields.update(overrides)
    return tvq.ModelConfig(**fields)


def random_tokens(config: tvq.ModelConfig, batch: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, config.n_vocab, size=(batch, length))


def sublayer_for(config: tvq.ModelConfig) -> VQAttention:
    return VQAttention(
        d_model=config.d_model,
        d_k=config.d_k,
        d_v=config.d_v,
        n_head=config.n_head,
        n_code=config.n_code,
        mem_len=config.mem_len,
        agg_cache=config.agg_cache,
        pe_lam=config.pe_lam,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
    )


def init_sublayer(config: tvq.ModelConfig, seed: int = 0):
    layer = sublayer_for(config)
    x = jnp.zeros([1, 1, config.d_model])
    state = initial_attention_state(config, 1)

    def run_once(module):
        return module(x, state, module.tables())

    variables = layer.init(jax.random.PRNGKey(seed), method=run_once)
    params = variables["params"]
    # Random (not zero-initialised) u, v so the content and position biases are exercised.
    key_u, key_v = jax.random.split(jax.random.PRNGKey(seed + 100))
    params = dict(params)
    params["u"] = jax.random.normal(key_u, params["u"].shape)
    params["v"] = jax.random.normal(key_v, params["v"].shape)
    return layer, params


def run_sublayer(layer, params, x, block_len, state, train=False):
    """x [B, T, D] through one sublayer in blocks → (residuals [B, T, D], final state)."""
    variables = {"params": params}
    tables = layer.apply(variables, method=VQAttention.tables)

    def step(carry, block):
        carry, res, _ = layer.apply(variables, block, carry, tables, train)
        return carry, res

    final, out = scan_blocks(step, state, x, block_len)
    return out, final
