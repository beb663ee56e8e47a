"""`tvq compress` and `tvq decompress`: lossless compression with the model, any length,
in constant memory (tvq/compression, docs/DESIGN.md section 16).

Like gzip and zstd: FILE → FILE.tvqz and back, the input kept; `-` (stdin) goes to
stdout; `-c` writes to stdout, `-o` to a path; an existing output is replaced only with
--force. An output file appears only when complete: it is written beside its final name
and renamed at the end, so a failure or Ctrl-C leaves nothing behind. Several files
run as rows of one batch; one file's error does not stop the others (exit 1 at the end).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, BinaryIO

import typer

from tvqcli.app import DtypeOption, ModelOption, app, fail, handle_errors, run_settings, stderr

SUFFIX = ".tvqz"

FilesArgument = Annotated[list[str], typer.Argument(help="Files ('-' reads stdin).")]
OutputOption = Annotated[
    Path | None, typer.Option("--output", "-o", help="Write to this file (one input).")
]
StdoutOption = Annotated[
    bool, typer.Option("--stdout", "-c", help="Write to stdout (one input).")
]  # fmt: skip
ForceOption = Annotated[
    bool, typer.Option("--force", "-f", help="Replace outputs that exist.")
]  # fmt: skip
QuietOption = Annotated[
    bool, typer.Option("--quiet", "-q", help="No progress and no summary on stderr.")
]  # fmt: skip
DecompressOption = Annotated[
    bool, typer.Option("--decompress", "-d", help="Decompress (as tvq decompress).")
]  # fmt: skip
NoAggCacheOption = Annotated[
    bool, typer.Option("--no-agg-cache", help="Switch the aggregate cache off (recorded).")
]  # fmt: skip
SplitOption = Annotated[
    int,
    typer.Option("--split", min=1, max=64,
                 help="Code each long file as up to N rows of one batch, frames of ~13 KB "
                      "going to them in turn: several times faster, a little larger (each "
                      "row's context is its own frames). Recorded; 1: one row, full "
                      "context."),
]  # fmt: skip


@app.command()
@handle_errors
def compress(
    files: FilesArgument,
    output: OutputOption = None,
    stdout: StdoutOption = False,
    force: ForceOption = False,
    quiet: QuietOption = False,
    decompress: DecompressOption = False,
    model: ModelOption = None,
    dtype: DtypeOption = None,
    no_agg_cache: NoAggCacheOption = False,
    split: SplitOption = 1,
) -> None:
    """Compress files losslessly with the model: FILE → FILE.tvqz.

    The whole file is the model's context, at a constant cost per token and in
    constant memory; any bytes round-trip (text the tokenizer would not give
    back exactly goes byte by byte, binary parts are stored). The header names
    the model, so decompressing needs the same one (--model); the summary gives
    bits per byte, which `tvq score` predicts within 1%."""
    if decompress:
        _run(files, output, stdout, force, quiet, model, compressing=False)
        return
    _run(files, output, stdout, force, quiet, model, compressing=True, dtype=dtype,
         no_agg_cache=no_agg_cache, split=split)  # fmt: skip


@app.command(name="decompress")
@handle_errors
def decompress_command(
    files: FilesArgument,
    output: OutputOption = None,
    stdout: StdoutOption = False,
    force: ForceOption = False,
    quiet: QuietOption = False,
    model: ModelOption = None,
) -> None:
    """Decompress .tvqz files: FILE.tvqz → FILE (the model must be the one that
    compressed them; a truncated or edited file is refused, never half-written)."""
    _run(files, output, stdout, force, quiet, model, compressing=False)


def _run(files: list[str], output: Path | None, to_stdout: bool, force: bool, quiet: bool,
         model_path: Path | None, *, compressing: bool, dtype=None,
         no_agg_cache: bool = False, split: int = 1) -> None:  # fmt: skip
    if (output is not None or to_stdout) and len(files) > 1:
        raise fail(f"{'-o' if output is not None else '-c'} takes one input, got {len(files)}", 2)
    twice = next((name for name in files if files.count(name) > 1), None)
    if twice is not None:
        raise fail(f"{twice} is given twice", 2)
    targets = [_target(name, output, to_stdout, compressing) for name in files]
    if compressing and None in targets and sys.stdout.isatty():
        raise fail("compressed data is not written to a terminal: redirect stdout, or use "
                   "-o FILE", 2)  # fmt: skip
    import tvq
    from tvq.compression.files import compress_streams, decompress_streams

    loaded = tvq.load(model_path)
    if compressing:
        loaded = run_settings(loaded, dtype=dtype)
        loaded = loaded.with_agg_cache(False) if no_agg_cache else loaded
    failures = 0
    with Outputs(force) as outputs, contextlib.ExitStack() as inputs:
        items = []
        for name, target in zip(files, targets, strict=True):
            try:
                source = sys.stdin.buffer if name == "-" else inputs.enter_context(open(name, "rb"))
                items.append((source, outputs.open(target, name), name))
            except (OSError, FileExistsError) as e:
                failures += 1
                fail(_os_message(e, name))
        progress = Progress(quiet)
        run = (
            functools.partial(compress_streams, split=split) if compressing else decompress_streams
        )
        with progress:
            for result in run(loaded, items, on_step=progress.update):
                if result.error is not None:
                    failures += 1
                    outputs.discard(result.name)
                    message = result.error
                    fail(_os_message(message, result.name) if isinstance(message, OSError)
                         else str(message))  # fmt: skip
                    continue
                outputs.keep(result.name)
                progress.done(result, compressing)
    if failures:
        raise typer.Exit(1)


def _target(name: str, output: Path | None, to_stdout: bool, compressing: bool) -> Path | None:
    """Where an input's output goes: a path, or None for stdout."""
    if output is not None:
        return output
    if to_stdout or name == "-":
        return None
    if compressing:
        return Path(name + SUFFIX)
    if not name.endswith(SUFFIX):
        raise fail(f"{name} does not end in {SUFFIX}: name the output with -o, or use -c", 2)
    return Path(name[: -len(SUFFIX)])


def _os_message(error: OSError, name: str) -> str:
    if isinstance(error, FileExistsError):
        return f"{error.filename} exists: use --force to replace it"
    if isinstance(error, IsADirectoryError):
        return f"{name} is a directory"
    return f"{name}: {error.strerror or error}"


class Outputs:
    """The outputs being written: each file under a temporary name beside its target,
    renamed when its result is complete (`keep`), removed otherwise."""

    def __init__(self, force: bool) -> None:
        self.force = force
        self.open_files: dict[str, tuple[BinaryIO, str, Path | None]] = {}

    def __enter__(self) -> Outputs:
        return self

    def open(self, target: Path | None, name: str) -> BinaryIO:
        if target is None:
            return sys.stdout.buffer
        if target.exists() and not self.force:
            raise FileExistsError(0, "exists", str(target))
        if target.is_dir():
            raise IsADirectoryError(0, "is a directory", str(target))
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.absolute().parent)
        sink = os.fdopen(fd, "wb")
        self.open_files[name] = (sink, tmp, target)
        return sink

    def keep(self, name: str) -> None:
        entry = self.open_files.pop(name, None)
        if entry is None:
            sys.stdout.buffer.flush()
            return
        sink, tmp, target = entry
        sink.close()
        os.chmod(tmp, self.mode(name))
        os.replace(tmp, target)

    @staticmethod
    def mode(name: str) -> int:
        """The input's permissions (as gzip keeps them), or a new file's for stdin."""
        if name != "-":
            with contextlib.suppress(OSError):
                return os.stat(name).st_mode & 0o777
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask

    def discard(self, name: str) -> None:
        entry = self.open_files.pop(name, None)
        if entry is not None:
            entry[0].close()
            Path(entry[1]).unlink(missing_ok=True)

    def __exit__(self, *exc) -> None:
        for name in list(self.open_files):
            self.discard(name)


class Progress:
    """A progress line on a terminal's stderr (bytes done, speed), and a summary line
    per file unless quiet."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.live = not quiet and sys.stderr.isatty()
        self.started, self.finished, self.shown = time.perf_counter(), 0, 0.0
        self.status = None

    def __enter__(self) -> Progress:
        if self.live:
            self.status = stderr.status("starting")
            self.status.__enter__()
        return self

    def update(self, running) -> None:
        now = time.perf_counter()
        if self.status is None or now - self.shown < 0.25:
            return
        self.shown = now
        done = self.finished + sum(job.progress for job in running)
        names = ", ".join(job.name for job in running)
        self.status.update(f"{names}: {_size(done)}, {_size(done / (now - self.started))}/s")

    def done(self, result, compressing: bool) -> None:
        self.finished += result.original
        if self.quiet:
            return
        speed = _size(result.original / result.seconds) + "/s" if result.seconds else ""
        if compressing:
            stderr.print(f"{result.name}: {result.original:,} → {result.compressed:,} bytes, "
                         f"{result.bits_per_byte:.3f} bits per byte, {speed}")  # fmt: skip
        else:
            stderr.print(f"{result.name}: {result.compressed:,} → {result.original:,} bytes, "
                         f"{speed}")  # fmt: skip

    def __exit__(self, *exc) -> None:
        if self.status is not None:
            self.status.__exit__(*exc)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
