"""onnxruntime latency: our fused export vs torch.onnx.export of the *train-time* model.

    python bench/onnx_latency.py [--variants fastvit_t8,...] [--rounds 15] [--write docs/benchmarks.md]

Batch 1, 256x256, float32, CPU.  The baseline is what a user gets without
repalgebra: ``torch.onnx.export`` of the train-time model (eval mode) run with
onnxruntime's full graph optimizations, which fold conv+BN but not parallel
branches.  Both sessions are timed in interleaved rounds, with 1 thread and
with all threads; the table reports medians and the ratio.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import warnings
from pathlib import Path

import onnx
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fastvit_models  # noqa: E402
from fastvit_latency import write_section  # noqa: E402
from fastvit_models.testing import randomize_model_  # noqa: E402
from repalgebra.backend.onnx import DEFAULT_OPSET, export_onnx  # noqa: E402
from timing import interleaved_medians, machine  # noqa: E402

MARK = "<!-- onnx_latency -->"


def session(proto: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def measure(name: str, rounds: int, thread_counts: list[int]) -> dict:
    model = randomize_model_(fastvit_models.create_model(name), torch.Generator().manual_seed(0))
    x = torch.randn(1, 3, 256, 256)
    ours = export_onnx(model, None, tuple(x.shape), metadata={"model": name})
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=DEFAULT_OPSET)
    base = onnx.load_from_string(buf.getvalue())
    row = dict(name=name, nodes_ours=len(ours.graph.node), nodes_base=len(base.graph.node))
    for threads in thread_counts:
        a, b = session(ours, threads), session(base, threads)
        fa = {a.get_inputs()[0].name: x.numpy()}
        fb = {b.get_inputs()[0].name: x.numpy()}
        t_ours, t_base = interleaved_medians([lambda: a.run(None, fa), lambda: b.run(None, fb)], rounds=rounds)
        row[f"ours_{threads}"], row[f"base_{threads}"] = t_ours * 1e3, t_base * 1e3
    return row


def table(rows: list[dict], thread_counts: list[int]) -> str:
    head = "| variant | ONNX nodes ours / baseline |"
    rule = "|---|---:|"
    for t in thread_counts:
        head += f" {t} thread{'s' if t > 1 else ''}: ours ms | baseline ms | speed-up |"
        rule += "---:|---:|---:|"
    lines = [head, rule]
    for r in rows:
        line = f"| {r['name']} | {r['nodes_ours']} / {r['nodes_base']} |"
        for t in thread_counts:
            line += f" {r[f'ours_{t}']:.1f} | {r[f'base_{t}']:.1f} | {r[f'base_{t}'] / r[f'ours_{t}']:.2f}x |"
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(fastvit_models.list_models()))
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--write", type=Path, default=None, help="put the table into this Markdown file")
    args = p.parse_args()
    thread_counts = sorted({1, os.cpu_count() or 1})
    rows = []
    for name in args.variants.split(","):
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        rows.append(measure(name, args.rounds, thread_counts))
    body = (
        f"### onnxruntime: fused export vs torch.onnx.export of the train-time model (batch 1, 256x256, float32)\n\n"
        f"Machine: {machine()}, onnxruntime {ort.__version__}, opset {DEFAULT_OPSET}; medians of {args.rounds} interleaved rounds.\n\n"
        f"{table(rows, thread_counts)}"
    )
    print(body)
    if args.write:
        write_section(args.write, MARK, body)


if __name__ == "__main__":
    main()
