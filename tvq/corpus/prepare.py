"""Preparing a dataset: input files tokenized once into memory-mapped shards that every
run reads (docs/DESIGN.md section 11), as nanoGPT's prepare.py and levanter's cache do.
`request` finds and checks the inputs; `prepare` finds the dataset of a request, or
builds it (tvq/corpus/build.py, phase by phase) and publishes it (tvq/corpus/shards.py).

The training stream is the training documents in input order, each followed by the
end-of-document id: the stream of a run from the text itself, so training from a
prepared dataset gives the same windows and the same losses. A dataset lives in a cache
folder keyed by the inputs (paths, sizes, modification times), the tokenizer (its
fingerprint, or the settings it is trained with), the held-out choice and the JSONL
options: a run whose key is there reads it and tokenizes nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tvq.corpus import DEFAULT_VAL_FRACTION, DEFAULT_VOCAB_SIZE, build, shards
from tvq.corpus.build import Build, PrepareEvent
from tvq.corpus.shards import PreparedData
from tvq.corpus.sources import Source, check_val_fraction, find_sources, unchanged
from tvq.errors import CorpusError, TrainingError, is_int
from tvq.files.cache import cache_dir as user_cache_dir


def data_cache_dir() -> Path:
    """Where `tvq train TEXT...` keeps prepared datasets: the user cache's `data/`
    (tvq/files/cache.py), beside the compilation cache."""
    return user_cache_dir("data")


@dataclasses.dataclass(frozen=True)
class Request:
    """What a dataset is made of: the cache key is a hash of it."""

    sources: tuple[Source, ...]
    tokenizer: Any  # a tokenizer, or None: train sentencepiece with vocab_size pieces
    vocab_size: int
    held_out: tuple[Path, ...]  # resolved
    val_fraction: float
    seed: int
    text_field: str
    skip_bad_lines: bool

    def key(self) -> str:
        if self.tokenizer is not None:
            tokenizer = {"fingerprint": self.tokenizer.fingerprint}
        else:
            tokenizer = {"train": {"kind": "sentencepiece", "vocab_size": self.vocab_size,
                                   "sample_bytes": build.SAMPLE_BYTES}}  # fmt: skip
        if self.held_out:
            held = {"files": sorted(map(str, self.held_out))}
        elif self.val_fraction > 0:
            held = {"fraction": self.val_fraction, "seed": self.seed}
        else:
            held = {"fraction": 0}
        jsonl = any(s.kind == "jsonl" for s in self.sources)
        document = {
            "format": [shards.FORMAT, shards.VERSION],
            "inputs": [s.key() for s in self.sources],
            "tokenizer": tokenizer,
            "held_out": held,
            "jsonl": {"text_field": self.text_field, "skip_bad_lines": self.skip_bad_lines}
            if jsonl else None,
        }  # fmt: skip
        return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()[:24]


def request(
    inputs: Sequence[str | os.PathLike],
    *,
    tokenizer: Any = None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    held_out: Sequence[str | os.PathLike] = (),
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = 0,
    text_field: str = "text",
    skip_bad_lines: bool = False,
) -> Request:
    """The inputs found and checked, as a Request (files of a --val not among the inputs
    are added, as whole documents to hold out)."""
    if not is_int(vocab_size) or vocab_size < 1:
        raise TrainingError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    check_val_fraction(val_fraction)
    if not text_field:
        raise CorpusError("--text-field must name a field")
    sources = find_sources(inputs)
    names = []
    for path in held_out:
        if not Path(path).is_file():
            raise CorpusError(f"held-out file {path} does not exist")
        names.append(Path(path).resolve())
    known = {s.path.resolve() for s in sources}
    extra = [p for p in held_out if Path(p).resolve() not in known]
    sources += find_sources(extra) if extra else []
    return Request(tuple(sources), tokenizer, vocab_size, tuple(names), float(val_fraction),
                   int(seed), text_field, bool(skip_bad_lines))  # fmt: skip


def target(req: Request, out: Path | None = None, cache_dir: Path | None = None) -> Path:
    """The folder of the dataset for `req`: `out` if given, else `cache_dir`/KEY
    (`data_cache_dir()` by default)."""
    if out is not None:
        return Path(out)
    return Path(cache_dir or data_cache_dir()) / req.key()


def find(req: Request, folder: Path) -> PreparedData | None:
    """The dataset for `req` if `folder` holds it finished."""
    info = shards.read_info(folder)
    if info is None or info.get("key") != req.key():
        return None
    return PreparedData.open(folder, reused=True)


def prepare(
    req: Request,
    *,
    out: Path | None = None,
    cache_dir: Path | None = None,
    workers: int | None = None,
    unit_bytes: int | None = None,
    on_event: Callable[[PrepareEvent], None] | None = None,
) -> PreparedData:
    """The dataset for `req`, found or made: in `out` if given (a dataset of other inputs
    there is replaced once the new one is complete), else in the cache folder
    (`cache_dir`/KEY, `data_cache_dir()` by default). workers: processes that scan and
    tokenize (None: one per core; 1 for an input under build.POOL_MIN_BYTES); unit_bytes: the
    size of a unit of work (None: chosen from the input size and the workers)."""
    folder = target(req, out, cache_dir)
    if folder.parent.is_dir():  # a crash's leftovers: recovered or removed, never kept
        shards.remove_leftovers(folder, every=out is None)
    try:
        found = find(req, folder)
    except CorpusError:  # finished once, damaged since (a shard cut short): made again
        found = None
    if found is not None:
        if on_event is not None:
            on_event(PrepareEvent("found", finished=True, detail=str(found.folder)))
        return found
    if folder.exists() and not folder.is_dir():
        raise CorpusError(f"{folder} exists and is not a folder")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CorpusError(f"{folder.parent} cannot be created: {e.strerror}") from None
    if out is None:
        _prune(folder.parent, keep=folder)
    partial = shards.partial_folder(folder)
    partial.mkdir()
    try:
        made = Build(req, partial, workers, unit_bytes, on_event)
        with made.pool:
            info = made.run()
        shards.publish(partial, folder, info)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if on_event is not None:
        on_event(PrepareEvent("done", finished=True, detail=str(folder)))
    return PreparedData.open(folder, reused=False)


def _prune(cache_dir: Path, keep: Path) -> None:
    """Removes the cache's datasets whose inputs are gone or changed: no key can name them
    again (a run reading one keeps its memory maps: the files live until it closes them)."""
    for entry in cache_dir.iterdir():
        if entry == keep or entry.name.startswith(".") or not entry.is_dir():
            continue
        info = shards.read_info(entry)
        if info is None:
            continue
        if any(not unchanged(item) for item in info.get("inputs", [])):
            shutil.rmtree(entry, ignore_errors=True)
