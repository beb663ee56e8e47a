"""Compressing and decompressing streams and byte strings (docs/DESIGN.md section 16):
what `tvq compress` and `tvq.compress` call."""

from __future__ import annotations

import io
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
from tvq.compression.symbols import Symbols
from tvq.runtime.context import require_tokenizer
from tvq.runtime.model import Model

Item = tuple[BinaryIO, BinaryIO, str]  # (source, sink, name)
OnStep = Callable[[list[Job]], None] | None  # called with the running jobs after each call


def compress(model: Model, data: bytes) -> bytes:
    """data compressed with `model` (a .tvqz file's bytes)."""
    sink = io.BytesIO()
    _raise(next(compress_streams(model, [(io.BytesIO(data), sink, "data")])))
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
                     on_step: OnStep = None) -> Iterator[Result]:  # fmt: skip
    """Compresses each (source, sink, name), up to `rows` at once (default: as many as
    there are, at most MAX_ROWS), → each Result as its file ends (its error there, the
    others going on). Each file's bytes are those of compressing it alone."""
    items = list(items)
    symbols = Symbols(require_tokenizer(model))
    header = settings_header(model).to_bytes()

    def jobs() -> Iterator[Job]:
        for source, sink, name in items:
            try:
                yield Encoding(model, symbols, header, source, sink, name)
            except Exception as e:
                yield Failed(name, e)

    width = rows or min(len(items), MAX_ROWS) or 1
    for job in Rows(model, width, symbols.escape).run(jobs(), on_step):
        yield job.result


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
        here = probe(run)
        symbols = Symbols(require_tokenizer(run))

        def jobs(group=group, run=run, here=here, symbols=symbols) -> Iterator[Job]:
            for (source, sink, name), header in group:
                try:
                    check_header(run, header, name, here)
                    yield Decoding(run, symbols, source, sink, name, len(header.to_bytes()))
                except Exception as e:
                    yield Failed(name, e)

        width = rows or min(len(group), MAX_ROWS)
        for job in Rows(run, width, symbols.escape).run(jobs(), on_step):
            yield job.result
