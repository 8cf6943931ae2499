"""IR to ONNX, straight from the graph with ``onnx.helper`` (no ``torch.onnx``).

Each op's lowering is registered on its op-table entry (``OPS[op].lowerings["onnx"]``)
by the ``@lowering`` functions below: a function ``(ctx, node, *input_names) -> output_name``.

Default opset: 17.  It is the oldest opset with ``LayerNormalization`` and is
read by every current runtime (onnxruntime, TensorRT, OpenVINO, ONNX.js);
``Gelu`` arrives only in opset 20, so below 20 GELU is lowered exactly as
``x * 0.5 * (1 + erf(x / sqrt(2)))``.  Any opset from 13 to the installed
onnx's newest works.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from repalgebra.ir import Graph, Node, Value
from repalgebra.ops import OPS

DEFAULT_OPSET = 17
MIN_OPSET = 13

_DTYPES = {
    torch.float32: TensorProto.FLOAT,
    torch.float64: TensorProto.DOUBLE,
    torch.float16: TensorProto.FLOAT16,
    torch.bfloat16: TensorProto.BFLOAT16,
    torch.int64: TensorProto.INT64,
}


class LoweringError(ValueError):
    """An op (named, with its module path) has no ONNX lowering."""


@dataclass
class LowerCtx:
    """What a lowering function may use: emit nodes and constants, with unique readable names."""

    opset: int
    dtype: torch.dtype
    dynamic_batch: bool
    nodes: list = field(default_factory=list)
    initializers: list = field(default_factory=list)
    _names: set = field(default_factory=set)
    prefix: str = ""

    def unique(self, base: str) -> str:
        base = re.sub(r"[^A-Za-z0-9_./:-]", "_", base) or "t"
        name, k = base, 1
        while name in self._names:
            k += 1
            name = f"{base}_{k}"
        self._names.add(name)
        return name

    def const(self, suffix: str, tensor: torch.Tensor | np.ndarray, dtype=None) -> str:
        """Add an initializer named after the current node's source; returns its name."""
        if torch.is_tensor(tensor):
            tensor = tensor.detach().to(dtype or self.dtype).cpu()
            array = tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
        else:
            array = tensor
        name = self.unique(f"{self.prefix}.{suffix}" if self.prefix else suffix)
        proto = numpy_helper.from_array(np.array(array, order="C", copy=True), name)  # keeps 0-d arrays 0-d
        if torch.is_tensor(tensor) and tensor.dtype == torch.bfloat16:
            proto = helper.make_tensor(name, TensorProto.BFLOAT16, array.shape, array.flatten().tolist())
        self.initializers.append(proto)
        return name

    def ints(self, suffix: str, values) -> str:
        """An int64 constant (shapes, axes, pads)."""
        return self.const(suffix, np.asarray(list(values), dtype=np.int64))

    def emit(self, op_type: str, inputs: list[str], out: str | None = None, **attrs) -> str:
        """Add an ONNX node; returns its output name."""
        out = out or self.unique(f"{self.prefix}/{op_type}" if self.prefix else op_type)
        name = self.unique(f"{self.prefix}/{op_type}#node" if self.prefix else f"{op_type}#node")
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=name, **attrs))
        return out


Lowering = Callable[..., str]


def lowering(*ops: str):
    """Register an ONNX lowering on the op-table entries of ``ops``."""

    def register(fn: Lowering) -> Lowering:
        for o in ops:
            OPS[o].lowerings["onnx"] = fn
        return fn

    return register


# --------------------------------------------------------------------------- lowerings


@lowering("conv2d")
def _conv(ctx, n, x):
    a, w = n.attrs, n.params["weight"]
    top, bottom, left, right = a["padding"]
    ins = [x, ctx.const("weight", w)] + ([ctx.const("bias", n.params["bias"])] if "bias" in n.params else [])
    return ctx.emit(
        "Conv", ins, kernel_shape=list(w.shape[2:]), strides=list(a["stride"]), pads=[top, left, bottom, right],
        dilations=list(a["dilation"]), group=a["groups"],
    )


@lowering("batch_norm")
def _bn(ctx, n, x):
    p = n.params
    ins = [x] + [ctx.const(k, p[k]) for k in ("weight", "bias", "mean", "var")]
    return ctx.emit("BatchNormalization", ins, epsilon=float(n.attrs["eps"]))


@lowering("identity")
def _identity(ctx, n, x):
    return ctx.emit("Identity", [x])


@lowering("add", "sub", "mul", "matmul")
def _binary(ctx, n, a, b):
    return ctx.emit({"add": "Add", "sub": "Sub", "mul": "Mul", "matmul": "MatMul"}[n.op], [a, b])


@lowering("relu", "sigmoid")
def _unary(ctx, n, x):
    return ctx.emit({"relu": "Relu", "sigmoid": "Sigmoid"}[n.op], [x])


@lowering("gelu")
def _gelu(ctx, n, x):
    if n.attrs["approximate"] != "none":
        raise LoweringError(f"gelu at {n.source or '<graph>'}: only the exact (erf) GELU is lowered")
    if ctx.opset >= 20:
        return ctx.emit("Gelu", [x])
    half = ctx.emit("Mul", [x, ctx.const("half", torch.tensor(0.5))])
    erf = ctx.emit("Erf", [ctx.emit("Mul", [x, ctx.const("inv_sqrt2", torch.tensor(1 / math.sqrt(2)))])])
    return ctx.emit("Mul", [half, ctx.emit("Add", [erf, ctx.const("one", torch.tensor(1.0))])])


@lowering("scale")
def _scale(ctx, n, x):
    rank = len(n.x.shape)
    shape = [1] * rank
    shape[n.attrs["axis"] % rank] = -1
    return ctx.emit("Mul", [x, ctx.const("scale", n.params["scale"].reshape(shape))])


@lowering("pad")
def _pad(ctx, n, x):
    top, bottom, left, right = n.attrs["pads"]
    lead = [0] * (len(n.x.shape) - 2)
    pads = ctx.ints("pads", lead + [top, left] + lead + [bottom, right])
    return ctx.emit("Pad", [x, pads, ctx.const("value", torch.tensor(float(n.attrs["value"])))], mode="constant")


@lowering("avg_pool2d")
def _avg_pool(ctx, n, x):
    a = n.attrs
    pair = lambda v: list(v) if isinstance(v, (tuple, list)) else [v, v]  # noqa: E731
    ph, pw = pair(a["padding"])
    return ctx.emit(
        "AveragePool", [x], kernel_shape=pair(a["kernel"]), strides=pair(a["stride"] or a["kernel"]),
        pads=[ph, pw, ph, pw], count_include_pad=int(a["count_include_pad"]), ceil_mode=int(a["ceil_mode"]),
    )


@lowering("concat")
def _concat(ctx, n, *xs):
    return ctx.emit("Concat", list(xs), axis=n.attrs["axis"])


@lowering("linear")
def _linear(ctx, n, x):
    y = ctx.emit("MatMul", [x, ctx.const("weight", n.params["weight"].t().contiguous())])
    return ctx.emit("Add", [y, ctx.const("bias", n.params["bias"])]) if "bias" in n.params else y


def _target_shape(ctx, n: Node) -> list[int]:
    """The output shape for Reshape; with a dynamic batch, the batch axis is copied (0) or inferred (-1)."""
    shape = list(n.out.shape)
    if ctx.dynamic_batch and shape:
        shape[0] = 0 if shape[0] == n.x.shape[0] else -1
    return shape


@lowering("reshape", "flatten")
def _reshape(ctx, n, x):
    return ctx.emit("Reshape", [x, ctx.ints("shape", _target_shape(ctx, n))])


@lowering("reshape_dyn")
def _reshape_dyn(ctx, n, x, *refs):
    """Sizes read from the reference inputs at run time: Shape -> Gather -> Mul -> Concat -> Reshape."""
    shapes: dict[int, str] = {}
    entries = []
    for entry in n.attrs["shape"]:
        if isinstance(entry, int):
            entries.append(ctx.ints("size", [entry]))
            continue
        size = None
        for f in entry:
            if isinstance(f, int):
                term = ctx.ints("factor", [f])
            else:
                r, axis = f
                if r not in shapes:
                    shapes[r] = ctx.emit("Shape", [refs[r]])
                term = ctx.emit("Gather", [shapes[r], ctx.ints("axis", [axis])], axis=0)
            size = term if size is None else ctx.emit("Mul", [size, term])
        entries.append(size)
    return ctx.emit("Reshape", [x, ctx.emit("Concat", entries, axis=0)])


@lowering("select")
def _select(ctx, n, x):
    index = ctx.const("index", np.asarray(n.attrs["index"], dtype=np.int64))
    return ctx.emit("Gather", [x, index], axis=n.attrs["axis"])


@lowering("permute")
def _permute(ctx, n, x):
    rank = len(n.x.shape)
    return ctx.emit("Transpose", [x], perm=[d % rank for d in n.attrs["dims"]])


@lowering("transpose")
def _transpose(ctx, n, x):
    rank = len(n.x.shape)
    perm = list(range(rank))
    d0, d1 = n.attrs["dim0"] % rank, n.attrs["dim1"] % rank
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return ctx.emit("Transpose", [x], perm=perm)


@lowering("softmax")
def _softmax(ctx, n, x):
    return ctx.emit("Softmax", [x], axis=n.attrs["axis"])


@lowering("mean")
def _mean(ctx, n, x):
    dims = n.attrs["dims"]
    dims = [dims] if isinstance(dims, int) else list(dims)
    keep = int(n.attrs["keepdim"])
    if ctx.opset >= 18:
        return ctx.emit("ReduceMean", [x, ctx.ints("axes", dims)], keepdims=keep)
    return ctx.emit("ReduceMean", [x], axes=dims, keepdims=keep)


@lowering("layer_norm")
def _layer_norm(ctx, n, x):
    if ctx.opset < 17:
        raise LoweringError(f"layer_norm at {n.source or '<graph>'} needs opset >= 17, asked for {ctx.opset}")
    shape = list(n.attrs["normalized_shape"])
    w = n.params.get("weight", torch.ones(shape))
    b = n.params.get("bias", torch.zeros(shape))
    return ctx.emit(
        "LayerNormalization", [x, ctx.const("weight", w), ctx.const("bias", b)], axis=-len(shape), epsilon=float(n.attrs["eps"])
    )


# --------------------------------------------------------------------------- export


def graph_to_onnx(
    graph: Graph,
    *,
    opset: int | None = None,
    dynamic_batch: bool = True,
    graph_name: str = "repalgebra",
    metadata: dict[str, str] | None = None,
) -> onnx.ModelProto:
    """Lower ``graph`` to an ONNX model; parameters keep the graph's dtype.

    Raises :class:`LoweringError` naming the op and module path of the first
    node without a lowering (an opaque module, say).
    """
    opset = DEFAULT_OPSET if opset is None else opset
    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise ValueError(f"opset must be between {MIN_OPSET} and {newest}, got {opset}")
    dtype = graph.inputs[0].dtype or torch.float32
    ctx = LowerCtx(opset, dtype, dynamic_batch)
    names: dict[int, str] = {}

    def io(v: Value, name: str):
        shape: list = list(v.shape)
        if dynamic_batch and shape:
            shape[0] = "batch"
        return helper.make_tensor_value_info(name, _DTYPES[v.dtype or dtype], shape)

    inputs = []
    for v in graph.inputs:
        names[id(v)] = ctx.unique(v.name)
        inputs.append(io(v, names[id(v)]))
    for n in graph.nodes:
        lower = OPS[n.op].lowerings.get("onnx")
        if lower is None:
            what = n.attrs.get("fn") if n.op == "opaque" else None
            kind = f" ({type(what).__name__})" if what is not None else ""
            raise LoweringError(f"no ONNX lowering for op {n.op!r}{kind} at {n.source or '<graph>'}")
        ctx.prefix = n.source or n.out.name
        names[id(n.out)] = lower(ctx, n, *(names[id(i)] for i in n.inputs))
    outputs = []
    for k, v in enumerate(graph.outputs):
        name = "output" if len(graph.outputs) == 1 else f"output{k}"
        ctx.prefix = ""
        names_out = ctx.emit("Identity", [names[id(v)]], out=ctx.unique(name))
        outputs.append(io(v, names_out))
    g = helper.make_graph(ctx.nodes, graph_name, inputs, outputs, ctx.initializers)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], producer_name="repalgebra")
    from repalgebra import __version__

    model.producer_version = __version__
    model.ir_version = min(model.ir_version, 10)  # readable by older onnxruntime releases too
    for k, v in (metadata or {}).items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=k, value=str(v)))
    return model


def export_onnx(
    model_or_graph: "torch.nn.Module | Graph",
    path: str | None,
    input_shape: tuple[int, ...] = (1, 3, 256, 256),
    *,
    opset: int | None = None,
    dynamic_batch: bool = True,
    fuse: bool = True,
    metadata: dict[str, str] | None = None,
) -> onnx.ModelProto:
    """Export a model (or an IR graph) to ONNX, fusing it first by default.

    The module is traced into the IR with an input of ``input_shape`` in the
    model's dtype, rewritten to its fused form (``fuse=True``), lowered op by
    op with the op table's ONNX lowerings, checked with
    ``onnx.checker.check_model(full_check=True)`` and, when ``path`` is given,
    saved there.  The metadata records the producer, version, the rules that
    fired and anything in ``metadata`` (the CLI adds the variant name).
    The model you pass is not modified.
    """
    from repalgebra import __version__
    from repalgebra.rewrite import rewrite

    if isinstance(model_or_graph, Graph):
        graph = model_or_graph
    elif isinstance(model_or_graph, torch.nn.Module):
        from repalgebra.frontend.torch import trace

        dtype = next((p.dtype for p in model_or_graph.parameters() if p.is_floating_point()), torch.float32)
        graph = trace(model_or_graph, (torch.zeros(input_shape, dtype=dtype),))
    else:
        raise TypeError(f"export_onnx takes an nn.Module or a repalgebra Graph, not {type(model_or_graph).__name__}")
    meta = {"producer": "repalgebra", "repalgebra_version": __version__}
    if fuse:
        graph, report = rewrite(graph)
        meta["rules_fired"] = ", ".join(f"{k} x{v}" for k, v in report.rule_counts().items()) or "none"
    meta.update(metadata or {})
    model = graph_to_onnx(graph, opset=opset, dynamic_batch=dynamic_batch, metadata=meta)
    onnx.checker.check_model(model, full_check=True)
    if path is not None:
        onnx.save(model, str(path))
    return model
