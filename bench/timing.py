"""Timing and machine helpers shared by the benchmark scripts."""
from __future__ import annotations

import platform
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


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform's name elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
