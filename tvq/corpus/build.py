"""One preparation of a dataset, phase by phase, into a folder that tvq/corpus/prepare.py
then publishes (docs/DESIGN.md section 11). Each phase is reported through `on_event`:

1. scan: the input files are cut into segments (a large plain file at newlines) and
   grouped into units; worker processes (tvq/corpus/workers.py) count each unit's
   documents and find bad JSONL lines, so an error comes before any costly work.
2. held-out documents: named files, or a seeded fraction of all documents
   (`sources.held_out_mask`).
3. tokenizer: given, bytes, or sentencepiece trained on a bounded sample of the training
   documents (tvq/corpus/sample.py: all of them, joined by newlines, up to SAMPLE_BYTES; beyond, the
   heads of documents spread evenly over the corpus), so its cost does not grow with the
   corpus.
4. tokenize: every unit on a worker process, each writing its own shards and index rows.
5. index: the units' rows merged into one document index per split (tvq/corpus/shards.py).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from tvq.corpus import shards
from tvq.corpus.pool import Pool
from tvq.corpus.sample import TokenizerText
from tvq.corpus.shards import SPLITS, TRAIN, VAL, index_name, shard_name
from tvq.corpus.sources import (
    Segment,
    bad_line_error,
    changed,
    held_out_mask,
    split_points,
    unchanged,
)
from tvq.corpus.workers import ScanResult, Unit, scan_unit, tokenize_unit
from tvq.errors import CorpusError, TrainingError, is_int
from tvq.text.tokenizer import (
    TOKENIZER_FILE,
    ByteTokenizer,
    SentencePieceTokenizer,
    train_sentencepiece,
)

SAMPLE_BYTES = 16 << 20  # sentencepiece's training text at most (about 17 s, 0.4 GB on 2 cores)
POOL_MIN_BYTES = 4 << 20  # less input than this is prepared in this process
MIN_UNIT_BYTES, MAX_UNIT_BYTES = 1 << 20, 64 << 20


@dataclasses.dataclass(frozen=True)
class PrepareEvent:
    """Progress of one phase ("scan", "tokenizer", "tokenize", "index"): bytes of input
    done of total (0: not counted), and once finished, its time and a summary. Finally
    "done" (prepared; detail: the folder) or "found" (ready before: nothing tokenized)."""

    phase: str
    done: int = 0
    total: int = 0
    finished: bool = False
    seconds: float = 0.0
    detail: str = ""


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class Build:
    """One preparation of `req` (a prepare.Request) into the folder `partial`: `run` is
    the recipe, one method per phase."""

    def __init__(self, req: Any, partial: Path, workers, unit_bytes, on_event) -> None:
        self.req, self.folder, self.on_event = req, partial, on_event
        self.sources = list(req.sources)
        total = sum(s.size for s in self.sources)
        if workers is None:
            workers = 1 if total < POOL_MIN_BYTES else default_workers()
        if not is_int(workers) or workers < 1:
            raise TrainingError(f"workers must be a positive integer, got {workers!r}")
        self.workers = workers
        self.pool = Pool(workers)
        if unit_bytes is None:
            unit_bytes = min(max(total // (4 * workers), MIN_UNIT_BYTES), MAX_UNIT_BYTES)
        self.unit_bytes = max(1, unit_bytes)
        self.seconds: dict[str, float] = {}
        self.bad_lines = 0

    def run(self) -> dict[str, Any]:
        """The phases in order → dataset.json's contents."""
        segments = self.scan()
        mask = self.held_out(segments)
        tokenizer, trained_on = self.tokenizer(segments, mask)
        results, units = self.tokenize(segments, mask, tokenizer)
        splits = self.index(results)
        for source in self.sources:
            if not unchanged(source.key()):
                raise changed(source.path)
        return self.info(tokenizer, trained_on, splits, len(units))

    # -- reporting and cutting the work -----------------------------------------------------

    def event(self, phase: str, done: int = 0, total: int = 0, **finished: Any) -> None:
        if self.on_event is not None:
            self.on_event(PrepareEvent(phase, done, total, **finished))

    def finish(self, phase: str, started: float, total: int, detail: str) -> None:
        self.seconds[phase] = round(time.perf_counter() - started, 3)
        self.event(phase, total, total, finished=True, seconds=self.seconds[phase],
                   detail=detail)  # fmt: skip

    def split(self, seg: Segment) -> list[Segment]:
        """A segment cut after newlines into pieces of about unit_bytes."""
        source = self.sources[seg.source]
        points = [p for p in split_points(source, self.unit_bytes)
                  if seg.start < p and (seg.end < 0 or p < seg.end)]  # fmt: skip
        bounds = [seg.start, *points, seg.end]
        last = len(bounds) - 2
        return [dataclasses.replace(seg, start=bounds[j], end=bounds[j + 1],
                                    continues=seg.continues or j > 0, ends=seg.ends and j == last)
                for j in range(last + 1)]  # fmt: skip

    def units(self, segments: list[Segment], **fields: Any) -> list[Unit]:
        """Consecutive segments grouped into units of about unit_bytes."""
        groups: list[list[Segment]] = []
        size = 0
        for seg in segments:
            length = seg.length(self.sources[seg.source])
            if not groups or size + length > self.unit_bytes:
                groups.append([])
                size = 0
            groups[-1].append(seg)
            size += length
        return [Unit(i, self.sources, group, self.req.text_field, self.req.skip_bad_lines,
                     **fields) for i, group in enumerate(groups)]  # fmt: skip

    # -- the phases -------------------------------------------------------------------------

    def scan(self) -> list[Segment]:
        """Every source as segments (JSONL cut at newlines), each with its documents, its
        first document's ordinal and its first line; the per-line document bits of
        JSONL segments are kept for the tokenizer's sample."""
        started = time.perf_counter()
        segments = []
        for i, source in enumerate(self.sources):
            whole = Segment(i)
            segments += self.split(whole) if source.kind == "jsonl" else [whole]
        total = sum(s.size for s in self.sources if s.kind == "jsonl")
        self.event("scan", 0, total)
        report = lambda done: self.event("scan", done, total)  # noqa: E731
        results: list[ScanResult] = self.pool.map(scan_unit, self.units(segments), report)
        flat = [(r.documents[i], r.lines[i], r.bad[i], r.first_bad[i], r.chars[i], r.doc_lines[i])
                for r in results for i in range(len(r.documents))]  # fmt: skip
        placed, doc, line = [], 0, 1
        self.chars, self.doc_lines = [], []
        for seg, (docs, lines, bad, first_bad, chars, doc_lines) in zip(segments, flat,
                                                                        strict=True):  # fmt: skip
            line = 1 if seg.start == 0 else line
            if first_bad is not None and not self.req.skip_bad_lines:
                raise bad_line_error(self.sources[seg.source], line + first_bad[0] - 1,
                                     first_bad[1])  # fmt: skip
            self.bad_lines += bad
            placed.append(dataclasses.replace(seg, first_doc=doc, first_line=line,
                                              documents=docs))  # fmt: skip
            self.chars.append(chars)
            self.doc_lines.append(doc_lines)
            doc, line = doc + docs, line + lines
        if doc == 0:
            raise CorpusError("no text found: every file is empty")
        self.n_documents = doc
        plural = "s" if self.bad_lines > 1 else ""
        skipped = f", {self.bad_lines} bad line{plural} skipped" if self.bad_lines else ""
        self.finish("scan", started, total, f"{len(self.sources)} files, {doc} documents{skipped}")
        return placed

    def held_out(self, segments: list[Segment]) -> np.ndarray:
        named = None
        if self.req.held_out:
            names = set(self.req.held_out)
            named = np.zeros(self.n_documents, bool)
            for seg in segments:
                if self.sources[seg.source].path.resolve() in names:
                    named[seg.first_doc : seg.first_doc + seg.documents] = True
        return held_out_mask(self.n_documents, self.req.val_fraction, self.req.seed, named)

    def tokenizer(self, segments: list[Segment], mask: np.ndarray) -> tuple[Any, int | None]:
        """The tokenizer, copied into the dataset (trained on a sample if none is given)
        → (tokenizer, bytes of text it was trained on or None)."""
        given = self.req.tokenizer
        if isinstance(given, ByteTokenizer):
            return given, None
        path = self.folder / TOKENIZER_FILE
        if given is not None:
            shutil.copyfile(given.path, path)
            return SentencePieceTokenizer(path), None
        started = time.perf_counter()
        self.event("tokenizer")
        sample = self.folder / ".tokenizer-sample.txt"
        try:
            with open(sample, "w", encoding="utf-8") as out:
                size = TokenizerText(self.sources, self.req.text_field, out).write(
                    segments, self.chars, self.doc_lines, mask, SAMPLE_BYTES
                )
            trained = train_sentencepiece([sample], self.folder / "tokenizer.tmp.model",
                                          self.req.vocab_size)  # fmt: skip
        finally:
            sample.unlink(missing_ok=True)
        trained.path.replace(path)
        self.finish(
            "tokenizer",
            started,
            0,
            f"sentencepiece, {self.req.vocab_size} pieces, on {size / 1e6:.1f} MB",
        )
        return SentencePieceTokenizer(path), size

    def tokenize(self, segments: list[Segment], mask: np.ndarray, tokenizer):
        """Every unit through the tokenizer on the workers → (results, units). Text files
        are cut at newlines too when the tokenizer's pieces cannot span one."""
        started = time.perf_counter()
        if tokenizer.cut(b"x\n") == 2:  # a cut after a newline is exact
            segments = [piece for seg in segments for piece in (
                self.split(seg) if self.sources[seg.source].kind == "text" else [seg])]  # fmt: skip
        spec = ("bytes", "") if isinstance(tokenizer, ByteTokenizer) else (
            "sentencepiece", str(tokenizer.path))  # fmt: skip
        units = self.units(segments, folder=self.folder, tokenizer=spec,
                           dtype=shards.token_dtype(tokenizer.vocab_size).str)  # fmt: skip
        for unit in units:  # the held-out flags of the documents the unit reads
            unit.first_doc = unit.segments[0].first_doc
            end = max(s.first_doc + max(s.documents, 1) for s in unit.segments)
            unit.held_out = mask[unit.first_doc : end]
        total = sum(s.size for s in self.sources)
        self.event("tokenize", 0, total)
        report = lambda done: self.event("tokenize", done, total)  # noqa: E731
        results = self.pool.map(tokenize_unit, units, report)
        tokens = sum(r.tokens[TRAIN] + r.tokens[VAL] for r in results)
        seconds = max(time.perf_counter() - started, 1e-9)
        self.finish(
            "tokenize",
            started,
            total,
            f"{total / 1e6:.1f} MB into {tokens} tokens, {len(units)} units on "
            f"{min(self.workers, len(units))} processes ({total / 1e6 / seconds:.1f} MB/s)",
        )
        return results, units

    def index(self, results) -> dict[str, Any]:
        """The units' index rows merged (shards.merge_index) → the splits of dataset.json."""
        started = time.perf_counter()
        splits = {}
        for split in SPLITS:
            rows = shards.merge_index(self.folder, split, [r.index for r in results],
                                      eos=split == TRAIN)  # fmt: skip
            listed = [{"file": shard_name(split, r.index), "tokens": r.tokens[split]}
                      for r in results if r.tokens[split]]  # fmt: skip
            for r in results:
                if not r.tokens[split]:
                    (self.folder / shard_name(split, r.index)).unlink(missing_ok=True)
            splits[split] = {"documents": rows["documents"], "bytes": rows["bytes"],
                             "tokens": sum(s["tokens"] for s in listed), "shards": listed,
                             "index": index_name(split)}  # fmt: skip
            if splits[split]["tokens"] != rows["stream"]:
                raise CorpusError(f"the {split} index does not add up to its shards; run again")
        if not splits[TRAIN]["documents"]:
            raise CorpusError("no training text left after holding out validation documents")
        self.finish("index", started, 0, f"{splits[TRAIN]['documents']} training and "
                    f"{splits[VAL]['documents']} held-out documents")  # fmt: skip
        return splits

    def info(self, tokenizer, trained_on: int | None, splits: dict, units: int) -> dict:
        """dataset.json (shards.py's module docstring names its fields)."""
        req = self.req
        return {
            "format": shards.FORMAT,
            "version": shards.VERSION,
            "key": req.key(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "inputs": [s.key() for s in self.sources],
            "text_field": req.text_field,
            "skip_bad_lines": req.skip_bad_lines,
            "bad_lines": self.bad_lines,
            "held_out": {"files": [str(p) for p in req.held_out]} if req.held_out
            else {"fraction": req.val_fraction, "seed": req.seed},
            "tokenizer": {"kind": tokenizer.kind, "fingerprint": tokenizer.fingerprint,
                          "vocab_size": tokenizer.vocab_size, "trained_on_bytes": trained_on},
            "dtype": shards.token_dtype(tokenizer.vocab_size).str,
            "splits": splits,
            "workers": self.workers,
            "units": units,
            "seconds": self.seconds,
        }  # fmt: skip
