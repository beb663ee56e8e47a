"""Scoring a file of any length in one streaming pass (docs/DESIGN.md section 8), with
the evaluation protocols (full context, fixed windows, strided windows), per-token
results and a baseline model compared in the same pass.
"""

from __future__ import annotations

from typing import Any

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
