"""Tokenizers: one small protocol, two implementations (over 300 lines because exact
streaming needs each model's own cutting rules, read off its specification, beside it).

- `ByteTokenizer`: byte b ↔ id b + 3; 0 = pad, 1 = end of document, 2 = unknown;
  vocabulary 259 (the reference implementation's byte vocabulary).
- `SentencePieceTokenizer`: a sentencepiece `.model` file.

Both decode through a per-id byte table, so streamed text is exact: the pieces
that `StreamDecoder` emits concatenate to `decode(all ids)` and never split a
UTF-8 character. Both say where a text may be cut so that tokenizing the pieces
gives exactly the ids of the whole (`cut`); `encode_stream` uses it to tokenize a
file of any length piece by piece (docs/DESIGN.md section 8).
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

from tvq.errors import TokenizerError

__all__ = ["TokenizerError"]  # re-exported for convenience

# A sentencepiece model's name wherever tvq keeps one beside what it tokenizes: a model
# directory, a prepared dataset, a training run.
TOKENIZER_FILE = "tokenizer.model"


class Tokenizer(Protocol):
    kind: str
    vocab_size: int
    pad_id: int
    eos_id: int
    unk_id: int
    fingerprint: str
    eos_text: str  # how the end-of-document token is written where text names it

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def token_bytes(self, token_id: int) -> bytes: ...

    def cut(self, data: bytes) -> int: ...


class StreamDecoder:
    """Turns ids into text one at a time without ever emitting half a character."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self._tokenizer.token_bytes(int(token_id)))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    """One token's text as it reads in the output: its bytes as UTF-8, U+FFFD where they
    are not whole characters (the token field of every per-token result)."""
    return tokenizer.token_bytes(int(token_id)).decode("utf-8", errors="replace")


def top_entries(tokenizer: Tokenizer, ids, log_probs) -> list[dict]:
    """The most likely tokens at one position as [{token, id, logprob}], likeliest first
    (the top_logprobs of `tvq score --per-token` and `tvq generate --json`)."""
    return [{"token": token_text(tokenizer, i), "id": int(i), "logprob": round(float(lp), 6)}
            for i, lp in zip(ids, log_probs, strict=True)]  # fmt: skip


def decode_via_bytes(tokenizer: Tokenizer, ids) -> str:
    data = b"".join(tokenizer.token_bytes(int(i)) for i in ids)
    return data.decode("utf-8", errors="replace")


class ByteTokenizer:
    """UTF-8 bytes shifted by 3 specials."""

    kind = "bytes"
    vocab_size = 259
    pad_id, eos_id, unk_id = 0, 1, 2
    fingerprint = "bytes-v1"
    eos_text = "</s>"  # sentencepiece's name for it; no byte sequence means it
    OFFSET = 3

    def encode(self, text: str) -> list[int]:
        return [b + self.OFFSET for b in text.encode("utf-8")]

    def encode_bytes(self, data: bytes) -> list[int]:
        return [b + self.OFFSET for b in data]

    def cut(self, data: bytes) -> int:
        """Any byte boundary: each byte is its own token."""
        return len(data)

    def token_bytes(self, token_id: int) -> bytes:
        if self.OFFSET <= token_id < self.vocab_size:
            return bytes([token_id - self.OFFSET])
        return b""

    def decode(self, ids) -> str:
        return decode_via_bytes(self, ids)


class SentencePieceTokenizer:
    """A sentencepiece model; decoding is exact and stream-safe through a byte table."""

    kind = "sentencepiece"

    def __init__(self, path: str | os.PathLike) -> None:
        import sentencepiece as spm

        self.path = Path(path)
        try:
            data = self.path.read_bytes()
        except OSError as e:
            raise TokenizerError(f"tokenizer {path} cannot be read: {e.strerror}") from None
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(data)
        except Exception:  # sentencepiece raises RuntimeError/OSError variants
            raise TokenizerError(f"{path} is not a sentencepiece model") from None
        self.fingerprint = "sha256:" + hashlib.sha256(data).hexdigest()
        self.vocab_size = int(self._sp.get_piece_size())
        self.pad_id = int(self._sp.pad_id())
        self.eos_id = int(self._sp.eos_id())
        self.unk_id = int(self._sp.unk_id())
        self.eos_text = self._sp.id_to_piece(self.eos_id) if self.eos_id >= 0 else "</s>"
        self._bytes = [self._piece_bytes(i) for i in range(self.vocab_size)]
        self._data = data

    def _piece_bytes(self, token_id: int) -> bytes:
        sp = self._sp
        if sp.is_control(token_id) or sp.is_unknown(token_id):
            return b""
        piece = sp.id_to_piece(token_id)
        if sp.is_byte(token_id):  # "<0xAB>"
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode("utf-8")

    @functools.cached_property
    def _cuts(self) -> tuple[bool, bool]:
        """_safe_cuts of this model, worked out on first use (streaming input needs it;
        generating does not, so its start-up skips parsing the model's protobuf)."""
        return _safe_cuts(self._data)

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def cut(self, data: bytes) -> int:
        """The last place in data (UTF-8) where the model's own rules force a piece
        boundary, 0 if none: after a newline (a user-defined piece that no other piece
        contains), or before a space that follows a non-space (no piece holds a space
        after another character). Both need a model that adds no dummy prefix and
        normalises nothing (tvq's own tokenizers); for other models, 0."""
        newline_cuts, space_cuts = self._cuts
        at = data.rfind(b"\n") + 1 if newline_cuts else 0
        if space_cuts:
            space = data.rfind(b" ")
            while space > at and data[space - 1] == 0x20:
                space = data.rfind(b" ", 0, space - 1)
            at = max(at, space)
        return at

    def token_bytes(self, token_id: int) -> bytes:
        if 0 <= token_id < self.vocab_size:
            return self._bytes[token_id]
        return b""

    def decode(self, ids) -> str:
        return decode_via_bytes(self, ids)


def _safe_cuts(serialized: bytes) -> tuple[bool, bool]:
    """(cut after a newline is exact, cut before a space after a non-space is exact), read
    off the model's own specification (see SentencePieceTokenizer.cut)."""
    try:
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(serialized)
    except Exception:  # no protobuf, or a format this code does not know: never cut
        return False, False
    norm, trainer = proto.normalizer_spec, proto.trainer_spec
    if norm.add_dummy_prefix or norm.remove_extra_whitespaces or norm.name != "identity":
        return False, False
    user_defined = 4  # ModelProto.SentencePiece.Type.USER_DEFINED
    pieces = [(p.piece, p.type) for p in proto.pieces]
    newline = ("\n", user_defined) in pieces and not any(
        "\n" in piece for piece, kind in pieces if (piece, kind) != ("\n", user_defined)
    )
    space = (
        trainer.split_by_whitespace
        and not trainer.treat_whitespace_as_suffix
        and not any(re.search("[^\u2581]\u2581", piece) for piece, _ in pieces)
    )
    return newline, bool(space)


READ_SIZE = 1 << 16


def encode_stream(
    tokenizer: Tokenizer, stream: BinaryIO, read_size: int = READ_SIZE
) -> Iterator[tuple[list[int], int, bool]]:
    """Tokenizes a binary stream piece by piece → (ids, bytes read, invalid UTF-8 seen).

    Pieces are cut only where `tokenizer.cut` says the ids are those of the whole text, so
    the ids joined equal `encode` of everything read; where no cut is allowed, pieces
    grow until one is (for a tokenizer that allows none, the whole text is one piece)."""
    encode_bytes = getattr(tokenizer, "encode_bytes", None)
    rest, ended = b"", False
    while not ended:
        data = stream.read(read_size)
        ended = not data
        data = rest + data
        at = len(data) if ended else tokenizer.cut(data)
        piece, rest = data[:at], data[at:]
        if not piece:
            continue
        if encode_bytes is not None:
            yield encode_bytes(piece), len(piece), False
            continue
        try:
            text, invalid = piece.decode("utf-8"), False
        except UnicodeDecodeError:
            text, invalid = piece.decode("utf-8", errors="replace"), True
        yield tokenizer.encode(text), len(piece), invalid


def train_sentencepiece(
    files: list[Path], model_path: Path, vocab_size: int, *, threads: int = 2
) -> SentencePieceTokenizer:
    """Trains a lossless unigram model: newlines, runs of spaces and any byte survive."""
    import sentencepiece as spm

    prefix = (
        str(model_path)[: -len(".model")] if str(model_path).endswith(".model") else str(model_path)
    )
    try:
        spm.SentencePieceTrainer.train(
            input=[str(f) for f in files],
            model_prefix=prefix,
            vocab_size=vocab_size,
            model_type="unigram",
            pad_id=0,
            eos_id=1,
            unk_id=2,
            bos_id=-1,
            byte_fallback=True,
            character_coverage=1.0,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            user_defined_symbols=["\n"],
            allow_whitespace_only_pieces=True,
            split_digits=True,
            max_sentence_length=1 << 16,
            num_threads=threads,
            minloglevel=2,
        )
    except RuntimeError as e:
        import re

        small = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", str(e))
        if small:
            raise TokenizerError(
                f"vocabulary size {small.group(1)} is too small for this text: "
                f"it needs more than {small.group(2)} (byte pieces and every character)"
            ) from None
        raise TokenizerError(f"sentencepiece training failed: {str(e).strip()}") from None
    Path(prefix + ".vocab").unlink(missing_ok=True)
    return SentencePieceTokenizer(prefix + ".model")


def check_vocab(tokenizer: Tokenizer | None, n_vocab: int) -> None:
    """Raises TokenizerError unless the tokenizer's ids are the model's vocabulary."""
    if tokenizer is not None and tokenizer.vocab_size != n_vocab:
        raise TokenizerError(
            f"tokenizer has {tokenizer.vocab_size} ids but the model's vocabulary "
            f"(n_vocab) is {n_vocab}"
        )


def load_tokenizer(spec: dict, folder: Path | None = None) -> Tokenizer:
    """A tokenizer from its config.json entry: {"kind", "file"?, "fingerprint"}."""
    kind = spec.get("kind")
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "sentencepiece":
        file = spec.get("file")
        if not file:
            raise TokenizerError("sentencepiece tokenizer entry names no file")
        path = Path(file) if folder is None else folder / file
        if not path.is_file():
            raise TokenizerError(f"tokenizer file {path} is missing")
        tokenizer = SentencePieceTokenizer(path)
        want = spec.get("fingerprint")
        if want and want != tokenizer.fingerprint:
            raise TokenizerError(
                f"tokenizer {path} has fingerprint {tokenizer.fingerprint[:19]}…, "
                f"the model was trained with {str(want)[:19]}…"
            )
        return tokenizer
    raise TokenizerError(f"unknown tokenizer kind {kind!r}")


def open_tokenizer(path: str | os.PathLike | None, *, use_bytes: bool = False) -> Tokenizer:
    if use_bytes:
        return ByteTokenizer()
    if path is None:
        raise TokenizerError("no tokenizer given")
    return SentencePieceTokenizer(path)
