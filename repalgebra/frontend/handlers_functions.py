"""Handlers for functions and methods (``F.conv2d``, ``torch.cat``, ``x.view``, ``a + b``, ...): each maps a call to one op.

A handler gets ``(builder, fx node, target, args, kwargs)`` and returns
``(op, inputs, attrs, params, source)``, or None to leave the call opaque
(see :mod:`repalgebra.frontend.builder`).  Weights read with ``get_attr``
arrive as :class:`~repalgebra.frontend.builder.Const`; sizes read from shapes
as :class:`~repalgebra.frontend.calls.SymExpr`.  The table
:data:`FUNCTION_HANDLERS` at the bottom is keyed by the function, or by
``("method", name)`` for a method call.
"""

from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import fx

from repalgebra.frontend.args import (
    adaptive_pool, as_value, avg_pool, bind, bn_params, channel_axis, concat_made, constant, conv3d_attrs,
    conv_padding, elu_made, global_mean, im2col, interpolate, ints, is_int, leaky_relu_made, max_pool, pad_nd,
    population_variance, prelu_made, REQ, scalar_axis, shaped, single, transposed_conv_attrs, unsqueezed,
    vector_norm,
)
from repalgebra.frontend.builder import Builder, Const, Made
from repalgebra.frontend.calls import FnCall, In, SymExpr
from repalgebra.frontend.inplace import after_call, setitem_copy
from repalgebra.frontend.shapes import size_base
from repalgebra.ir import Value, upstream
from repalgebra.ops import chunk_piece, split_piece

# --------------------------------------------------------------------------- arithmetic


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _broadcasts(x: Value, y: Value) -> bool:
    try:
        torch.broadcast_shapes(x.shape, y.shape)
    except RuntimeError:
        return False
    return True


def _f_join(op: str) -> Callable[..., Made]:
    """``a + b`` / ``a - b``: of two activations of one shape ``add``/``sub``, of other shapes
    ``broadcast_add``/``broadcast_sub``; with a constant or a number ``add_const``; adding 0 is the identity."""

    def handler(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
        if kwargs or len(args) != 2:
            return None
        zero = [_is_num(a) and a == 0 for a in args]
        if zero[1] or (zero[0] and op == "add"):  # x + 0, 0 + x, x - 0 (an accumulator started at 0)
            x = shaped(args[1] if zero[0] else args[0])
            return None if x is None else ("identity", [x], {}, {}, "")
        consts = [constant(a) for a in args]
        x, y = shaped(args[0]), shaped(args[1])
        made = None
        if x is not None and consts[0] is None:  # x + c, x - c
            made = add_const(x, args[1], negate_const=op == "sub", negate_x=False)
        elif y is not None and consts[1] is None:  # c + y, c - y
            made = add_const(y, args[0], negate_const=False, negate_x=op == "sub")
        if made is not None or x is None or y is None:
            return made
        if x.shape == y.shape:
            return op, [x, y], {}, {}, ""
        return ("broadcast_" + op, [x, y], {}, {}, "") if _broadcasts(x, y) else None

    return handler


def add_const(x: Value, c: Any, negate_const: bool, negate_x: bool) -> Made:
    """``(-)x + (-)c`` for a number or a constant tensor ``c`` that does not widen ``x`` (``add_const``)."""
    if not x.dtype.is_floating_point:
        return None
    cc = constant(c)
    trainable = cc is not None and cc.trainable
    if _is_num(c):
        t, source = torch.tensor(float(c), dtype=torch.float64), ""
    elif cc is not None and cc.tensor.is_floating_point():
        t, source = cc.tensor, cc.path
        try:
            if torch.broadcast_shapes(t.shape, x.shape) != x.shape:
                return None
        except RuntimeError:
            return None
    else:
        return None
    return "add_const", [x], {"sign": -1.0 if negate_x else 1.0, "_trainable": trainable}, {"const": -t if negate_const else t}, source


def _f_mul(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    """``a * b``: ``mul`` of two activations; ``scale`` by a per-channel constant or a number."""
    if kwargs or len(args) != 2:
        return None
    x, c = args
    x, c = _unexpanded(x, c), _unexpanded(c, x)
    if constant(x) is not None and constant(c) is None:
        x, c = c, x
    if not isinstance(x, Value):
        x, c = c, x
    if shaped(x) is None or not x.dtype.is_floating_point:
        return None
    k = constant(c)
    made = _scale_by(x, k if k is not None else c)
    if made is None and isinstance(c, Value):
        return "mul", [x, c], {}, {}, ""
    if made is None and k is not None and k.tensor.is_floating_point() and k.tensor.dim() <= len(x.shape):
        return "mul", [x, as_value(b, c)], {}, {}, ""  # a constant map (YOLOv7's anchor grid): a constant node times x
    return made


def _unexpanded(c: Any, x: Value) -> Any:
    """``c``, or the constant ``k`` where ``c`` is ``k.expand_as(x)`` (or ``k.expand(*x.size())``): ``k * x``
    broadcasts ``k`` the same way, and a per-channel ``k`` is then a scale (SSD's L2Norm:
    ``self.weight.unsqueeze(0).unsqueeze(2).unsqueeze(3).expand_as(x) * x``)."""
    n = c.producer if isinstance(c, Value) else None
    # Its sizes read from x itself: expanded to another tensor of x's shape at the example (``k.expand_as(y) * x``),
    # the product would take y's shape where the two differ, and ``k * x`` x's (found by a review).
    if n is None or n.op not in ("expand", "expand_dyn") or len(n.inputs) < 2 or any(r is not x for r in n.inputs[1:]):
        return c
    if n.op == "expand_dyn" and n.attrs["shape"] != tuple(((0, k),) for k in range(len(x.shape))):
        return c  # x's sizes in another order (expand(x.size(0), x.size(1), x.size(3), x.size(2))), or fixed ones
    if shaped(x) is None or n.out.shape != x.shape or (k := constant(n.inputs[0])) is None:
        return c
    try:
        return n.inputs[0] if torch.broadcast_shapes(k.tensor.shape, x.shape) == x.shape else c
    except RuntimeError:
        return c


def _scale_by(x: Value, c: Any) -> Made:
    """``x * c`` for a number or a per-channel constant ``c``: a ``scale``; not where the dtype ``x`` computes in
    cannot hold ``c`` (``y * 1e5`` or ``y / 1e-5`` in float16: torch multiplies by the number in float32, and the
    product may still fit; as a float16 weight it is Inf), which stays the call the model makes."""
    number = c.tensor if isinstance(c, Const) else c if isinstance(c, (int, float)) and not isinstance(c, bool) else None
    if number is not None and not _holds(torch.as_tensor(number, dtype=torch.float64), x.dtype):
        return None
    if isinstance(c, Const) and c.tensor.is_floating_point():
        shape = tuple(c.tensor.shape)
        if c.tensor.numel() == 1 and len(shape) <= len(x.shape):
            axis = scalar_axis(x.shape)
            vec = c.tensor.reshape(()).expand(x.shape[axis]).clone()
        else:
            axis = channel_axis(shape, x.shape)
            vec = None if axis is None else c.tensor.reshape(-1)
        if axis is None or len(shape) > len(x.shape):
            return None
        return "scale", [x], {"axis": axis}, {"scale": vec}, c.path
    if isinstance(c, (int, float)) and not isinstance(c, bool) and len(x.shape) >= 1:
        if c == 1 and x.dtype is not None and x.dtype.is_floating_point:  # Conformer's residual factors of 1.0
            return "identity", [x], {}, {}, ""
        axis = scalar_axis(x.shape)
        return "scale", [x], {"axis": axis}, {"scale": torch.full((x.shape[axis],), float(c), dtype=x.dtype)}, ""
    return None


def _holds(t: torch.Tensor, dtype: torch.dtype | None) -> bool:
    """Whether ``dtype`` holds each number of ``t`` as a finite number, and a nonzero one above its subnormals."""
    if dtype is None or not dtype.is_floating_point or not t.is_floating_point():
        return True
    info, size = torch.finfo(dtype), t.abs()
    return bool(((size <= info.max) & ((size >= info.tiny) | (size == 0))).all()) and not bool(t.isnan().any())


def _f_neg(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    """``-x``: a ``scale`` by -1 (the same bits: both only flip the sign)."""
    if kwargs or len(args) != 1 or constant(args[0]) is not None:
        return None  # ``-self.bias`` is a constant: the builder makes the call once (``frontend/pure.py``)
    x = shaped(args[0])
    return None if x is None or not x.dtype.is_floating_point else _scale_by(x, -1.0)


def _f_div(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    """``a / b``: ``div`` of two activations; dividing by a number or a per-channel constant is a ``scale``."""
    a = bind([("input", REQ), ("other", REQ), ("rounding_mode", None)], args, kwargs)
    if a is None or a["rounding_mode"] is not None:
        return None
    x, y = shaped(a["input"]), a["other"]
    if x is None or not x.dtype.is_floating_point or constant(x) is not None:
        return None
    c = constant(y)
    made = None
    if _is_num(y) and y == 1:
        return "identity", [x], {}, {}, ""
    if _is_num(y) and y != 0:  # the reciprocal in float64, as the rewrite folds it
        made = _scale_by(x, Const(torch.tensor(1.0 / y, dtype=torch.float64), ""))
    elif c is not None and c.tensor.is_floating_point():
        made = _scale_by(x, Const(1.0 / c.tensor, c.path))
    if made is None and shaped(y) is not None and _broadcasts(x, y):
        return "div", [x, y], {}, {}, ""
    return made


def _f_pow(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    a = bind([("input", REQ), ("exponent", REQ)], args, kwargs)
    if a is None or shaped(a["input"]) is None or not _is_num(a["exponent"]) or not a["input"].dtype.is_floating_point:
        return None
    return "pow", [a["input"]], {"exponent": a["exponent"]}, {}, ""


def _f_matmul(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    if kwargs or len(args) != 2 or shaped(args[0]) is None:
        return None
    if shaped(args[1]) is None:  # ``x @ self.proj`` (CLIP's projections): a Linear whose weight is the matrix's transpose
        w = _const(args[1]) if target is not torch.bmm and target != "bmm" else None
        return None if w is None or w.dim() != 2 else ("linear", [args[0]], {}, {"weight": w.t().contiguous()}, "")
    return "matmul", list(args), {}, {}, ""


def _f_addmm(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    """``torch.addmm(self.bias, x, self.weight)``, GPT-2's ``Conv1D`` (on ``x.view(-1, nx)``): ``x @ W + b``, a Linear
    whose weight is ``W`` transposed."""
    a = bind([("input", REQ), ("mat1", REQ), ("mat2", REQ), ("beta", 1), ("alpha", 1)], args, kwargs)
    if a is not None and a["beta"] == 0:
        return _product_at_beta_0(b, n, a["mat1"], a["mat2"], a["alpha"], summed=False)
    if a is None or shaped(a["mat1"]) is None or a["beta"] != 1 or a["alpha"] != 1:
        return None
    w, bias = _const(a["mat2"]), _const(a["input"])
    if w is None or w.dim() != 2 or bias is None or bias.dim() != 1 or len(a["mat1"].shape) != 2:
        return None
    return "linear", [a["mat1"]], {}, {"weight": w.t().contiguous(), "bias": bias}, a["mat2"].path.rpartition(".")[0]


def _f_addbmm(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    """``torch.addbmm(input, b1, b2, beta=0, alpha=scale)``: the products summed over the batch (see
    :func:`_product_at_beta_0`); another ``beta`` stays the call."""
    a = bind([("input", REQ), ("batch1", REQ), ("batch2", REQ), ("beta", 1), ("alpha", 1)], args, kwargs)
    if a is None or a["beta"] != 0:
        return None
    return _product_at_beta_0(b, n, a["batch1"], a["batch2"], a["alpha"], summed=True)


def _product_at_beta_0(b: Builder, n: fx.Node, x: Any, y: Any, alpha: Any, summed: bool) -> Made:
    """``alpha (x @ y)`` (summed over axis 0 where ``summed``): ``addmm``/``addbmm`` at ``beta=0``, where torch reads
    no value of ``input`` (an uninitialised ``torch.empty``, NaN and Inf in it included), and neither does this."""
    if not _is_num(alpha) or shaped(x) is None or shaped(y) is None:
        return None
    product = b.add("matmul", [x, y], {}, {}, b.source(n))
    if summed:
        product = b.add("sum", [product], {"dims": (0,), "keepdim": False}, {}, b.source(n))
    return ("identity", [product], {}, {}, "") if alpha == 1 else _scale_by(product, alpha)


def _f_baddbmm(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    """``torch.baddbmm(input, q, k, beta=0, alpha=scale)``, diffusers' attention scores: with ``beta=0`` torch ignores
    ``input`` (an uninitialised ``torch.empty``, NaN and Inf in it included): ``alpha (q @ k)``."""
    a = bind([("input", REQ), ("batch1", REQ), ("batch2", REQ), ("beta", 1), ("alpha", 1)], args, kwargs)
    if a is None or a["beta"] != 0 or not _is_num(a["alpha"]) or shaped(a["batch1"]) is None or shaped(a["batch2"]) is None:
        return None
    scores = b.add("matmul", [a["batch1"], a["batch2"]], {}, {}, b.source(n))
    return ("identity", [scores], {}, {}, "") if a["alpha"] == 1 else _scale_by(scores, a["alpha"])


def _f_einsum(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    """``torch.einsum(eq, a, b)`` or ``torch.einsum(eq, [a, b])``; constant operands (a relative-position table) as ``constant`` nodes."""
    if kwargs or not args or not isinstance(args[0], str):
        return None
    xs = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
    if not any(shaped(x) is not None and constant(x) is None for x in xs):
        return None
    xs = [as_value(b, x) for x in xs]
    return None if any(x is None for x in xs) else ("einsum", xs, {"equation": args[0].replace(" ", "")}, {}, "")


def _f_attention(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    """``F.scaled_dot_product_attention`` without dropout, the mask (if any) an activation."""
    spec = [("query", REQ), ("key", REQ), ("value", REQ), ("attn_mask", None), ("dropout_p", 0.0), ("is_causal", False), ("scale", None), ("enable_gqa", False)]
    a = bind(spec, args, kwargs)
    if a is None or a["dropout_p"] != 0 or not isinstance(a["enable_gqa"], bool) or not isinstance(a["is_causal"], bool):
        return None
    qkv = [shaped(a[k]) for k in ("query", "key", "value")]
    mask = None if a["attn_mask"] is None else as_value(b, a["attn_mask"])  # a bias gathered from a table: a constant
    if None in qkv or (a["attn_mask"] is not None and (mask is None or a["is_causal"])):
        return None
    if a["scale"] is not None and not _is_num(a["scale"]):
        return None
    scale = None if a["scale"] is None else float(a["scale"])
    attrs = {"scale": scale, "causal": a["is_causal"], "gqa": a["enable_gqa"]}
    return "attention", qkv + ([mask] if mask is not None else []), attrs, {}, ""


# --------------------------------------------------------------------------- layout


def _f_cat(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    a = bind([("tensors", REQ), ("dim", 0)], args, kwargs)
    if a is None or not isinstance(a["tensors"], (list, tuple)) or not is_int(a["dim"]):
        return None
    if not a["tensors"] or not any(shaped(t) is not None and constant(t) is None for t in a["tensors"]):
        return None
    xs = [as_value(b, t) for t in a["tensors"]]  # a constant (a class token) as a ``constant`` node
    if any(x is None for x in xs):
        return None
    return concat_made(xs, a["dim"], "")


def _f_stack(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    """``torch.stack(ts, dim)`` as ``torch.cat([t.unsqueeze(dim) for t in ts], dim)`` (SKNet's branches): ops that
    both back ends lower, where a call would go to the ONNX fallback."""
    made = _f_cat(b, n, target, args, kwargs)
    if made is None or len({x.shape for x in made[1]}) != 1:
        return None
    axis = bind([("tensors", REQ), ("dim", 0)], args, kwargs)["dim"] % (len(made[1][0].shape) + 1)
    return "concat", [b.add(*unsqueezed(x, axis)[:4], source=b.source(n)) for x in made[1]], {"axis": axis}, {}, ""


def _f_flatten(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    a = bind([("input", REQ), ("start_dim", 0), ("end_dim", -1)], args, kwargs)
    if a is None or shaped(a["input"]) is None or not (is_int(a["start_dim"]) and is_int(a["end_dim"])):
        return None
    return "flatten", [a["input"]], {"start": a["start_dim"], "end": a["end_dim"]}, {}, ""


def _dims_arg(args: tuple, kwargs: dict, *names: str) -> tuple[Value | None, tuple[int, ...] | None]:
    """``x.f(1, 2, 3)``, ``x.f((1, 2, 3))`` or ``torch.f(x, dims)``: the input and the int tuple."""
    if not args:
        return None, None
    x, rest = shaped(args[0]), args[1:]
    for k in names:
        if k in kwargs:
            rest = (kwargs[k],) + rest
    if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
        rest = tuple(rest[0])
    if set(kwargs) - set(names):
        return None, None
    return x, ints(rest)


def _f_reshape(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    """``x.reshape(...)``/``x.view(...)``: ``reshape`` for constant sizes, ``reshape_dyn`` for sizes read from shapes."""
    if not args or shaped(args[0]) is None or set(kwargs) - {"shape", "size"}:
        return None
    x, rest = args[0], args[1:] + tuple(kwargs.values())
    if len(rest) == 1 and isinstance(rest[0], (tuple, list, SymExpr)):
        rest = _shape_items(rest[0])
    if not rest:
        return None
    if all(is_int(e) for e in rest):
        return "reshape", [x], {"shape": tuple(rest)}, {}, ""
    dyn = _dyn_sizes(rest)
    return None if dyn is None else ("reshape_dyn", [x, *dyn[0]], {"shape": dyn[1]}, {}, "")


def _shape_items(e: Any) -> tuple | None:
    """The sizes of a shape written as a whole, one item each: a tuple, ``v.shape`` or ``v.size()``, a slice of one,
    and sums of these (GPT-2's ``x.size()[:-1] + (self.nf,)``); None for anything else."""
    if isinstance(e, (tuple, list)):
        return tuple(e)
    if not isinstance(e, SymExpr):
        return None
    if (v := _shape_of(e)) is not None:
        return tuple(SymExpr("call_function", operator.getitem, (e, k), {}) for k in range(len(v.shape)))
    if e.target is operator.getitem and len(e.args) == 2 and isinstance(e.args[1], slice) and isinstance(e.args[0], SymExpr):
        whole, cut = _shape_items(e.args[0]), e.args[1]
        if whole is None or not all(k is None or is_int(k) for k in (cut.start, cut.stop, cut.step)):
            return None
        return whole[cut]
    if e.target is operator.add and len(e.args) == 2 and not e.kwargs:
        left, right = _shape_items(e.args[0]), _shape_items(e.args[1])
        return None if left is None or right is None else left + right
    return None


def _dyn_sizes(sizes: tuple) -> tuple[list[Value], tuple] | None:
    """Sizes read from shapes (``B, C, H, W = y.shape``; ``B * H``) as ``reshape_dyn``/``expand_dyn`` refs and entries."""
    refs: list[Value] = []
    entries = []
    for e in sizes:
        factors = _size_factors(e)
        if factors is None:
            return None
        entry = []
        for f in factors:
            if isinstance(f, tuple):
                v, axis, *divisor = f
                if not any(r is v for r in refs):
                    refs.append(v)
                f = (next(k for k, r in enumerate(refs) if r is v), axis % len(v.shape), *divisor)
            entry.append(f)
        entries.append(entry[0] if len(entry) == 1 and is_int(entry[0]) else tuple(entry))
    return refs, tuple(entries)


def _shape_of(e: SymExpr) -> Value | None:
    """``v`` where ``e`` is ``v.shape`` or ``v.size()``."""
    if e.target is getattr and e.args[1:] == ("shape",) and shaped(e.args[0]) is not None:
        return e.args[0]
    if e.target == "size" and len(e.args) == 1 and not e.kwargs and shaped(e.args[0]) is not None:
        return e.args[0]
    return None


def _size_factors(e: Any) -> list | None:
    """A size as a product of ints and ``(value, axis)`` sizes read from shapes, or of ``(value, axis, d)``, one
    of those divided by a positive int (``H // ws``), or None."""
    if is_int(e):
        return [e]
    if not isinstance(e, SymExpr):
        return None
    t, a = e.target, e.args
    if t is operator.getitem and len(a) == 2 and is_int(a[1]) and isinstance(a[0], SymExpr):
        inner = a[0]
        if (v := _shape_of(inner)) is not None:
            return [(v, a[1])]
        # ``bs, L = h.shape[:2]`` (T5's attention): an item of a slice of the shape
        if inner.target is operator.getitem and len(inner.args) == 2 and isinstance(inner.args[1], slice):
            v = _shape_of(inner.args[0]) if isinstance(inner.args[0], SymExpr) else None
            axes = range(len(v.shape))[inner.args[1]] if v is not None and all(
                x is None or is_int(x) for x in (inner.args[1].start, inner.args[1].stop, inner.args[1].step)) else range(0)
            if -len(axes) <= a[1] < len(axes):
                return [(v, axes[a[1]])]
    if t == "size" and len(a) == 2 and is_int(a[1]) and not e.kwargs and shaped(a[0]) is not None:
        return [(a[0], a[1])]
    if t is operator.mul and len(a) == 2 and not e.kwargs:
        left, right = _size_factors(a[0]), _size_factors(a[1])
        return None if left is None or right is None else left + right
    if t is operator.floordiv and len(a) == 2 and not e.kwargs and is_int(a[1]) and a[1] > 0:
        if (read := _one_read(_size_factors(a[0]))) is not None:
            return [(*read, int(a[1]))]
    return None


def _f_reshape_as(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    if kwargs or len(args) != 2 or shaped(args[0]) is None or shaped(args[1]) is None:
        return None
    shape = tuple(((0, k),) for k in range(len(args[1].shape)))
    return "reshape_dyn", list(args), {"shape": shape}, {}, ""


def _f_getitem(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    """``x[i]``, ``x[:, :c]``, ``x[..., 0]``, ``x[:, None]``: select, slice and unsqueeze, one op per axis;
    ``parts[i]`` of ``parts = x.chunk(...)``/``x.split(...)``/``x.unbind(...)``: that part (see :func:`_part`)."""
    if kwargs or len(args) != 2:
        return None
    x, index = args
    if isinstance(x, Value) and x.shape is None:
        return _part(x, index, _indices_read(n))
    if shaped(x) is None or constant(x) is not None:  # indexing a constant stays a constant (see args.constant)
        return None
    steps = _index_steps(_sized_stops(index, x), len(x.shape))
    if steps is None:
        return None
    if not steps:
        return "identity", [x], {}, {}, ""
    for op, attrs in steps[:-1]:
        made = _step(x, op, attrs)
        x = b.add(made[0], made[1], made[2], {}, b.source(n))
    return _step(x, *steps[-1])


def _f_values(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    """``torch.max(x, dim).values``: the first field of a tuple-valued call's result (see :func:`_part`); ``x.data``:
    ``x`` (:func:`_f_detached`)."""
    if not kwargs and args[1:] == ("data",):
        return _f_detached(b, n, target, args[:1], {})
    if kwargs or args[1:] != ("values",) or not isinstance(args[0], Value) or args[0].shape is not None:
        return None
    return _part(args[0], 0)


def _f_detached(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    """``x.detach()``, ``x.data`` (older code's ``torch.cat([out.data, zero_pads], 1)``): the same values.  The fused
    graph computes the forward; where gradients stop is the training graph's (torch.export's capture takes
    ``aten.detach`` for the identity too).  Kept as a call, ``.data`` became a constant of the example in an ONNX
    file, and a size read through it kept a BatchNorm from folding."""
    a = bind([("input", REQ)], args, kwargs)
    return None if a is None or shaped(a["input"]) is None else ("identity", [a["input"]], {}, {}, "")


def _sized_stops(index: Any, x: Value) -> Any:
    """``index`` with a slice that ends at another value's size (WaveNet's causal crop ``y[:, :, :x.size(-1)]`` of
    a conv padded on both sides) ending at a number instead, where that size is ``x``'s along the axis less a
    constant at every input size (:func:`~repalgebra.frontend.shapes.size_base`): ``y[:, :, :-pad]``."""
    items = list(index) if isinstance(index, tuple) else [index]
    axis, out = 0, []
    for it in items:
        if it is Ellipsis:
            axis = len(x.shape) - sum(i is not None and i is not Ellipsis for i in items[items.index(it) + 1 :])
        elif isinstance(it, slice) and (read := _one_read(_size_factors(it.stop))) is not None and it.step in (None, 1):
            (u, a, c), (w, b, d) = size_base(x, axis), size_base(*read)
            if u is not None and u is w and a == b:  # x.shape[axis] == that size + (c - d), at every size
                it = slice(it.start, -(c - d) if c > d else None, it.step)
        out.append(it)
        axis += it is not None and it is not Ellipsis
    return tuple(out) if isinstance(index, tuple) else out[0]


def _index_steps(index: Any, rank: int) -> list[tuple[str, dict]] | None:
    """Basic indexing (ints, slices with int bounds, None, one ``...``) as ``select``/``slice``/``unsqueeze`` steps."""
    items = list(index) if isinstance(index, tuple) else [index]
    ok = lambda it: it is None or it is Ellipsis or is_int(it) or (  # noqa: E731
        isinstance(it, slice) and all(v is None or is_int(v) for v in (it.start, it.stop, it.step)) and (it.step is None or it.step > 0)
    )
    if not all(ok(it) for it in items) or sum(it is Ellipsis for it in items) > 1:
        return None
    consumed = sum(it is not None and it is not Ellipsis for it in items)
    if consumed > rank:
        return None
    if any(it is Ellipsis for it in items):
        k = next(k for k, it in enumerate(items) if it is Ellipsis)
        items[k : k + 1] = [slice(None)] * (rank - consumed)
    steps: list[tuple[str, dict]] = []
    axis = 0  # in the value built so far
    for it in items:
        if it is None:
            steps.append(("unsqueeze", {"axis": axis}))
            axis += 1
        elif is_int(it):
            steps.append(("select", {"axis": axis, "index": it}))
        else:
            start, step = it.start or 0, it.step or 1
            if (start, it.stop, step) != (0, None, 1):
                steps.append(("slice", {"axis": axis, "start": start, "end": it.stop, "step": step}))
            axis += 1
    return steps


def _step(x: Value, op: str, attrs: dict) -> Made:
    return unsqueezed(x, attrs["axis"]) if op == "unsqueeze" else (op, [x], attrs, {}, "")


def _f_unsqueeze(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    a = bind([("input", REQ), ("dim", REQ)], args, kwargs)
    if a is None or shaped(a["input"]) is None or not is_int(a["dim"]) or constant(a["input"]) is not None:
        return None
    return unsqueezed(a["input"], a["dim"] % (len(a["input"].shape) + 1))


def _f_squeeze(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    """``x.squeeze(dim)`` with an int ``dim`` of an axis of size 1: a reshape that reads the other sizes at run time
    (it fails where that axis is not 1).  Of an axis not 1 here, it is no op at this size but drops the axis at a
    size of 1 (a batch of one): carried (:func:`~repalgebra.frontend.builder.Builder.opaque` checks its rank)."""
    a = bind([("input", REQ), ("dim", REQ)], args, kwargs)
    if a is None or shaped(a["input"]) is None or not is_int(a["dim"]) or not a["input"].shape or constant(a["input"]) is not None:
        return None
    x = a["input"]
    axis = a["dim"] % len(x.shape)
    if x.shape[axis] != 1:
        return None
    shape = tuple(((0, k),) for k in range(len(x.shape)) if k != axis)
    return "reshape_dyn", [x, x], {"shape": shape}, {}, ""


# One result of a call that returns several tensors, read as ``parts[i]``: the call is carried as one
# tuple-valued opaque node (no shape), and each read of a result becomes an op on the call's input.
_SPLITS = {
    ("call_method", "chunk"): "chunk",
    ("call_function", torch.chunk): "chunk",
    ("call_method", "split"): "split",
    ("call_function", torch.split): "split",
    ("call_method", "unbind"): "unbind",
    ("call_function", torch.unbind): "unbind",
}
_SIZE_NAMES = ("chunks", "split_size", "split_size_or_sections")


_MAX_DIM = {("call_function", torch.max), ("call_method", "max")}


def _max_values(fn: FnCall, x: Value | None, index: Any) -> Made:
    """``torch.max(x, dim)[0]`` (or ``x.max(dim)[0]``): the values, ``amax`` over ``dim`` (PointNet's pooling over
    points); the indices (``[1]``) stay a call."""
    a = bind([("input", REQ), ("dim", REQ), ("keepdim", False)], fn.args_template, fn.kwargs_template)
    if a is None or a["input"] != In(0) or x is None or index != 0 or not is_int(a["dim"]) or not isinstance(a["keepdim"], bool):
        return None
    return "amax", [x], {"dims": (a["dim"] % len(x.shape),), "keepdim": a["keepdim"]}, {}, ""


def _indices_read(n: fx.Node) -> set[int] | None:
    """The indices that the graph reads of the tuple ``n`` (``parts[i]``) takes an item of, where ``parts[k]`` with a
    number ``k`` is all it reads; None where it reads the tuple otherwise (returned whole, unpacked into a call)."""
    parts = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
    if parts is None:
        return None
    read = set()
    for u in parts.users:
        if not (u.op == "call_function" and u.target is operator.getitem and len(u.args) == 2 and is_int(u.args[1])):
            return None
        read.add(u.args[1])
    return read


def _part(parts: Value, index: Any, read: set[int] | None = None) -> Made:
    """``parts[index]`` of ``parts = x.chunk(n, dim)`` (``chunk``), ``x.split(s, dim)`` (``slice``), ``x.unbind(dim)`` (``select``).

    How many parts a split or unbind gives follows the size of the axis: a part counted from the end, the last
    one, and so each of a tuple returned or unpacked whole, check on every call that there are as many parts as
    at the trace (a ``piece`` op, see :func:`_piece_of`), unless it is the same part at every size
    (:func:`_from_end`).  The tuple-valued node is then read by nothing and is dropped with the dead nodes.
    ``read``: the indices the graph reads of the parts (None: it reads them otherwise, or is not known); the last
    part counts where every part is read (``a, b = x.split(2, 2)``), not where one alone is (``parts[1]`` of two
    at the example is rows 2:4 at every size with more rows, which the model computes: it was refused; a review).
    """
    n = parts.producer
    if n is None or n.op != "opaque" or not is_int(index) or len(n.inputs) != 1 or not isinstance(n.attrs["fn"], FnCall):
        return None
    fn = n.attrs["fn"]
    try:
        kind = _SPLITS.get((fn.kind, fn.target))
        if (fn.kind, fn.target) in _MAX_DIM:
            return _max_values(fn, shaped(n.inputs[0]), index)
    except TypeError:  # an unhashable target
        return None
    kwargs = {("size" if k in _SIZE_NAMES else k): v for k, v in fn.kwargs_template.items()}
    spec = [("input", REQ), ("dim", 0)] if kind == "unbind" else [("input", REQ), ("size", REQ), ("dim", 0)]
    a = bind(spec, fn.args_template, kwargs) if kind is not None else None
    x = shaped(n.inputs[0])
    if a is None or a["input"] != In(0) or x is None or not is_int(a["dim"]):
        return None
    axis, size = a["dim"] % len(x.shape), a.get("size")
    length = x.shape[axis]
    sizes = ints(size) if kind == "split" and isinstance(size, (list, tuple)) else None
    if kind != "unbind" and sizes is None and not (is_int(size) and size > 0):
        return None
    if kind == "unbind":
        count = length
    elif sizes is not None:
        count = len(sizes)
    elif kind == "split":
        count = -(-length // size)
    else:  # chunk: parts of ceil(length / chunks)
        count = -(-length // -(-length // size))
    if index < 0 and (kind == "unbind" or (kind, size, index) == ("split", 1, -1)):  # parts[-1]: at every size
        return _from_end(kind, x, axis, index)
    whole = read is None or set(range(count)) <= read  # (returned, unpacked: every part read)
    counted = index < 0 or (index == count - 1 and whole)  # parts[-1], or the last of all the parts
    index = index + count if index < 0 else index
    if not 0 <= index < count:
        return None
    if sizes is not None:  # split([a, b]): as many parts at every size (torch refuses others)
        start = sum(sizes[:index])
        return "slice", [x], {"axis": axis, "start": start, "end": start + sizes[index], "step": 1}, {}, ""
    return _piece_of(kind, x, size, axis, index, count if counted else None)


def _from_end(kind: str, x: Value, axis: int, index: int) -> Made:
    """``x.unbind(axis)[index]`` (``index < 0``) is ``x.select(axis, index)``, and ``x.split(1, axis)[-1]`` is
    ``x[..., -1:]``, at every size of the axis (a GRU's last step, ``out.unbind(1)[-1]``)."""
    if kind == "unbind":
        return "select", [x], {"axis": axis, "index": index}, {}, ""
    return "slice", [x], {"axis": axis, "start": -1, "end": None, "step": 1}, {}, ""


def _piece_of(kind: str, x: Value, size: int | None, axis: int, index: int, count: int | None) -> Made:
    """Part ``index`` of ``x.unbind(axis)``, ``x.split(size, axis)`` or ``x.chunk(size, axis)``, whose number of parts
    follows the size of the axis.  Where the model counted them (``count``: the traced number), a ``piece`` op checks
    it on every call.  Else the part only has to exist: a ``select`` raises where it does not, a ``chunk`` too (it
    checks), and a ``slice`` of the first part always finds it; a later part of a split is a ``piece`` that checks."""
    if count is None and kind == "unbind":
        return "select", [x], {"axis": axis, "index": index}, {}, ""
    if (count is None or count == size) and kind == "chunk":  # (x.chunk(n) gives n parts at most)
        return "chunk", [x], {"chunks": size, "index": index, "axis": axis}, {}, ""
    if count is None and index == 0:
        return "slice", [x], {"axis": axis, "start": 0, "end": size, "step": 1}, {}, ""
    return "piece", [x], {"how": kind, "size": None if kind == "unbind" else size, "index": index, "axis": axis, "count": count}, {}, ""


def _f_chunk_piece(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    """:func:`~repalgebra.ops.chunk_piece` in a fused module traced again: the ``chunk`` op it lowers."""
    a = bind([("x", REQ), ("chunks", REQ), ("axis", REQ), ("index", REQ)], args, kwargs)
    if a is None or shaped(a["x"]) is None or not all(is_int(a[k]) for k in ("chunks", "axis", "index")):
        return None
    return "chunk", [a["x"]], {"chunks": a["chunks"], "index": a["index"], "axis": a["axis"]}, {}, ""


def _f_split_piece(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    """:func:`~repalgebra.ops.split_piece` in a fused module traced again: the ``piece`` op it lowers."""
    a = bind([("x", REQ), ("how", REQ), ("size", REQ), ("axis", REQ), ("index", REQ), ("count", REQ)], args, kwargs)
    if a is None or shaped(a["x"]) is None or not all(is_int(a[k]) for k in ("axis", "index")):
        return None
    attrs = {k: a[k] for k in ("how", "size", "index", "axis", "count")}
    return "piece", [a["x"]], attrs, {}, ""


def _f_select(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    a = bind([("input", REQ), ("dim", REQ), ("index", REQ)], args, kwargs)
    if a is None or shaped(a["input"]) is None or not (is_int(a["dim"]) and is_int(a["index"])):
        return None
    return "select", [a["input"]], {"axis": a["dim"], "index": a["index"]}, {}, ""


def _f_permute(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    x, dims = _dims_arg(args, kwargs, "dims")
    return None if x is None or dims is None else ("permute", [x], {"dims": dims}, {}, "")


def _f_transpose(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    a = bind([("input", REQ), ("dim0", REQ), ("dim1", REQ)], args, kwargs)
    if a is None or shaped(a["input"]) is None or not (is_int(a["dim0"]) and is_int(a["dim1"])):
        return None
    return "transpose", [a["input"]], {"dim0": a["dim0"], "dim1": a["dim1"]}, {}, ""


def _f_same_values(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    """``x.clone()`` (FasterNet's ``x = x.clone()`` before writing a slice of it: the front end has made the write a
    new value already): the same values, in ``x``'s layout.  ``x.contiguous()``, or a clone to a memory format: the
    same values, laid out densely (a ``contiguous`` op, kept where a layout is read: ``layout_reads``)."""
    dense = target == "contiguous" or target is torch.Tensor.contiguous
    a = bind([("input", REQ), ("memory_format", torch.contiguous_format if dense else torch.preserve_format)], args, kwargs)
    if a is None or shaped(a["input"]) is None or not isinstance(a["memory_format"], torch.memory_format):
        return None
    if a["memory_format"] == torch.preserve_format:
        return "identity", [a["input"]], {}, {}, ""
    return "contiguous", [a["input"]], {"memory_format": a["memory_format"]}, {}, ""


def _f_to_dtype_of(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    """``x.to(t.dtype)`` where ``t``, a weight of the model or a value it computed, has ``x``'s dtype: the identity.

    PEFT's LoRA layer casts its input to the adapter's weight dtype and the sum back to the base output's dtype.
    Cast as a whole (``model.double()``), the model changes both dtypes alike, so the two stay equal and the call
    stays a no-op.  Not a dtype written in the code (``x.to(torch.float32)``, which a cast of the model does not
    change), nor the dtype of an input (a caller may pass another dtype than the model's), nor a cast of an input
    or of what follows its dtype (HF's ``pixel_values.to(self.patch_embedding.weight.dtype)``: a float64 batch into a
    float32 model; an NHWC batch permuted first), nor
    a cast of a value computed from a cast the code writes (LLaMA's ``softmax(s, dtype=torch.float32).to(q.dtype)``:
    float32 whatever the model is cast to, where ``q`` follows the model)."""
    x = shaped(args[0]) if len(args) == 2 and not kwargs else None
    if x is not None and (_of_an_input_dtype(x) or _from_a_written_cast(x)):  # the input's dtype is the caller's
        return None
    src = n.args[1] if x is not None else None
    if not (isinstance(src, fx.Node) and src.op == "call_function" and src.target is getattr and src.args[1:] == ("dtype",)):
        return None
    of = src.args[0]
    if not isinstance(of, fx.Node) or of.op == "placeholder":
        return None
    t = b.env.get(of)
    dtype = t.tensor.dtype if isinstance(t, Const) else t.dtype if isinstance(t, Value) else None
    return ("identity", [x], {}, {}, "") if dtype is not None and dtype == x.dtype else None


_WEIGHTED = frozenset({"conv1d", "conv2d", "conv3d", "conv_transpose2d", "conv_transpose3d", "linear"})  # their output has their weight's dtype


def _of_an_input_dtype(v: Value) -> bool:
    """Whether ``v``'s dtype may be an input's, the caller's: ``v`` is reached from an input through ops other than a
    cast or a weighted layer (a conv runs in its weight's dtype, or fails); ``x.permute(0, 3, 1, 2)`` of an NHWC
    batch is the batch's dtype, a float64 or uint8 one too."""
    return any(u.producer is None for u in upstream(v, lambda n: () if n.op in _WEIGHTED or n.op == "cast" else n.inputs))


def _from_a_written_cast(v: Value) -> bool:
    """Whether ``v`` is computed, along first inputs, from a ``cast`` to a dtype written in the code."""
    return any(u.producer is not None and u.producer.op == "cast" for u in upstream(v, lambda n: n.inputs[:1]))


_CAST_METHODS = {"float": torch.float32, "double": torch.float64, "half": torch.float16, "bfloat16": torch.bfloat16}


def _f_cast(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    """``x.float()``, ``x.to(torch.float32)``, ``x.to(dtype=...)``, ``x.type(torch.float32)``: a ``cast`` to the dtype
    the code writes (a speech model's ``mask.float()``); ``x.to(w.dtype)`` is :func:`_f_to_dtype_of`'s.  A call that
    also moves the tensor, or copies it to another memory format, stays a call."""
    x = shaped(args[0]) if args else None
    if x is None:
        return None
    if target in _CAST_METHODS:
        dtype = _CAST_METHODS[target] if len(args) == 1 and not kwargs else None
    elif target == "to":
        made = _f_to_dtype_of(b, n, target, args, kwargs)
        if made is not None:
            return made
        rest = list(args[1:]) + ([kwargs["dtype"]] if set(kwargs) == {"dtype"} else [] if not kwargs else [None])
        dtype = rest[0] if len(rest) == 1 else None
    else:  # type
        dtype = args[1] if len(args) == 2 and not kwargs else None
    return ("cast", [x], {"dtype": dtype}, {}, "") if isinstance(dtype, torch.dtype) else None


# --------------------------------------------------------------------------- reductions and activations


def _f_mean(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    a = bind([("input", REQ), ("dim", None), ("keepdim", False)], args, kwargs)
    if a is None or shaped(a["input"]) is None or not isinstance(a["keepdim"], bool):
        return None
    dims = (a["dim"],) if is_int(a["dim"]) else ints(a["dim"])
    return None if not dims else ("mean", [a["input"]], {"dims": dims, "keepdim": a["keepdim"]}, {}, "")


def _f_var(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    """``x.var(dim, unbiased=False, keepdim=...)``, ``torch.var(x, dim, correction=0)``: see :func:`population_variance`."""
    kwargs = dict(kwargs)
    correction = kwargs.pop("correction", None)
    a = bind([("input", REQ), ("dim", None), ("unbiased", True), ("keepdim", False)], args, kwargs)
    if a is None or shaped(a["input"]) is None or not isinstance(a["unbiased"], bool) or (correction is not None and "unbiased" in kwargs):
        return None
    correction = (0 if a["unbiased"] is False else 1) if correction is None else correction
    add = lambda op, inputs, attrs: b.add(op, inputs, attrs, {}, b.source(n))  # noqa: E731
    return population_variance(add, a["input"], a["dim"], correction, a["keepdim"])


def _f_softmax(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    """``F.softmax`` and ``F.log_softmax`` (their methods and ``torch.`` functions) along one axis; with ``dtype``
    (LLaMA's ``softmax(scores, dim=-1, dtype=torch.float32)``), of the input cast to it first, as torch computes it."""
    functional = target in (F.softmax, F.log_softmax)  # (their third argument is _stacklevel; torch's and methods' is dtype)
    a = bind([("input", REQ), ("dim", None), *([("_stacklevel", 3)] if functional else []), ("dtype", None)], args, kwargs)
    if a is None or shaped(a["input"]) is None or not is_int(a["dim"]) or not (a["dtype"] is None or isinstance(a["dtype"], torch.dtype)):
        return None
    x = a["input"] if a["dtype"] is None else b.add("cast", [a["input"]], {"dtype": a["dtype"]}, {}, b.source(n))
    op = "log_softmax" if target in (F.log_softmax, torch.log_softmax, "log_softmax") else "softmax"  # a method: its name
    return op, [x], {"axis": a["dim"]}, {}, ""


def _f_glu(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    a = bind([("input", REQ), ("dim", -1)], args, kwargs)
    if a is None or shaped(a["input"]) is None or not is_int(a["dim"]):
        return None
    return "glu", [a["input"]], {"axis": a["dim"]}, {}, ""


def _f_unary(op: str, *extra: tuple[str, Any]) -> Callable[..., Made]:
    """A one-input op; ``extra`` are further arguments (``inplace`` is dropped: the front end functionalizes it)."""

    def handler(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
        a = bind([("input", REQ), *extra], args, kwargs)
        if a is None or shaped(a["input"]) is None:
            return None
        attrs = {"approximate": a["approximate"]} if op == "gelu" else {}
        return op, [a["input"]], attrs, {}, ""

    return handler


def _f_clamp(lo_name: str | None = "min", hi_name: str | None = "max", lo: Any = None, hi: Any = None) -> Callable[..., Made]:
    """``clamp`` with number bounds: ``torch.clamp(x, min, max)``/``x.clip(...)``, ``F.hardtanh(x, min_val, max_val)``,
    ``F.relu6(x)`` (bounds ``lo``, ``hi`` when the function has no arguments for them)."""

    def handler(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
        bounds = [(lo_name, lo), (hi_name, hi)] if lo_name else []
        a = bind([("input", REQ), *bounds, ("inplace", False)], args, kwargs)
        if a is None or shaped(a["input"]) is None:
            return None
        low, high = (a[lo_name], a[hi_name]) if lo_name else (lo, hi)
        if (low is None and high is None) or any(v is not None and not _is_num(v) for v in (low, high)):
            return None
        return "clamp", [a["input"]], {"min": low, "max": high}, {}, ""

    return handler


def _f_sum(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    a = bind([("input", REQ), ("dim", None), ("keepdim", False), ("dtype", None)], args, kwargs)
    if a is None or shaped(a["input"]) is None or not isinstance(a["keepdim"], bool) or a["dtype"] is not None:
        return None
    x = a["input"]
    dims = tuple(range(len(x.shape))) if a["dim"] is None else (a["dim"],) if is_int(a["dim"]) else ints(a["dim"])
    return None if not dims else ("sum", [x], {"dims": dims, "keepdim": a["keepdim"]}, {}, "")


def _f_amax(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    a = bind([("input", REQ), ("dim", ()), ("keepdim", False)], args, kwargs)
    if a is None or shaped(a["input"]) is None or not isinstance(a["keepdim"], bool):
        return None
    x = a["input"]
    dims = tuple(range(len(x.shape))) if a["dim"] in ((), []) else (a["dim"],) if is_int(a["dim"]) else ints(a["dim"])
    return None if not dims else ("amax", [x], {"dims": dims, "keepdim": a["keepdim"]}, {}, "")


def _f_norm(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    """``torch.norm(x, p="fro", dim=None, keepdim=False)``, ``x.norm(...)``, ``torch.linalg.vector_norm(x, ord=2, ...)``."""
    p = ("ord", 2) if target is torch.linalg.vector_norm else ("p", "fro")
    last = [("dtype", None)] if n.op == "call_method" else [("out", None), ("dtype", None)]  # x.norm has no out
    a = bind([("input", REQ), p, ("dim", None), ("keepdim", False), *last], args, kwargs)
    if a is None or a["dtype"] is not None or a.get("out") is not None:
        return None
    return vector_norm(shaped(a["input"]), a[p[0]], a["dim"], a["keepdim"])


def _f_normalize(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    """``F.normalize(x, p, dim, eps)``: ``x / x.norm(p, dim, keepdim=True).clamp_min(eps)``, as PyTorch computes it."""
    a = bind([("input", REQ), ("p", 2.0), ("dim", 1), ("eps", 1e-12), ("out", None)], args, kwargs)
    if a is None or a["out"] is not None or not is_int(a["dim"]) or isinstance(a["eps"], bool) or not isinstance(a["eps"], (int, float)):
        return None
    made = vector_norm(shaped(a["input"]), a["p"], a["dim"], True)
    if made is None:
        return None
    where = b.source(n)
    size = b.add("clamp", [b.add(*made[:4], source=where)], {"min": float(a["eps"])}, {}, where)
    return "div", [a["input"], size], {}, {}, ""


def _f_identity_unless_training(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    a = bind([("input", REQ), ("p", 0.5), ("training", True), ("inplace", False)], args, kwargs)
    if a is None or shaped(a["input"]) is None or a["training"] is not False:
        return None
    return "identity", [a["input"]], {}, {}, ""


# --------------------------------------------------------------------------- layers as functions


def _const(x: Any) -> torch.Tensor | None:
    return x.tensor if isinstance(x, Const) else None


def _f_leaky_relu(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    a = bind([("input", REQ), ("negative_slope", 0.01), ("inplace", False)], args, kwargs)
    return None if a is None else leaky_relu_made(shaped(a["input"]), a["negative_slope"], "")


def _f_elu(kind: str) -> Callable[..., Made]:
    """``F.elu(x, alpha)``, ``F.selu(x)`` (``torch.selu``), ``F.celu(x, alpha)`` (``torch.celu``): ``elu``."""
    spec = [("input", REQ)] + ([("alpha", 1.0)] if kind != "selu" else []) + [("inplace", False)]

    def handler(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
        a = bind(spec, args, kwargs)
        return None if a is None else elu_made(shaped(a["input"]), kind, a.get("alpha", 1.0), "")

    return handler


def _f_threshold(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    a = bind([("input", REQ), ("threshold", REQ), ("value", REQ), ("inplace", False)], args, kwargs)
    if a is None or shaped(a["input"]) is None or not all(isinstance(a[k], (int, float)) for k in ("threshold", "value")):
        return None
    return "threshold", [a["input"]], {"threshold": float(a["threshold"]), "value": float(a["value"])}, {}, ""


def _f_softplus(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    a = bind([("input", REQ), ("beta", 1.0), ("threshold", 20.0)], args, kwargs)
    if a is None or shaped(a["input"]) is None or not all(isinstance(a[k], (int, float)) for k in ("beta", "threshold")):
        return None
    return "softplus", [a["input"]], {"beta": float(a["beta"]), "threshold": float(a["threshold"])}, {}, ""


def _f_prelu(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    a = bind([("input", REQ), ("weight", REQ)], args, kwargs)
    if a is None or _const(a["weight"]) is None:
        return None
    return prelu_made(shaped(a["input"]), _const(a["weight"]), a["weight"].path.rpartition(".")[0])


def _f_conv2d(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    spec = [("input", REQ), ("weight", REQ), ("bias", None), ("stride", 1), ("padding", 0), ("dilation", 1), ("groups", 1)]
    a = bind(spec, args, kwargs)
    if a is None or shaped(a["input"]) is None or len(a["input"].shape) != 4 or _const(a["weight"]) is None:
        return None
    w = _const(a["weight"])
    if a["bias"] is not None and _const(a["bias"]) is None:
        return None
    stride, dilation = ints(a["stride"], 2), ints(a["dilation"], 2)
    if stride is None or dilation is None or w.dim() != 4 or not is_int(a["groups"]):
        return None
    padding = conv_padding(a["padding"], w.shape[2:], dilation)
    if padding is None:
        return None
    params = {"weight": w} if a["bias"] is None else {"weight": w, "bias": _const(a["bias"])}
    attrs = {"stride": stride, "padding": padding, "dilation": dilation, "groups": a["groups"]}
    return "conv2d", [a["input"]], attrs, params, a["weight"].path.rpartition(".")[0]


def _f_conv1d(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    """``F.conv1d`` on ``(N, C, L)`` (what a ``Conv1d`` subclass's ``super().forward(x)`` calls: a causal TCN's
    conv) as ``nn.Conv1d`` is captured: ``flatten(conv2d(x.unsqueeze(2)), 2, 3)``, a ``1 x k`` kernel."""
    spec = [("input", REQ), ("weight", REQ), ("bias", None), ("stride", 1), ("padding", 0), ("dilation", 1), ("groups", 1)]
    a = bind(spec, args, kwargs)
    if a is None or shaped(a["input"]) is None or len(a["input"].shape) != 3 or _const(a["weight"]) is None:
        return None
    w = _const(a["weight"])
    stride, dilation = ints(a["stride"], 1), ints(a["dilation"], 1)
    padding = a["padding"] if isinstance(a["padding"], str) else ints(a["padding"], 1)
    if w.dim() != 3 or stride is None or dilation is None or padding is None or not is_int(a["groups"]) or (
            a["bias"] is not None and _const(a["bias"]) is None):
        return None
    padding = conv_padding(padding if isinstance(padding, str) else (0, *padding), (1, w.shape[2]), (1, *dilation))
    if padding is None:
        return None
    params = {"weight": w.unsqueeze(2)} | ({} if a["bias"] is None else {"bias": _const(a["bias"])})
    attrs = {"stride": (1, *stride), "padding": padding, "dilation": (1, *dilation), "groups": a["groups"]}
    where = a["weight"].path.rpartition(".")[0] or b.source(n)
    x4 = b.add(*unsqueezed(a["input"], 2)[:4], source=where)
    return "flatten", [b.add("conv2d", [x4], attrs, params, where)], {"start": 2, "end": 3}, {}, where


def _f_conv_transpose(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    """``F.conv_transpose2d`` of a 4-D input, ``F.conv_transpose3d`` of a 5-D one."""
    spec = [("input", REQ), ("weight", REQ), ("bias", None), ("stride", 1), ("padding", 0), ("output_padding", 0),
            ("groups", 1), ("dilation", 1)]
    a = bind(spec, args, kwargs)
    axes = 3 if target in (F.conv_transpose3d, torch.conv_transpose3d) else 2
    if a is None or shaped(a["input"]) is None or len(a["input"].shape) != 2 + axes or _const(a["weight"]) is None:
        return None
    w = _const(a["weight"])
    if w.dim() != 2 + axes or (a["bias"] is not None and _const(a["bias"]) is None):
        return None
    attrs = transposed_conv_attrs(a["stride"], a["padding"], a["output_padding"], a["dilation"], a["groups"], axes)
    if attrs is None:
        return None
    params = {"weight": w} if a["bias"] is None else {"weight": w, "bias": _const(a["bias"])}
    return f"conv_transpose{axes}d", [a["input"]], attrs, params, a["weight"].path.rpartition(".")[0]


def _f_conv3d(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    spec = [("input", REQ), ("weight", REQ), ("bias", None), ("stride", 1), ("padding", 0), ("dilation", 1), ("groups", 1)]
    a = bind(spec, args, kwargs)
    if a is None or shaped(a["input"]) is None or len(a["input"].shape) != 5 or _const(a["weight"]) is None:
        return None
    w = _const(a["weight"])
    if w.dim() != 5 or (a["bias"] is not None and _const(a["bias"]) is None):
        return None
    attrs = conv3d_attrs(w.shape[2:], a["stride"], a["padding"], a["dilation"], a["groups"])
    if attrs is None:
        return None
    params = {"weight": w} if a["bias"] is None else {"weight": w, "bias": _const(a["bias"])}
    return "conv3d", [a["input"]], attrs, params, a["weight"].path.rpartition(".")[0]


def _f_pad(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    a = bind([("input", REQ), ("pad", REQ), ("mode", "constant"), ("value", None)], args, kwargs)
    if a is None or shaped(a["input"]) is None:
        return None
    pad = ints(a["pad"])
    value = 0.0 if a["value"] is None else a["value"]
    if a["mode"] != "constant" or pad is None or len(pad) not in (2, 4) or not isinstance(value, (int, float)) or len(a["input"].shape) < 2:
        return pad_nd(a["input"], a["pad"], a["mode"], a["value"])  # channels-last, reflect, replicate, circular
    left, right, top, bottom = (*pad, 0, 0)[:4]
    return "pad", [a["input"]], {"pads": (top, bottom, left, right), "value": float(value)}, {}, ""


def _f_batch_norm(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    spec = [("input", REQ), ("running_mean", REQ), ("running_var", REQ), ("weight", None), ("bias", None), ("training", False), ("momentum", 0.1), ("eps", 1e-5)]
    a = bind(spec, args, kwargs)
    if a is None or shaped(a["input"]) is None:
        return None
    if a["training"] is not False:
        b.leave_bn(n, "F.batch_norm(training=True): it normalises with batch statistics")
        return None
    mean, var = _const(a["running_mean"]), _const(a["running_var"])
    if mean is None or var is None or not isinstance(a["eps"], (int, float)):
        return None
    if any(a[k] is not None and _const(a[k]) is None for k in ("weight", "bias")):
        return None
    params = bn_params(mean, var, _const(a["weight"]), _const(a["bias"]))
    return "batch_norm", [a["input"]], {"eps": float(a["eps"])}, params, a["running_mean"].path.rpartition(".")[0]


def _f_linear(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    a = bind([("input", REQ), ("weight", REQ), ("bias", None)], args, kwargs)
    if a is None or shaped(a["input"]) is None or _const(a["weight"]) is None:
        return None
    if a["bias"] is not None and _const(a["bias"]) is None:
        return None
    params = {"weight": _const(a["weight"])}
    if a["bias"] is not None:
        params["bias"] = _const(a["bias"])
    return "linear", [a["input"]], {}, params, a["weight"].path.rpartition(".")[0]


def _f_layer_norm(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    a = bind([("input", REQ), ("normalized_shape", REQ), ("weight", None), ("bias", None), ("eps", 1e-5)], args, kwargs)
    if a is None or shaped(a["input"]) is None or not isinstance(a["eps"], (int, float)):
        return None
    if any(a[k] is not None and _const(a[k]) is None for k in ("weight", "bias")):
        return None
    params = {k: _const(a[k]) for k in ("weight", "bias") if a[k] is not None}
    shape = ints(a["normalized_shape"])
    if shape is None and params and isinstance(a["normalized_shape"], (tuple, list)):
        # Read from sizes (``(y.shape[-1],)``): layer_norm runs only where they equal the weight's shape, so that
        # shape is the normalized shape at every input the model accepts.
        pinned = tuple(next(iter(params.values())).shape)
        if len(pinned) == len(a["normalized_shape"]) and tuple(a["input"].shape[-len(pinned):]) == pinned:
            shape = pinned
    if shape is None:
        return None
    return "layer_norm", [a["input"]], {"normalized_shape": shape, "eps": float(a["eps"])}, params, ""


def _f_rms_norm(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    a = bind([("input", REQ), ("normalized_shape", REQ), ("weight", None), ("eps", None)], args, kwargs)
    if a is None or shaped(a["input"]) is None or not isinstance(a["eps"], (int, float, type(None))) or ints(a["normalized_shape"]) is None:
        return None
    if a["weight"] is not None and _const(a["weight"]) is None:
        return None
    params = {} if a["weight"] is None else {"weight": _const(a["weight"])}
    eps = None if a["eps"] is None else float(a["eps"])  # None: the epsilon of the dtype it runs in, read per call
    return "rms_norm", [a["input"]], {"normalized_shape": ints(a["normalized_shape"]), "eps": eps}, params, ""


def _f_avg_pool(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    """``F.avg_pool1d``/``2d``/``3d`` (the 1-D one has no ``divisor_override``)."""
    spatial = _POOLED_AXES[target]
    spec = [("input", REQ), ("kernel_size", REQ), ("stride", None), ("padding", 0), ("ceil_mode", False), ("count_include_pad", True)]
    a = bind(spec + ([("divisor_override", None)] if spatial > 1 else []), args, kwargs)
    if a is None:
        return None
    x, divisor = shaped(a["input"]), a.get("divisor_override")
    if spatial == 2 and x is not None and _size_of(a["kernel_size"]) is x and a["stride"] in (None, [], ()) and a["padding"] in (0, (0, 0), [0, 0]) and divisor is None:
        return global_mean(x, 1)  # a window of the input's own size (``kernel_size=[h, w]`` read from it): the mean, at any size
    return avg_pool(x, a["kernel_size"], a["stride"], a["padding"], a["ceil_mode"], a["count_include_pad"], divisor, spatial)


def _f_adaptive_avg(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    """``F.adaptive_avg_pool1d``/``2d``/``3d``."""
    a = bind([("input", REQ), ("output_size", REQ)], args, kwargs)
    return None if a is None else global_mean(shaped(a["input"]), a["output_size"], _POOLED_AXES[target])


_POOLED_AXES = {F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3, F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2, F.adaptive_avg_pool3d: 3}


def _f_unfold(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    """``F.unfold(input, kernel_size, dilation=1, padding=0, stride=1)``."""
    a = bind([("input", REQ), ("kernel_size", REQ), ("dilation", 1), ("padding", 0), ("stride", 1)], args, kwargs)
    return None if a is None else im2col(shaped(a["input"]), a["kernel_size"], a["dilation"], a["padding"], a["stride"])


def _f_fold(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    """``F.fold(input, output_size, kernel_size, dilation=1, padding=0, stride=1)``."""
    a = bind([("input", REQ), ("output_size", REQ), ("kernel_size", REQ), ("dilation", 1), ("padding", 0), ("stride", 1)], args, kwargs)
    if a is None or a["output_size"] is None:
        return None
    return im2col(shaped(a["input"]), a["kernel_size"], a["dilation"], a["padding"], a["stride"], a["output_size"])


def _f_adaptive_max(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    a = bind([("input", REQ), ("output_size", REQ), ("return_indices", False)], args, kwargs)
    if a is None or a["return_indices"] is not False:
        return None
    return adaptive_pool("adaptive_max_pool2d", shaped(a["input"]), a["output_size"])


def _f_max_pool(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    spec = [("input", REQ), ("kernel_size", REQ), ("stride", None), ("padding", 0), ("dilation", 1), ("ceil_mode", False), ("return_indices", False)]
    a = bind(spec, args, kwargs)
    if a is None:
        return None
    return max_pool(shaped(a["input"]), a["kernel_size"], a["stride"], a["padding"], a["dilation"], a["ceil_mode"], a["return_indices"])


def _f_group_norm(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    a = bind([("input", REQ), ("num_groups", REQ), ("weight", None), ("bias", None), ("eps", 1e-5)], args, kwargs)
    if a is None or shaped(a["input"]) is None or not is_int(a["num_groups"]) or not _is_num(a["eps"]):
        return None
    if any(a[k] is not None and _const(a[k]) is None for k in ("weight", "bias")):
        return None
    params = {k: _const(a[k]) for k in ("weight", "bias") if a[k] is not None}
    return "group_norm", [a["input"]], {"num_groups": a["num_groups"], "eps": float(a["eps"])}, params, ""


def _f_interpolate(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    """``F.interpolate``; a size read from another value's shape (``size=y.shape[-2:]``) makes that value a second input."""
    spec = [("input", REQ), ("size", None), ("scale_factor", None), ("mode", "nearest"), ("align_corners", None), ("recompute_scale_factor", None), ("antialias", False)]
    a = bind(spec, args, kwargs)
    if a is None:
        return None
    x, like = shaped(a["input"]), _size_of(a["size"])
    rest = (a["mode"], a["align_corners"], a["recompute_scale_factor"], a["antialias"])
    if like is None:
        return interpolate(x, a["size"], a["scale_factor"], *rest)
    made = interpolate(x, like.shape[-2:], a["scale_factor"], *rest)  # checks the other arguments
    return None if made is None else ("interpolate", [x, like], {**made[2], "size": None}, {}, "")


def _one_read(factors: list | None) -> tuple[Value, int] | None:
    """``(value, axis)`` where a size's ``factors`` (:func:`_size_factors`) are one read, undivided, else None."""
    if factors is not None and len(factors) == 1 and isinstance(factors[0], tuple) and len(factors[0]) == 2:
        return factors[0]
    return None


def _size_of(size: Any) -> Value | None:
    """The value whose last two sizes ``size`` reads at run time: ``y.shape[-2:]``, ``y.shape[2:]``, ``y.size()[2:]``,
    ``(y.shape[2], y.shape[3])``, ``(y.size(-2), y.size(-1))``; else None."""

    def read(e: Any) -> tuple[Value, Any] | None:  # (y, index) for y.shape[index] / y.size()[index] / y.size(index)
        if not isinstance(e, SymExpr):
            return None
        if e.target == "size" and len(e.args) == 2 and not e.kwargs and shaped(e.args[0]) is not None:
            return e.args[0], e.args[1]
        if e.target is operator.getitem and len(e.args) == 2 and isinstance(e.args[0], SymExpr):
            inner = e.args[0]
            of_shape = inner.target is getattr and inner.args[1:] == ("shape",)
            of_size = inner.target == "size" and len(inner.args) == 1 and not inner.kwargs
            if (of_shape or of_size) and shaped(inner.args[0]) is not None:
                return inner.args[0], e.args[1]
        return None

    r = read(size)
    if r is not None:
        y, index = r
        if isinstance(index, slice) and index.stop is None and index.step is None and index.start in (len(y.shape) - 2, -2) and len(y.shape) >= 2:
            return y
        return None
    if isinstance(size, (tuple, list)) and len(size) == 2:
        # (y.shape[2], y.shape[3]), or the items of a slice, h, w = y.shape[-2:] (a size read: :func:`_size_factors`)
        rs = [read(e) or _one_read(_size_factors(e)) for e in size]
        if None in rs or rs[0][0] is not rs[1][0] or not all(is_int(i) for _, i in rs):
            return None
        y = rs[0][0]
        rank = len(y.shape)
        return y if [i % rank for _, i in rs] == [rank - 2, rank - 1] else None
    return None


def _f_slice_scatter(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    """``torch.slice_scatter``; a constant input (zeros written into) as a ``constant`` node."""
    a = bind([("input", REQ), ("src", REQ), ("dim", 0), ("start", None), ("end", None), ("step", 1)], args, kwargs)
    if a is None or not is_int(a["dim"]) or not is_int(a["step"]) or a["step"] < 1:
        return None
    if not all(v is None or is_int(v) for v in (a["start"], a["end"])) or constant(a["input"]) is not None and constant(a["src"]) is not None:
        return None
    x, src = as_value(b, a["input"]), as_value(b, a["src"])
    if x is None or src is None:
        return None
    attrs = {"axis": a["dim"], "start": a["start"] or 0, "end": a["end"], "step": a["step"]}
    return "slice_scatter", [x, src], attrs, {}, ""


def _f_after_call(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    """``after_call(x, result)`` (:func:`~repalgebra.frontend.inplace.reads_after_calls`): ``x`` read after a call kept
    whole, which may have written into it."""
    if kwargs or len(args) != 2 or shaped(args[0]) is None or not isinstance(args[1], Value):
        return None
    return "after_call", [args[0], args[1]], {}, {}, ""


def _f_setitem_copy(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    """``y[:, :2, :, 1:] = v`` (made :func:`~repalgebra.frontend.inplace.setitem_copy` by ``functionalize``): one
    ``slice_scatter`` per sliced axis, as ``torch.export`` records it, where the index is int slices.  A ``v``
    that broadcasts (a per-channel fill, a number) is expanded to the slice first, which needs every sliced
    length fixed whatever the size of its axis (``:p``, ``-p:``, ``a:b``; not ``1:``); else the call is carried
    as written."""
    if kwargs or len(args) != 3 or shaped(args[0]) is None:
        return None
    x, index, value = args
    index = index if isinstance(index, tuple) else (index,)
    if len(index) > len(x.shape) or not all(isinstance(s, slice) and all(v is None or is_int(v) for v in (s.start, s.stop, s.step))
                                            and (s.step or 1) > 0 for s in index):
        return None
    cuts = [(k, slice(s.start or 0, s.stop, s.step or 1)) for k, s in enumerate(index) if s != slice(None)]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = Const(torch.tensor(value, dtype=x.dtype), "")
    src = as_value(b, value)
    if not cuts or src is None:
        return None
    where = b.source(n)
    regions = [x]  # the value each scatter writes into: x, then x narrowed by each slice but the last
    for k, s in cuts[:-1]:
        regions.append(b.add("slice", [regions[-1]], {"axis": k, "start": s.start, "end": s.stop, "step": s.step}, {}, where))
    written = tuple(len(range(*s.indices(x.shape[k]))) for k, s in cuts)
    shape = list(x.shape)
    for (k, _), length in zip(cuts, written):
        shape[k] = length
    if tuple(src.shape) != tuple(shape):  # broadcast to the slice: its lengths must not follow the sizes
        fixed = [_slice_length(s) for _, s in cuts]
        if fixed != list(written) or len(src.shape) > len(shape):
            return None
        sliced = dict(zip((k for k, _ in cuts), written))
        sizes = tuple(sliced[k] if k in sliced else ((0, k),) for k in range(len(shape)))  # ((0, k),): x.shape[k] at run time
        src = b.add("expand_dyn", [src, x], {"shape": sizes}, {}, where)
    for (k, s), region in zip(reversed(cuts[1:]), reversed(regions[1:])):
        src = b.add("slice_scatter", [region, src], {"axis": k, "start": s.start, "end": s.stop, "step": s.step}, {}, where)
    k, s = cuts[0]
    return "slice_scatter", [x, src], {"axis": k, "start": s.start, "end": s.stop, "step": s.step}, {}, ""


def _slice_length(s: slice) -> int | None:
    """How many elements ``s`` (int start, step) takes from an axis long enough, where that does not depend on the
    axis' length (``:p``, ``-p:``, ``a:b`` with both of one sign), else None."""
    if s.stop is None:
        return -(s.start // s.step) if s.start < 0 else None
    if (s.start >= 0) != (s.stop >= 0):
        return None
    return max(0, -((s.start - s.stop) // s.step))


def _f_zeros_like(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    """``torch.zeros_like(y)`` (ShiftViT's ``out``, written in slices next): a zero expanded to ``y``'s sizes at run
    time."""
    if kwargs or len(args) != 1 or shaped(args[0]) is None:
        return None
    x = args[0]
    zero = b.add("constant", [], {"dtype": x.dtype}, {"value": torch.zeros((), dtype=x.dtype)}, b.source(n))
    return "expand_dyn", [zero, x], {"shape": tuple(((0, k),) for k in range(len(x.shape)))}, {}, ""


def _f_repeat(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    """``x.repeat(2, 1, 1)`` or ``x.repeat((2, 1, 1))`` with int counts (a count read from a shape stays a call)."""
    if kwargs or len(args) < 2 or shaped(args[0]) is None:
        return None
    counts = ints(args[1]) if len(args) == 2 and isinstance(args[1], (tuple, list)) else ints(args[1:])
    if counts is None or len(counts) < len(args[0].shape) or min(counts) < 0:
        return None
    return "repeat", [args[0]], {"repeats": counts}, {}, ""


def _f_expand(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    """``x.expand(sizes)`` with int sizes (-1 keeps one), ``x.expand_as(y)``, and ``expand_dyn`` for sizes read from
    shapes (a class token: ``self.cls_token.expand(x.shape[0], -1, -1)``)."""
    c = constant(args[0]) if args else None
    if kwargs or not args or (shaped(args[0]) is None and c is None):
        return None
    x, rest = args[0], args[1:]
    x_shape = tuple(c.tensor.shape) if c is not None else x.shape
    if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
        rest = tuple(rest[0])
    if target == "expand_as":  # of a constant too (SSD's L2Norm: ``self.weight[...].expand_as(x) * x``, see _f_mul)
        if len(rest) != 1 or shaped(rest[0]) is None:
            return None
        return "expand", [as_value(b, x), rest[0]], {}, {}, ""
    shape = ints(rest)
    if shape is not None:
        return None if c is not None else ("expand", [x], {"shape": shape}, {}, "")
    dyn = _dyn_sizes(rest)
    new = len(rest) - len(x_shape)  # leading axes expand adds
    if dyn is None or new < 0 or -1 in dyn[1][:new]:
        return None
    refs, entries = dyn
    if c is None and -1 in entries:  # -1 keeps x's size: read from x at run time (it may be the batch)
        refs = [*refs, x]
        entries = tuple(((len(refs) - 1, k - new),) if e == -1 else e for k, e in enumerate(entries))
    sizes = tuple(x_shape[k - new] if e == -1 else e for k, e in enumerate(entries))  # a constant's sizes are fixed
    return "expand_dyn", [as_value(b, x), *refs], {"shape": sizes}, {}, ""


def _f_roll(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    """``torch.roll``; without ``dims`` it rolls the flattened tensor: ``x.flatten().roll(s, 0).reshape(x.shape)``."""
    a = bind([("input", REQ), ("shifts", REQ), ("dims", None)], args, kwargs)
    if a is None or shaped(a["input"]) is None:
        return None
    x = a["input"]
    if a["dims"] is None and (is_int(a["shifts"]) or len(ints(a["shifts"]) or ()) == 1) and len(x.shape) >= 1:
        flat = b.add("flatten", [x], {"start": 0, "end": -1}, {}, b.source(n))
        shift = a["shifts"] if is_int(a["shifts"]) else ints(a["shifts"])[0]
        rolled = b.add("roll", [flat], {"shifts": (shift,), "dims": (0,)}, {}, b.source(n))
        return "reshape_dyn", [rolled, x], {"shape": tuple(((0, k),) for k in range(len(x.shape)))}, {}, ""
    shifts, dims = ((v,) if is_int(v) else ints(v) for v in (a["shifts"], a["dims"]))
    if shifts is None or dims is None or len(shifts) != len(dims):
        return None
    return "roll", [a["input"]], {"shifts": shifts, "dims": dims}, {}, ""


def _f_pixel_shuffle(op: str) -> Callable[..., Made]:
    def handler(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
        name = "upscale_factor" if op == "pixel_shuffle" else "downscale_factor"
        a = bind([("input", REQ), (name, REQ)], args, kwargs)
        if a is None or shaped(a["input"]) is None or len(a["input"].shape) != 4 or not is_int(a[name]):
            return None
        return op, [a["input"]], {"factor": a[name]}, {}, ""

    return handler


# --------------------------------------------------------------------------- the table


FUNCTION_HANDLERS: dict[Any, Callable[..., Made]] = {}
TRUSTED_FUNCTIONS = (F.batch_norm,)


def _register(handler: Callable[..., Made], *targets: Any) -> None:
    for t in targets:
        FUNCTION_HANDLERS[t] = handler


_register(_f_join("add"), operator.add, torch.add, ("method", "add"))
_register(_f_join("sub"), operator.sub, torch.sub, torch.subtract, ("method", "sub"), ("method", "subtract"))
_register(_f_mul, operator.mul, torch.mul, torch.multiply, ("method", "mul"), ("method", "multiply"))  # PaddleClas ports: multiply
_register(_f_neg, operator.neg, torch.neg, ("method", "neg"))
_register(_f_matmul, operator.matmul, torch.matmul, ("method", "matmul"))
_register(_f_addmm, torch.addmm)
_register(_f_addbmm, torch.addbmm)
_register(_f_baddbmm, torch.baddbmm)
_register(_f_cat, torch.cat, torch.concat, torch.concatenate)
_register(_f_stack, torch.stack)
_register(_f_flatten, torch.flatten, ("method", "flatten"))
_register(_f_reshape, torch.reshape, ("method", "reshape"), ("method", "view"))
_register(_f_reshape_as, ("method", "reshape_as"), ("method", "view_as"))
_register(_f_permute, torch.permute, ("method", "permute"))
_register(_f_getitem, operator.getitem)
_register(_f_values, getattr)
_register(_f_select, torch.select, ("method", "select"))
_register(_f_transpose, torch.transpose, ("method", "transpose"))
_register(_f_mean, torch.mean, ("method", "mean"))
_register(_f_var, torch.var, ("method", "var"))
_register(_f_softmax, F.softmax, torch.softmax, ("method", "softmax"), F.log_softmax, torch.log_softmax, ("method", "log_softmax"))
_register(_f_glu, F.glu)
_register(_f_unary("relu", ("inplace", False)), F.relu)
_register(_f_unary("relu"), torch.relu, ("method", "relu"))
_register(_f_unary("gelu", ("approximate", "none")), F.gelu)
_register(_f_unary("sigmoid"), torch.sigmoid, F.sigmoid, ("method", "sigmoid"))
_register(_f_identity_unless_training, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d)
_register(_f_conv2d, F.conv2d, torch.conv2d)
_register(_f_conv_transpose, F.conv_transpose2d, torch.conv_transpose2d, F.conv_transpose3d, torch.conv_transpose3d)
_register(_f_conv3d, F.conv3d, torch.conv3d)
_register(_f_conv1d, F.conv1d, torch.conv1d)
_register(_f_pad, F.pad)
_register(_f_batch_norm, F.batch_norm)
_register(_f_linear, F.linear)
_register(_f_layer_norm, F.layer_norm)
_register(_f_rms_norm, F.rms_norm)
_register(_f_avg_pool, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)
_register(_f_unary("abs"), torch.abs, operator.abs, ("method", "abs"))
_register(_f_amax, torch.amax, ("method", "amax"))
_register(_f_norm, torch.norm, torch.linalg.vector_norm, ("method", "norm"))
_register(_f_normalize, F.normalize)
_register(_f_unfold, F.unfold)
_register(_f_fold, F.fold)
_register(_f_adaptive_avg, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)
_register(_f_same_values, ("method", "contiguous"), torch.Tensor.contiguous, ("method", "clone"), torch.clone)
_register(_f_detached, ("method", "detach"), torch.detach)
_register(_f_cast, ("method", "to"), ("method", "type"), *(("method", m) for m in _CAST_METHODS))
_register(_f_div, operator.truediv, torch.div, torch.divide, torch.true_divide, ("method", "div"), ("method", "divide"),
          ("method", "true_divide"))
_register(_f_pow, operator.pow, torch.pow, ("method", "pow"))
_register(_f_matmul, torch.bmm, ("method", "bmm"))
_register(_f_einsum, torch.einsum)
_register(_f_attention, F.scaled_dot_product_attention)
_register(_f_unary("silu", ("inplace", False)), F.silu)
_register(_f_unary("hardswish", ("inplace", False)), F.hardswish)
_register(_f_unary("hardsigmoid", ("inplace", False)), F.hardsigmoid)
_register(_f_unary("tanh"), torch.tanh, F.tanh, ("method", "tanh"))
_register(_f_unary("sqrt"), torch.sqrt, ("method", "sqrt"))
_register(_f_unary("rsqrt"), torch.rsqrt, ("method", "rsqrt"))
_register(_f_unary("exp"), torch.exp, ("method", "exp"))
_register(_f_unary("log"), torch.log, ("method", "log"))
_register(_f_leaky_relu, F.leaky_relu)
_register(_f_softplus, F.softplus)
_register(_f_threshold, F.threshold)
_register(_f_elu("elu"), F.elu)
_register(_f_elu("selu"), F.selu, torch.selu)
_register(_f_elu("celu"), F.celu, torch.celu)
_register(_f_unary("log_sigmoid"), F.logsigmoid)
_register(_f_prelu, F.prelu, torch.prelu)
_register(_f_clamp(), torch.clamp, torch.clip, ("method", "clamp"), ("method", "clip"))
_register(_f_clamp("min_val", "max_val", -1.0, 1.0), F.hardtanh)
_register(_f_clamp(None, None, 0.0, 6.0), F.relu6)
_register(_f_sum, torch.sum, ("method", "sum"))
_register(_f_max_pool, F.max_pool2d, torch.max_pool2d)
_register(_f_adaptive_max, F.adaptive_max_pool2d)
_register(_f_group_norm, F.group_norm)
_register(_f_interpolate, F.interpolate)
_register(_f_roll, torch.roll, ("method", "roll"))
_register(_f_expand, ("method", "expand"), ("method", "expand_as"))
_register(_f_repeat, ("method", "repeat"))
_register(_f_slice_scatter, torch.slice_scatter, ("method", "slice_scatter"))
_register(_f_setitem_copy, setitem_copy)
_register(_f_after_call, after_call)
_register(_f_chunk_piece, chunk_piece)
_register(_f_split_piece, split_piece)
_register(_f_zeros_like, torch.zeros_like)
_register(_f_pixel_shuffle("pixel_shuffle"), F.pixel_shuffle, torch.pixel_shuffle)
_register(_f_pixel_shuffle("pixel_unshuffle"), F.pixel_unshuffle, torch.pixel_unshuffle)
_register(_f_unsqueeze, torch.unsqueeze, ("method", "unsqueeze"))
_register(_f_squeeze, torch.squeeze, ("method", "squeeze"))
