"""Decoding: compiled loops that feed each sampled token back as a block of length 1
(docs/DESIGN.md section 7).

Block-length invariance (docs/DESIGN.md invariant 3) makes this exact: the log-probs the
sampler sees are those that scoring the finished text gives (invariant 6). Tokens are
sampled in chunks by one compiled `jax.lax.while_loop` (no Python per token); between
chunks the host streams the text and applies stop strings. The first chunk is one
token, so the first text appears at once, and chunks then double up to `CHUNK`.
The attention memory lives in a ring during decoding (tvq.ring): each token is written
in place, and its cost does not depend on the position. The network pass per token
is `Transformer.step`.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from tvq.devices import mesh_for_rows, replicated, split_rows
from tvq.errors import InputError
from tvq.forward import on_device
from tvq.model import Model
from tvq.ring import RingState, empty_rings, model_from_ring, model_to_ring, repeat_rows
from tvq.sampling import Sampler
from tvq.scoring import Context, require_tokenizer, score_ids
from tvq.tokenizer import StreamDecoder
from tvq.transformer import Transformer

CHUNK = 32  # most tokens sampled per compiled call


@flax.struct.dataclass
class DecodeCarry:
    """The state of the compiled sampling loop, B rows."""

    step: jax.Array  # [] int32: steps taken in this chunk
    rings: tuple[RingState, ...]  # one per sublayer
    token: jax.Array  # [B] int32: the last token, next input
    key: jax.Array  # PRNG key
    done: jax.Array  # [B] bool: the row has sampled eos_id
    tokens: jax.Array  # [CHUNK, B] int32: sampled (or forced) tokens
    log_probs: jax.Array  # [CHUNK, B] float32: their log-probs
    top_log_probs: jax.Array  # [CHUNK, B, k] float32: the k most likely tokens' log-probs
    top_ids: jax.Array  # [CHUNK, B, k] int32: and their ids


@functools.partial(jax.jit, static_argnames=("config", "sampler", "top_k"))
def decode_chunk(config, params, rings, token, key, n_steps, forced, n_forced, eos_id,
                 sampler: Sampler, top_k: int = 0):  # fmt: skip
    """Samples up to n_steps (≤ CHUNK) tokens after `token` [B], stopping early once every
    row has sampled eos_id. The first n_forced steps take forced [CHUNK, B] instead of
    sampling (to replay a chunk up to a stop string). Log-probs are the model's, before
    the sampler's temperature and truncation (those `tvq score` gives).

    Returns (rings, last token [B], key, tokens [CHUNK, B], log-probs [CHUNK, B], steps,
    the top_k most likely tokens' log-probs [CHUNK, B, top_k] and ids [CHUNK, B, top_k]).
    """
    net = Transformer(config)
    variables = {"params": params}
    tables = net.apply(variables, method=Transformer.tables)
    batch = token.shape[0]

    def cond(c: DecodeCarry):
        return (c.step < n_steps) & ~jnp.all(c.done)

    def body(c: DecodeCarry) -> DecodeCarry:
        rings, log_probs = net.apply(variables, c.token, c.rings, tables, method=Transformer.step)
        key, sub = jax.random.split(c.key)
        new = jnp.where(c.step < n_forced, forced[c.step], sampler.sample(sub, log_probs))
        picked = jnp.take_along_axis(log_probs, new[:, None], axis=-1)[:, 0]
        top_values, top_ids = jax.lax.top_k(log_probs, top_k)
        return DecodeCarry(
            step=c.step + 1, rings=rings, token=new, key=key, done=c.done | (new == eos_id),
            tokens=c.tokens.at[c.step].set(new), log_probs=c.log_probs.at[c.step].set(picked),
            top_log_probs=c.top_log_probs.at[c.step].set(top_values),
            top_ids=c.top_ids.at[c.step].set(top_ids.astype(jnp.int32)),
        )  # fmt: skip

    init = DecodeCarry(
        step=jnp.zeros([], jnp.int32), rings=rings, token=token, key=key,
        done=jnp.zeros([batch], jnp.bool_), tokens=jnp.zeros([CHUNK, batch], jnp.int32),
        log_probs=jnp.zeros([CHUNK, batch], jnp.float32),
        top_log_probs=jnp.zeros([CHUNK, batch, top_k], jnp.float32),
        top_ids=jnp.zeros([CHUNK, batch, top_k], jnp.int32),
    )  # fmt: skip
    c = jax.lax.while_loop(cond, body, init)
    return c.rings, c.token, c.key, c.tokens, c.log_probs, c.step, c.top_log_probs, c.top_ids


@functools.partial(jax.jit, static_argnames=("config",))
def _ring_to_state(config, params, rings):
    net = Transformer(config)
    return model_from_ring(rings, net.apply({"params": params}, method=Transformer.tables))


_state_to_ring = jax.jit(model_to_ring)
_repeat_rows = jax.jit(repeat_rows, static_argnames=("n",))


def _chunk(model: Model, rings, token, key, n_steps, forced, n_forced, eos_id, sampler,
           mesh: Mesh | None = None, params: Any = None, top_k: int = 0):  # fmt: skip
    """decode_chunk, always called in one form: jit keys its compiled code on which
    arguments are positional and which keyword, and on whether arrays are committed
    (tvq.forward.on_device); a second form would compile the loop again. With a mesh the
    rows are split over its devices (`params` replicated on them)."""
    if mesh is None:
        rings, token, key, forced = on_device((rings, token, key, forced))
        params = model.params
    else:
        rings, token = split_rows(mesh, (rings, token))
        key, forced = replicated(mesh, (key, forced))
    return decode_chunk(model.config, params, rings, token, key, n_steps, forced,
                        n_forced, eos_id, sampler=sampler, top_k=top_k)  # fmt: skip


def _feed(model: Model, rings, token, ids: np.ndarray, sampler: Sampler, top_k: int = 0):
    """Feeds ids [T] after `token` through the decoding loop (every step forced), CHUNK
    at a time; the same compiled loop as sampling (top_k too), so no other length gets
    compiled."""
    key = jax.random.PRNGKey(0)  # unused: nothing is sampled
    for start in range(0, len(ids), CHUNK):
        piece = ids[start : start + CHUNK]
        forced = np.zeros([CHUNK, 1], np.int32)
        forced[: len(piece), 0] = piece
        rings, token, *_ = _chunk(model, rings, token, key, len(piece), forced, len(piece),
                                  eos_id=-1, sampler=sampler, top_k=top_k)  # fmt: skip
    return rings, token


@dataclasses.dataclass
class Sample:
    text: str = ""
    ids: list[int] = dataclasses.field(default_factory=list)
    log_probs: list[float] = dataclasses.field(default_factory=list)
    # per token, with generate(logprobs=k): the k most likely (id, log-prob), likeliest first
    top_logprobs: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)
    finish_reason: str = "length"  # "length", "eos", "stop" or "cancelled"
    done: bool = False


@dataclasses.dataclass
class Generation:
    samples: list[Sample]
    prompt_tokens: int
    prompt_seconds: float
    generated_tokens: int
    generate_seconds: float
    seed: int
    resume: Callable[[], Context] = dataclasses.field(repr=False, compare=False)
    devices: int = 1  # the rows were split over this many devices

    @functools.cached_property
    def context(self) -> Context:
        """Continues after the last sampled token (sample 0's row first); built on first
        use, since most callers never need it."""
        return self.resume()


class _TextRows:
    """Host side of the loop: decodes each row, applies stop strings, streams row 0."""

    def __init__(self, tokenizer, n, stop, on_text, ignore_eos=False):
        self.samples = [Sample() for _ in range(n)]
        self.decoders = [StreamDecoder(tokenizer) for _ in range(n)]
        self.pending = [""] * n  # decoded text not yet released (may begin a stop string)
        self.eos_id, self.stop, self.on_text = tokenizer.eos_id, [s for s in stop if s], on_text
        self.ignore_eos = ignore_eos
        self.first_token_at: float | None = None

    def take(self, tokens, log_probs, top_log_probs, top_ids) -> bool:
        """One sampled token per row (and its row's top-k [B, k]); True once every row
        has finished."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        for row, sample in enumerate(self.samples):
            if sample.done:
                continue
            token = int(tokens[row])
            sample.ids.append(token)
            sample.log_probs.append(float(log_probs[row]))
            if top_ids.shape[-1]:
                pairs = zip(top_ids[row].tolist(), top_log_probs[row].tolist(), strict=True)
                sample.top_logprobs.append(list(pairs))
            if token == self.eos_id:
                if not self.ignore_eos:
                    self._finish(row, "eos")
                continue  # an end of document has no text
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

    def cancel_all(self) -> None:
        for row, sample in enumerate(self.samples):
            if not sample.done:
                self._finish(row, "cancelled")

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
    ignore_eos: bool = False,
    devices: int | None = None,
    logprobs: int = 0,
    should_stop: Callable[[], bool] | None = None,
) -> Generation:
    """Samples `num_samples` continuations of context + prompt as one batch; a row ends
    at an end-of-document token unless ignore_eos (then only max_tokens and stop end it).
    The rows are split over the local devices (at most `devices`; as many as divide
    num_samples); the samples do not depend on how many.

    on_text(row, text) receives text as soon as it is final (never half a character,
    never the start of a stop string that may still complete). logprobs k > 0 also
    keeps, per sampled token, the k most likely tokens with their log-probs
    (Sample.top_logprobs), found inside the compiled loop. should_stop() is asked
    between chunks (at most CHUNK tokens apart): True ends every row there, with
    finish_reason "cancelled" (a client that went away).
    """
    sampler = sampler or Sampler()
    tokenizer = require_tokenizer(model)
    if max_tokens < 0:
        raise InputError(f"max-tokens must be >= 0, got {max_tokens}")
    if num_samples < 1:
        raise InputError(f"num-samples must be >= 1, got {num_samples}")
    if not isinstance(logprobs, int) or isinstance(logprobs, bool) or \
            not 0 <= logprobs <= model.config.n_vocab:  # fmt: skip
        raise InputError(f"logprobs must be between 0 and the vocabulary size "
                         f"{model.config.n_vocab}, got {logprobs!r}")  # fmt: skip
    started = time.perf_counter()
    fresh = context is None
    context = context or Context.start(model, 1)
    if context.state.batch_size != 1:
        raise InputError("generation continues a single context (batch size 1)")
    prompt = np.asarray(list(prompt_ids), np.int32)
    # Whole blocks of the prompt go through the blockwise forward; what is left (less
    # than a block) through the decoding loop, which is compiled anyway: an odd prompt
    # length then costs no compilation of its own.
    whole = len(prompt) - len(prompt) % model.block_len if max_tokens else len(prompt)
    if whole:
        _, context = score_ids(model, prompt[:whole], context)
    if not max_tokens:
        done = time.perf_counter()
        return Generation(
            samples=[Sample() for _ in range(num_samples)], prompt_tokens=len(prompt),
            prompt_seconds=done - started, generated_tokens=0, generate_seconds=1e-9,
            seed=seed, resume=lambda: _repeat_context(context, num_samples),
        )  # fmt: skip

    rings = empty_rings(model.config, 1) if fresh and not whole else _state_to_ring(context.state)
    token = jnp.asarray(context.last_token, jnp.int32)
    rings, token = _feed(model, rings, token, prompt[whole:], sampler, logprobs)
    if num_samples > 1:
        rings, token = _repeat_rows(rings, n=num_samples), jnp.repeat(token, num_samples)
    mesh = mesh_for_rows(num_samples, devices)
    params = replicated(mesh, model.params) if mesh is not None else None
    rows = _TextRows(tokenizer, num_samples, stop, on_text, ignore_eos)
    eos_id = -1 if tokenizer.eos_id is None or ignore_eos else tokenizer.eos_id
    key = jax.random.PRNGKey(seed)
    no_forcing = np.zeros([CHUNK, num_samples], np.int32)
    count, chunk, finished = 0, 1, False
    while count < max_tokens and not finished:
        if should_stop is not None and should_stop():
            rows.cancel_all()
            break
        steps = min(chunk, max_tokens - count)
        before = (rings, token, key)
        rings, token, key, tokens, log_probs, sampled, top_values, top_ids = _chunk(
            model, rings, token, key, steps, no_forcing, 0, eos_id, sampler, mesh, params,
            logprobs,
        )  # fmt: skip
        tokens, log_probs, sampled = np.asarray(tokens), np.asarray(log_probs), int(sampled)
        top_values, top_ids = np.asarray(top_values), np.asarray(top_ids)
        used = 0
        while used < sampled and not finished:
            finished = rows.take(tokens[used], log_probs[used], top_values[used], top_ids[used])
            used += 1
        if used < sampled:  # a stop string ended it mid-chunk: state after `used` tokens
            rings, token, *_ = _chunk(model, *before, used, tokens, used, eos_id, sampler,
                                      mesh, params, logprobs)  # fmt: skip
        count += used
        chunk = min(2 * chunk, CHUNK)
    rows.finish_all()
    finished_at = time.perf_counter()
    first = rows.first_token_at or finished_at
    tokens_before = context.tokens + len(prompt) - whole

    def resume() -> Context:
        state = _ring_to_state(model.config, model.params, on_device(rings))
        return Context(state=state, last_token=np.asarray(token), tokens=tokens_before + count)

    return Generation(
        samples=rows.samples,
        prompt_tokens=len(prompt),
        prompt_seconds=first - started,
        generated_tokens=count * num_samples,
        generate_seconds=max(finished_at - first, 1e-9),
        seed=seed,
        resume=resume,
        devices=mesh.size if mesh is not None else 1,
    )


def _repeat_context(context: Context, n: int) -> Context:
    if n == 1:
        return context
    state = jax.tree_util.tree_map(lambda x: jnp.repeat(x, n, axis=0), context.state)
    return Context(state=state, last_token=np.repeat(context.last_token, n), tokens=context.tokens)
