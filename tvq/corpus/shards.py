"""A prepared dataset on disk, written and read here alone (docs/DESIGN.md section 11):
token shards that every run memory-maps, in one folder.

    dataset.json        format, version, cache key, inputs (path, kind, size, mtime),
                        tokenizer (kind, fingerprint, vocabulary), dtype, held-out
                        choice, and per split: documents, tokens, bytes, shard files
    tokenizer.model     the sentencepiece model the shards were made with, if one
    train-NNNNN.bin     training tokens, raw uint16 (a vocabulary up to 65,536) or
                        int32, little-endian: each document followed by the
                        end-of-document id; the shards in order are the training stream
    val-NNNNN.bin       held-out documents' tokens, one after another, no separator
    train.docs.bin      the document index of each split: int64 rows [source (an
    val.docs.bin        index into inputs), line (JSONL; 0 for a text file), start
                        (the first token's position in the split's stream), tokens
                        (without the end-of-document id), bytes (UTF-8)]
    COMPLETE            the cache key again, written last

While it is written, each unit of work writes its own shards and its rows of the document
index ([source, line, tokens, bytes, continued] in `.SPLIT-NNNNN.docs`), which
`merge_index` joins into the index of each split. A folder is written as a temporary
sibling and renamed into place once COMPLETE is in it; a folder without COMPLETE (or
whose COMPLETE does not match dataset.json) is never read as a dataset. A process killed
between the two renames of `publish` leaves no dataset under the final name, only hidden
siblings (the new one and the old one); the next run recovers the newest finished one
into place and removes the rest (`remove_leftovers`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tvq.corpus.reader import TokenShards
from tvq.errors import CorpusError
from tvq.text.tokenizer import TOKENIZER_FILE, ByteTokenizer, SentencePieceTokenizer

FORMAT, VERSION = "tvq-prepared", 1
INFO_FILE, COMPLETE_FILE = "dataset.json", "COMPLETE"
SPLITS = TRAIN, VAL = ("train", "val")
INDEX_COLUMNS = ("source", "line", "start", "tokens", "bytes")
UNIT_COLUMNS = ("source", "line", "tokens", "bytes", "continued")  # a unit's index rows
PARTIAL = ".partial-"  # in the name of a folder being written
OLD = ".old-"  # in the name of a finished folder being replaced (`publish`)
RECORDS_FLUSH = 1 << 16  # a unit's index rows kept before they are written out


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<i4")


def shard_name(split: str, unit: int) -> str:
    return f"{split}-{unit:05d}.bin"


def index_name(split: str) -> str:
    return f"{split}.docs.bin"


def unit_index_name(split: str, unit: int) -> str:
    """A unit's rows of the index while the dataset is written (merge_index removes it)."""
    return f".{split}-{unit:05d}.docs"


def is_prepared(folder: Path) -> bool:
    """Whether `folder` holds a finished dataset (COMPLETE matching dataset.json)."""
    try:
        info = json.loads((folder / INFO_FILE).read_text())
        return (folder / COMPLETE_FILE).read_text().strip() == info["key"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def read_info(folder: Path) -> dict[str, Any] | None:
    """dataset.json of a finished dataset, else None."""
    if not is_prepared(folder):
        return None
    return json.loads((folder / INFO_FILE).read_text())


class HeldOutDocuments(Sequence):
    """The held-out documents as (token ids int32 [n], UTF-8 bytes), read on demand."""

    def __init__(self, tokens: TokenShards, index: np.ndarray) -> None:
        self.tokens, self.index = tokens, index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        _, _, start, length, size = (int(v) for v in self.index[i])
        return self.tokens.read(start, length), size

    def __iter__(self) -> Iterator[tuple[np.ndarray, int]]:
        return (self[i] for i in range(len(self)))


@dataclass(frozen=True)
class PreparedData:
    """A finished dataset, opened: the tokenizer, the training stream (memory-mapped
    shards) and the held-out documents. `reused`: found ready, nothing was tokenized."""

    folder: Path
    info: dict[str, Any]
    tokenizer: Any
    train: TokenShards
    held_out: HeldOutDocuments
    reused: bool = field(default=False, compare=False)

    @classmethod
    def open(cls, folder: Path, *, reused: bool = True) -> PreparedData:
        folder = Path(folder)
        info = read_info(folder)
        if info is None:
            raise CorpusError(f"{folder} is not a finished prepared dataset (tvq prepare)")
        if info.get("format") != FORMAT or info.get("version") != VERSION:
            raise CorpusError(f"{folder} is a prepared dataset of another format version; "
                              "prepare it again")  # fmt: skip
        spec = info["tokenizer"]
        if spec["kind"] == "sentencepiece":
            tokenizer = SentencePieceTokenizer(folder / TOKENIZER_FILE)
            if tokenizer.fingerprint != spec["fingerprint"]:
                raise CorpusError(f"{folder / TOKENIZER_FILE} is not the tokenizer of its "
                                  "dataset (edited?); prepare it again")  # fmt: skip
        else:
            tokenizer = ByteTokenizer()
        dtype = np.dtype(info["dtype"])
        train, val = (_stream(folder, info["splits"][s], dtype) for s in SPLITS)
        index = _index(folder, info["splits"][VAL])
        return cls(folder, info, tokenizer, train, HeldOutDocuments(val, index), reused)

    def held_out_names(self, limit: int = 100) -> list[str]:
        """Names of the first `limit` held-out documents: the file, and the line of JSONL."""
        names = []
        inputs = self.info["inputs"]
        for source, line, *_ in self.held_out.index[:limit]:
            name = Path(inputs[int(source)]["path"]).name
            names.append(f"{name}:{int(line)}" if line else name)
        return names


def _stream(folder: Path, split: dict, dtype: np.dtype) -> TokenShards:
    parts = []
    for shard in split["shards"]:
        path = folder / shard["file"]
        if path.stat().st_size != shard["tokens"] * dtype.itemsize:
            raise CorpusError(f"{path} has {path.stat().st_size} bytes, its dataset says "
                              f"{shard['tokens']} tokens; prepare it again")  # fmt: skip
        parts.append(np.memmap(path, dtype, mode="r", shape=(shard["tokens"],)))
    return TokenShards(parts)


def _index(folder: Path, split: dict) -> np.ndarray:
    if not split["documents"]:
        return np.zeros([0, len(INDEX_COLUMNS)], np.int64)
    return np.memmap(folder / index_name(VAL), np.int64, mode="r",
                     shape=(split["documents"], len(INDEX_COLUMNS)))  # fmt: skip


# -- writing ------------------------------------------------------------------------------


class ShardWriter:
    """Tokens appended to one raw shard file, synced to disk on close."""

    def __init__(self, path: Path, dtype: np.dtype) -> None:
        self.path, self.dtype = path, dtype
        self.file = open(path, "wb", buffering=1 << 20)  # noqa: SIM115 (closed by close())
        self.tokens = 0

    def write(self, ids: np.ndarray) -> None:
        self.file.write(np.asarray(ids, self.dtype).tobytes())
        self.tokens += len(ids)

    def truncate(self, tokens: int) -> None:
        """Drops what was written after the first `tokens` tokens."""
        if tokens < self.tokens:
            self.file.flush()
            self.file.truncate(tokens * self.dtype.itemsize)
            self.file.seek(tokens * self.dtype.itemsize)
            self.tokens = tokens

    def close(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


class UnitWriter:
    """One split's shard and index rows (UNIT_COLUMNS) of one unit of work."""

    def __init__(self, folder: Path, split: str, unit: int, dtype: np.dtype) -> None:
        self.shard = ShardWriter(folder / shard_name(split, unit), dtype)
        self.records_file = open(folder / unit_index_name(split, unit), "wb")  # noqa: SIM115
        self.rows: list[tuple[int, int, int, int, int]] = []
        self.count = 0

    def record(self, source: int, line: int, tokens: int, size: int, continued: bool) -> None:
        """A document (or, continued, the rest of the previous unit's last document)."""
        self.rows.append((source, line, tokens, size, int(continued)))
        self.count += 1
        if len(self.rows) >= RECORDS_FLUSH:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            self.records_file.write(np.asarray(self.rows, np.int64).tobytes())
            self.rows = []

    def close(self) -> None:
        self.flush()
        self.records_file.close()
        self.shard.close()


def merge_index(folder: Path, split: str, units: list[int], eos: bool) -> dict[str, int]:
    """Writes <split>.docs.bin from the units' rows (a document cut between units becomes
    one row) → {documents, bytes, stream (tokens in the split's stream)}."""
    out = open(folder / index_name(split), "wb", buffering=1 << 20)  # noqa: SIM115
    pending: np.ndarray | None = None
    start = documents = total_bytes = 0

    def write(rows: np.ndarray) -> None:
        nonlocal start, documents, total_bytes
        lengths = rows[:, 2] + (1 if eos else 0)
        starts = start + np.concatenate([[0], np.cumsum(lengths)[:-1]])
        table = np.stack([rows[:, 0], rows[:, 1], starts, rows[:, 2], rows[:, 3]], axis=1)
        out.write(table.astype(np.int64).tobytes())
        start += int(lengths.sum())
        documents += len(rows)
        total_bytes += int(rows[:, 3].sum())

    try:
        for unit in units:
            path = folder / unit_index_name(split, unit)
            rows = np.fromfile(path, np.int64).reshape(-1, len(UNIT_COLUMNS))
            path.unlink()
            if not len(rows):
                continue
            if pending is not None:
                rows = np.concatenate([pending[None], rows])
            elif rows[0, 4]:
                raise CorpusError("a document continues from nowhere; run again")
            heads = np.flatnonzero(rows[:, 4] == 0)
            merged = rows[heads].copy()
            merged[:, 2] = np.add.reduceat(rows[:, 2], heads)
            merged[:, 3] = np.add.reduceat(rows[:, 3], heads)
            merged[:, 4] = 0
            if len(merged) > 1:
                write(merged[:-1])
            pending = merged[-1]
        if pending is not None:
            write(pending[None])
        out.flush()
        os.fsync(out.fileno())
    finally:
        out.close()
    if not documents:
        (folder / index_name(split)).unlink()
    return {"documents": documents, "bytes": total_bytes, "stream": start}


# -- publishing ---------------------------------------------------------------------------


def partial_folder(final: Path) -> Path:
    """Where `final` is written before it is renamed into place: a hidden sibling named
    after this host and process, so that leftovers of a killed run can be told apart."""
    return final.parent / f".{final.name}{PARTIAL}{socket.gethostname()}-{os.getpid()}"


def remove_leftovers(folder: Path, every: bool = False) -> None:
    """Clears what killed processes of this host left beside or inside `folder` (others'
    may still be writing): a finished dataset (a partial folder killed after COMPLETE, or
    the old one of a `publish` killed between its renames) goes back into place where
    none is, the newest first; the rest is removed. every: for every folder beside
    `folder` (a cache's), not only its own."""
    host = socket.gethostname()
    name = "*" if every else folder.name
    candidates = [p for marker in (PARTIAL, OLD) for p in folder.parent.glob(f".{name}{marker}*")]
    if folder.is_dir():
        candidates += folder.glob(f".*{PARTIAL}*")
    for path in candidates:
        marker = PARTIAL if PARTIAL in path.name else OLD
        final_name, _, owner = path.name[1:].rpartition(marker)
        owner_host, _, pid = owner.rpartition("-")
        if owner_host not in (host, "") or not pid.isdigit() or _alive(int(pid)):
            continue
        final = path.parent / final_name
        if path.parent == folder.parent and is_prepared(path) and not final.exists():
            with contextlib.suppress(OSError):  # another process's recovery came first
                path.rename(final)
                continue
        shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def publish(partial: Path, final: Path, info: dict[str, Any]) -> None:
    """Finishes a dataset: dataset.json, then COMPLETE, then the rename into place. A
    finished dataset already at `final` is replaced only once the new one is complete."""
    (partial / INFO_FILE).write_text(json.dumps(info, indent=1))
    with open(partial / COMPLETE_FILE, "w") as f:
        f.write(info["key"] + "\n")
        f.flush()
        os.fsync(f.fileno())
    _sync_folder(partial)
    old = None
    if final.exists():
        old = final.parent / f".{final.name}{OLD}{socket.gethostname()}-{os.getpid()}"
        final.rename(old)
    try:
        partial.rename(final)
    except OSError:  # another process published it first: theirs is as good
        if old is not None:
            old.rename(final)
            old = None
        if not is_prepared(final):
            raise
        shutil.rmtree(partial, ignore_errors=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _sync_folder(final.parent)


def _sync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
