"""Shared timing helpers for the benchmarks: interleaved runs, medians, machine description."""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable, Sequence


def interleaved_medians(fns: Sequence[Callable[[], object]], rounds: int = 15, warmup: int = 3) -> list[float]:
    """Median seconds per call of each function, timed round-robin so machine noise hits all alike.

    The order rotates every round (round r starts with function r mod n): in a fixed
    order the first function always runs right after the last one, whose working set
    has just evicted its own from the caches, and it measured ~1% slower than an
    identical copy of itself placed second (two ORT sessions of one ONNX file).
    """
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for r in range(rounds):
        for k in rotation(len(fns), r):
            t = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


def rotation(n: int, r: int) -> list[int]:
    """The order of ``n`` functions in round ``r``: over ``n`` rounds each takes every position once."""
    return [(r + k) % n for k in range(n)]


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
