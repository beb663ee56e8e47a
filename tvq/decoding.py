"""Decoding: compiled loops that feed each sampled token back as a block of length 1.

Block-length invariance (DESIGN.md invariant 3) makes this exact: the log-probs the
sampler sees are those that scoring the finished text gives (invariant 6). Tokens are
sampled in chunks by one compiled `jax.lax.while_loop` (no Python per token); between
chunks the host streams the text and applies stop strings. The first chunk is one
token, so the first text appears at once, and chunks then double up to `CHUNK`.
The attention memory lives in a ring during decoding (tvq.ring): each token is written
in place, and its cost does not depend on the position.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tvq.errors import InputError
from tvq.model import TRACE_COUNTS, Model
from tvq.ring import model_from_ring, model_step, model_to_ring
from tvq.sampling import Sampler
from tvq.scoring import Context, score_ids
from tvq.tokenizer import StreamDecoder
from tvq.transformer import Transformer

CHUNK = 32  # most tokens sampled per compiled call


@functools.partial(jax.jit, static_argnames=("config", "sampler"))
def decode_chunk(config, params, rings, token, key, n_steps, forced, n_forced, eos_id,
                 sampler: Sampler):  # fmt: skip
    """Samples up to n_steps (≤ CHUNK) tokens after `token` [B], stopping early once every
    row has sampled eos_id. The first n_forced steps take forced [CHUNK, B] instead of
    sampling (to replay a chunk up to a stop string).

    Returns (rings, last token [B], key, tokens [CHUNK, B], log-probs [CHUNK, B], steps).
    """
    TRACE_COUNTS["decode"] += 1
    net = Transformer(config)
    variables = {"params": params}
    tables = net.apply(variables, method=Transformer.tables)
    batch = token.shape[0]

    def cond(carry):
        step, done = carry[0], carry[4]
        return (step < n_steps) & ~jnp.all(done)

    def body(carry):
        step, rings, token, key, done, tokens, log_probs = carry
        rings, step_log_probs = net.apply(variables, token, rings, tables, method=model_step)
        key, sub = jax.random.split(key)
        new = jnp.where(step < n_forced, forced[step], sampler.sample(sub, step_log_probs))
        picked = jnp.take_along_axis(step_log_probs, new[:, None], axis=-1)[:, 0]
        return (
            step + 1, rings, new, key, done | (new == eos_id),
            tokens.at[step].set(new), log_probs.at[step].set(picked),
        )  # fmt: skip

    init = (
        jnp.zeros([], jnp.int32), rings, token, key, jnp.zeros([batch], jnp.bool_),
        jnp.zeros([CHUNK, batch], jnp.int32), jnp.zeros([CHUNK, batch], jnp.float32),
    )  # fmt: skip
    steps, rings, token, key, _, tokens, log_probs = jax.lax.while_loop(cond, body, init)
    return rings, token, key, tokens, log_probs, steps


@functools.partial(jax.jit, static_argnames=("config",))
def _ring_to_state(config, params, rings):
    net = Transformer(config)
    return model_from_ring(rings, net.apply({"params": params}, method=Transformer.tables))


_state_to_ring = jax.jit(model_to_ring)


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

    def take(self, tokens, log_probs) -> bool:
        """One sampled token per row; True once every row has finished."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        return self._take(tokens, log_probs)

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
    eos_id = -1 if model.tokenizer.eos_id is None else model.tokenizer.eos_id
    count = 0
    if max_tokens:
        rings = _state_to_ring(state)
        key = jax.random.PRNGKey(seed)
        no_forcing = jnp.zeros([CHUNK, num_samples], jnp.int32)
        chunk = 1
        finished = False
        while count < max_tokens and not finished:
            steps = min(chunk, max_tokens - count)
            run = functools.partial(decode_chunk, model.config, model.params, key=key,
                                    eos_id=eos_id, sampler=sampler)  # fmt: skip
            before = (rings, token)
            rings, token, key, tokens, log_probs, sampled = run(
                rings, token, n_steps=steps, forced=no_forcing, n_forced=0
            )
            tokens, log_probs, sampled = np.asarray(tokens), np.asarray(log_probs), int(sampled)
            used = 0
            while used < sampled and not finished:
                finished = rows.take(tokens[used], log_probs[used])
                used += 1
            if used < sampled:  # a stop string ended it mid-chunk: state after `used` tokens
                rings, token, *_ = run(
                    *before, n_steps=used, forced=jnp.asarray(tokens), n_forced=used
                )
            count += used
            chunk = min(2 * chunk, CHUNK)
        state = _ring_to_state(model.config, model.params, rings)
    rows.finish_all()
    finished_at = time.perf_counter()
    first = rows.first_token_at or finished_at
    return Generation(
        samples=rows.samples,
        context=Context(state=state, last_token=np.asarray(token), tokens=context.tokens + count),
        prompt_tokens=len(prompt),
        prompt_seconds=first - started if max_tokens else prompt_done - started,
        generated_tokens=count * num_samples,
        generate_seconds=max(finished_at - first, 1e-9),
        seed=seed,
    )
