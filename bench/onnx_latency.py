"""onnxruntime latency: our fused export vs torch.onnx.export of the *train-time* model; and the zoo.

    python bench/onnx_latency.py [--variants fastvit_t8,...] [--rounds 15] [--write docs/benchmarks.md]
    python bench/onnx_latency.py --zoo [--only resnet_basic,swin] [--rounds 15] [--write docs/benchmarks.md]

FastViT: batch 1, 256x256, float32, CPU.  The baseline is what a user gets
without repalgebra: ``torch.onnx.export`` of the train-time model (eval mode)
run with onnxruntime's full graph optimizations, which fold conv+BN but not
parallel branches.  Both sessions are timed in interleaved rounds, with 1
thread and with all threads; the table reports medians and the ratio.

``--zoo``: every model of ``tests/zoo/`` at its input shape, fused, then
exported two ways from the *same fused module*: ``repalgebra.export_onnx`` (our
lowering, with ``torch.onnx.export`` as the fallback for what it does not
cover) and ``torch.onnx.export`` (TorchScript) of the whole fused module.  The
table gives the export path (own lowering, or how many IR nodes went through
the fallback), the batch (dynamic, or fixed where the model was fused with
shapes fixed), ONNX node counts (ours / torch.onnx.export of the fused module /
of the train-time model) and the onnxruntime latency of both exports of the
fused module (torch.onnx.export with a dynamic batch axis where ours has one),
1 thread, medians of interleaved rounds.  Its section sits
between the ``<!-- onnx_zoo -->`` markers.
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

BENCH = Path(__file__).resolve().parent
# tests/ goes *before* bench/: ``import zoo`` must find the package tests/zoo/, not bench/zoo.py.
for _p in (BENCH, BENCH.parent / "tests"):
    if str(_p) in sys.path:
        sys.path.remove(str(_p))
    sys.path.insert(0, str(_p))

from zoo import ZOO  # noqa: E402  (before fastvit_latency, which puts bench/ first again)

import fastvit_models  # noqa: E402
from fastvit_latency import write_section  # noqa: E402
from fastvit_models.testing import randomize_model_  # noqa: E402
from repalgebra.backend.onnx import DEFAULT_OPSET, export_onnx  # noqa: E402
from timing import interleaved_medians, machine  # noqa: E402

MARK = "<!-- onnx_latency -->"
ZOO_MARK = "<!-- onnx_zoo -->"


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


def torch_export(model: torch.nn.Module, x: torch.Tensor, dynamic_batch: bool = False) -> onnx.ModelProto | str:
    """``torch.onnx.export`` (TorchScript) of ``model`` at ``x``; the error's first line when it cannot."""
    from torch.utils import _pytree as pytree

    buf = io.BytesIO()
    with torch.no_grad():
        outs = [f"y{k}" for k in range(len(pytree.tree_leaves(model(x))))]  # named: torch cannot name a GraphModule's
    axes = {name: {0: "batch"} for name in ["x", *outs]} if dynamic_batch else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, (x,), buf, dynamo=False, opset_version=DEFAULT_OPSET, input_names=["x"], output_names=outs, dynamic_axes=axes
            )
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
    return onnx.load_from_string(buf.getvalue())


def measure_zoo(entry, rounds: int) -> dict:
    """One zoo model: fuse, our export and torch.onnx.export of the fused module, nodes and 1-thread latency."""
    import repalgebra

    model = entry.build()
    x = torch.randn(entry.input_shape, generator=torch.Generator().manual_seed(0))
    fused = repalgebra.fuse(model, x)
    ours, report = export_onnx(fused, None, tuple(x.shape), fuse=False, return_report=True)
    theirs = torch_export(fused, x, dynamic_batch=report.dynamic_batch)  # the same batch treatment as ours
    original = torch_export(model, x)
    row = dict(
        name=entry.name, path=report.path, batch="dynamic" if report.dynamic_batch else "fixed",
        nodes_ours=len(ours.graph.node), nodes_fused=_nodes(theirs), nodes_train=_nodes(original), ms_ours=None, ms_fused=None,
    )
    sessions = [session(ours, 1)] + ([session(theirs, 1)] if isinstance(theirs, onnx.ModelProto) else [])
    feeds = [{s.get_inputs()[0].name: x.numpy()} for s in sessions]
    runs = [lambda s=s, f=f: s.run(None, f) for s, f in zip(sessions, feeds)]
    times = interleaved_medians(runs, rounds=rounds)
    row["ms_ours"] = times[0] * 1e3
    if len(times) > 1:
        row["ms_fused"] = times[1] * 1e3
    return row


def _nodes(proto: onnx.ModelProto | str) -> str:
    return str(len(proto.graph.node)) if isinstance(proto, onnx.ModelProto) else "failed"


def zoo_table(rows: list[dict]) -> str:
    lines = [
        "| model | export path | batch | ONNX nodes: ours / torch.onnx fused / torch.onnx train-time | ours ms | torch.onnx fused ms | ratio |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        fused_ms = f"{r['ms_fused']:.2f}" if r["ms_fused"] is not None else "-"
        ratio = f"{r['ms_fused'] / r['ms_ours']:.2f}x" if r["ms_fused"] is not None else "-"
        lines.append(
            f"| {r['name']} | {r['path']} | {r['batch']} | {r['nodes_ours']} / {r['nodes_fused']} / {r['nodes_train']} | "
            f"{r['ms_ours']:.2f} | {fused_ms} | {ratio} |"
        )
    return "\n".join(lines)


def main_zoo(args: argparse.Namespace) -> None:
    only = set(args.only.split(",")) if args.only else None
    torch.set_num_threads(1)
    rows = []
    for entry in ZOO:
        if only and entry.name not in only:
            continue
        print(f"measuring {entry.name} ...", file=sys.stderr, flush=True)
        rows.append(measure_zoo(entry, args.rounds))
    fallback = sum(r["path"] != "own lowering" for r in rows)
    body = (
        f"### onnxruntime: the zoo (`tests/zoo/`), our export vs torch.onnx.export of the same fused module\n\n"
        f"Machine: {machine()}, onnxruntime {ort.__version__}, opset {DEFAULT_OPSET}, 1 thread; each model at its "
        f"zoo input shape, float32; medians of {args.rounds} interleaved rounds.  Export path: `own lowering` when "
        f"every IR node was lowered by repalgebra, else how many went through `torch.onnx.export` (the fallback); "
        f"batch `fixed` where the model was fused with shapes fixed (torch.onnx.export of the fused module gets the same: a "
        f"dynamic batch axis where ours has one).  Ratio: torch.onnx's time over ours (above 1: "
        f"ours is faster).\n\n{zoo_table(rows)}\n\n"
        f"**Totals:** {len(rows)} models exported, {len(rows) - fallback} by our lowering alone, {fallback} with "
        f"fallback nodes."
    )
    print(body)
    if args.write:
        write_section(args.write, ZOO_MARK, body)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(fastvit_models.list_models()))
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--write", type=Path, default=None, help="put the table into this Markdown file")
    p.add_argument("--zoo", action="store_true", help="the zoo section instead of FastViT")
    p.add_argument("--only", default="", help="with --zoo: comma-separated zoo model names")
    args = p.parse_args()
    if args.zoo:
        return main_zoo(args)
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
