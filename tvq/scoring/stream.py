"""Scoring a file of any length in one streaming pass (docs/DESIGN.md section 8), with
the evaluation protocols (full context, fixed windows, strided windows), per-token
results and a baseline model compared in the same pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

import numpy as np

from tvq.errors import InputError, is_int
from tvq.runtime.context import (
    Context,
    ScoreResult,
    chunk_len,
    piece_sizes,
    require_tokenizer,
    score_ids,
)
from tvq.runtime.model import Model, check_block_len
from tvq.scoring.compare import check_baseline, compare_ids
from tvq.scoring.stats import FileScore
from tvq.text.tokenizer import encode_stream


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
    once (tvq.text.tokenizer.encode_stream). on_piece(score) is called after each chunk
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
    compared (tvq.scoring.compare); FileScore.comparison_row.
    """
    window, stride = check_protocol(window, stride)
    text = _Pass(model, name, block_len=block_len, context=context, window=window,
                 stride=stride, by_position=by_position, baseline=baseline,
                 top_logprobs=top_logprobs, on_piece=on_piece, on_tokens=on_tokens)  # fmt: skip
    for ids in text.chunks(stream):
        text.score(ids)
    text.result.bytes = text.bytes_read  # every byte, tokens or not
    return text.result, text.context


def check_protocol(window: Any, stride: Any) -> tuple[int | None, int | None]:
    """(window, stride) as given, or InputError: a stride needs a window, and
    1 ≤ stride ≤ window."""
    for name, value in (("window", window), ("stride", stride)):
        if value is not None and (not is_int(value) or value < 1):
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


class _Pass:
    """One text's pass: the model's context (and the baseline's), the protocol's windows
    and the totals so far (`result`)."""

    def __init__(self, model: Model, name: str, *, block_len: int | None,
                 context: Context | None, window: int | None, stride: int | None,
                 by_position: bool, baseline: Model | None, top_logprobs: int,
                 on_piece: Callable | None, on_tokens: Callable | None) -> None:  # fmt: skip
        self.model, self.baseline = model, baseline
        self.tokenizer = require_tokenizer(model)
        self.block_len = model.block_len if block_len is None else check_block_len(block_len)
        if window is not None and context is not None:
            raise InputError("a window starts from a fresh state: it cannot continue a state")
        if baseline is not None:
            check_baseline(model, baseline)
            if context is not None:
                raise InputError("a comparison with a baseline starts both models from the "
                                 "start")  # fmt: skip
        self.window, self.step = window, stride or window
        self.top_logprobs, self.on_piece, self.on_tokens = top_logprobs, on_piece, on_tokens
        self.result = FileScore(name, protocol=protocol_name(window, stride), window=window,
                                stride=stride, by_position=[] if by_position else None)  # fmt: skip
        if baseline is not None:
            self.result.kl_counts = []
            self.result.baseline_by_position = [] if by_position else None
        self.context = context or Context.start(model, 1)
        self.base_context = Context.start(baseline, 1) if baseline is not None else None
        self.bytes_read, self.offset = 0, 0  # bytes read; bytes of the tokens scored
        self.position, self.history = 0, []  # tokens read so far; the last N − S of them

    def chunks(self, stream: BinaryIO) -> Iterator[list[int]]:
        """The text's ids in whole chunks as they are read, then the remainder."""
        chunk, pending = chunk_len(self.block_len), []
        for ids, n_bytes, invalid in encode_stream(self.tokenizer,
                                                   WordCounter(stream, self.result)):  # fmt: skip
            self.bytes_read += n_bytes
            self.result.invalid_utf8 |= invalid
            pending.extend(ids)
            ready = len(pending) // chunk * chunk
            if ready:
                yield pending[:ready]
                pending = pending[ready:]
        if pending:
            yield pending

    def score(self, ids: list[int]) -> None:
        """Scores ids as the protocol says: on, or in windows, each fresh at its start."""
        if self.window is None:
            self._flush(ids)
            return
        window, step = self.window, self.step
        while ids:
            if self.position < window:  # the first window continues the start context
                take = ids[: window - self.position]
            else:
                into = (self.position - window) % step
                if into == 0:  # a new window: its context, unscored, from a fresh state
                    self._restart()
                take = ids[: step - into]
            self._flush(take)
            self.position += len(take)
            seen = self.history + take
            self.history = seen[max(0, len(seen) - (window - step)) :]
            ids = ids[len(take) :]

    def _restart(self) -> None:
        """Fresh states (the baseline's too) that have read the window's N − S tokens."""
        self.context = self._fresh(self.model)
        if self.baseline is not None:
            self.base_context = self._fresh(self.baseline)

    def _fresh(self, model: Model) -> Context:
        context = Context.start(model, 1)
        if self.window > self.step:
            _, context = score_ids(model, self.history, context, block_len=self.block_len)
        return context

    def _flush(self, ids: list[int]) -> None:
        """Scores ids continuing the context, folds them into the totals, then reports."""
        if self.baseline is None:
            scored, self.context = score_ids(self.model, ids, self.context, keep_log_probs=True,
                                             block_len=self.block_len,
                                             top_k=self.top_logprobs)  # fmt: skip
            baseline_nll = None
        else:
            scored, baseline_nll = self._compare(ids)
        nll = -scored.log_probs[0]
        self.result.add_nll(nll)
        start = self.offset
        lengths = [len(self.tokenizer.token_bytes(i)) for i in ids]
        self.offset += sum(lengths)
        self.result.add_positions(self.result.tokens, nll, lengths, baseline_nll)
        # Totals first, all together, and reported before the per-token results: an
        # interrupt inside on_tokens (writing a per-token file) then leaves partial
        # totals that the caller has seen and that agree with each other.
        self.result.tokens += scored.tokens
        self.result.nll_sum += scored.nll_sum
        self.result.bytes = self.offset
        if self.on_piece is not None:
            self.on_piece(self.result)
        if self.on_tokens is not None:
            top = (scored.top_log_probs[0], scored.top_ids[0]) if self.top_logprobs else None
            self.on_tokens(ids, scored.log_probs[0], start, top)

    def _compare(self, ids: list[int]) -> tuple[ScoreResult, np.ndarray]:
        """Both models on ids, each continuing its context (tvq.scoring.compare) → the
        model's scores and the baseline's NLLs; the comparison is folded into result."""
        context, base_context = self.context, self.base_context
        parts, state, base_state = compare_ids(
            self.model, self.baseline, ids, context.last_token, context.state,
            base_context.state, piece_sizes(len(ids), self.block_len), self.block_len,
            self.top_logprobs,
        )  # fmt: skip
        last, after = np.asarray(ids[-1:], np.int32), len(ids)
        self.context = Context(state=state, last_token=last, tokens=context.tokens + after)
        self.base_context = Context(state=base_state, last_token=last.copy(),
                                    tokens=base_context.tokens + after)  # fmt: skip
        nll_sum = float(parts["nll"].astype(np.float64).sum())
        scored = ScoreResult(nll_sum, len(ids), -parts["nll"][None, :],
                             parts["top_log_probs"][None], parts["top_ids"][None])  # fmt: skip
        self.result.add_comparison(parts)
        return scored, parts["baseline_nll"]
