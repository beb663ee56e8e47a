"""docs/DESIGN.md invariant 1: causality Jacobians, for a sublayer and for the whole model.

For every (T = 12, L, M) with L and M dividing 12, agg_cache on and off, the
output at t must not depend on inputs after t and must depend on the ones it
can see: with agg_cache off exactly the band 0 ≤ t − t' ≤ reach, with it on
every t' ≤ t.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tvq
from tests.conftest import (
    DIVISORS_12,
    init_sublayer,
    random_tokens,
    run_sublayer,
    sublayer_for,
    tiny_config,
)
from tvq.nn.state import initial_attention_state
from tvq.runtime.forward import forward

T = 12
CASES = list(itertools.product(DIVISORS_12, DIVISORS_12, (False, True)))
# Parameter shapes do not depend on mem_len or agg_cache: one set serves every case.
BASE = tiny_config(d_model=8, d_k=4, d_v=4)


@pytest.fixture(scope="module")
def sublayer_params():
    return init_sublayer(BASE)[1]


@pytest.fixture(scope="module")
def model_params():
    return tvq.Model.init(BASE, seed=3).params


def expected_dependence(reach: int, agg_cache: bool) -> np.ndarray:
    """[T, T] booleans: does output t depend on input t'?"""
    t = np.arange(T)[:, None]
    s = np.arange(T)[None, :]
    lag = t - s
    return (lag >= 0) & (agg_cache | (lag <= reach))


def assert_dependence(jac_norm: np.ndarray, expected: np.ndarray) -> None:
    assert np.all(jac_norm[~expected] == 0.0), "output depends on an input it must not see"
    assert np.all(jac_norm[expected] > 1e-9), "output ignores an input it should see"


@pytest.mark.parametrize(("block_len", "mem_len", "agg_cache"), CASES)
def test_sublayer_causality(block_len, mem_len, agg_cache, sublayer_params):
    config = tiny_config(mem_len=mem_len, agg_cache=agg_cache, d_model=8, d_k=4, d_v=4)
    layer, params = sublayer_for(config), sublayer_params
    x = jax.random.normal(jax.random.PRNGKey(1), [1, T, config.d_model])
    state = initial_attention_state(config, 1)

    def outputs(x):
        return run_sublayer(layer, params, x, block_len, state)[0][0]  # [T, D]

    jac = jax.jit(jax.jacfwd(outputs))(x)[:, :, 0]  # [T, D, T, D]
    norm = np.asarray(jnp.sqrt(jnp.sum(jnp.square(jac), axis=(1, 3))))
    assert_dependence(norm, expected_dependence(mem_len, agg_cache))


@pytest.mark.parametrize(("block_len", "mem_len", "agg_cache"), CASES)
def test_model_causality(block_len, mem_len, agg_cache, model_params):
    config = tiny_config(mem_len=mem_len, agg_cache=agg_cache, d_model=8, d_k=4, d_v=4)
    model = tvq.Model(config, model_params)
    tokens = jnp.asarray(random_tokens(config, 1, T))
    state = model.initial_state(1)
    readout = jax.random.normal(jax.random.PRNGKey(2), [config.n_vocab])

    def outputs(offsets):
        log_probs, _ = forward(config, model.params, tokens, state, block_len, None, offsets)
        return log_probs[0] @ readout  # [T]

    offsets = jnp.zeros([1, T, config.d_model])
    jac = jax.jit(jax.jacfwd(outputs))(offsets)[:, 0]  # [T, T, D]
    norm = np.asarray(jnp.sqrt(jnp.sum(jnp.square(jac), axis=-1)))
    # Two sublayers in a row: information travels up to 2·M tokens without the aggregate.
    assert_dependence(norm, expected_dependence(2 * mem_len * config.n_layer, agg_cache))
