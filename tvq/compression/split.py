"""A file coded as several rows of one batch: `tvq compress --split N` (docs/DESIGN.md
section 16).

One row codes one token per step at full context; on this CPU a step's cost is mostly
the weights' reads, which a batch of rows shares (RESULTS section 19: 1 row 680 tokens
a second, 32 rows 2,160). So a split file is cut into frames of SPLIT_FRAME_TOKENS
tokens that go to its N rows in turn: frame i to row i mod N, each row's context being
its own earlier frames. The rows run as one batch of N, a width the header records: the
batch's width changes the numbers (XLA:CPU picks its kernels by shape), so the
decompressor runs the same width, and a split file's bytes depend on N (never on the
files beside it: a split file runs alone).

Rounds: N frames, one a row, run together; the records are written in order when the
round ends (memory: N frames, two rounds read ahead). What is left when less than two
rounds remain is cut into N equal frames, so that no row idles in the last (`rounds`).
A row whose frame is stored (binary, or coded in vain) goes back to its state at the
round's start, on both sides: the compressor's ran the frame, the decompressor's idled
(fed dummy tokens) beside the others.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable, Iterator
from typing import BinaryIO

import jax
import jax.numpy as jnp
import numpy as np

from tvq.compression import coder
from tvq.compression.coder import STEPS, WINDOW, Result, Steps, probe
from tvq.compression.container import (
    END_BYTES,
    FRAME_BYTES,
    STORED_BYTES,
    Frame,
    Header,
    read_record,
    write_end,
    write_stored,
)
from tvq.compression.jobs import (
    CodingFrame,
    DecodingFrame,
    Frames,
    check_end,
    looks_binary,
)
from tvq.compression.symbols import NO_BYTE, Symbols
from tvq.nn.ring import empty_rings
from tvq.runtime.context import eos_id
from tvq.runtime.model import Model

SPLIT_FRAME_TOKENS = 4096  # a split file's frames: ~13 KB of text each
MAX_SPLIT = 64  # rows at most (the batch's state: 6.8 MB a row with the built-in model)
APPROX_BYTES_PER_TOKEN = 3  # to size a file's rows from its length

OnProgress = Callable[[int], None]  # called with the original's bytes done so far
FrameData = tuple[list[int], list[int], bytes]  # a frame's tokens, escaped bytes and bytes


def rows_for(requested: int, size: int | None) -> int:
    """The rows a file of `size` bytes (None: unknown, a pipe) is split into: those
    asked for, or fewer if the file has fewer frames to give them."""
    if size is None:
        return requested
    frames = -(-size // (SPLIT_FRAME_TOKENS * APPROX_BYTES_PER_TOKEN))
    return max(1, min(requested, frames))


class Batch:
    """N rows stepping as one batch, each its frame of the round (or idle)."""

    def __init__(self, model: Model, rows: int, escape: int | None) -> None:
        self.model, self.rows = model, rows
        self.escape = np.int32(NO_BYTE if escape is None else escape)
        self.ring = jax.tree_util.tree_map(jnp.copy, empty_rings(model.config, rows))
        self.last = np.full(rows, eos_id(model), np.int32)
        self.kept = None

    def run(self, frames: list[CodingFrame | DecodingFrame | None], symbols: Symbols,
            on_step: Callable[[int], None]) -> None:  # fmt: skip
        """Runs each row's frame (None: the row idles) to its end; on_step(bytes of the
        original done) after each call."""
        self.kept = (jax.tree_util.tree_map(jnp.copy, self.ring), self.last.copy())
        while True:
            active = [i for i, frame in enumerate(frames) if frame is not None and frame.left]
            if not active:
                return
            k = STEPS if min(frames[i].left for i in active) >= STEPS else 1
            targets = np.zeros([k, self.rows, 2], np.int32)
            windows = np.zeros([self.rows, WINDOW], np.uint8)
            states = np.zeros(self.rows, np.uint32)
            decoding = np.zeros(self.rows, bool)
            for i in active:
                frame = frames[i]
                if isinstance(frame, DecodingFrame):
                    window = frame.window()
                    windows[i, : len(window)] = np.frombuffer(window, np.uint8)
                    states[i], decoding[i] = frame.state, True
                else:
                    targets[:, i] = frame.targets(k)
            inputs = (self.last, states, decoding, self.escape)
            (self.ring, (last, states, reads)), outs = coder.coding_steps(
                self.model.config, self.model.params, self.ring, inputs, targets, windows,
                batched=True)  # fmt: skip
            outs, last = np.asarray(outs), np.asarray(last)
            states, reads = np.asarray(states), np.asarray(reads)
            done = 0
            for i in active:
                steps = Steps(*outs[i].T)
                done += frames[i].take(steps, int(states[i]), int(reads[i]), symbols)
                self.last[i] = last[i]
            on_step(done)

    def restore(self, rows: list[int]) -> None:
        """Puts these rows back as they were at the round's start."""
        if not rows:
            return
        mask = np.zeros(self.rows, bool)
        mask[rows] = True
        self.ring = _restore(self.ring, self.kept[0], mask)
        self.last[rows] = self.kept[1][rows]


@jax.jit
def _restore(ring, kept, mask):
    def pick(now, then):
        rows = jnp.repeat(mask, now.shape[0] // mask.shape[0])
        return jnp.where(rows.reshape(-1, *[1] * (now.ndim - 1)), then, now)

    return jax.tree_util.tree_map(pick, ring, kept)


def encode_split(model: Model, symbols: Symbols, settings: Header, rows: int, sized: bool,
                 source: BinaryIO, sink: BinaryIO, name: str, on_progress: OnProgress
                 ) -> Result:  # fmt: skip
    """Compresses a stream as up to `rows` rows → its Result. sized: `rows` was sized
    from the stream's length; else (a pipe) the rows are sized from what two rounds'
    read-ahead finds, at least 2. The header records the rows and the probe of their
    width."""
    result, started = Result(name), time.perf_counter()
    frames = Frames(symbols, source, SPLIT_FRAME_TOKENS)
    ahead = [frame for frame in (frames.next() for _ in range(2 * rows)) if frame is not None]
    if not sized and len(ahead) < 2 * rows:  # the whole input is read: no more rows than frames
        rows = max(2, rows_for(rows, sum(len(data) for _, _, data in ahead)))
    header = dataclasses.replace(settings, rows=rows, probe=probe(model, rows)).to_bytes()
    sink.write(header)
    result.compressed += len(header)
    batch, progress = Batch(model, rows, symbols.escape), 0

    def on_step(done: int) -> None:
        nonlocal progress
        progress += done
        on_progress(progress)

    for round_ in rounds(frames, rows, symbols, ahead):
        coding = [None if looks_binary(data) else CodingFrame(tokens, escaped, data)
                  for tokens, escaped, data in round_]  # fmt: skip
        batch.run(coding + [None] * (rows - len(coding)), symbols, on_step)
        stored = []
        for i, (frame, (_, _, data)) in enumerate(zip(coding, round_, strict=True)):
            result.original += len(data)
            if frame is None:
                result.compressed += write_stored(sink, data)
                stored.append(i)
                continue
            written, in_vain = frame.write(sink)
            result.compressed += written
            if in_vain:
                stored.append(i)
            else:  # the tokens coded (as the decompressor counts them)
                result.tokens += len(frame.tokens)
                result.escapes += frame.escapes
        batch.restore(stored)
        progress = result.original
    result.compressed += write_end(sink, frames.length, frames.sha.digest())
    result.seconds = time.perf_counter() - started
    return result


def rounds(frames: Frames, rows: int, symbols: Symbols, ahead: list[FrameData] = ()
           ) -> Iterator[list[FrameData]]:  # fmt: skip
    """The frames (the first already read: `ahead`) a round at a time: `rows` frames of
    SPLIT_FRAME_TOKENS while two rounds or more are left, then what is left cut into
    `rows` equal frames (up to twice as long), so that the last round keeps every row
    busy (the decompressor does not need to know: each frame gives its length). Every
    round but the last is of whole frames, so its rows all end together (Batch.run lets
    a row that ends early step on dummy tokens)."""
    pending: list[FrameData] = list(ahead)
    while True:
        while len(pending) < 2 * rows and (frame := frames.next()) is not None:
            pending.append(frame)
        if len(pending) >= 2 * rows:
            yield pending[:rows]
            pending = pending[rows:]
            continue
        tokens = [token for frame in pending for token in frame[0]]
        escaped = [byte for frame in pending for byte in frame[1]]
        size = -(-len(tokens) // rows)
        if tokens:
            yield [(tokens[at : at + size], escaped[at : at + size],
                    b"".join(map(symbols.bytes_of, tokens[at : at + size],
                                 escaped[at : at + size])))
                   for at in range(0, len(tokens), size)]  # fmt: skip
        return


def decode_split(model: Model, symbols: Symbols, rows: int, source: BinaryIO, sink: BinaryIO,
                 name: str, header_bytes: int, on_progress: OnProgress) -> Result:  # fmt: skip
    """Decompresses a split stream (its header read and checked) → its Result; each
    round's bytes are written once every frame of it has been checked."""
    result, started = Result(name, compressed=header_bytes), time.perf_counter()
    batch, sha, index, ended = Batch(model, rows, symbols.escape), hashlib.sha256(), 0, None
    progress = 0

    def on_step(done: int) -> None:
        nonlocal progress
        progress += done
        on_progress(progress)

    while ended is None:
        records = []  # (index, record)
        while len(records) < rows:
            index += 1
            record = read_record(source, name, index)
            if not isinstance(record, Frame | bytes):
                ended = record
                result.compressed += END_BYTES
                break
            result.compressed += (FRAME_BYTES + len(record.code) if isinstance(record, Frame)
                                  else STORED_BYTES + len(record))  # fmt: skip
            records.append((index, record))
        decoding = [DecodingFrame(r, name, at) if isinstance(r, Frame) else None
                    for at, r in records]  # fmt: skip
        batch.run(decoding + [None] * (rows - len(decoding)), symbols, on_step)
        out = [r if frame is None else frame.data()
               for frame, (_, r) in zip(decoding, records, strict=True)]  # fmt: skip
        for frame, data in zip(decoding, out, strict=True):  # the round checked: written
            if frame is not None:
                result.tokens += frame.record.tokens
                result.escapes += frame.escapes
            sink.write(data)
            sha.update(data)
            result.original += len(data)
        batch.restore([i for i, frame in enumerate(decoding) if frame is None])
        progress = result.original
    check_end(ended, result.original, sha, name)
    result.seconds = time.perf_counter() - started
    return result
