"""The parallel form over blocks (docs/DESIGN.md section 8) computes the serial form's
numbers: log-probs, states, tails, carried states, agg_cache on and off, causality,
gradients, the built-in model's recorded score, and one sequence spread over devices."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tvq
from tests.conftest import forced_devices, random_tokens, tiny_config, with_param
from tests.test_causality import assert_dependence, expected_dependence
from tvq.errors import InputError
from tvq.runtime.forward import forward, forward_jit
from tvq.train.settings import TrainSettings
from tvq.train.step import dropout_key, train_forward

ATOL = 1e-5
ROOT = Path(__file__).resolve().parent.parent


def max_diff(a, b) -> float:
    return max(
        float(jnp.max(jnp.abs(jnp.asarray(x) - jnp.asarray(y))))
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    )


@pytest.mark.parametrize(("agg_cache", "pe_abs"), [(False, False), (True, True)])
def test_parallel_equals_serial_with_tails_and_carried_state(agg_cache, pe_abs):
    config = tiny_config(agg_cache=agg_cache, pe_abs=pe_abs, mem_len=4)
    model = with_param(tvq.Model.init(config, seed=1), "position_embedder/scale", 0.7) \
        if pe_abs else tvq.Model.init(config, seed=1)  # fmt: skip
    tokens = random_tokens(config, 2, 29)
    _, carried = model.log_probs(tokens[:, :5], block_len=5)
    reference, ref_state = model.log_probs(tokens, state=carried, block_len=1)
    # chunk_len = block_len: one block per chunk; tails shorter than a block and than a
    # chunk; block_len > mem_len; the whole sequence as one chunk.
    for block_len, chunk_len in ((1, 1), (2, 6), (5, 20), (7, None), (29, 29)):
        log_probs, new_state = forward_jit(
            config, model.params, jnp.asarray(tokens), carried, block_len,
            algorithm="parallel", chunk_len=chunk_len,
        )  # fmt: skip
        assert max_diff(log_probs, reference) < ATOL, (block_len, chunk_len)
        assert max_diff(new_state, ref_state) < ATOL, (block_len, chunk_len)
        np.testing.assert_array_equal(new_state.sublayers[-1].z, ref_state.sublayers[-1].z)


def test_model_api_takes_the_algorithm_and_chains():
    config = tiny_config(mem_len=3)
    model = tvq.Model.init(config, seed=2)
    tokens = random_tokens(config, 1, 24)
    whole, whole_state = model.log_probs(tokens, block_len=4, algorithm="serial")
    state, pieces = None, []
    for start in range(0, 24, 8):  # chained parallel calls equal one serial call
        out, state = model.log_probs(tokens[:, start : start + 8], state=state, block_len=4,
                                     algorithm="parallel")  # fmt: skip
        pieces.append(out)
    assert max_diff(jnp.concatenate(pieces, axis=1), whole) < ATOL
    assert max_diff(state, whole_state) < ATOL
    scores, _ = model.score(tokens[:, :-1], tokens[:, 1:], algorithm="parallel", block_len=2)
    picked = jnp.take_along_axis(whole[:, :-1], jnp.asarray(tokens[:, 1:, None]), axis=-1)
    assert max_diff(scores, picked[..., 0]) < ATOL
    with pytest.raises(InputError, match="algorithm must be one of serial, parallel"):
        model.log_probs(tokens, algorithm="fast")


@pytest.mark.parametrize(("block_len", "mem_len", "agg_cache"),
                         [(1, 4, False), (3, 2, True), (3, 4, False), (12, 2, True)])  # fmt: skip
def test_parallel_form_is_causal(block_len, mem_len, agg_cache):
    config = tiny_config(mem_len=mem_len, agg_cache=agg_cache, d_model=8, d_k=4, d_v=4)
    model = tvq.Model.init(config, seed=3)
    tokens = jnp.asarray(random_tokens(config, 1, 12))
    state = model.initial_state(1)
    readout = jax.random.normal(jax.random.PRNGKey(2), [config.n_vocab])

    def outputs(offsets):
        log_probs, _ = forward(config, model.params, tokens, state, block_len, None, offsets,
                               algorithm="parallel", chunk_len=12)  # fmt: skip
        return log_probs[0] @ readout

    jac = jax.jit(jax.jacfwd(outputs))(jnp.zeros([1, 12, config.d_model]))[:, 0]
    norm = np.asarray(jnp.sqrt(jnp.sum(jnp.square(jac), axis=-1)))
    assert_dependence(norm, expected_dependence(2 * mem_len, agg_cache))


@pytest.mark.parametrize("agg_cache,dropout", [(False, False), (True, True)])
def test_training_gradient_is_the_serial_forms(agg_cache, dropout):
    config = tiny_config(mem_len=4, agg_cache=agg_cache)
    model = tvq.Model.init(config, seed=4)
    data = jnp.asarray(random_tokens(config, 2, 21))
    state = model.initial_state(2)
    # dropout: each block draws from its own key, so both forms drop the same values
    settings = TrainSettings(p_dropemb=0.2, p_dropres=0.3, p_droplyr=0.4) if dropout else None
    key = dropout_key(0, 5)

    def loss(params, algorithm):
        (nll, stats), new_state = train_forward(config, params, data[:, :-1], data[:, 1:],
                                                state, 3, algorithm, settings, key)  # fmt: skip
        return nll + sum(s.commit for s in stats), (stats, new_state)

    grad = jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)
    serial, (serial_stats, serial_state) = grad(model.params, "serial")
    parallel, (parallel_stats, parallel_state) = grad(model.params, "parallel")
    assert max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(serial)) > 1e-3
    assert max_diff(serial, parallel) < 1e-4
    assert max_diff(serial_stats, parallel_stats) < 1e-4
    assert max_diff(serial_state, parallel_state) < ATOL


def test_built_in_model_scores_the_same_in_both_forms():
    model = tvq.load()
    sample = ROOT / model.metadata["sample_check"]["file"]
    ids = np.asarray(model.tokenizer.encode(sample.read_text()))[None, :3000]
    serial, _ = model.score(ids[:, :-1], ids[:, 1:], algorithm="serial")
    parallel, _ = model.score(ids[:, :-1], ids[:, 1:], algorithm="parallel")
    assert float(jnp.abs(serial - parallel).max()) < 1e-4


def test_one_sequence_spread_over_four_devices_equals_one_device():
    script = ROOT / "tests" / "scripts" / "sequence_parallel.py"
    done = subprocess.run([sys.executable, str(script)], env=forced_devices(4),
                          capture_output=True, text=True, timeout=300, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(report) == 4
    for case, diffs in report.items():
        assert diffs["log_probs"] < ATOL, case
        assert diffs["state"] < ATOL, case


def test_sequence_parallel_scores_a_text_of_several_chunks(tmp_path):
    """`tvq score --sequence-parallel` on 4 devices, a text of two compiled chunks plus a
    tail shorter than a block: every token's log-prob and the saved state are one
    device's. (Each piece's results once stayed on the 4 devices while the running total
    lived on one: "incompatible devices" after the first chunk.)"""
    from tests.test_cli import invoke

    model = tmp_path / "model"
    config = tiny_config(n_vocab=259, mem_len=8, e_scale=0.25)
    tvq.Model.init(config, seed=0, block_len=4).with_tokenizer(tvq.ByteTokenizer()).save(model)
    text = tmp_path / "text.txt"  # 2 chunks of 4096 tokens, 250 blocks of 4 and 3 tokens
    macbeth = (ROOT / "tests" / "data" / "macbeth_head.txt").read_bytes()
    text.write_bytes((macbeth * 2)[: 2 * 4096 + 1003])

    def run(tag: str, *options, env=None) -> tuple[list[float], bytes]:
        per_token, state = tmp_path / f"{tag}.jsonl", tmp_path / f"{tag}.state"
        argv = ["score", str(text), "-m", str(model), "--per-token", str(per_token),
                "--save-state", str(state), *options]  # fmt: skip
        if env is None:
            invoke(*argv)
        else:
            command = [sys.executable, "-m", "tvqcli", *argv]
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300,
                                  cwd=ROOT)  # fmt: skip
            assert done.returncode == 0, done.stderr[-2000:]
        rows = [json.loads(line) for line in per_token.read_text().splitlines()]
        return [row["logprob"] for row in rows], state

    alone, alone_state = run("alone")
    spread, spread_state = run("spread", "--sequence-parallel", env=forced_devices(4))
    assert len(spread) == len(alone) == 2 * 4096 + 1003
    np.testing.assert_allclose(spread, alone, atol=1e-5)
    model_obj = tvq.load(model)
    a, b = tvq.load_state(alone_state, model_obj), tvq.load_state(spread_state, model_obj)
    assert a.tokens == b.tokens == len(alone)
    for x, y in zip(jax.tree_util.tree_leaves(a.state), jax.tree_util.tree_leaves(b.state),
                    strict=True):  # fmt: skip
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=ATOL)


def test_cli_settings_keep_the_numbers(tmp_path):
    """tvq score --algorithm parallel / --sequence-parallel (4 devices) give the serial
    numbers; --dtype bfloat16 stays close; a state saved under one setting continues
    under another."""
    from tests.test_cli import invoke

    model = tmp_path / "model"
    config = tiny_config(n_vocab=259, mem_len=8, e_scale=0.25)
    tvq.Model.init(config, seed=0, block_len=4).with_tokenizer(tvq.text.tokenizer.ByteTokenizer()) \
        .save(model)  # fmt: skip
    text = tmp_path / "text.txt"  # 4096 tokens: one compiled piece
    text.write_bytes((ROOT / "tests" / "data" / "macbeth_head.txt").read_bytes()[:4096])

    def bits(*options) -> float:
        result = invoke("score", text, "-m", model, "--format", "jsonl", *options)
        return json.loads(result.output.splitlines()[0])["bits_per_byte"]

    serial = bits("--algorithm", "serial")
    assert bits("--algorithm", "parallel") == pytest.approx(serial, abs=1e-5)
    assert bits("--dtype", "bfloat16") == pytest.approx(serial, abs=2e-2)
    state = tmp_path / "state.tvqs"
    invoke("score", text, "-m", model, "--dtype", "bfloat16", "--save-state", state)
    invoke("score", text, "-m", model, "--load-state", state, "--algorithm", "parallel")
    done = subprocess.run(
        [sys.executable, "-m", "tvqcli", "score", str(text), "-m", str(model), "--format",
         "jsonl", "--sequence-parallel"],
        env=forced_devices(4), capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.splitlines()[0])["bits_per_byte"] == pytest.approx(
        serial, abs=1e-5
    )
