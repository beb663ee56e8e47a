"""The tokenizing workers: what each worker process of a preparation does with its unit of
work (a run of consecutive segments of the input files), and the pool that runs the units
(docs/DESIGN.md section 11).

Two passes: `scan_unit` counts a unit's documents (and finds bad JSONL lines before any
tokenizer is trained); `tokenize_unit` streams the unit's text through the tokenizer into
its own shards, one per split, plus its rows of the document index. Memory stays bounded
by a read piece, whatever the corpus: text is read READ_SIZE bytes at a time and
tokenized between cut points where the ids of the pieces equal those of the whole
(`Tokenizer.cut`); a JSONL document is one line. Workers are started with `spawn`: the
parent may have started JAX threads, which `fork` would copy mid-flight.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tvq.corpus.shards import SPLITS, TRAIN, VAL, UnitWriter
from tvq.corpus.sources import (
    BadLine,
    Segment,
    SegmentReader,
    Source,
    changed,
    document_text,
    has_text,
    reading,
    text_chunks,
)
from tvq.text.tokenizer import ByteTokenizer, SentencePieceTokenizer

PIECE_CHARS = 1 << 18  # text gathered before looking for a cut point
REPORT_BYTES = 1 << 20  # progress is published after this many bytes read


@dataclass
class Unit:
    """Consecutive segments, with what the pass needs to know about them."""

    index: int
    sources: Sequence[Source]
    segments: list[Segment]
    text_field: str = "text"
    skip_bad_lines: bool = False
    # tokenize only:
    folder: Path | None = None
    tokenizer: tuple[str, str] | None = None  # ("bytes", "") | ("sentencepiece", path)
    dtype: str = "<u2"
    held_out: np.ndarray | None = None  # bool over documents [first_doc, first_doc + n)
    first_doc: int = 0


@dataclass
class ScanResult:
    """Per segment: documents (text: whether the file holds one), lines, the characters
    of their text (an estimate of bytes), bad lines, the first of them (line within the
    segment, reason), and which lines are documents (JSONL; bits, np.packbits)."""

    documents: list[int] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    chars: list[int] = field(default_factory=list)
    bad: list[int] = field(default_factory=list)
    first_bad: list[tuple[int, str] | None] = field(default_factory=list)
    doc_lines: list[bytes] = field(default_factory=list)


@dataclass
class TokenizeResult:
    index: int
    tokens: dict[str, int]
    records: dict[str, int]
    bad_lines: int


# -- progress shared with the parent ------------------------------------------------------

_counter = None  # a multiprocessing.Value in a worker; a plain holder in-process


class _Local:
    """The counter of a preparation run in this process."""

    def __init__(self) -> None:
        self.value = 0

    def get_lock(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


def _init(counter) -> None:
    """A worker's start: Ctrl-C is the parent's to handle (it ends the pool), so the
    workers do not each print a traceback."""
    global _counter
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _counter = counter


class _Progress:
    """Bytes read from the files, published to the shared counter every REPORT_BYTES."""

    def __init__(self) -> None:
        self.pending = self.mark = 0

    def start(self) -> None:
        """A new file: its reader counts from 0."""
        self.mark = 0

    def at(self, consumed: int) -> None:
        self.pending += consumed - self.mark
        self.mark = consumed
        if self.pending >= REPORT_BYTES:
            self.flush()

    def flush(self) -> None:
        if _counter is not None and self.pending:
            with _counter.get_lock():
                _counter.value += self.pending
        self.pending = 0


class Pool:
    """Runs function(unit) for every unit, in order of units: on up to `workers` spawned
    processes (started on first use, kept for the next pass), or in this process for
    one worker or one unit. on_bytes(bytes read so far) is called about four times a
    second."""

    def __init__(self, workers: int) -> None:
        self.workers, self.pool, self.counter = workers, None, None

    def map(self, function: Callable, units: list[Unit], on_bytes: Callable[[int], None] | None):
        global _counter
        if self.workers <= 1 or len(units) <= 1:
            _counter = _Local()
            results = []
            try:
                for unit in units:
                    results.append(function(unit))
                    if on_bytes is not None:
                        on_bytes(_counter.value)
            finally:
                _counter = None
            return results
        if self.pool is None:
            context = multiprocessing.get_context("spawn")
            self.counter = context.Value("q", 0)
            self.pool = context.Pool(self.workers, initializer=_init, initargs=(self.counter,))
        self.counter.value = 0
        pending = self.pool.map_async(function, units, chunksize=1)
        while not pending.ready():
            pending.wait(0.25)
            if on_bytes is not None:
                on_bytes(self.counter.value)
        return pending.get()

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None


# -- the scan -----------------------------------------------------------------------------


def scan_unit(unit: Unit) -> ScanResult:
    progress, result = _Progress(), ScanResult()
    for seg in unit.segments:
        source = unit.sources[seg.source]
        if source.kind == "text":  # one document, if the file holds any text
            result.documents.append(int(has_text(source)))
            result.lines.append(0)
            result.chars.append(0)
            result.bad.append(0)
            result.first_bad.append(None)
            result.doc_lines.append(b"")
            continue
        docs = lines = chars = bad = 0
        first_bad, is_doc = None, bytearray()
        with reading(source), SegmentReader(source, seg) as reader:
            progress.start()
            for line in reader.lines():
                lines += 1
                progress.at(reader.consumed)
                try:
                    text = document_text(line, unit.text_field)
                except BadLine as e:
                    is_doc.append(0)
                    bad += 1
                    if first_bad is None:
                        first_bad = (lines, str(e))
                        if not unit.skip_bad_lines:
                            break
                    continue
                nonblank = text is not None and bool(text.strip())
                is_doc.append(nonblank)
                if nonblank:
                    docs += 1
                    chars += len(text)
            progress.at(reader.consumed)
        result.doc_lines.append(np.packbits(np.frombuffer(bytes(is_doc), np.uint8)).tobytes())
        result.documents.append(docs)
        result.lines.append(lines)
        result.chars.append(chars)
        result.bad.append(bad)
        result.first_bad.append(first_bad)
    progress.flush()
    return result


# -- tokenizing ---------------------------------------------------------------------------

_tokenizers: dict = {}


def _tokenizer(spec: tuple[str, str]):
    if spec not in _tokenizers:
        kind, path = spec
        _tokenizers[spec] = ByteTokenizer() if kind == "bytes" else SentencePieceTokenizer(path)
    return _tokenizers[spec]


class Encoder:
    """Text → token ids of the shard dtype; `pieces` tokenizes a stream of text between
    the tokenizer's cut points, so the ids joined equal `tokenizer.encode` of the whole."""

    def __init__(self, tokenizer, dtype: np.dtype) -> None:
        self.tokenizer, self.dtype = tokenizer, dtype
        self.bytes = isinstance(tokenizer, ByteTokenizer)

    def __call__(self, text: str) -> np.ndarray:
        if self.bytes:  # byte b → id b + 3, without a Python list per byte
            data = np.frombuffer(text.encode("utf-8"), np.uint8)
            return data.astype(self.dtype) + np.asarray(ByteTokenizer.OFFSET, self.dtype)
        return np.asarray(self.tokenizer.encode(text), self.dtype)

    def pieces(self, chunks: Iterator[str]) -> Iterator[tuple[np.ndarray, int]]:
        """(ids, UTF-8 bytes) per piece of a document's text."""
        pending = ""
        for chunk in chunks:
            if self.bytes:
                yield self(chunk), len(chunk.encode("utf-8"))
                continue
            pending += chunk
            if len(pending) < PIECE_CHARS:
                continue
            data = pending.encode("utf-8")
            at = self.tokenizer.cut(data)
            if at > 0:
                yield self(data[:at].decode("utf-8")), at
                pending = data[at:].decode("utf-8")
        if pending:
            yield self(pending), len(pending.encode("utf-8"))


def tokenize_unit(unit: Unit) -> TokenizeResult:
    """The unit's documents through the tokenizer into its own shard and index rows per
    split; a training document is followed by the end-of-document id."""
    tokenizer = _tokenizer(unit.tokenizer)
    dtype = np.dtype(unit.dtype)
    writers = {name: UnitWriter(unit.folder, name, unit.index, dtype) for name in SPLITS}
    work = _Tokenizing(unit, Encoder(tokenizer, dtype), np.asarray([tokenizer.eos_id], dtype),
                       writers)  # fmt: skip
    try:
        for seg in unit.segments:
            source = unit.sources[seg.source]
            with reading(source), SegmentReader(source, seg) as reader:
                if source.kind == "text":
                    work.text(seg, source, reader)
                else:
                    work.jsonl(seg, source, reader)
    finally:
        for writer in writers.values():
            writer.close()
    work.progress.flush()
    return TokenizeResult(
        unit.index,
        tokens={name: w.shard.tokens for name, w in writers.items()},
        records={name: w.count for name, w in writers.items()},
        bad_lines=work.bad_lines,
    )


class _Tokenizing:
    """One unit's tokenizing: a text file's segment, or a JSONL segment's documents."""

    def __init__(self, unit: Unit, encode: Encoder, eos: np.ndarray, writers) -> None:
        self.unit, self.encode, self.eos, self.writers = unit, encode, eos, writers
        self.progress, self.bad_lines = _Progress(), 0

    def split(self, source: Source, doc: int) -> UnitWriter:
        """The writer of the split that document `doc` (an ordinal) goes to."""
        unit = self.unit
        if not 0 <= doc - unit.first_doc < len(unit.held_out):
            raise changed(source.path)
        return self.writers[VAL if unit.held_out[doc - unit.first_doc] else TRAIN]

    def text(self, seg: Segment, source: Source, reader: SegmentReader) -> None:
        """A text file's segment: its piece of the file's one document (none for
        whitespace alone), the end-of-document id after the piece that ends it."""
        if not seg.documents:
            return
        split = self.split(source, seg.first_doc)
        tokens = size = 0
        self.progress.start()
        for ids, n_bytes in self.encode.pieces(text_chunks(reader)):
            split.shard.write(ids)
            tokens, size = tokens + len(ids), size + n_bytes
            self.progress.at(reader.consumed)
        self.progress.at(reader.consumed)
        if seg.ends and split is self.writers[TRAIN]:
            split.shard.write(self.eos)
        split.record(seg.source, 0, tokens, size, seg.continues)

    def jsonl(self, seg: Segment, source: Source, reader: SegmentReader) -> None:
        """A JSONL segment: one document per line, as the scan counted them."""
        doc = seg.first_doc
        self.progress.start()
        for number, line in enumerate(reader.lines(), seg.first_line):
            self.progress.at(reader.consumed)
            try:
                text = document_text(line, self.unit.text_field)
            except BadLine:
                if not self.unit.skip_bad_lines:
                    raise changed(source.path, number) from None
                self.bad_lines += 1
                continue
            if text is None or not text.strip():
                continue
            split = self.split(source, doc)
            ids = self.encode(text)
            split.shard.write(ids)
            if split is self.writers[TRAIN]:
                split.shard.write(self.eos)
            split.record(seg.source, number, len(ids), len(text.encode("utf-8")), False)
            doc += 1
        self.progress.at(reader.consumed)
        if doc != seg.first_doc + seg.documents:
            raise changed(source.path)
