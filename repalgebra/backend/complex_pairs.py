"""Complex products by constants as real arithmetic on pairs, for ONNX, which has no complex tensors.

Meta's LLaMA (and the RoPE ViTs written after it) rotates queries and keys as complex numbers:

    torch.view_as_real(torch.view_as_complex(x.reshape(..., d // 2, 2)) * freqs_cis)

with ``freqs_cis`` a complex constant.  The fused model carries those three calls as they are (exact, and fast in
PyTorch); ``torch.onnx.export`` cannot export them.  In the last axis of size 2 of ``x`` (real, imaginary),
with ``c = c_r + i c_i``, the product is

    (a + i b)(c_r + i c_i) = (a c_r - b c_i) + i (a c_i + b c_r)
                          = x * [c_r, c_r] + swap(x) * [-c_i, c_i],   swap([a, b]) = [b, a],

which ONNX writes with Slice, Concat, Mul and Add (the same products and sums as the complex product: they differ
only in the rounding of a fused multiply-add).  :func:`complex_as_pairs` rewrites the graph handed to the ONNX
lowering so: ``view_as_complex`` becomes its real input, each product by a complex constant the formula above, and
``view_as_real`` its complex input, as pairs.  Where a complex value reaches anything else (``z.abs()``, an FFT, a
graph output), it leaves the graph as it is, and the fallback refuses those calls by name as before.
"""

from __future__ import annotations

import operator
from typing import Any

import torch

from repalgebra.frontend.calls import Buf, FnCall, In, held_value
from repalgebra.ir import Graph, Node, Value

_AS_COMPLEX = (torch.view_as_complex, torch.ops.aten.view_as_complex.default)
_AS_REAL = (torch.view_as_real, torch.ops.aten.view_as_real.default)
_MUL = (operator.mul, torch.mul, torch.ops.aten.mul.Tensor, "mul", "__mul__", "__rmul__")


def complex_as_pairs(graph: Graph) -> Graph:
    """``graph`` with its products of complex values by complex constants written as real arithmetic on pairs
    (see the module docstring); ``graph`` itself where it has none, or where a complex value goes elsewhere."""
    pairs: dict[int, Value] = {}  # a complex value of the graph -> the real pairs standing for it
    renamed: dict[int, Value] = {}  # a real value of the graph -> the value standing for it in the new one
    nodes: list[Node] = []
    for n in graph.nodes:
        called = _call(n)
        if not any(id(v) in pairs for v in n.inputs) and (called is None or called[0] not in _AS_COMPLEX):
            inputs = tuple(renamed.get(id(v), v) for v in n.inputs)
            nodes.append(n if inputs == n.inputs else n.replace(inputs=inputs))
            renamed[id(n.out)] = nodes[-1].out
            continue
        if called is None:
            return graph  # a complex value reaches an op this pass does not write as pairs
        target, template = called
        if target in _AS_COMPLEX:
            x = renamed.get(id(n.x), n.x)
            if template != ((In(0),), {}) or x.dtype not in (torch.float32, torch.float64):
                return graph
            pairs[id(n.out)] = x
        elif target in _AS_REAL and template == ((In(0),), {}):
            renamed[id(n.out)] = pairs[id(n.x)]
        elif target in _MUL and (c := _complex_factor(n, template)) is not None:
            if torch.promote_types(c.real.dtype, pairs[id(n.x)].dtype) != pairs[id(n.x)].dtype:
                return graph  # a complex128 constant makes the product complex128: not written in float32 pairs
            product = _times(pairs[id(n.x)], c, n.source)
            nodes += product
            pairs[id(n.out)] = product[-1].out
        else:
            return graph
    if not pairs or any(id(o) in pairs for o in graph.outputs):
        return graph
    return Graph(graph.inputs, nodes, [renamed.get(id(o), o) for o in graph.outputs])


def _call(n: Node) -> tuple[Any, tuple] | None:
    """``(target, (args template, kwargs template))`` of a carried call of one tensor, else None."""
    fn = n.attrs.get("fn") if n.op == "opaque" else None
    if not isinstance(fn, FnCall) or fn.kind == "call_module" or len(n.inputs) != 1 or n.attrs.get("kwargs"):
        return None
    return fn.target, (tuple(fn.args_template), dict(fn.kwargs_template))


def _complex_factor(n: Node, template: tuple) -> torch.Tensor | None:
    """The complex constant a carried product ``z * c`` (or ``c * z``) multiplies its complex input by, else None."""
    args, kwargs = template
    if kwargs or len(args) != 2 or In(0) not in args:
        return None
    other = args[1 - args.index(In(0))]
    fn = n.attrs["fn"]
    if not isinstance(other, Buf) or other.name not in fn.complex_consts:
        return None
    return held_value(fn, other.name).detach()


def _times(x: Value, c: torch.Tensor, source: str) -> list[Node]:
    """Nodes computing ``x * [c_r, c_r] + swap(x) * [-c_i, c_i]`` on the pairs ``x`` (last axis 2)."""
    last = len(x.shape) - 1
    re, im = c.real.to(x.dtype), c.imag.to(x.dtype)
    same, crossed = torch.stack([re, re], -1), torch.stack([-im, im], -1)
    lo = Node.make("slice", [x], {"axis": last, "start": 0, "end": 1}, source=source)
    hi = Node.make("slice", [x], {"axis": last, "start": 1, "end": 2}, source=source)
    swapped = Node.make("concat", [hi.out, lo.out], {"axis": last}, source=source)
    k_same = Node.make("constant", [], {"dtype": x.dtype}, {"value": same}, source)
    k_crossed = Node.make("constant", [], {"dtype": x.dtype}, {"value": crossed}, source)
    p_same = Node.make("mul", [x, k_same.out], source=source)
    p_crossed = Node.make("mul", [swapped.out, k_crossed.out], source=source)
    return [lo, hi, swapped, k_same, k_crossed, p_same, p_crossed, Node.make("add", [p_same.out, p_crossed.out], source=source)]
