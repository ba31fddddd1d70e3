"""Timing shared by the benchmark scripts."""

from __future__ import annotations

import gc
import time


def best_of(fn, repeats: int) -> tuple[float, object]:
    """Fastest of `repeats` calls (the least disturbed by a shared, noisy machine) and its result."""
    times, out = [], None
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out
