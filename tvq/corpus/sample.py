"""The text a new sentencepiece tokenizer trains on (docs/DESIGN.md section 11, phase 3
of tvq/corpus/build.py): a bounded sample of the training documents, so that its cost
does not grow with the corpus."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tvq.corpus.jsonl import RESTART, long_document
from tvq.corpus.sources import (
    BadLine,
    LongLine,
    Segment,
    SegmentReader,
    Source,
    changed,
    document_text,
    expanded_size,
    reading,
    text_chunks,
)

SAMPLE_MIN_TAKE = 4096  # a document's head shorter than this is not read for the sample


class TokenizerText:
    """The training documents' text that sentencepiece trains on, written to `out`. Up to
    `limit` bytes (as estimated from the scan): every training document, joined by
    newlines (the text a run from text trains on). Beyond: from each text file a head
    of its share of `limit` (cut after a newline), and every k-th JSONL document, so the
    sample spreads over the whole corpus and only it is parsed."""

    def __init__(self, sources: Sequence[Source], text_field: str, out) -> None:
        self.sources, self.text_field, self.out = sources, text_field, out
        self.written, self.first = 0, True

    def emit(self, text: str) -> None:
        if not self.first:
            self.out.write("\n")
            self.written += 1
        self.out.write(text)
        self.written += len(text.encode("utf-8"))
        self.first = False

    def write(self, segments, chars, doc_lines, mask: np.ndarray, limit: int) -> int:
        self.limit = limit
        fraction = min(1.0, limit / max(self.estimate(segments, chars, mask), 1))
        credit = 0.0
        for seg, bits in zip(segments, doc_lines, strict=True):
            source = self.sources[seg.source]
            if not seg.documents:
                continue
            if source.kind == "text":
                credit = self.text(source, mask[seg.first_doc], fraction, credit)
            else:
                credit = self.jsonl(source, seg, bits, mask, fraction, credit)
        return self.written

    def estimate(self, segments, chars, mask: np.ndarray) -> int:
        """Bytes of the training documents, from the scan (a JSONL line's characters)."""
        estimate = 0
        for seg, n_chars in zip(segments, chars, strict=True):
            if seg.documents:
                held = mask[seg.first_doc : seg.first_doc + seg.documents]
                train = seg.documents - int(held.sum())
                source = self.sources[seg.source]
                estimate += expanded_size(source) * train if source.kind == "text" else (
                    n_chars * train // seg.documents)  # fmt: skip
        return estimate

    def text(self, source: Source, held: bool, fraction: float, credit: float) -> float:
        """A text file's document, or a head of it as long as its credit → the credit left."""
        if held:
            return credit
        if fraction >= 1:
            self.emit(_head(source, None))
            return credit
        credit += fraction * expanded_size(source)
        if credit >= SAMPLE_MIN_TAKE:
            head = _head(source, int(credit))
            if head:
                self.emit(head)
                credit -= len(head.encode("utf-8"))
        return credit

    def jsonl(self, source: Source, seg: Segment, bits: bytes, mask: np.ndarray,
              fraction: float, credit: float) -> float:  # fmt: skip
        """The training documents of a JSONL segment, each once its credit covers it (of a
        long line, its first `self.limit` characters: the sample's bound)."""
        is_doc = np.unpackbits(np.frombuffer(bits, np.uint8)).astype(bool)
        doc = seg.first_doc
        with reading(source), SegmentReader(source, seg) as reader:
            for number, line in enumerate(reader.lines()):
                if number >= len(is_doc):
                    raise changed(source.path)
                if not is_doc[number]:
                    continue
                held, doc = mask[doc], doc + 1
                if held:
                    continue
                try:
                    if isinstance(line, LongLine):
                        text = _long_head(line, self.text_field, self.limit)
                    elif credit + fraction * len(line) >= len(line) or fraction >= 1:
                        text = document_text(line, self.text_field)
                except BadLine:
                    raise changed(source.path) from None
                size = line.size if isinstance(line, LongLine) else len(line)
                credit += fraction * size
                if credit < size and fraction < 1:
                    continue
                self.emit(text)
                credit -= size
        return credit


def _long_head(line: LongLine, field: str, limit: int) -> str:
    """The first `limit` characters of a long JSONL line's document."""
    parts, size = [], 0
    for piece in long_document(line, field):
        if piece is RESTART:
            parts, size = [], 0
        elif size < limit:
            parts.append(piece[: limit - size])
            size += len(parts[-1])
    return "".join(parts)


def _head(source: Source, budget: int | None) -> str:
    """A text file's document, or about its first `budget` bytes cut after a newline."""
    taken, size = [], 0
    with reading(source), SegmentReader(source) as reader:
        for chunk in text_chunks(reader, 1 << 16):
            taken.append(chunk)
            size += len(chunk)
            if budget is not None and size >= budget:
                text = "".join(taken)[:budget]
                cut = text.rfind("\n")
                return text[: cut + 1] if cut > 0 else text
    return "".join(taken)
