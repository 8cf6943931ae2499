"""What onnxruntime makes of our ONNX export: its optimized graph, against torch.onnx.export of the same fused module.

Our export is only worth having if the runtime fuses it at least as well as
the exporter it replaces.  Each model is fused once, exported by
``repalgebra.export_onnx`` and by ``torch.onnx.export`` (TorchScript) of the
same fused module at the same opset (our default) and batch treatment, and
both are loaded in onnxruntime with all graph optimizations and
``SessionOptions.optimized_model_filepath`` set, so the graph onnxruntime
actually runs can be read back.  On that graph:

* no ``Erf`` survives: every GELU is one fused node (``Gelu``/``FastGelu``/``BiasGelu``, any domain),
  exactly one per GELU of the fused IR;
* every LayerNorm is one ``LayerNormalization`` node (no ``Pow``/``Sqrt``/``ReduceMean`` decomposition);
* the attention's query scale is gone (no ``Mul`` into the scores' MatMul) and each
  softmax(q k^T) v keeps one ``Softmax``;
* no more layout ``Reorder*`` nodes (onnxruntime's NCHWc conv chains broken by
  elementwise ops) and no more compute nodes than torch.onnx.export's.

Structure does not depend on the input size, so the models run at small sizes
(FastViT at 64x64).
"""

from __future__ import annotations

import io
import math
import warnings
from collections import Counter

import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastvit_models
import repalgebra
from fastvit_models.testing import randomize_model_
from repalgebra.backend.onnx import DEFAULT_OPSET, export_onnx

GELUS = ("Gelu", "FastGelu", "BiasGelu")
LAYER_NORMS = ("LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization")
# Nodes that only compute shapes or move elements; the rest is the graph's compute.
PLUMBING = ("Shape", "Gather", "Concat", "Unsqueeze", "Squeeze", "Slice", "Reshape", "Flatten", "Constant", "Identity", "Cast")
MATMULS = ("MatMul", "FusedMatMul", "Gemm")


class ConvNeXtBlock(nn.Module):
    """ConvNeXt's block as its authors write it: dw 7x7, channels-last LayerNorm, MLP with GELU, layer scale."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.gamma * self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


class ViTBlock(nn.Module):
    """A pre-norm transformer block on tokens: LayerNorm, multi-head attention written out, LayerNorm, GELU MLP."""

    def __init__(self, dim: int = 64, heads: int = 2) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q * self.head_dim**-0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


def _fastvit(name: str) -> nn.Module:
    return randomize_model_(fastvit_models.create_model(name), torch.Generator().manual_seed(0))


MODELS = {
    "fastvit_t8": (lambda: _fastvit("fastvit_t8"), (1, 3, 64, 64)),
    "fastvit_sa12": (lambda: _fastvit("fastvit_sa12"), (1, 3, 64, 64)),
    "convnext_block": (lambda: ConvNeXtBlock().eval(), (1, 32, 8, 8)),
    "vit_block": (lambda: ViTBlock().eval(), (1, 16, 64)),
}


def optimized(proto: onnx.ModelProto, path) -> onnx.ModelProto:
    """The graph onnxruntime runs: all graph optimizations, 1 thread, written to ``path`` and read back."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = 1
    options.log_severity_level = 3  # its warning that the file holds hardware-specific nodes
    options.optimized_model_filepath = str(path)
    ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return onnx.load(str(path))


def torch_export(model: nn.Module, x: torch.Tensor, dynamic_batch: bool) -> onnx.ModelProto:
    """``torch.onnx.export`` (TorchScript) of ``model`` at our default opset, with our batch treatment."""
    buf = io.BytesIO()
    axes = {"x": {0: "batch"}, "y": {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=DEFAULT_OPSET, input_names=["x"], output_names=["y"], dynamic_axes=axes)
    return onnx.load_from_string(buf.getvalue())


@pytest.fixture(scope="module", params=list(MODELS))
def graphs(request, tmp_path_factory):
    """(name, fused IR op counts, our optimized graph, torch.onnx.export's optimized graph) for one model."""
    name = request.param
    build, shape = MODELS[name]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    fused = repalgebra.fuse(build(), x, check=False)
    ours, report = export_onnx(fused, None, shape, fuse=False, return_report=True)
    theirs = torch_export(fused, x, report.dynamic_batch)
    tmp = tmp_path_factory.mktemp(name)
    return name, Counter(fused.fuse_report.ops_after), optimized(ours, tmp / "ours.onnx"), optimized(theirs, tmp / "torch.onnx")


def counts(proto: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in proto.graph.node)


def test_every_gelu_is_one_fused_node(graphs):
    name, ir, ours, _ = graphs
    c = counts(ours)
    assert c["Erf"] == 0 and c["Tanh"] == 0, f"{name}: a GELU left unfused: {dict(c)}"
    assert sum(c[g] for g in GELUS) == ir["gelu"], f"{name}: {ir['gelu']} GELUs in the IR, fused nodes {[(g, c[g]) for g in GELUS]}"


def test_every_layer_norm_is_one_node(graphs):
    name, ir, ours, _ = graphs
    c = counts(ours)
    assert sum(c[n] for n in LAYER_NORMS) == ir["layer_norm"], f"{name}: {dict(c)}"
    if ir["layer_norm"]:
        assert c["Pow"] == 0 and c["Sqrt"] == 0, f"{name}: a LayerNorm decomposed: {dict(c)}"


def test_attention_has_no_query_scale(graphs):
    """The query scale folded into qkv: no Mul feeds a MatMul of the scores; one Softmax per attention."""
    name, ir, ours, _ = graphs
    producers = {o: n for n in ours.graph.node for o in n.output}
    for n in ours.graph.node:
        if n.op_type in MATMULS:
            fed = [producers[i].op_type for i in n.input if i in producers]
            assert "Mul" not in fed, f"{name}: {n.name} multiplies by a Mul's output (a query scale left)"
    assert counts(ours)["Softmax"] == ir["softmax"] + ir["attention"]


def test_no_more_layout_reorders_than_torch_onnx_export(graphs):
    name, _, ours, theirs = graphs
    mine = {k: v for k, v in counts(ours).items() if k.startswith("Reorder")}
    torch_s = {k: v for k, v in counts(theirs).items() if k.startswith("Reorder")}
    assert sum(mine.values()) <= sum(torch_s.values()), f"{name}: ours {mine}, torch.onnx.export {torch_s}"


def test_no_more_compute_nodes_than_torch_onnx_export(graphs):
    name, _, ours, theirs = graphs
    compute = lambda p: Counter({k: v for k, v in counts(p).items() if k not in PLUMBING})  # noqa: E731
    mine, torch_s = compute(ours), compute(theirs)
    assert sum(mine.values()) <= sum(torch_s.values()), f"{name}: ours {dict(mine)}, torch.onnx.export {dict(torch_s)}"
    assert math.isclose(sum(mine[g] for g in GELUS), sum(torch_s[g] for g in GELUS))
