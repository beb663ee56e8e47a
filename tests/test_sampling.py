"""Sampling filters keep exactly the tokens they should."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tvq
from tvq.text.sampling import Sampler, filter_logits, sample

PROBS = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))


def kept(sampler: Sampler) -> list[int]:
    return np.isfinite(np.asarray(filter_logits(sampler, PROBS)[0])).astype(int).tolist()


@pytest.mark.parametrize(
    ("sampler", "expected"),
    [
        (Sampler(top_p=0.5), [1, 0, 0, 0]),
        (Sampler(top_p=0.8), [1, 1, 0, 0]),
        (Sampler(top_p=0.81), [1, 1, 1, 0]),
        (Sampler(top_p=1.0), [1, 1, 1, 1]),
        (Sampler(top_k=2), [1, 1, 0, 0]),
        (Sampler(min_p=0.35), [1, 1, 0, 0]),
        (Sampler(min_p=0.2, top_k=1), [1, 0, 0, 0]),
    ],
)
def test_filters(sampler, expected):
    assert kept(sampler) == expected


def test_top_p_matches_sorting():
    """The bisection cutoff keeps what the sorted-cumulative-mass definition keeps."""
    rng = np.random.default_rng(0)
    log_probs = jax.nn.log_softmax(jnp.asarray(rng.normal(0, 3, (6, 500)), jnp.float32))
    for temperature, top_p in [(1.0, 0.9), (0.6, 0.5), (1.7, 0.95), (0.3, 0.99)]:
        got = np.isfinite(np.asarray(filter_logits(Sampler(temperature, top_p=top_p), log_probs)))
        probs = np.asarray(jax.nn.softmax(log_probs / temperature, axis=-1), np.float64)
        for row, p in enumerate(probs):
            ordered = np.sort(p)[::-1]
            n_keep = np.sum(np.cumsum(ordered) - ordered < top_p)
            want = p >= ordered[n_keep - 1]
            assert got[row].sum() == want.sum() and (got[row] == want).all(), (temperature, row)


def test_greedy_and_temperature():
    assert int(sample(Sampler(temperature=0), jax.random.PRNGKey(0), PROBS)[0]) == 0
    draws = jax.vmap(lambda k: sample(Sampler(temperature=1.0), k, PROBS)[0])(
        jax.random.split(jax.random.PRNGKey(1), 4000)
    )
    freq = np.bincount(np.asarray(draws), minlength=4) / 4000
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.03)


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_k=-1)])
def test_bad_values(bad):
    with pytest.raises(tvq.InputError):
        Sampler(**bad)


@pytest.mark.parametrize("seed", [0, 1, -5, 2**31 - 1, -(2**31), 2**31, 2**32 + 3, 2**40])
def test_host_seed_keys_are_jax_keys(seed):
    from tvq.runtime.decode_loop import row_keys, seed_key

    np.testing.assert_array_equal(seed_key(seed), np.asarray(jax.random.PRNGKey(seed)))
    want = [jax.random.fold_in(jax.random.PRNGKey(seed), i) for i in range(3)]
    np.testing.assert_array_equal(row_keys(seed, 3), np.asarray(want))
