"""Scoring token streams of any length in one pass through the cached state.

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

import jax.numpy as jnp
import numpy as np

from tvq.model import Model
from tvq.state import ModelState

CHUNK_BLOCKS = 32


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


def piece_sizes(length: int, block_len: int, chunk_blocks: int = CHUNK_BLOCKS) -> Iterator[int]:
    """Splits `length` into sizes from {chunk, chunk/2, …, L, and binary sizes below L}."""
    chunk = block_len * chunk_blocks
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
) -> tuple[ScoreResult, Context]:
    """Scores token ids [T] (or [B, T]) continuing `context`; returns the new context too."""
    ids = np.asarray(ids, np.int32)
    if ids.ndim == 1:
        ids = ids[None, :]
    batch, length = ids.shape
    context = context or Context.start(model, batch)
    if length == 0:
        empty = np.zeros([batch, 0], np.float32) if keep_log_probs else None
        return ScoreResult(0.0, 0, empty), context
    block_len = block_len or model.block_len
    inputs = np.concatenate([context.last_token[:, None], ids[:, :-1]], axis=1)
    state, total, kept, start = context.state, jnp.zeros([]), [], 0
    for size in piece_sizes(length, block_len):
        piece = slice(start, start + size)
        scores, state = model.score(
            inputs[:, piece], ids[:, piece], state=state, block_len=min(block_len, size)
        )
        total = total + jnp.sum(scores)
        if keep_log_probs:
            kept.append(scores)
        start += size
    log_probs = np.asarray(jnp.concatenate(kept, axis=1)) if keep_log_probs else None
    result = ScoreResult(-float(total), batch * length, log_probs)
    new_context = Context(state=state, last_token=ids[:, -1].copy(), tokens=context.tokens + length)
    return result, new_context
