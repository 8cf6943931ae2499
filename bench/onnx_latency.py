"""onnxruntime latency: our export vs the exporters it replaces; and the zoo.

    python bench/onnx_latency.py [--variants fastvit_t8,...] [--rounds 21] [--opset 20] [--size 256] [--write docs/benchmarks.md]
    python bench/onnx_latency.py --zoo [--only resnet_basic,swin] [--rounds 15] [--write docs/benchmarks.md]

FastViT: batch 1, 256x256, float32, CPU, onnxruntime with all graph
optimizations.  Each variant is fused once (``repalgebra.fuse``) and exported
three ways: ``repalgebra.export_onnx`` of the fused module (ours),
``torch.onnx.export`` (TorchScript) of *the same fused module* (the strongest
baseline: the same folded weights, torch's lowering of everything else), and
``torch.onnx.export`` of the train-time model (what a user gets without
repalgebra; onnxruntime folds its conv+BN but not the parallel branches).
Both torch exports get the batch treatment ours has (a dynamic batch axis).
The three sessions, and a second session of ours (an A/A control: the timing's
own scatter), are timed round-robin (interleaved rounds, the order rotating, so
machine noise hits all alike) with 1 and 2 threads; the table reports medians
and ours / baseline ratios (below 1: ours is faster).  Targets: ours / same-fused
export <= 0.95 on fastvit_t8 and fastvit_sa12 and <= 1.0 on every variant at
1 thread.  The outputs of the three sessions are compared (float32 tolerance)
before timing.

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
import sys
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
from zoo.exporters import torch_onnx_export as torch_export  # noqa: E402  (one helper with tests/test_zoo_onnx.py)

import fastvit_models  # noqa: E402
from fastvit_latency import write_section  # noqa: E402
from fastvit_models.testing import randomize_model_  # noqa: E402
from repalgebra.backend.onnx import DEFAULT_OPSET, export_onnx  # noqa: E402
from timing import interleaved_medians, machine  # noqa: E402

MARK = "<!-- onnx_latency -->"
ZOO_MARK = "<!-- onnx_zoo -->"


def session(proto: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    """An onnxruntime CPU session with all graph optimizations and ``threads`` intra-op threads."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


# our export, torch.onnx.export of the same fused module, of the train-time model, and a second session of ours:
# ours / ours again is what the timing itself scatters (an A/A control), the floor under every other ratio.
KINDS = ("ours", "fused", "train", "ours_again")


def measure(name: str, rounds: int, thread_counts: list[int], opset: int, size: int) -> dict:
    """One variant: fuse, export three ways, compare outputs, time the four sessions (ours twice: the A/A control) interleaved per thread count."""
    import repalgebra

    model = randomize_model_(fastvit_models.create_model(name), torch.Generator().manual_seed(0))
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    fused = repalgebra.fuse(model, x, check=False)
    ours, report = export_onnx(fused, None, tuple(x.shape), fuse=False, opset=opset, return_report=True, metadata={"model": name})
    protos = {
        "ours": ours,
        "fused": torch_export(fused, x, dynamic_batch=report.dynamic_batch, opset=opset),
        "train": torch_export(model, x, dynamic_batch=report.dynamic_batch, opset=opset),
    }
    for kind, proto in protos.items():
        if not isinstance(proto, onnx.ModelProto):
            raise RuntimeError(f"{name}: torch.onnx.export of the {kind} model failed: {proto}")
    row = {"name": name, **{f"nodes_{k}": len(p.graph.node) for k, p in protos.items()}}
    with torch.no_grad():
        expected = model(x).numpy()
    for threads in thread_counts:
        sessions = {k: session(protos[k.removesuffix("_again")], threads) for k in KINDS}
        feeds = {k: {s.get_inputs()[0].name: x.numpy()} for k, s in sessions.items()}
        for k, s in sessions.items():
            got = s.run(None, feeds[k])[0]
            err = float(abs(got - expected).max() / max(abs(expected).max(), 1e-30))
            if err > 1e-4:
                raise RuntimeError(f"{name}: the {k} export disagrees with the model (max relative error {err:.1e})")
        runs = [lambda s=sessions[k], f=feeds[k]: s.run(None, f) for k in KINDS]
        for k, t in zip(KINDS, interleaved_medians(runs, rounds=rounds)):
            row[f"{k}_{threads}"] = t * 1e3
    return row


def table(rows: list[dict], thread_counts: list[int]) -> str:
    """The FastViT table: node counts, then per thread count the three medians, ours / baseline and the A/A control."""
    head = "| variant | ONNX nodes: ours / torch.onnx fused / train-time |"
    rule = "|---|---:|"
    for t in thread_counts:
        th = f"{t} thread{'s' if t > 1 else ''}"
        head += f" {th}: ours ms | fused ms | train-time ms | ours / fused | ours / train-time | ours / ours (A/A) |"
        rule += "---:|---:|---:|---:|---:|---:|"
    lines = [head, rule]
    for r in rows:
        line = f"| {r['name']} | {r['nodes_ours']} / {r['nodes_fused']} / {r['nodes_train']} |"
        for t in thread_counts:
            o, f, tr, again = r[f"ours_{t}"], r[f"fused_{t}"], r[f"train_{t}"], r[f"ours_again_{t}"]
            line += f" {o:.1f} | {f:.1f} | {tr:.1f} | {o / f:.3f} | {o / tr:.3f} | {o / again:.3f} |"
        lines.append(line)
    return "\n".join(lines)


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
    p.add_argument("--rounds", type=int, default=21)
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    p.add_argument("--size", type=int, default=256, help="input height and width")
    p.add_argument("--threads", default="1,2", help="comma-separated onnxruntime thread counts")
    p.add_argument("--write", type=Path, default=None, help="put the table into this Markdown file")
    p.add_argument("--zoo", action="store_true", help="the zoo section instead of FastViT")
    p.add_argument("--only", default="", help="with --zoo: comma-separated zoo model names")
    args = p.parse_args()
    if args.zoo:
        return main_zoo(args)
    torch.set_num_threads(1)
    thread_counts = [int(t) for t in args.threads.split(",")]
    rows = []
    for name in args.variants.split(","):
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        rows.append(measure(name, args.rounds, thread_counts, args.opset, args.size))
        print(table(rows[-1:], thread_counts).splitlines()[-1], file=sys.stderr, flush=True)
    body = (
        f"### onnxruntime: our export vs torch.onnx.export of the same fused module and of the train-time model "
        f"(batch 1, {args.size}x{args.size}, float32)\n\n"
        f"Machine: {machine()}, onnxruntime {ort.__version__}, opset {args.opset} for all three exports, all graph "
        f"optimizations, dynamic batch axis in all three; medians of {args.rounds} interleaved rounds (the four sessions, ours twice, "
        f"run round-robin, each round starting with the next one).  Ratios below 1: ours is faster.\n\n"
        f"{table(rows, thread_counts)}"
    )
    print(body)
    if args.write:
        write_section(args.write, MARK, body)


if __name__ == "__main__":
    main()
