"""The tokenizing workers: what each worker process of a preparation does with its unit of
work (a run of consecutive segments of the input files), and the pool that runs the units
(docs/DESIGN.md section 11).

Two passes: `scan_unit` counts a unit's documents (and finds bad JSONL lines before any
tokenizer is trained); `tokenize_unit` streams the unit's text through the tokenizer into
its own shards, one per split, plus its rows of the document index. Memory stays bounded
by a read piece, whatever the corpus: text is read READ_SIZE bytes at a time, a JSONL
line longer than LONG_LINE is parsed streaming (tvq/corpus/jsonl.py), and a document's
text is tokenized in pieces (`Encoder.pieces`), cut where the ids of the pieces equal
those of the whole (`Tokenizer.cut`: after a newline, before a space after a
non-space). Where a document runs MAX_PIECE_CHARS characters with no such place (a base64
blob, a line of CJK without spaces) it is cut there anyway, so that memory stays bounded;
only there can the ids differ from `tokenizer.encode` of the whole: the two sides are
each encoded exactly, so a token that would have spanned the cut is two tokens (or more)
there. It cannot matter: the ids still decode to the document's text (tvq's tokenizers
are lossless: byte fallback, no normalisation), the text is no different, and it happens
once in a million characters or more of such text. (A tokenizer that allows no cut at
all, one that adds a dummy prefix or normalises, not tvq's own, may add its dummy "▁" at
such a cut.) The units run on the processes of tvq/corpus/pool.py.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tvq.corpus.jsonl import RESTART, long_document
from tvq.corpus.pool import Progress
from tvq.corpus.shards import SPLITS, TRAIN, VAL, UnitWriter
from tvq.corpus.sources import (
    BadLine,
    LongLine,
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
MAX_PIECE_CHARS = 1 << 20  # text gathered before cutting anyway (the module docstring)


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


# -- the scan -----------------------------------------------------------------------------


def scan_unit(unit: Unit) -> ScanResult:
    progress, result = Progress(), ScanResult()
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
                    n_chars, nonblank = _measure(line, unit.text_field)
                except BadLine as e:
                    is_doc.append(0)
                    bad += 1
                    if first_bad is None:
                        first_bad = (lines, str(e))
                        if not unit.skip_bad_lines:
                            break
                    continue
                is_doc.append(nonblank)
                if nonblank:
                    docs += 1
                    chars += n_chars
            progress.at(reader.consumed)
        result.doc_lines.append(np.packbits(np.frombuffer(bytes(is_doc), np.uint8)).tobytes())
        result.documents.append(docs)
        result.lines.append(lines)
        result.chars.append(chars)
        result.bad.append(bad)
        result.first_bad.append(first_bad)
    progress.flush()
    return result


def _measure(line: bytes | LongLine, field: str) -> tuple[int, bool]:
    """(characters, whether anything but whitespace) of a JSONL line's document."""
    if not isinstance(line, LongLine):
        text = document_text(line, field)
        return (len(text), bool(text.strip())) if text is not None else (0, False)
    chars, nonblank = 0, False
    for piece in long_document(line, field):
        if piece is RESTART:
            chars, nonblank = 0, False
        else:
            chars, nonblank = chars + len(piece), nonblank or bool(piece.strip())
    return chars, nonblank


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
            if at == 0 and len(pending) >= MAX_PIECE_CHARS:
                at = len(data)  # no exact cut for a million characters (the module docstring)
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
        self.progress, self.bad_lines = Progress(), 0

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
            if isinstance(line, LongLine):
                doc += self.long_line(seg, source, line, number, doc)
                continue
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

    def long_line(self, seg: Segment, source: Source, line: LongLine, number: int,
                  doc: int) -> int:  # fmt: skip
        """A long JSONL line's document streamed into its split's shard; what it wrote
        is cut off again where the document starts over (its field repeated) or the line
        turns out to be none → 1 for a document, else 0."""
        unit, held_out = self.unit, self.unit.held_out
        known = 0 <= doc - unit.first_doc < len(held_out)
        writer = self.split(source, doc) if known else self.writers[TRAIN]
        mark, parsed, nonblank = writer.shard.tokens, long_document(line, unit.text_field), False

        def occurrence() -> Iterator[str]:  # the field's text up to where it starts over
            nonlocal nonblank
            for piece in parsed:
                if piece is RESTART:
                    raise _StartOver
                nonblank = nonblank or bool(piece.strip())
                yield piece

        while True:
            writer.shard.truncate(mark)
            tokens = size = 0
            nonblank = False
            try:
                for ids, n_bytes in self.encode.pieces(occurrence()):
                    writer.shard.write(ids)
                    tokens, size = tokens + len(ids), size + n_bytes
            except _StartOver:
                continue
            except BadLine:
                writer.shard.truncate(mark)
                if not unit.skip_bad_lines:
                    raise changed(source.path, number) from None
                self.bad_lines += 1
                return 0
            break
        if not nonblank:
            writer.shard.truncate(mark)
            return 0
        if self.split(source, doc) is not writer:
            raise changed(source.path, number)
        if writer is self.writers[TRAIN]:
            writer.shard.write(self.eos)
        writer.record(seg.source, number, tokens, size, False)
        return 1


class _StartOver(Exception):
    """A long line's text field came again: its document starts over."""
