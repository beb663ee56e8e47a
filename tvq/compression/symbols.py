"""Any byte string as tokens whose bytes are exactly it (docs/DESIGN.md section 16).

The decompressor never tokenizes: it joins the bytes of the tokens it decodes
(`Tokenizer.token_bytes`). So the compressor may use any tokens whose bytes are the
input, and it uses the tokenizer's own where they reproduce the text exactly. Where
they do not (invalid UTF-8, or a tokenizer that normalises or adds a prefix), smaller
pieces are tried, words then characters, and what is left goes byte by byte: a token
whose bytes are that one byte (sentencepiece's byte fallback, every byte of the byte
tokenizer), or else the escape, the unknown token followed by the byte itself coded
uniformly (8 bits). Input is read and cut in pieces of bounded size, so memory stays
flat whatever the length.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import BinaryIO

from tvq.errors import InputError
from tvq.text.tokenizer import ByteTokenizer, Tokenizer

READ_SIZE = 1 << 16
MAX_PIECE = 1 << 20  # bytes held at most when the tokenizer allows no cut
NO_BYTE = -1
_WORDS = re.compile(r"\s+|\S+")
_INVALID = re.compile("([\udc80-\udcff]+)")


class Symbols:
    """A tokenizer's view for compression: text → (token, escaped byte or NO_BYTE)
    pairs, and a pair → its bytes."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.plain_bytes = isinstance(tokenizer, ByteTokenizer)
        self.byte_ids: dict[int, int] = {}
        for i in reversed(range(tokenizer.vocab_size)):  # the lowest id wins
            data = tokenizer.token_bytes(i)
            if len(data) == 1:
                self.byte_ids[data[0]] = i
        unk = tokenizer.unk_id
        self.escape = unk if unk >= 0 and tokenizer.token_bytes(unk) == b"" else None
        self._bytes = [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]

    def bytes_of(self, token: int, escaped: int) -> bytes:
        return bytes([escaped]) if escaped != NO_BYTE else self._bytes[token]

    def read(self, stream: BinaryIO) -> Iterator[tuple[list[int], list[int], bytes]]:
        """The stream as (tokens, escaped bytes, the piece's bytes) piece by piece."""
        rest = b""
        while True:
            data = stream.read(READ_SIZE)
            data, ended = rest + data, not data
            at = len(data) if ended else self._cut(data)
            piece, rest = data[:at], data[at:]
            if piece:
                tokens, escaped = self.encode(piece)
                yield tokens, escaped, piece
            if ended:
                return

    def _cut(self, data: bytes) -> int:
        """Where the tokenizer may cut (the ids then equal tokenizing the whole, as `tvq
        score` does), else past MAX_PIECE at a line or character boundary: any cut is
        lossless here."""
        at = self.tokenizer.cut(data)
        if at or len(data) < MAX_PIECE:
            return at
        at = data.rfind(b"\n") + 1
        if not at:  # before a byte that does not continue a character, if one is near
            at = len(data)
            while at > len(data) - 4 and data[at - 1] & 0xC0 == 0x80:
                at -= 1
            at = at - 1 if data[at - 1] >= 0xC0 else len(data)
        return at

    def encode(self, data: bytes) -> tuple[list[int], list[int]]:
        """tokens and escaped bytes (NO_BYTE where the token is not an escape)."""
        if self.plain_bytes:
            return [b + ByteTokenizer.OFFSET for b in data], [NO_BYTE] * len(data)
        tokens, escaped = [], []
        for run, valid in _utf8_runs(data):
            pairs = self._text(run.decode("utf-8")) if valid else self._raw(run)
            for token, byte in pairs:
                tokens.append(token)
                escaped.append(byte)
        return tokens, escaped

    def _text(self, text: str) -> list[tuple[int, int]]:
        whole = self._exact(text)
        if whole is not None:
            return whole
        pairs = []
        for word in _WORDS.findall(text):
            found = self._exact(word)
            if found is None:
                found = []
                for char in word:
                    found.extend(self._exact(char) or self._raw(char.encode("utf-8")))
            pairs.extend(found)
        return pairs

    def _exact(self, text: str) -> list[tuple[int, int]] | None:
        ids = self.tokenizer.encode(text)
        if b"".join(self._bytes[i] for i in ids) != text.encode("utf-8"):
            return None
        return [(i, NO_BYTE) for i in ids]

    def _raw(self, data: bytes) -> list[tuple[int, int]]:
        pairs = []
        for b in data:
            token = self.byte_ids.get(b)
            if token is not None:
                pairs.append((token, NO_BYTE))
            elif self.escape is not None:
                pairs.append((self.escape, b))
            else:
                raise InputError(
                    f"this model's tokenizer cannot write byte 0x{b:02x} and has no unknown "
                    "token to escape it: it cannot compress this input"
                )
        return pairs


def _utf8_runs(data: bytes) -> Iterator[tuple[bytes, bool]]:
    """data as alternating runs of valid UTF-8 and of bytes that are not, in one pass
    (invalid bytes decode to lone surrogates U+DC80-U+DCFF under surrogateescape)."""
    text = data.decode("utf-8", errors="surrogateescape")
    for run in _INVALID.split(text):
        if run:
            valid = not _INVALID.fullmatch(run)
            yield run.encode("utf-8", errors="surrogateescape"), valid
