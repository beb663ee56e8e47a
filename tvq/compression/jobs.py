"""The two jobs of tvq.compression.coder.Rows (docs/DESIGN.md section 16): `Encoding`
codes a file's tokens into frames, `Decoding` reads them back; the model's program
quantizes each step's distribution, and decodes, for both."""

from __future__ import annotations

import hashlib
import re
import time
import zlib
from typing import BinaryIO

from tvq.compression import rans
from tvq.compression.coder import WINDOW, Job, Result, Steps
from tvq.compression.container import (
    END_BYTES,
    FRAME_BYTES,
    STORED_BYTES,
    FormatError,
    Frame,
    read_record,
    write_end,
    write_frame,
    write_stored,
)
from tvq.compression.symbols import NO_BYTE, Symbols
from tvq.runtime.context import eos_id
from tvq.runtime.model import Model

FRAME_TOKENS = 16384  # tokens per frame: ~25 bytes of framing per ~15 KB of output


class Encoding(Job):
    """Compresses a binary stream into a sink: the header now, then frame by frame
    (FRAME_TOKENS tokens each), the end record after the last. A frame that does not
    look like text (`looks_binary`), or that coding would not make smaller, is stored
    as it is; after one coded in vain the row goes back to its state before it (`mark`,
    `rewind`), as the decompressor, which never runs the model on a stored frame."""

    def __init__(self, model: Model, symbols: Symbols, header: bytes, source: BinaryIO,
                 sink: BinaryIO, name: str) -> None:  # fmt: skip
        self.symbols, self.sink, self.name = symbols, sink, name
        self.pieces = symbols.read(source)
        self.result = Result(name)
        self.started = time.perf_counter()
        self.token, self.piece, self.at = eos_id(model), ([], []), 0
        self.sha = hashlib.sha256()
        self._write(header)
        self._next_frame()

    def _write(self, data: bytes) -> None:
        self.sink.write(data)
        self.result.compressed += len(data)

    def _gather(self) -> tuple[list[int], list[int]]:
        """The next frame's tokens and escaped bytes (none at the end)."""
        tokens, escaped = [], []
        while len(tokens) < FRAME_TOKENS:
            if self.at == len(self.piece[0]):
                piece = next(self.pieces, None)
                if piece is None:
                    break
                self.piece, self.at = piece[:2], 0
                continue
            take = min(FRAME_TOKENS - len(tokens), len(self.piece[0]) - self.at)
            tokens += self.piece[0][self.at : self.at + take]
            escaped += self.piece[1][self.at : self.at + take]
            self.at += take
        return tokens, escaped

    def _next_frame(self) -> None:
        """Stores frames that look binary, up to one to code (or the end)."""
        while True:
            tokens, escaped = self._gather()
            if not tokens:
                self._finish()
                return
            data = b"".join(map(self.symbols.bytes_of, tokens, escaped))
            self.sha.update(data)
            self.result.original += len(data)
            if not looks_binary(data):
                break
            self.result.compressed += write_stored(self.sink, data)
            self.progress += len(data)
        self.frame, self.data, self.index = (tokens, escaped), data, 0
        self.coded: list[tuple[int, int]] = []  # (start, frequency) in the decoder's order
        self.mark, self.before = True, self.token  # Rows keeps the row's state now

    def ready(self) -> int:
        return len(self.frame[0]) - self.index

    def targets(self, k: int) -> list[tuple[int, int]]:
        end = self.index + k
        return list(zip(self.frame[0][self.index : end], self.frame[1][self.index : end],
                        strict=True))  # fmt: skip

    def take(self, steps: Steps, state: int, read: int) -> None:
        for token, escaped, start, freq in zip(*steps[:4], strict=True):
            token, escaped = int(token), int(escaped)
            assert token == self.frame[0][self.index], "the program coded another token"
            self.index += 1
            self.coded.append((int(start), int(freq)))
            if escaped != NO_BYTE:
                self.coded.append((escaped << rans.BYTE_BITS, 1 << rans.BYTE_BITS))
                self.result.escapes += 1
            self.progress += len(self.symbols.bytes_of(token, escaped))
            self.token = token
            self.result.tokens += 1
        if self.index < len(self.frame[0]):
            return
        code = rans.encode(self.coded)
        if worth_coding(FRAME_BYTES + len(code), STORED_BYTES + len(self.data)):
            crc = zlib.crc32(self.data)
            self.result.compressed += write_frame(self.sink, self.index, crc, len(self.data), code)
        else:  # coding did not help: stored, and the row's state goes back
            self.result.compressed += write_stored(self.sink, self.data)
            self.rewind, self.token = True, self.before
        self._next_frame()

    def _finish(self) -> None:
        self.result.compressed += write_end(self.sink, self.result.original, self.sha.digest())
        self.result.seconds = time.perf_counter() - self.started
        self.done = True


def worth_coding(coded: int, stored: int) -> bool:
    """Whether a frame coded in `coded` bytes is kept rather than stored in `stored`."""
    return coded < stored


def looks_binary(data: bytes) -> bool:
    """More than 1 in 8 bytes outside text: not UTF-8, or control characters other than
    tab, newline, form feed and carriage return."""
    text = data.decode("utf-8", errors="surrogateescape")
    odd = sum(len(run) for run in _NOT_TEXT.findall(text))
    return 8 * odd > len(text)


_NOT_TEXT = re.compile("[\x00-\x08\x0b\x0e-\x1f\x7f\udc80-\udcff]+")


class Decoding(Job):
    """Decompresses a .tvqz stream (its header already read and checked) into a sink,
    frame by frame, each frame's bytes written only once its checksum matches."""

    decoding = True

    def __init__(self, model: Model, symbols: Symbols, source: BinaryIO, sink: BinaryIO,
                 name: str, header_bytes: int = 0) -> None:  # fmt: skip
        self.symbols, self.source, self.sink, self.name = symbols, source, sink, name
        self.result = Result(name, compressed=header_bytes)
        self.started = time.perf_counter()
        self.token, self.index, self.sha = eos_id(model), 0, hashlib.sha256()
        self._next_frame()

    def _next_frame(self) -> None:
        """Writes stored frames, up to one to decode (or the end)."""
        while True:
            self.index += 1
            record = read_record(self.source, self.name, self.index)
            if isinstance(record, Frame):
                self.frame, self.left, self.out = record, record.tokens, []
                self.result.compressed += FRAME_BYTES + len(record.code)
                self.state, self.at = rans.first_state(record.code), 4
                return
            if isinstance(record, bytes):
                self.result.compressed += STORED_BYTES + len(record)
                self._emit(record)
                continue
            length, digest = record
            self.result.compressed += END_BYTES
            if length != self.result.original or digest != self.sha.digest()[:16]:
                raise FormatError(f"{self.name} is corrupt: the checksum of the whole does "
                                  "not match")  # fmt: skip
            self.result.seconds = time.perf_counter() - self.started
            self.done = True
            return

    def ready(self) -> int:
        return self.left

    def window(self) -> bytes:
        return self.frame.code[self.at : self.at + WINDOW]

    def take(self, steps: Steps, state: int, read: int) -> None:
        self.state, self.at = state, self.at + read
        for token, escaped in zip(steps.tokens.tolist(), steps.bytes.tolist(), strict=True):
            self.out.append(self.symbols.bytes_of(token, escaped))
            self.result.escapes += escaped != NO_BYTE
            self.progress += len(self.out[-1])
        self.token, self.left = int(steps.tokens[-1]), self.left - len(steps.tokens)
        self.result.tokens += len(steps.tokens)
        if self.left:
            return
        data, frame = b"".join(self.out), self.frame
        ended = self.state == rans.LOW and self.at == len(frame.code)
        if not ended or len(data) != frame.n_bytes or zlib.crc32(data) != frame.crc:
            raise FormatError(f"{self.name} is corrupt: frame {self.index} does not decode to "
                              "what was compressed")  # fmt: skip
        self._emit(data)
        self._next_frame()

    def _emit(self, data: bytes) -> None:
        self.progress = self.result.original + len(data)
        self.sink.write(data)
        self.sha.update(data)
        self.result.original += len(data)
