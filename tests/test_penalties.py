"""Sampler settings as values of one compiled loop (docs/DESIGN.md section 7): rows with
different settings, penalties and log-probs sample what each samples alone; the penalties
equal a plain numpy computation on the log-probs; one program serves every setting."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tvq
from tests.conftest import count_compilations, tiny_config
from tvq.batching import BatchItem, generate_batch
from tvq.decoding import generate
from tvq.text.sampling import (
    REPEAT_WINDOW,
    Penalties,
    Sampler,
    SamplerRows,
    penalized,
    pick_rows,
)
from tvq.text.sampling import pick as pick_one

SETTINGS = [
    Sampler(),
    Sampler(temperature=0.7, top_k=5),
    Sampler(temperature=0),
    Sampler(temperature=1.3, top_p=0.9),
    Sampler(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05),
    Sampler(min_p=0.1),
    Sampler(temperature=0.5, top_k=1),
    Sampler(temperature=2.0, top_k=299, top_p=0.5),
    Sampler(top_k=300),
    Sampler(temperature=0, top_k=3, top_p=0.5, min_p=0.1),
]


@pytest.fixture(scope="module")
def model():
    config = tiny_config(n_vocab=259, mem_len=8, e_scale=0.25)
    return tvq.Model.init(config, seed=5, block_len=4).with_tokenizer(tvq.ByteTokenizer())


def test_each_row_samples_by_its_own_settings():
    """pick_rows with a different sampler per row equals each row's own rules (sampling.pick)."""
    rng = np.random.default_rng(0)
    n = 300
    log_probs = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(len(SETTINGS), n)) * 3), axis=-1)
    rows = SamplerRows.of(SETTINGS, n)
    pick = jax.jit(pick_rows)
    for _ in range(20):
        u = jnp.asarray(1.0 - rng.uniform(size=len(SETTINGS)), jnp.float32)
        got = np.asarray(pick(rows, u, log_probs))
        for row, sampler in enumerate(SETTINGS):
            want = pick_one(sampler, u[row : row + 1], log_probs[row : row + 1])
            assert got[row] == int(want[0]), (row, sampler)


def numpy_penalized(sampler: Sampler, counts, recent, log_probs):
    """The definitions, written out: bias; OpenAI's frequency and presence penalties on
    the sampled counts; llama.cpp's repetition penalty over the last n tokens."""
    x = np.array(log_probs, np.float64)
    for token, bias in sampler.logit_bias:
        x[token] += bias
    x -= sampler.frequency_penalty * counts + sampler.presence_penalty * (counts > 0)
    window = [t for t in recent[len(recent) - sampler.repeat_last_n :] if t >= 0]
    for token in set(window) if sampler.repeat_last_n else ():
        x[token] *= sampler.repetition_penalty
    return x


def test_penalties_equal_the_numpy_definitions():
    rng = np.random.default_rng(1)
    n = 50
    samplers = [
        Sampler(presence_penalty=0.7, frequency_penalty=0.3),
        Sampler(repetition_penalty=1.3, repeat_last_n=5),
        Sampler(logit_bias=((3, -100.0), (7, 2.5))),
        Sampler(presence_penalty=-0.5, repetition_penalty=0.8, repeat_last_n=REPEAT_WINDOW),
        Sampler(repetition_penalty=1.5, repeat_last_n=0),
        Sampler(),
    ]
    log_probs = np.asarray(jax.nn.log_softmax(rng.normal(size=(len(samplers), n)), axis=-1))
    histories = [rng.integers(0, n, size=rng.integers(0, 12)).tolist() for _ in samplers]
    penalties = Penalties.start(n, histories)
    for step in range(6):  # sampled tokens count
        token = jnp.asarray(rng.integers(0, n, size=len(samplers)), jnp.int32)
        penalties = penalties.add(
            token, jnp.asarray([True, True, True, step % 2 == 0] + [True] * 2)
        )
    got = np.asarray(penalized(SamplerRows.of(samplers, n), penalties, jnp.asarray(log_probs)))
    counts, recent = np.asarray(penalties.counts), np.asarray(penalties.recent)
    for row, sampler in enumerate(samplers):
        want = numpy_penalized(sampler, counts[row], recent[row].tolist(), log_probs[row])
        np.testing.assert_allclose(got[row], want, rtol=1e-6, atol=1e-5)
    assert np.array_equal(got[-1], log_probs[-1])  # off: exactly the model's log-probs


def test_greedy_generation_with_penalties_equals_a_host_loop(model):
    """Greedy decoding with every penalty on: each token is the argmax of the numpy
    penalties applied to the scored log-probs of the text so far."""
    sampler = Sampler(temperature=0, presence_penalty=0.4, frequency_penalty=0.6,
                      repetition_penalty=1.4, repeat_last_n=6,
                      logit_bias=((ord("e") + 3, -3.0),))  # fmt: skip
    prompt = model.tokenizer.encode("To be, or not to be")
    out = generate(model, prompt, max_tokens=24, sampler=sampler, seed=0, ignore_eos=True)
    ids, counts = list(prompt), np.zeros(model.config.n_vocab)
    length = len(prompt) + 24  # one padded length: one compiled program (causal: the
    for _ in range(24):  # padding after the text changes none of its log-probs)
        padded = np.zeros([1, length], np.int32)
        padded[0, : len(ids)] = ids
        log_probs, _ = model.log_probs(padded)
        recent = ids[-REPEAT_WINDOW:]
        x = numpy_penalized(sampler, counts, recent, np.asarray(log_probs[0, len(ids) - 1]))
        token = int(np.argmax(x))
        ids.append(token)
        counts[token] += 1
    assert out.samples[0].ids == ids[len(prompt) :]
    plain = generate(model, prompt, max_tokens=24, sampler=Sampler(temperature=0), ignore_eos=True)
    assert plain.samples[0].ids != out.samples[0].ids  # the penalties did something


def test_rows_with_different_settings_share_a_batch_and_get_what_each_gets_alone(model):
    """One batch of requests with different samplers, penalties, log-probs and
    ignore_eos gives each request what generate() gives it alone, in one program."""
    encode = model.tokenizer.encode
    requests = [
        BatchItem(encode("ROMEO."), 20, seed=1, sampler=Sampler(temperature=0.9, top_k=7)),
        BatchItem(encode("JULIET. O"), 12, seed=2, num_samples=2, logprobs=3,
                sampler=Sampler(presence_penalty=1.0, repetition_penalty=1.2)),
        BatchItem(encode("A"), 16, seed=3, sampler=Sampler(temperature=0), ignore_eos=True,
                stop=("e",)),
        BatchItem(encode("Exit."), 9, seed=4, logprobs=5,
                sampler=Sampler(top_p=0.8, frequency_penalty=-0.5, logit_bias=((40, 4.0),))),
    ]  # fmt: skip
    plain = [BatchItem(r.prompt_ids, r.max_tokens, r.seed, r.num_samples) for r in requests]
    generate_batch(model, plain, alternatives=5)  # the same shapes, default settings
    with count_compilations() as counts:
        together = generate_batch(model, requests)
    assert counts["jit(decode_chunk)"] == 0  # every setting, the one sampling program
    for request, samples in zip(requests, together, strict=True):
        alone = generate(model, request.prompt_ids, max_tokens=request.max_tokens,
                         sampler=request.sampler, seed=request.seed,
                         num_samples=request.num_samples, stop=request.stop,
                         logprobs=request.logprobs or 0,
                         ignore_eos=bool(request.ignore_eos))  # fmt: skip
        for mine, theirs in zip(samples, alone.samples, strict=True):
            assert mine.ids == theirs.ids and mine.text == theirs.text
            assert mine.finish_reason == theirs.finish_reason
            np.testing.assert_allclose(mine.log_probs, theirs.log_probs, atol=1e-5)
            assert [len(top) for top in mine.top_logprobs] == [len(t) for t in theirs.top_logprobs]


def test_one_program_for_every_setting(model):
    """Decoding with new settings compiles nothing new: they are values of the loop."""
    generate(model, [5, 6], max_tokens=3, sampler=Sampler(), seed=0)
    with count_compilations() as counts:
        for sampler in SETTINGS + [Sampler(presence_penalty=1.0, logit_bias=((9, -100.0),))]:
            generate(model, [5, 6], max_tokens=3, sampler=sampler, seed=0)
    assert counts["jit(decode_chunk)"] == 0


@pytest.mark.parametrize("bad", [
    {"presence_penalty": 2.5}, {"frequency_penalty": -3}, {"repetition_penalty": 0},
    {"repeat_last_n": REPEAT_WINDOW + 1}, {"repeat_last_n": -1},
    {"logit_bias": ((1, float("nan")),)}, {"logit_bias": ((1.5, 1.0),)},
])  # fmt: skip
def test_bad_penalties(bad):
    with pytest.raises(tvq.InputError):
        Sampler(**bad)
