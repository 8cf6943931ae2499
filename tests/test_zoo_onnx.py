"""``export_onnx`` on every model of the zoo (``tests/zoo/``): it exports whatever ``repalgebra.fuse`` handled.

Each float32 model is fused at its input shape and exported (``fuse=False``: the fused module as it is); what our
lowering does not cover goes through ``torch.onnx.export`` and is spliced in (the report says which nodes).  The
export passes ``onnx.checker`` (full check) and equals the fused torch module in onnxruntime to 1e-5 relative (to the
largest output; float32 against float32, different kernels and summation orders).  A model captured with
``torch.fx``, or with ``torch.export`` and a symbolic batch, is exported with a dynamic batch and run at batch 1 and 3
on that one export; one whose Python fixes the batch too (``ShapeGuard`` without a free batch: Swin's
``int(windows.shape[0] / ...)``) is exported with its batch fixed, run at its own batch, then fused and exported
again at batch 3.  Where ``fuse`` left no BatchNorm, the export has no ``BatchNormalization`` either.

Differential test against PyTorch's own exporter: ``torch.onnx.export`` of the same fused module (same opset, same
batch treatment, ``tests/zoo/exporters.py``) and our export agree in onnxruntime to 1e-5 relative (float32) on the
example batch; a model torch's exporter cannot export is printed, not compared.

Node counts (ours, and ``torch.onnx.export`` of the train-time model) are printed (``pytest -s``), not asserted.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch.utils import _pytree as pytree

from repalgebra import fuse
from repalgebra.backend.onnx import DEFAULT_OPSET, export_onnx
from repalgebra.backend.onnx_fallback import fixed_shape_parts
from zoo import ZOO, count_bn
from zoo.exporters import torch_onnx_export

RTOL = 1e-5


def run_onnx(proto: onnx.ModelProto, x: torch.Tensor) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})


def max_rel_err(got: list[np.ndarray], fused: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        ref = [t.numpy() for t in pytree.tree_leaves(fused(x))]
    assert len(got) == len(ref)
    return max(float(np.abs(g - r).max() / max(np.abs(r).max(), 1e-30)) for g, r in zip(got, ref))


def torch_onnx_nodes(model: torch.nn.Module, x: torch.Tensor) -> int | str:
    """Nodes of ``torch.onnx.export`` (TorchScript) of ``model``; the error's type when it cannot export it."""
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=DEFAULT_OPSET)
    except Exception as e:  # noqa: BLE001
        return f"failed ({type(e).__name__})"
    return len(onnx.load_from_string(buf.getvalue()).graph.node)


def exported(fused: torch.nn.Module, shape: tuple[int, ...]):
    proto, report = export_onnx(fused, None, shape, fuse=False, return_report=True)
    onnx.checker.check_model(proto, full_check=True)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["repalgebra.fallback"] == report.summary()
    return proto, report


def sample(shape: tuple[int, ...], batch: int) -> torch.Tensor:
    return torch.randn(batch, *shape[1:], generator=torch.Generator().manual_seed(batch))


@pytest.mark.parametrize("entry", ZOO, ids=[e.name for e in ZOO])
def test_zoo_model_exports_and_matches(entry):
    model = entry.build()
    shape = entry.input_shape
    fused = fuse(model, sample(shape, shape[0]))
    proto, report = exported(fused, shape)
    if not fixed_shape_parts(fused):  # torch.fx, or torch.export with a symbolic batch: any batch size
        assert report.dynamic_batch, report.notes
    errors = {}
    if report.dynamic_batch:
        for batch in (1, 3):
            x = sample(shape, batch)
            errors[batch] = max_rel_err(run_onnx(proto, x), fused, x)
    else:
        x = sample(shape, shape[0])
        errors[shape[0]] = max_rel_err(run_onnx(proto, x), fused, x)
        x3 = sample(shape, 3)
        fused3 = fuse(model, x3)
        proto3, _ = exported(fused3, x3.shape)
        errors[3] = max_rel_err(run_onnx(proto3, x3), fused3, x3)
    bn_left = count_bn(fused) + fused.fuse_report.ops_after.get("batch_norm", 0)
    bn_nodes = sum(n.op_type == "BatchNormalization" for n in proto.graph.node)
    print(
        f"\n{entry.name}: {report.path}; ONNX nodes {report.onnx_nodes} (own {report.own_onnx_nodes}, fallback "
        f"{report.fallback_onnx_nodes}), torch.onnx.export of the original {torch_onnx_nodes(model, sample(shape, 1))}; "
        f"batch {'dynamic' if report.dynamic_batch else 'fixed'}; errors "
        + ", ".join(f"batch {b}: {e:.1e}" for b, e in errors.items())
        + f"\n{report}"
    )
    assert all(e <= RTOL for e in errors.values()), f"{errors}\n{report}"
    x = sample(shape, shape[0])
    theirs = torch_onnx_export(fused, x, dynamic_batch=report.dynamic_batch)
    if isinstance(theirs, str):
        print(f"{entry.name}: torch.onnx.export of the fused module fails ({theirs}): not compared")
    else:
        ours_out, theirs_out = run_onnx(proto, x), run_onnx(theirs, x)
        assert len(ours_out) == len(theirs_out)
        diff = max(float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)) for a, b in zip(ours_out, theirs_out))
        print(f"{entry.name}: ours vs torch.onnx.export of the fused module in onnxruntime: {diff:.1e}")
        assert diff <= RTOL, f"our export and torch.onnx.export of the fused module differ by {diff:.1e} relative\n{report}"
    if bn_left == 0:
        assert bn_nodes == 0, f"fuse left no BatchNorm, the export has {bn_nodes}\n{report}"
