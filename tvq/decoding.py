"""Decoding: compiled loops that feed each sampled token back as a block of length 1
(docs/DESIGN.md section 7).

Block-length invariance (docs/DESIGN.md invariant 3) makes this exact: the log-probs the
sampler sees are those that scoring the finished text gives (invariant 6). Tokens are
sampled in chunks by one compiled `jax.lax.while_loop` (no Python per token); between
chunks the host releases the text and applies stop strings. The first chunk is one
token, so the first text appears at once, and chunks then double up to `CHUNK`.
(Over 400 lines: the sample loop's speculation under a constraint lives beside the
loop it changes, section 7.)
The attention memory lives in a ring during decoding (tvq.nn.ring): each token is written
in place, and its cost does not depend on the position. The compiled loop itself, whose
network pass per token is `Transformer.step`, is tvq/runtime/decode_loop.py; this module is the
host side: prompts, sample rows, stop strings, and the stream of events.

The primitive is a generator, as mlx-lm's `stream_generate`: `stream_generate` yields a
`Piece` of text (with its tokens and log-probs) as soon as it is final, then the
`Generation` (each sample's finish_reason, the usage and timings); `generate` is a loop
over it. Closing the stream cancels it; `GenerationStream.stop` ends it early and still
gives the Generation. A batch of texts (tvq/batching.py) runs the same SampleLoop.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tvq.distributed.devices import mesh_for_rows, replicated
from tvq.errors import InputError
from tvq.nn.ring import empty_rings
from tvq.runtime.context import Context, chunk_len, require_tokenizer, score_ids
from tvq.runtime.decode_loop import (
    CHUNK,
    feed,
    repeat_ring_rows,
    ring_to_state,
    row_keys,
    run_chunk,
    state_to_ring,
)
from tvq.runtime.forward import on_device
from tvq.runtime.model import Model, check_top_k
from tvq.runtime.state_cache import StateCache
from tvq.text.constraints import Constraint, Guides
from tvq.text.rows import Piece, Sample, TextRows
from tvq.text.sampling import Penalties, SamplerRows
from tvq.text.settings import Sampler, check_all, check_stops


@dataclasses.dataclass
class Generation:
    """The end of a generation: the samples (each with its finish_reason), the usage and
    the timings; `context` continues after the last sampled token."""

    samples: list[Sample]
    prompt_tokens: int
    prompt_seconds: float
    generated_tokens: int
    generate_seconds: float
    seed: int
    resume: Callable[[], Context] = dataclasses.field(repr=False, compare=False)
    devices: int = 1  # the rows were split over this many devices
    cached_tokens: int = 0  # prompt tokens not read again: a state cache held them

    @functools.cached_property
    def context(self) -> Context:
        """Continues after the last sampled token (sample 0's row first); built on first
        use, since most callers never need it."""
        return self.resume()


@dataclasses.dataclass
class BatchGeneration:
    """The end of a batch (stream_batch): each prompt's samples, in request order."""

    samples: list[list[Sample]]


Event = Piece | Generation | BatchGeneration


class GenerationStream(Iterator[Event]):
    """The events of a generation: Pieces of final text as they are sampled, then the
    Generation (BatchGeneration for a batch). Closing it (`close`, leaving a `with`
    block, or dropping it) cancels at once: nothing more is computed. `stop()` ends
    every row at the next chunk (at most CHUNK tokens on) with finish_reason
    "cancelled", and the stream still ends with its Generation, whose context continues
    after the tokens sampled; it may be called from another thread or a signal handler."""

    def __init__(self, run: Callable[[GenerationStream], Generator[Event, None, None]]) -> None:
        self._stopping = threading.Event()
        self._events = run(self)

    def __next__(self) -> Event:
        return next(self._events)

    def __enter__(self) -> GenerationStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._events.close()

    def stop(self) -> None:
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()


def check_generation(model: Model, max_tokens: int, seed: int, num_samples: int,
                     logprobs: int, stop: Sequence[str] = ()) -> None:  # fmt: skip
    """A generation's own settings within their ranges (tvq.text.settings), before any
    array is made; SettingError names the first one that is not."""
    check_all(max_tokens=max_tokens, seed=seed, num_samples=num_samples, logprobs=logprobs)
    check_top_k(logprobs, model.config.n_vocab, "logprobs")
    check_stops(stop)


def stream_generate(
    model: Model,
    prompt: Sequence[int] | str,
    *,
    max_tokens: int = 256,
    sampler: Sampler | None = None,
    seed: int = 0,
    num_samples: int = 1,
    stop: Sequence[str] = (),
    context: Context | None = None,
    ignore_eos: bool = False,
    logprobs: int = 0,
    devices: int | None = None,
    alternatives: int | None = None,
    cache: StateCache | None = None,
    constraint: Constraint | None = None,
) -> GenerationStream:
    """Samples `num_samples` continuations of context + prompt (token ids, or text for
    the model's tokenizer) as one batch, yielding each Piece of final text as it is
    sampled and then the Generation. A row ends at an end-of-document token unless
    ignore_eos (then only max_tokens and stop end it). The rows are split over the local
    devices (at most `devices`; as many as divide num_samples); the samples do not
    depend on how many. logprobs k > 0 also keeps, per sampled token, the k most likely
    tokens with their log-probs (Sample.top_logprobs), found inside the compiled loop;
    alternatives (≥ logprobs; default logprobs) is how many the loop finds: a server
    passes its one bound, so every request runs the same program. Every setting is
    checked before anything runs (SettingError). With a cache (and no context: the
    prompt starts a document), the prompt is read from its longest cached prefix, and
    the context after it (and, when the cache keeps completions, after the first
    sample) is kept there (read_prompt). constraint: what every sample's text must
    match (tvq.text.constraints: a JSON schema, a regular expression, a grammar, a
    choice); its rows speculate under a guard (SampleLoop, docs/DESIGN.md section 7)."""
    sampler = sampler or Sampler()
    tokenizer = require_tokenizer(model)
    check_generation(model, max_tokens, seed, num_samples, logprobs, stop)
    if context is not None and context.state.batch_size != 1:
        raise InputError("generation continues a single context (batch size 1)")
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
    prompt_ids = np.asarray(list(ids), np.int32)
    width = logprobs if alternatives is None else max(alternatives, logprobs)

    def run(stream: GenerationStream) -> Generator[Event, None, None]:
        started = time.perf_counter()
        # Whole blocks of the prompt go through the blockwise forward; what is left (less
        # than a block) through the decoding loop, which is compiled anyway: an odd
        # prompt length then costs no compilation of its own.
        after, cached, whole = read_prompt(model, prompt_ids, context, cache,
                                           everything=not max_tokens)  # fmt: skip
        if not max_tokens:
            yield Generation(
                samples=[Sample(done=True) for _ in range(num_samples)],
                prompt_tokens=len(prompt_ids), prompt_seconds=time.perf_counter() - started,
                generated_tokens=0, generate_seconds=1e-9, seed=seed,
                resume=lambda: _repeat_context(after, num_samples), cached_tokens=cached,
            )  # fmt: skip
            return
        fresh = context is None and not whole
        rings, token = prefill_rings(model, after, prompt_ids[whole:], fresh, width)
        # rows padded to a power of two that never sample: a new num_samples compiles
        # nothing new (row i's key is fold_in(key(seed), i) whatever the padding)
        n, size = num_samples, 1 << max(0, num_samples - 1).bit_length()
        if size > 1:
            rings, token = repeat_ring_rows(rings, n=size), jnp.repeat(token, size)
        mesh = mesh_for_rows(size, devices)
        rows = TextRows(tokenizer, [list(stop)] * size, [ignore_eos] * size, [logprobs] * size)
        limits = np.where(np.arange(size) < n, max_tokens, 0)
        guides = Guides(tokenizer, model.config.n_vocab, [constraint] * n + [None] * (size - n))
        loop = SampleLoop(model, rows, row_keys(seed, size), limits,
                           SamplerRows.of([sampler] * size, model.config.n_vocab),
                           Penalties.start(model.config.n_vocab, [prompt_ids.tolist()] * size),
                           width, eos_ids_of(tokenizer, [ignore_eos] * size), mesh,
                           keep_state=True, guides=guides)  # fmt: skip
        rings, token, count = yield from loop.run(rings, token, stream)
        finished_at = time.perf_counter()
        first = rows.first_token_at or finished_at
        tokens_before = after.tokens + len(prompt_ids) - whole

        def resume() -> Context:
            state = ring_to_state(model.config, model.params, on_device(rings))
            state = jax.tree_util.tree_map(lambda a: a[: a.shape[0] // size * n], state)
            return Context(state=state, last_token=np.asarray(token)[:n],
                           tokens=tokens_before + count)  # fmt: skip

        generation = Generation(
            samples=rows.samples[:n], prompt_tokens=len(prompt_ids),
            prompt_seconds=first - started, generated_tokens=count * num_samples,
            generate_seconds=max(finished_at - first, 1e-9), seed=seed, resume=resume,
            devices=mesh.size if mesh is not None else 1, cached_tokens=cached,
        )  # fmt: skip
        if cache is not None and context is None and num_samples == 1 and cache.completions:
            # a chat client sends the model's answer back with its next turn
            cache.put(model, [*prompt_ids.tolist(), *rows.samples[0].ids], generation.context)
        yield generation

    return GenerationStream(run)


def generate(model: Model, prompt: Sequence[int] | str, **options: Any) -> Generation:
    """stream_generate to its end: the Generation (same options)."""
    for event in stream_generate(model, prompt, **options):
        if isinstance(event, Generation):
            return event
    raise AssertionError("a generation stream ends with its Generation")


def read_prompt(model: Model, ids: np.ndarray, context: Context | None,
                cache: StateCache | None, everything: bool = False
                ) -> tuple[Context, int, int]:  # fmt: skip
    """Reads the prompt's whole blocks (everything: all of it) after `context` (None: the
    start of a document) → (the context after them, the tokens a cache held, the tokens
    read in all). With a cache and no context, reading starts from the longest cached
    prefix, one chunk of score_ids at a time (the pieces one call would cut: the same
    numbers), and the context at the end (and after each chunk, if the cache keeps
    those) is kept in the cache."""
    cached, start = 0, context
    if cache is not None and context is None:
        cached, start = cache.longest(model, ids)
    else:
        cache = None
    start = start or Context.start(model, 1)
    rest = len(ids) - cached
    end = len(ids) if everything else cached + rest - rest % model.block_len
    read, after = cached, start
    while read < end:
        step = min(end - read, chunk_len(model.block_len)) if cache is not None else end - read
        after = score_ids(model, ids[read : read + step], after)[1]
        read += step
        if cache is not None and (cache.every_chunk or read == end):
            cache.put(model, ids[:read], after)
    return after, cached, end


def prefill_rings(model: Model, context: Context, rest: np.ndarray, fresh: bool,
                  logprobs: int):  # fmt: skip
    """The rings of one text after `context` and then `rest` (less than a block), fed
    through the decoding loop (the program that samples next: the same top-k) →
    (rings, last token); fresh: nothing read before (empty rings)."""
    rings, token = start_rings(model, context, fresh)
    rings, token, _ = feed(model, rings, token, rest[None, :], logprobs)
    return rings, token


def start_rings(model: Model, context: Context, fresh: bool):
    """The rings and last token of one text after `context` (fresh: nothing read
    before, empty rings)."""
    rings = empty_rings(model.config, 1) if fresh else state_to_ring(context.state)
    return rings, jnp.asarray(context.last_token, jnp.int32)


def eos_ids_of(tokenizer, ignore_eos: list[bool]) -> np.ndarray:
    """Per row, the token that ends it: the end of document, or −1 (none) where it is
    ignored."""
    eos = -1 if tokenizer.eos_id is None else tokenizer.eos_id
    return np.asarray([-1 if ignore else eos for ignore in ignore_eos], np.int32)


class SampleLoop:
    """Samples every row until it ends (end of document, a stop string, its max_tokens,
    or the stream stopped) in chunks of 1, 2, 4, … up to CHUNK tokens, releasing the
    rows' pieces as they come. keep_state: the rings are the state after the last token
    taken even when a stop string ended the last row mid-chunk (that chunk is replayed
    up to it). owners: per row, its (item, sample) in a batch; rows beyond are padding.
    guides: the rows' constraints (tvq.text.constraints). Their rows speculate (docs/
    DESIGN.md section 7): a call samples a chunk, each row's draw outside its guard
    (what its constraint allows at the chunk's start) drawn again under the guard in the
    loop, and the host checks each step (Guides.speculated); where one must be drawn
    again, the next call runs the chunk again from its start, the tokens taken forced,
    and samples on from there under the guard of the mask then. Rows whose penalties
    count tokens take one masked step a call instead."""

    def __init__(self, model: Model, rows: TextRows, keys: np.ndarray, max_tokens: np.ndarray,
                 sampling: SamplerRows, penalties: Penalties, logprobs: int,
                 eos_ids: np.ndarray, mesh, keep_state: bool,
                 owners: list[tuple[int, int]] | None = None,
                 guides: Guides | None = None) -> None:  # fmt: skip
        self.model, self.rows, self.keys, self.max_tokens = model, rows, keys, max_tokens
        self.sampling, self.penalties, self.logprobs = sampling, penalties, logprobs
        self.eos_ids, self.mesh, self.keep_state, self.owners = eos_ids, mesh, keep_state, owners
        self.guides = guides if guides else None
        # speculation needs no penalties that count: the replay of a chunk cut short
        # would not count the tokens it kept
        self.speculate = self.guides is not None and not sampling.counting()
        if self.guides is not None:  # each masked call sends only the new bias to the device
            self.own_bias = np.asarray(sampling.bias)
            self.guided = on_device(sampling.replace(penalizing=np.ones(len(max_tokens), bool)))
            self.sampling = self.guided if not self.speculate else on_device(sampling)
        self.params = replicated(mesh, model.params) if mesh is not None else None

    def _pieces(self) -> list[Piece]:
        pieces = self.rows.drain()
        if self.owners is None:
            return pieces
        return [dataclasses.replace(p, prompt=self.owners[p.sample][0],
                                    sample=self.owners[p.sample][1])
                for p in pieces if p.sample < len(self.owners)]  # fmt: skip

    def run(self, rings, token, stream: GenerationStream):
        """Yields the rows' Pieces; returns (rings, last token, tokens taken)."""
        rows, max_tokens = self.rows, self.max_tokens
        batch = len(max_tokens)
        no_forcing = np.zeros([CHUNK, batch], np.int32)
        count, chunk = 0, 1
        cut = None  # a speculated chunk cut short at its step `used`: (before, tokens, used)
        for row in np.flatnonzero(max_tokens <= 0):
            rows.finish_at(int(row))
        while not rows.all_done:
            if stream.stopping:
                if cut is not None:  # the state after the tokens taken, not the chunk's
                    before, tokens, used = cut
                    rings, token = self._replay(*before, tokens, used, count)
                    count += used
                rows.cancel(np.ones(batch, bool))
                break
            done = np.array([s.done for s in rows.samples])
            before, forcing, used = (rings, token), no_forcing, 0
            if cut is not None:  # the chunk again from its start, its tokens taken forced
                before, forcing, used = cut
                rings, token = before
                cut = None
            sampling, counts, limits, forcing, n_forced, guards = self._call(
                done, count, chunk, forcing, used
            )
            out = run_chunk(
                self.model, rings, token, self.keys, counts, limits, forcing, n_forced,
                self.eos_ids, sampling, self.penalties, self.mesh, self.params, self.logprobs,
                in_place=guards is None and self.guides is not None,  # never replayed
            )  # fmt: skip
            rings, token, tokens, log_probs, sampled, top_values, top_ids, after, drafts = out
            drawn = _Drawn(*map(np.asarray, (tokens, log_probs, top_values, top_ids, drafts)))
            used, refused = yield from self._take(drawn, int(sampled), used, count, n_forced,
                                                  guards)  # fmt: skip
            if refused:  # the chunk again up to the refused draw, then a step under the mask
                cut, chunk = (before, drawn.tokens, used), 1
                continue
            if self.keep_state and used < sampled:  # a stop string ended it mid-chunk
                rings, token, after = self._replay(*before, drawn.tokens, used, count,
                                                   penalties=True)  # fmt: skip
            self.penalties = after
            count += used
            if self.guides is None or (guards is not None and self.guides.kept(guards)):
                chunk = min(2 * chunk, CHUNK)
            else:  # a mask that moves at every token: one masked step a call
                chunk = 1
        rows.finish_all()
        yield from self._pieces()
        return rings, token, count

    def _take(self, drawn: _Drawn, sampled: int, used: int, count: int, n_forced: np.ndarray,
              guards):  # fmt: skip
        """Takes a call's steps from `used` to `sampled`, yielding the rows' Pieces as
        they come → (steps taken, whether a speculated draw is refused: the chunk must
        run again up to there)."""
        rows = self.rows
        while used < sampled and not rows.all_done:
            live = [not s.done for s in rows.samples]
            own = [on and used >= n for on, n in zip(live, n_forced, strict=True)]
            if guards is not None and self.guides.speculated(
                drawn.tokens[used].copy(), drawn.drafts[used], guards, own
            )[1].any():  # fmt: skip
                return used, True
            rows.take(drawn.tokens[used], drawn.log_probs[used], drawn.top_values[used],
                      drawn.top_ids[used])  # fmt: skip
            if self.guides is not None:
                for row in np.flatnonzero(live):
                    if self.guides.take(int(row), int(drawn.tokens[used, row])):
                        rows.complete(int(row))
            used += 1
            for row in np.flatnonzero(self.max_tokens == count + used):
                rows.finish_at(int(row))
            yield from self._pieces()
        return used, False

    def _call(self, done: np.ndarray, count: int, chunk: int, forcing: np.ndarray, used: int):
        """A call's values after `count` tokens, its first `used` steps forced (a chunk
        cut short, read again) → (sampling, counts, limits, forcing, n_forced, guards).
        Without a constraint, `chunk` steps. A speculating row first takes the tokens its
        grammar forces (fed, as many as the call holds: then it ends there), then samples
        under its guard, its mask after them (guards; DESIGN.md section 7). A row that
        does not speculate takes one step under its mask (the logit bias)."""
        max_tokens, batch = self.max_tokens, len(self.max_tokens)
        room = np.clip(max_tokens - count, 0, CHUNK)  # the steps each row may take
        n_forced, guards = np.full(batch, used), None
        steps = np.minimum(room, used + chunk)
        if self.speculate:
            ahead = [self.guides.forced(r, int(room[r]) - used) if not done[r] else ([], None)
                     for r in range(batch)]  # fmt: skip
            fed, guards = [a[0] for a in ahead], [a[1] for a in ahead]
            forcing = np.array(forcing)
            for row, tokens in enumerate(fed):
                forcing[used : used + len(tokens), row] = tokens
                n_forced[row] += len(tokens)
            cut_short = [used + len(f) >= room[r] for r, f in enumerate(fed) if len(f)]
            steps = np.minimum(room, n_forced.max() + (0 if any(cut_short) else chunk))
            allowed = np.stack([np.ones(self.own_bias.shape[1], bool) if g is None else g
                                for g in guards])  # fmt: skip
            sampling = self.sampling.replace(allowed=on_device(allowed))
        elif self.guides is not None:  # one masked step
            steps = np.minimum(room, used + 1)
            sampling = self.guided.replace(bias=on_device(self.guides.bias(self.own_bias)))
        else:
            sampling = self.sampling
        # row r's k-th token (forced or drawn) has the key of k: its steps count from here
        counts = count + n_forced
        return sampling, counts, np.where(done, 0, steps), forcing, n_forced, guards

    def _replay(self, rings, token, tokens: np.ndarray, used: int, count: int,
                penalties: bool = False):  # fmt: skip
        """The state after the first `used` of a chunk's tokens [CHUNK, B], from the
        state before it (the chunk run again, those tokens forced) → (rings, token), and
        the penalties after it with penalties=True."""
        batch = len(self.max_tokens)
        rings, token, *_, after, _ = run_chunk(
            self.model, rings, token, self.keys, np.full(batch, count), np.full(batch, used),
            tokens, used, self.eos_ids, self.sampling, self.penalties, self.mesh, self.params,
            self.logprobs,
        )  # fmt: skip
        return (rings, token, after) if penalties else (rings, token)


class _Drawn(NamedTuple):
    """A call's steps on the host, each [CHUNK, B, ...]: the tokens taken, their
    log-probs, the alternatives (values, ids) and the draws before the guard."""

    tokens: np.ndarray
    log_probs: np.ndarray
    top_values: np.ndarray
    top_ids: np.ndarray
    drafts: np.ndarray


def _repeat_context(context: Context, n: int) -> Context:
    if n == 1:
        return context
    state = jax.tree_util.tree_map(lambda x: jnp.repeat(x, n, axis=0), context.state)
    return Context(state=state, last_token=np.repeat(context.last_token, n), tokens=context.tokens)
