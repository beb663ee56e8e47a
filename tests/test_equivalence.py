"""docs/DESIGN.md invariants 2 to 5: chaining, block-length invariance, gradients, log-count
bias."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tvq
from tests.conftest import DIVISORS_12, count_compilations, random_tokens, tiny_config, with_param
from tvq.nn.attention import AttentionTables, aggregate_bias, attend, code_sums
from tvq.nn.state import AttentionState
from tvq.runtime.forward import forward

ATOL = 1e-5
T = 12


def max_diff(a, b) -> float:
    return float(jnp.max(jnp.abs(jnp.asarray(a) - jnp.asarray(b))))


# -- invariant 3: block-length invariance ---------------------------------------------------


# Every pair of values of the three switches meets in one of these four cases (a
# pairwise covering of the eight); each case compiles six block lengths.
PAIRWISE = [(False, False, False), (False, True, True), (True, False, True), (True, True, False)]


@pytest.mark.parametrize(("agg_cache", "pe_abs", "e_tie"), PAIRWISE)
def test_block_length_invariance(agg_cache, pe_abs, e_tie):
    config = tiny_config(agg_cache=agg_cache, pe_abs=pe_abs, e_tie=e_tie, mem_len=4)
    model = tvq.Model.init(config, seed=1)
    if pe_abs:  # the scale starts at 0; make absolute positions matter
        model = with_param(model, "position_embedder/scale", 0.7)
    tokens = random_tokens(config, 2, T)
    reference, ref_state = model.log_probs(tokens, block_len=T)
    for block_len in DIVISORS_12:
        log_probs, state = model.log_probs(tokens, block_len=block_len)
        assert log_probs.shape == (2, T, config.n_vocab)
        assert max_diff(log_probs, reference) < ATOL, block_len
        assert max_diff(state.sublayers[-1].u_bar, ref_state.sublayers[-1].u_bar) < ATOL
        np.testing.assert_array_equal(state.sublayers[-1].n, ref_state.sublayers[-1].n)


@pytest.mark.parametrize("agg_cache", [False, True])
def test_tail_shorter_than_block(agg_cache):
    config = tiny_config(agg_cache=agg_cache, mem_len=3)
    model = tvq.Model.init(config, seed=2)
    tokens = random_tokens(config, 1, 23)
    reference, ref_state = model.log_probs(tokens, block_len=1)
    for block_len in (5, 7, 10, 40):  # 23 = 4·5 + 3 = 3·7 + 2 = 2·10 + 3 = 0·40 + 23
        log_probs, state = model.log_probs(tokens, block_len=block_len)
        assert max_diff(log_probs, reference) < ATOL, block_len
        np.testing.assert_array_equal(state.positions, [23])
        np.testing.assert_array_equal(state.sublayers[0].z, ref_state.sublayers[0].z)


def test_mem_len_matters():
    """Guards the invariance tests against a model that ignores its window entirely."""
    tokens = random_tokens(tiny_config(), 1, T)
    params = tvq.Model.init(tiny_config(mem_len=2, agg_cache=False)).params
    short = tvq.Model(tiny_config(mem_len=2, agg_cache=False), params).log_probs(tokens)[0]
    long = tvq.Model(tiny_config(mem_len=6, agg_cache=False), params).log_probs(tokens)[0]
    assert max_diff(short[:, :3], long[:, :3]) < ATOL  # nothing is out of reach yet
    assert max_diff(short[:, 3:], long[:, 3:]) > 1e-3


def test_with_agg_cache_switches_only_the_aggregate():
    tokens = random_tokens(tiny_config(), 1, T)
    model = tvq.Model.init(tiny_config(mem_len=2))
    off = model.with_agg_cache(False)
    assert off.with_agg_cache(True).config == model.config and not off.config.agg_cache
    for a, b in zip(jax.tree_util.tree_leaves(off.params), jax.tree_util.tree_leaves(model.params),
                    strict=True):  # fmt: skip
        np.testing.assert_array_equal(a, b)
    want = tvq.Model(tiny_config(mem_len=2, agg_cache=False), model.params).log_probs(tokens)[0]
    got = off.log_probs(tokens)[0]
    assert max_diff(got, want) == 0
    assert max_diff(got[:, 3:], model.log_probs(tokens)[0][:, 3:]) > 1e-3  # beyond the window


def test_bfloat16_close_to_float32():
    f32 = tiny_config(mem_len=4)
    bf16 = tiny_config(mem_len=4, dtype="bfloat16")
    params = tvq.Model.init(f32, seed=4).params
    tokens = random_tokens(f32, 2, T)
    a = tvq.Model(f32, params).log_probs(tokens)[0]
    b1 = tvq.Model(bf16, params).log_probs(tokens, block_len=3)[0]
    b2 = tvq.Model(bf16, params).log_probs(tokens, block_len=12)[0]
    assert b1.dtype == jnp.float32
    assert max_diff(a, b1) < 0.1
    assert max_diff(b1, b2) < 0.05


# -- invariant 2: chaining ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("block_len", "mem_len", "agg_cache"), [(1, 3, True), (3, 4, True), (4, 2, False), (6, 6, True)]
)
def test_chained_calls_equal_one_call(block_len, mem_len, agg_cache):
    config = tiny_config(mem_len=mem_len, agg_cache=agg_cache, pe_abs=True)
    model = with_param(tvq.Model.init(config, seed=5), "position_embedder/scale", 0.5)
    tokens = random_tokens(config, 3, T)
    whole, whole_state = model.log_probs(tokens, block_len=block_len)
    state, pieces = None, []
    for start in range(0, T, block_len):
        out, state = model.log_probs(
            tokens[:, start : start + block_len], state=state, block_len=block_len
        )
        pieces.append(out)
    assert max_diff(jnp.concatenate(pieces, axis=1), whole) < ATOL
    for a, b in zip(
        jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(whole_state), strict=True
    ):
        assert max_diff(a, b) < ATOL


def test_score_equals_gathered_log_probs():
    config = tiny_config()
    model = tvq.Model.init(config, seed=6)
    tokens = random_tokens(config, 2, 31)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    log_probs, state_a = model.log_probs(inputs, block_len=4)
    scores, state_b = model.score(inputs, targets, block_len=8)
    expected = jnp.take_along_axis(log_probs, jnp.asarray(targets)[..., None], -1)[..., 0]
    assert scores.shape == (2, 30)
    assert max_diff(scores, expected) < ATOL
    np.testing.assert_array_equal(state_a.positions, state_b.positions)


def test_state_size_is_fixed_and_counts_evictions():
    config = tiny_config(mem_len=3)
    model = tvq.Model.init(config)
    _, short = model.log_probs(random_tokens(config, 1, 5))
    _, long = model.log_probs(random_tokens(config, 1, 400))
    assert short.nbytes == long.nbytes == model.state_bytes_per_sequence
    # every token older than the window is counted once per head in the aggregate
    for sub in long.sublayers:
        np.testing.assert_array_equal(np.asarray(sub.n).sum(axis=-1), [[400 - 3] * 2])


def test_same_shapes_do_not_recompile():
    config = tiny_config(mem_len=5)
    model = tvq.Model.init(config)
    tokens = random_tokens(config, 2, 9)
    model.log_probs(tokens, block_len=4)
    with count_compilations() as counts:
        model.log_probs(random_tokens(config, 2, 9, seed=7), block_len=4)
        tvq.Model.init(config, seed=9).log_probs(tokens, block_len=4)  # new parameters
        assert counts["jit(forward)"] == 0
        model.log_probs(tokens, block_len=3)
        assert counts["jit(forward)"] == 1


# -- invariant 4: gradients across a block boundary ----------------------------------------


@pytest.mark.parametrize("agg_cache", [False, True])
def test_gradient_consistency_across_blocks(agg_cache):
    config = tiny_config(mem_len=4, agg_cache=agg_cache)
    model = tvq.Model.init(config, seed=8)
    tokens = jnp.asarray(random_tokens(config, 2, T))
    state = model.initial_state(2)
    offsets = jnp.zeros([2, T, config.d_model])

    def later_block_loss(params, offsets, block_len):
        log_probs, _ = forward(config, params, tokens, state, block_len, None, offsets)
        return jnp.sum(log_probs[:, T // 2 :, :3])

    grad = jax.jit(jax.grad(later_block_loss, argnums=(0, 1)), static_argnums=2)
    one_params, one_inputs = grad(model.params, offsets, T)
    two_params, two_inputs = grad(model.params, offsets, T // 2)
    assert float(jnp.abs(one_inputs[:, : T // 2]).max()) > 1e-4  # crosses the boundary
    assert max_diff(one_inputs, two_inputs) < 1e-4
    for a, b in zip(
        jax.tree_util.tree_leaves(one_params), jax.tree_util.tree_leaves(two_params), strict=True
    ):
        assert max_diff(a, b) < 1e-4


# -- invariant 5: the aggregate's log-count bias -------------------------------------------


def test_aggregate_bias_values():
    counts = jnp.array([0.0, 1.0, 2.0, 7.0, 1000.0])
    bias = aggregate_bias(counts)
    np.testing.assert_allclose(np.exp(np.asarray(bias[1:])), [1, 2, 7, 1000], rtol=1e-6)
    weights = jax.nn.softmax(jnp.zeros(5) + bias)
    np.testing.assert_allclose(np.asarray(weights), np.asarray(counts / counts.sum()), rtol=1e-6)
    assert float(weights[0]) == 0.0


def test_aggregate_equals_explicit_copies():
    """n_s tokens folded into codeword s attend exactly like n_s explicit keys C_s."""
    rng = np.random.default_rng(0)
    h, s, k, v = 1, 4, 5, 3
    codebook = rng.normal(size=(h, s, k)).astype(np.float32)
    counts = np.array([[[2.0, 0.0, 3.0, 1.0]]], np.float32)  # [B, H, S]
    means = rng.normal(size=(1, h, s, v)).astype(np.float32)
    q = rng.normal(size=(1, h, 1, k)).astype(np.float32)
    key = rng.normal(size=(1, h, 1, k)).astype(np.float32)
    value = rng.normal(size=(1, h, 1, v)).astype(np.float32)
    rel = rng.normal(size=(1, h, k)).astype(np.float32)
    u = rng.normal(size=(h, k)).astype(np.float32)
    pv = rng.normal(size=(h, k)).astype(np.float32)
    tables = AttentionTables(codebook=codebook, rel=rel, u=u, v=pv)
    state = AttentionState(
        pos_offset=jnp.array([9]),
        z=jnp.zeros([1, h, 0], jnp.int32),
        k_hat=jnp.zeros([1, h, 0, k]),
        v=jnp.zeros([1, h, 0, v]),
        n=jnp.asarray(counts),
        u_bar=jnp.asarray(means),
    )
    out = attend(
        jnp.asarray(q), jnp.asarray(key), jnp.asarray(value), tables, state.pos_offset,
        state.n, state.u_bar, agg_cache=True,
    )  # fmt: skip

    # Explicit: the present key (with its d = 0 positional term) plus n_s copies of C_s.
    qq = q[0, 0, 0]
    keys_scores = [(qq + u[0]) @ key[0, 0, 0] + (qq + pv[0]) @ rel[0, 0]]
    values = [value[0, 0, 0]]
    for code in range(s):
        for _ in range(int(counts[0, 0, code])):
            keys_scores.append((qq + u[0]) @ codebook[0, code])
            values.append(means[0, 0, code])
    weights = np.exp(np.array(keys_scores) - max(keys_scores))
    expected = (weights / weights.sum()) @ np.array(values)
    np.testing.assert_allclose(np.asarray(out[0, 0, 0]), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["scatter", "one_hot"])
def test_code_sums_count_and_add_per_code(method):
    """The aggregate's per-code counts and value sums (both methods: the CPU's scatter-add
    and the accelerators' one-hot product) equal a plain loop; code S adds nothing."""
    rng = np.random.default_rng(3)
    n_code = 5
    codes = rng.integers(0, n_code + 1, size=(2, 3, 7))  # code 5: unfilled slots
    values = rng.normal(size=(2, 3, 7, 4)).astype(np.float32)
    counts, sums = code_sums(jnp.asarray(codes), jnp.asarray(values), n_code, method)
    expected_counts = np.zeros((2, 3, n_code), np.float32)
    expected_sums = np.zeros((2, 3, n_code, 4), np.float32)
    for index in np.ndindex(codes.shape):
        if codes[index] < n_code:
            expected_counts[index[:-1] + (codes[index],)] += 1
            expected_sums[index[:-1] + (codes[index],)] += values[index]
    np.testing.assert_array_equal(np.asarray(counts), expected_counts)
    np.testing.assert_allclose(np.asarray(sums), expected_sums, rtol=1e-6, atol=1e-6)
