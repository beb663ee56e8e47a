"""A batch of texts sampled together (docs/DESIGN.md section 7): `stream_batch` runs the
continuations of several texts, each with its own samples, seed, sampler, penalties,
log-probs, stop strings and constraint, as rows of one compiled decoding loop (the
SampleLoop of tvq/decoding.py), and each item gets what `generate` gives it alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Generator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tvq.decoding import (
    BatchGeneration,
    Event,
    GenerationStream,
    SampleLoop,
    check_generation,
    eos_ids_of,
    prefill_rings,
)
from tvq.distributed.devices import mesh_for_rows
from tvq.nn.ring import empty_rings
from tvq.runtime.context import Context, eos_id, require_tokenizer, score_ids
from tvq.runtime.decode_loop import repeat_ring_rows, row_keys
from tvq.runtime.model import Model
from tvq.text.constraints import Constraint, Guides
from tvq.text.rows import Sample, TextRows
from tvq.text.sampling import Penalties, SamplerRows
from tvq.text.settings import Sampler


@dataclasses.dataclass(frozen=True)
class BatchItem:
    """One text's share of a batch (stream_batch), from the start of a document."""

    prompt_ids: Sequence[int]
    max_tokens: int = 256
    seed: int = 0
    num_samples: int = 1
    stop: Sequence[str] = ()
    # None: the batch's own arguments; rows with different settings share the batch
    sampler: Sampler | None = None
    logprobs: int | None = None
    ignore_eos: bool | None = None
    constraint: Constraint | None = None  # what its samples' text must match


def stream_batch(
    model: Model,
    items: Sequence[BatchItem],
    *,
    sampler: Sampler | None = None,
    logprobs: int = 0,
    ignore_eos: bool = False,
    alternatives: int | None = None,
) -> GenerationStream:
    """Samples the continuations of several texts at once: every item's rows share one
    compiled decoding loop, whatever their samplers, penalties, log-probs and ignore_eos
    (each item's own, or these arguments). Each item gets the samples generate() gives
    it alone with its seed and settings: a row draws from its own keys by its own
    settings, and rows of texts at different positions run side by side. The batch is
    padded to a power of two rows, so few shapes ever compile. Yields Pieces (`prompt`:
    the item, `sample`: its sample), then the BatchGeneration."""
    sampler = sampler or Sampler()
    tokenizer = require_tokenizer(model)
    top_k = max([logprobs, alternatives or 0] + [r.logprobs or 0 for r in items])
    for r in items:
        check_generation(model, r.max_tokens, r.seed, r.num_samples, r.logprobs or 0, r.stop)
    owners = [(i, j) for i, r in enumerate(items) for j in range(r.num_samples)]
    size = 1 << max(0, len(owners) - 1).bit_length()  # rows, padded to a power of two

    def run(stream: GenerationStream) -> Generator[Event, None, None]:
        rows = _BatchRows(model, top_k, sampler, logprobs, ignore_eos)
        for r in items:
            rows.add(r)
        rows.pad(size - len(owners))
        text = TextRows(tokenizer, rows.stops, rows.eos_rules, rows.tops)
        constraints = [items[i].constraint for i, _ in owners] + [None] * (size - len(owners))
        loop = SampleLoop(model, text, np.concatenate(rows.keys), np.asarray(rows.limits),
                           SamplerRows.of(rows.samplers, model.config.n_vocab),
                           Penalties.start(model.config.n_vocab, rows.recent), top_k,
                           eos_ids_of(tokenizer, rows.eos_rules), mesh_for_rows(size, None),
                           keep_state=False, owners=owners,
                           guides=Guides(tokenizer, model.config.n_vocab, constraints))  # fmt: skip
        yield from loop.run(*rows.joined(), stream)
        out: list[list[Sample]] = [[] for _ in items]
        for row, (i, _) in enumerate(owners):
            out[i].append(text.samples[row])
        yield BatchGeneration(out)

    return GenerationStream(run)


def generate_batch(model: Model, items: Sequence[BatchItem], **options: Any
                   ) -> list[list[Sample]]:  # fmt: skip
    """stream_batch to its end: the samples per item (same options)."""
    for event in stream_batch(model, items, **options):
        if isinstance(event, BatchGeneration):
            return event.samples
    raise AssertionError("a batch stream ends with its BatchGeneration")


class _BatchRows:
    """The rows of a batch being assembled: each item's rings and last tokens repeated
    for its samples, and per row its key, limit, stop strings, sampler, recent tokens,
    end-of-document rule and log-probs."""

    def __init__(self, model: Model, top_k: int, sampler: Sampler, logprobs: int,
                 ignore_eos: bool) -> None:  # fmt: skip
        self.model, self.top_k = model, top_k
        self.sampler, self.logprobs, self.ignore_eos = sampler, logprobs, ignore_eos
        self.parts, self.keys, self.limits, self.stops = [], [], [], []
        self.samplers, self.recent, self.eos_rules, self.tops = [], [], [], []

    def add(self, r: BatchItem) -> None:
        model, n = self.model, r.num_samples
        prompt = np.asarray(list(r.prompt_ids), np.int32)
        whole = len(prompt) - len(prompt) % model.block_len
        context = Context.start(model, 1)
        if whole:
            _, context = score_ids(model, prompt[:whole], context)
        rings, token = prefill_rings(model, context, prompt[whole:], not whole, self.top_k)
        self.parts.append((repeat_ring_rows(rings, n=n), jnp.repeat(token, n)))
        self.keys.append(row_keys(r.seed, n))
        self.limits += [r.max_tokens] * n
        self.stops += [list(r.stop)] * n
        self.samplers += [r.sampler or self.sampler] * n
        self.recent += [prompt.tolist()] * n
        self.eos_rules += [self.ignore_eos if r.ignore_eos is None else r.ignore_eos] * n
        self.tops += [self.logprobs if r.logprobs is None else r.logprobs] * n

    def pad(self, padding: int) -> None:
        """Rows of an empty text that never sample."""
        if not padding:
            return
        self.parts.append((empty_rings(self.model.config, padding),
                           jnp.full([padding], eos_id(self.model), jnp.int32)))  # fmt: skip
        self.keys.append(row_keys(0, padding))
        self.limits += [0] * padding
        self.stops += [[]] * padding
        self.samplers += [self.sampler] * padding
        self.recent += [[]] * padding
        self.eos_rules += [False] * padding
        self.tops += [0] * padding

    def joined(self):
        """(rings, last tokens) of every row."""
        rings = jax.tree_util.tree_map(lambda *a: jnp.concatenate(a, axis=0),
                                       *[p[0] for p in self.parts])  # fmt: skip
        return rings, jnp.concatenate([p[1] for p in self.parts])
