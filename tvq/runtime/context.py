"""The scoring primitive every job stands on (docs/DESIGN.md section 8): where a text
stands (`Context`) and `score_ids`, which scores token ids continuing it.

A text is scored from its first token: the first input is the end-of-document id, so
the first token is predicted with no context, as in training. Long inputs are cut into
pieces whose sizes come from a small fixed set (a large chunk, then halving sizes), so
every piece reuses an already compiled shape and any length costs at most ~log2(chunk)
compilations, ever. Decoding (prefill), scoring files, state files, training's
evaluation and serving all call down into this module.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import jax
import numpy as np

from tvq.errors import InputError
from tvq.nn.state import ModelState
from tvq.runtime.decode_loop import feed_ids
from tvq.runtime.model import Model, check_block_len
from tvq.text.tokenizer import Tokenizer

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
    state, kept, start = context.state, [], 0
    # Whole blocks through the blockwise forward; the tail shorter than a block through
    # the decoding loop (equal within rounding, docs/DESIGN.md invariant 6), which is
    # one compiled program for every tail length.
    tail = length % block_len
    for size in piece_sizes(length - tail, block_len):
        piece = slice(start, start + size)
        out, state = model.score(inputs[:, piece], ids[:, piece], state=state,
                                 block_len=min(block_len, size), top_k=top_k)  # fmt: skip
        kept.append(out if top_k else (out,))
        start += size
    if tail:
        out, state = feed_ids(model, state, inputs[:, start], ids[:, start:], top_k)
        kept.append(out)
    # summed and joined on the host, fetched once: the pieces' lengths vary, and an
    # operation on the device would compile a program per length, each held for good
    # (RESULTS section 18)
    kept = jax.device_get(kept)
    total = sum(float(np.sum(out[0], dtype=np.float64)) for out in kept)
    joined = [np.concatenate(part, axis=1) for part in zip(*kept, strict=True)]
    result = ScoreResult(-total, batch * length, *(joined if keep_log_probs else [None]))
    new_context = Context(state=state, last_token=ids[:, -1].copy(), tokens=context.tokens + length)
    return result, new_context
