"""Continuous batching for `tvq serve` (docs/DESIGN.md section 13): the rows of every
running request decode together, a request joins the batch in free rows as soon as its
prompt is read and leaves it when its last row ends, so no request waits for another's
whole generation.

Every row keeps what makes its text its own: its key (its k-th token is drawn from
fold_in(key, k), whatever chunk it falls in), its sampler settings and penalties (values
of the one compiled loop, tvq.text.sampling), its count and its ring. The rows advance
in lock-step, each call as many steps as the row with the fewest to go may take (and,
for time to the first token, a new row's first calls take 1, 4, 16 steps), so every
row still running has exactly its own state after a call: a request gets the text
generate() gives it alone. A row that ends mid-call (its end of document, a stop
string) is done; its later steps are never read.

A joining prompt's tail (what is left under a block once its whole blocks are read) is
read in the running batch too: its rows' first steps take the tail's tokens instead of
sampling (decode_chunk's per-row forcing) while the other rows sample, so the tails of
requests that join together cost the batch's calls, not a call of their own each.

A constrained request speculates as generate() does (docs/DESIGN.md section 7): its
rows take the tokens their grammar forces, then draw chunks under a guard; where a chunk
is cut short, its rows' arrays go back to the call's start and read again what they took.
(Over 400 lines: that speculation lives beside the batch's calls it shares.)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from tvq.batching import BatchItem
from tvq.decoding import eos_ids_of, start_rings
from tvq.nn.ring import empty_rings
from tvq.runtime.context import Context, eos_id
from tvq.runtime.decode_loop import CHUNK, device_row_keys, run_chunk, seed_key
from tvq.runtime.forward import on_device
from tvq.runtime.model import Model
from tvq.text.constraints import Guides
from tvq.text.rows import Sample, TextRows
from tvq.text.sampling import Penalties, SamplerRows
from tvq.text.settings import REPEAT_WINDOW, Sampler


@dataclasses.dataclass(eq=False)  # an entry is itself: compared by identity
class Entry:
    """One prompt of a request in the batch: its n rows and their text (each call's
    Pieces wait in rows.released for the engine to take), and what the engine does once
    every row ended (on_done(samples))."""

    request: BatchItem
    rows: TextRows
    on_done: Callable[[list[Sample]], None]
    owner: object = None  # whose prompt it is (the engine's)
    # [rows, T]: what its rows still read before they sample (the prompt's last ids; after
    # a speculated chunk cut short, what each row had read and taken in it)
    tail: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros([1, 0], np.int32))
    guides: Guides | None = None  # its rows' constraint (tvq.text.constraints), if any
    bias: np.ndarray | None = None  # [1, N] its own logit bias, under the constraint's
    speculate: bool = False  # its constrained rows sample chunks under a guard
    guards: list | None = None  # each row's mask at the call's start (speculating)
    saved: dict | None = None  # slot → that row's arrays at the call's start (speculating)


WARM_SLOTS = 16  # slot counts up to this have their small programs compiled at start-up


class RunningBatch:
    """The rows of the requests running now, on the device: rings, last tokens, keys,
    settings and penalties, in slots. The device arrays hold a power of two of slots,
    or max_rows (few shapes compile), and keep that shape from call to call: a request's
    rows are written into free slots (one compiled scatter), a finished request's slots
    are only marked free (the loop leaves a row with no steps to take as it is), and
    the arrays are resized (one compiled gather of the live rows to the front, free
    slots copied from one blank row) only when the rows outgrow them or fill a quarter
    of them or less. So a call costs one run of the compiled loop, not a gather and a
    padding of every array around it."""

    def __init__(self, model: Model, alternatives: int, max_rows: int) -> None:
        self.model, self.alternatives, self.max_rows = model, alternatives, max_rows
        self.entries: list[Entry] = []
        self.slots: list[tuple[Entry, int] | None] = []  # per slot: entry and sample index
        self.counts: list[int] = []  # per slot: tokens sampled so far
        self.chunks: list[int] = []  # per slot: the steps its next call may take (1, 4, 16, 32)
        self.device: dict | None = None  # the slots' arrays
        self._fresh: Context | None = None  # the start of a document, made once
        self._blank: dict | None = None  # a free slot's arrays, made once

    @property
    def rows(self) -> int:
        return sum(slot is not None for slot in self.slots)

    def admit(self, r: BatchItem, context: Context | None, rest, rows: TextRows, on_done,
              owner: object = None) -> Entry:  # fmt: skip
        """Adds a request's rows: its prompt read up to `context` (None: nothing read),
        `rest` (under a block) still to read, which its rows' first steps take. The rows
        must fit: at most max_rows."""
        model = self.model
        if self.rows + r.num_samples > self.max_rows:
            raise ValueError(f"{r.num_samples} rows do not fit beside {self.rows} "
                             f"(at most {self.max_rows})")  # fmt: skip
        fresh = context is None
        if fresh:
            self._fresh = self._fresh or Context.start(model, 1)
            context = self._fresh
        rings, token = start_rings(model, context, fresh)
        n = r.num_samples
        sampler = r.sampler or Sampler()
        prompt = [int(i) for i in r.prompt_ids[-REPEAT_WINDOW:]]  # all the penalties read
        new = {  # one row; its n samples differ only in their keys (set by _put_row)
            "rings": rings, "token": token,
            "keys": jnp.zeros([1, 2], jnp.uint32),
            "sampling": SamplerRows.of([sampler], model.config.n_vocab),
            "penalties": Penalties.start(model.config.n_vocab, [prompt]),
            "eos": eos_ids_of(model.tokenizer, [bool(r.ignore_eos)]),
        }  # fmt: skip
        entry = Entry(r, rows, on_done, owner, np.repeat(np.asarray(rest, np.int32)[None], n, 0))
        if r.constraint is not None:
            entry.guides = Guides(model.tokenizer, model.config.n_vocab, [r.constraint] * n)
            entry.bias = np.asarray(new["sampling"].bias)
            entry.speculate = not new["sampling"].counting()
        self.entries.append(entry)
        free = [i for i, slot in enumerate(self.slots) if slot is None]
        if len(free) < n:
            self._resize(self._size(self.rows + n))
            free = [i for i, slot in enumerate(self.slots) if slot is None]
        slots = free[:n]
        new, key = on_device((new, seed_key(r.seed)))
        for j, slot in enumerate(slots):  # one compiled program per slot count
            self.device = _put_row(self.device, new, np.int32(slot), key, np.int32(j))
        for j, i in enumerate(slots):
            self.slots[i], self.counts[i], self.chunks[i] = (entry, j), 0, 1
        for j in range(n):
            if r.max_tokens <= 0:
                rows.finish_at(j)
        return entry

    def cancel(self, entry: Entry) -> None:
        """Ends an entry's rows (its client went away); it leaves at the next step."""
        entry.rows.cancel(np.ones(len(entry.rows.samples), bool))

    def step(self) -> None:
        """One call of the compiled loop for every running row; then the requests whose
        rows all ended leave the batch (after on_done)."""
        live = [slot is not None and not slot[0].rows.samples[slot[1]].done
                for slot in self.slots]  # fmt: skip
        if any(live):
            self._call(live)
        self._retire()

    def _call(self, live: list[bool]) -> None:
        """Every live row takes the same number of steps: as many as the row with the
        fewest to go wants (_plan). A speculating request's drawn steps are checked one
        by one (Guides.speculated), and where one must be drawn again its rows go back
        to the call's start and read again what they took (_cut)."""
        steps, forced, n_forced, reads = self._plan(live)
        limits = np.where(live, steps, 0).astype(np.int32)
        d = self._guided(live, limits - n_forced)
        counts = np.asarray(self.counts, np.int32) + n_forced - reads  # fed tokens count
        out = self._run(d, counts, limits, forced, n_forced)
        rings, token, tokens, log_probs, sampled, top_values, top_ids, penalties, drafts = out
        self.device = dict(self.device, rings=rings, token=token, penalties=penalties)
        tokens, log_probs, drafts = np.asarray(tokens), np.asarray(log_probs), np.asarray(drafts)
        top_values, top_ids = np.asarray(top_values), np.asarray(top_ids)
        where = {id(entry): [] for entry in self.entries}  # each entry's slots, in row order
        for i, slot in enumerate(self.slots):
            if slot is not None:
                where[id(slot[0])].append((slot[1], i))
        cut = set()  # the slots that go back to the call's start
        for entry in self.entries:
            at = [i for _, i in sorted(where[id(entry)])]
            read = int(reads[at].max()) if at else 0  # its running rows read alike
            for step in range(read, min(int(sampled), steps)):
                running = [not sample.done for sample in entry.rows.samples]
                drawn = [on and step >= n_forced[i] for on, i in zip(running, at, strict=True)]
                if entry.guards is not None and entry.guides.speculated(
                    tokens[step, at].copy(), drafts[step, at], entry.guards, drawn
                )[1].any():  # fmt: skip
                    cut.update(at)
                    self._cut(entry, at, forced[:read, at], tokens[read:step, at])
                    break
                entry.rows.take(tokens[step, at], log_probs[step, at], top_values[step, at],
                                top_ids[step, at])  # fmt: skip
                for j in np.flatnonzero(running) if entry.guides else ():
                    if entry.guides.take(int(j), int(tokens[step, at[j]])):
                        entry.rows.complete(int(j))
            else:
                entry.tail = entry.tail[:, read:]
        for i, slot in enumerate(self.slots):
            if live[i] and steps > reads[i] and i not in cut:  # it took tokens
                entry, j = slot
                self.counts[i] += steps - int(reads[i])
                self.chunks[i] = min(4 * self.chunks[i], CHUNK)
                if entry.guards is not None and not entry.guides.kept(entry.guards):
                    self.chunks[i] = 1  # a mask that moves at every token: one step a call
                if self.counts[i] >= entry.request.max_tokens:
                    entry.rows.finish_at(j)

    def _plan(self, live: list[bool]):
        """A call's steps and forced tokens → (steps, forced [CHUNK, slots], n_forced,
        reads: the forced tokens each slot reads, not takes). A row first reads what is
        left of its tail; a speculating row with none then takes the tokens its grammar
        forces (Guides.forced: fed, not drawn; its guard is its mask after them); then
        it draws its next 1, 4, 16, 32 tokens (one a call where its mask moves at every
        token, or where it does not speculate), at most its max_tokens. The call takes
        the fewest steps any row wants (CHUNK at most: a tail runs up to a block), and a
        row whose forced tokens fill what it may take draws none."""
        size = len(self.slots)
        wants, fed = np.full(size, CHUNK), [[] for _ in range(size)]
        for entry in self.entries:
            entry.guards = None
        for i, slot in enumerate(self.slots):
            if not live[i]:
                continue
            entry, j = slot
            room = min(CHUNK, entry.request.max_tokens - self.counts[i])
            tail, chunk = entry.tail.shape[1], self.chunks[i]
            if entry.guides is not None and entry.speculate and not tail:
                entry.guards = entry.guards or [None] * len(entry.rows.samples)
                fed[i], entry.guards[j] = entry.guides.forced(j, room)
            elif entry.guides is not None and not entry.speculate:
                chunk = 1
            ahead = len(fed[i])
            wants[i] = min(CHUNK, tail + ahead + (0 if ahead == room else min(chunk, room - ahead)))
        steps = int(min(wants[i] for i in range(size) if live[i]))
        forced, n_forced = np.zeros([CHUNK, size], np.int32), np.zeros(size, np.int32)
        reads = np.zeros(size, np.int32)
        for i, slot in enumerate(self.slots):
            if live[i]:
                ids = np.concatenate([slot[0].tail[slot[1]], fed[i]]).astype(np.int32)[:steps]
                forced[: len(ids), i], n_forced[i] = ids, len(ids)
                reads[i] = min(slot[0].tail.shape[1], steps)
        return steps, forced, n_forced, reads

    def _cut(self, entry: Entry, at: list[int], read: np.ndarray, taken: np.ndarray) -> None:
        """A speculating request's chunk cut short: its rows (slots `at`) go back to their
        arrays at the call's start, and their next steps read again what they read in it
        (`read` [R, rows], its tail) and the tokens they took (`taken` [T, rows]). Their
        next sampled token then has the key it had (their counts grow by T), and their
        guard is their mask now: an allowed first draw is kept, a refused one drawn
        again under the mask (docs/DESIGN.md section 7)."""
        for i in at:
            if i in entry.saved:  # (a row that ended before the call is not)
                self.device = _put_back(self.device, entry.saved[i], np.int32(i))
            self.counts[i] += len(taken)
            self.chunks[i] = 1  # what they took, then one step under the mask now
        entry.tail = np.ascontiguousarray(np.concatenate([read, taken]).T)

    def _guided(self, live: list[bool], sampling: np.ndarray) -> dict:
        """The slots' arrays for a call in which each slot samples `sampling` steps. A
        live constrained row that does not speculate (its penalties count tokens) gets
        the logit bias that bans what its constraint does not allow next, and takes one
        step. A speculating one gets its guard (sampling.allowed: what its constraint
        allows now), and where it samples more than one step (a chunk that may be cut
        short) its arrays are kept as they are at the call's start (Entry.saved)."""
        at, biases, guarded, allowed = [], [], [], []
        for entry in self.entries:
            entry.saved = None
            if entry.guides is None:
                continue
            slots = [(slot[1], i) for i, slot in enumerate(self.slots)
                     if slot is not None and slot[0] is entry and live[i]]  # fmt: skip
            if slots and entry.speculate:
                entry.guards = entry.guards or entry.guides.masks()
                entry.saved = {i: _take_row(self.device, np.int32(i))
                               for _, i in slots if sampling[i] > 1}  # fmt: skip
                guarded += [i for _, i in slots]
                allowed += [np.ones(entry.bias.shape[1], bool) if entry.guards[j] is None
                            else entry.guards[j] for j, _ in slots]  # fmt: skip
            elif slots:
                bias = entry.guides.bias(np.repeat(entry.bias, len(entry.rows.samples), 0))
                at += [i for _, i in slots]
                biases += [bias[j] for j, _ in slots]
        rows = self.device["sampling"]
        if at:
            index = np.asarray(at, np.int32)
            rows = rows.replace(
                bias=rows.bias.at[index].set(np.stack(biases)),
                penalizing=rows.penalizing.at[index].set(True),
            )
        if guarded:  # the whole array from the host: a scatter on the device took longer
            every = np.ones(rows.allowed.shape, bool)
            every[guarded] = allowed
            rows = rows.replace(allowed=on_device(every))
        return dict(self.device, sampling=rows)

    def _run(self, d: dict, counts: np.ndarray, limits: np.ndarray, forced: np.ndarray,
             n_forced: np.ndarray):  # fmt: skip
        """One call of the compiled loop over the slots' arrays (run_chunk's outputs),
        which uses up d's rings, last tokens and penalties (updated in place)."""
        return run_chunk(self.model, d["rings"], d["token"], d["keys"], counts, limits,
                         forced, n_forced, d["eos"], d["sampling"], d["penalties"],
                         top_k=self.alternatives, in_place=True)  # fmt: skip

    def _retire(self) -> None:
        """Requests whose rows all ended leave; their slots are freed."""
        done = [e for e in self.entries if all(s.done for s in e.rows.samples)]
        if not done:
            return
        self.slots = [None if slot is not None and slot[0] in done else slot
                      for slot in self.slots]  # fmt: skip
        self.entries = [e for e in self.entries if e not in done]
        if self.rows <= len(self.slots) // 4:  # mostly empty: fewer slots, a faster call
            self._resize(self._size(self.rows))
        for entry in done:
            entry.rows.finish_all()
            entry.on_done(entry.rows.samples)

    def _size(self, rows: int) -> int:
        """The slots that hold `rows`: a power of two, or max_rows; 0 for none."""
        return min(1 << (rows - 1).bit_length(), self.max_rows) if rows else 0

    def _resize(self, size: int) -> None:
        """`size` slots (0: none): the live rows first, in slot order, then free slots
        of an empty text (their arrays are valid; the loop never advances them)."""
        keep = [i for i, slot in enumerate(self.slots) if slot is not None]
        pad = size - len(keep)
        if size:  # free slots: the blank row, after the old slots
            index = np.asarray(keep + [len(self.slots)] * pad, np.int32)
            self.device = _gather_rows(self.device, self._blank_row(), index)
        else:
            self.device = None
        self.slots = [self.slots[i] for i in keep] + [None] * pad
        self.counts = [self.counts[i] for i in keep] + [0] * pad
        self.chunks = [self.chunks[i] for i in keep] + [1] * pad

    def warm_up(self, sizes: list[int]) -> None:
        """Compiles, before serving, the loop at these slot counts, and for every slot
        count up to WARM_SLOTS (the powers of two, and max_rows if less) writing a joining
        request's row into a slot and the resizes between them (up, and down to a
        quarter or less): small programs, which would otherwise compile while requests
        wait (a run of 16 clients took half the time or twice, by which resizes it met).
        Larger batches compile theirs once, when first met, into the compilation cache."""
        blank, key = self._blank_row(), on_device(seed_key(0))
        every = sorted({self._size(n) for n in range(1, min(self.max_rows, WARM_SLOTS) + 1)})
        arrays = {size: _gather_rows(None, blank, np.zeros(size, np.int32)) for size in every}
        for size, device in arrays.items():
            nothing = np.zeros(size, np.int32)  # no row takes a step
            if size in sizes:
                forced = np.zeros([CHUNK, size], np.int32)
                rings, token, *_, penalties, _ = self._run(
                    device, nothing, nothing, forced, nothing
                )
                device = dict(device, rings=rings, token=token, penalties=penalties)
            device = jax.block_until_ready(_put_row(device, blank, np.int32(0), key, np.int32(0)))
            for other in every:
                if other > size or 4 * other <= size:
                    index = np.zeros(other, np.int32)
                    jax.block_until_ready(_gather_rows(device, blank, index))

    def _blank_row(self) -> dict:
        """The arrays of a free slot: an empty text that never samples (made once)."""
        if self._blank is None:
            config = self.model.config
            self._blank = on_device({  # committed, as _put_row's outputs: one compiled form
                "rings": empty_rings(config, 1),
                "token": jnp.full([1], eos_id(self.model), jnp.int32),
                "keys": device_row_keys(0, 1),
                "sampling": SamplerRows.of([Sampler()], config.n_vocab),
                "penalties": Penalties.start(config.n_vocab, [[]]),
                "eos": np.full([1], -1, np.int32),
            })  # fmt: skip
        return self._blank


def _row_index(a: jax.Array, batch: int, rows: jax.Array) -> jax.Array:
    """The entries of an array's first axis that hold these rows. Every array holds its
    rows row-major on its first axis, some several entries a row (a ring's heads: G =
    B·H), so row r is entries r·k … r·k + k − 1, k = the axis's length / the batch's."""
    k = a.shape[0] // batch
    return (rows[:, None] * k + jnp.arange(k)).ravel().astype(jnp.int32)


@jax.jit
def _gather_rows(device: dict | None, blank: dict, index: jax.Array) -> dict:
    """Rows `index` of the device arrays (None: no rows) followed by the blank row (the
    index one past their rows); one program per pair of slot counts."""
    source = blank if device is None else jax.tree_util.tree_map(
        lambda a, b: jnp.concatenate([a, b.astype(a.dtype)]), device, blank
    )  # fmt: skip
    batch = source["token"].shape[0]
    return jax.tree_util.tree_map(
        lambda a: jnp.take(a, _row_index(a, batch, index), axis=0), source
    )


@jax.jit
def _take_row(device: dict, slot: jax.Array) -> dict:
    """A copy of slot `slot`'s arrays (one row): a speculating row's arrays at a call's
    start; one program per slot count."""
    batch = device["token"].shape[0]

    def take(a):
        k = a.shape[0] // batch
        return jax.lax.dynamic_slice_in_dim(a, slot * k, k, axis=0)

    return jax.tree_util.tree_map(take, device)


@functools.partial(jax.jit, donate_argnums=(0,))
def _put_back(device: dict, row: dict, slot: jax.Array) -> dict:
    """`row` (as _take_row gave it) written back into slot `slot` of the device arrays,
    which are used up (written in place)."""
    return _write_slot(device, row, slot)


def _write_slot(device: dict, row: dict, slot: jax.Array) -> dict:
    batch = device["token"].shape[0]

    def put(a, b):
        k = a.shape[0] // batch
        return jax.lax.dynamic_update_slice_in_dim(a, b.astype(a.dtype), slot * k, axis=0)

    return jax.tree_util.tree_map(put, device, row)


@functools.partial(jax.jit, donate_argnums=(0,))
def _put_row(device: dict, new: dict, slot: jax.Array, key: jax.Array, sample: jax.Array
             ) -> dict:  # fmt: skip
    """`new`'s one row written into slot `slot` of the device arrays, its key that of
    sample `sample` of the text (decode_loop.row_keys: fold_in(key, sample)); the slot
    is an argument, so one program serves every slot of a given count. The device
    arrays are used up (written in place: a copy of every row took 15 ms a request)."""
    return _write_slot(device, dict(new, keys=jax.random.fold_in(key, sample)[None]), slot)
