"""The `.tvqz` file format (docs/DESIGN.md section 16): a header, frames, an end record.

    header  "TVQZ", version (u8), flags (u8: bit 0 bfloat16, bit 1 aggregate cache off),
            rows (u16: 1, or a split file's rows, frames going to them in turn),
            model fingerprint (16 bytes), tokenizer fingerprint (16), numbers probe (8),
            platform (u8 length + ASCII), CRC-32 of everything before it (u32)
    frame   "F", tokens (u32), bytes (u32), CRC-32 of the frame's original bytes (u32),
            code bytes (u32), then that many bytes of the rANS stream (rans.py)
    stored  "S", bytes (u32), CRC-32 (u32), then the bytes as they are: a frame that
            does not look like text, or that coding would not make smaller
    end     "E", the original's length (u64), the first 16 bytes of its SHA-256

Integers are little-endian. The original's length and checksum come last because a
stream (stdin) is only known at its end; every frame carries its own checksum, so a
reader that streams its output has checked each frame before writing it. Each way a
file can be wrong (not a tvqz file, a newer version, another model, numbers computed
differently, truncated, edited) is a FormatError with its own one-line message.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
import zlib
from typing import BinaryIO

from tvq.errors import InputError

MAGIC = b"TVQZ"
VERSION = 2  # 1: constriction's range coder (session 17); 2: tvq's own rANS
BFLOAT16, NO_AGG_CACHE = 1, 2  # flag bits
FRAME, STORED, END = b"F", b"S", b"E"
_FRAME = struct.Struct("<IIII")  # tokens, bytes, crc32, code bytes
MAX_FRAME_BYTES = 1 << 24  # what one frame can hold, and more
MAX_FRAME_TOKENS = 1 << 14  # a frame's tokens at most (a split file's: 8,192)
_STORED = struct.Struct("<II")  # bytes, crc32
_END = struct.Struct("<Q16s")  # length, sha256[:16]
# the bytes of each record beside its contents
FRAME_BYTES, STORED_BYTES, END_BYTES = 1 + _FRAME.size, 1 + _STORED.size, 1 + _END.size


class FormatError(InputError):
    """A .tvqz file that cannot be decompressed here, and why (one line)."""


def fingerprint16(fingerprint: str) -> bytes:
    """A model's or tokenizer's fingerprint (any string) as 16 bytes."""
    return hashlib.sha256(fingerprint.encode()).digest()[:16]


@dataclasses.dataclass(frozen=True)
class Header:
    model: bytes  # fingerprint16 of the model as it ran (its dtype and aggregate cache)
    tokenizer: bytes
    probe: bytes  # tvq.compression.coder.probe: 8 bytes of the numbers' hash
    platform: str  # where the numbers were computed: "jax 0.10.2 cpu"
    bfloat16: bool = False
    agg_cache: bool = True
    rows: int = 1  # a split file's rows (tvq.compression.split); 1: one stream

    def to_bytes(self) -> bytes:
        flags = BFLOAT16 * self.bfloat16 | NO_AGG_CACHE * (not self.agg_cache)
        platform = self.platform.encode("ascii", "replace")[:255]
        head = (MAGIC + bytes([VERSION, flags]) + struct.pack("<H", self.rows) + self.model
                + self.tokenizer + self.probe + bytes([len(platform)]) + platform)  # fmt: skip
        return head + struct.pack("<I", zlib.crc32(head))

    @classmethod
    def read(cls, stream: BinaryIO, name: str) -> Header:
        head = stream.read(6)
        if head[:4] != MAGIC[: len(head)] or len(head) < 4:
            raise FormatError(f"{name} is not a tvq compressed file")
        if len(head) < 6:
            raise FormatError(f"{name} is truncated (it ends inside its header)")
        if head[4] != VERSION:
            raise FormatError(f"{name} has format version {head[4]}; this tvq reads version "
                              f"{VERSION}")  # fmt: skip
        fixed = _read(stream, 43, name, "its header")
        platform = _read(stream, fixed[42], name, "its header")
        head += fixed + platform
        (crc,) = struct.unpack("<I", _read(stream, 4, name, "its header"))
        if crc != zlib.crc32(head):
            raise FormatError(f"{name} is corrupt: its header's checksum does not match")
        flags, (rows,) = head[5], struct.unpack("<H", fixed[:2])
        if rows == 0:
            raise FormatError(f"{name} is corrupt: its header names no rows")
        return cls(model=fixed[2:18], tokenizer=fixed[18:34], probe=fixed[34:42],
                   platform=platform.decode("ascii", "replace"), bfloat16=bool(flags & BFLOAT16),
                   agg_cache=not flags & NO_AGG_CACHE, rows=rows)  # fmt: skip


@dataclasses.dataclass
class Frame:
    tokens: int
    n_bytes: int
    crc: int
    code: bytes  # the rANS stream


def write_frame(stream: BinaryIO, tokens: int, data_crc: int, n_bytes: int, code: bytes) -> int:
    """Writes one frame; returns the bytes written."""
    stream.write(FRAME + _FRAME.pack(tokens, n_bytes, data_crc, len(code)))
    stream.write(code)
    return 1 + _FRAME.size + len(code)


def write_stored(stream: BinaryIO, data: bytes) -> int:
    stream.write(STORED + _STORED.pack(len(data), zlib.crc32(data)))
    stream.write(data)
    return 1 + _STORED.size + len(data)


def write_end(stream: BinaryIO, length: int, sha256: bytes) -> int:
    stream.write(END + _END.pack(length, sha256[:16]))
    return 1 + _END.size


def read_record(stream: BinaryIO, name: str, index: int) -> Frame | bytes | tuple[int, bytes]:
    """The next record: a Frame, a stored frame's bytes (checked), or the end's (length,
    sha256[:16]) after which the file must end."""
    kind = _read(stream, 1, name, f"frame {index}")
    if kind == END:
        length, digest = _END.unpack(_read(stream, _END.size, name, "its end record"))
        if stream.read(1):
            raise FormatError(f"{name} is corrupt: data follows its end record")
        return length, digest
    if kind == STORED:
        n_bytes, crc = _STORED.unpack(_read(stream, _STORED.size, name, f"frame {index}"))
        if n_bytes > MAX_FRAME_BYTES:
            raise FormatError(f"{name} is corrupt: frame {index}'s sizes are impossible")
        data = _read(stream, n_bytes, name, f"frame {index}")
        if zlib.crc32(data) != crc:
            raise FormatError(f"{name} is corrupt: frame {index}'s checksum does not match")
        return data
    if kind != FRAME:
        raise FormatError(f"{name} is corrupt: frame {index} does not start where it should")
    fields = _read(stream, _FRAME.size, name, f"frame {index}")
    tokens, n_bytes, crc, n_code = _FRAME.unpack(fields)
    # a token and its escaped byte take at most 6 bytes, the final state 4
    if (not 4 <= n_code <= 6 * tokens + 4 or not 0 < tokens <= MAX_FRAME_TOKENS
            or n_bytes > MAX_FRAME_BYTES):  # fmt: skip
        raise FormatError(f"{name} is corrupt: frame {index}'s sizes are impossible")
    return Frame(tokens, n_bytes, crc, _read(stream, n_code, name, f"frame {index}"))


def _read(stream: BinaryIO, n: int, name: str, where: str) -> bytes:
    data = stream.read(n)
    while len(data) < n:  # a pipe may return less than asked
        more = stream.read(n - len(data))
        if not more:
            raise FormatError(f"{name} is truncated (it ends inside {where})")
        data += more
    return data
