"""Scoring token streams of any length in one pass through the cached state
(docs/DESIGN.md section 8).

A text is scored from its first token: the first input is the end-of-document
id, so the first token is predicted with no context, as in training. Long
inputs are cut into pieces whose sizes come from a small fixed set (a large
chunk, then halving sizes), so every piece reuses an already compiled shape
and any length costs at most ~log2(chunk) compilations, ever.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import jax.numpy as jnp
import numpy as np

from tvq.compare import check_baseline, compare_ids, kl_histogram, kl_percentile
from tvq.decode_loop import feed_ids
from tvq.errors import InputError
from tvq.model import Model, check_block_len
from tvq.state import ModelState
from tvq.tokenizer import Tokenizer, encode_stream

CHUNK_BLOCKS = 32
MIN_CHUNK = 4096  # tokens per compiled call at least, whatever the block length


@dataclasses.dataclass
class Context:
    """Where a text stands: the attention state and the token not yet fed to the model."""

    state: ModelState
    last_token: np.ndarray  # [B] int32: the next input (end-of-document at a start)
    tokens: int = 0  # text tokens consumed so far

    @classmethod
    def start(cls, model: Model, batch_size: int = 1) -> Context:
        return cls(
            state=model.initial_state(batch_size),
            last_token=np.full([batch_size], eos_id(model), np.int32),
        )


def eos_id(model: Model) -> int:
    tokenizer = model.tokenizer
    return int(tokenizer.eos_id) if tokenizer is not None else 1


def require_tokenizer(model: Model) -> Tokenizer:
    """The model's tokenizer, or InputError: text goes in and out through it."""
    if model.tokenizer is None:
        raise InputError(
            "this model has no tokenizer: save it with one (tvq.Model(..., tokenizer=...)), "
            "or use a model directory made by `tvq train` or `tvq convert`"
        )
    return model.tokenizer


def chunk_len(block_len: int) -> int:
    """The largest piece: a whole number of blocks, at least MIN_CHUNK tokens."""
    block_len = check_block_len(block_len)
    return block_len * max(CHUNK_BLOCKS, -(-MIN_CHUNK // block_len))


def piece_sizes(length: int, block_len: int) -> Iterator[int]:
    """Splits `length` into sizes from {chunk, chunk/2, …, L, and binary sizes below L}."""
    chunk = chunk_len(block_len)
    while length >= chunk:
        yield chunk
        length -= chunk
    size = chunk // 2
    while length and size >= 1:
        if length >= size:
            yield size
            length -= size
        size = size // 2 if size > block_len or size % 2 == 0 else size - 1


@dataclasses.dataclass
class ScoreResult:
    nll_sum: float  # nats
    tokens: int
    log_probs: np.ndarray | None = None  # [B, T] per-token log-probs, when asked for
    # the k most likely tokens per position, when asked for: log-probs and ids [B, T, k]
    top_log_probs: np.ndarray | None = None
    top_ids: np.ndarray | None = None

    @property
    def nll(self) -> float:
        return self.nll_sum / self.tokens if self.tokens else 0.0

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll) if self.tokens else 1.0


def score_ids(
    model: Model,
    ids,
    context: Context | None = None,
    *,
    keep_log_probs: bool = False,
    block_len: int | None = None,
    top_k: int = 0,
) -> tuple[ScoreResult, Context]:
    """Scores token ids [T] (or [B, T]) continuing `context`; returns the new context too.
    top_k > 0 keeps the log-probs and also the top_k most likely tokens per position."""
    ids = np.asarray(ids, np.int32)
    if ids.ndim == 1:
        ids = ids[None, :]
    batch, length = ids.shape
    context = context or Context.start(model, batch)
    keep_log_probs = keep_log_probs or top_k > 0
    if length == 0:
        empty = np.zeros([batch, 0], np.float32) if keep_log_probs else None
        tops = (np.zeros([batch, 0, top_k], np.float32), np.zeros([batch, 0, top_k], np.int32))
        return ScoreResult(0.0, 0, empty, *(tops if top_k else (None, None))), context
    block_len = model.block_len if block_len is None else check_block_len(block_len)
    inputs = np.concatenate([context.last_token[:, None], ids[:, :-1]], axis=1)
    state, total, kept, start = context.state, jnp.zeros([]), [], 0
    # Whole blocks through the blockwise forward; the tail shorter than a block through
    # the decoding loop (equal within rounding, docs/DESIGN.md invariant 6), which is
    # one compiled program for every tail length.
    tail = length % block_len
    for size in piece_sizes(length - tail, block_len):
        piece = slice(start, start + size)
        out, state = model.score(inputs[:, piece], ids[:, piece], state=state,
                                 block_len=min(block_len, size), top_k=top_k)  # fmt: skip
        out = out if top_k else (out,)
        total = total + jnp.sum(out[0])
        if keep_log_probs:
            kept.append(out)
        start += size
    if tail:
        out, state = feed_ids(model, state, inputs[:, start], ids[:, start:], top_k)
        total = total + jnp.sum(out[0])
        if keep_log_probs:
            kept.append(out)
    joined = [np.asarray(jnp.concatenate(part, axis=1)) for part in zip(*kept, strict=True)]
    result = ScoreResult(-float(total), batch * length, *(joined or [None]))
    new_context = Context(state=state, last_token=ids[:, -1].copy(), tokens=context.tokens + length)
    return result, new_context


def top_entries(tokenizer: Tokenizer, ids, log_probs) -> list[dict]:
    """The most likely tokens at one position as [{token, id, logprob}], likeliest first
    (the top_logprobs of `tvq score --per-token` and `tvq generate --json`)."""
    return [{"token": tokenizer.token_bytes(int(i)).decode("utf-8", errors="replace"),
             "id": int(i), "logprob": round(float(lp), 6)}
            for i, lp in zip(ids, log_probs, strict=True)]  # fmt: skip


# The long-context curve: token positions 0-128, 128-256, ... doubling to the end.
FIRST_BUCKET = 128


def position_bucket(positions: np.ndarray) -> np.ndarray:
    """Bucket index of token positions: 0 for [0, 128), k for [128·2^(k−1), 128·2^k)."""
    scaled = np.maximum(np.asarray(positions, np.int64) // FIRST_BUCKET, 0)
    return np.where(scaled == 0, 0, np.floor(np.log2(np.maximum(scaled, 1))).astype(np.int64) + 1)


def bucket_bounds(index: int) -> tuple[int, int]:
    return (0, FIRST_BUCKET) if index == 0 else (FIRST_BUCKET << (index - 1), FIRST_BUCKET << index)


# Tokens per block for the standard error: tokens are correlated, so the error of the
# mean token NLL is taken over the means of consecutive blocks (batch means).
ERROR_BLOCK = 256


def _exp(x: float) -> float | None:
    """exp(x), or None where it overflows a float (a text of few, very unlikely words)."""
    return math.exp(x) if x < 709.0 else None


def _merge_moments(a: tuple[int, float, float], b: tuple[int, float, float]):
    """(count, mean, M2) of two groups merged (Chan et al.'s pairwise update)."""
    (n_a, mean_a, m2_a), (n_b, mean_b, m2_b) = a, b
    n = n_a + n_b
    if n == 0:
        return 0, 0.0, 0.0
    delta = mean_b - mean_a
    return n, mean_a + delta * n_b / n, m2_a + m2_b + delta * delta * n_a * n_b / n


@dataclasses.dataclass
class FileScore:
    """Totals for one text; `nll` in nats per token. Also its words (whitespace-separated,
    counted as bytes are read) and the moments of its ERROR_BLOCK-token block means,
    from which the standard error of `nll` comes (in constant memory)."""

    file: str
    bytes: int = 0
    tokens: int = 0
    nll_sum: float = 0.0
    invalid_utf8: bool = False
    protocol: str = "full"  # full, window or stride (tvq.scoring.score_stream)
    window: int | None = None
    stride: int | None = None
    words: int = 0
    in_word: bool = False  # the last byte read was part of a word
    blocks: int = 0  # complete blocks of ERROR_BLOCK tokens
    block_mean: float = 0.0  # mean of their mean NLLs
    block_m2: float = 0.0  # Σ (block mean − block_mean)²
    partial_tokens: int = 0  # tokens of the block being filled
    partial_sum: float = 0.0
    # [tokens, Σ NLL, bytes] per position bucket (position_bucket), when asked for; the
    # baseline's too when there is one
    by_position: list[list[float]] | None = None
    baseline_by_position: list[list[float]] | None = None
    # against a baseline model (tvq.compare), when there is one
    baseline_nll_sum: float = 0.0
    kl_sum: float = 0.0
    same_top1: int = 0
    kl_counts: list[int] | None = None  # tvq.compare.kl_histogram, summed

    def add_comparison(self, parts: dict) -> None:
        """Folds the baseline's per-token numbers (tvq.compare.compare_ids) in."""
        self.baseline_nll_sum += float(parts["baseline_nll"].astype(np.float64).sum())
        self.kl_sum += float(parts["kl"].astype(np.float64).sum())
        self.same_top1 += int(parts["same_top1"].sum())
        counts = kl_histogram(parts["kl"])
        self.kl_counts = (
            counts + np.asarray(self.kl_counts) if self.kl_counts else counts
        ).tolist()

    def count_words(self, data: bytes) -> None:
        """Counts the words in the next bytes of the text (a word may span reads)."""
        if not data:
            return
        words = len(data.split())
        if words and self.in_word and not data[:1].isspace():
            words -= 1  # the first one continues the last read's word
        self.words += words
        self.in_word = not data[-1:].isspace()

    def add_nll(self, nll) -> None:
        """Folds the next tokens' NLLs (nats, in text order) into the error blocks."""
        values = np.asarray(nll, np.float64).reshape(-1)
        if not len(values):
            return
        need = ERROR_BLOCK - self.partial_tokens
        if len(values) < need:
            self.partial_tokens += len(values)
            self.partial_sum += float(values.sum())
            return
        first = self.partial_sum + float(values[:need].sum())
        rest = values[need:]
        whole = len(rest) // ERROR_BLOCK * ERROR_BLOCK
        sums = np.concatenate([[first], rest[:whole].reshape(-1, ERROR_BLOCK).sum(axis=1)])
        means = sums / ERROR_BLOCK
        batch = (len(means), float(means.mean()), float(((means - means.mean()) ** 2).sum()))
        self.blocks, self.block_mean, self.block_m2 = _merge_moments(
            (self.blocks, self.block_mean, self.block_m2), batch
        )
        self.partial_tokens = len(rest) - whole
        self.partial_sum = float(rest[whole:].sum())

    def add_positions(self, start: int, nll, token_bytes, baseline_nll=None) -> None:
        """Folds the NLLs and byte lengths of the tokens at positions start, start+1, …
        into the position buckets (when by_position is on), and the baseline's NLLs into
        its own."""
        if self.by_position is not None:
            _fold_positions(self.by_position, start, nll, token_bytes)
        if self.baseline_by_position is not None and baseline_nll is not None:
            _fold_positions(self.baseline_by_position, start, baseline_nll, token_bytes)

    def position_rows(self) -> list[dict]:
        """by_position as {start, end, tokens, nll, bits_per_byte} per bucket."""
        return _position_rows(self.by_position)

    @property
    def nll_stderr(self) -> float | None:
        """Standard error of the mean token NLL by batch means (None below 2 blocks)."""
        if self.blocks < 2:
            return None
        return math.sqrt(self.block_m2 / (self.blocks - 1) / self.blocks)

    @classmethod
    def total(cls, scores: list[FileScore], name: str = "TOTAL") -> FileScore:
        """The scores of several texts together (their blocks pooled)."""
        first = scores[0] if scores else cls(name)
        curves = {key: None if getattr(first, key) is None else []
                  for key in ("by_position", "baseline_by_position")}  # fmt: skip
        total = cls(name, protocol=first.protocol, window=first.window, stride=first.stride,
                    **curves)  # fmt: skip
        for s in scores:
            if s.kl_counts is not None:
                total.baseline_nll_sum += s.baseline_nll_sum
                total.kl_sum += s.kl_sum
                total.same_top1 += s.same_top1
                mine = total.kl_counts or []
                total.kl_counts = (np.add(mine, s.kl_counts).tolist() if mine and s.kl_counts
                                   else list(mine or s.kl_counts))  # fmt: skip
            for mine, theirs in ((total.by_position, s.by_position),
                                 (total.baseline_by_position, s.baseline_by_position)):  # fmt: skip
                for index, cell in enumerate(theirs or []):
                    while len(mine) <= index:
                        mine.append([0, 0.0, 0])
                    mine[index] = [a + b for a, b in zip(mine[index], cell, strict=True)]
            total.bytes += s.bytes
            total.tokens += s.tokens
            total.nll_sum += s.nll_sum
            total.words += s.words
            total.blocks, total.block_mean, total.block_m2 = _merge_moments(
                (total.blocks, total.block_mean, total.block_m2),
                (s.blocks, s.block_mean, s.block_m2),
            )
        return total

    def row(self) -> dict:
        nll = self.nll_sum / self.tokens if self.tokens else 0.0
        stderr = self.nll_stderr
        return {
            "file": self.file,
            "bytes": self.bytes,
            "tokens": self.tokens,
            "nll": nll,
            "perplexity": math.exp(nll),
            "bits_per_token": nll / math.log(2),
            "bits_per_byte": self.nll_sum / math.log(2) / self.bytes if self.bytes else 0.0,
            "words": self.words,
            "word_perplexity": _exp(self.nll_sum / self.words) if self.words else None,
            "nll_stderr": stderr,
            "perplexity_ci95": None if stderr is None else
            [math.exp(nll - 1.96 * stderr), math.exp(nll + 1.96 * stderr)],
            "protocol": self.protocol,
            "window": self.window,
            "stride": self.stride,
        } | ({} if self.by_position is None else {"by_position": self.position_rows()}) \
          | self.comparison_row()  # fmt: skip

    def comparison_row(self) -> dict:
        """kl_divergence (mean KL(baseline ‖ model) per token, nats), its 99th
        percentile, delta_nll (model − baseline, nats per token), same_top1; and the
        baseline's curve (baseline_by_position) when by_position is on."""
        if self.kl_counts is None:
            return {}
        tokens = max(self.tokens, 1)
        curve = self.baseline_by_position
        return {
            "kl_divergence": self.kl_sum / tokens,
            "kl_divergence_p99": kl_percentile(self.kl_counts, 99),
            "delta_nll": (self.nll_sum - self.baseline_nll_sum) / tokens,
            "same_top1": self.same_top1 / tokens,
        } | ({} if curve is None else {"baseline_by_position": _position_rows(curve)})


def _fold_positions(cells: list[list], start: int, nll, token_bytes) -> None:
    """Adds [tokens, Σ NLL, bytes] of the tokens at positions start, start+1, … to their
    position buckets' cells."""
    if not len(nll):
        return
    buckets = position_bucket(start + np.arange(len(nll)))
    nll, token_bytes = np.asarray(nll, np.float64), np.asarray(token_bytes)
    for index in np.unique(buckets):
        mask = buckets == index
        while len(cells) <= index:
            cells.append([0, 0.0, 0])
        cell = cells[index]
        cell[0] += int(mask.sum())
        cell[1] += float(nll[mask].sum())
        cell[2] += int(token_bytes[mask].sum())


def _position_rows(cells: list[list] | None) -> list[dict]:
    """Position-bucket cells as {start, end, tokens, nll, bits_per_byte} per bucket."""
    rows = []
    for index, (tokens, nll_sum, n_bytes) in enumerate(cells or []):
        start, end = bucket_bounds(index)
        nll = nll_sum / tokens if tokens else None
        bits = nll_sum / math.log(2) / n_bytes if n_bytes else None
        rows.append({"start": start, "end": end, "tokens": tokens, "nll": nll,
                     "bits_per_byte": bits})  # fmt: skip
    return rows


class WordCounter:
    """A binary stream that counts the words of what is read from it into `score`."""

    def __init__(self, stream, score: FileScore) -> None:
        self.stream, self.score = stream, score

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.score.count_words(data)
        return data


def score_stream(
    model: Model,
    stream,
    name: str,
    *,
    block_len: int | None = None,
    context: Context | None = None,
    on_piece=None,
    on_tokens=None,
    window: int | None = None,
    stride: int | None = None,
    by_position: bool = False,
    baseline: Model | None = None,
    top_logprobs: int = 0,
) -> tuple[FileScore, Context]:
    """Scores a binary stream in one pass, piece by piece, carrying the context.

    Tokens are scored in whole chunks of one compiled shape as they arrive; only the
    final remainder uses the smaller shapes. The ids equal tokenizing the whole text at
    once (tvq.tokenizer.encode_stream). on_piece(score) is called after each chunk
    (progress; bytes then count the scored tokens); on_tokens(ids, log_probs,
    byte_offset, top) receives per-token results, top being None or, with
    top_logprobs k, (log-probs [T, k], ids [T, k]) of the k most likely tokens. Memory
    stays flat whatever the length.

    Protocols (check_protocol): by default full context, every token seeing everything
    before it. window N: fixed windows of N tokens, each from a fresh state (the
    reference implementation's evaluation). window N, stride S: windows of N tokens
    advancing by S, each token scored once with its window's context only: the first
    window scores its N tokens, each later one feeds the N − S tokens before its S new
    tokens from a fresh state, then scores those S (strided perplexity). by_position:
    NLL and bits per byte per log-spaced bucket of token positions in the text.
    baseline: a second model (same tokenizer) scored in the same pass, each token
    compared (tvq.compare); FileScore.comparison_row.
    """
    tokenizer = require_tokenizer(model)
    block_len = model.block_len if block_len is None else check_block_len(block_len)
    window, stride = check_protocol(window, stride)
    if window is not None and context is not None:
        raise InputError("a window starts from a fresh state: it cannot continue a state")
    result = FileScore(name, protocol=protocol_name(window, stride), window=window,
                       stride=stride, by_position=[] if by_position else None)  # fmt: skip
    if baseline is not None:
        check_baseline(model, baseline)
        result.kl_counts = []
        result.baseline_by_position = [] if by_position else None
    if context is not None and baseline is not None:
        raise InputError("a comparison with a baseline starts both models from the start")
    context = context or Context.start(model, 1)
    base_context = Context.start(baseline, 1) if baseline is not None else None
    chunk = chunk_len(block_len)
    pending: list[int] = []
    raw_bytes, offset = 0, 0
    position, history = 0, []  # tokens read so far; the last N − S of them

    def through_windows(ids: list[int]) -> None:
        """Scores ids in the pieces the protocol cuts, fresh at each window's start."""
        nonlocal context, base_context, position, history
        step = stride or window
        while ids:
            if position < window:  # the first window continues the start context
                take = ids[: window - position]
            else:
                into = (position - window) % step
                if into == 0:  # a new window: its context, unscored, from a fresh state
                    context = Context.start(model, 1)
                    if window > step:
                        _, context = score_ids(model, history, context, block_len=block_len)
                    if baseline is not None:
                        base_context = Context.start(baseline, 1)
                        if window > step:
                            _, base_context = score_ids(baseline, history, base_context,
                                                        block_len=block_len)  # fmt: skip
                take = ids[: step - into]
            flush(take)
            position += len(take)
            seen = history + take
            history = seen[max(0, len(seen) - (window - step)) :]
            ids = ids[len(take) :]

    def flush(ids: list[int]) -> None:
        nonlocal context, base_context, offset
        if baseline is None:
            scored, context = score_ids(model, ids, context, keep_log_probs=True,
                                        block_len=block_len, top_k=top_logprobs)  # fmt: skip
        else:
            parts, state, base_state = compare_ids(
                model, baseline, ids, context.last_token, context.state, base_context.state,
                piece_sizes(len(ids), block_len), block_len, top_logprobs,
            )  # fmt: skip
            last, after = np.asarray(ids[-1:], np.int32), len(ids)
            context = Context(state=state, last_token=last, tokens=context.tokens + after)
            base_context = Context(state=base_state, last_token=last.copy(),
                                   tokens=base_context.tokens + after)  # fmt: skip
            nll = parts["nll"].astype(np.float64)
            scored = ScoreResult(float(nll.sum()), len(ids), -parts["nll"][None, :],
                                 parts["top_log_probs"][None], parts["top_ids"][None])  # fmt: skip
            result.add_comparison(parts)
        result.add_nll(-scored.log_probs[0])
        start = offset
        lengths = [len(tokenizer.token_bytes(i)) for i in ids]
        offset += sum(lengths)
        result.add_positions(result.tokens, -scored.log_probs[0], lengths,
                             None if baseline is None else parts["baseline_nll"])  # fmt: skip
        # Totals first, all together, and reported before the per-token results: an
        # interrupt inside on_tokens (writing a per-token file) then leaves partial
        # totals that the caller has seen and that agree with each other.
        result.tokens += scored.tokens
        result.nll_sum += scored.nll_sum
        result.bytes = offset
        if on_piece is not None:
            on_piece(result)
        if on_tokens is not None:
            top = None if not top_logprobs else (scored.top_log_probs[0], scored.top_ids[0])
            on_tokens(ids, scored.log_probs[0], start, top)

    for ids, n_bytes, invalid in encode_stream(tokenizer, WordCounter(stream, result)):
        raw_bytes += n_bytes
        result.invalid_utf8 |= invalid
        pending.extend(ids)
        ready = len(pending) // chunk * chunk
        if ready:
            (flush if window is None else through_windows)(pending[:ready])
            pending = pending[ready:]
    if pending:
        (flush if window is None else through_windows)(pending)
    result.bytes = raw_bytes
    return result, context


def check_protocol(window: Any, stride: Any) -> tuple[int | None, int | None]:
    """(window, stride) as given, or InputError: a stride needs a window, and
    1 ≤ stride ≤ window."""
    for name, value in (("window", window), ("stride", stride)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or value < 1):  # fmt: skip
            raise InputError(f"{name} must be a positive number of tokens, got {value!r}")
    if stride is not None and window is None:
        raise InputError("a stride needs a window (--window N --stride S)")
    if stride is not None and stride > window:
        raise InputError(f"the stride ({stride}) must not exceed the window ({window})")
    return window, stride


def protocol_name(window: int | None, stride: int | None) -> str:
    if window is None:
        return "full"
    return "window" if stride is None else "stride"
