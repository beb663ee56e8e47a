"""Evaluation statistics of `tvq score`: word counts, word perplexity, the standard error
of the mean token NLL by batch means, and its 95% interval (tvq/scoring.py)."""

import io
import math
from pathlib import Path

import numpy as np
import pytest

import tvq
from tvq.scoring import ERROR_BLOCK, FileScore, score_stream

DATA = Path(__file__).parent / "data"


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


@pytest.fixture(scope="module")
def default_model():
    return tvq.load()


def test_stderr_shrinks_as_the_text_grows(default_model):
    text = (DATA / "macbeth_head.txt").read_bytes() + (DATA / "hamlet_head.txt").read_bytes()
    short, _ = score_stream(default_model, io.BytesIO(text[:3000]), "short")
    long, _ = score_stream(default_model, io.BytesIO(text), "long")
    assert long.tokens > 3 * short.tokens
    assert long.nll_stderr < short.nll_stderr
    row = long.row()
    assert row["words"] == len(text.split())
    assert row["word_perplexity"] == pytest.approx(math.exp(long.nll_sum / row["words"]))
    assert row["word_perplexity"] > row["perplexity"]  # more than one token per word
