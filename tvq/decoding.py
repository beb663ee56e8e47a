"""Decoding: one compiled loop that feeds each sampled token back as a block of length 1.

Block-length invariance (DESIGN.md invariant 3) makes this exact: the log-probs the
sampler sees are those that scoring the finished text gives (invariant 6). The loop is
a `jax.lax.while_loop`; each sampled token goes to the host through an ordered
`io_callback`, which streams text and answers whether every sample has finished.
Its cost per token does not depend on the position: the state has a fixed size.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from tvq.errors import InputError
from tvq.model import TRACE_COUNTS, Model, run_block
from tvq.sampling import Sampler
from tvq.scoring import Context, score_ids
from tvq.tokenizer import StreamDecoder
from tvq.transformer import Transformer

_SINK: list[Callable] = []  # the host function of the loop now running


def _emit(step, tokens, log_probs):
    return np.bool_(_SINK[-1](int(step), np.asarray(tokens), np.asarray(log_probs)))


@functools.partial(jax.jit, static_argnames=("config", "sampler"), donate_argnames=("state",))
def decode_loop(config, params, state, token, key, max_new, sampler: Sampler):
    """Samples up to max_new tokens after `token` [B]; returns (state, last token, count)."""
    TRACE_COUNTS["decode"] += 1
    net = Transformer(config)
    variables = {"params": params}
    tables = net.apply(variables, method=Transformer.tables)

    def cond(carry):
        _, _, _, step, stop = carry
        return (step < max_new) & ~stop

    def body(carry):
        state, token, key, step, _ = carry
        state, log_probs = run_block(net, variables, tables, state, token[:, None])
        log_probs = log_probs[:, 0]  # [B, N]
        key, sub = jax.random.split(key)
        new = sampler.sample(sub, log_probs)
        picked = jnp.take_along_axis(log_probs, new[:, None], axis=-1)[:, 0]
        stop = io_callback(_emit, jax.ShapeDtypeStruct((), jnp.bool_), step, new, picked,
                           ordered=True)  # fmt: skip
        return state, new, key, step + 1, stop

    init = (state, token, key, jnp.zeros([], jnp.int32), jnp.zeros([], jnp.bool_))
    state, token, _, count, _ = jax.lax.while_loop(cond, body, init)
    return state, token, count


@dataclasses.dataclass
class Sample:
    text: str = ""
    ids: list[int] = dataclasses.field(default_factory=list)
    log_probs: list[float] = dataclasses.field(default_factory=list)
    finish_reason: str = "length"  # "length", "eos" or "stop"
    done: bool = False


@dataclasses.dataclass
class Generation:
    samples: list[Sample]
    context: Context  # continues after the last sampled token (sample 0's row first)
    prompt_tokens: int
    prompt_seconds: float
    generated_tokens: int
    generate_seconds: float
    seed: int


class _TextRows:
    """Host side of the loop: decodes each row, applies stop strings, streams row 0."""

    def __init__(self, model, n, eos_id, stop, on_text):
        self.samples = [Sample() for _ in range(n)]
        self.decoders = [StreamDecoder(model.tokenizer) for _ in range(n)]
        self.pending = [""] * n  # decoded text not yet released (may begin a stop string)
        self.eos_id, self.stop, self.on_text = eos_id, [s for s in stop if s], on_text
        self.first_token_at: float | None = None
        self.error: BaseException | None = None  # raised again once the loop has stopped

    def __call__(self, step, tokens, log_probs) -> bool:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        try:
            return self._take(tokens, log_probs)
        except (BrokenPipeError, KeyboardInterrupt) as e:  # must not cross the compiled loop
            self.error = e
            return True

    def _take(self, tokens, log_probs) -> bool:
        for row, sample in enumerate(self.samples):
            if sample.done:
                continue
            token = int(tokens[row])
            sample.ids.append(token)
            sample.log_probs.append(float(log_probs[row]))
            if token == self.eos_id:
                self._finish(row, "eos")
                continue
            self.pending[row] += self.decoders[row].push(token)
            self._release(row)
        return all(s.done for s in self.samples)

    def _release(self, row: int) -> None:
        text = self.pending[row]
        for stop in self.stop:
            at = text.find(stop)
            if at >= 0:
                self.pending[row] = text[:at]
                self._finish(row, "stop", flush=False)
                return
        hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])),
                   default=0)  # fmt: skip
        self._out(row, text[: len(text) - hold])
        self.pending[row] = text[len(text) - hold :]

    def _finish(self, row: int, reason: str, flush: bool = True) -> None:
        tail = self.pending[row] + (self.decoders[row].flush() if flush else "")
        self._out(row, tail)
        self.pending[row] = ""
        self.samples[row].finish_reason = reason
        self.samples[row].done = True

    def finish_all(self) -> None:
        for row, sample in enumerate(self.samples):
            if not sample.done:
                self.pending[row] += self.decoders[row].flush()
                self._finish(row, "length", flush=False)

    def _out(self, row: int, text: str) -> None:
        if text:
            self.samples[row].text += text
            if self.on_text is not None:
                self.on_text(row, text)


def generate(
    model: Model,
    prompt_ids: Sequence[int],
    *,
    max_tokens: int = 256,
    sampler: Sampler | None = None,
    seed: int = 0,
    num_samples: int = 1,
    stop: Sequence[str] = (),
    context: Context | None = None,
    on_text: Callable[[int, str], None] | None = None,
) -> Generation:
    """Samples `num_samples` continuations of context + prompt as one batch.

    on_text(row, text) receives text as soon as it is final (never half a character,
    never the start of a stop string that may still complete).
    """
    sampler = sampler or Sampler()
    if model.tokenizer is None:
        raise InputError("this model has no tokenizer: generation needs one")
    if max_tokens < 0:
        raise InputError(f"max-tokens must be >= 0, got {max_tokens}")
    if num_samples < 1:
        raise InputError(f"num-samples must be >= 1, got {num_samples}")
    started = time.perf_counter()
    context = context or Context.start(model, 1)
    if context.state.batch_size != 1:
        raise InputError("generation continues a single context (batch size 1)")
    prompt = np.asarray(list(prompt_ids), np.int32)
    if len(prompt):
        _, context = score_ids(model, prompt, context)
    prompt_done = time.perf_counter()

    state = jax.tree_util.tree_map(
        lambda x: jnp.repeat(x, num_samples, axis=0), context.state
    )  # one row per sample
    token = jnp.full([num_samples], int(context.last_token[0]), jnp.int32)
    rows = _TextRows(model, num_samples, model.tokenizer.eos_id, stop, on_text)
    count = 0
    if max_tokens:
        _SINK.append(rows)
        try:
            state, token, count = decode_loop(
                model.config, model.params, state, token, jax.random.PRNGKey(seed),
                jnp.asarray(max_tokens, jnp.int32), sampler,
            )  # fmt: skip
            count = int(count)
        finally:
            _SINK.pop()
    if rows.error is not None:
        raise rows.error
    rows.finish_all()
    finished = time.perf_counter()
    first = rows.first_token_at or finished
    return Generation(
        samples=rows.samples,
        context=Context(state=state, last_token=np.asarray(token), tokens=context.tokens + count),
        prompt_tokens=len(prompt),
        prompt_seconds=first - started if max_tokens else prompt_done - started,
        generated_tokens=count * num_samples,
        generate_seconds=max(finished - first, 1e-9),
        seed=seed,
    )
