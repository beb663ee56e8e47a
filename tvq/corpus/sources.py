"""The inputs of a corpus and the documents in them, streaming (docs/DESIGN.md section 11):
which files are inputs and of what kind, reading their documents, and which documents are
held out.

A text file (.txt, .md, .text, no suffix) is one document, its bytes decoded as UTF-8
(invalid bytes become U+FFFD); a file of whitespace alone is no document. A JSONL file
(.jsonl) holds one document per line: a JSON object whose text field (`text` unless named
otherwise) is a string; a blank line is skipped; any other line is a bad line, named by
file and line number; a line longer than LONG_LINE is parsed streaming
(tvq/corpus/jsonl.py), never held whole. Either may be gzip-compressed (.gz). Files are
read in pieces of READ_SIZE bytes, and a plain file may be read in segments (byte ranges
that start after a newline), so that several processes share one large file; a gzip file
is read from its start. Inside a folder, hidden files and folders and tvq's own output
(`own_folder`) are not inputs.
"""

from __future__ import annotations

import codecs
import contextlib
import gzip
import json
import os
import re
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from tvq.errors import CorpusError
from tvq.files.cache import cache_dir

TEXT_SUFFIXES = {".txt", ".md", ".text", ""}  # one file, one document
JSONL_SUFFIXES = {".jsonl"}  # one document per line: a JSON object with a text field
KINDS_HELP = "text (.txt, .md, .text, no suffix) or JSONL (.jsonl), either also as .gz"
READ_SIZE = 1 << 20
LONG_LINE = 1 << 22  # a JSONL line of more bytes is parsed streaming (tvq/corpus/jsonl.py)
_SURROGATE = re.compile("[\ud800-\udfff]")


# -- the inputs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """One input file: its kind, whether it is gzip-compressed, and what the cache key
    reads of it: path, size, modification time and inode change time. The change time
    is what notices an edit that kept the size and the modification time (`touch -r`,
    `rsync -t`, two writes within one tick of a coarse clock): any write or `utime` sets
    it to now and no call sets it back. It costs one stat per file, where a hash of the
    contents would read a 100 GB corpus at every `tvq train` (minutes), and a hash of
    samples would miss edits between them; what it cannot tell is a copy with the same
    bytes (`cp -a`, a restore), which is prepared again (docs/DESIGN.md section 11)."""

    path: Path
    kind: str  # "text" | "jsonl"
    compressed: bool
    size: int
    mtime_ns: int
    ctime_ns: int

    def key(self) -> dict:
        return {"path": str(self.path.resolve()), "kind": self.kind, "gzip": self.compressed,
                "size": self.size, "mtime_ns": self.mtime_ns,
                "ctime_ns": self.ctime_ns}  # fmt: skip


def unchanged(key: dict) -> bool:
    """Whether the file of a `Source.key()` still has the size and times it records."""
    try:
        stat = Path(key["path"]).stat()
    except (OSError, KeyError, TypeError):
        return False
    return (stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns) == (
        key.get("size"), key.get("mtime_ns"), key.get("ctime_ns"))  # fmt: skip


def changed(path: Path, line: int | None = None) -> CorpusError:
    """The error of an input that changed under a preparation (seen by its line count, a
    line that no longer parses, or its size and time)."""
    where = f" (line {line})" if line is not None else ""
    return CorpusError(f"{path} changed while being prepared{where}; run again")


def source_kind(path: Path) -> tuple[str, bool] | None:
    """("text" | "jsonl", gzip-compressed) from the file name; None for anything else."""
    name = path.name.lower()
    compressed = name.endswith(".gz")
    suffix = Path(name[: -len(".gz")] if compressed else name).suffix
    if suffix in JSONL_SUFFIXES:
        return "jsonl", compressed
    if suffix in TEXT_SUFFIXES:
        return "text", compressed
    return None


def find_sources(paths: Sequence[str | os.PathLike]) -> list[Source]:
    """Files as given (each must be of a known kind), and the files of known kinds inside
    directories (sorted; hidden files and folders, and tvq's own, skipped: `own_folder`)."""
    sources: list[Source] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise CorpusError(f"{path} does not exist")
        if path.is_dir():
            found = sorted(_walk(path))
            if not found:
                raise CorpusError(f"no text files ({KINDS_HELP}) found in {path}")
            sources.extend(map(_source, found))
        elif source_kind(path) is None:
            raise CorpusError(f"{path}: unknown kind of file; tvq reads {KINDS_HELP}")
        elif not path.is_file():  # a pipe or a device: reading it could wait forever
            raise CorpusError(f"{path} is not a regular file")
        else:
            sources.append(_source(path))
    return sources


def own_folder(folder: Path) -> bool:
    """Whether a folder is tvq's own output, never an input even inside an input folder:
    a prepared dataset, finished or not (dataset.json: `tvq prepare --out`, the cache's
    entries), a model (config.json beside params/: `tvq train --out`), a training run
    (run.json, beside its checkpoints and metrics.jsonl), or the user cache itself
    (tvq/files/cache.py; its compiled programs have no suffix)."""
    if (folder / "run.json").is_file():
        return True
    with contextlib.suppress(OSError, ValueError, AttributeError):
        info = json.loads((folder / "dataset.json").read_bytes())
        return info.get("format") == "tvq-prepared"
    if (folder / "config.json").is_file() and (folder / "params").is_dir():
        return True
    return folder.resolve() == cache_dir("data").parent.resolve()


def _walk(top: Path) -> Iterator[Path]:
    """The files of known kinds under `top`, hidden and own folders pruned (symbolic links
    followed, each folder once)."""
    seen = set()

    def refuse(error: OSError) -> None:
        raise CorpusError(f"{error.filename} cannot be read: {error.strerror}")

    for root, folders, files in os.walk(top, onerror=refuse, followlinks=True):
        stat = os.stat(root)
        if (stat.st_dev, stat.st_ino) in seen:
            folders[:] = []
            continue
        seen.add((stat.st_dev, stat.st_ino))
        folders[:] = [f for f in folders
                      if not f.startswith(".") and not own_folder(Path(root, f))]  # fmt: skip
        for name in files:
            path = Path(root, name)
            if not name.startswith(".") and source_kind(path) and path.is_file():
                yield path


def find_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """The paths of find_sources."""
    return [s.path for s in find_sources(paths)]


def _source(path: Path) -> Source:
    kind, compressed = source_kind(path)
    try:
        stat = path.stat()
    except OSError as e:
        raise CorpusError(f"{path} cannot be read: {e.strerror}") from None
    return Source(path, kind, compressed, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


def check_val_fraction(val_fraction: float) -> None:
    """The held-out fraction's range, checked when a preparation is asked for."""
    if not 0 <= val_fraction < 1:
        raise CorpusError(f"--val-fraction must be in [0, 1), got {val_fraction}")


def held_out_mask(
    n_documents: int, val_fraction: float, seed: int, named: np.ndarray | None = None
) -> np.ndarray:
    """Which documents are held out → bool [n_documents]: those `named` (a mask, when
    --val names files), else a fraction of the documents (check_val_fraction's range)
    chosen by seed (at least one when the fraction is positive and there are several)."""
    if named is not None:
        mask = np.asarray(named, bool)
    else:
        n_val = round(n_documents * val_fraction)
        if val_fraction > 0 and n_val == 0 and n_documents > 1:
            n_val = 1
        order = np.random.default_rng(seed).permutation(n_documents)
        mask = np.zeros(n_documents, bool)
        mask[order[:n_val]] = True
    if n_documents and mask.all():
        raise CorpusError("no training text left after holding out validation documents")
    return mask


# -- reading documents --------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """Bytes [start, end) of a source (end -1: to its end; a gzip file is read whole).
    `first_doc` is the ordinal (over the whole corpus) of the first document that starts
    in it; for text, `continues` says that it starts inside that document, begun by the
    previous segment, and `ends` that the document ends in it. `first_line` numbers a
    JSONL segment's first line in its file (1-based); `documents` counts the documents
    that start in it (a text file's: 1, or 0 for whitespace alone), once scanned."""

    source: int
    start: int = 0
    end: int = -1
    first_doc: int = 0
    continues: bool = False
    ends: bool = True
    first_line: int = 1
    documents: int = 0

    def length(self, source: Source) -> int:
        return (source.size if self.end < 0 else self.end) - self.start


class BadLine(Exception):
    """A JSONL line that is not a document (its reason; the caller knows where)."""


@contextlib.contextmanager
def reading(source: Source):
    """Turns what reading a file can raise into one CorpusError naming it."""
    try:
        yield
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise CorpusError(
            f"{source.path} is not a complete gzip file (truncated or corrupt: {e})"
        ) from None
    except OSError as e:
        raise CorpusError(f"{source.path} cannot be read: {e.strerror or e}") from None


class SegmentReader:
    """The bytes of one segment as a stream; `consumed` counts the bytes taken from the
    file itself (compressed bytes for gzip), for progress."""

    def __init__(self, source: Source, segment: Segment | None = None) -> None:
        self.source = source
        segment = segment or Segment(0)
        self.raw = open(source.path, "rb")  # noqa: SIM115 (closed by close())
        if source.compressed:
            self.stream: BinaryIO = gzip.GzipFile(fileobj=self.raw, mode="rb")
            self.left = -1
        else:
            self.raw.seek(segment.start)
            self.stream = self.raw
            self.left = -1 if segment.end < 0 else segment.end - segment.start
        self.start = segment.start if not source.compressed else 0

    @property
    def consumed(self) -> int:
        return self.raw.tell() - self.start

    def read(self, size: int = READ_SIZE) -> bytes:
        if self.left == 0:
            return b""
        data = self.stream.read(size if self.left < 0 else min(size, self.left))
        if self.left > 0:
            self.left -= len(data)
        return data

    def readline(self, limit: int) -> bytes:
        """The next line of the segment, or its next `limit` bytes."""
        if self.left == 0:
            return b""
        line = self.stream.readline(limit if self.left < 0 else min(limit, self.left))
        if self.left > 0:
            self.left -= len(line)
        return line

    def lines(self) -> Iterator[bytes | LongLine]:
        """The segment's lines (each with its newline, the last maybe without): bytes, or
        a LongLine for one longer than LONG_LINE (read on by the caller, else skipped)."""
        while line := self.readline(LONG_LINE):
            if len(line) < LONG_LINE or line.endswith(b"\n"):
                yield line
                continue
            long = LongLine(self, line)
            yield long
            for _ in long.pieces():  # the rest, if the caller stopped early
                pass

    def close(self) -> None:
        self.stream.close()
        self.raw.close()

    def __enter__(self) -> SegmentReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LongLine:
    """A line too long to hold: its bytes read on from the reader, READ_SIZE at a time,
    once; `size` counts them so far."""

    def __init__(self, reader: SegmentReader, head: bytes) -> None:
        self.reader, self.head, self.size, self.done = reader, head, len(head), False

    def pieces(self) -> Iterator[bytes]:
        head, self.head = self.head, b""
        for at in range(0, len(head), READ_SIZE):
            yield head[at : at + READ_SIZE]
        while not self.done:
            piece = self.reader.readline(READ_SIZE)
            self.size += len(piece)
            self.done = not piece or piece.endswith(b"\n")
            if piece:
                yield piece


def text_chunks(reader: SegmentReader, size: int = READ_SIZE) -> Iterator[str]:
    """The segment's text decoded piece by piece: the pieces join to the whole file's
    `bytes.decode("utf-8", errors="replace")` (a segment starts after a newline, where a
    decoder has nothing pending)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    while data := reader.read(size):
        if text := decoder.decode(data):
            yield text
    if text := decoder.decode(b"", final=True):
        yield text


def has_text(source: Source) -> bool:
    """Whether a text file holds a document: anything but whitespace (Python's str.strip)."""
    with reading(source), SegmentReader(source) as reader:
        return any(chunk.strip() for chunk in text_chunks(reader, 1 << 16))


def document_text(line: bytes, field: str) -> str | None:
    """The document of one JSONL line, None for a blank line; BadLine for anything else.
    Lone surrogates (valid JSON escapes, but no text) become U+FFFD."""
    if not line.strip():
        return None
    try:
        value = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadLine(f"not JSON ({e.msg})") from None
    except (ValueError, RecursionError) as e:  # invalid UTF-8, an integer of 4301 digits
        raise BadLine(f"not JSON ({type(e).__name__})") from None
    if not isinstance(value, dict):
        raise BadLine(f"not a JSON object (a {type(value).__name__})")
    if field not in value:
        raise BadLine(f"no field {field!r} (--text-field names another)")
    text = value[field]
    if not isinstance(text, str):
        raise BadLine(f"field {field!r} is not a string")
    return _SURROGATE.sub("\ufffd", text) if _SURROGATE.search(text) else text


def bad_line_error(source: Source, line: int, reason: str) -> CorpusError:
    return CorpusError(f"{source.path}:{line}: {reason}; --skip-bad-lines skips such lines")


def split_points(source: Source, target: int) -> list[int]:
    """Byte offsets that cut a plain file into pieces of about `target` bytes, each just
    after a newline (none for a gzip file or one smaller than two pieces)."""
    if source.compressed or source.size < 2 * target:
        return []
    points = []
    with reading(source), open(source.path, "rb") as f:
        at = target
        while at < source.size - target // 2:
            f.seek(at)
            while True:  # forward to the next newline
                block = f.read(1 << 16)
                if not block:
                    return points
                newline = block.find(b"\n")
                if newline >= 0:
                    at += newline + 1
                    break
                at += len(block)
            if at >= source.size:
                break
            points.append(at)
            at += target
    return points


def expanded_size(source: Source) -> int:
    """The size of the text a file holds: its size, or for gzip the size its trailer
    records (modulo 4 GiB, so at least the compressed size), for estimates only."""
    if not source.compressed or source.size < 18:
        return source.size
    with reading(source), open(source.path, "rb") as f:
        f.seek(-4, 2)
        return max(struct.unpack("<I", f.read(4))[0], source.size)
