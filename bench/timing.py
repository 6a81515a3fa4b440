"""Timing helper shared by the benchmark scripts."""
from __future__ import annotations

import time
from typing import Callable


def best_seconds(step: Callable[[], object], warmup: int, iters: int) -> float:
    """Fastest wall time of `iters` calls of step after `warmup` untimed ones (robust on a shared machine)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return min(times)
