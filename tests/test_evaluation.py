"""Evaluation statistics of `tvq score`: word counts, word perplexity, the standard error
of the mean token NLL by batch means, and its 95% interval (tvq/scoring/stream.py)."""

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest

import tvq
from tvq.scoring.stats import ERROR_BLOCK, FileScore
from tvq.scoring.stream import score_stream
from tvq.text.tokenizer import ByteTokenizer

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def byte_model():
    from tests.conftest import tiny_config

    config = tiny_config(n_vocab=259, mem_len=4, e_scale=0.25)
    return tvq.Model.init(config, seed=3, block_len=4).with_tokenizer(ByteTokenizer())


def test_words_are_counted_across_any_cut_of_the_stream():
    text = (DATA / "hamlet_head.txt").read_bytes() + b"  trailing\tspace \n\nend"
    rng = np.random.default_rng(0)
    for _ in range(20):
        score, at = FileScore("x"), 0
        for cut in sorted(rng.integers(0, len(text), 12)):
            score.count_words(text[at:cut])
            at = cut
        score.count_words(text[at:])
        assert score.words == len(text.split())


def test_standard_error_is_the_batch_means_formula_whatever_the_pieces():
    rng = np.random.default_rng(1)
    nll = rng.gamma(2.0, 2.0, 10 * ERROR_BLOCK + 77)
    score = FileScore("x")
    at = 0
    for cut in sorted(rng.integers(0, len(nll), 30)):  # pieces of any size, in order
        score.add_nll(nll[at:cut])
        at = cut
    score.add_nll(nll[at:])
    means = nll[: 10 * ERROR_BLOCK].reshape(10, ERROR_BLOCK).mean(axis=1)
    assert score.blocks == 10
    assert score.nll_stderr == pytest.approx(means.std(ddof=1) / math.sqrt(10), rel=1e-9)
    single = FileScore("y")
    single.add_nll(nll[:ERROR_BLOCK])
    assert single.nll_stderr is None  # one block: no estimate
    score.tokens, score.nll_sum = len(nll), float(nll.sum())
    row = score.row()
    low, high = row["perplexity_ci95"]
    assert low < row["perplexity"] < high
    assert math.log(high) - row["nll"] == pytest.approx(1.96 * row["nll_stderr"])
    assert row["nll"] - math.log(low) == pytest.approx(1.96 * row["nll_stderr"])


def test_total_pools_the_blocks_of_every_file():
    rng = np.random.default_rng(2)
    a, b = rng.gamma(2.0, 2.0, 5 * ERROR_BLOCK), rng.gamma(3.0, 1.0, 7 * ERROR_BLOCK)
    scores = []
    for values in (a, b):
        s = FileScore("f")
        s.add_nll(values)
        scores.append(s)
    means = np.concatenate([v.reshape(-1, ERROR_BLOCK).mean(axis=1) for v in (a, b)])
    total = FileScore.total(scores)
    assert total.nll_stderr == pytest.approx(means.std(ddof=1) / math.sqrt(12), rel=1e-9)


def test_stderr_shrinks_as_the_text_grows(byte_model):
    text = (DATA / "macbeth_head.txt").read_bytes() + (DATA / "hamlet_head.txt").read_bytes()
    text = text[:8192]  # pieces of one compiled shape: two of 4096 tokens, one of 2048
    short, _ = score_stream(byte_model, io.BytesIO(text[:2048]), "short")
    long, _ = score_stream(byte_model, io.BytesIO(text), "long")
    assert long.tokens == 4 * short.tokens
    assert long.nll_stderr < short.nll_stderr
    row = long.row()
    assert row["words"] == len(text.split())
    assert row["word_perplexity"] == pytest.approx(math.exp(long.nll_sum / row["words"]))
    assert row["word_perplexity"] > row["perplexity"]  # more than one token per word


# -- protocols ------------------------------------------------------------------------------


def per_token(model, text: bytes, **protocol):
    kept = []

    def keep(ids, log_probs, offset, top):
        kept.append(np.asarray(log_probs))

    result, _ = score_stream(model, io.BytesIO(text), "t", **protocol, on_tokens=keep)
    return result, np.concatenate(kept)


def test_a_window_as_long_as_the_text_is_full_context(byte_model):
    text = (DATA / "macbeth_head.txt").read_bytes()[:300]
    full, full_lp = per_token(byte_model, text)
    window, window_lp = per_token(byte_model, text, window=300)
    np.testing.assert_allclose(window_lp, full_lp, atol=1e-6)
    assert (full.row()["protocol"], window.row()["protocol"]) == ("full", "window")
    shorter, _ = per_token(byte_model, text, window=50)  # less context: a different score
    assert shorter.tokens == 300 and shorter.row()["window"] == 50
    assert abs(shorter.nll_sum - full.nll_sum) > 1e-3


def test_fixed_windows_restart_from_the_start_state(byte_model):
    text = (DATA / "hamlet_head.txt").read_bytes()[:100]
    _, windows = per_token(byte_model, text, window=30)
    for start in range(0, 100, 30):  # each window alone, as its own text
        _, alone = per_token(byte_model, text[start : start + 30])
        np.testing.assert_allclose(windows[start : start + 30], alone, atol=1e-6)


def test_stride_one_equals_recomputing_each_token_with_its_window(byte_model):
    from tvq.runtime.context import score_ids

    text = (DATA / "hamlet_head.txt").read_bytes()[:40]
    ids, n = byte_model.tokenizer.encode(text.decode()), 9
    result, strided = per_token(byte_model, text, window=n, stride=1)
    assert result.tokens == 40 and result.row()["protocol"] == "stride"
    for t in range(40):
        if t < n:  # the first window: everything before t
            scored, _ = score_ids(byte_model, ids[: t + 1], keep_log_probs=True)
            expected = scored.log_probs[0, t]
        else:  # the n - 1 tokens before t, from a fresh state
            _, context = score_ids(byte_model, ids[t - n + 1 : t])
            scored, _ = score_ids(byte_model, ids[t : t + 1], context, keep_log_probs=True)
            expected = scored.log_probs[0, 0]
        assert strided[t] == pytest.approx(expected, abs=1e-5), t


def test_bad_protocols_are_input_errors(byte_model):
    from tvq.errors import InputError

    for protocol, message in (({"stride": 4}, "a stride needs a window"),
                              ({"window": 4, "stride": 5}, "must not exceed"),
                              ({"window": 0}, "positive number of tokens")):  # fmt: skip
        with pytest.raises(InputError, match=message):
            score_stream(byte_model, io.BytesIO(b"abc"), "t", **protocol)


# -- the long-context curve -----------------------------------------------------------------


def test_by_position_buckets_double_and_add_up(byte_model):
    from tvq.scoring.stats import position_bucket

    assert list(position_bucket(np.array([0, 127, 128, 255, 256, 511, 512, 1023, 1024]))) == [
        0, 0, 1, 1, 2, 2, 3, 3, 4]  # fmt: skip
    text = (DATA / "macbeth_head.txt").read_bytes()[:700]
    result, log_probs = per_token(byte_model, text, by_position=True)
    rows = result.row()["by_position"]
    assert [(r["start"], r["end"]) for r in rows] == [(0, 128), (128, 256), (256, 512),
                                                      (512, 1024)]  # fmt: skip
    assert [r["tokens"] for r in rows] == [128, 128, 256, 188]
    for r in rows:  # a bucket's NLL is the mean over its tokens (bytes: 1 token = 1 byte)
        assert r["nll"] == pytest.approx(-log_probs[r["start"] : r["end"]].mean(), rel=1e-5)
        assert r["bits_per_byte"] == pytest.approx(r["nll"] / math.log(2), rel=1e-9)
    total = FileScore.total([result, result]).row()["by_position"]
    assert [r["tokens"] for r in total] == [256, 256, 512, 376]


def test_the_cli_curve_is_the_same_alone_or_batched(tmp_path, byte_model):
    from tests.test_cli import invoke

    byte_model.save(tmp_path / "m")
    a, b = DATA / "hamlet_head.txt", DATA / "macbeth_head.txt"
    both = invoke("score", a, b, "-m", tmp_path / "m", "--by-position", "--format", "json")
    alone = invoke("score", a, "-m", tmp_path / "m", "--by-position", "--format", "json")
    batched_rows = json.loads(both.stdout)[0]["by_position"]
    alone_rows = json.loads(alone.stdout)[0]["by_position"]
    assert [r["tokens"] for r in batched_rows] == [r["tokens"] for r in alone_rows]
    for x, y in zip(batched_rows, alone_rows, strict=True):
        assert x["nll"] == pytest.approx(y["nll"], abs=1e-5)
    assert (
        "by_position"
        not in json.loads(invoke("score", a, "-m", tmp_path / "m", "--format", "json").stdout)[0]
    )


def test_no_agg_cache_changes_nothing_inside_the_window_memory(tmp_path):
    from tests.conftest import tiny_config
    from tests.test_cli import invoke

    config = tiny_config(n_vocab=259, mem_len=64, e_scale=0.25)
    tvq.Model.init(config, seed=4, block_len=8).with_tokenizer(ByteTokenizer()).save(tmp_path / "m")
    short, long = tmp_path / "short.txt", tmp_path / "long.txt"
    short.write_bytes((DATA / "hamlet_head.txt").read_bytes()[:32])  # 32 tokens < 64
    long.write_bytes((DATA / "hamlet_head.txt").read_bytes()[:512])

    def nll(path, *options):
        out = invoke("score", path, "-m", tmp_path / "m", "--format", "jsonl", *options).stdout
        return json.loads(out.splitlines()[0])["nll"]

    assert nll(short, "--no-agg-cache") == pytest.approx(nll(short), abs=1e-6)
    assert abs(nll(long, "--no-agg-cache") - nll(long)) > 1e-4


# -- against a baseline ---------------------------------------------------------------------


def test_kl_percentile_from_the_log_bins():
    from tvq.scoring.stats import kl_histogram, kl_percentile

    values = np.concatenate([np.zeros(50), np.full(49, 0.01), [2.0]])
    counts = kl_histogram(values)
    assert counts.sum() == 100
    assert kl_percentile(counts, 50) == 0.0  # half the tokens: no divergence at all
    assert kl_percentile(counts, 99) == pytest.approx(0.01, rel=0.03)  # 0.01-decade bins
    assert kl_percentile(counts, 100) == pytest.approx(2.0, rel=0.03)
    assert kl_percentile(np.zeros_like(counts), 99) is None


def test_a_model_against_itself_and_against_its_window_alone(tmp_path):
    from tests.conftest import tiny_config
    from tests.test_cli import invoke

    config = tiny_config(n_vocab=259, mem_len=8, e_scale=0.25)
    tvq.Model.init(config, seed=5, block_len=4).with_tokenizer(ByteTokenizer()).save(tmp_path / "m")
    text = tmp_path / "text.txt"
    text.write_bytes((DATA / "hamlet_head.txt").read_bytes()[:1024])  # one compiled piece

    def row(*options):
        out = invoke("score", text, "-m", tmp_path / "m", "--format", "jsonl", *options)
        return json.loads(out.stdout.splitlines()[0])

    alone = row()
    same = row("--baseline", tmp_path / "m")
    assert same["kl_divergence"] == 0.0 and same["kl_divergence_p99"] == 0.0
    assert same["same_top1"] == 1.0 and same["delta_nll"] == 0.0
    assert same["nll"] == pytest.approx(alone["nll"], abs=1e-6)  # the model's own numbers
    ablated = row("--baseline-no-agg-cache")
    assert ablated["kl_divergence"] > 1e-4 and ablated["kl_divergence_p99"] > 0
    assert ablated["same_top1"] < 1.0
    window_only = row("--no-agg-cache")  # the baseline's own score
    assert ablated["delta_nll"] == pytest.approx(alone["nll"] - window_only["nll"], abs=1e-5)
    # another tokenizer: refused before any work, one line, exit 1
    refused = invoke("score", text, "-m", tmp_path / "m", "--baseline", "builtin", code=1)
    assert "another tokenizer" in refused.output


# -- top log-probs ---------------------------------------------------------------------------


def test_top_logprobs_are_the_largest_of_the_full_distribution(byte_model):
    text = (DATA / "hamlet_head.txt").read_bytes()[:256]  # one compiled piece
    kept = []
    score_stream(byte_model, io.BytesIO(text), "t", top_logprobs=3,
                 on_tokens=lambda ids, lp, offset, top: kept.append((ids, lp, top)))  # fmt: skip
    ids = np.concatenate([np.asarray(k[0]) for k in kept])
    values = np.concatenate([k[2][0] for k in kept])
    top_ids = np.concatenate([k[2][1] for k in kept])
    inputs = np.concatenate([[byte_model.tokenizer.eos_id], ids[:-1]])[None]
    full = np.asarray(byte_model.log_probs(inputs)[0][0])
    order = np.argsort(-full, axis=-1)[:, :3]
    np.testing.assert_array_equal(top_ids, order)
    np.testing.assert_allclose(values, np.take_along_axis(full, order, -1), atol=1e-5)
    # the same with a baseline in the pass
    again = []
    score_stream(byte_model, io.BytesIO(text), "t", top_logprobs=3, baseline=byte_model,
                 on_tokens=lambda ids, lp, offset, top: again.append(top))  # fmt: skip
    np.testing.assert_array_equal(np.concatenate([t[1] for t in again]), order)


def test_per_token_rows_carry_top_logprobs(tmp_path, byte_model):
    from tests.test_cli import invoke

    byte_model.save(tmp_path / "m")
    text = tmp_path / "text.txt"
    text.write_bytes((DATA / "hamlet_head.txt").read_bytes()[:256])
    out = tmp_path / "tokens.jsonl"
    invoke("score", text, "-m", tmp_path / "m", "--per-token", out, "--top-logprobs", 2)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == len(text.read_bytes())
    for row in rows:
        first, second = row["top_logprobs"]
        assert first["logprob"] >= second["logprob"] >= -1e9
        assert row["logprob"] <= first["logprob"] + 1e-6
        piece = byte_model.tokenizer.token_bytes(first["id"])
        assert first["token"] == piece.decode("utf-8", "replace")
    assert sum(r["id"] == r["top_logprobs"][0]["id"] for r in rows) > 0
    plain = tmp_path / "plain.jsonl"
    invoke("score", text, "-m", tmp_path / "m", "--per-token", plain)
    assert "top_logprobs" not in plain.read_text()
    refused = invoke("score", text, "-m", tmp_path / "m", "--top-logprobs", 2, code=2)
    assert "--per-token" in refused.output


def test_generation_logprobs_are_the_scored_distribution(byte_model):
    from tvq.decoding import generate
    from tvq.runtime.context import score_ids
    from tvq.text.sampling import Sampler

    prompt = list(b"Hamlet: ")
    prompt = [i + 3 for i in prompt]
    sample = generate(byte_model, prompt, max_tokens=40, sampler=Sampler(temperature=1.0),
                      seed=2, logprobs=4, ignore_eos=True).samples[0]  # fmt: skip
    assert len(sample.top_logprobs) == len(sample.ids) == 40
    scored, _ = score_ids(byte_model, prompt + sample.ids, top_k=4)
    np.testing.assert_array_equal([[i for i, _ in top] for top in sample.top_logprobs],
                                  scored.top_ids[0, len(prompt):])  # fmt: skip
    np.testing.assert_allclose([[v for _, v in top] for top in sample.top_logprobs],
                               scored.top_log_probs[0, len(prompt):], atol=1e-4)  # fmt: skip
    greedy = generate(byte_model, prompt, max_tokens=10, sampler=Sampler(temperature=0),
                      logprobs=1, ignore_eos=True).samples[0]  # fmt: skip
    assert greedy.ids == [top[0][0] for top in greedy.top_logprobs]
    np.testing.assert_allclose(greedy.log_probs, [top[0][1] for top in greedy.top_logprobs])
    with pytest.raises(tvq.TvqError, match="logprobs"):
        generate(byte_model, prompt, max_tokens=3, logprobs=-1)


def test_generate_json_carries_top_logprobs(tmp_path, byte_model):
    from tests.test_cli import invoke

    byte_model.save(tmp_path / "m")
    out = invoke("generate", "Ham", "-m", tmp_path / "m", "-n", 5, "--json", "--logprobs", 3,
                 "--seed", 1, "--ignore-eos")  # fmt: skip
    record = json.loads(out.stdout)
    assert len(record["top_logprobs"]) == len(record["tokens"]) == 5
    for token, lp, top in zip(record["tokens"], record["logprobs"], record["top_logprobs"],
                              strict=True):  # fmt: skip
        assert len(top) == 3 and top[0]["logprob"] >= top[1]["logprob"] >= top[2]["logprob"]
        assert lp <= top[0]["logprob"] + 1e-6
        if token in [t["id"] for t in top]:
            assert lp == pytest.approx(next(t["logprob"] for t in top if t["id"] == token))
    refused = invoke("generate", "Ham", "-m", tmp_path / "m", "--logprobs", 3, code=2)
    assert "--json" in refused.output


# -- the curve as a picture, and progress ---------------------------------------------------


def test_plot_writes_a_picture_of_the_curve_and_the_baselines(tmp_path, byte_model):
    from tests.test_cli import invoke

    byte_model.save(tmp_path / "m")
    text = tmp_path / "text.txt"
    text.write_bytes((DATA / "hamlet_head.txt").read_bytes()[:512])
    png, svg = tmp_path / "curve.png", tmp_path / "curve.svg"
    out = invoke("score", text, "-m", tmp_path / "m", "--plot", svg, "--format", "json",
                 "--baseline-no-agg-cache")  # fmt: skip
    assert b"<svg" in svg.read_bytes()[:1000]
    assert b"text.txt (no aggregate cache)" in svg.read_bytes()  # the dashed line's legend
    assert "by_position" not in json.loads(out.stdout)[0]  # drawn, not printed
    out = invoke("score", text, "-m", tmp_path / "m", "--plot", png, "--format", "json",
                 "--by-position", "--baseline", tmp_path / "m")  # fmt: skip
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    row = json.loads(out.stdout)[0]
    assert row["baseline_by_position"] == row["by_position"]  # the model against itself
    for bad, message in ((tmp_path / "curve.jpg", ".png or .svg"),
                         (tmp_path / "missing" / "c.png", "does not exist")):  # fmt: skip
        refused = invoke("score", text, "-m", tmp_path / "m", "--plot", bad,
                         code=2 if bad.suffix == ".jpg" else 1)  # fmt: skip
        assert message in refused.output and len(refused.output.strip().splitlines()) == 1


def test_plot_without_matplotlib_is_a_clear_error(monkeypatch):
    import importlib.util

    from tvq.scoring.plot import check_plot

    real = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "matplotlib" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(tvq.TvqError, match=r"pip install 'tvq\[plot\]'"):
        check_plot("curve.png")


def test_progress_shows_all_files_so_far_with_their_spread():
    from tvqcli.score_output import running_bpb

    rng = np.random.default_rng(3)
    scores = []
    for n in (3 * ERROR_BLOCK, 5 * ERROR_BLOCK):
        s = FileScore("f", bytes=2 * n)
        nll = rng.gamma(2.0, 1.0, n)
        s.add_nll(nll)
        s.tokens, s.nll_sum = n, float(nll.sum())
        scores.append(s)
    total = FileScore.total(scores).row()
    spread = 1.96 * total["nll_stderr"] / 2 / math.log(2)  # two bytes a token
    assert running_bpb(scores) == f"{total['bits_per_byte']:.4f} ± {spread:.4f}"
    assert running_bpb([FileScore("f")]) == "-"
