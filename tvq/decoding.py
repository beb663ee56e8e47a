"""Decoding: compiled loops that feed each sampled token back as a block of length 1
(docs/DESIGN.md section 7).

Block-length invariance (docs/DESIGN.md invariant 3) makes this exact: the log-probs the
sampler sees are those that scoring the finished text gives (invariant 6). Tokens are
sampled in chunks by one compiled `jax.lax.while_loop` (no Python per token); between
chunks the host streams the text and applies stop strings. The first chunk is one
token, so the first text appears at once, and chunks then double up to `CHUNK`.
The attention memory lives in a ring during decoding (tvq.nn.ring): each token is written
in place, and its cost does not depend on the position. The compiled loop itself, whose
network pass per token is `Transformer.step`, is tvq/runtime/decode_loop.py; this module is the
host side: prompts, sample rows, stop strings, streaming. (Over 300 lines: one text and
a batch of texts share the chunk loop and its replay up to a stop string.)
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tvq.distributed.devices import mesh_for_rows, replicated
from tvq.errors import InputError
from tvq.nn.ring import empty_rings
from tvq.runtime.context import Context, eos_id, require_tokenizer, score_ids
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
from tvq.text.rows import Sample, TextRows
from tvq.text.sampling import Penalties, Sampler, SamplerRows


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


def generate(
    model: Model,
    prompt_ids: Sequence[int] | str,
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
    alternatives: int | None = None,
    on_piece: Callable[[int, str, Sample, int, int], None] | None = None,
) -> Generation:
    """Samples `num_samples` continuations of context + prompt (token ids, or text for
    the model's tokenizer) as one batch; a row ends
    at an end-of-document token unless ignore_eos (then only max_tokens and stop end it).
    The rows are split over the local devices (at most `devices`; as many as divide
    num_samples); the samples do not depend on how many.

    on_text(row, text) receives text as soon as it is final (never half a character,
    never the start of a stop string that may still complete). logprobs k > 0 also
    keeps, per sampled token, the k most likely tokens with their log-probs
    (Sample.top_logprobs), found inside the compiled loop. should_stop() is asked
    between chunks (at most CHUNK tokens apart): True ends every row there, with
    finish_reason "cancelled" (a client that went away). alternatives (≥ logprobs;
    default logprobs) is how many alternatives the compiled loop finds per token: a
    server passes its one bound, so every request runs the same program.
    on_piece(row, text, sample, start, end), instead of on_text, also gives the tokens
    sample.ids[start:end] that came with the text (TextRows).
    """
    sampler = sampler or Sampler()
    tokenizer = require_tokenizer(model)
    if isinstance(prompt_ids, str):  # text: through the model's tokenizer
        prompt_ids = tokenizer.encode(prompt_ids)
    if max_tokens < 0:
        raise InputError(f"max-tokens must be >= 0, got {max_tokens}")
    if num_samples < 1:
        raise InputError(f"num-samples must be >= 1, got {num_samples}")
    check_top_k(logprobs, model.config.n_vocab, "logprobs")
    width = logprobs if alternatives is None else max(alternatives, logprobs)
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

    rings, token = prefill_rings(model, context, prompt[whole:], fresh and not whole, width)
    if num_samples > 1:
        rings, token = repeat_ring_rows(rings, n=num_samples), jnp.repeat(token, num_samples)
    mesh = mesh_for_rows(num_samples, devices)
    params = replicated(mesh, model.params) if mesh is not None else None

    def row_piece(row: int, text: str, start: int, end: int) -> None:
        on_piece(row, text, rows.samples[row], start, end)

    rows = TextRows(tokenizer, [list(stop)] * num_samples, on_text, [ignore_eos] * num_samples,
                    [logprobs] * num_samples,
                    row_piece if on_piece is not None else None)  # fmt: skip
    sampling = SamplerRows.of([sampler] * num_samples, model.config.n_vocab)
    penalties = Penalties.start(model.config.n_vocab, [prompt.tolist()] * num_samples)
    rings, token, count = _sample_loop(
        model, rings, token, rows, row_keys(seed, num_samples), np.full(num_samples, max_tokens),
        sampling, penalties, width, eos_ids_of(tokenizer, [ignore_eos] * num_samples),
        should_stop, mesh, params, keep_state=True,
    )  # fmt: skip
    rows.finish_all()
    finished_at = time.perf_counter()
    first = rows.first_token_at or finished_at
    tokens_before = context.tokens + len(prompt) - whole

    def resume() -> Context:
        state = ring_to_state(model.config, model.params, on_device(rings))
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
    # None: generate_batch's own arguments; rows with different settings share the batch
    sampler: Sampler | None = None
    logprobs: int | None = None
    ignore_eos: bool | None = None


def generate_batch(
    model: Model,
    requests: Sequence[Request],
    *,
    sampler: Sampler | None = None,
    logprobs: int = 0,
    ignore_eos: bool = False,
    on_text: Callable[[int, int, str], None] | None = None,
    should_stop: Callable[[], Sequence[bool]] | None = None,
    alternatives: int | None = None,
    on_piece: Callable[[int, int, str, Sample, int, int], None] | None = None,
) -> list[list[Sample]]:
    """Samples the continuations of several texts at once: every request's rows share
    one compiled decoding loop (tvq serve batches concurrent requests so), whatever their
    samplers, penalties, log-probs and ignore_eos (each request's own, or these
    arguments). Each request gets the samples generate() gives it alone with its seed
    and settings: a row draws from its own keys by its own settings, and rows of texts
    at different positions run side by side. The batch is padded to a power of two
    rows, so few shapes ever compile.

    on_text(request, sample, text) streams text; should_stop() → one bool per request
    (its client went away) is asked between chunks; alternatives as for generate.
    on_piece(request, sample index, text, sample, start, end), instead of on_text, also
    gives the tokens sample.ids[start:end] that came with the text (TextRows).
    Returns the samples per request."""
    sampler = sampler or Sampler()
    tokenizer = require_tokenizer(model)
    owners = [(i, j) for i, r in enumerate(requests) for j in range(r.num_samples)]
    size = 1 << max(0, len(owners) - 1).bit_length()  # rows, padded to a power of two
    parts, keys, limits, stops, samplers, recent, eos_rules, tops = [], [], [], [], [], [], [], []
    top_k = max([logprobs, alternatives or 0] + [r.logprobs or 0 for r in requests])
    for r in requests:
        prompt = np.asarray(list(r.prompt_ids), np.int32)
        check_top_k(r.logprobs or 0, model.config.n_vocab, "logprobs")
        whole = len(prompt) - len(prompt) % model.block_len
        context = Context.start(model, 1)
        if whole:
            _, context = score_ids(model, prompt[:whole], context)
        rings, token = prefill_rings(model, context, prompt[whole:], not whole, top_k)
        parts.append((repeat_ring_rows(rings, n=r.num_samples), jnp.repeat(token, r.num_samples)))
        keys.append(row_keys(r.seed, r.num_samples))
        n = r.num_samples
        limits += [r.max_tokens] * n
        stops += [list(r.stop)] * n
        samplers += [r.sampler or sampler] * n
        recent += [prompt.tolist()] * n
        eos_rules += [ignore_eos if r.ignore_eos is None else r.ignore_eos] * n
        tops += [logprobs if r.logprobs is None else r.logprobs] * n
    padding = size - len(owners)
    if padding:  # rows of an empty text that never sample
        parts.append((empty_rings(model.config, padding),
                      jnp.full([padding], eos_id(model), jnp.int32)))  # fmt: skip
        keys.append(row_keys(0, padding))
        limits += [0] * padding
        stops += [[]] * padding
        samplers += [sampler] * padding
        recent += [[]] * padding
        eos_rules += [False] * padding
        tops += [0] * padding
    rings = jax.tree_util.tree_map(lambda *a: jnp.concatenate(a, axis=0), *[p[0] for p in parts])
    token = jnp.concatenate([p[1] for p in parts])

    def row_text(row: int, text: str) -> None:
        if on_text is not None and row < len(owners):
            on_text(*owners[row], text)

    def rows_to_stop():
        stopped = list(should_stop())
        return [stopped[i] for i, _ in owners] + [True] * padding

    def row_piece(row: int, text: str, start: int, end: int) -> None:
        if row < len(owners):
            on_piece(*owners[row], text, rows.samples[row], start, end)

    rows = TextRows(tokenizer, stops, row_text, eos_rules, tops,
                    row_piece if on_piece is not None else None)  # fmt: skip
    mesh = mesh_for_rows(size, None)
    params = replicated(mesh, model.params) if mesh is not None else None
    sampling = SamplerRows.of(samplers, model.config.n_vocab)
    penalties = Penalties.start(model.config.n_vocab, recent)
    _sample_loop(model, rings, token, rows, np.concatenate(keys), np.asarray(limits), sampling,
                 penalties, top_k, eos_ids_of(tokenizer, eos_rules),
                 rows_to_stop if should_stop else None, mesh, params, keep_state=False)  # fmt: skip
    rows.finish_all()
    out: list[list[Sample]] = [[] for _ in requests]
    for row, (i, _) in enumerate(owners):
        out[i].append(rows.samples[row])
    return out


def prefill_rings(model: Model, context: Context, rest: np.ndarray, fresh: bool,
                  logprobs: int):  # fmt: skip
    """The rings of one text after `context` and then `rest` (less than a block), fed
    through the decoding loop (the program that samples next: the same top-k) →
    (rings, last token); fresh: nothing read before (empty rings)."""
    rings = empty_rings(model.config, 1) if fresh else state_to_ring(context.state)
    token = jnp.asarray(context.last_token, jnp.int32)
    rings, token, _ = feed(model, rings, token, rest[None, :], logprobs)
    return rings, token


def eos_ids_of(tokenizer, ignore_eos: list[bool]) -> np.ndarray:
    """Per row, the token that ends it: the end of document, or −1 (none) where it is
    ignored."""
    eos = -1 if tokenizer.eos_id is None else tokenizer.eos_id
    return np.asarray([-1 if ignore else eos for ignore in ignore_eos], np.int32)


def _sample_loop(model: Model, rings, token, rows: TextRows, keys: np.ndarray,
                 max_tokens: np.ndarray, sampling: SamplerRows, penalties: Penalties,
                 logprobs: int, eos_ids: np.ndarray, should_stop, mesh, params,
                 keep_state: bool):  # fmt: skip
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
        rings, token, tokens, log_probs, sampled, top_values, top_ids, after = run_chunk(
            model, rings, token, keys, np.full(batch, count), limits, no_forcing, 0, eos_ids,
            sampling, penalties, mesh, params, logprobs,
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
            rings, token, *_, after = run_chunk(model, *before, keys, np.full(batch, count),
                                                np.full(batch, used), tokens, used, eos_ids,
                                                sampling, penalties, mesh, params,
                                                logprobs)  # fmt: skip
        penalties = after
        count += used
        chunk = min(2 * chunk, CHUNK)
    return rings, token, count


def _repeat_context(context: Context, n: int) -> Context:
    if n == 1:
        return context
    state = jax.tree_util.tree_map(lambda x: jnp.repeat(x, n, axis=0), context.state)
    return Context(state=state, last_token=np.repeat(context.last_token, n), tokens=context.tokens)
