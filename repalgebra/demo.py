"""``repalgebra demo``: the main job end to end on FastViT-T8, in well under a minute.

Build the train-time model (random weights, realistic BN statistics), fuse it,
verify the fused model against the train-time one, export it to ONNX, run the
export in onnxruntime, and print a summary table: node counts, errors and
latency before and after.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _median_ms(fn, rounds: int = 5) -> float:
    fn()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def run_demo(name: str = "fastvit_t8", size: int = 256) -> int:
    """Run the demo; returns the exit code (0 when every check passes)."""
    import onnxruntime as ort

    import fastvit_models
    import repalgebra
    from fastvit_models.testing import randomize_model_
    from repalgebra.backend.onnx import export_onnx

    def step(k: int, what: str) -> None:
        print(f"[{k}/5] {what}", file=sys.stderr, flush=True)

    step(1, f"building {name} (train-time, random weights and BN statistics)")
    model = randomize_model_(fastvit_models.create_model(name), torch.Generator().manual_seed(0))
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))

    step(2, "fusing")
    t = time.perf_counter()
    fused = repalgebra.fuse(model, (x,))
    fuse_s = time.perf_counter() - t
    report = fused.fuse_report

    step(3, "verifying fused against train-time (float32, 3 random inputs)")
    check = repalgebra.verify(model, fused, (x,), n=3)

    step(4, "exporting to ONNX and running onnxruntime")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.onnx"
        proto = export_onnx(fused, path, tuple(x.shape), fuse=False, metadata={"model": name})
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: x.numpy()}
        got = session.run(None, feed)[0]
        with torch.no_grad():
            ref = fused(x).numpy()
        onnx_err = float(np.abs(got - ref).max() / np.abs(ref).max())

        step(5, "timing (median of 5, batch 1)")
        with torch.no_grad():
            train_ms = _median_ms(lambda: model(x))
            fused_ms = _median_ms(lambda: fused(x))
        ort_ms = _median_ms(lambda: session.run(None, feed))

    onnx_ops: dict[str, int] = {}
    for n in proto.graph.node:
        onnx_ops[n.op_type] = onnx_ops.get(n.op_type, 0) + 1
    before, after = report.ops_before, report.ops_after
    onnx_ok = onnx_err <= 1e-5
    ok = bool(check) and onnx_ok and after.get("batch_norm", 0) == 0

    rows = [
        ("", "train-time", "fused (torch)", "fused (ONNX)"),
        ("graph nodes", sum(before.values()), sum(after.values()), len(proto.graph.node)),
        ("conv", before.get("conv2d", 0), after.get("conv2d", 0), onnx_ops.get("Conv", 0)),
        ("batch norm", before.get("batch_norm", 0), after.get("batch_norm", 0), onnx_ops.get("BatchNormalization", 0)),
        ("parameters + buffers", f"{report.params_before + report.buffers_before:,}", f"{report.params_after + report.buffers_after:,}", ""),
        ("latency ms", f"{train_ms:.1f}", f"{fused_ms:.1f}", f"{ort_ms:.1f}"),
    ]
    widths = [max(len(str(r[k])) for r in rows) for k in range(4)]
    print(f"\n{name} at 1x3x{size}x{size}, fused in {fuse_s:.2f}s ({len(report.fired)} rewrites)\n")
    for k, r in enumerate(rows):
        print("  " + "  ".join(str(c).rjust(w) if j else str(c).ljust(w) for j, (c, w) in enumerate(zip(r, widths))))
        if k == 0:
            print("  " + "  ".join("-" * w for w in widths))
    print()
    print(check)
    print(f"onnxruntime vs fused torch: max relative error {onnx_err:.1e} (tolerance 1e-05) -> {'pass' if onnx_ok else 'FAIL'}")
    print(f"\ndemo: {'all checks passed' if ok else 'FAILED'}")
    return 0 if ok else 1
