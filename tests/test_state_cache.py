"""The state cache (tvq/runtime/state_cache.py): a prompt read from its longest cached
prefix gives the numbers of reading it whole, token by token; the prefix is found at
token granularity and only under the same numbers (model, dtype, algorithm, aggregate
cache); both tiers keep their byte bounds, least recently used out; an entry on disk
that does not read back is dropped with a warning, never used; the CLI's second run on
the same prompt reads only what is new."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

import tvq
from tests.conftest import tiny_config
from tvq.runtime.context import score_ids
from tvq.runtime.state_cache import StateCache
from tvq.text.tokenizer import ByteTokenizer
from tvqcli.main import app

GREEDY = tvq.Sampler(temperature=0)
TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind " * 6


@pytest.fixture(scope="module")
def model():
    config = tiny_config(n_vocab=259, mem_len=8, e_scale=0.25)
    return tvq.Model.init(config, block_len=4).with_tokenizer(ByteTokenizer())


@pytest.fixture(scope="module")
def model_dir(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache") / "model"
    model.save(folder)
    return folder


def test_a_hit_gives_the_numbers_of_reading_the_whole_prompt(model):
    """Greedy text and log-probs with a cached prompt equal those without, for the prompt
    again (its end is kept, a whole number of blocks) and for a conversation's next turn
    (the context after the completion is kept: a chat client sends the answer back)."""
    cache = StateCache()
    first = tvq.generate(model, TEXT, max_tokens=12, sampler=GREEDY, logprobs=3, cache=cache)
    again = tvq.generate(model, TEXT, max_tokens=12, sampler=GREEDY, logprobs=3, cache=cache)
    plain = tvq.generate(model, TEXT, max_tokens=12, sampler=GREEDY, logprobs=3)
    n = len(model.tokenizer.encode(TEXT))
    assert first.cached_tokens == 0 and again.cached_tokens == n - n % model.block_len
    for got in (first, again):
        assert got.samples[0].ids == plain.samples[0].ids
        np.testing.assert_allclose(got.samples[0].log_probs, plain.samples[0].log_probs,
                                   atol=1e-6)  # fmt: skip
        assert got.samples[0].top_logprobs[0][0][0] == plain.samples[0].top_logprobs[0][0][0]
    turn = TEXT + first.samples[0].text + "\nHORATIO. "
    cached = tvq.generate(model, turn, max_tokens=12, sampler=GREEDY, cache=cache)
    whole = tvq.generate(model, turn, max_tokens=12, sampler=GREEDY)
    assert cached.cached_tokens == n + len(first.samples[0].ids)
    assert cached.samples[0].ids == whole.samples[0].ids
    np.testing.assert_allclose(cached.samples[0].log_probs, whole.samples[0].log_probs,
                               atol=1e-5)  # fmt: skip
    assert cached.context.tokens == whole.context.tokens


def test_the_longest_prefix_at_token_granularity_and_only_for_the_same_numbers(model):
    ids = np.arange(3, 103, dtype=np.int32)
    cache = StateCache()
    for n in (10, 37, 64):
        cache.put(model, ids[:n], score_ids(model, ids[:n])[1])
    probe = ids.copy()
    probe[50] = 200  # agrees with the cached text up to token 50
    n, context = cache.longest(model, probe)
    assert n == 37 and context.tokens == 37
    assert cache.longest(model, ids[:36])[0] == 10
    assert cache.longest(model, ids)[0] == 64
    assert cache.longest(model, np.r_[[4], ids[1:]])[0] == 0  # differs at the first token
    for other in (model.with_dtype("bfloat16"), model.with_agg_cache(False),
                  tvq.Model(model.config, model.params, block_len=4, tokenizer=model.tokenizer,
                            algorithm="parallel")):  # fmt: skip
        assert cache.longest(other, ids) == (0, None)
    # the cached context continues exactly: scoring the rest gives the whole's numbers
    rest, _ = score_ids(model, ids[64:], context=cache.longest(model, ids)[1], keep_log_probs=True)
    whole, _ = score_ids(model, ids, keep_log_probs=True)
    np.testing.assert_allclose(rest.log_probs[0], whole.log_probs[0, 64:], atol=1e-5)


def test_memory_is_bounded_least_recently_used_out(model):
    size = model.state_bytes_per_sequence
    cache = StateCache(memory_bytes=int(2.5 * size))
    ids = np.arange(3, 40, dtype=np.int32)
    contexts = {n: score_ids(model, ids[:n])[1] for n in (5, 10, 15)}
    cache.put(model, ids[:5], contexts[5])
    cache.put(model, ids[:10], contexts[10])
    assert cache.longest(model, ids[:6])[0] == 5  # 5 is now the most recently used
    cache.put(model, ids[:15], contexts[15])  # evicts 10
    assert cache.info()["memory_bytes"] == 2 * size <= cache.memory_bytes
    assert cache.longest(model, ids[:12])[0] == 5
    assert cache.longest(model, ids)[0] == 15


def test_sessions_are_pinned_entries_counted_in_the_bound(model):
    """The server's sessions live in its state cache by name: they count in its memory
    bound, the prefixes make room for them (least recently used first), they are never
    evicted for a prefix, and the session store's own limit unpins the oldest."""
    from tvq.serving.sessions import Sessions

    size = model.state_bytes_per_sequence
    cache = StateCache(memory_bytes=3 * size)
    ids = np.arange(3, 40, dtype=np.int32)
    for n in (5, 10, 15):
        cache.put(model, ids[:n], score_ids(model, ids[:n])[1])
    sessions = Sessions(model, limit=2, folder=None, cache=cache)
    talk = {name: score_ids(model, ids[:k])[1] for name, k in (("a", 7), ("b", 8), ("c", 9))}
    sessions.put("a", talk["a"])
    sessions.put("b", talk["b"])
    info = cache.info()
    assert (info["pinned_entries"], info["pinned_bytes"]) == (2, 2 * size)
    assert info["memory_entries"] == 1 and cache.longest(model, ids)[0] == 15  # 5, 10 out
    cache.put(model, ids[:20], score_ids(model, ids[:20])[1])  # evicts 15, not a session
    assert cache.longest(model, ids)[0] == 20 and sessions.get("a") is talk["a"]
    sessions.put("c", talk["c"])  # the store's limit: b, the least recently used, goes
    assert sessions.get("b") is None and cache.pinned("session:b") is None
    assert sessions.get("c") is talk["c"] and cache.info()["pinned_entries"] == 2
    assert sessions.delete("a") and cache.info()["pinned_entries"] == 1
    cache.clear()  # the prefixes only
    assert sessions.get("c") is talk["c"]


def test_the_disk_tier_survives_a_restart_keeps_its_bound_and_drops_a_bad_entry(model, tmp_path):
    ids = np.arange(3, 60, dtype=np.int32)
    contexts = {n: score_ids(model, ids[:n])[1] for n in (8, 16, 24)}
    first = StateCache(memory_bytes=0, folder=tmp_path)
    for n in (8, 16):
        first.put(model, ids[:n], contexts[n])
    restarted = StateCache(memory_bytes=0, folder=tmp_path)  # a new process
    n, context = restarted.longest(model, ids)
    assert n == 16
    np.testing.assert_array_equal(context.state.sublayers[0].v, contexts[16].state.sublayers[0].v)
    (newest,) = [p for p in tmp_path.iterdir() if "-16-" in p.name]
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped bit
    newest.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="dropped an entry"):
        assert restarted.longest(model, ids)[0] == 8  # never the bad one: the next longest
    assert not newest.exists() and restarted.stats.dropped == 1
    size = next(tmp_path.iterdir()).stat().st_size
    bounded = StateCache(memory_bytes=0, folder=tmp_path, disk_bytes=int(1.5 * size))
    bounded.put(model, ids[:24], contexts[24])
    assert [p.name.split("-")[1] for p in tmp_path.iterdir()] == ["24"]  # 8 was older
    assert bounded.info()["disk_bytes"] <= bounded.disk_bytes
    assert bounded.clear() == 1 and not list(tmp_path.iterdir())


def test_the_second_generate_reads_only_what_is_new(model_dir, tmp_path, monkeypatch):
    """`tvq generate -f` twice: the second run starts from the cached state (the same
    text), --no-cache reads it all; `tvq cache info` and `tvq cache clear` show and empty
    the folder."""
    monkeypatch.setenv("TVQ_CACHE_DIR", str(tmp_path / "cache"))
    prompt = tmp_path / "book.txt"
    prompt.write_text(TEXT * 4)
    runner = CliRunner()

    def run(*extra):
        result = runner.invoke(app, ["generate", "-f", str(prompt), "-m", str(model_dir),
                                     "-n", "8", "-t", "0", "--json", *extra])  # fmt: skip
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    first, second, uncached = run(), run(), run("--no-cache")
    total = first["timings"]["prompt_tokens"]
    assert first["timings"]["cached_tokens"] == 0 and uncached["timings"]["cached_tokens"] == 0
    assert second["timings"]["cached_tokens"] == total - total % 4
    assert first["tokens"] == second["tokens"] == uncached["tokens"]
    shown = json.loads(runner.invoke(app, ["cache", "info", "--json"]).stdout)
    assert shown["entries"] == 1 and 0 < shown["bytes"] <= shown["limit"]
    assert runner.invoke(app, ["cache", "clear"]).exit_code == 0
    assert json.loads(runner.invoke(app, ["cache", "info", "--json"]).stdout)["entries"] == 0


def test_prompt_scores_from_a_cached_prefix_are_the_whole_prompts(model):
    """echo with logprobs: the scores of a prompt whose prefix was scored before are read
    from there (only the rest is fed) and equal scoring the whole prompt."""
    from tvq.runtime.state_cache import score_prompt

    ids = np.asarray(model.tokenizer.encode(TEXT), np.int32)
    cache = StateCache()
    _, _, none = score_prompt(model, ids[:150], cache, 5)
    scores, context, reused = score_prompt(model, ids, cache, 3)
    whole, after = score_ids(model, ids, top_k=3)
    assert none == 0 and reused == 150 and context.tokens == len(ids)
    np.testing.assert_allclose(scores.log_probs, whole.log_probs[0], atol=1e-5)
    np.testing.assert_array_equal(scores.top_ids, whole.top_ids[0])
    assert cache.longest_scored(model, ids, 6)[0] == 0  # it holds 5 alternatives at most
