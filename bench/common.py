"""Helpers shared by the benchmarks: timing medians and the machine description."""

from __future__ import annotations

import os
import platform
import statistics
import time


def median_time(fn, repeats: int = 5) -> float:
    """Median wall time of fn() over `repeats` runs (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine() -> str:
    import jax

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"jax {jax.__version__} on {jax.default_backend()}")  # fmt: skip
