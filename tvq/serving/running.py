"""Continuous batching for `tvq serve` (docs/DESIGN.md section 13): the rows of every
running request decode together, a request joins the batch in free rows as soon as its
prompt is read and leaves it when its last row ends, so no request waits for another's
whole generation.

Every row keeps what makes its text its own: its key (its k-th token is drawn from
fold_in(key, k), whatever chunk it falls in), its sampler settings and penalties (values
of the one compiled loop, tvq.text.sampling), its count and its ring. The rows advance
in lock-step, each call as many steps as the row with the fewest to go may take (and,
for time to the first token, a new row's first calls take 1, 2, 4, … steps), so every
row still running has exactly its own state after a call: a request gets the text
generate() gives it alone. A row that ends mid-call (its end of document, a stop
string) is done; its later steps are never read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from tvq.decoding import Request, eos_ids_of, prefill_rings
from tvq.nn.ring import empty_rings
from tvq.runtime.context import Context, eos_id
from tvq.runtime.decode_loop import CHUNK, repeat_ring_rows, row_keys, run_chunk
from tvq.runtime.model import Model
from tvq.text.rows import Sample, TextRows
from tvq.text.sampling import Penalties, Sampler, SamplerRows


@dataclasses.dataclass(eq=False)  # an entry is itself: compared by identity
class Entry:
    """One prompt of a request in the batch: its n rows, their text, and the callbacks
    that send them back (on_piece as TextRows's, on_done(samples) once every row ended,
    cancelled() asked before every call)."""

    request: Request
    rows: TextRows
    on_done: Callable[[list[Sample]], None]
    cancelled: Callable[[], bool]
    job: object = None  # whose request it is (the server's Job), for its errors


class RunningBatch:
    """The rows of the requests running now, on the device: rings, last tokens, keys,
    settings and penalties, padded to a power of two rows (few shapes compile)."""

    def __init__(self, model: Model, alternatives: int) -> None:
        self.model, self.alternatives = model, alternatives
        self.entries: list[Entry] = []
        self.owner: list[tuple[Entry, int]] = []  # per row: its entry and sample index
        self.counts: list[int] = []  # per row: tokens sampled so far
        self.chunks: list[int] = []  # per row: the steps its next call may take (1, 2, 4…)
        self.device: dict | None = None  # the rows' arrays, padded

    @property
    def rows(self) -> int:
        return len(self.owner)

    def admit(self, r: Request, context: Context | None, rest, rows: TextRows, on_done,
              cancelled, job: object = None) -> None:  # fmt: skip
        """Adds a request's rows: its prompt read up to `context` (None: nothing read),
        `rest` (under a block) still to feed."""
        model = self.model
        fresh = context is None
        context = context or Context.start(model, 1)
        rings, token = prefill_rings(model, context, np.asarray(rest, np.int32), fresh,
                                     self.alternatives)  # fmt: skip
        n = r.num_samples
        sampler = r.sampler or Sampler()
        prompt = np.asarray(list(r.prompt_ids), np.int32).tolist()
        new = {
            "rings": repeat_ring_rows(rings, n=n), "token": jnp.repeat(token, n),
            "keys": jnp.asarray(row_keys(r.seed, n)),
            "sampling": SamplerRows.of([sampler] * n, model.config.n_vocab),
            "penalties": Penalties.start(model.config.n_vocab, [prompt] * n),
            "eos": eos_ids_of(model.tokenizer, [bool(r.ignore_eos)] * n),
        }  # fmt: skip
        entry = Entry(r, rows, on_done, cancelled, job)
        self.entries.append(entry)
        live = self._gather(list(range(self.rows)))
        self.device = new if live is None else jax.tree_util.tree_map(
            lambda a, b: jnp.concatenate([jnp.asarray(a), jnp.asarray(b)]), live, new
        )  # fmt: skip
        self.owner += [(entry, j) for j in range(n)]
        self.counts += [0] * n
        self.chunks += [1] * n
        for j in range(n):
            if r.max_tokens <= 0:
                rows.finish_at(j)

    def step(self) -> None:
        """One call of the compiled loop for every running row; then the requests whose
        rows all ended leave the batch."""
        for entry in self.entries:
            if entry.cancelled():
                entry.rows.cancel(np.ones(len(entry.rows.samples), bool))
        live = [not entry.rows.samples[j].done for entry, j in self.owner]
        if any(live):
            self._call(live)
        self._retire()

    def _call(self, live: list[bool]) -> None:
        rows = zip(self.owner, self.counts, self.chunks, live, strict=True)
        steps = min([CHUNK] + [min(entry.request.max_tokens - count, chunk)
                               for (entry, _), count, chunk, on in rows if on])  # fmt: skip
        size = 1 << max(0, self.rows - 1).bit_length()
        padded = self._padded(size)
        limits = np.zeros(size, np.int32)
        limits[: self.rows] = np.where(live, steps, 0)
        counts = np.zeros(size, np.int32)
        counts[: self.rows] = self.counts
        no_forcing = np.zeros([CHUNK, size], np.int32)
        rings, token, tokens, log_probs, sampled, top_values, top_ids, penalties = run_chunk(
            self.model, padded["rings"], padded["token"], padded["keys"], counts, limits,
            no_forcing, 0, padded["eos"], padded["sampling"], padded["penalties"],
            top_k=self.alternatives,
        )  # fmt: skip
        tokens, log_probs = np.asarray(tokens), np.asarray(log_probs)
        top_values, top_ids = np.asarray(top_values), np.asarray(top_ids)
        self.device = {
            "rings": rings, "token": token, "keys": padded["keys"], "eos": padded["eos"],
            "sampling": padded["sampling"], "penalties": penalties,
        }  # fmt: skip
        self.device = self._gather(list(range(self.rows)))  # drop the padding again
        for step in range(min(int(sampled), steps)):
            for entry in self.entries:
                rows = [i for i, (owner, _) in enumerate(self.owner) if owner is entry]
                entry.rows.take(tokens[step, rows], log_probs[step, rows],
                                top_values[step, rows], top_ids[step, rows])  # fmt: skip
        for i, (entry, j) in enumerate(self.owner):
            if live[i]:
                self.counts[i] += steps
                self.chunks[i] = min(2 * self.chunks[i], CHUNK)
                if self.counts[i] >= entry.request.max_tokens:
                    entry.rows.finish_at(j)

    def _retire(self) -> None:
        """Requests whose rows all ended leave; their rows are dropped from the batch."""
        done = [e for e in self.entries if all(s.done for s in e.rows.samples)]
        if not done:
            return
        keep = [i for i, (entry, _) in enumerate(self.owner) if entry not in done]
        self.device = self._gather(keep)
        self.owner = [self.owner[i] for i in keep]
        self.counts = [self.counts[i] for i in keep]
        self.chunks = [self.chunks[i] for i in keep]
        self.entries = [e for e in self.entries if e not in done]
        for entry in done:
            entry.rows.finish_all()
            entry.on_done(entry.rows.samples)

    def _gather(self, rows: list[int]) -> dict | None:
        """These rows of the device arrays (None: none). Every array holds its rows
        row-major on its first axis, some several entries a row (a ring's heads: G = B·H),
        so row r is entries r·k … r·k + k − 1, k = the axis's length / the batch's."""
        if self.device is None or not rows:
            return None
        batch = self.device["token"].shape[0]
        index = np.asarray(rows, np.int32)

        def take(a):
            a = jnp.asarray(a)
            k = a.shape[0] // batch
            return jnp.take(a, jnp.asarray((index[:, None] * k + np.arange(k)).ravel()), axis=0)

        return jax.tree_util.tree_map(take, self.device)

    def _padded(self, size: int) -> dict:
        """The rows' arrays with size − rows rows of an empty text that never sample."""
        pad = size - self.rows
        if not pad:
            return self.device
        config = self.model.config
        extra = {
            "rings": empty_rings(config, pad),
            "token": jnp.full([pad], eos_id(self.model), jnp.int32),
            "keys": jnp.asarray(row_keys(0, pad)),
            "sampling": SamplerRows.of([Sampler()] * pad, config.n_vocab),
            "penalties": Penalties.start(config.n_vocab, [[]] * pad),
            "eos": np.full([pad], -1, np.int32),
        }  # fmt: skip
        return jax.tree_util.tree_map(
            lambda a, b: jnp.concatenate([jnp.asarray(a), jnp.asarray(b)]), self.device, extra
        )
