"""Training text: find files, read them, hold documents out, tokenize into one stream, and
cut the stream into the windows of each update (docs/DESIGN.md section 11)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tvq.errors import CorpusError, TrainingError

TEXT_SUFFIXES = {".txt", ".md", ".text", ""}


@dataclass
class Document:
    path: Path
    text: str

    @property
    def n_bytes(self) -> int:
        return len(self.text.encode("utf-8"))


def find_files(paths: list[str | os.PathLike]) -> list[Path]:
    """Files as given, and text files (.txt, .md, no suffix) inside directories, sorted."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise CorpusError(f"{path} does not exist")
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*")
                if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES and not p.name.startswith(".")
            )  # fmt: skip
            if not found:
                raise CorpusError(f"no text files (.txt, .md) found in {path}")
            files.extend(found)
        else:
            files.append(path)
    return files


def read_documents(files: list[Path]) -> list[Document]:
    docs = []
    for file in files:
        try:
            data = file.read_bytes()
        except OSError as e:
            raise CorpusError(f"{file} cannot be read: {e.strerror}") from None
        text = data.decode("utf-8", errors="replace")
        if text.strip():
            docs.append(Document(file, text))
    if not docs:
        raise CorpusError("no text found: every file is empty")
    return docs


def split_documents(
    docs: list[Document], val_fraction: float, held_out: list[Path], seed: int
) -> tuple[list[Document], list[Document]]:
    """Held-out documents by name, else a fraction of whole documents chosen by seed."""
    if held_out:
        names = {Path(p).resolve() for p in held_out}
        val = [d for d in docs if d.path.resolve() in names]
        train = [d for d in docs if d.path.resolve() not in names]
        return train, val
    if not 0 <= val_fraction < 1:
        raise CorpusError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    n_val = round(len(docs) * val_fraction)
    if val_fraction > 0 and n_val == 0 and len(docs) > 1:
        n_val = 1
    order = np.random.default_rng(seed).permutation(len(docs))
    val_ids = set(order[:n_val].tolist())
    train = [d for i, d in enumerate(docs) if i not in val_ids]
    val = [d for i, d in enumerate(docs) if i in val_ids]
    if not train:
        raise CorpusError("no training text left after holding out validation documents")
    return train, val


def token_stream(docs: list[Document], tokenizer) -> np.ndarray:
    """Documents as one stream, each followed by the end-of-document id."""
    pieces = []
    for doc in docs:
        pieces.append(np.asarray(tokenizer.encode(doc.text), np.int32))
        pieces.append(np.asarray([tokenizer.eos_id], np.int32))
    return np.concatenate(pieces)


class TokenStream:
    """Training tokens as B contiguous rows; windows advance along the rows, epoch after epoch.

    Each epoch starts the rows at a fresh random shift, so windows do not align the same way
    twice; the attention state is reset at the start of every epoch.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, update_len: int, seed: int) -> None:
        self.tokens = np.asarray(tokens, np.int32)
        self.batch_size, self.update_len, self.seed = batch_size, update_len, seed
        self.row_len = len(self.tokens) // batch_size
        self.windows_per_epoch = (self.row_len - update_len - 1) // update_len
        if self.windows_per_epoch < 1:
            need = batch_size * (2 * update_len + 2)
            raise TrainingError(
                f"not enough training text: {len(self.tokens)} tokens, need at least {need} "
                f"for batch size {batch_size} and update length {update_len}"
            )

    def starts_epoch(self, step: int) -> bool:
        return step % self.windows_per_epoch == 0

    def window(self, step: int, rows: slice = slice(None)) -> np.ndarray:
        """Tokens [B, U + 1] of update `step` (inputs are [:, :-1], targets [:, 1:]), or of
        the batch rows `rows` only: a process builds just the rows its devices hold."""
        epoch, index = divmod(step, self.windows_per_epoch)
        shift = np.random.default_rng([self.seed, epoch]).integers(0, self.update_len)
        starts = np.arange(self.batch_size)[rows, None] * self.row_len
        start = starts + shift + index * self.update_len
        return self.tokens[start + np.arange(self.update_len + 1)[None, :]]
