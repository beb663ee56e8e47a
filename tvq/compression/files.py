"""Compressing and decompressing streams and byte strings (docs/DESIGN.md section 16):
what `tvq compress` and `tvq.compress` call."""

from __future__ import annotations

import functools
import io
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from typing import BinaryIO

from tvq.compression.coder import (
    MAX_ROWS,
    Failed,
    Job,
    Result,
    Rows,
    platform,
    probe,
    settings_header,
)
from tvq.compression.container import FormatError, Header, fingerprint16
from tvq.compression.jobs import Decoding, Encoding
from tvq.compression.split import MAX_SPLIT, decode_split, encode_split, rows_for
from tvq.compression.symbols import Symbols
from tvq.errors import InputError
from tvq.runtime.context import require_tokenizer
from tvq.runtime.model import Model

Item = tuple[BinaryIO, BinaryIO, str]  # (source, sink, name)
OnStep = Callable[[list[Job]], None] | None  # called with the running jobs after each call


def compress(model: Model, data: bytes, *, split: int = 1) -> bytes:
    """data compressed with `model` (a .tvqz file's bytes); split > 1: as up to that
    many rows of one batch (tvq.compression.split: faster, a little larger)."""
    sink = io.BytesIO()
    _raise(next(compress_streams(model, [(io.BytesIO(data), sink, "data")], split=split)))
    return sink.getvalue()


def decompress(model: Model, data: bytes) -> bytes:
    """The original of `compress(model, original)`; FormatError if data is not one, or
    was made with another model or where the model's numbers differ."""
    sink = io.BytesIO()
    _raise(next(decompress_streams(model, [(io.BytesIO(data), sink, "data")])))
    return sink.getvalue()


def _raise(result: Result) -> None:
    if result.error is not None:
        raise result.error


def compress_streams(model: Model, items: Iterable[Item], *, rows: int | None = None,
                     split: int = 1, on_step: OnStep = None) -> Iterator[Result]:  # fmt: skip
    """Compresses each (source, sink, name), up to `rows` at once (default: as many as
    there are, at most MAX_ROWS), → each Result as its file ends (its error there, the
    others going on). Each file's bytes are those of compressing it alone. split > 1:
    each file long enough is split into up to that many rows of one batch, alone."""
    if not 1 <= split <= MAX_SPLIT:
        raise InputError(f"split must be between 1 and {MAX_SPLIT}, got {split}")
    items = list(items)
    symbols = Symbols(require_tokenizer(model))
    settings = settings_header(model)
    header = settings.to_bytes()
    if split > 1:  # split files alone, each as one batch; short ones below as rows
        lengths = [_length(source) for source, _, _ in items]
        rows_of = [rows_for(split, length) for length in lengths]
        for (source, sink, name), n, length in zip(items, rows_of, lengths, strict=True):
            if n > 1:
                run = functools.partial(encode_split, model, symbols, settings, n,
                                        length is not None, source, sink, name)  # fmt: skip
                yield _split_result(name, on_step, run)
        items = [item for item, n in zip(items, rows_of, strict=True) if n == 1]

    def jobs() -> Iterator[Job]:
        for source, sink, name in items:
            try:
                yield Encoding(model, symbols, header, source, sink, name)
            except Exception as e:
                yield Failed(name, e)

    width = rows or min(len(items), MAX_ROWS) or 1
    for job in Rows(model, width, symbols.escape).run(jobs(), on_step):
        yield job.result


def _length(source: BinaryIO) -> int | None:
    """The bytes left in a source, where that is known (a file, a BytesIO)."""
    if isinstance(source, io.BytesIO):
        return len(source.getbuffer()) - source.tell()
    try:
        info = os.fstat(source.fileno())
        return info.st_size - source.tell() if stat.S_ISREG(info.st_mode) else None
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None


class _Running:
    """A split file as on_step sees a running job: its name and progress."""

    def __init__(self, name: str) -> None:
        self.name, self.progress = name, 0


def _split_result(name: str, on_step: OnStep, run: Callable[[Callable[[int], None]], Result]
                  ) -> Result:  # fmt: skip
    """run(report progress) → its Result, or one carrying the error that stopped it."""
    running = _Running(name)

    def report(done: int) -> None:
        running.progress = done
        if on_step is not None:
            on_step([running])

    try:
        return run(report)
    except Exception as e:  # this file's error (corrupt input, a full disk)
        return Result(name, error=e)


def read_header(source: BinaryIO, name: str) -> Header:
    return Header.read(source, name)


def settings_model(model: Model, header: Header) -> Model:
    """The model with the settings the file was compressed with (dtype, aggregate cache)."""
    model = model.with_dtype("bfloat16" if header.bfloat16 else "float32")
    return model.with_agg_cache(header.agg_cache)


def check_header(model: Model, header: Header, name: str, probe_here: bytes) -> None:
    """FormatError unless `model` (with the file's settings) decompresses the file here."""
    tokenizer = require_tokenizer(model)
    if header.model != fingerprint16(model.fingerprint):
        raise FormatError(f"{name} was compressed with another model (fingerprint "
                          f"{header.model.hex()[:12]}…, this one's is "
                          f"{fingerprint16(model.fingerprint).hex()[:12]}…): decompress it "
                          "with that model (--model)")  # fmt: skip
    if header.tokenizer != fingerprint16(tokenizer.fingerprint):
        raise FormatError(f"{name} was compressed with another tokenizer")
    if header.probe != probe_here:
        raise FormatError(f"{name} was compressed where this model computes other numbers "
                          f"({header.platform}; here {platform()}): decompress it with the "
                          "same JAX version on the same kind of device")  # fmt: skip


def decompress_streams(model: Model, items: Iterable[Item], *, rows: int | None = None,
                       on_step: OnStep = None) -> Iterator[Result]:  # fmt: skip
    """Decompresses each (source, sink, name) → Results as compress_streams. Files
    compressed with other settings (dtype, aggregate cache) than the first run in a
    later pass of their own; each file's header is checked before anything is written."""
    groups: dict[tuple[bool, bool], list[tuple[Item, Header]]] = {}
    for item in items:
        source, _, name = item
        try:
            header = read_header(source, name)
        except Exception as e:
            yield Result(name, error=e)
            continue
        groups.setdefault((header.bfloat16, header.agg_cache), []).append((item, header))
    for group in groups.values():
        run = settings_model(model, group[0][1])
        symbols = Symbols(require_tokenizer(run))
        for (source, sink, name), header in [entry for entry in group if entry[1].rows > 1]:
            split = functools.partial(_decode_split, run, header, symbols, source, sink, name)
            yield _split_result(name, on_step, split)
        group = [entry for entry in group if entry[1].rows == 1]
        if not group:
            continue
        here = probe(run)

        def jobs(group=group, run=run, here=here, symbols=symbols) -> Iterator[Job]:
            for (source, sink, name), header in group:
                try:
                    check_header(run, header, name, here)
                    yield Decoding(run, symbols, source, sink, name, len(header.to_bytes()))
                except Exception as e:
                    yield Failed(name, e)

        width = rows or min(len(group), MAX_ROWS) or 1
        for job in Rows(run, width, symbols.escape).run(jobs(), on_step):
            yield job.result


def _decode_split(model: Model, header: Header, symbols: Symbols, source: BinaryIO,
                  sink: BinaryIO, name: str, report: Callable[[int], None]) -> Result:  # fmt: skip
    """A split file (its header read) decompressed, once its header is checked."""
    check_header(model, header, name, header.probe)  # its model and tokenizer
    if header.rows > MAX_SPLIT:
        raise FormatError(f"{name} is split into {header.rows} rows; this tvq runs at most "
                          f"{MAX_SPLIT}")  # fmt: skip
    check_header(model, header, name, probe(model, header.rows))  # the numbers
    return decode_split(model, symbols, header.rows, source, sink, name,
                        len(header.to_bytes()), report)  # fmt: skip
