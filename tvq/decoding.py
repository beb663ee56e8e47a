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

from tvq import warm
from tvq.devices import mesh_for_rows, replicated, split_rows
from tvq.errors import InputError
from tvq.forward import on_device
from tvq.model import Model, check_top_k
from tvq.ring import RingState, empty_rings, model_from_ring, model_to_ring, repeat_rows
from tvq.sampling import Sampler, row_uniforms
from tvq.scoring import Context, eos_id, require_tokenizer, score_ids
from tvq.tokenizer import StreamDecoder
from tvq.transformer import Transformer

CHUNK = 32  # most tokens sampled per compiled call


@flax.struct.dataclass
class DecodeCarry:
    """The state of the compiled sampling loop, B rows."""

    step: jax.Array  # [] int32: steps taken in this chunk
    rings: tuple[RingState, ...]  # one per sublayer
    token: jax.Array  # [B] int32: the last token, next input
    done: jax.Array  # [B] bool: the row has sampled eos_id
    tokens: jax.Array  # [CHUNK, B] int32: sampled (or forced) tokens
    log_probs: jax.Array  # [CHUNK, B] float32: their log-probs
    top_log_probs: jax.Array  # [CHUNK, B, k] float32: the k most likely tokens' log-probs
    top_ids: jax.Array  # [CHUNK, B, k] int32: and their ids


@functools.partial(jax.jit, static_argnames=("config", "sampler", "top_k"))
def decode_chunk(config, params, rings, token, keys, counts, limits, forced, n_forced, eos_id,
                 sampler: Sampler, top_k: int = 0):  # fmt: skip
    """Samples tokens after `token` [B]: row r takes limits[r] (≤ CHUNK) steps or stops
    at eos_id; the loop ends when every row has. Row r's k-th token of its text is drawn
    with the key fold_in(keys[r], k), k = counts[r] + step, so a row's text depends on
    its own key only, never on the rows beside it (tvq.serve batches requests). The first
    n_forced steps take forced [CHUNK, B] instead of sampling (to replay a chunk up to a
    stop string). Log-probs are the model's, before the sampler's temperature and
    truncation (those `tvq score` gives). Every row's state advances every step: a row
    that has stopped keeps going (its later tokens are not used).

    Returns (rings, last token [B], tokens [CHUNK, B], log-probs [CHUNK, B], steps, the
    top_k most likely tokens' log-probs [CHUNK, B, top_k] and ids [CHUNK, B, top_k]).
    """
    net = Transformer(config)
    variables = {"params": params}
    tables = net.apply(variables, method=Transformer.tables)
    batch = token.shape[0]
    # Every step's random numbers [CHUNK, B], drawn before the loop: XLA:CPU runs the
    # threefry hash as small loops of its own, which cost more per step than the draw.
    steps = jnp.arange(CHUNK, dtype=jnp.int32)[:, None]
    step_keys = jax.vmap(jax.vmap(jax.random.fold_in), (None, 0))(keys, counts + steps)
    uniforms = jax.vmap(row_uniforms)(step_keys)  # [CHUNK, B]

    def cond(c: DecodeCarry):
        return jnp.any((c.step < limits) & ~c.done)

    def body(c: DecodeCarry) -> DecodeCarry:
        rings, log_probs = net.apply(variables, c.token, c.rings, tables, method=Transformer.step)
        sampled = sampler.pick(uniforms[c.step], log_probs)
        new = jnp.where(c.step < n_forced, forced[c.step], sampled)
        live = (c.step < limits) & ~c.done
        picked = jnp.take_along_axis(log_probs, new[:, None], axis=-1)[:, 0]
        top_values, top_ids = jax.lax.top_k(log_probs, top_k)
        return DecodeCarry(
            step=c.step + 1, rings=rings, token=new, done=c.done | (live & (new == eos_id)),
            tokens=c.tokens.at[c.step].set(new), log_probs=c.log_probs.at[c.step].set(picked),
            top_log_probs=c.top_log_probs.at[c.step].set(top_values),
            top_ids=c.top_ids.at[c.step].set(top_ids.astype(jnp.int32)),
        )  # fmt: skip

    init = DecodeCarry(
        step=jnp.zeros([], jnp.int32), rings=rings, token=token,
        done=jnp.zeros([batch], jnp.bool_), tokens=jnp.zeros([CHUNK, batch], jnp.int32),
        log_probs=jnp.zeros([CHUNK, batch], jnp.float32),
        top_log_probs=jnp.zeros([CHUNK, batch, top_k], jnp.float32),
        top_ids=jnp.zeros([CHUNK, batch, top_k], jnp.int32),
    )  # fmt: skip
    c = jax.lax.while_loop(cond, body, init)
    return c.rings, c.token, c.tokens, c.log_probs, c.step, c.top_log_probs, c.top_ids


@functools.partial(jax.jit, static_argnames=("config",))
def _ring_to_state(config, params, rings):
    net = Transformer(config)
    return model_from_ring(rings, net.apply({"params": params}, method=Transformer.tables))


_state_to_ring = jax.jit(model_to_ring)
_repeat_rows = jax.jit(repeat_rows, static_argnames=("n",))


def _chunk(model: Model, rings, token, keys, counts, limits, forced, n_forced, eos_id,
           sampler, mesh: Mesh | None = None, params: Any = None, top_k: int = 0):  # fmt: skip
    """decode_chunk, always called in one form: jit keys its compiled code on which
    arguments are positional and which keyword, and on whether arrays are committed
    (tvq.forward.on_device); a second form would compile the loop again. With a mesh the
    rows are split over its devices (`params` replicated on them)."""
    counts, limits = np.asarray(counts, np.int32), np.asarray(limits, np.int32)
    if mesh is None:
        rings, token, keys, counts, limits, forced = on_device(
            (rings, token, keys, counts, limits, forced)
        )
        params = model.params
    else:
        rings, token, keys, counts, limits = split_rows(mesh, (rings, token, keys, counts, limits))
        forced = replicated(mesh, forced)
    return warm.call(decode_chunk, ("config", "sampler", "top_k"), model.config, params, rings,
                     token, keys, counts, limits, forced, n_forced, eos_id, sampler=sampler,
                     top_k=top_k)  # fmt: skip


def _feed(model: Model, rings, token, ids: np.ndarray, sampler: Sampler, top_k: int = 0):
    """Feeds ids [B, T] after `token` [B] through the decoding loop (every step forced),
    CHUNK at a time; the same compiled loop as sampling (top_k too), so no other length
    gets compiled. Returns (rings, last token, scored): scored holds the log-probs of the
    ids [B, T] and, with top_k, the k most likely tokens' log-probs and ids [B, T, k]."""
    batch, length = ids.shape
    keys = row_keys(0, batch)  # unused: nothing is sampled
    parts = []
    for start in range(0, length, CHUNK):
        piece = ids[:, start : start + CHUNK]
        n = piece.shape[1]
        forced = np.zeros([CHUNK, batch], np.int32)
        forced[:n] = piece.T
        rings, token, _, log_probs, _, top_values, top_ids = _chunk(
            model, rings, token, keys, np.zeros(batch), np.full(batch, n), forced, n,
            eos_id=-1, sampler=sampler, top_k=top_k,
        )  # fmt: skip
        parts.append((log_probs[:n].T, top_values[:n].swapaxes(0, 1), top_ids[:n].swapaxes(0, 1)))
    scored = [jnp.concatenate(p, axis=1) for p in zip(*parts, strict=True)]
    return rings, token, tuple(scored if top_k else scored[:1])


def feed_ids(model: Model, state, token, ids: np.ndarray, top_k: int = 0):
    """Scores ids [B, T] following `token` [B] from `state` (a ModelState) through the
    decoding loop → (scored as _feed's, the state after). tvq.scoring sends each text's
    tail shorter than a block this way: one compiled loop serves every tail length,
    where the blockwise forward compiles one program per length."""
    rings = _state_to_ring(on_device(state))
    token = jnp.asarray(token, jnp.int32)
    rings, _, scored = _feed(model, rings, token, ids, Sampler(temperature=0), top_k)
    return scored, _ring_to_state(model.config, model.params, on_device(rings))


def row_keys(seed: int, n: int) -> np.ndarray:
    """The keys of n samples of one text [n, 2]: sample i draws from fold_in(key(seed), i)."""
    return np.asarray(warm.call(_fold_keys, (), seed_key(seed), np.arange(n, dtype=np.int32)))


def seed_key(seed: int) -> np.ndarray:
    """jax.random.PRNGKey(seed)'s data, made on the host when that is plain: with the
    default threefry keys and 32-bit integers it is [0, seed mod 2**32] (held equal by
    tests/test_sampling.py); no XLA program runs for it at start-up."""
    if jax.config.jax_enable_x64 or jax.config.jax_default_prng_impl != "threefry2x32":
        return np.asarray(jax.random.PRNGKey(seed))
    return np.array([0, seed % 2**32], np.uint32)


@jax.jit
def _fold_keys(key: jax.Array, rows: jax.Array) -> jax.Array:
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, rows)


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

    def __init__(self, tokenizer, stops, on_text, ignore_eos=False):
        """stops: each row's stop strings (one list per row)."""
        n = len(stops)
        self.samples = [Sample() for _ in range(n)]
        self.decoders = [StreamDecoder(tokenizer) for _ in range(n)]
        self.pending = [""] * n  # decoded text not yet released (may begin a stop string)
        self.stops = [[s for s in row if s] for row in stops]
        self.eos_id, self.on_text = tokenizer.eos_id, on_text
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
        for stop in self.stops[row]:
            at = text.find(stop)
            if at >= 0:
                self.pending[row] = text[:at]
                self._finish(row, "stop", flush=False)
                return
        hold = max((k for s in self.stops[row] for k in range(1, len(s)) if text.endswith(s[:k])),
                   default=0)  # fmt: skip
        self._out(row, text[: len(text) - hold])
        self.pending[row] = text[len(text) - hold :]

    def _finish(self, row: int, reason: str, flush: bool = True) -> None:
        tail = self.pending[row] + (self.decoders[row].flush() if flush else "")
        self._out(row, tail)
        self.pending[row] = ""
        self.samples[row].finish_reason = reason
        self.samples[row].done = True

    def cancel(self, mask) -> None:
        """Ends the rows where mask [B] is true (their clients went away)."""
        for row, sample in enumerate(self.samples):
            if mask[row] and not sample.done:
                self._finish(row, "cancelled")

    def finish_at(self, row: int) -> None:
        """Ends the row, if it is running, as "length" (its max_tokens, or the end)."""
        if not self.samples[row].done:
            self.pending[row] += self.decoders[row].flush()
            self._finish(row, "length", flush=False)

    @property
    def all_done(self) -> bool:
        return all(s.done for s in self.samples)

    def finish_all(self) -> None:
        for row in range(len(self.samples)):
            self.finish_at(row)

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
    check_top_k(logprobs, model.config.n_vocab, "logprobs")
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

    rings, token = _prefill(model, context, prompt[whole:], fresh and not whole, sampler, logprobs)
    if num_samples > 1:
        rings, token = _repeat_rows(rings, n=num_samples), jnp.repeat(token, num_samples)
    mesh = mesh_for_rows(num_samples, devices)
    params = replicated(mesh, model.params) if mesh is not None else None
    rows = _TextRows(tokenizer, [list(stop)] * num_samples, on_text, ignore_eos)
    eos_id = -1 if tokenizer.eos_id is None or ignore_eos else tokenizer.eos_id
    rings, token, count = _sample_loop(
        model, rings, token, rows, row_keys(seed, num_samples), np.full(num_samples, max_tokens),
        sampler, logprobs, eos_id, should_stop, mesh, params, keep_state=True,
    )  # fmt: skip
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


@dataclasses.dataclass(frozen=True)
class Request:
    """One text's share of a batch (generate_batch), from the start of a document."""

    prompt_ids: Sequence[int]
    max_tokens: int = 256
    seed: int = 0
    num_samples: int = 1
    stop: Sequence[str] = ()


def generate_batch(
    model: Model,
    requests: Sequence[Request],
    *,
    sampler: Sampler | None = None,
    logprobs: int = 0,
    ignore_eos: bool = False,
    on_text: Callable[[int, int, str], None] | None = None,
    should_stop: Callable[[], Sequence[bool]] | None = None,
) -> list[list[Sample]]:
    """Samples the continuations of several texts at once: every request's rows share
    one compiled decoding loop (tvq serve batches concurrent requests so). Each request
    gets the samples generate() gives it alone with its seed: a row draws from its own
    keys, and rows of texts at different positions run side by side. The batch is
    padded to a power of two rows, so few shapes ever compile.

    on_text(request, sample, text) streams text; should_stop() → one bool per request
    (its client went away) is asked between chunks. Returns the samples per request."""
    sampler = sampler or Sampler()
    tokenizer = require_tokenizer(model)
    owners = [(i, j) for i, r in enumerate(requests) for j in range(r.num_samples)]
    size = 1 << max(0, len(owners) - 1).bit_length()  # rows, padded to a power of two
    parts, keys, limits, stops = [], [], [], []
    for r in requests:
        prompt = np.asarray(list(r.prompt_ids), np.int32)
        whole = len(prompt) - len(prompt) % model.block_len
        context = Context.start(model, 1)
        if whole:
            _, context = score_ids(model, prompt[:whole], context)
        rings, token = _prefill(model, context, prompt[whole:], not whole, sampler, logprobs)
        parts.append((_repeat_rows(rings, n=r.num_samples), jnp.repeat(token, r.num_samples)))
        keys.append(row_keys(r.seed, r.num_samples))
        limits += [r.max_tokens] * r.num_samples
        stops += [list(r.stop)] * r.num_samples
    padding = size - len(owners)
    if padding:  # rows of an empty text that never sample
        parts.append((empty_rings(model.config, padding),
                      jnp.full([padding], eos_id(model), jnp.int32)))  # fmt: skip
        keys.append(row_keys(0, padding))
        limits += [0] * padding
        stops += [[]] * padding
    rings = jax.tree_util.tree_map(lambda *a: jnp.concatenate(a, axis=0), *[p[0] for p in parts])
    token = jnp.concatenate([p[1] for p in parts])

    def row_text(row: int, text: str) -> None:
        if on_text is not None and row < len(owners):
            on_text(*owners[row], text)

    def rows_to_stop():
        stopped = list(should_stop())
        return [stopped[i] for i, _ in owners] + [True] * padding

    rows = _TextRows(tokenizer, stops, row_text, ignore_eos)
    end_id = -1 if tokenizer.eos_id is None or ignore_eos else tokenizer.eos_id
    mesh = mesh_for_rows(size, None)
    params = replicated(mesh, model.params) if mesh is not None else None
    _sample_loop(model, rings, token, rows, np.concatenate(keys), np.asarray(limits), sampler,
                 logprobs, end_id, rows_to_stop if should_stop else None, mesh, params,
                 keep_state=False)  # fmt: skip
    rows.finish_all()
    out: list[list[Sample]] = [[] for _ in requests]
    for row, (i, _) in enumerate(owners):
        out[i].append(rows.samples[row])
    return out


def _prefill(model: Model, context: Context, rest: np.ndarray, fresh: bool, sampler: Sampler,
             logprobs: int):  # fmt: skip
    """The rings of one text after `context` and then `rest` (less than a block), fed
    through the decoding loop → (rings, last token)."""
    rings = empty_rings(model.config, 1) if fresh else _state_to_ring(context.state)
    token = jnp.asarray(context.last_token, jnp.int32)
    rings, token, _ = _feed(model, rings, token, rest[None, :], sampler, logprobs)
    return rings, token


def _sample_loop(model: Model, rings, token, rows: _TextRows, keys: np.ndarray,
                 max_tokens: np.ndarray, sampler: Sampler, logprobs: int, eos_id: int,
                 should_stop, mesh, params, keep_state: bool):  # fmt: skip
    """Samples every row until it ends (end of document, a stop string, its max_tokens,
    or should_stop() true for it: a bool, or one per row) in chunks of 1, 2, 4, … up to
    CHUNK tokens → (rings, last token, tokens taken). keep_state: the rings are the
    state after the last token taken even when a stop string ended the last row
    mid-chunk (that chunk is replayed up to it)."""
    batch = len(max_tokens)
    no_forcing = np.zeros([CHUNK, batch], np.int32)
    count, chunk = 0, 1
    for row in np.flatnonzero(max_tokens <= 0):
        rows.finish_at(int(row))
    while not rows.all_done:
        if should_stop is not None:
            rows.cancel(np.broadcast_to(should_stop(), [batch]))
            if rows.all_done:
                break
        done = np.array([s.done for s in rows.samples])
        limits = np.where(done, 0, np.clip(max_tokens - count, 0, chunk))
        before = (rings, token)
        rings, token, tokens, log_probs, sampled, top_values, top_ids = _chunk(
            model, rings, token, keys, np.full(batch, count), limits, no_forcing, 0, eos_id,
            sampler, mesh, params, logprobs,
        )  # fmt: skip
        tokens, log_probs, sampled = np.asarray(tokens), np.asarray(log_probs), int(sampled)
        top_values, top_ids = np.asarray(top_values), np.asarray(top_ids)
        used = 0
        while used < sampled and not rows.all_done:
            rows.take(tokens[used], log_probs[used], top_values[used], top_ids[used])
            used += 1
            for row in np.flatnonzero(max_tokens == count + used):
                rows.finish_at(int(row))
        if keep_state and used < sampled:  # a stop string ended it mid-chunk
            rings, token, *_ = _chunk(model, *before, keys, np.full(batch, count),
                                      np.full(batch, used), tokens, used, eos_id, sampler,
                                      mesh, params, logprobs)  # fmt: skip
        count += used
        chunk = min(2 * chunk, CHUNK)
    return rings, token, count


def _repeat_context(context: Context, n: int) -> Context:
    if n == 1:
        return context
    state = jax.tree_util.tree_map(lambda x: jnp.repeat(x, n, axis=0), context.state)
    return Context(state=state, last_token=np.repeat(context.last_token, n), tokens=context.tokens)
