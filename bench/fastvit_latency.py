"""FastViT: train-time vs fused latency, fuse time and fused float32 error, per variant.

    python bench/fastvit_latency.py [--variants fastvit_t8,...] [--rounds 15] [--write docs/benchmarks.md]

Batch 1, 256x256, CPU, float32.  Train-time and fused forwards are timed in
interleaved rounds; the table reports medians.  The error column is the fused
float32 model against the train-time model run in float64, relative to the
largest logit.  ``fuse s`` is the whole ``repalgebra.fuse`` call (best of 2);
``check s`` is the part of it spent checking the fused model against the
original on the example input in float64 (``fuse(..., check=False)`` skips it).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fastvit_models  # noqa: E402
import repalgebra  # noqa: E402
from fastvit_models.testing import randomize_model_  # noqa: E402
from timing import interleaved_medians, machine  # noqa: E402

MARK = "<!-- fastvit_latency -->"


def measure(name: str, rounds: int) -> dict:
    """One row of the table for variant ``name``."""
    model = randomize_model_(fastvit_models.create_model(name), torch.Generator().manual_seed(0))
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    fuse_s = check_s = float("inf")
    for _ in range(2):  # the first call in a process also pays one-time imports
        t = time.perf_counter()
        fused = repalgebra.fuse(model, (x,))
        if time.perf_counter() - t < fuse_s:
            fuse_s, check_s = time.perf_counter() - t, fused.fuse_report.stage_seconds["check"]
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
        err = ((fused(x).double() - ref).abs().max() / ref.abs().max()).item()
        train_s, fused_s = interleaved_medians([lambda: model(x), lambda: fused(x)], rounds=rounds)
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return dict(name=name, train_ms=train_s * 1e3, fused_ms=fused_s * 1e3, fuse_s=fuse_s, check_s=check_s, err=err,
                params_train=params(model), params_fused=params(fused))


def table(rows: list[dict]) -> str:
    lines = [
        "| variant | params train | params fused | train-time ms | fused ms | speed-up | fuse s | check s | fused fp32 rel. error |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['params_train'] / 1e6:.2f}M | {r['params_fused'] / 1e6:.2f}M | {r['train_ms']:.1f} | "
            f"{r['fused_ms']:.1f} | {r['train_ms'] / r['fused_ms']:.2f}x | {r['fuse_s']:.2f} | {r['check_s']:.2f} | {r['err']:.1e} |"
        )
    return "\n".join(lines)


def write_section(path: Path, mark: str, body: str) -> None:
    """Replace the text between two ``mark`` lines in ``path`` (append the section if absent)."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if mark in text:
        head, _, rest = text.partition(mark)
        _, _, tail = rest.partition(mark)
        text = head + mark + "\n" + body + "\n" + mark + tail
    else:
        text = text.rstrip() + "\n\n" + mark + "\n" + body + "\n" + mark + "\n"
    path.write_text(text)
    redraw_chart(path, mark)


def redraw_chart(path: Path, mark: str) -> None:
    """Redraw the section's bar chart (``docs/benchmarks_pictures.py``) next to ``path``, if it has one."""
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "docs" / "benchmarks_pictures.py"
    if importlib.util.find_spec("matplotlib") is None:
        print(f"matplotlib not installed: the chart of {mark} is not redrawn (python {script.name} later)")
        return
    spec = importlib.util.spec_from_file_location("benchmarks_pictures", script)
    charts = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(charts)
    try:
        for written in charts.redraw(path, mark):
            print(f"chart: {written}")
    except ValueError as e:  # a table whose columns the chart does not know: the table stays, say why
        print(f"chart of {mark} not redrawn: {e} (update CHARTS in {script.name})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(fastvit_models.list_models()))
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--write", type=Path, default=None, help="put the table into this Markdown file")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier on shared machines)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.variants.split(","):
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        rows.append(measure(name, args.rounds))
    body = f"### FastViT on CPU (batch 1, 256x256, float32)\n\nMachine: {machine()}\n\n{table(rows)}"
    print(body)
    if args.write:
        write_section(args.write, MARK, body)


if __name__ == "__main__":
    main()
