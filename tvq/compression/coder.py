"""Compressing with the model (docs/DESIGN.md section 16): the model's next-token
distribution drives a range coder, one token at a time, in constant memory.

The compressor and the decompressor run the same code: `Rows` steps the model one
token per row with `coding_steps`, hands each row's probabilities to its job, and the
job codes a token with them (`Encoding`: the file's next token, known; `Decoding`: read
from the compressed words). Both therefore see the same numbers, bit for bit, on one
machine. What would break that:

- the batch's width: XLA:CPU picks its matrix kernels by shape, so a row's numbers in a
  batch of 8 differ from the same row alone (measured: widths {1}, {2-5}, {8}, {16}
  each round differently). `coding_steps` therefore runs W rows as W separate one-row
  steps inside one program: each row's numbers are those of a row alone, and a file's
  compressed bytes do not depend on the files beside it;
- the form: only the decoding step is used (the blockwise and parallel forms equal it
  within rounding only, invariant 6), on one device;
- the machine: another JAX version, CPU or accelerator may round differently. The
  header keeps a hash of the numbers of a fixed probe (`probe`); a decompressor whose
  probe differs refuses the file, and each frame's checksum catches what a probe
  cannot.

The entropy coder is constriction's range coder (32-bit words) with its categorical
model (perfect=False): it quantizes the float probabilities to integer frequencies with
a floor of one, deterministically, in its own code. An escaped byte is coded uniformly.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tvq.compression.container import (
    Header,
    fingerprint16,
)
from tvq.errors import InputError
from tvq.files import warm
from tvq.nn.ring import empty_rings
from tvq.nn.transformer import Transformer, network
from tvq.runtime.context import eos_id, require_tokenizer
from tvq.runtime.model import Model

STEPS = 32  # steps per call where the inputs are known (compressing)
MAX_ROWS = 4  # files coded at once by default: 4 one-row steps in one program ran 580 tokens/s
# against 344 for one here, 8 ran 778 but took 16 s to compile (RESULTS section 16)
PROBE_TOKENS = (3, 100, 1000, 7, 42, 4095, 9, 256)  # fed from a start; ids mod vocabulary


@warm.entry(static_argnames=("config",), donate_argnums=(2,))
def coding_steps(config, params, rings, inputs):
    """K tokens for each of W rows: rings, a tuple of W one-row rings; inputs [K, W] →
    (the rings after, the probabilities of each next token [K, W, V] float32). The rows
    run as W one-row steps, never as one batch of W (see the module's docstring); the
    compressor, which knows its inputs, runs K = STEPS at a time, the decompressor one."""
    net, variables, tables = network(config, params)

    def step(rings, tokens):
        new, probs = [], []
        for row, ring in enumerate(rings):
            ring, log_probs = net.apply(variables, tokens[row : row + 1], ring, tables,
                                        method=Transformer.step)  # fmt: skip
            new.append(ring)
            probs.append(jnp.exp(log_probs))
        return tuple(new), jnp.concatenate(probs)

    return jax.lax.scan(step, rings, inputs)


def _fresh_ring(model: Model):
    return jax.tree_util.tree_map(jnp.copy, empty_rings(model.config, 1))


class Job:
    """One file through the coder: `inputs(k)` are its next k inputs (`ready()` of them
    are known); `take(probs)` codes one token with the model's probabilities; `done`
    once it has coded its last."""

    token: int
    done: bool = False
    name: str = ""
    progress: int = 0  # bytes of the original done so far
    mark: bool = False  # keep the row's state as it is now (before the next step)
    rewind: bool = False  # put the kept state back (after this step)

    def ready(self) -> int:
        return 1

    def inputs(self, k: int) -> list[int]:
        return [self.token]

    def take(self, probs: np.ndarray) -> None:
        raise NotImplementedError


class Rows:
    """W rows stepping together, each running a job; a row that finishes takes the
    next job from a fresh state. A job's numbers are those of running it alone."""

    def __init__(self, model: Model, width: int) -> None:
        self.model, self.width = model, width

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
            for slot in slots:
                if slot.job.mark:
                    slot.kept, slot.job.mark = jax.tree_util.tree_map(jnp.copy, slot.ring), False
            k = STEPS if all(slot.job.ready() >= STEPS for slot in slots) else 1
            inputs = np.array([slot.job.inputs(k) for slot in slots], np.int32).T
            rings = tuple(slot.ring for slot in slots)
            rings, probs = coding_steps(self.model.config, self.model.params, rings, inputs)
            probs = np.asarray(probs)
            for i, (slot, ring) in enumerate(zip(slots, rings, strict=True)):
                slot.ring = ring
                try:
                    for j in range(k):
                        slot.job.take(probs[j, i])
                except Exception as e:  # this file's error (corrupt input, a full disk)
                    slot.job.result.error, slot.job.done = e, True
                if slot.job.rewind:
                    slot.ring, slot.kept, slot.job.rewind = slot.kept, None, False
            for slot in [slot for slot in slots if slot.job.done]:
                slots.remove(slot)
                yield slot.job
            if on_step is not None:
                on_step([slot.job for slot in slots])


@dataclasses.dataclass
class _Slot:
    """A running job, its row's state, and that state at the job's last mark."""

    job: Job
    ring: Any
    kept: Any = None


def coder_library():
    """constriction, or InputError saying how to install it."""
    try:
        import constriction
    except ImportError:
        raise InputError("tvq compress needs the constriction package: pip install "
                         "'tvq[compress]' (on Linux aarch64 it builds from source, with "
                         "Rust)") from None  # fmt: skip
    return constriction


@functools.cache
def categorical():
    return coder_library().stream.model.Categorical(perfect=False)


@functools.cache
def uniform_byte():
    return coder_library().stream.model.Uniform(256)


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


def probe(model: Model) -> bytes:
    """8 bytes of a hash of the coder's numbers on fixed tokens from a start: equal
    where a file compressed here decompresses to the same bytes."""
    ring, digest = (_fresh_ring(model),), hashlib.sha256()
    token = eos_id(model)
    for t in PROBE_TOKENS:
        ring, probs = coding_steps(model.config, model.params, ring, np.array([[token]], np.int32))
        digest.update(np.asarray(probs).tobytes())
        token = t % model.config.n_vocab
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
