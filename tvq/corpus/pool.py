"""The processes that run a preparation's units of work (tvq/corpus/workers.py), and the
progress they report to the parent (docs/DESIGN.md section 11). Workers are started with
`spawn`: the parent may have started JAX threads, which `fork` would copy mid-flight."""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
from collections.abc import Callable

REPORT_BYTES = 1 << 20  # progress is published after this many bytes read


_counter = None  # a multiprocessing.Value in a worker; a plain holder in-process


class _Local:
    """The counter of a preparation run in this process."""

    def __init__(self) -> None:
        self.value = 0

    def get_lock(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


def _init(counter) -> None:
    """A worker's start: Ctrl-C is the parent's to handle (it ends the pool), so the
    workers do not each print a traceback."""
    global _counter
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _counter = counter


class Progress:
    """Bytes read from the files, published to the shared counter every REPORT_BYTES."""

    def __init__(self) -> None:
        self.pending = self.mark = 0

    def start(self) -> None:
        """A new file: its reader counts from 0."""
        self.mark = 0

    def at(self, consumed: int) -> None:
        self.pending += consumed - self.mark
        self.mark = consumed
        if self.pending >= REPORT_BYTES:
            self.flush()

    def flush(self) -> None:
        if _counter is not None and self.pending:
            with _counter.get_lock():
                _counter.value += self.pending
        self.pending = 0


class Pool:
    """Runs function(unit) for every unit (tvq/corpus/workers.py), in order of units: on up
    to `workers` spawned processes (started on first use, kept for the next pass), or in
    this process for one worker or one unit. on_bytes(bytes read so far) is called
    about four times a second."""

    def __init__(self, workers: int) -> None:
        self.workers, self.pool, self.counter = workers, None, None

    def map(self, function: Callable, units: list, on_bytes: Callable[[int], None] | None):
        global _counter
        if self.workers <= 1 or len(units) <= 1:
            _counter = _Local()
            results = []
            try:
                for unit in units:
                    results.append(function(unit))
                    if on_bytes is not None:
                        on_bytes(_counter.value)
            finally:
                _counter = None
            return results
        if self.pool is None:
            context = multiprocessing.get_context("spawn")
            self.counter = context.Value("q", 0)
            self.pool = context.Pool(self.workers, initializer=_init, initargs=(self.counter,))
        self.counter.value = 0
        pending = self.pool.map_async(function, units, chunksize=1)
        while not pending.ready():
            pending.wait(0.25)
            if on_bytes is not None:
                on_bytes(self.counter.value)
        return pending.get()

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None
