"""IR to ONNX, straight from the graph with ``onnx.helper`` (no ``torch.onnx``).

Each op's lowering is registered on its op-table entry (``OPS[op].lowerings["onnx"]``)
by the ``@lowering`` functions below: a function ``(ctx, node, *input_names) -> output_name``.

Default opset: 20, chosen by what onnxruntime runs best: it is the oldest
opset with a native ``Gelu``, so every GELU is one kernel in onnxruntime's
optimized graph.  Below 20 GELU is lowered exactly as
``x * (1 + erf(x / sqrt(2))) * 0.5`` in the node pattern onnxruntime's GELU
fusion matches, but that fusion does not take every GELU (FastViT's last one,
after the squeeze-excite ``Mul``, stays ``Div``/``Erf``/``Add``/``Mul``/``Mul``
at opset 17, in our export and in ``torch.onnx.export``'s alike);
``tests/test_onnx_ort_fusion.py`` reads the optimized graph back and checks.
Opset 17 (the oldest with ``LayerNormalization``) is there for older runtimes:
``opset=17``.  Any opset from 13 to the installed onnx's newest works.
"""

from __future__ import annotations


import inspect
import math
import numbers
import os
import re
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, BinaryIO, Callable, Iterator, Sequence

import numpy as np
import onnx
import torch
from torch.utils import _pytree as pytree
from onnx import TensorProto, helper, numpy_helper

from repalgebra.backend.complex_pairs import complex_as_pairs
from repalgebra.backend.onnx_fallback import (
    ExportedRegion,
    ExportReport,
    FallbackError,
    NodePath,
    Region,
    RegionReport,
    Spliced,
    adaptive_windows,
    batch_input,
    capture_for_export,
    describe,
    check_input,
    export_regions,
    find_regions,
    fixed_shape_parts,
    fold_sources,
    ort_session,
    probing,
    reference_differs,
    session_differs,
    splice,
)
from repalgebra.frontend.builder import is_none_output, is_returned_as_is, size_read
from repalgebra.frontend.calls import In, SymExpr, returned
from repalgebra.frontend.capture import first_line
from repalgebra.frontend.fx_trace import one_at_a_time, rebuilt_from_fields
from repalgebra.frontend.inputs import batch_of_one, batch_plus_one, shapes_and_dtypes
from repalgebra.frontend.module_globals import globals_kept
from repalgebra.ir import Graph, Node, Value
from repalgebra.layout import SIZE_MATCHED
from repalgebra.module_copy import eval_copy
from repalgebra.ops import OPS, op_def

DEFAULT_OPSET = 20
MIN_OPSET = 13
BFLOAT16_OPSET = 22  # where Conv, Gemm, BatchNormalization and the pools take bfloat16

_DTYPES = {
    torch.float32: TensorProto.FLOAT,
    torch.float64: TensorProto.DOUBLE,
    torch.float16: TensorProto.FLOAT16,
    torch.bfloat16: TensorProto.BFLOAT16,
    torch.int64: TensorProto.INT64,
    torch.int32: TensorProto.INT32,
    torch.int16: TensorProto.INT16,
    torch.int8: TensorProto.INT8,
    torch.uint8: TensorProto.UINT8,
    torch.bool: TensorProto.BOOL,
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


@lowering("conv3d")
def _conv3d(ctx, n, x):
    a, w = n.attrs, n.params["weight"]
    ins = [x, ctx.const("weight", w)] + ([ctx.const("bias", n.params["bias"])] if "bias" in n.params else [])
    return ctx.emit(
        "Conv", ins, kernel_shape=list(w.shape[2:]), strides=list(a["stride"]), pads=list(a["padding"]) * 2,
        dilations=list(a["dilation"]), group=a["groups"],
    )


@lowering("conv_transpose2d", "conv_transpose3d")
def _conv_transpose(ctx, n, x):
    """ConvTranspose without ``output_padding``: onnxruntime refuses one of at least the stride, which PyTorch
    allows below the dilation.  The extra end rows and columns are those the end padding would crop, so the end is
    padded ``output_padding`` less; rows past the scattered output (output padding above the padding) hold only the
    bias, so they are a zero Pad before the bias is added."""
    a, w, b = n.attrs, n.params["weight"], n.params.get("bias")
    begin = list(a["padding"])
    end = [p - o for p, o in zip(begin, a["output_padding"])]
    extra = [max(0, -e) for e in end]
    ins = [x, ctx.const("weight", w)] + ([ctx.const("bias", b)] if b is not None and not any(extra) else [])
    y = ctx.emit(
        "ConvTranspose", ins, kernel_shape=list(w.shape[2:]), strides=list(a["stride"]), dilations=list(a["dilation"]),
        pads=begin + [max(0, e) for e in end], group=a["groups"],
    )
    if not any(extra):
        return y
    # pads: every axis's begin (none), then its end: none on the batch and channels, ``extra`` on each spatial axis
    y = ctx.emit("Pad", [y, ctx.ints("pads", [0] * (len(extra) + 4) + extra), _number(ctx, "zero", 0.0)], mode="constant")
    return y if b is None else ctx.emit("Add", [y, ctx.const("bias", b.reshape(-1, *[1] * len(extra)))])


@lowering("batch_norm")
def _bn(ctx, n, x):
    p = n.params
    ins = [x] + [ctx.const(k, p[k]) for k in ("weight", "bias", "mean", "var")]
    return ctx.emit("BatchNormalization", ins, epsilon=float(n.attrs["eps"]))


@lowering("identity")
def _identity(ctx, n, x):
    return ctx.emit("Identity", [x])


@lowering("contiguous")
def _contiguous(ctx, n, x):
    """ONNX tensors have no memory layout: the same values."""
    return ctx.emit("Identity", [x])


@lowering("after_call")
def _after_call(ctx, n, x, result):
    """The tensor as it was: exact where the call kept whole wrote nothing into it.  Its capture saw no write at the
    example (a write there is refused, :func:`~repalgebra.frontend.inplace.hidden_writes`), and a branch of its on
    the input's values is refused (``backend/value_reads.py``): its traced path, the file's, writes nothing."""
    return ctx.emit("Identity", [x])


@lowering("add", "sub", "mul", "matmul")
def _binary(ctx, n, a, b):
    a, b = _promoted(ctx, n, a, b)
    if n.out.dtype == torch.bool and n.op in ("add", "mul"):  # (bool + bool is torch's logical or, bool * bool its
        return ctx.emit({"add": "Or", "mul": "And"}[n.op], [a, b])  # and; ONNX's Add and Mul take no bool: R13b)
    return ctx.emit({"add": "Add", "sub": "Sub", "mul": "Mul", "matmul": "MatMul"}[n.op], [a, b])


def _promoted(ctx, n, *names: str) -> list[str]:
    """``n``'s inputs cast to its output's dtype where they differ: PyTorch promotes a float times an int or a bool
    mask (``y * lengths``, ``y + mask``, ``y.sum(-1) / lengths``) and a sum of a bool mask to int64; ONNX's arithmetic
    takes one type, and no bool."""
    out = n.out.dtype
    return [ctx.emit("Cast", [name], to=_DTYPES[out]) if v.dtype is not None and out is not None and v.dtype != out
            and out in _DTYPES else name for name, v in zip(names, n.inputs)]


@lowering("relu", "sigmoid")
def _unary(ctx, n, x):
    return ctx.emit({"relu": "Relu", "sigmoid": "Sigmoid"}[n.op], [x])


@lowering("gelu")
def _gelu(ctx, n, x):
    """Opset 20's ``Gelu``; below, ``x (1 + erf(x / sqrt 2)) / 2`` or for ``approximate="tanh"``
    ``x (1 + tanh(sqrt(2/pi) x (1 + 0.044715 x^2))) / 2``, in the node patterns onnxruntime fuses into one Gelu/FastGelu."""
    approximate = n.attrs["approximate"]
    if approximate not in ("none", "tanh"):
        raise LoweringError(f"gelu at {n.source or '<graph>'}: unknown approximation {approximate!r}")
    if ctx.opset >= 20:
        return ctx.emit("Gelu", [x], approximate=approximate)
    one = _number(ctx, "one", 1.0)
    if approximate == "tanh":
        inner = ctx.emit("Add", [ctx.emit("Mul", [ctx.emit("Mul", [x, x]), _number(ctx, "c", 0.044715)]), one])
        scaled = ctx.emit("Mul", [ctx.emit("Mul", [x, inner]), _number(ctx, "sqrt_2_over_pi", math.sqrt(2 / math.pi))])
        core = ctx.emit("Tanh", [scaled])
    else:
        core = ctx.emit("Erf", [ctx.emit("Div", [x, _number(ctx, "sqrt2", math.sqrt(2))])])
    return ctx.emit("Mul", [ctx.emit("Mul", [x, ctx.emit("Add", [core, one])]), _number(ctx, "half", 0.5)])


@lowering("scale")
def _scale(ctx, n, x):
    """``x * scale`` broadcast along the axis; one factor for every channel is a 0-d constant (the form
    onnxruntime folds into a following MatMul as its ``alpha``: a query scale the rules could not fold)."""
    s = n.params["scale"]
    if s.numel() > 0 and bool((s == s.reshape(-1)[0]).all()):
        return ctx.emit("Mul", [x, ctx.const("scale", s.reshape(-1)[0].clone())])
    rank = len(n.x.shape)
    shape = [1] * rank
    shape[n.attrs["axis"] % rank] = -1
    return ctx.emit("Mul", [x, ctx.const("scale", s.reshape(shape))])


@lowering("pad")
def _pad(ctx, n, x):
    top, bottom, left, right = n.attrs["pads"]
    lead = [0] * (len(n.x.shape) - 2)
    pads = ctx.ints("pads", lead + [top, left] + lead + [bottom, right])
    return ctx.emit("Pad", [x, pads, _number(ctx, "value", n.attrs["value"])], mode="constant")


@lowering("avg_pool2d", "avg_pool_nd")
def _avg_pool(ctx, n, x):
    """``AveragePool`` over the last 1, 2 or 3 axes; in ceil mode without its ``ceil_mode`` where PyTorch drops a last
    window that would start in the end padding (onnx's shape inference keeps it): then ``count_include_pad=False`` is
    floor mode with as much end padding as PyTorch's windows need (uncounted), and ``True`` is an explicit zero ``Pad``
    (counted), a pool in ceil mode whose partial windows divide by what they cover (PyTorch's divisor), and a
    ``Slice`` to PyTorch's size."""
    a = n.attrs
    nd = len(a["kernel"])
    each = lambda v: list(v) if isinstance(v, (tuple, list)) else [v] * nd  # noqa: E731
    pads, kernel, stride = each(a["padding"]), each(a["kernel"]), each(a["stride"] or a["kernel"])
    size_in, size_out = n.x.shape[-nd:], n.out.shape[-nd:]
    onnx_ceil = [-(-(i + 2 * p - k) // s) + 1 for i, p, k, s in zip(size_in, pads, kernel, stride)]
    if not a["ceil_mode"] or onnx_ceil == list(size_out):
        return ctx.emit(
            "AveragePool", [x], kernel_shape=kernel, strides=stride,
            pads=pads + pads, count_include_pad=int(a["count_include_pad"]), ceil_mode=int(a["ceil_mode"]),
        )
    if not a["count_include_pad"]:
        ends = [max(p, (o - 1) * s + k - i - p) for i, o, p, k, s in zip(size_in, size_out, pads, kernel, stride)]
        return ctx.emit("AveragePool", [x], kernel_shape=kernel, strides=stride, pads=[*pads, *ends], count_include_pad=0)
    rank = len(n.x.shape)
    lead = [0] * (rank - nd)
    padded = ctx.emit("Pad", [x, ctx.ints("pads", lead + pads + lead + pads), _number(ctx, "zero", 0.0)], mode="constant")
    y = ctx.emit("AveragePool", [padded], kernel_shape=kernel, strides=stride, ceil_mode=1)
    starts, ends_, axes = ctx.ints("starts", [0] * nd), ctx.ints("ends", list(size_out)), ctx.ints("axes", list(range(rank - nd, rank)))
    return ctx.emit("Slice", [y, starts, ends_, axes])


@lowering("concat")
def _concat(ctx, n, *xs):
    return ctx.emit("Concat", _promoted(ctx, n, *xs), axis=n.attrs["axis"])


@lowering("linear")
def _linear(ctx, n, x):
    y = ctx.emit("MatMul", [x, ctx.const("weight", n.params["weight"].t().contiguous())])
    return ctx.emit("Add", [y, ctx.const("bias", n.params["bias"])]) if "bias" in n.params else y


def _target_shape(ctx, n: Node) -> list[int]:
    """The output shape for Reshape; with a dynamic batch, the batch axis is copied (0) or inferred (-1).

    A reshape the model wrote with a ``-1`` (``y.reshape(8, -1)``, ``y.reshape(1, -1, C)``) keeps its sizes as
    written: its first axis need not be the batch, and PyTorch puts the batch where the ``-1`` is.
    """
    if n.op == "reshape" and -1 in n.attrs["shape"]:
        return list(n.attrs["shape"])
    shape = list(n.out.shape)
    if ctx.dynamic_batch and shape:
        shape[0] = 0 if shape[0] == n.x.shape[0] else -1
    return shape


@lowering("reshape", "flatten")
def _reshape(ctx, n, x):
    return ctx.emit("Reshape", [x, ctx.ints("shape", _target_shape(ctx, n))])


@lowering("reshape_dyn")
def _reshape_dyn(ctx, n, x, *refs):
    return ctx.emit("Reshape", [x, _dyn_shape(ctx, n.attrs["shape"], refs)])


@lowering("expand_dyn")
def _expand_dyn(ctx, n, x, *refs):
    shape = n.attrs["shape"]
    if not (empty := [k for k, s in enumerate(shape) if s == 0]):
        return ctx.emit("Expand", [x, _dyn_shape(ctx, shape, refs)])
    y = ctx.emit("Expand", [x, _dyn_shape(ctx, tuple(1 if s == 0 else s for s in shape), refs)])
    return _sliced_to_nothing(ctx, y, empty)


def _sliced_to_nothing(ctx, y: str, axes: list[int]) -> str:
    """``y`` with ``axes`` sliced to size 0: an ``Expand`` to a size of 0 is dropped by onnxruntime's graph optimizer,
    which the checks do not run (a Concat after it gained the row it expands; found by a probe)."""
    zeros = ctx.ints("zeros", [0] * len(axes))
    return ctx.emit("Slice", [y, zeros, zeros, ctx.ints("axes", axes)])


def _dyn_shape(ctx, entries: tuple, refs: tuple) -> str:
    """Sizes read from the reference inputs at run time: Shape -> Gather (-> Div) -> Mul -> Concat."""
    shapes: dict[int, str] = {}
    sizes = []
    for entry in entries:
        if isinstance(entry, int):
            sizes.append(ctx.ints("size", [entry]))
            continue
        size = None
        for f in entry:
            if isinstance(f, int):
                term = ctx.ints("factor", [f])
            else:
                r, axis, *divisor = f
                if r not in shapes:
                    shapes[r] = ctx.emit("Shape", [refs[r]])
                term = ctx.emit("Gather", [shapes[r], ctx.ints("axis", [axis])], axis=0)
                if divisor:  # an int64 Div truncates, which is the floor of a size (never negative)
                    term = ctx.emit("Div", [term, ctx.ints("divisor", [divisor[0]])])
            size = term if size is None else ctx.emit("Mul", [size, term])
        sizes.append(size)
    return ctx.emit("Concat", sizes, axis=0)


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


@lowering("log_softmax")
def _log_softmax(ctx, n, x):
    return ctx.emit("LogSoftmax", [x], axis=n.attrs["axis"])


@lowering("glu")
def _glu(ctx, n, x):
    """The first half along the axis times the sigmoid of the second: two ``Slice`` s, ``Sigmoid``, ``Mul``."""
    axis = n.attrs["axis"] % len(n.x.shape)
    half = _static_size(ctx, n, axis) // 2
    return ctx.emit("Mul", [_slice_of(ctx, x, axis, 0, half), ctx.emit("Sigmoid", [_slice_of(ctx, x, axis, half, None)])])


def _reduce(ctx, op_type: str, x, n):
    """``op_type`` over ``n``'s ``dims`` (see :func:`_reduce_over`)."""
    dims = n.attrs["dims"]
    return _reduce_over(ctx, op_type, x, [dims] if isinstance(dims, int) else list(dims), int(n.attrs["keepdim"]))


def _reduce_over(ctx, op_type: str, x, dims: list[int], keep: int):
    """``op_type`` over ``dims``: the axes an input from opset 18 (``ReduceSum`` from 13), an attribute before."""
    if ctx.opset >= 18 or op_type == "ReduceSum":
        return ctx.emit(op_type, [x, ctx.ints("axes", dims)], keepdims=keep)
    return ctx.emit(op_type, [x], axes=dims, keepdims=keep)


@lowering("mean")
def _mean(ctx, n, x):
    return _reduce(ctx, "ReduceMean", x, n)


@lowering("amax")
def _amax(ctx, n, x):
    return _reduce(ctx, "ReduceMax", x, n)


@lowering("norm")
def _norm(ctx, n, x):
    """``ReduceL2``, ``ReduceL1``, ``ReduceMax`` of ``Abs`` (infinity), else ``(ReduceSum |x|^p)^(1/p)``."""
    p = n.attrs["p"]
    if p in (1.0, 2.0):
        return _reduce(ctx, "ReduceL1" if p == 1.0 else "ReduceL2", x, n)
    magnitude = ctx.emit("Abs", [x])
    if p == float("inf"):
        return _reduce(ctx, "ReduceMax", magnitude, n)
    powered = ctx.emit("Pow", [magnitude, _number(ctx, "p", p)])
    return ctx.emit("Pow", [_reduce(ctx, "ReduceSum", powered, n), _number(ctx, "inverse_p", 1.0 / p)])


@lowering("cast")
def _cast(ctx, n, x):
    if n.attrs["dtype"] not in _DTYPES:
        raise LoweringError(f"cast at {_where(n)}: no ONNX type for {n.attrs['dtype']}")
    return ctx.emit("Cast", [x], to=_DTYPES[n.attrs["dtype"]])


@lowering("abs")
def _abs(ctx, n, x):
    return ctx.emit("Abs", [x])


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


@lowering("rms_norm")
def _rms_norm(ctx, n, x):
    """``RMSNormalization`` from opset 23; before it, ``x / Sqrt(ReduceMean(x * x) + eps) * weight``."""
    shape = list(n.attrs["normalized_shape"])
    eps = n.attrs["eps"] if n.attrs["eps"] is not None else torch.finfo(n.out.dtype or ctx.dtype).eps  # the file's dtype
    axes, eps = list(range(-len(shape), 0)), float(eps)
    w = n.params.get("weight")
    if ctx.opset >= 23:
        return ctx.emit("RMSNormalization", [x, ctx.const("weight", torch.ones(shape) if w is None else w)], axis=-len(shape), epsilon=eps)
    square = ctx.emit("Mul", [x, x])
    mean = _reduce_over(ctx, "ReduceMean", square, axes, 1)
    y = ctx.emit("Div", [x, ctx.emit("Sqrt", [ctx.emit("Add", [mean, _number(ctx, "eps", eps)])])])
    return y if w is None else ctx.emit("Mul", [y, ctx.const("weight", w)])


# --------------------------------------------------------------------------- the common vision vocabulary

_INT64_MAX = 2**63 - 1  # Slice's "to the end"


def _where(n: Node) -> str:
    return n.source or "<graph>"


def _static_size(ctx, n: Node, axis: int, value: Value | None = None) -> int:
    """``value``'s (default: the input's) size along ``axis``, refused where it follows a dynamic batch."""
    shape = (value or n.x).shape
    axis %= len(shape)
    if axis == 0 and ctx.dynamic_batch:
        raise LoweringError(f"{n.op} at {_where(n)}: works along the batch axis, which is dynamic (export with dynamic_batch=False)")
    return shape[axis]


def _number(ctx, suffix: str, value: float) -> str:
    """A 0-d constant of the graph's dtype (made in float64: a float64 file's 1/3 is not float32's)."""
    return ctx.const(suffix, torch.tensor(float(value), dtype=torch.float64))


@lowering("silu")
def _silu(ctx, n, x):
    return ctx.emit("Mul", [x, ctx.emit("Sigmoid", [x])])


@lowering("hardswish")
def _hardswish(ctx, n, x):
    if n.out.dtype == torch.float64:  # (a float attribute is a float32 number: 1/6 to 8 digits)
        return ctx.emit("Mul", [x, _relu6_over_6(ctx, x)])
    if ctx.opset >= 14:
        return ctx.emit("HardSwish", [x])
    return ctx.emit("Mul", [x, ctx.emit("HardSigmoid", [x], alpha=1 / 6, beta=0.5)])


@lowering("hardsigmoid")
def _hardsigmoid(ctx, n, x):
    if n.out.dtype == torch.float64:
        return _relu6_over_6(ctx, x)
    return ctx.emit("HardSigmoid", [x], alpha=1 / 6, beta=0.5)


def _relu6_over_6(ctx, x: str) -> str:
    """``relu6(x + 3) / 6``, as PyTorch computes a hard sigmoid, with float64 constants: ``HardSigmoid``'s alpha is a
    float attribute, a float32 number, and a float64 file computed it to 1e-8 (ONNX float attributes are float32)."""
    lifted = ctx.emit("Add", [x, _number(ctx, "three", 3.0)])
    return ctx.emit("Div", [ctx.emit("Clip", [lifted, _number(ctx, "zero", 0.0), _number(ctx, "six", 6.0)]), _number(ctx, "six", 6.0)])


@lowering("clamp")
def _clamp(ctx, n, x):
    """``Clip`` with its bounds in the output's dtype (a count of a bool mask clamped to 1 is int64; Clip takes one
    type for all three), the input cast to it where PyTorch promotes (an int tensor clamped to a float bound).
    With one bound, ``Max`` or ``Min``: onnxruntime's Clip takes a missing bound for the dtype's largest number,
    so ``+inf`` clamped from below only came out as 3.4e38."""
    (x,), dtype = _promoted(ctx, n, x), n.out.dtype or ctx.dtype
    lo, hi = n.attrs["min"], n.attrs["max"]
    bound = lambda suffix, v: ctx.const(suffix, torch.tensor(v, dtype=torch.float64 if isinstance(v, float) else None), dtype=dtype)  # noqa: E731
    if lo is None or hi is None:
        return ctx.emit("Max", [x, bound("min", lo)]) if hi is None else ctx.emit("Min", [x, bound("max", hi)])
    return ctx.emit("Clip", [x, bound("min", lo), bound("max", hi)])


@lowering("leaky_relu")
def _leaky_relu(ctx, n, x):
    """``LeakyRelu``; in float64 ``x < 0 ? x * slope : x`` with a float64 slope (its alpha attribute is float32)."""
    slope = float(n.attrs["negative_slope"])
    if n.out.dtype == torch.float64:
        negative = ctx.emit("Less", [x, _number(ctx, "zero", 0.0)])
        return ctx.emit("Where", [negative, ctx.emit("Mul", [x, _number(ctx, "slope", slope)]), x])
    return ctx.emit("LeakyRelu", [x], alpha=slope)


@lowering("softplus")
def _softplus(ctx, n, x):
    """``Softplus(beta x) / beta``, and ``x`` where ``beta x > threshold``, as PyTorch computes it."""
    beta, threshold = n.attrs["beta"], n.attrs["threshold"]
    bx = x if beta == 1 else ctx.emit("Mul", [x, _number(ctx, "beta", beta)])
    soft = ctx.emit("Softplus", [bx])
    if beta != 1:
        soft = ctx.emit("Div", [soft, _number(ctx, "beta", beta)])
    return ctx.emit("Where", [ctx.emit("Greater", [bx, _number(ctx, "threshold", threshold)]), x, soft])


@lowering("elu")
def _elu(ctx, n, x):
    """``Elu`` (``Selu`` with a scale) in float32 and float16; otherwise, or with an input scale (CELU), written
    out: ``x > 0 ? scale x : scale alpha (exp(input_scale x) - 1)`` with constants of the graph's dtype (an ONNX
    float attribute is float32)."""
    a = n.attrs
    if n.out.dtype in (torch.float32, torch.float16) and a["input_scale"] == 1:
        if a["scale"] == 1:
            return ctx.emit("Elu", [x], alpha=float(a["alpha"]))
        return ctx.emit("Selu", [x], alpha=float(a["alpha"]), gamma=float(a["scale"]))
    inner = x if a["input_scale"] == 1 else ctx.emit("Mul", [x, _number(ctx, "input_scale", a["input_scale"])])
    negative = ctx.emit("Mul", [ctx.emit("Sub", [ctx.emit("Exp", [inner]), _number(ctx, "one", 1.0)]), _number(ctx, "alpha", a["alpha"])])
    y = ctx.emit("Where", [ctx.emit("Greater", [x, _number(ctx, "zero", 0.0)]), x, negative])
    return y if a["scale"] == 1 else ctx.emit("Mul", [y, _number(ctx, "scale", a["scale"])])


@lowering("threshold")
def _threshold(ctx, n, x):
    """``value`` where ``x <= threshold``, else ``x``: written so, not as ``x > threshold``, a NaN stays NaN, as in
    PyTorch (torch.onnx.export has no export of it)."""
    at_most = ctx.emit("LessOrEqual", [x, _number(ctx, "threshold", n.attrs["threshold"])])
    return ctx.emit("Where", [at_most, _number(ctx, "value", n.attrs["value"]), x])


@lowering("log_sigmoid")
def _log_sigmoid(ctx, n, x):
    """``-Softplus(-x)``, not ``Log(Sigmoid(x))``: that is ``-inf`` wherever the sigmoid rounds to 0 (x < -88 in float32)."""
    return ctx.emit("Neg", [ctx.emit("Softplus", [ctx.emit("Neg", [x])])])


@lowering("prelu")
def _prelu(ctx, n, x):
    w = n.params["weight"]
    rank = len(n.x.shape)
    slope = w.reshape(1) if w.numel() == 1 else w.reshape(-1, *([1] * (rank - 2)))  # broadcast along axis 1
    return ctx.emit("PRelu", [x, ctx.const("slope", slope)])


@lowering("tanh", "sqrt", "exp", "log")
def _elementwise(ctx, n, x):
    return ctx.emit({"tanh": "Tanh", "sqrt": "Sqrt", "exp": "Exp", "log": "Log"}[n.op], [x])


@lowering("rsqrt")
def _rsqrt(ctx, n, x):
    return ctx.emit("Reciprocal", [ctx.emit("Sqrt", [x])])


@lowering("pow")
def _pow(ctx, n, x):
    return ctx.emit("Pow", [x, _number(ctx, "exponent", n.attrs["exponent"])])


@lowering("div", "broadcast_add", "broadcast_sub")
def _broadcasting(ctx, n, a, b):
    a, b = _promoted(ctx, n, a, b)
    return ctx.emit({"div": "Div", "broadcast_add": "Add", "broadcast_sub": "Sub"}[n.op], [a, b])


@lowering("add_const")
def _add_const(ctx, n, x):
    c = ctx.const("const", n.params["const"])
    return ctx.emit("Add", [x, c]) if n.attrs["sign"] == 1 else ctx.emit("Sub", [c, x])


@lowering("sum")
def _sum(ctx, n, x):
    return _reduce(ctx, "ReduceSum", *_promoted(ctx, n, x), n)


@lowering("max_pool2d")
def _max_pool(ctx, n, x):
    """``MaxPool`` in floor mode; ceil mode is more padding at the end, as many rows as PyTorch's ceil mode adds windows.

    (PyTorch's ceil mode drops a last window that would start in the right padding; ONNX's does not,
    so the output size is set by the end padding, which a max ignores.)  onnxruntime takes MaxPool pads
    below the kernel size only; a dilated kernel in ceil mode can need more at the end: then all the
    padding is an explicit ``Pad`` of -inf, which a max ignores as it ignores MaxPool's own pads.
    A window whose taps all fall in the padding is refused (-inf in PyTorch; onnxruntime gives another value).
    """
    a = n.attrs
    begins, ends = list(a["padding"]), []
    for size_in, size_out, k, s, d, p in zip(n.x.shape[-2:], n.out.shape[-2:], a["kernel"], a["stride"], a["dilation"], begins):
        # A window whose taps all fall in the padding is -inf in PyTorch; onnxruntime does not give -inf there.
        if any(all(not 0 <= i * s - p + j * d < size_in for j in range(k)) for i in range(size_out)):
            raise LoweringError(f"max_pool2d at {_where(n)}: a window lies entirely in the padding (-inf in PyTorch, not in ONNX)")
        ends.append(max(p, (size_out - 1) * s + d * (k - 1) + 1 - size_in - p))
    if any(e >= k for e, k in zip(ends, a["kernel"])):
        lead = [0] * (len(n.x.shape) - 2)
        x = ctx.emit("Pad", [x, ctx.ints("pads", lead + begins + lead + ends), _number(ctx, "lowest", float("-inf"))], mode="constant")
        begins = ends = [0, 0]
    return ctx.emit(
        "MaxPool", [x], kernel_shape=list(a["kernel"]), strides=list(a["stride"]), pads=begins + ends, dilations=list(a["dilation"])
    )


@lowering("adaptive_avg_pool2d", "adaptive_max_pool2d")
def _adaptive_pool(ctx, n, x):
    """Of a batch of maps, a global pool, or a pool whose window is the ratio of the sizes where the output size
    divides the input's; else (or of one unbatched map), with PyTorch's windows (:func:`adaptive_windows`), one
    ``Slice`` and ``ReduceMean`` or ``ReduceMax`` per window of each axis in turn: the mean (max) over a rectangle
    is the mean (max) over its rows of the mean (max) over its columns.  (Not a matrix product: ``0 * inf`` would
    spread an Inf or a NaN of one window into the others.)"""
    size_in = n.x.shape[-2:]
    size_out = [i if o is None else o for i, o in zip(size_in, n.attrs["output_size"])]
    avg = n.op == "adaptive_avg_pool2d"
    rank = len(n.x.shape)
    if rank == 4 and size_out == [1, 1]:  # (ONNX's pools take (N, C, H, W); an unbatched (C, H, W) map goes below)
        return ctx.emit("GlobalAveragePool" if avg else "GlobalMaxPool", [x])
    if rank == 4 and not any(i % o for i, o in zip(size_in, size_out)):
        kernel = [i // o for i, o in zip(size_in, size_out)]
        return ctx.emit("AveragePool" if avg else "MaxPool", [x], kernel_shape=kernel, strides=kernel)
    for axis, (i, o) in zip((rank - 2, rank - 1), zip(size_in, size_out)):
        if i != o:
            x = _window_reduce(ctx, "ReduceMean" if avg else "ReduceMax", x, axis, i, o)
    return x


def _window_reduce(ctx, op_type: str, x: str, axis: int, size_in: int, size_out: int) -> str:
    """``op_type`` over each of PyTorch's adaptive windows along ``axis``: a Slice and a reduction per window, concatenated."""
    parts = []
    for start, end in adaptive_windows(size_in, size_out):
        window = ctx.emit("Slice", [x, ctx.ints("start", [start]), ctx.ints("end", [end]), ctx.ints("axis", [axis])])
        parts.append(_reduce_over(ctx, op_type, window, [axis], 1))
    return ctx.emit("Concat", parts, axis=axis)


@lowering("group_norm")
def _group_norm(ctx, n, x):
    """Reshape to ``(N, G, -1)``, InstanceNormalization (one mean and variance per group), reshape back, per-channel affine."""
    shape = n.x.shape
    groups = n.attrs["num_groups"]
    grouped = ctx.emit("Reshape", [x, ctx.ints("grouped", [0, groups, -1])])
    ones, zeros = torch.ones(groups), torch.zeros(groups)
    normed = ctx.emit("InstanceNormalization", [grouped, ctx.const("ones", ones), ctx.const("zeros", zeros)], epsilon=float(n.attrs["eps"]))
    y = ctx.emit("Reshape", [normed, ctx.emit("Shape", [x])])
    per_channel = [-1] + [1] * (len(shape) - 2)
    if "weight" in n.params:
        y = ctx.emit("Mul", [y, ctx.const("weight", n.params["weight"].reshape(per_channel))])
    if "bias" in n.params:
        y = ctx.emit("Add", [y, ctx.const("bias", n.params["bias"].reshape(per_channel))])
    return y


# PyTorch's source coordinates: nearest floor(dst / scale), nearest-exact floor((dst + 0.5) / scale),
# bilinear (dst + 0.5) / scale - 0.5 (align_corners=False) or dst * (in - 1) / (out - 1) (True).
_RESIZE = {  # nearest modes: _nearest
    ("bilinear", False): dict(mode="linear", coordinate_transformation_mode="half_pixel"),
    ("bilinear", None): dict(mode="linear", coordinate_transformation_mode="half_pixel"),
    ("bilinear", True): dict(mode="linear", coordinate_transformation_mode="align_corners"),
}


@lowering("interpolate")
def _interpolate(ctx, n, x, *like):
    a = n.attrs
    if a["mode"] in ("nearest", "nearest-exact"):
        return _nearest(ctx, n, x)
    how = _RESIZE.get((a["mode"], a["align_corners"]))
    if how is None:
        raise LoweringError(f"interpolate at {_where(n)}: mode {a['mode']!r} with align_corners={a['align_corners']} is not lowered")
    if a["scale"] is not None:
        scales = [_scale_for(f, size, out) for f, size, out in zip(a["scale"], n.inputs[0].shape[2:], n.out.shape[2:])]
        return ctx.emit("Resize", [x, "", ctx.const("scales", np.asarray([1.0, 1.0, *scales], dtype=np.float32))], **how)
    lead = ctx.emit("Slice", [ctx.emit("Shape", [x]), ctx.ints("start", [0]), ctx.ints("end", [2])])
    if like:
        hw = ctx.emit("Slice", [ctx.emit("Shape", [like[0]]), ctx.ints("start", [-2]), ctx.ints("end", [_INT64_MAX])])
    else:
        hw = ctx.ints("size", list(a["size"]))
    return ctx.emit("Resize", [x, "", "", ctx.emit("Concat", [lead, hw], axis=0)], **how)


def _scale_for(factor: float, size: int, out: int) -> np.float32:
    """``factor`` in float32, moved by as few ulps as it takes for the output size ``floor(size * scale)`` to be
    torch's (``floor(size * factor)`` with ``factor`` a double): 10 x 0.7 is 7 there, and 6.9999999 with 0.7 rounded
    to float32 (onnx's shape inference multiplies in double, onnxruntime in float32: both must give it)."""
    scale = np.float32(factor)
    for _ in range(64):
        sizes = (int(np.floor(np.float32(size) * scale)), int(np.floor(size * float(scale))))
        if sizes == (out, out):
            break
        scale = np.nextafter(scale, np.float32(np.inf if min(sizes) < out else -np.inf))
    return scale


def _nearest(ctx, n, x):
    """Nearest (and nearest-exact) interpolation: a ``Resize`` where it provably picks torch's pixels, else one
    ``Gather`` of them.

    ``Resize`` in nearest mode picks its source pixel by ``dst / scale``; torch by ``floor(dst * (in / out))`` in
    float32: at 9 of 30 -> 70 rows they round to different pixels (29 and 30).  The spatial sizes of a file are fixed,
    so the picks are computed here by torch itself, on the flat index of every pixel.  Where on every axis they are
    the exact picks and ``Resize`` computes them without a rounding that could decide one (:func:`_resize_picks`),
    the file resizes: onnxruntime runs a ``Resize`` 5 to 40 times faster than the ``Gather`` (a 2x upsampling of
    64 maps of 28x28: 15 us against 560), by whole factors as constant ``scales`` (exact: ``size * k``), else to
    the output's sizes.  Else it gathers them."""
    spatial, sizes = n.inputs[0].shape[2:], n.out.shape[2:]
    dtype, like = torch.float64 if ctx.dtype == torch.float64 else torch.float32, [torch.empty(v.shape) for v in n.inputs[1:]]
    picks, resizes = torch.zeros((), dtype=torch.int64), (n.out.dtype or ctx.dtype) in (torch.float32, torch.float16)
    for axis, size in enumerate(spatial):  # each axis's coordinate on its own map: exact in float32 (a flat index is not above 2**24)
        along = [1] * len(spatial)
        along[axis] = size
        coords = torch.arange(size, dtype=dtype).reshape(1, 1, *along).expand(1, 1, *spatial)
        on_axis = OPS[n.op].run(coords, *like, **n.attrs).to(torch.int64)
        picks = picks * size + on_axis
        line = on_axis.reshape(sizes).movedim(axis, 0).reshape(sizes[axis], -1)[:, 0] if on_axis.numel() else None
        resizes = resizes and line is not None and _resize_picks(line, size, n.attrs["mode"] == "nearest-exact")
    if resizes:  # (onnxruntime has no float64 or integer Resize: those gather)
        exact = n.attrs["mode"] == "nearest-exact"
        how = dict(mode="nearest", coordinate_transformation_mode="half_pixel" if exact else "asymmetric",
                   nearest_mode="round_prefer_ceil" if exact else "floor")
        if all(out % size == 0 for size, out in zip(spatial, sizes)):  # (whole factors: constant scales, which
            # onnxruntime's optimizer turns into its blocked-layout upsampling; a YOLOv8 neck ran 5% slower without)
            factors = np.asarray([1.0, 1.0, *(out // size for size, out in zip(spatial, sizes))], dtype=np.float32)
            return ctx.emit("Resize", [x, "", ctx.const("scales", factors)], **how)
        lead = ctx.emit("Slice", [ctx.emit("Shape", [x]), ctx.ints("start", [0]), ctx.ints("end", [2])])
        return ctx.emit("Resize", [x, "", "", ctx.emit("Concat", [lead, ctx.ints("size", list(sizes))], axis=0)], **how)
    return ctx.emit("Reshape", [_picked(ctx, x, picks), ctx.ints("shape", [0, 0, *sizes])])


def _resize_picks(line: torch.Tensor, size: int, half: bool) -> bool:
    """Whether ``Resize`` (nearest; ``asymmetric`` and ``floor``, or with ``half``, torch's nearest-exact,
    ``half_pixel`` and ``round_prefer_ceil``) from ``size`` to ``len(line)`` picks ``line`` in any runtime that
    computes ONNX's coordinate ``dst / scale`` (``(dst + 0.5) / scale - 0.5``) in float32 or wider, ``scale`` the
    float32 ``out / size``.

    Each pick is ``floor(v)`` of ``v = dst * size / out`` (``(dst + 0.5) * size / out``) in both, ``line`` must be
    that exactly, and rounding must decide none: a ``v`` near an integer but not one is at least ``1 / (2 out)``
    from it, which must stay far above float32's error (a margin of 2**-20 of ``v + 1``: onnxruntime picks
    otherwise than torch at 1000 -> 1001 nearest-exact without it); a ``v`` that is an integer (other than 0) comes
    out exact only where ``scale`` is exactly ``out / size`` (a division rounded correctly gives a representable
    quotient exactly): 2x, 3x, 0.5x, never 21 of 70, where ``9 / 0.3`` is 29.999998."""
    out, den = len(line), 2 * len(line)
    if size < 1 or out < 1 or out >= 2**23:  # (dst + 0.5 exact in float32)
        return False
    dst = np.arange(out, dtype=np.int64)
    num = (2 * dst + 1) * size if half else 2 * dst * size  # v = num / den
    exact, r = np.divmod(num, den)
    if not np.array_equal(line.numpy(), exact):
        return False
    exact_scale = Fraction(float(np.float32(out / size))) == Fraction(out, size)
    if not exact_scale and bool(np.any((r == 0) & (num != 0))):
        return False
    near = r != 0
    return not bool(np.any(np.minimum(r, den - r)[near] <= (num[near] + den) * 2.0**-20))


def _picked(ctx, x, picks: torch.Tensor):
    """``(N, C, len(picks))``: of each of ``x``'s ``N x C`` maps, the pixels at the flat indices ``picks``, one
    ``Gather`` (a copy: nearest interpolation and unfold, whose picks torch computes)."""
    flat = ctx.emit("Reshape", [x, ctx.ints("flat", [0, 0, -1])])
    return ctx.emit("Gather", [flat, ctx.const("picks", picks.reshape(-1).numpy())], axis=2)


@lowering("attention")
def _attention(ctx, n, q, k, v, *mask):
    """``Softmax(q k^T * scale + mask) v``: the mask added, or where boolean, kept where True; causal as a constant mask.

    A query whose keys the mask hides all gets zeros, as torch's attention gives it (its softmax of nothing but
    ``-inf`` is NaN in ONNX): the weights are set to 0 where the mask hides a key, which changes no other row."""
    qs, ks = n.inputs[0].shape, n.inputs[1].shape
    if n.attrs["gqa"]:  # each of k's (v's) heads serves the next qs[-3] // ks[-3] heads of q (v's own count: review R11)
        k, v = (t if s[-3] == qs[-3] else _heads_repeated(ctx, t, s, qs[-3] // s[-3]) for t, s in ((k, ks), (v, n.inputs[2].shape)))
    perm = list(range(len(ks)))
    perm[-2:] = perm[-1], perm[-2]
    scores = ctx.emit("MatMul", [q, ctx.emit("Transpose", [k], perm=perm)])
    scale = n.attrs["scale"] if n.attrs["scale"] is not None else 1 / math.sqrt(qs[-1])
    if scale != 1.0:  # 1.0: the query scale was folded into q's Linear (query_scale_fold)
        scores = ctx.emit("Mul", [scores, _number(ctx, "scale", scale)])
    if mask:
        if n.inputs[3].dtype == torch.bool:
            scores = ctx.emit("Where", [mask[0], scores, _number(ctx, "minus_inf", -math.inf)])
        else:
            scores = ctx.emit("Add", [scores, mask[0]])
    if n.attrs["causal"]:
        keep = torch.ones(qs[-2], ks[-2], dtype=torch.bool).tril()
        scores = ctx.emit("Add", [scores, ctx.const("causal", torch.zeros(keep.shape).masked_fill(~keep, -math.inf))])
    weights = ctx.emit("Softmax", [scores], axis=-1)
    if mask:
        hidden = ctx.emit("Not", [mask[0]]) if n.inputs[3].dtype == torch.bool else ctx.emit("Equal", [mask[0], _number(ctx, "hidden", -math.inf)])
        weights = ctx.emit("Where", [hidden, _number(ctx, "zero", 0.0), weights])
    return ctx.emit("MatMul", [weights, v])


def _heads_repeated(ctx, x, shape: tuple, times: int):
    """``x.repeat_interleave(times, dim=-3)`` of a ``shape`` tensor: a new axis after the heads, tiled ``times``
    along it, merged into them (``Reshape``'s 0 keeps the leading axes, the batch among them)."""
    axis = len(shape) - 2
    tiled = ctx.emit("Tile", [ctx.emit("Unsqueeze", [x, ctx.ints("axes", [axis])]), ctx.ints("repeats", [1] * axis + [times, 1, 1])])
    return ctx.emit("Reshape", [tiled, ctx.ints("shape", [0] * (len(shape) - 3) + [shape[-3] * times, *shape[-2:]])])


def _einsum_matmul(equation: str, shapes: list) -> tuple[list[int], list[int], list[int]] | None:
    """Transposes ``(a, b, out)`` that make a two-operand einsum one MatMul, or None.

    It is one when each operand's letters are batch letters (in both and the output, equal sizes),
    one letter of its own kept in the output (``m`` for ``a``, ``n`` for ``b``) and one contracted
    letter in both but not the output: ``transpose(a) @ transpose(b)`` is then ``(batch..., m, n)``.
    """
    if "->" not in equation or "." in equation:
        return None
    lhs, out = equation.split("->")
    ins = lhs.split(",")
    if len(ins) != 2 or any(len(set(t)) != len(t) for t in (*ins, out)):
        return None
    a, b = ins
    batch = [c for c in out if c in a and c in b]
    m = [c for c in out if c in a and c not in b]
    nn_ = [c for c in out if c in b and c not in a]
    k = [c for c in a if c in b and c not in out]
    if len(m) != 1 or len(nn_) != 1 or len(k) != 1 or set(a) != set(batch + m + k) or set(b) != set(batch + k + nn_) or set(out) != set(batch + m + nn_):
        return None
    size = lambda t, c: shapes[t][(a, b)[t].index(c)]  # noqa: E731
    if any(size(0, c) != size(1, c) for c in batch + k):
        return None
    mm = batch + m + nn_
    return [a.index(c) for c in batch + m + k], [b.index(c) for c in batch + k + nn_], [mm.index(c) for c in out]


@lowering("einsum")
def _einsum(ctx, n, *xs):
    """One MatMul (with transposes) where the equation is a batched matrix product, else ONNX ``Einsum`` (of float32
    copies, cast back, for bfloat16, which Einsum does not take: torch's bfloat16 einsum accumulates in float32 too)."""
    plan = _einsum_matmul(n.attrs["equation"], [i.shape for i in n.inputs])
    if plan is None and n.out.dtype == torch.bfloat16:  # ONNX Einsum takes no bfloat16: in float32, rounded once
        wide = [ctx.emit("Cast", [x], to=onnx.TensorProto.FLOAT) for x in xs]
        return ctx.emit("Cast", [ctx.emit("Einsum", wide, equation=n.attrs["equation"])], to=onnx.TensorProto.BFLOAT16)
    if plan is None:
        return ctx.emit("Einsum", list(xs), equation=n.attrs["equation"])
    perm_a, perm_b, perm_out = plan
    a, b = (ctx.emit("Transpose", [t], perm=p) if p != sorted(p) else t for t, p in zip(xs, (perm_a, perm_b)))
    y = ctx.emit("MatMul", [a, b])
    return ctx.emit("Transpose", [y], perm=perm_out) if perm_out != sorted(perm_out) else y


def _slice_of(ctx, x: str, axis: int, start: int, end, step: int = 1) -> str:
    end = _INT64_MAX if end is None else end
    return ctx.emit("Slice", [x, ctx.ints("starts", [start]), ctx.ints("ends", [end]), ctx.ints("axes", [axis]), ctx.ints("steps", [step])])


@lowering("slice")
def _slice(ctx, n, x):
    a = n.attrs
    return _slice_of(ctx, x, a["axis"] % len(n.x.shape), a["start"], a["end"], a["step"])


@lowering("chunk")
def _chunk(ctx, n, x):
    a = n.attrs
    length = _static_size(ctx, n, a["axis"])
    size = -(-length // a["chunks"])
    return _slice_of(ctx, x, a["axis"] % len(n.x.shape), a["index"] * size, min(length, (a["index"] + 1) * size))


@lowering("piece")
def _piece(ctx, n, x):
    """The piece at the traced size: along an axis that follows a dynamic batch, :func:`_pieces_along_the_batch`
    has fixed the batch."""
    a = n.attrs
    axis = a["axis"] % len(n.x.shape)
    length = n.x.shape[axis]
    if a["how"] == "unbind":
        return ctx.emit("Gather", [x, ctx.const("index", np.asarray(a["index"], dtype=np.int64))], axis=axis)
    size = a["size"] if a["how"] == "split" else -(-length // a["size"])
    return _slice_of(ctx, x, axis, a["index"] * size, min(length, (a["index"] + 1) * size))


@lowering("slice_scatter")
def _slice_scatter(ctx, n, x, src):
    """``x`` before the slice, ``src``, ``x`` after it, concatenated (step 1)."""
    a = n.attrs
    axis = a["axis"] % len(n.x.shape)
    if (a["start"], a["end"], a["step"]) in ((0, None, 1), (None, None, 1)):  # the whole axis (``y[:, 1:] = v``'s outer one): src
        return ctx.emit("Identity", [src])
    length = _static_size(ctx, n, axis)
    start, end, _ = slice(a["start"], a["end"]).indices(length)
    if a["step"] != 1:
        raise LoweringError(f"slice_scatter at {_where(n)}: only step 1 is lowered, got {a['step']}")
    parts = ([_slice_of(ctx, x, axis, 0, start)] if start > 0 else []) + [src] + ([_slice_of(ctx, x, axis, end, None)] if end < length else [])
    return ctx.emit("Concat", parts, axis=axis) if len(parts) > 1 else ctx.emit("Identity", [src])


@lowering("roll")
def _roll(ctx, n, x):
    """Per axis: the last ``shift`` elements, then the others.  Along the dynamic batch axis (a roll of the flattened
    tensor, ``torch.roll(y, 3)``) the cut is computed at run time, ``L - shift mod L`` of the axis's length ``L``, as
    torch rolls (a shift longer than the axis wraps around)."""
    y = x
    for shift, dim in zip(n.attrs["shifts"], n.attrs["dims"]):
        axis = dim % len(n.x.shape)
        if axis == 0 and ctx.dynamic_batch:
            length = ctx.emit("Gather", [ctx.emit("Shape", [y]), ctx.ints("axis", [0])], axis=0)
            cut = ctx.emit("Sub", [length, ctx.emit("Mod", [ctx.ints("shift", [shift]), length])])  # Mod: the divisor's sign
            last = ctx.emit("Slice", [y, cut, ctx.ints("ends", [_INT64_MAX]), ctx.ints("axes", [0])])
            rest = ctx.emit("Slice", [y, ctx.ints("starts", [0]), cut, ctx.ints("axes", [0])])
            y = ctx.emit("Concat", [last, rest], axis=0)
            continue
        length = _static_size(ctx, n, axis)
        s = shift % length
        if s:
            y = ctx.emit("Concat", [_slice_of(ctx, y, axis, length - s, None), _slice_of(ctx, y, axis, 0, length - s)], axis=axis)
    return y if y != x else ctx.emit("Identity", [x])


def _blocks(n) -> list[int] | None:
    """``[L_h, k_h, L_w, k_w]`` when the windows tile the map (kernel == stride, no padding or dilation), else None."""
    a = n.attrs
    h, w = a["output_size"] if n.op == "fold" else n.x.shape[-2:]
    (kh, kw), (sh, sw) = a["kernel"], a["stride"]
    tiled = (kh, kw) == (sh, sw) and tuple(a["padding"]) == (0, 0) and tuple(a["dilation"]) == (1, 1) and h % kh == 0 and w % kw == 0
    return [h // kh, kh, w // kw, kw] if tiled else None


@lowering("unfold")
def _unfold(ctx, n, x):
    """Windows that tile the map: ``(N, C, L_h k_h, L_w k_w) -> (N, C, k_h, k_w, L_h, L_w)``, a ``Transpose``
    between two ``Reshape``s; others the zero-padded map's pixels each window holds, one ``Gather`` of the places
    torch's own unfold takes them from (a copy: an Inf stays where it is, where a conv of one-hot kernels made NaN of
    it in every window, ``0 * inf``)."""
    a, c = n.attrs, n.x.shape[1]
    blocks = _blocks(n)
    if blocks is not None:
        lh, kh, lw, kw = blocks
        return _split_permute_merge(ctx, x, [0, c, lh, kh, lw, kw], [0, 1, 3, 5, 2, 4], [0, c * kh * kw, lh * lw])
    (ph, pw), (h, w) = a["padding"], n.x.shape[2:]
    if ph or pw:
        x = ctx.emit("Pad", [x, ctx.ints("pads", [0, 0, ph, pw, 0, 0, ph, pw])])
    places = torch.arange((h + 2 * ph) * (w + 2 * pw), dtype=torch.float64).reshape(1, 1, h + 2 * ph, w + 2 * pw)
    picks = OPS[n.op].run(places, **{**a, "padding": (0, 0)}).to(torch.int64)
    return ctx.emit("Reshape", [_picked(ctx, x, picks), ctx.ints("columns", [0, n.out.shape[1], -1])])


@lowering("fold")
def _fold(ctx, n, x):
    """The mirror of ``unfold``: tiling windows a ``Transpose`` between two ``Reshape``s; others each pixel the sum
    of the column entries that land on it, one ``Gather`` of them (:func:`fold_sources`, with a zero appended to
    fill up) and a ``ReduceSum`` (a conv of one-hot kernels would make NaN of an Inf in every pixel its window
    covers, ``0 * inf``)."""
    a, c = n.attrs, n.out.shape[1]
    blocks = _blocks(n)
    if blocks is not None:
        lh, kh, lw, kw = blocks
        return _split_permute_merge(ctx, x, [0, c, kh, kw, lh, lw], [0, 1, 4, 2, 5, 3], [0, c, lh * kh, lw * kw])
    sources = fold_sources(a["output_size"], a["kernel"], a["dilation"], a["padding"], a["stride"])
    entries = ctx.emit("Reshape", [x, ctx.ints("entries", [0, c, -1])])
    entries = ctx.emit("Pad", [entries, ctx.ints("pads", [0, 0, 0, 0, 0, 1])])
    y = ctx.emit("Gather", [entries, ctx.const("sources", sources.flatten().numpy())], axis=2)
    y = ctx.emit("Reshape", [y, ctx.ints("landed", [0, c, *a["output_size"], sources.shape[1]])])
    return _reduce_over(ctx, "ReduceSum", y, [4], 0)


@lowering("pixel_shuffle")
def _pixel_shuffle(ctx, n, x):
    return ctx.emit("DepthToSpace", [x], blocksize=n.attrs["factor"], mode="CRD")


@lowering("pixel_unshuffle")
def _pixel_unshuffle(ctx, n, x):
    """``(N, C, H r, W r) -> (N, C, H, r, W, r) -> (N, C, r, r, H, W) -> (N, C r^2, H, W)``."""
    _, c, h, w = n.x.shape
    r = n.attrs["factor"]
    return _split_permute_merge(ctx, x, [0, c, h // r, r, w // r, r], [0, 1, 3, 5, 2, 4], [0, c * r * r, h // r, w // r])


def _split_permute_merge(ctx, x, split: list[int], perm: list[int], merged: list[int]):
    """``Reshape`` to ``split`` (0 keeps the batch), ``Transpose`` by ``perm``, ``Reshape`` to ``merged``: how blocks
    of pixels move to channels and back (pixel_unshuffle, unfold and fold of windows that tile the map)."""
    y = ctx.emit("Reshape", [x, ctx.ints("split", split)])
    y = ctx.emit("Transpose", [y], perm=perm)
    return ctx.emit("Reshape", [y, ctx.ints("merged", merged)])


_PAD_MODES = {"constant": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}


@lowering("pad_nd")
def _pad_nd(ctx, n, x):
    a = n.attrs
    rank = len(n.x.shape)
    begins, ends = [0] * rank, [0] * rank
    for k in range(len(a["pads"]) // 2):  # torch order: the last axis first
        begins[rank - 1 - k], ends[rank - 1 - k] = a["pads"][2 * k], a["pads"][2 * k + 1]
    if a["mode"] == "circular" and ctx.opset < 19:
        raise LoweringError(f"pad_nd at {_where(n)}: circular padding needs opset >= 19, asked for {ctx.opset}")
    ins = [x, ctx.ints("pads", begins + ends)] + ([_number(ctx, "value", a["value"])] if a["mode"] == "constant" else [])
    return ctx.emit("Pad", ins, mode=_PAD_MODES[a["mode"]])


@lowering("constant")
def _constant(ctx, n):
    return ctx.const("value", n.params["value"], dtype=n.attrs["dtype"])


@lowering("repeat")
def _repeat(ctx, n, x):
    """``Tile``, after an ``Unsqueeze`` of the leading axes that more repeats than axes add."""
    counts, rank = list(n.attrs["repeats"]), len(n.x.shape)
    if len(counts) > rank:
        x = ctx.emit("Unsqueeze", [x, ctx.ints("axes", list(range(len(counts) - rank)))])
    return ctx.emit("Tile", [x, ctx.ints("repeats", counts)])


@lowering("expand")
def _expand(ctx, n, x, *like):
    """``Expand`` to ``like``'s shape, or to ``shape`` with 1 where the input keeps its size (so a dynamic batch stays dynamic)."""
    if like:
        return ctx.emit("Expand", [x, ctx.emit("Shape", [like[0]])])
    out = list(n.out.shape)
    given = (1,) * (len(out) - len(n.x.shape)) + tuple(n.x.shape)
    shape = [1 if o == i else o for o, i in zip(out, given)]
    if ctx.dynamic_batch and shape[0] != 1:
        raise LoweringError(f"expand at {_where(n)}: expands the batch axis, which is dynamic (export with dynamic_batch=False)")
    if empty := [k for k, (o, i) in enumerate(zip(out, given)) if o == 0 != i]:
        y = ctx.emit("Expand", [x, ctx.ints("shape", [1 if k in empty else s for k, s in enumerate(shape)])])
        return _sliced_to_nothing(ctx, y, empty)
    return ctx.emit("Expand", [x, ctx.ints("shape", shape)])


# --------------------------------------------------------------------------- export


def graph_to_onnx(
    graph: Graph,
    *,
    opset: int | None = None,
    dynamic_batch: bool = True,
    graph_name: str = "repalgebra",
    metadata: dict[str, str] | None = None,
    return_report: bool = False,
    notes: Sequence[str] = (),
    examples: Sequence[torch.Tensor] = (),
) -> "onnx.ModelProto | tuple[onnx.ModelProto, ExportReport]":
    """Lower ``graph`` to an ONNX model; parameters keep the graph's dtype (that of its first floating-point input).

    Every node whose op has an ONNX lowering is lowered by it.  Runs of
    consecutive nodes without one (opaque modules and calls, or a lowering
    that refuses the node's attributes) are exported with ``torch.onnx.export``
    and spliced in (:mod:`repalgebra.backend.onnx_fallback`).  With
    ``dynamic_batch`` and such nodes, the graph is run once at another batch
    size to learn which axes of their inputs follow the batch, and each
    region's export is checked in onnxruntime at the graph's own batch; a
    graph that does not run at another batch size, or a region whose export
    does not follow the batch, is exported with the batch fixed (the report
    says why).
    The model's metadata says which nodes went through the fallback
    (``repalgebra.fallback``) and how the batch was exported
    (``repalgebra.batch``); ``return_report=True`` also returns the
    :class:`ExportReport`.  The default opset is 20, or 22 for a bfloat16
    graph (its Conv takes bfloat16 from there).  ``notes`` are added to the report.  ``examples``
    are values of the graph's inputs; the fallback traces its parts at them (their
    rows, at another batch), and its checks add random values of the floating-point ones.

    Raises :class:`~repalgebra.backend.onnx_fallback.FallbackError` (a
    ``ValueError``) when ``torch.onnx.export`` cannot export a region either.
    """
    dtype = _graph_dtype(graph)
    if opset is None:
        opset = BFLOAT16_OPSET if dtype == torch.bfloat16 else DEFAULT_OPSET
    elif dtype == torch.bfloat16 and opset < BFLOAT16_OPSET:
        raise ValueError(f"a bfloat16 model needs opset {BFLOAT16_OPSET} or later (its Conv takes bfloat16 from there), got {opset}")
    kept = [o for o in graph.outputs if o.producer is None or not is_none_output(o.producer)]
    if len(kept) < len(graph.outputs):  # an output that is always None: left out, as torch.onnx.export does
        graph = Graph(graph.inputs, list(graph.nodes), kept)
        graph.eliminate_dead()
    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise ValueError(f"opset must be between {MIN_OPSET} and {newest}, got {opset}")
    report = ExportReport(opset=opset, dynamic_batch=dynamic_batch, notes=list(notes))
    graph = complex_as_pairs(graph)  # ONNX has no complex tensors: RoPE's complex products as real arithmetic
    first = batch_input(graph)
    batch = graph.inputs[first].shape[0] if first is not None else None
    if dynamic_batch and first is None:
        dynamic_batch = report.dynamic_batch = False
        report.notes.append("batch fixed: every input is 0-d, and no axis of an input is a batch")
    if dynamic_batch and (counted := _pieces_along_the_batch(graph, examples, dtype)):
        dynamic_batch = report.dynamic_batch = False
        report.notes.append(f"batch fixed: the number of pieces of a split at {counted} follows the batch, and the "
                            "file's pieces are the example's")
    refused: dict[int, str] = {}
    regions = find_regions(graph, lambda n: _lowers(n, opset, dtype, dynamic_batch, report.notes, refused))
    for r in regions:
        r.refused = [refused[id(n)] for n in r.run if id(n) in refused]
    exported: list[ExportedRegion | None] = []
    if regions:
        exported, dynamic_batch = export_regions(graph, regions, dynamic_batch, opset, report.notes, examples)
        report.dynamic_batch = dynamic_batch
    another = _batch_axes(graph, examples, dtype) if dynamic_batch else None
    if another is not None and True in another.grown:  # (the batch another input's: the notes below name its size)
        batch = graph.inputs[another.grown.index(True)].shape[0]
    if dynamic_batch and another is None and (odd := next((k for k, v in enumerate(graph.inputs) if k != first and v.shape
                                                              and v.shape[0] != batch), None)) is not None:
        dynamic_batch = report.dynamic_batch = False  # (a time-major mask (T, B) beside (B, T, C): axis 0 named batch on
        # both, the file ran at no other batch; review R13b)
        report.notes.append(f"batch fixed at {batch}: input {odd}'s axis 0 ({graph.inputs[odd].shape[0]}) "
                            "is not the batch, and the graph did not run at another batch to find where its batch is")
    ctx = LowerCtx(opset, dtype, dynamic_batch)
    names: dict[int, str] = {}
    extra = Spliced()

    def io(v: Value, name: str, batch_axes: dict[int, str] | None = None):
        shape: list = list(v.shape)
        for k, dim in ({0: "batch"} if batch_axes is None else batch_axes).items() if dynamic_batch and shape else ():
            shape[k] = dim
        return helper.make_tensor_value_info(name, _DTYPES[v.dtype or dtype], shape)

    batched, axes = (another.grown, another.axes) if another is not None else (None, None)
    inputs = []
    for k, v in enumerate(graph.inputs):
        names[id(v)] = ctx.unique(v.name)
        inputs.append(io(v, names[id(v)], None if batched is None else {0: "batch"} if batched[k] else {}))
    region_of = {id(n): r for r in regions for n in r.run}
    for n in graph.nodes:
        r = region_of.get(id(n))
        report.nodes.append(NodePath(n.source, n.op, describe(n), "fallback" if r else "own", r.index if r else None))
        if r is not None:
            if n is r.run[0] and exported[r.index] is not None:  # None: only recomputed where read
                _splice(ctx, r, exported[r.index], names, extra, report)
            continue
        ctx.prefix = n.source or n.out.name
        ctx.dtype = _node_dtype(n, dtype)  # its constants' (a part the code computes in float32 in a float16 model)
        before = len(ctx.nodes)
        names[id(n.out)] = OPS[n.op].lowerings["onnx"](ctx, n, *(names[id(i)] for i in n.inputs))
        report.own_onnx_nodes += len(ctx.nodes) - before
    ctx.dtype = dtype
    outputs = []
    for k, v in enumerate(graph.outputs):
        name = "output" if len(graph.outputs) == 1 else f"output{k}"
        ctx.prefix = ""
        if id(v) not in names and _builds_an_object(v.producer):  # a dataclass the model builds
            raise LoweringError(
                f"output {k} of the model is not a tensor but an object its forward builds (a dataclass, say): ONNX "
                "outputs are tensors; return them in tuples, lists, dicts or named tuples (a ModelOutput, a dataclass "
                "that is a dict, gives its tensor fields where its fields are the tensors it is built from, not ones its "
                "__post_init__ computes)"
            )
        if id(v) not in names:  # a size read from the input (``{"n": y.shape[0]}``): a Python number, no tensor
            raise LoweringError(  # (or an object a fused model rebuilds from its graph's outputs: a dataclass)
                f"output {k} of the model is no tensor ({v.name}): a Python number computed from the input's shape, or an "
                "object its forward builds (a dataclass); an ONNX model returns tensors only: return a size as a tensor "
                "(torch.tensor(n)), and tensors in tuples, lists, dicts or named tuples"
            )
        names_out = ctx.emit("Identity", [names[id(v)]], out=ctx.unique(name))
        outputs.append(io(v, names_out, axes[k] if axes is not None else None))
    report.own_onnx_nodes += len(graph.outputs)
    report.onnx_nodes = len(ctx.nodes)
    g = helper.make_graph(ctx.nodes, graph_name, inputs, outputs, ctx.initializers)
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in sorted(extra.opsets.items())]
    model = helper.make_model(g, opset_imports=opsets, producer_name="repalgebra", functions=extra.functions)
    from repalgebra import __version__

    model.producer_version = __version__
    model.ir_version = min(model.ir_version, 10)  # readable by older onnxruntime releases too
    meta = {
        **(metadata or {}),
        "repalgebra.fallback": report.summary(),
        "repalgebra.batch": "dynamic" if dynamic_batch else f"fixed at {batch if batch is not None else '-'}",
    }
    for k, v in meta.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=k, value=str(v)))
    if another is not None and another.axes is not None and (why := _runs_there(model, another)):
        # A lowering took axis 0 for the batch where it is not (a flatten of (C, B*H*W) after a transpose): the file
        # declared it free and fails there.  Written again with the batch fixed, as an honest file.
        fixed = f"batch fixed at {batch}: with a dynamic batch the file was not shown to compute the graph at batch {batch + 1} ({why})"
        return graph_to_onnx(graph, opset=opset, dynamic_batch=False, graph_name=graph_name, metadata=metadata,
                             return_report=return_report, notes=[*notes, fixed], examples=examples)
    return (model, report) if return_report else model


def _builds_an_object(node: Node | None) -> bool:
    """Whether ``node`` is a literal output the model builds by calling a class (``Out(logits=y)``, a dataclass)."""
    fn = node.attrs.get("fn") if node is not None and node.op == "opaque" else None
    built = any(isinstance(getattr(a, "target", None), type) for a in getattr(fn, "args_template", ()))
    return built or _object_made(node) is not None  # (a fused model's, traced again)


def _object_made(node: Node | None) -> SymExpr | None:
    """The call of a class whose result ``node`` returns as it is (``Out(logits=y)``), else None.  A fused model traced
    again returns it through one more ``returned`` call per trace."""
    if node is None or node.op != "opaque" or not is_returned_as_is(node):
        return None
    fn = node.attrs["fn"]
    made = fn.args_template[0] if len(fn.args_template) == 1 and not fn.kwargs_template else None
    while isinstance(made, SymExpr) and made.target is returned and len(made.args) == 1 and not made.kwargs:
        made = made.args[0]  # (what it is given)
    return made if isinstance(made, SymExpr) and made.kind == "call_function" and isinstance(made.target, type) else None


def record_fields(v: Value) -> list[Value] | None:
    """The tensors of ``v`` in field order where it is a transformers-style ``ModelOutput`` (a dataclass and a dict)
    the graph builds from its fields (:func:`~repalgebra.frontend.fx_trace.rebuilt_from_fields`), a tuple field's
    items in turn, None fields left out: the items of that dict, as an export writes a dict's.  None for anything
    else (a plain dataclass, one built from sizes or constants, one whose ``__post_init__`` makes its fields anew:
    the export refuses those by name)."""
    made = _object_made(v.producer)
    if made is None or made.args or not issubclass(made.target, dict):
        return None
    if not all(isinstance(t, In) or t is None for t in pytree.tree_leaves(made.kwargs)):
        return None
    # Built again with stand-ins for its tensors: its fields must be those given, and its items those not None.
    try:
        stand_ins = [torch.empty(i.shape or (), dtype=i.dtype, device="meta") for i in v.producer.inputs]
        given = pytree.tree_map(lambda t: t if t is None else stand_ins[t.index], made.kwargs)
        fields = rebuilt_from_fields(made.target(**given))
    except Exception:  # noqa: BLE001  (its __post_init__ computes with its fields: not a record of them)
        return None
    if fields is None or fields.keys() != given.keys():
        return None
    if any(list(map(id, pytree.tree_leaves(fields[k]))) != list(map(id, pytree.tree_leaves(given[k]))) for k in given):
        return None  # (a field computed anew: the model returns that, not what it is given; a list made a tuple is alike)
    return [v.producer.inputs[t.index] for k in fields for t in pytree.tree_leaves(made.kwargs[k]) if t is not None]


def records_opened(graph: Graph) -> Graph:
    """``graph`` with each output that is such a record (:func:`record_fields`) given as its tensors (ONNX outputs
    are tensors); ``graph`` itself where none is."""
    opened = [record_fields(v) for v in graph.outputs]
    if all(o is None for o in opened):
        return graph
    outputs = [t for v, o in zip(graph.outputs, opened) for t in ([v] if o is None else o)]
    graph = Graph(graph.inputs, list(graph.nodes), outputs)
    graph.eliminate_dead()
    return graph


def _lowers(node: Node, opset: int, dtype: torch.dtype, dynamic_batch: bool, notes: list[str], refused: dict[int, str]) -> bool:
    """Whether our lowering takes ``node``: its op has one and it does not refuse the node (tried on a scratch
    context).  A refusal's reason goes to ``refused`` (by node id), for the fallback's error should it fail too.
    A lowering that fails other than by refusing is noted; the node goes to the fallback."""
    lower = OPS[node.op].lowerings.get("onnx")
    if lower is None:
        return False
    try:
        lower(_Scratch(opset, dtype, dynamic_batch), node, *(f"x{k}" for k in range(len(node.inputs))))
    except LoweringError as e:
        refused[id(node)] = str(e)
        return False
    except Exception as e:  # noqa: BLE001  (a lowering's bug must not stop the export: the fallback takes the node)
        first = (str(e).strip().splitlines() or [""])[0]
        notes.append(f"the {node.op} lowering failed at {node.source or node.out.name} ({type(e).__name__}: {first}); exported by the fallback")
        return False
    return True


class _Scratch(LowerCtx):
    """A lowering context that records nothing heavy: constants are names only (for :func:`_lowers`)."""

    def const(self, suffix: str, tensor, dtype=None) -> str:
        return self.unique(suffix)


def _splice(ctx: LowerCtx, region: Region, sub: ExportedRegion, names: dict[int, str], extra: Spliced, report: ExportReport) -> None:
    """Splice one region's ONNX graph into ``ctx``; its outputs get their names in ``names``."""
    before = len(ctx.nodes)
    ctx.prefix = region.run[0].source or region.run[0].out.name
    prefix = ctx.unique(f"{ctx.prefix}/fallback")
    outs = splice(ctx, sub.model, [names[id(v)] for v in region.inputs], prefix, ctx.opset, extra)
    for v, name in zip(region.outputs, outs):
        names[id(v)] = name
    count = len(ctx.nodes) - before
    report.fallback_onnx_nodes += count
    report.regions.append(RegionReport(region.index, region.where, region.whats, len(region.run), count, sub.exporter, sub.dynamic_axes,
                                       sub.branches, sub.steered, sub.numbers, sub.on_values, sub.asserted))


def _refuse_unfaithful_copy(model: torch.nn.Module) -> None:
    """Raise a TypeError, naming what differs, where a copy of ``model`` does not hold its parameters, buffers and
    plain attributes (:func:`~repalgebra.frontend.state.copy_difference`): the export traces and checks copies, so
    the file would compute what the copy does (``__setstate__`` putting back a default: 4x the model's output, as
    fuse's own check was before; found by a fixer)."""
    from repalgebra.frontend.state import copy_difference

    if (difference := copy_difference(model, eval_copy(model))) is not None:
        raise TypeError(f"cannot export {type(model).__name__} to ONNX: {difference} (its __deepcopy__, __getstate__ "
                        "or __setstate__ changes it), and the export traces and checks a copy")


def _refuse_state(model: torch.nn.Module, example: tuple, dtype: torch.dtype) -> None:
    """Raise ``ValueError`` when calls of ``model`` change what its next call computes (a counter, a running
    statistic updated in eval mode): an ONNX graph is one function of its inputs, and would freeze one call's state."""
    from repalgebra.draws import DRAWS
    from repalgebra.frontend.state import find_state
    from repalgebra.verify import TOLERANCES

    try:
        written = inputs_written(eval_copy(model), example)
    except Exception as e:  # noqa: BLE001  (any error of the model's own: said with the example it met)
        raise ValueError(f"cannot export {type(model).__name__} to ONNX: it does not run on the example input "
                         f"({shapes_and_dtypes(example)}): "
                         f"{first_line(e)}; pass input_shape as the shape it runs at, or example tensors "
                         "(token ids, a mask)") from e
    if written:
        said = "; ".join(f"{f'{where!r} ({type(model.get_submodule(where)).__name__})' if where else 'its own forward'} "
                         f"changes the input {name!r} in place" for name, where in written)
        raise ValueError(
            f"cannot export {type(model).__name__} to ONNX: {said} (a streaming cache updated with copy_ or "
            "cache[:] = ...); an ONNX graph cannot write into its inputs, so the file would leave the caller's tensor "
            "as it was and each later call would compute with the old one. Return the new value instead "
            "(return y, new_cache) and pass it in on the next call, or, where the caller does not read the change, "
            "compute it out of place (x = x.clone() first)"
        )
    work = eval_copy(model)
    state = find_state(work, example, TOLERANCES.get(dtype, 1e-5))
    if state.whole:
        raise ValueError(f"cannot export {type(model).__name__} to ONNX: {state.whole}; an ONNX graph is one function of its inputs")
    if drawn := [n for n in state.changed if n in DRAWS]:
        where = ", ".join(repr(p) if p else "the model's own forward" for p in state.drawn_by)
        raise ValueError(f"cannot export {type(model).__name__} to ONNX: {where} draws random numbers "
                         f"({', '.join(drawn)}) on every call; an ONNX graph is one function of its inputs and cannot draw "
                         "what the model draws (export a model that does not, such as a VAE's mean rather than a sample)")
    if state.regions:
        where, why = next(iter(state.regions.items()))
        raise ValueError(
            f"cannot export {type(model).__name__} to ONNX: {where or 'the model'}: {why.split(':')[0]}, so each call "
            "computes with what the calls before it left; an ONNX graph is one function of its inputs and would freeze "
            "that state at one call"
        )


def inputs_written(model: torch.nn.Module, example: tuple) -> list[tuple[str, str]]:
    """The inputs one call of ``model`` on ``example`` changes in place, each as ``(name, module path)``: the name
    of its ``forward``'s parameter (``input k`` where it has none) and the innermost module whose call changed it
    (``""``: the model's own code).  The model runs on copies, so ``example`` is left as given.

    An ONNX graph cannot write into its inputs: a streaming model that updates the cache it is passed
    (``cache.copy_(x[..., -2:])``) exports as a file whose outputs are right on the first chunk, the caller's
    cache never updated, and every later chunk convolved with the first context (0.78 off from the second chunk,
    found by a probe).  A write counts where it changes the values (the version counter torch bumps on every
    in-place change of a tensor or a view of it names the module that wrote; torch.ao's fused fake-quant writes
    without a bump), unless the model returns that input, which carries the new values to the caller."""
    given = tuple(t.clone() if torch.is_tensor(t) else t for t in example)
    tensors = [(k, t) for k, t in enumerate(given) if torch.is_tensor(t)]
    first = {k: t._version for k, t in tensors}
    changed_in: dict[int, str] = {}
    before: dict[str, list[int]] = {}

    def pre(path: str) -> Callable:
        def hook(module: torch.nn.Module, args: Any) -> None:
            before[path] = [t._version for _, t in tensors]
        return hook

    def post(path: str) -> Callable:
        def hook(module: torch.nn.Module, args: Any, out: Any) -> None:
            for (k, t), v in zip(tensors, before.get(path, ())):
                if t._version != v:
                    changed_in.setdefault(k, path)  # post hooks run innermost first: the first to see it is the writer's
        return hook

    handles = [h for path, m in model.named_modules() if path and not isinstance(m, torch.jit.ScriptModule)
               for h in (m.register_forward_pre_hook(pre(path)), m.register_forward_hook(post(path)))]
    try:
        with torch.no_grad():
            out = model(*given)
    finally:
        for h in handles:
            h.remove()
    names = _forward_names(model, len(example))
    # A write that changes no value (an in-place ReLU of a non-negative image) loses nothing, and an input the model
    # also returns (``cache[:] = new; return y, cache``) reaches the caller through the file's output (a review).
    returned = {id(t) for t in pytree.tree_leaves(out) if torch.is_tensor(t)}
    return [(names[k], changed_in.get(k, "")) for k, t in tensors if not _same(t, example[k]) and id(t) not in returned]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shapes and entries, NaN where the other has NaN."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()))


def _forward_names(model: torch.nn.Module, n: int) -> list[str]:
    """The names of ``model.forward``'s first ``n`` positional parameters, ``input k`` past them (``*args``)."""
    try:
        params = [p.name for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    return [params[k] if k < len(params) else f"input {k}" for k in range(n)]


def _valid(model: "onnx.ModelProto") -> None:
    """Raise :class:`FallbackError` where ``model`` is not valid ONNX (``onnx.checker`` with shape inference): a
    bfloat16 Conv of a ``torch.autocast`` region, which torch.onnx.export writes at any opset, is valid from 22 only."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
        hint = (" (bfloat16 arithmetic, from a torch.autocast region or a bfloat16 model, is valid ONNX for most ops from "
                "opset 22: export with opset=22)") if "bfloat16" in str(e) and (opset or 0) < 22 else ""
        raise FallbackError(f"export_onnx: the file is not valid ONNX at opset {opset}: {first_line(e)}{hint}; no file "
                            "is written") from e


_GRAPH_BATCH_WHY = ("a graph holds what its trace read of the example's sizes (y.reshape(8, -1), min(x.shape[0], 2) as a "
                    "constant) and no model to check another batch against; export the model, or its fused module, for a "
                    "dynamic batch")


def _check_graph_shapes(graph: Graph, input_shape: Any) -> None:
    """A graph's file has the shapes it was traced at, its batch too (:data:`_GRAPH_BATCH_WHY`): an ``input_shape``
    given with other sizes would be ignored, and onnxruntime would then refuse the input the caller meant.  Refused
    (``ValueError``)."""
    if isinstance(input_shape, tuple) and input_shape == (1, 3, 256, 256):
        return  # the default: not given
    if torch.is_tensor(input_shape) or (isinstance(input_shape, (tuple, list)) and all(isinstance(d, int) for d in input_shape)):
        input_shape = [input_shape]
    given = [tuple(t.shape) if torch.is_tensor(t) else tuple(t) for t in input_shape]
    traced = [tuple(v.shape or ()) for v in graph.inputs]
    if given != traced:
        raise ValueError(f"export_onnx: the graph was traced at {', '.join('x'.join(map(str, t)) for t in traced)} and its file "
                         f"has those sizes, not input_shape {', '.join('x'.join(map(str, g)) for g in given)}: "
                         "trace the model at the shape you want (repalgebra.trace(model, example)), or export the model")


def _graph_dtype(graph: Graph) -> torch.dtype:
    """The floating-point dtype of the graph's first such input, else of its first floating-point parameter (a model
    of token ids), else float32."""
    floats = [v.dtype for v in graph.inputs if v.dtype is not None and v.dtype.is_floating_point]
    floats += [p.dtype for n in graph.nodes for p in n.params.values() if p.is_floating_point()]
    return floats[0] if floats else torch.float32


def _node_dtype(n: Node, default: torch.dtype) -> torch.dtype:
    """The floating-point dtype ``n`` computes in: its output's, else its first such input's, else ``default``."""
    return next((v.dtype for v in (n.out, *n.inputs) if v.dtype is not None and v.dtype.is_floating_point), default)


@dataclass(frozen=True)
class _AnotherBatch:
    """A run of the graph at a batch one larger: which inputs grew, the output axes that follow the batch (None:
    unknown), and the run's inputs and outputs (to check the file with)."""

    grown: list[bool]
    axes: list[dict[int, str]] | None
    inputs: tuple
    outputs: tuple


def _batch_axes(graph: Graph, examples: Sequence[torch.Tensor], dtype: torch.dtype) -> _AnotherBatch | None:
    """Which inputs have a batch on axis 0, and per graph output the axes whose size follows it, with their names in
    the file: ``batch`` where the size is the batch, ``batch*16`` where it is 16 rows per sample (a
    ``reshape(-1, C)`` of ``(B, 16, C)`` tokens), else a name of its own.

    The batch is axis 0 of the first input with axes whose size an output's axis 0 follows, else any axis of an
    output (:func:`batch_input`'s where none
    does: a model returning a sum over the batch).  The graph runs once at a batch one larger, with every input whose
    axis 0 has the batch's size grown (the first that runs of: all of them, then fewer, that input always): an input
    that does not follow the batch (a shared ``(L, S)`` mask, a position table) does not run grown, and its axis 0 is
    then declared fixed.  A time-major ``(T, B, C)`` output has its batch on axis 1.  None when no choice runs (the
    axis-0 convention then stands).  A ``(3,)`` vector of coefficients before the images took the batch, and the file
    declared the images' batch fixed while saying it was dynamic (review R17a); a CLIP written Hugging Face's way,
    ``forward(input_ids, pixel_values)`` returning ``(images, prompts)`` logits, gave the batch to the prompts (review
    R18a): an input whose size an output's axis 0 follows comes first."""
    runs: dict[int, _AnotherBatch | None] = {}  # (each input's run, made where it is asked: the first mostly answers)

    def grown_at(k: int) -> _AnotherBatch | None:
        if k not in runs:
            runs[k] = _grown_at(graph, examples, dtype, k)
        return runs[k]

    for follows in (lambda axes: any(0 in d for d in axes), any):  # (an output's axis 0 first: CLIP's (images, texts))
        for k in [k for k, v in enumerate(graph.inputs) if v.shape]:
            if (another := grown_at(k)) is not None and (another.axes is None or follows(another.axes)):
                return another
    return grown_at(first) if (first := batch_input(graph)) is not None else None


def _grown_at(graph: Graph, examples: Sequence[torch.Tensor], dtype: torch.dtype, first: int) -> _AnotherBatch | None:
    """:func:`_batch_axes`, with the batch on axis 0 of input ``first``."""
    from itertools import combinations

    from repalgebra.interpret import run_graph

    batch = graph.inputs[first].shape[0]
    gen = torch.Generator().manual_seed(0)
    given = dict(enumerate(examples))
    if any(v.dtype is not None and not v.dtype.is_floating_point and k not in given for k, v in enumerate(graph.inputs)):
        return None  # no values to run an integer input with (token ids, indices)

    def value(k: int, v: Value, grow: bool) -> torch.Tensor:
        return check_input(v, given.get(k), batch + 1 if grow else v.shape[0] if v.shape else None, gen, dtype)

    others = [k for k, v in enumerate(graph.inputs) if k != first and v.shape and v.shape[0] == batch]
    for n in range(len(others), -1, -1) if len(others) <= 4 else (len(others), 0):
        for chosen in combinations(others, n):
            grown = [k == first or k in chosen for k in range(len(graph.inputs))]
            xs = tuple(value(k, v, g) for k, (v, g) in enumerate(zip(graph.inputs, grown)))
            try:
                with torch.no_grad(), probing():
                    outs = run_graph(graph, *xs)
            except Exception:  # noqa: BLE001  (does not run so: the next choice)
                continue
            outs = outs if isinstance(outs, tuple) else (outs,)
            axes: list[dict[int, str]] | None = []
            for v, t in zip(graph.outputs, outs):
                if not torch.is_tensor(t) or v.shape is None or t.dim() != len(v.shape):
                    axes = None
                    break
                axes.append({k: _batch_dim(b, a, batch, f"{v.name}_{k}") for k, (a, b) in enumerate(zip(t.shape, v.shape)) if a != b})
            if axes is not None and batch > 1:
                _free_at_batch_one(graph, tuple(value(k, v, False)[:1] if g else value(k, v, False)
                                                for k, (v, g) in enumerate(zip(graph.inputs, grown))), axes)
            return _AnotherBatch(grown, axes, xs, outs)
    return None


def _pieces_along_the_batch(graph: Graph, examples: Sequence[torch.Tensor], dtype: torch.dtype) -> str:
    """Where the graph reads a piece of a split (a ``piece`` op: ``return h.split(k)``, ``x.split(2)[1]``) along an
    axis whose size follows the batch, that node's place (empty where none does).  The file lowers each piece at
    the traced size, a fixed number of them, with no check that the piece exists: its batch must then be fixed.
    Run at a batch one larger, a size that differs says so; no run at all, or a ``piece`` that raises there, counts
    as following it (``return x.unbind(0)`` of a batch of 1 runs at no other batch)."""
    counted = [n for n in graph.nodes if n.op == "piece"]
    if not counted:
        return ""
    where = repr(counted[0].source) if counted[0].source else "forward"
    another = _batch_axes(graph, examples, dtype)
    if another is None:
        return where
    env = {id(v): t for v, t in zip(graph.inputs, another.inputs)}
    try:
        with torch.no_grad(), probing():
            for n in graph.nodes:
                args = [env[id(i)] for i in n.inputs]
                if n.op == "piece" and args[0].shape[n.attrs["axis"]] != n.x.shape[n.attrs["axis"]]:
                    return repr(n.source) if n.source else "forward"
                env[id(n.out)] = op_def(n.op)(args, n.attrs, n.params)
    except Exception:  # noqa: BLE001  (a piece of the larger batch's: its count changed)
        return where
    return ""


def _free_at_batch_one(graph: Graph, xs: tuple, axes: list[dict[int, str]]) -> None:
    """Add to ``axes`` the output axes whose size differs at batch 1 though not at the larger batch (``y[:2]`` is 2
    rows from batch 2 up, 1 at batch 1): the file declared them fixed, and onnxruntime warned of its own file."""
    from repalgebra.interpret import run_graph

    try:
        with torch.no_grad(), probing():
            outs = run_graph(graph, *xs)
    except Exception:  # noqa: BLE001  (no run at batch 1: the file's batch check says more)
        return
    for v, t, named in zip(graph.outputs, outs if isinstance(outs, tuple) else (outs,), axes):
        if torch.is_tensor(t) and t.dim() == len(v.shape):
            named.update({k: f"{v.name}_{k}" for k, (a, b) in enumerate(zip(t.shape, v.shape)) if a != b and k not in named})


def _runs_there(model: "onnx.ModelProto", run: _AnotherBatch) -> str:
    """Why the file does not compute at the other batch what the graph did (empty when it does): in onnxruntime, or
    where onnxruntime cannot run it (no float64 kernel of several ops; numpy has no bfloat16 to feed it) in onnx's
    reference evaluator.  Unchecked, a lowering that took axis 0 for the batch where it is not went unseen (a
    float64 file declared a free batch and was 1.7 off at every other)."""
    if any(torch.is_tensor(t) and t.dtype == torch.bfloat16 for t in (*run.inputs, *run.outputs)):
        return reference_differs(model, run.inputs, run.outputs)
    try:
        session = ort_session(model)
    except Exception:  # noqa: BLE001
        return reference_differs(model, run.inputs, run.outputs)
    return session_differs(session, run.inputs, run.outputs)


def _batch_dim(size: int, size_after: int, batch: int, own: str) -> str:
    """The name of an axis of ``size`` at ``batch`` and ``size_after`` at ``batch + 1``."""
    per = size // batch
    if size == per * batch and size_after == per * (batch + 1):
        return "batch" if per == 1 else f"batch*{per}"
    return own


def _flat_for_export(module: torch.nn.Module, input_shape: Any) -> tuple[torch.nn.Module, Any]:
    """``module`` taking its tensors one by one (ONNX inputs are tensors), and the inputs to trace it at: for a model
    whose ``forward`` takes lists, tuples or dicts of tensors given as an example of that structure, or one that
    ``repalgebra.fuse`` made from such a model (its guard holds the structure; one shape or tensor per tensor)."""
    from repalgebra.frontend.structured import flat_leaves, flat_view
    from repalgebra.fuse import StructureGuard

    guard = next((h for h in module._forward_pre_hooks.values() if isinstance(h, StructureGuard)), None)
    def of_tensors(a: Any) -> bool:  # a container of tensors (an example), not a shape (a tuple of ints)
        leaves = pytree.tree_leaves(a)
        return isinstance(a, (list, tuple, dict)) and bool(leaves) and all(torch.is_tensor(t) for t in leaves)

    given = tuple(input_shape) if isinstance(input_shape, (tuple, list)) else (input_shape,)
    if any(map(of_tensors, given)):
        leaves, spec = flat_leaves(given)
    elif guard is not None:  # one shape or tensor per tensor of the structure
        leaves, spec = input_shape, pytree.tree_structure(guard.skeleton)
    else:
        return module, input_shape
    view = flat_view(module, spec)
    if view is None:
        raise TypeError(f"export_onnx: {type(module).__name__}'s graph reads its list or dict inputs whole; export the "
                        "model it was fused from, with an example of its inputs")
    return view, leaves


def _example_inputs(input_shape: Any, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """The inputs to trace at: a random tensor (seeded, standard normal, ``dtype``) per shape, a given tensor as it is.

    ``input_shape`` is one shape (a tuple of ints), one tensor, or a tuple of them, one per ``forward`` argument."""
    def is_shape(s: Any) -> bool:
        return isinstance(s, (tuple, list, torch.Size)) and all(isinstance(d, int) and not isinstance(d, bool) for d in s)

    if is_shape(input_shape) or torch.is_tensor(input_shape):
        items = [input_shape]
    elif isinstance(input_shape, (tuple, list)) and input_shape and all(is_shape(s) or torch.is_tensor(s) for s in input_shape):
        items = list(input_shape)
    else:
        raise TypeError(f"input_shape must be a shape such as (1, 3, 224, 224), an example tensor, or a tuple of them for "
                        f"a model of several inputs, not {input_shape!r}")
    if any(d < 1 for s in items if not torch.is_tensor(s) for d in s):
        raise ValueError(f"input_shape must have sizes of 1 or more (a batch of 0 has nothing to export), not {input_shape!r}")
    # Random values, not zeros: a model may compute from its input what it then relies on (a padding mask
    # from all-zero rows masks every token, and attention over no token is NaN).
    gen = torch.Generator().manual_seed(0)
    return tuple(s.detach() if torch.is_tensor(s) else torch.randn(tuple(s), generator=gen, dtype=dtype) for s in items)


def _fused_first(model: torch.nn.Module, example: tuple, capture: str) -> tuple[Graph, str, torch.nn.Module, bool] | None:
    """What ``repalgebra.fuse`` makes of a model whose parts torch.fx kept whole failed to export: its capture
    (``torch.export``) reads Python fx cannot (slice assignments, ``int()`` of a size); ``None`` unless that
    traces whole."""
    from repalgebra.fuse import fuse as fuse_model

    try:
        fused = fuse_model(model, example)
        graph, how = capture_for_export(fused, example)
    except Exception:  # noqa: BLE001  (fuse cannot do better: the export's own error stands)
        return None
    if how != "fx":
        return None
    return graph, f"fused first (capture: {fused.fuse_report.capture}; torch.fx alone: {capture})", fused, True


def _at_export_shapes(model: torch.nn.Module, example: tuple, graph: Graph,
                      dynamic_batch: bool) -> tuple[Graph, str, torch.nn.Module, bool] | None:
    """``model`` captured by ``torch.export`` at the export's own input shapes, where that leaves fewer calls for
    the fallback than ``graph``, and whether its batch is free; else ``None``.

    An export fixes every size but (maybe) the batch, so what a model computes from its input's height, width or
    channels (YOLOv8's anchor grid from ``arange`` of the feature map's size, ShiftViT's slices of ``C // 4``
    channels) can be constants of that shape.  ``torch.fx`` keeps those sizes symbolic: the model then works at
    any size, and the parts that read them are calls the fallback exports.  With ``dynamic_batch`` the capture
    must hold at any batch, and it must compute what the model does on the example."""
    from repalgebra.frontend.capture import CaptureFailed, capture_specialized

    calls = sum(n.op == "opaque" for n in graph.nodes)
    if not calls:
        return None
    try:
        cap = capture_specialized(model, example)
    except CaptureFailed:
        return None
    if (dynamic_batch and not cap.batch_free) or sum(n.op == "opaque" for n in cap.graph.nodes) >= calls:
        return None
    if not _computes(cap.graph, model, example):  # the fx way, whose calls are the model's own code, is kept
        return None
    shapes = ", ".join("x".join(map(str, t.shape)) for t in example)
    fixed = "sizes other than the batch" if cap.batch_free else "shapes"
    return (cap.graph, f"torch.export with {fixed} fixed at {shapes} (torch.fx left {calls} call{'s' * (calls != 1)} for the fallback)",
            model, cap.batch_free)


def _checks_read_the_batch(checks: Sequence, example: tuple) -> str:
    """Why a file with a free batch would compute something else than the model: a check the fused model makes per
    call (:mod:`~repalgebra.frontend.size_tests`: ``if x.shape[0] > 2`` taken as at the example) reads the batch,
    where the model may take its other branch and the file, which checks nothing, would not.  A check reads the
    batch unless it reads its inputs only through one size each of an axis after the first (PointNet's
    ``x.size()[1] > 3``): ``x.numel()``, ``a.shape[0] == b.shape[0]`` and ``x.shape[0] <= 8`` all read it (a review
    found the last two a free batch, the file 1.2 off).  Empty where no check does."""
    def reads(t: Any, ranks: list[int]) -> bool:
        if isinstance(t, In):
            return True  # (read whole: its batch too)
        if isinstance(t, SymExpr):
            x, axis = size_read(t, lambda v: ranks[v.index] if isinstance(v, In) else None)
            if isinstance(x, In) and isinstance(axis, int):
                return ranks[x.index] == 0 or axis % ranks[x.index] == 0
            return reads((t.args, t.kwargs), ranks)
        if isinstance(t, (tuple, list)):
            return any(reads(a, ranks) for a in t)
        return any(reads(a, ranks) for a in t.values()) if isinstance(t, dict) else False

    for fn, positions, where in checks:
        ranks = [example[k].dim() if torch.is_tensor(example[k]) else 0 for k in positions]
        if reads((fn.args_template, fn.kwargs_template), ranks):
            return (f"{where or 'forward'!r} tests a size that follows the batch (taken as at the example, and "
                    "checked by the fused model on each call), which a file cannot check")
    return ""


def _holds_at_another_batch(graph: Graph, module: torch.nn.Module, example: tuple) -> bool:
    """Whether the rewritten ``graph`` still computes what ``module`` does at the example's batch plus one.

    The rules see the example's sizes only: a per-channel fold through ``y.reshape(8, -1)`` is exact at batch 1
    alone, where that reshape keeps the channel axis whole; at batch 1, a squeeze of the batch axis
    (``y.squeeze(0)``, no op at any other batch) is a reshape that drops it.  Only graphs with a reshape are run.  A
    model that does not run at another batch (``x.view(1, ...)``) does not hold there either: the file would."""
    if not any(n.op in SIZE_MATCHED for n in graph.nodes):
        return True
    return _computes(graph, module, batch_plus_one(example, _file_batch(example))) is True


def _holds_at_batch_one(graph: Graph, module: torch.nn.Module, example: tuple) -> bool:
    """Whether ``graph`` computes what ``module`` does at batch 1 (true where the example's batch is 1).

    A graph captured with a symbolic batch holds from batch 2 up (``torch.export`` takes sizes 0 and 1 for special
    cases), and ``x.squeeze()`` of the batch axis drops it at batch 1 only: the ONNX file would then run at batch 1
    and give another shape, or other numbers, than the model (or than a fused model that refuses batch 1)."""
    if _batch_of_one(example):
        return True
    return bool(_computes(graph, module, batch_of_one(example, _file_batch(example))))


def _file_batch(example: tuple) -> int | None:
    """The batch of the file: axis 0 of the first input with axes (the inputs whose axis 0 has that size grow with it)."""
    return next((t.shape[0] for t in example if torch.is_tensor(t) and t.dim()), None)


def _run_at(module: torch.nn.Module, example: tuple) -> tuple[Any] | None:
    """``(output,)`` of ``module`` (in eval mode, a copy) at ``example``; None where it refuses its own example
    (export_onnx said so before)."""
    try:
        with torch.no_grad(), probing():
            return (eval_copy(module)(*example),)
    except Exception:  # noqa: BLE001
        return None


def _name_outputs(model: "onnx.ModelProto", names: list[str]) -> None:
    """The file's outputs named by their places in the model's output (``boxes``, ``aux.0``: :func:`named_tensor_leaves`),
    where those are as many as its outputs and every name is free and not empty; else each keeps its ``outputK``.  A
    detector returning ``{"boxes": ..., "scores": ...}`` had its file's outputs named ``output0``, ``output1`` (review
    R16b)."""
    outputs = model.graph.output
    if len(names) != len(outputs) or len(set(names)) != len(names):
        return
    own = {o.name for o in outputs}  # (renamed all at once: {"output1": a, "output0": b} swaps the two)
    taken = {n for node in _nodes_within(model.graph) for n in (*node.input, *node.output)} - own
    taken |= {v.name for v in (*model.graph.input, *model.graph.initializer, *model.graph.value_info)}
    if any(not new or new in taken for new in names):
        return  # (an empty key, or a name the file uses inside: every output keeps its outputK; review R18a)
    renamed = {o.name: new for o, new in zip(outputs, names) if new != o.name}
    for node in _nodes_within(model.graph):
        node.input[:] = [renamed.get(n, n) for n in node.input]
        node.output[:] = [renamed.get(n, n) for n in node.output]
    for o in outputs:
        o.name = renamed.get(o.name, o.name)


def _nodes_within(graph: "onnx.GraphProto") -> Iterator["onnx.NodeProto"]:
    """The nodes of ``graph`` and of the graphs its nodes hold (an ``If``'s branches, a ``Loop``'s body)."""
    for node in graph.node:
        yield node
        for a in node.attribute:
            for g in [a.g] if a.type == onnx.AttributeProto.GRAPH else a.graphs:
                yield from _nodes_within(g)


def _differs_at_the_example(model: "onnx.ModelProto", module: torch.nn.Module, example: tuple, out: Any, notes: list[str]) -> str:
    """Why the file does not compute what ``module`` does at ``example`` in onnxruntime (empty when it does, or where
    either cannot run it: numpy has no bfloat16; a file onnxruntime cannot load, with no kernel for a float64 op,
    is noted in ``notes``).  A file within the dtype's tolerance of the module run in float64 computes it too: a
    float16 BatchNorm of a mean of 100 rounds worse in the model than in the file.  Integer and boolean outputs
    may differ in a tenth of the dtype's tolerance of their entries (a mask ``y > 0`` of a folded float16 conv
    flips where ``y`` is within rounding of 0: 103 of 2 million).  The last line of defence: the checks at other
    batches compare the graph with the model, and the file with the graph, but not the file with the model."""
    import onnxruntime as ort

    from repalgebra.fuse import computes_in
    from repalgebra.verify import TOLERANCES, tensor_leaves

    if any(torch.is_tensor(t) and t.dtype == torch.bfloat16 for t in example):
        return ""
    want = tuple(tensor_leaves(out))  # (the module's output at the example: _run_at)
    if any(t.dtype == torch.bfloat16 for t in want):
        return ""
    try:
        session = ort_session(model)
    except Exception as e:  # noqa: BLE001
        notes.append(f"onnxruntime {ort.__version__} cannot load the file, so it was not run: {first_line(e)} (the "
                     "CPU provider has no float64 or bfloat16 kernel of several ops; the file is valid ONNX, checked by onnx.checker)")
        return ""
    flips = TOLERANCES.get(computes_in(module, example), 1e-5) / 10
    why = session_differs(session, example, want, flips=flips)
    if why and all(t.dtype != torch.float64 for t in want):  # the model may be what rounds badly: a float64 run decides
        try:
            with torch.no_grad(), probing():
                exact = tensor_leaves(eval_copy(module).double()(*(_in_float64(t) for t in example)))
            if not session_differs(session, example, tuple(e.to(w.dtype) for e, w in zip(exact, want)), flips=flips):
                return ""
        except Exception:  # noqa: BLE001  (the model does not run in float64: its own run stands)
            pass
    return why


def _in_float64(t: Any) -> Any:
    return t.double() if torch.is_tensor(t) and t.is_floating_point() else t


def _batch_of_one(example: tuple) -> bool:
    """Whether every tensor of ``example`` has a batch of 1 (or no axes)."""
    return all(not torch.is_tensor(t) or t.dim() == 0 or t.shape[0] == 1 for t in example)


def _computes(graph: Graph, module: torch.nn.Module, inputs: tuple) -> bool | None:
    """Whether ``graph`` computes what ``module`` does on ``inputs`` (to the tolerance of the dtype it computes in, or
    of an output's where that is looser); ``None`` where the module does not run on them.  An output cast wider than
    the model computes (a float32 model's ``logits.double()``) holds the fold's float32 rounding: compared to
    float64's tolerance, the file's batch was fixed for it (review R9)."""
    from repalgebra.fuse import computes_in
    from repalgebra.interpret import run_graph
    from repalgebra.verify import TOLERANCES, first_difference, tensor_leaves

    try:
        with torch.no_grad(), probing():
            want = tensor_leaves(eval_copy(module)(*inputs))
    except Exception:  # noqa: BLE001
        return None
    try:
        with probing():
            got = run_graph(graph, *inputs)
    except Exception:  # noqa: BLE001  (a carried call that refuses these inputs, where the model runs)
        return False
    got = [t for t in (got if isinstance(got, tuple) else (got,)) if torch.is_tensor(t)]
    own = TOLERANCES.get(computes_in(module, inputs), 1e-5)
    return len(got) == len(want) and all(
        first_difference(w, g, max(TOLERANCES.get(w.dtype, 1e-5), own)) is None for w, g in zip(want, got)
    )


def _branching(regions: list[RegionReport]) -> str:
    """Why a file whose regions' code reads its inputs' values as Python booleans or numbers (their traces fixed
    those to the example's) is not written."""
    def counts(r: RegionReport) -> str:
        return "; ".join([f"{r.branches} branch{'es' * (r.branches != 1)}"] * bool(r.branches)
                         + [f"{r.numbers} number{'s' * (r.numbers != 1)} read"] * bool(r.numbers)
                         or [f"{r.on_values} value{'s' * (r.on_values != 1)} read"])

    parts = ", ".join(f"{r.where} ({', '.join(r.whats)}; {counts(r)})" for r in regions)
    if any(r.steered for r in regions):
        why = ("and they came out otherwise for other inputs (its Python branches on values, if x.mean() > 0, or "
               "computes with them, float(ids.max())), so the file would always take the branches and numbers the "
               "example input gave and compute something else for inputs that give others")
    else:
        why = ("read from the values of its inputs (its Python branches on values, if x.max() > 1, or computes with "
               "them, float(ids.max())); an ONNX graph holds no Python branch, so the file would always take the "
               "branches and numbers the example input gave, and compute something else for any input that gives "
               "others, although the export's check inputs all gave the same")
    return (f"export_onnx: torch.onnx.export's trace of {parts} turned tensor values into Python booleans or numbers, "
            f"{why}; no file is written.  Write the choice with torch.where and the arithmetic with tensors; where "
            "the branch cannot be taken by inputs the model makes (the checks also vary the part's inputs: negated "
            "floats, token ids all 0, reversed or halved, inverted masks), pass allow_example_branches=True to accept "
            "that file")


@one_at_a_time
def export_onnx(
    model_or_graph: "torch.nn.Module | Graph",
    path: "str | os.PathLike | BinaryIO | None",
    input_shape: "tuple[int, ...] | torch.Tensor | Sequence[tuple[int, ...] | torch.Tensor]" = (1, 3, 256, 256),
    *,
    opset: int | None = None,
    dynamic_batch: bool = True,
    fuse: bool = True,
    metadata: dict[str, str] | None = None,
    return_report: bool = False,
    allow_example_branches: bool = False,
) -> "onnx.ModelProto | tuple[onnx.ModelProto, ExportReport]":
    """Export a model (or an IR graph) to ONNX, fusing it first by default.

    Args:
        model_or_graph: an ``nn.Module`` (the train-time model, or what ``repalgebra.fuse`` returned), or a
            :class:`~repalgebra.ir.Graph` from :func:`repalgebra.trace` (its file has the traced sizes, the batch
            too: a graph has no model to check another batch against).
        path: where to save the file (a path, or a binary file object such as ``io.BytesIO``); ``None`` only
            returns it.
        input_shape: the shape of a random input (seeded, standard normal, in the model's dtype), a tuple of
            shapes for a model of several inputs (``((1, 3, 64, 64), (1, 16))``), or example tensors in their
            place, used as they are (a bool padding mask, integer token ids, an image in 0..1): the parts
            ``torch.onnx.export`` writes are traced at them, and checked at other values too.  A model whose ``forward`` takes
            lists, tuples or dicts of tensors is given an example of that structure (``(feats,)``), or, fused by
            ``repalgebra.fuse``, one shape per tensor; its ONNX model takes one input per tensor.
        opset: the ONNX opset, 13 to the onnx package's newest; default 20 (one ``Gelu`` kernel per GELU in
            onnxruntime), 22 for a bfloat16 model.
        dynamic_batch: give the file a dynamic batch axis where the model allows it (see below).
        fuse: fold the graph first (the module ``repalgebra.fuse`` would return); ``False`` exports it as traced
            (a fused module is exported so).
        metadata: extra key/value pairs for the file's metadata (the CLI adds the variant name).
        return_report: also return the :class:`~repalgebra.backend.onnx_fallback.ExportReport`.
        allow_example_branches: write a file in which a part's Python branches on tensor values (``if x.mean() >
            0:``), and the numbers it reads from them (``float(ids.max())``), are fixed to those of the example, as
            ``torch.onnx.export`` writes it; the report notes each such part.  By default a part whose own code
            reads Python booleans or numbers from values computed from its inputs (found by a run in eager:
            :func:`~repalgebra.backend.value_reads.value_reads`; not sizes, not weights, not an ``assert``'s test),
            or whose booleans come out otherwise for the export's check inputs (random, scaled, negated, ids all 0
            or halved), is refused (:class:`~repalgebra.backend.onnx_fallback.FallbackError` naming it): the file
            would compute something else for inputs that give others, and no check at a few inputs shows that
            none does (``if x.max() > 1: x = x / 255``: every check input is above 1).

    Returns:
        The ``onnx.ModelProto``, or ``(model, ExportReport)`` with ``return_report=True``.

    Raises:
        ValueError: the model does not run on the example (the message gives the shapes it met), its calls change
            its state (an ONNX graph is one function of its inputs), an opset out of range, an ``input_shape``
            other than a graph's traced sizes; :class:`~repalgebra.backend.onnx_fallback.FallbackError` (a
            ``ValueError``) when ``torch.onnx.export`` cannot export, or computes something else for, a part
            with no lowering of ours, or whose trace fixed a branch on tensor values (see
            ``allow_example_branches``).
        TypeError: ``model_or_graph`` is neither a module nor a graph.

    How.  The module is traced into the IR (``torch.fx``; a submodule it cannot trace is kept whole, and a
    module whose own ``forward`` it cannot trace is one opaque call), rewritten to its fused form (``fuse=True``;
    where ``torch.fx`` keeps parts whole, the module ``repalgebra.fuse`` returns, whose capture reads Python fx
    cannot, when it traces whole and keeps the batch dynamic as asked, or when the parts kept whole do not
    export), lowered op by op with the op table's ONNX lowerings, the rest exported by ``torch.onnx.export`` and
    spliced in (see :func:`graph_to_onnx`), checked with ``onnx.checker.check_model(full_check=True)`` and, when
    ``path`` is given, saved there.  The model you pass is not modified.  The file's inputs are named by
    ``forward``'s parameters, its outputs by their places in the model's output (``boxes`` of a dict, ``aux.0``
    of a list in it, ``logits`` of an output record), or ``output0``, ``output1`` ... for a tuple.

    Sizes.  An export fixes every size but (with ``dynamic_batch``) the batch.  Where ``torch.fx`` leaves calls
    for the fallback, the model is also captured by ``torch.export`` at the export's shapes, and that capture is
    exported if it leaves fewer (sizes read from the input, as in YOLO's anchor grid or ShiftViT's ``C // 4``
    channel slices, become constants; a few seconds more).  Where the way taken fixes the batch anyway, the
    others are tried too, and the one that leaves the least to ``torch.onnx.export`` is kept (a Swin block
    torch.fx keeps whole goes to it whole; fused at the export's shapes, it is all our own lowering).

    The batch.  A module fused with shapes fixed at its example input (``repalgebra.fuse`` on a model it
    captured with ``torch.export``) is exported with the batch fixed, whatever ``dynamic_batch`` says, and so
    is one whose graph computes something else than the model at another batch or at batch 1; the report
    notes why.  With a dynamic batch, the axis 0 of each input that follows the first input's with axes (found by a run
    at a batch one larger) is named ``batch``, not that of a mask or table the batch shares, and an output axis
    that grows with it ``batch`` where it is the batch, ``batch*16`` where it holds 16 rows per sample (tokens
    flattened into rows); the file is run in onnxruntime at that larger batch, and written with the batch fixed
    where it fails there.  Last, the file is run at the example input and compared with the module: where it
    computes something else, nothing is written (:class:`FallbackError` names the difference); where onnxruntime
    cannot load it (no float64 kernels), the report notes it.  The metadata records the producer, version, the
    rules that fired, which nodes went through the fallback, how the batch was exported and anything in
    ``metadata``.
    """
    from repalgebra import __version__
    from repalgebra.rewrite import rewrite
    from repalgebra.verify import named_tensor_leaves

    if not (path is None or hasattr(path, "write") or isinstance(path, (str, os.PathLike))):
        raise TypeError(f"export_onnx saves to a path (str or os.PathLike) or a binary file object, not {type(path).__name__}")
    if opset is not None and (not isinstance(opset, numbers.Integral) or isinstance(opset, bool)):  # (a config's "20")
        raise TypeError(f"export_onnx: opset must be an int such as {DEFAULT_OPSET}, not {opset!r}")
    opset = None if opset is None else int(opset)  # (numpy's int64, read from an array: R15a)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(k, str) for k in metadata)):
        raise TypeError(f"export_onnx: metadata must be a dict with str keys (ONNX's metadata is text), not {metadata!r}")

    def lower(graph: Graph, capture: str, module: torch.nn.Module | None, batch_free: bool, example: tuple) -> tuple:
        notes: list[str] = []
        batch = dynamic_batch and module is not None
        if batch and not batch_free:  # (a capture at the export's shapes, the batch too: review R13b, 1.8 off at batch 2)
            batch = False
            notes.append(f"batch fixed at {_file_batch(example)}: captured by torch.export with every shape fixed, the batch too")
        if dynamic_batch and module is None:  # (nothing to check another batch against: review R9, 2.3 off at batch 2)
            notes.append(f"batch fixed at {graph.inputs[k].shape[0] if (k := batch_input(graph)) is not None else '-'}: "
                         f"{_GRAPH_BATCH_WHY}")
        fixed = fixed_shape_parts(module) if module is not None else []
        if fixed and batch:
            batch = False
            shown = ", ".join(fixed[:3]) + (f", ... ({len(fixed) - 3} more)" if len(fixed) > 3 else "")
            notes.append(f"batch fixed at {_file_batch(example)}: fused with shapes fixed at its example input: {shown}")
        meta = {"producer": "repalgebra", "repalgebra_version": __version__}
        if batch and (why := _checks_read_the_batch(getattr(graph, "input_checks", ()), example)):
            batch = False
            notes.append(f"batch fixed at {_file_batch(example)}: {why}")
        graph = records_opened(graph)  # (compared with the model's tensors below: its record's fields)
        fired = False
        if fuse:
            graph, rewritten = rewrite(graph)
            meta["rules_fired"] = ", ".join(f"{k} x{v}" for k, v in rewritten.rule_counts().items()) or "none"
            fired = bool(rewritten.fired)
        if batch and (fired or _batch_of_one(example)) and not _holds_at_another_batch(graph, module, example):  # (batch: a module)
            batch = False
            notes.append(f"batch fixed at {_file_batch(example)}: the graph differs from the model at another batch, or one "
                         "of them does not run there (a reshape keeps an axis whole at the example's batch only, such as "
                         "y.reshape(8, -1) or y.squeeze(0) at batch 1, or reads the batch as a number: x.view(1, ...))")
        if batch and not _holds_at_batch_one(graph, module, example):
            batch = False
            notes.append(f"batch fixed at {_file_batch(example)}: at batch 1 the model computes something else than the graph, "
                         "or refuses it (a squeeze of the batch axis, a branch on it), where a graph with a dynamic batch would run")
        meta.update(metadata or {})
        model, report = graph_to_onnx(graph, opset=opset, dynamic_batch=batch, metadata=meta, return_report=True,
                                      notes=notes, examples=example)
        if not allow_example_branches and (branching := [r for r in report.regions if r.steered or r.on_values]):
            raise FallbackError(_branching(branching))
        ran = _run_at(module, example) if module is not None else None
        if ran is not None and (why := _differs_at_the_example(model, module, example, ran[0], report.notes)):
            raise FallbackError(f"export_onnx: the file computes something else than the model at the example input "
                                f"({why}); no file is written (captured by {capture or 'the graph given'})")
        if ran is not None:
            _name_outputs(model, [name for name, _ in named_tensor_leaves(ran[0])])
        report.capture = capture
        return model, report

    if isinstance(model_or_graph, Graph):
        _check_graph_shapes(model_or_graph, input_shape)
        model, report = lower(model_or_graph, "", None, True, ())
    elif isinstance(model_or_graph, torch.nn.Module):
        with globals_kept(model_or_graph, refuse=False) as written:  # (its runs and traces of the model: put back)
            _refuse_unfaithful_copy(model_or_graph)
            model_or_graph, input_shape = _flat_for_export(model_or_graph, input_shape)
            dtype = next((p.dtype for p in model_or_graph.parameters() if p.is_floating_point()), torch.float32)
            example = _example_inputs(input_shape, dtype)
            _refuse_state(model_or_graph, example, dtype)
            graph, capture = capture_for_export(model_or_graph, example)
            ways = [(graph, capture, model_or_graph, True)]
            fused = _fused_first(model_or_graph, example, capture) if fuse and capture != "fx" else None
            if fused is not None:  # first when all of it is fused and traced with the batch as asked, else if the other fails
                ways.insert(0 if not (dynamic_batch and fixed_shape_parts(fused[2])) else 1, fused)
            if (fixed := _at_export_shapes(model_or_graph, example, ways[0][0], dynamic_batch)) is not None:
                ways.insert(0, fixed)
            for k, way in enumerate(ways):
                try:
                    model, report = lower(*way, example)
                    break
                except FallbackError as e:
                    first = e if k == 0 else first
                    if k == len(ways) - 1:
                        first.__suppress_context__ = True  # the first way's error is the one to read
                        raise first
            if dynamic_batch and not report.dynamic_batch and report.fallback:
                # The batch got fixed anyway: a later way that also fixes it may leave less to torch.onnx.export (a Swin
                # block kept whole goes to the fallback whole; captured with its shapes fixed, batch too, it is all our
                # own lowering, whether or not fuse finds anything to fold in it).
                later = ways[k + 1 :]
                if fixed is None and (fixed := _at_export_shapes(model_or_graph, example, graph, False)) is not None:
                    later.append(fixed)
                for way in later:
                    try:
                        other = lower(*way, example)
                    except FallbackError:
                        continue
                    if (not other[1].dynamic_batch, len(other[1].fallback)) < (True, len(report.fallback)):
                        model, report = other
        if written:
            report.notes.append(f"the model's code wrote {', '.join(written)} while export_onnx ran it: put back as it was "
                                "(the file makes no such write)")
    else:
        raise TypeError(f"export_onnx takes an nn.Module or a repalgebra Graph, not {type(model_or_graph).__name__}")
    _valid(model)
    if path is not None:
        onnx.save(model, path if hasattr(path, "write") else os.fspath(path))
    return (model, report) if return_report else model
