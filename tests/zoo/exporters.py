"""PyTorch's own ONNX exporter as a reference for ours (``tests/test_zoo_onnx.py`` and ``bench/onnx_latency.py --zoo``).

:func:`torch_onnx_export` exports a module with ``torch.onnx.export`` (TorchScript), at the same opset as
``export_onnx`` and with the same batch treatment (a dynamic batch axis where ours has one), naming the
outputs (torch cannot name a ``GraphModule``'s).  Our export of a fused module and this one of the same
module must agree in onnxruntime (the differential test in ``tests/test_zoo_onnx.py``).
"""

from __future__ import annotations

import io
import warnings

import onnx
import torch
from torch.utils import _pytree as pytree

from repalgebra.backend.onnx import DEFAULT_OPSET

__all__ = ["torch_onnx_export"]


def torch_onnx_export(
    model: torch.nn.Module, x: torch.Tensor, dynamic_batch: bool = False, opset: int = DEFAULT_OPSET
) -> onnx.ModelProto | str:
    """``torch.onnx.export`` (TorchScript) of ``model`` at ``x``; the error's type and first line when it cannot."""
    buf = io.BytesIO()
    with torch.no_grad():
        outs = [f"y{k}" for k in range(len(pytree.tree_leaves(model(x))))]
    axes = {name: {0: "batch"} for name in ["x", *outs]} if dynamic_batch else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, (x,), buf, dynamo=False, opset_version=opset, input_names=["x"], output_names=outs, dynamic_axes=axes
            )
    except Exception as e:  # noqa: BLE001  (any exporter failure is a result to report)
        return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
    return onnx.load_from_string(buf.getvalue())
