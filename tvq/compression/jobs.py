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
    MAX_FRAME_TOKENS,
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

FRAME_TOKENS = MAX_FRAME_TOKENS  # tokens per frame: ~25 bytes of framing per ~15 KB of output


class Frames:
    """A stream read as frames of `size` tokens (the last may be shorter): each
    (tokens, escaped bytes, the frame's bytes), and the length and SHA-256 of all read."""

    def __init__(self, symbols: Symbols, source: BinaryIO, size: int) -> None:
        self.symbols, self.size = symbols, size
        self.pieces = symbols.read(source)
        self.piece, self.at = ([], []), 0
        self.sha, self.length = hashlib.sha256(), 0

    def next(self) -> tuple[list[int], list[int], bytes] | None:
        """The next frame, or None at the end."""
        tokens, escaped = [], []
        while len(tokens) < self.size:
            if self.at == len(self.piece[0]):
                piece = next(self.pieces, None)
                if piece is None:
                    break
                self.piece, self.at = piece[:2], 0
                continue
            take = min(self.size - len(tokens), len(self.piece[0]) - self.at)
            tokens += self.piece[0][self.at : self.at + take]
            escaped += self.piece[1][self.at : self.at + take]
            self.at += take
        if not tokens:
            return None
        data = b"".join(map(self.symbols.bytes_of, tokens, escaped))
        self.sha.update(data)
        self.length += len(data)
        return tokens, escaped, data


class Encoding(Job):
    """Compresses a binary stream into a sink: the header now, then frame by frame
    (FRAME_TOKENS tokens each), the end record after the last. A frame that does not
    look like text (`looks_binary`), or that coding would not make smaller, is stored
    as it is; after one coded in vain the row goes back to its state before it (`mark`,
    `rewind`), as the decompressor, which never runs the model on a stored frame."""

    def __init__(self, model: Model, symbols: Symbols, header: bytes, source: BinaryIO,
                 sink: BinaryIO, name: str) -> None:  # fmt: skip
        self.symbols, self.sink, self.name = symbols, sink, name
        self.frames = Frames(symbols, source, FRAME_TOKENS)
        self.result = Result(name)
        self.started = time.perf_counter()
        self.token = eos_id(model)
        self._write(header)
        self._next_frame()

    def _write(self, data: bytes) -> None:
        self.sink.write(data)
        self.result.compressed += len(data)

    def _next_frame(self) -> None:
        """Stores frames that look binary, up to one to code (or the end)."""
        while True:
            frame = self.frames.next()
            if frame is None:
                self._finish()
                return
            tokens, escaped, data = frame
            self.result.original += len(data)
            if not looks_binary(data):
                break
            self.result.compressed += write_stored(self.sink, data)
            self.progress += len(data)
        self.frame = CodingFrame(tokens, escaped, data)
        self.mark, self.before = True, self.token  # Rows keeps the row's state now

    def ready(self) -> int:
        return self.frame.left

    def targets(self, k: int) -> list[tuple[int, int]]:
        return self.frame.targets(k)

    def take(self, steps: Steps, state: int, read: int) -> None:
        self.progress += self.frame.take(steps, state, read, self.symbols)
        self.token = int(steps.tokens[-1])
        if self.frame.left:
            return
        written, stored = self.frame.write(self.sink)
        self.result.compressed += written
        if stored:  # coding did not help: the row's state goes back
            self.rewind, self.token = True, self.before
        else:  # the tokens coded (as the decompressor counts them)
            self.result.tokens += len(self.frame.tokens)
            self.result.escapes += self.frame.escapes
        self._next_frame()

    def _finish(self) -> None:
        self.result.compressed += write_end(self.sink, self.frames.length, self.frames.sha.digest())
        self.result.seconds = time.perf_counter() - self.started
        self.done = True


class CodingFrame:
    """One frame being coded: its tokens go to the program as targets, and each token's
    (start, frequency), and each escaped byte's, is kept for the encoder."""

    def __init__(self, tokens: list[int], escaped: list[int], data: bytes) -> None:
        self.tokens, self.escaped, self.data = tokens, escaped, data
        self.index, self.escapes = 0, 0
        self.coded: list[tuple[int, int]] = []  # in the order the decoder reads them

    @property
    def left(self) -> int:
        return len(self.tokens) - self.index

    def targets(self, k: int) -> list[tuple[int, int]]:
        end = self.index + k
        return list(zip(self.tokens[self.index : end], self.escaped[self.index : end],
                        strict=True))  # fmt: skip

    def take(self, steps: Steps, state: int, read: int, symbols: Symbols) -> int:
        """Keeps the steps' codes → the bytes of the original they stand for (state and
        read: the decoder's, unused here)."""
        done = 0
        for token, escaped, start, freq in zip(*steps[:4], strict=True):
            token, escaped = int(token), int(escaped)
            assert token == self.tokens[self.index], "the program coded another token"
            self.index += 1
            self.coded.append((int(start), int(freq)))
            if escaped != NO_BYTE:
                self.coded.append((escaped << rans.BYTE_BITS, 1 << rans.BYTE_BITS))
                self.escapes += 1
            done += len(symbols.bytes_of(token, escaped))
        return done

    def write(self, sink: BinaryIO) -> tuple[int, bool]:
        """Writes the frame coded, or stored if coding did not make it smaller → (bytes
        written, whether stored)."""
        code = rans.encode(self.coded)
        if worth_coding(FRAME_BYTES + len(code), STORED_BYTES + len(self.data)):
            crc = zlib.crc32(self.data)
            return write_frame(sink, len(self.tokens), crc, len(self.data), code), False
        return write_stored(sink, self.data), True


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
                self.frame = DecodingFrame(record, self.name, self.index)
                self.result.compressed += FRAME_BYTES + len(record.code)
                return
            if isinstance(record, bytes):
                self.result.compressed += STORED_BYTES + len(record)
                self._emit(record)
                continue
            self.result.compressed += END_BYTES
            check_end(record, self.result.original, self.sha, self.name)
            self.result.seconds = time.perf_counter() - self.started
            self.done = True
            return

    @property
    def state(self) -> int:
        return self.frame.state

    def ready(self) -> int:
        return self.frame.left

    def window(self) -> bytes:
        return self.frame.window()

    def take(self, steps: Steps, state: int, read: int) -> None:
        self.progress += self.frame.take(steps, state, read, self.symbols)
        self.token = int(steps.tokens[-1])
        if self.frame.left:
            return
        self.result.tokens += self.frame.record.tokens
        self.result.escapes += self.frame.escapes
        self._emit(self.frame.data())
        self._next_frame()

    def _emit(self, data: bytes) -> None:
        self.progress = self.result.original + len(data)
        self.sink.write(data)
        self.sha.update(data)
        self.result.original += len(data)


class DecodingFrame:
    """One coded frame being decoded: the program reads its stream from `window()`.
    name and index: the file's and the frame's, for its errors."""

    def __init__(self, record: Frame, name: str, index: int) -> None:
        self.record, self.left, self.out, self.escapes = record, record.tokens, [], 0
        self.state, self.at = rans.first_state(record.code), 4
        self.name, self.index, self.size = name, index, 0

    def window(self) -> bytes:
        return self.record.code[self.at : self.at + WINDOW]

    def take(self, steps: Steps, state: int, read: int, symbols: Symbols) -> int:
        """Keeps the steps' tokens → the bytes they decode to."""
        self.state, self.at = state, self.at + read
        done = 0
        for token, escaped in zip(steps.tokens.tolist(), steps.bytes.tolist(), strict=True):
            self.out.append(symbols.bytes_of(token, escaped))
            self.escapes += escaped != NO_BYTE
            done += len(self.out[-1])
        self.left -= len(steps.tokens)
        self.size += done
        if self.at > len(self.record.code) or self.size > self.record.n_bytes:  # never if valid
            raise self._corrupt()
        return done

    def _corrupt(self) -> FormatError:
        return FormatError(f"{self.name} is corrupt: frame {self.index} does not decode to "
                           "what was compressed")  # fmt: skip

    def data(self) -> bytes:
        """The frame's bytes, once decoded: FormatError unless they are what was
        compressed (the decoder at LOW, the encoder's first state, having read every
        byte; the length and the checksum)."""
        data, record = b"".join(self.out), self.record
        ended = self.state == rans.LOW and self.at == len(record.code)
        if not ended or len(data) != record.n_bytes or zlib.crc32(data) != record.crc:
            raise self._corrupt()
        return data


def check_end(record: tuple[int, bytes], length: int, sha, name: str) -> None:
    """FormatError unless the end record's length and checksum are the output's."""
    if record[0] != length or record[1] != sha.digest()[:16]:
        raise FormatError(f"{name} is corrupt: the checksum of the whole does not match")
