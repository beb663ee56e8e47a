"""Compressing with the model (docs/DESIGN.md section 16): the model's next-token
distribution drives an entropy coder (tvq.compression.rans), one token at a time, in
constant memory.

The compressor and the decompressor run the same program: `coding_steps` steps the
model one token per row, turns each row's distribution into integer frequencies, and
either takes the row's next token from its inputs (`Encoding`: the file's tokens are
known; the host then codes each token's (start, frequency)) or decodes it from the
compressed stream (`Decoding`), and feeds it to the next step. Both sides therefore see
the same frequencies, bit for bit, on one machine, and both run 32 steps a call. What
would break that:

- the batch's width: XLA:CPU picks its matrix kernels by shape, so a row's numbers in a
  batch of 8 differ from the same row alone (measured: widths {1}, {2-5}, {8}, {16}
  each round differently). `coding_steps` therefore runs W rows as W separate one-row
  steps inside one program: each row's numbers are those of a row alone, and a file's
  compressed bytes do not depend on the files beside it;
- the form: only the decoding step is used (the blockwise and parallel forms equal it
  within rounding only, invariant 6), on one device;
- the machine: another JAX version, CPU or accelerator may round differently. The
  header keeps a hash of the frequencies of a fixed probe (`probe`); a decompressor
  whose probe differs refuses the file, and each frame's checksum catches what a probe
  cannot.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tvq.compression import rans
from tvq.compression.container import (
    Header,
    fingerprint16,
)
from tvq.compression.symbols import NO_BYTE
from tvq.files import warm
from tvq.nn.ring import empty_rings
from tvq.nn.transformer import Transformer, network
from tvq.runtime.context import eos_id, require_tokenizer
from tvq.runtime.model import Model

STEPS = 32  # steps per call
WINDOW = 256  # stream bytes a decoding call may read: ≤ 2 * rans.MAX_READ per step
MAX_ROWS = 4  # files coded at once by default: 4 one-row steps in one program ran 580 tokens/s
# against 344 for one here, 8 ran 778 but took 16 s to compile (RESULTS section 16)
PROBE_TOKENS = (3, 100, 1000, 7, 42, 4095, 9, 256)  # fed from a start; ids mod vocabulary


class Steps(NamedTuple):
    """One row's steps of a call, each [K]: the token coded (fed to the next step), its
    escaped byte (NO_BYTE: none), its start and frequency in the step's table, and a
    hash of that table."""

    tokens: np.ndarray
    bytes: np.ndarray
    starts: np.ndarray
    freqs: np.ndarray
    hashes: np.ndarray


@warm.entry(static_argnames=("config", "batched"), donate_argnums=(2,))
def coding_steps(config, params, rings, coder, targets, windows, batched=False):
    """K steps for each of W rows. rings: a tuple of W one-row rings, or (batched) one
    ring of W rows; coder: (each row's last token [W] int32, its decoder's state [W]
    uint32, whether it decodes [W] bool, the escape token (-1: none)); targets [K, W, 2]
    int32: an encoding row's tokens and escaped bytes; windows [W, WINDOW] uint8: a
    decoding row's next stream bytes. → (rings, (last tokens, states, bytes read [W])),
    per-row outputs [W, K, 5] int32 (Steps' fields; the hash as int32 bits).

    The rows run as W one-row steps, so that each row's numbers are those of a row
    alone (see the module's docstring); `batched`, as one batch of W (a split file's
    rows, tvq.compression.split: the width is the file's, so both sides run the same
    program)."""
    net, variables, tables = network(config, params)
    last, states, decoding, escape = coder

    def code(log_probs, decoding, target, state, window, at):
        return _code_row(log_probs, decoding, target, state, window, at, escape)

    def step(carry, target):
        rings, tokens, states, ats = carry
        if batched:
            rings, log_probs = net.apply(variables, tokens, rings, tables,
                                         method=Transformer.step)  # fmt: skip
            tokens, states, ats, outs = jax.vmap(code)(log_probs, decoding, target, states,
                                                      windows, ats)  # fmt: skip
            return (rings, tokens, states, ats), outs
        new = []
        for row, (ring, token) in enumerate(zip(rings, tokens, strict=True)):
            ring, log_probs = net.apply(variables, token[None], ring, tables,
                                        method=Transformer.step)  # fmt: skip
            coded = code(log_probs[0], decoding[row], target[row], states[row], windows[row],
                         ats[row])  # fmt: skip
            new.append((ring, *coded))
        rings, tokens, states, ats, outs = zip(*new, strict=True)
        return (rings, jnp.stack(tokens), jnp.stack(states), jnp.stack(ats)), jnp.stack(outs)

    ats = jnp.zeros_like(last)
    (rings, last, states, ats), outs = jax.lax.scan(step, (rings, last, states, ats), targets)
    return (rings, (last, states, ats)), jnp.swapaxes(outs, 0, 1)


def _code_row(log_probs, decoding, target, state, window, at, escape):
    """One row's step of the coder: its table from its log-probs [V], and its token (and
    escaped byte): `target`'s if it encodes, else read from `window` at `at` with
    `state`. → (token, state, at, Steps' fields [5])."""
    freq = rans.frequencies(log_probs)
    starts = jnp.cumsum(freq) - freq
    read, state_t, at_t = rans.decode(state, window, at, rans.token_slot(starts, freq))
    token = jnp.where(decoding, read, target[0])
    byte, state_b, at_b = rans.decode(state_t, window, at_t, rans.byte_slot)
    escaped = token == escape
    byte = jnp.where(escaped, jnp.where(decoding, byte, target[1]), NO_BYTE)
    state, at = jnp.where(escaped, state_b, state_t), jnp.where(escaped, at_b, at_t)
    table = jax.lax.bitcast_convert_type(rans.table_hash(freq), jnp.int32)
    return token, state, at, jnp.stack([token, byte, starts[token], freq[token], table])


def _fresh_ring(model: Model):
    return jax.tree_util.tree_map(jnp.copy, empty_rings(model.config, 1))


class Job:
    """One file through the coder. Before each call: `ready()` steps can run (the call
    runs at most that many), `targets(k)` are an encoding job's next k (token, escaped
    byte) pairs, `window()` a decoding job's next stream bytes from `state`; after it,
    `take(steps, state, read)` takes the row's k steps and its decoder's state and bytes
    read. `done` once it has coded its last token."""

    token: int  # the last token coded: the next step's input
    state: int = 0  # the decoder's state (a decoding job)
    decoding: bool = False
    done: bool = False
    name: str = ""
    progress: int = 0  # bytes of the original done so far
    mark: bool = False  # keep the row's state as it is now (before the next step)
    rewind: bool = False  # put the kept state back (after this call)

    def ready(self) -> int:
        return 1

    def targets(self, k: int) -> list[tuple[int, int]]:
        return [(0, NO_BYTE)] * k

    def window(self) -> bytes:
        return b""

    def take(self, steps: Steps, state: int, read: int) -> None:
        raise NotImplementedError


class Rows:
    """W rows stepping together, each running a job; a row that finishes takes the
    next job from a fresh state. A job's numbers are those of running it alone."""

    def __init__(self, model: Model, width: int, escape: int | None) -> None:
        self.model, self.width = model, width
        self.escape = np.int32(NO_BYTE if escape is None else escape)

    def run(self, jobs: Iterable[Job], on_step: Callable[[list[Job]], None] | None = None
            ) -> Iterator[Job]:  # fmt: skip
        """Runs jobs (started lazily, in order) → each job as it finishes; on_step(the
        running jobs) after each call (progress). The program's width follows the jobs
        running (a row's numbers do not depend on it), so no row idles."""
        pending, slots = iter(jobs), []
        while True:
            while len(slots) < self.width:
                job = next(pending, None)
                if job is None:
                    break
                if job.done:  # nothing to code (an empty file)
                    yield job
                    continue
                slots.append(_Slot(job, _fresh_ring(self.model)))
            if not slots:
                return
            self._call([slot for slot in slots])
            for slot in [slot for slot in slots if slot.job.done]:
                slots.remove(slot)
                yield slot.job
            if on_step is not None:
                on_step([slot.job for slot in slots])

    def _call(self, slots: list[_Slot]) -> None:
        """One call of coding_steps for the running rows, and each job taking its steps."""
        jobs = [slot.job for slot in slots]
        for slot in slots:
            if slot.job.mark:
                slot.kept, slot.job.mark = jax.tree_util.tree_map(jnp.copy, slot.ring), False
        k = STEPS if all(job.ready() >= STEPS for job in jobs) else 1
        coder = (np.array([job.token for job in jobs], np.int32),
                 np.array([job.state for job in jobs], np.uint32),
                 np.array([job.decoding for job in jobs]), self.escape)  # fmt: skip
        targets = np.array([job.targets(k) for job in jobs], np.int32).transpose(1, 0, 2)
        windows = np.zeros([len(jobs), WINDOW], np.uint8)
        for i, job in enumerate(jobs):
            window = job.window()
            windows[i, : len(window)] = np.frombuffer(window, np.uint8)
        rings = tuple(slot.ring for slot in slots)
        (rings, (_, states, reads)), outs = coding_steps(
            self.model.config, self.model.params, rings, coder, targets, windows)  # fmt: skip
        outs, states, reads = np.asarray(outs), np.asarray(states), np.asarray(reads)
        for i, (slot, ring) in enumerate(zip(slots, rings, strict=True)):
            slot.ring = ring
            try:
                slot.job.take(Steps(*outs[i].T), int(states[i]), int(reads[i]))
            except Exception as e:  # this file's error (corrupt input, a full disk)
                slot.job.result.error, slot.job.done = e, True
            if slot.job.rewind:
                slot.ring, slot.kept, slot.job.rewind = slot.kept, None, False


@dataclasses.dataclass
class _Slot:
    """A running job, its row's state, and that state at the job's last mark."""

    job: Job
    ring: Any
    kept: Any = None


def settings_header(model: Model) -> Header:
    """The header of what `model` (as it runs: dtype, aggregate cache) compresses here."""
    tokenizer = require_tokenizer(model)
    return Header(model=fingerprint16(model.fingerprint),
                  tokenizer=fingerprint16(tokenizer.fingerprint), probe=probe(model),
                  platform=platform(), bfloat16=model.config.dtype == "bfloat16",
                  agg_cache=model.config.agg_cache)  # fmt: skip


def platform() -> str:
    device = jax.local_devices()[0]
    return f"jax {jax.__version__} {device.platform} {device.device_kind}"


def probe(model: Model, rows: int = 1) -> bytes:
    """8 bytes of a hash of the coder's frequency tables on fixed tokens from a start,
    every row fed them: equal where a file compressed here decompresses to the same
    bytes. rows > 1: the batched program of a split file of that many rows (its width
    changes the numbers)."""
    config, digest, batched = model.config, hashlib.sha256(), rows > 1
    rings = jax.tree_util.tree_map(jnp.copy, empty_rings(config, rows))
    rings = rings if batched else (rings,)
    last = np.full(rows, eos_id(model), np.int32)
    idle = (np.zeros(rows, np.uint32), np.zeros(rows, bool), np.int32(NO_BYTE))
    windows = np.zeros([rows, WINDOW], np.uint8)
    for token in PROBE_TOKENS:
        targets = np.tile(np.array([token % config.n_vocab, NO_BYTE], np.int32), (1, rows, 1))
        (rings, (last, _, _)), outs = coding_steps(config, model.params, rings, (last, *idle),
                                                   targets, windows, batched=batched)  # fmt: skip
        digest.update(np.asarray(outs).astype("<i4").tobytes())
    return digest.digest()[:8]


@dataclasses.dataclass
class Result:
    """One file's outcome: its sizes, tokens and time, or the error that stopped it."""

    name: str
    original: int = 0  # bytes
    compressed: int = 0  # bytes
    tokens: int = 0
    escapes: int = 0  # bytes coded through the escape
    seconds: float = 0.0
    error: Exception | None = None

    @property
    def bits_per_byte(self) -> float:
        return 8 * self.compressed / self.original if self.original else 0.0


class Failed(Job):
    """A job that could not start (its input unreadable, its header wrong)."""

    done = True

    def __init__(self, name: str, error: Exception) -> None:
        self.name, self.result = name, Result(name, error=error)
