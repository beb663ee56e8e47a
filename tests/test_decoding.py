"""The decode loop's ring (tvq.nn.ring) computes exactly what blocks of one token compute."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tvq
from tests.conftest import count_compilations, random_tokens, tiny_config, with_param
from tvq.decoding import generate
from tvq.nn.ring import empty_rings, model_from_ring, model_to_ring
from tvq.nn.transformer import Transformer, network
from tvq.runtime.context import score_ids
from tvq.runtime.decode_loop import row_keys
from tvq.text.constraints import Constraint
from tvq.text.sampling import Sampler, pick, row_uniforms
from tvq.text.tokenizer import ByteTokenizer

ATOL = 1e-5
BF16_ATOL = 0.05  # bfloat16 rounding between block lengths (test_equivalence)


def random_biases(model: tvq.Model, seed: int = 0) -> tvq.Model:
    """u and v start at zero; make the content and position biases matter."""
    params = jax.tree_util.tree_map(lambda x: x, model.params)
    key = jax.random.PRNGKey(seed)
    for layer in (k for k in params if k.startswith("transformer_layers")):
        for sub in params[layer].values():
            for name in ("u", "v"):
                key, sub_key = jax.random.split(key)
                sub[name] = jax.random.normal(sub_key, sub[name].shape)
    return tvq.Model(model.config, params, block_len=model.block_len)


@functools.partial(jax.jit, static_argnames="config")
def ring_run(config, params, state, tokens):
    """tokens [B, T] one at a time through the ring → (log-probs [B, T, N], final state)."""
    net, variables, tables = network(config, params)

    def step(rings, token):
        return net.apply(variables, token, rings, tables, method=Transformer.step)

    rings, log_probs = jax.lax.scan(step, model_to_ring(state), tokens.T)
    return jnp.swapaxes(log_probs, 0, 1), model_from_ring(rings, tables)


def assert_states_close(got, want):
    for a, b in zip(got.sublayers, want.sublayers, strict=True):
        np.testing.assert_array_equal(a.pos_offset, b.pos_offset)
        np.testing.assert_array_equal(a.z, b.z)
        np.testing.assert_array_equal(a.n, b.n)
        np.testing.assert_allclose(a.k_hat, b.k_hat, atol=ATOL)
        np.testing.assert_allclose(a.v, b.v, atol=ATOL)
        np.testing.assert_allclose(a.u_bar, b.u_bar, atol=ATOL)


@pytest.mark.parametrize(
    ("agg_cache", "mem_len", "pe_abs"),
    [(True, 3, False), (False, 3, False), (True, 1, True), (True, 0, False), (False, 4, True)],
)
def test_ring_equals_blocks_of_one(agg_cache, mem_len, pe_abs):
    config = tiny_config(agg_cache=agg_cache, mem_len=mem_len, pe_abs=pe_abs, n_layer=2)
    model = random_biases(tvq.Model.init(config, seed=3))
    if pe_abs:
        model = with_param(model, "position_embedder/scale", 0.7)
    prefix = random_tokens(config, 1, 5, seed=1)
    _, state = model.log_probs(prefix)
    state = jax.tree_util.tree_map(lambda x: jnp.repeat(x, 2, axis=0), state)  # same position
    tokens = random_tokens(config, 2, 11, seed=2)  # wraps the ring several times
    want, want_state = model.log_probs(tokens, state=state, block_len=1)
    got, got_state = ring_run(config, model.params, state, jnp.asarray(tokens))
    np.testing.assert_allclose(got, want, atol=ATOL)
    assert_states_close(got_state, want_state)
    _, other_state = model.log_probs(tokens, state=state, block_len=4)
    assert_states_close(got_state, other_state)


def test_ring_equals_blocks_in_bfloat16():
    """In bfloat16 compute the ring rounds exactly where blocks of one token do (equal
    numbers), and stays within bfloat16 rounding of longer blocks."""
    config = tiny_config(mem_len=3, n_layer=2, dtype="bfloat16", e_scale=0.25)
    model = random_biases(tvq.Model.init(config, seed=5))
    state = model.initial_state(2)
    tokens = random_tokens(config, 2, 13, seed=4)
    got, got_state = ring_run(config, model.params, state, jnp.asarray(tokens))
    want, want_state = model.log_probs(tokens, state=state, block_len=1)
    np.testing.assert_allclose(got, want, atol=ATOL)
    assert_states_close(got_state, want_state)
    blocks, _ = model.log_probs(tokens, state=state, block_len=4)
    assert float(jnp.max(jnp.abs(got - blocks))) < BF16_ATOL


def test_empty_rings_are_the_initial_state():
    config = tiny_config(mem_len=5, n_layer=2)
    want = model_to_ring(tvq.Model.init(config).initial_state(3))
    got = empty_rings(config, 3)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("mem_len", [0, 1, 3])
def test_ring_round_trip(mem_len):
    config = tiny_config(mem_len=mem_len)
    model = tvq.Model.init(config, seed=0)
    _, _, tables = network(config, model.params)
    for length in (1, 2, 7):
        _, state = model.log_probs(random_tokens(config, 1, length))
        back = model_from_ring(model_to_ring(state), tables)
        for a, b in zip(
            jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(state), strict=True
        ):
            np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def byte_model():
    config = tiny_config(n_vocab=259, mem_len=5, e_scale=0.25, d_model=32)
    return tvq.Model.init(config, seed=4, block_len=4).with_tokenizer(ByteTokenizer())


def test_stop_mid_chunk_leaves_the_exact_state(byte_model):
    """Chunks are 1, 2, 4, 8, … tokens; a stop string inside one must not leave the state
    past the tokens kept: it equals scoring the prompt and the sampled tokens."""
    prompt = byte_model.tokenizer.encode("To be")
    sampler = Sampler(temperature=1.0)
    full = generate(byte_model, prompt, max_tokens=30, sampler=sampler, seed=9).samples[0]
    cut_at = 10  # token 10 lies inside the chunk of tokens 7 … 14
    stop = byte_model.tokenizer.decode(full.ids[cut_at : cut_at + 1])
    first = full.text.find(stop)
    result = generate(byte_model, prompt, max_tokens=30, sampler=sampler, seed=9, stop=[stop])
    sample = result.samples[0]
    assert sample.finish_reason == "stop"
    assert sample.text == full.text[:first]
    assert sample.ids == full.ids[: len(sample.ids)]
    assert 7 < len(sample.ids) < 15
    ids = prompt + sample.ids
    assert result.context.tokens == len(ids)
    assert int(result.context.last_token[0]) == ids[-1]  # the next input, not yet consumed
    inputs = [byte_model.tokenizer.eos_id, *ids[:-1]]  # a document starts after an EOS
    _, want = byte_model.log_probs(np.asarray([inputs]))
    assert_states_close(result.context.state, want)


def test_chunking_does_not_change_samples(byte_model):
    """Tokens sampled in chunks of 1, 2, 4, … equal one long run for the same seed."""
    prompt = byte_model.tokenizer.encode("abc")
    sampler = Sampler(temperature=1.0, top_k=50)
    long = generate(byte_model, prompt, max_tokens=45, sampler=sampler, seed=2).samples[0]
    short = generate(byte_model, prompt, max_tokens=13, sampler=sampler, seed=2).samples[0]
    assert short.ids == long.ids[:13]
    np.testing.assert_allclose(short.log_probs, long.log_probs[:13], atol=ATOL)


@pytest.mark.parametrize("prompt_text", ["a", "abcd", "To be, or not"])
def test_samples_of_one_prompt(byte_model, prompt_text):
    """The prompt's whole blocks go through the blockwise forward, the rest through the
    decoding loop; its state is then repeated for each sample. Every row's log-probs equal
    scoring its own text (invariant 6) and every row's final state equals the state that
    the blockwise forward leaves after that text."""
    prompt = byte_model.tokenizer.encode(prompt_text)
    sampler = Sampler(temperature=1.0)
    result = generate(byte_model, prompt, max_tokens=11, sampler=sampler, seed=3, num_samples=3)
    assert [len(s.ids) for s in result.samples] == [11] * 3  # no row ended at an EOS
    assert len({tuple(s.ids) for s in result.samples}) > 1  # the rows sample independently
    rows = [byte_model.tokenizer.eos_id, *prompt]
    texts = np.asarray([rows + s.ids[:-1] for s in result.samples])
    log_probs, want = byte_model.log_probs(texts)
    for row, sample in enumerate(result.samples):
        picked = np.asarray(log_probs[row, len(rows) - 1 :])[np.arange(11), sample.ids]
        np.testing.assert_allclose(sample.log_probs, picked, atol=ATOL)
    assert result.context.tokens == len(prompt) + 11
    np.testing.assert_array_equal(result.context.last_token, [s.ids[-1] for s in result.samples])
    assert_states_close(result.context.state, want)


def test_each_token_is_drawn_with_its_own_key(byte_model):
    """Row r's k-th token is the sampler's pick at the random number of the key
    fold_in(keys[r], k) (the loop draws a chunk's numbers before it runs), from the
    log-probs of scoring the row's text."""
    prompt = byte_model.tokenizer.encode("To be")
    sampler = Sampler(temperature=3.0, top_p=0.95)  # flat: every draw matters
    result = generate(byte_model, prompt, max_tokens=40, sampler=sampler, seed=7, num_samples=2)
    assert len(set(result.samples[0].ids)) > 10
    rows = [byte_model.tokenizer.eos_id, *prompt]
    texts = np.asarray([rows + s.ids[:-1] for s in result.samples])
    log_probs, _ = byte_model.log_probs(texts)
    for row, (key, sample) in enumerate(zip(row_keys(7, 2), result.samples, strict=True)):
        keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(40))
        want = pick(sampler, row_uniforms(keys), log_probs[row, len(rows) - 1 :])
        assert sample.ids == np.asarray(want).tolist()


def test_each_loop_compiles_once():
    """Feeding a call's output state into the next call (committed arrays, after fresh
    uncommitted ones) must not compile the same function again, nor must the prompt's
    odd tail: decoding and scoring each compile once for their shape. (A config of its
    own, so nothing is compiled yet; committed parameters, as a loaded model has.)"""
    config = tiny_config(n_vocab=259, mem_len=7, e_scale=0.25, d_model=24)
    params = jax.device_put(tvq.Model.init(config, seed=1).params, jax.devices()[0])
    model = tvq.Model(config, params, block_len=4, tokenizer=ByteTokenizer())
    with count_compilations() as counts:  # 13 tokens: blocks of 8 and 4, then 1 fed
        generate(model, model.tokenizer.encode("To be, or not"), max_tokens=40,
                 sampler=Sampler(temperature=1.0), seed=1)  # fmt: skip
    assert counts["jit(decode_chunk)"] == 1
    assert counts["jit(forward)"] == 2
    with count_compilations() as counts:
        score_ids(model, random_tokens(config, 1, 2 * 4096)[0])  # two pieces of one shape
    assert counts["jit(forward)"] == 1


def test_scoring_tails_share_the_decoding_loop():
    """A text's tail shorter than a block is scored by the decoding loop: texts of 9, 10
    and 11 tokens (blocks of 4) compile the forward once (their 8 tokens of whole blocks)
    and the loop once, and every log-prob and the final state equal the blockwise
    forward's (block length 1, so no tail)."""
    config = tiny_config(n_vocab=259, mem_len=5, e_scale=0.25, d_model=20)
    params = jax.device_put(tvq.Model.init(config, seed=2).params, jax.devices()[0])
    model = tvq.Model(config, params, block_len=4, tokenizer=ByteTokenizer())
    tokens = np.asarray(random_tokens(config, 1, 11)[0])
    with count_compilations() as counts:
        scored = [score_ids(model, tokens[:n], keep_log_probs=True, top_k=2) for n in (9, 10, 11)]
    assert counts["jit(forward)"] == 1
    assert counts["jit(decode_chunk)"] == 1
    for (result, context), n in zip(scored, (9, 10, 11), strict=True):
        want, want_context = score_ids(model, tokens[:n], keep_log_probs=True, top_k=2,
                                       block_len=1)  # fmt: skip
        np.testing.assert_allclose(result.log_probs, want.log_probs, atol=ATOL)
        np.testing.assert_allclose(result.top_log_probs, want.top_log_probs, atol=ATOL)
        np.testing.assert_array_equal(result.top_ids, want.top_ids)
        assert_states_close(context.state, want_context.state)


def test_ignore_eos_goes_on_past_the_end_of_a_document(byte_model):
    """With no prompt this model soon samples an end of document (seed 2: every row at
    once); ignore_eos keeps sampling, and the log-probs still equal scoring the text."""
    sampler = Sampler(temperature=1.0)
    ended = generate(byte_model, [], max_tokens=11, sampler=sampler, seed=2, num_samples=3)
    assert [s.finish_reason for s in ended.samples] == ["eos"] * 3
    result = generate(byte_model, [], max_tokens=11, sampler=sampler, seed=2, num_samples=3,
                      ignore_eos=True)  # fmt: skip
    eos = byte_model.tokenizer.eos_id
    for sample in result.samples:
        assert sample.finish_reason == "length" and len(sample.ids) == 11
        assert sample.text == byte_model.tokenizer.decode([i for i in sample.ids if i != eos])
    assert any(eos in s.ids for s in result.samples)
    texts = np.asarray([[eos, *s.ids[:-1]] for s in result.samples])
    log_probs, _ = byte_model.log_probs(texts)
    for row, sample in enumerate(result.samples):
        picked = np.asarray(log_probs[row])[np.arange(11), sample.ids]
        np.testing.assert_allclose(sample.log_probs, picked, atol=ATOL)


def test_a_batch_of_requests_gives_each_request_its_own_samples(byte_model):
    """generate_batch (tvq serve's batches): texts at different positions, with their
    own seeds, lengths, stop strings and sample counts, side by side in one loop, each
    get what generate gives them alone (row keys and ring positions are per row)."""
    from tvq.batching import BatchItem, stream_batch
    from tvq.decoding import BatchGeneration

    encode = byte_model.tokenizer.encode
    requests = [
        BatchItem(encode("To be, or not"), max_tokens=20, seed=1),
        BatchItem(encode("Once"), max_tokens=7, seed=2, num_samples=2),
        BatchItem([], max_tokens=12, seed=3, stop=["e"]),
        BatchItem(encode("xy"), max_tokens=0, seed=4),
        BatchItem(encode("Long ago, in a kingdom by the sea"), max_tokens=40, seed=5),
    ]  # 6 rows: padded to 8
    sampler = Sampler(temperature=1.0, top_p=0.9)
    streamed = {}
    for event in stream_batch(byte_model, requests, sampler=sampler, logprobs=2):
        if isinstance(event, BatchGeneration):
            batched = event.samples
        else:
            key = event.prompt, event.sample
            streamed[key] = streamed.get(key, "") + event.text
    for i, (request, samples) in enumerate(zip(requests, batched, strict=True)):
        alone = generate(byte_model, request.prompt_ids, max_tokens=request.max_tokens,
                         sampler=sampler, seed=request.seed, num_samples=request.num_samples,
                         stop=request.stop, logprobs=2).samples  # fmt: skip
        assert len(samples) == request.num_samples
        for j, (got, want) in enumerate(zip(samples, alone, strict=True)):
            assert got.ids == want.ids and got.text == want.text, (i, j)
            assert got.finish_reason == want.finish_reason
            assert streamed.get((i, j), "") == got.text
            np.testing.assert_allclose(got.log_probs, want.log_probs, atol=1e-5)
            assert [t[0][0] for t in got.top_logprobs] == [t[0][0] for t in want.top_logprobs]
    assert batched[2][0].finish_reason in ("stop", "eos", "length")
    assert batched[3][0].ids == [] and batched[4][0].ids


def test_the_stream_yields_pieces_that_join_to_the_generation(byte_model):
    """stream_generate yields Pieces of final text, each with its tokens and log-probs,
    then the Generation: per sample the pieces join to its text, ids, log-probs and top
    log-probs, and generate() (a loop over the stream) gives the same samples."""
    from tvq.decoding import stream_generate

    options = dict(max_tokens=25, sampler=Sampler(temperature=1.0), seed=3, num_samples=2,
                   stop=["e "], logprobs=2)  # fmt: skip
    events = list(stream_generate(byte_model, "To be", **options))
    *pieces, end = events
    assert isinstance(end, tvq.Generation) and all(isinstance(p, tvq.Piece) for p in pieces)
    for row, sample in enumerate(end.samples):
        mine = [p for p in pieces if p.sample == row]
        assert "".join(p.text for p in mine) == sample.text
        assert [i for p in mine for i in p.ids] == sample.ids
        assert [p.start for p in mine] == list(np.cumsum([0] + [len(p.ids) for p in mine[:-1]]))
        assert [x for p in mine for x in p.log_probs] == sample.log_probs
        assert [t for p in mine for t in p.top_logprobs] == sample.top_logprobs
    alone = generate(byte_model, "To be", **options)
    assert [s.ids for s in alone.samples] == [s.ids for s in end.samples]


def test_closing_the_stream_cancels_it(byte_model, monkeypatch):
    """Closing the iterator is cancelling: no chunk of the loop runs after it."""
    import tvq.decoding

    calls = []
    run_chunk = tvq.decoding.run_chunk
    monkeypatch.setattr(tvq.decoding, "run_chunk", lambda *a, **k: calls.append(1) or
                        run_chunk(*a, **k))  # fmt: skip
    stream = tvq.stream_generate(byte_model, "To be", max_tokens=500, seed=1, ignore_eos=True)
    first = next(stream)
    assert isinstance(first, tvq.Piece) and len(calls) == 1  # the first chunk is one token
    stream.close()
    with pytest.raises(StopIteration):
        next(stream)
    assert len(calls) == 1
    with tvq.stream_generate(byte_model, "To be", max_tokens=500, seed=1) as stream:
        for _ in zip(range(3), stream, strict=False):
            pass
    assert len(calls) < 10  # 3 pieces, not 500 tokens


@pytest.mark.parametrize("constraint", [None, "[a-z ]*"])
def test_stop_ends_the_stream_with_the_exact_state(byte_model, constraint):
    """stop() (Ctrl-C in tvq chat) ends every row at the next chunk as "cancelled", and the
    stream still ends with the Generation, whose context is the state after the prompt
    and exactly the tokens sampled. Under a constraint this random model's text is
    refused often: a stop often comes with a speculated chunk cut short pending."""
    prompt = byte_model.tokenizer.encode("To be")
    constraint = constraint and Constraint.regex(constraint)
    # letters likely, other bytes not: runs of allowed tokens, cut by refusals
    letters = tvq.Sampler(logit_bias=tuple((3 + b, 1.0) for b in b"abcdefghijklmnopqrstuvwxyz"))
    stream = tvq.stream_generate(byte_model, prompt, max_tokens=200, seed=4, ignore_eos=True,
                                 constraint=constraint, sampler=letters)  # fmt: skip
    pieces, stop_at = 0, 5 if constraint is None else 17  # (inside a chunk cut at 18)
    for event in stream:
        if isinstance(event, tvq.Piece):
            pieces += 1
            if pieces == stop_at:
                stream.stop()
        else:
            result = event
    sample = result.samples[0]
    assert sample.finish_reason == "cancelled" and stop_at <= len(sample.ids) < 200
    full = generate(byte_model, prompt, max_tokens=200, seed=4, ignore_eos=True,
                    constraint=constraint, sampler=letters).samples[0]  # fmt: skip
    assert sample.ids == full.ids[: len(sample.ids)]
    ids = prompt + sample.ids
    assert result.context.tokens == len(ids)
    inputs = [byte_model.tokenizer.eos_id, *ids[:-1]]
    _, want = byte_model.log_probs(np.asarray([inputs]))
    assert_states_close(result.context.state, want)
