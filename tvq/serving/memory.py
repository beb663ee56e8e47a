"""Giving memory back to the system (docs/DESIGN.md section 13, "Limits").

XLA's threads allocate and free large buffers through the C library. glibc keeps what
is freed in per-thread arenas (up to 8 per core), where it fragments and stays resident:
a server that ran 80 mixed requests with its state cache off grew 0.81 GB over idle,
0.68 GB with two arenas (bench/RESULTS.md section 16). So `tvq serve` limits the arenas
before it starts (`limit_arenas`) and returns the free pages of each heap to the system
now and then (`Releaser`). Elsewhere than glibc both do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import time

M_ARENA_MAX = -8  # mallopt's parameter (malloc.h)
ARENAS = 2
RELEASE_EVERY = 5.0  # seconds between two releases at most


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim, libc.mallopt  # noqa: B018  (glibc's: present or AttributeError)
    except (OSError, AttributeError, TypeError):
        return None
    return libc


def limit_arenas(arenas: int = ARENAS) -> bool:
    """At most `arenas` malloc arenas from now on (call before the threads start)."""
    libc = _libc()
    return bool(libc is not None and libc.mallopt(M_ARENA_MAX, arenas))


class Releaser:
    """`maybe()` returns the heaps' free memory to the system, at most every
    RELEASE_EVERY seconds."""

    def __init__(self, every: float = RELEASE_EVERY) -> None:
        self.every, self.last = every, 0.0

    def maybe(self) -> None:
        now = time.monotonic()
        if now - self.last < self.every:
            return
        self.last = now
        libc = _libc()
        if libc is not None:
            libc.malloc_trim(0)


def resident_bytes() -> int:
    """This process's resident memory (Linux's /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
