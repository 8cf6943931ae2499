"""Shared timing helpers for the benchmarks: interleaved runs, medians, machine description."""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable, Sequence


def interleaved_medians(fns: Sequence[Callable[[], object]], rounds: int = 15, warmup: int = 3) -> list[float]:
    """Median seconds per call of each function, timed round-robin so machine noise hits all alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for k, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


def machine() -> str:
    """One line naming the CPU, core count and library versions."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), Python {platform.python_version()}"
