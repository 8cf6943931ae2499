"""``bench/timing.py``: the round-robin timer gives every function every position, and times each one alone."""

from __future__ import annotations

from pathlib import Path

from script_loader import load_script

timing = load_script("bench_timing", Path(__file__).resolve().parents[1] / "bench" / "timing.py")


def test_rotation_gives_every_position_to_every_function():
    n = 3
    orders = [timing.rotation(n, r) for r in range(n)]
    for order in orders:
        assert sorted(order) == list(range(n))
    for position in range(n):
        assert sorted(order[position] for order in orders) == list(range(n))


def test_interleaved_medians_times_each_function_in_rotated_rounds():
    calls: list[int] = []
    fns = [lambda k=k: calls.append(k) for k in range(3)]
    medians = timing.interleaved_medians(fns, rounds=4, warmup=1)
    assert len(medians) == 3 and all(m >= 0 for m in medians)
    assert calls[:3] == [0, 1, 2]  # warm-up
    assert calls[3:] == [0, 1, 2, 1, 2, 0, 2, 0, 1, 0, 1, 2]
